"""The deployment under assessment: the same TOML file ``edgeshield serve --config`` reads, plus compliance keys.

Serve keys are the serve options without their dashes (``audit-db = "audit.db"``); relative paths are relative to
the file. The server's own data-subject and monitor keys (``retention-days``, ``subject-header``, ``subject-keys``,
``monitor``, ``monitor-rules``, ``monitor-db``) are read with serve's defaults; the compliance keys
(:data:`COMPLIANCE_KEYS`) say what serve does not need: which interfaces may listen, which sockets to judge, whether
every audit entry must already be under a checkpoint. ``_`` and ``-`` are the same in key names. Keys neither
serve's nor compliance's are refused when the caller gives ``serve_keys`` (the CLI passes the serve command's
options) and otherwise ignored.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeshield.errors import InvalidArgumentError

# The keys only `comply` reads (serve ignores them), and what each holds. The server's own retention-days,
# subject-header, subject-keys, monitor, monitor-rules and monitor-db are read here too, with serve's defaults.
COMPLIANCE_KEYS: Mapping[str, str] = {
    "management-interfaces": "addresses or interface names besides loopback the server may listen on",
    "exposure": "'server' (judge the server's port; default) or 'host' (every listening socket)",
    "require-checkpoint": "audit_log_verifying fails when entries are not yet covered by a checkpoint",
}
SERVER_KEYS_READ = ("retention-days", "subject-header", "subject-keys", "monitor", "monitor-rules", "monitor-db")
# serve keys this module reads, with their types
_PATHS = ("bundle", "owner-key", "device-key", "ca", "crl", "cert", "key", "audit-db", "audit-key", "policy",
          "served-watermark-evidence", "witness-note", "subject-keys", "monitor-db", "monitor-rules")
_STRINGS = ("host", "witness", "crl-expired", "passphrase-env", "subject-header", "exposure")


class DeploymentError(InvalidArgumentError):
    """The deployment file is unreadable, not TOML, or has a key of the wrong type or an unknown key."""


@dataclass(frozen=True)
class Deployment:
    """What the compliance checks need to know about one device's deployment (paths resolved)."""

    config: Path | None = None
    bundle: Path | None = None
    owner_key: Path | None = None
    device_key: Path | None = None
    ca: Path | None = None
    crl: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    audit_db: Path | None = None
    audit_key: Path | None = None
    policy: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8443
    served_watermark_evidence: Path | None = None
    witness: str | None = None
    witness_note: Path | None = None
    witness_vkeys: tuple[str, ...] = ()
    crl_expired: str = "fail-closed"
    passphrase_env: str | None = None
    retention_days: float | None = None
    subject_header: str | None = None
    subject_keys: Path | None = None
    management_interfaces: tuple[str, ...] = ()
    exposure: str = "server"
    require_checkpoint: bool = False
    monitor: bool = True
    monitor_db: Path | None = None
    monitor_rules: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the other serve keys, as read

    def __post_init__(self) -> None:
        if self.exposure not in ("server", "host"):
            raise DeploymentError(f"exposure must be 'server' or 'host', not {self.exposure!r}")
        if self.retention_days is not None and not self.retention_days > 0:
            raise DeploymentError(f"retention-days must be a positive number, not {self.retention_days!r}")
        if not 0 <= self.port <= 65535:
            raise DeploymentError(f"port must be 0..65535, not {self.port}")

    @property
    def passphrase(self) -> bytes | None:
        from edgeshield import keys

        return keys.passphrase_from_env(self.passphrase_env)

    @property
    def audit_public_key(self) -> Path | None:
        """The audit key's public half beside it (``audit keygen`` writes KEY.pub), when there."""
        if self.audit_key is None:
            return None
        pub = self.audit_key.with_suffix(".pub")
        return pub if pub.is_file() else None

    @property
    def witness_note_path(self) -> Path | None:
        if self.witness_note is not None:
            return self.witness_note
        return self.audit_db.with_name(self.audit_db.name + ".cosigned") if self.audit_db is not None else None

    def require(self, name: str) -> Path:
        """A path the caller needs, or a typed error naming the key."""
        value = getattr(self, name.replace("-", "_"))
        if value is None:
            raise DeploymentError(f"the deployment has no {name} (set {name} = \"...\" in {self.config or 'it'})")
        return Path(value)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name == "extra":
                continue
            v = getattr(self, name)
            out[name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, serve_keys: Collection[str] | None = None) -> Deployment:
        from edgeshield._io import check_readable_file

        p = check_readable_file(path, what="deployment config")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DeploymentError(f"{p} is not valid TOML: {exc}") from None
        return cls.from_mapping(data, base=p.parent, config=p, serve_keys=serve_keys)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: Path, config: Path | None = None,
                     serve_keys: Collection[str] | None = None) -> Deployment:
        where = str(config) if config is not None else "deployment"
        values: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = str(raw_key).replace("_", "-")
            if key in values:
                raise DeploymentError(f"{where}: key {key!r} given twice (as - and _)")
            values[key] = value
        if serve_keys is not None:
            known = {k.replace("_", "-") for k in serve_keys} | set(COMPLIANCE_KEYS) | set(SERVER_KEYS_READ)
            unknown = sorted(set(values) - known)
            if unknown:
                raise DeploymentError(f"{where}: unknown key {unknown[0]!r}: neither a serve option nor a compliance "
                                      f"key ({', '.join(COMPLIANCE_KEYS)})")

        def typed(key: str, kind: type | tuple[type, ...], what: str) -> Any:
            v = values.get(key)
            if v is None:
                return None
            if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
                raise DeploymentError(f"{where}: {key} must be {what}, not {v!r}")
            if not isinstance(v, kind):
                raise DeploymentError(f"{where}: {key} must be {what}, not {type(v).__name__} {v!r}")
            return v

        kw: dict[str, Any] = {"config": config, "extra": {k: v for k, v in values.items()
                                                          if k not in COMPLIANCE_KEYS}}
        for key in _PATHS:
            v = typed(key, str, "a path (a string)")
            if v is not None:
                kw[key.replace("-", "_")] = base / v
        for key in _STRINGS:
            v = typed(key, str, "a string")
            if v is not None:
                kw[key.replace("-", "_")] = v
        port = typed("port", int, "a whole number")
        if port is not None:
            kw["port"] = port
        days = typed("retention-days", (int, float), "a number of days")
        if days is not None:
            kw["retention_days"] = float(days)
        rc = typed("require-checkpoint", bool, "true or false")
        if rc is not None:
            kw["require_checkpoint"] = rc
        for key, attr in (("management-interfaces", "management_interfaces"), ("witness-vkey", "witness_vkeys")):
            v = values.get(key)
            if v is None:
                continue
            items = [v] if isinstance(v, str) else v
            if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
                raise DeploymentError(f"{where}: {key} must be a list of strings")
            kw[attr] = tuple(items)
        monitor = typed("monitor", bool, "true or false")
        if monitor is not None:
            kw["monitor"] = monitor
        header = kw.get("subject_header")
        if header is not None and not _is_token(header):
            raise DeploymentError(f"{where}: subject-header {header!r} is not an HTTP header name")
        audit_db = kw.get("audit_db")
        if audit_db is not None:  # the server's defaults for the stores it keeps beside its audit log
            if header is not None and "subject_keys" not in kw:
                kw["subject_keys"] = audit_db.with_name(audit_db.name + ".subjects")
            if kw.get("monitor", True) and "monitor_db" not in kw:
                kw["monitor_db"] = audit_db.with_name(audit_db.name + ".monitor")
        return cls(**kw)


def _is_token(name: str) -> bool:
    allowed = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return bool(name) and len(name) <= 128 and set(name) <= allowed
