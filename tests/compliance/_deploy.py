"""A real deployment in a directory: keys, a CA, the protected digits bundle, the audit key, a served-watermark
evidence store and subject keys, described by a serve.toml with the compliance keys (what `comply` reads)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from edgeshield import audit, transport, watermark
from edgeshield.compliance import Deployment, SubjectKeys
from edgeshield.server import ServeConfig

from _serving import protected_digits

POLICY = Path(__file__).resolve().parents[2] / "src" / "edgeshield" / "server" / "policy" / "policy.csv"


@dataclass
class Built:
    root: Path
    config: Path
    serve: ServeConfig
    certs: dict[str, transport.IssuedCert]
    values: dict[str, Any]

    def deployment(self, **override: Any) -> Deployment:
        """The deployment as `comply` reads it, after rewriting serve.toml with ``override`` (None removes)."""
        values = {**self.values, **override}
        write_toml(self.config, {k: v for k, v in values.items() if v is not None})
        return Deployment.from_toml(self.config)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(i) for i in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, values: dict[str, Any]) -> None:
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()), encoding="utf-8")


def build(root: Path, *, port: int = 0) -> Built:
    """Everything a device has, and the server's start-up written to its audit log (build_state, as `serve` does)."""
    from edgeshield.server import build_state

    root.mkdir(parents=True, exist_ok=True)
    bundle, k = protected_digits(root)
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1", "localhost"])
    certs = {"alice": transport.issue(ca, name="alice", role="client"),
             "adm": transport.issue(ca, name="adm", role="admin")}
    audit.generate_signing_key(root / "audit.key", public_path=root / "audit.pub")
    watermark.generate_key(root / "wm.key")
    policy = root / "policy.csv"
    policy.write_bytes(POLICY.read_bytes())
    SubjectKeys(root / "subjects.db").close()
    values: dict[str, Any] = {
        "bundle": "digits.esb", "owner-key": "keys/owner.pub", "device-key": "keys/device.key", "ca": "ca",
        "cert": str(server.cert_path.relative_to(root)), "key": str(server.key_path.relative_to(root)),
        "audit-db": "audit.db", "audit-key": "audit.key", "policy": "policy.csv", "host": "127.0.0.1", "port": port,
        "served-watermark-key": "wm.key", "served-watermark-rate": 0.5, "served-watermark-evidence": "evidence.db",
        "retention-days": 30, "subject-header": "x-subject-id", "subject-keys": "subjects.db",
    }
    config = root / "serve.toml"
    write_toml(config, values)
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", policy=policy, port=port, crl_poll_s=0.2,
                      served_watermark_key=root / "wm.key", served_watermark_rate=0.5,
                      served_watermark_evidence=root / "evidence.db", subject_header="x-subject-id",
                      subject_keys=root / "subjects.db", retention_days=30.0,
                      monitor=False)  # the monitor's start-up is exercised in tests/monitor
    state = build_state(cfg)  # server.startup, model.load, config.rbac: what a start writes
    for close in state.on_shutdown:
        close()
    assert state.audit is not None
    state.audit.checkpoint()
    state.audit.close()
    return Built(root, config, cfg, certs, values)
