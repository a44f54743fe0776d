"""The compliance checks: small objects behind one protocol, each judging one property of a deployment from the
evidence the system really produces (the audit log, the files, the TLS context, the sockets).

A check never passes without evidence (``CheckResult`` refuses it). Adding a check is one class and one entry in
:data:`CHECKS`; mapping files name checks by their ``name``.
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
import ssl
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import urlsplit

from edgeshield._io import sha256_file
from edgeshield.compliance._deployment import Deployment, DeploymentError
from edgeshield.compliance._evidence import AuditSource, CheckResult, Evidence, Status
from edgeshield.errors import EdgeShieldError, InvalidArgumentError

_HALF_YEAR_DAYS = 183  # EU AI Act Art. 19(1): logs kept for at least six months


class Check(Protocol):
    """A compliance check: ``name`` (what mapping files cite), ``title``, ``looks_at`` (its evidence, in a line)."""

    name: str
    title: str
    looks_at: str

    def run(self, ctx: CheckContext) -> CheckResult: ...


@dataclass
class TlsFacts:
    """The server TLS context as ``edgeshield serve`` builds it."""

    minimum_version: str
    maximum_version: str
    verify_mode: str
    crl_check: bool

    @property
    def tls13_only(self) -> bool:
        return self.minimum_version == ssl.TLSVersion.TLSv1_3.name

    @property
    def client_cert_required(self) -> bool:
        return self.verify_mode == ssl.CERT_REQUIRED.name


@dataclass
class CheckContext:
    """What every check of one report shares: the deployment, an optional live URL to probe, the time, and the
    audit log, its verification and the TLS context, each computed once."""

    deployment: Deployment
    probe_url: str | None = None
    now: float = field(default_factory=time.time)
    timeout_s: float = 5.0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = make()
            except (EdgeShieldError, OSError) as exc:
                self._cache[key] = exc
        value = self._cache[key]
        if isinstance(value, BaseException):
            raise value
        return value

    def audit(self) -> AuditSource:
        result: AuditSource = self._once("audit", lambda: AuditSource(self.deployment.require("audit-db")))
        return result

    def audit_public_key(self) -> Any:
        def load() -> Any:
            from edgeshield.audit import load_signing_key, load_verify_key

            pub = self.deployment.audit_public_key
            if pub is not None:
                return load_verify_key(pub)
            return load_signing_key(self.deployment.require("audit-key"), self.deployment.passphrase).public_key()

        return self._once("audit_pub", load)

    def verified(self) -> Any:
        """The audit log's VerifyReport (signatures checked with the device key)."""
        return self._once("verify", lambda: self.audit().log.verify(
            public_key=self.audit_public_key(), require_checkpoint=self.deployment.require_checkpoint))

    def tls(self) -> TlsFacts:
        def build() -> TlsFacts:
            from edgeshield.transport import server_context

            d = self.deployment
            ctx = server_context(d.require("ca"), d.require("cert"), d.require("key"), crl=d.crl,
                                 passphrase=d.passphrase, allow_expired_crl=d.crl_expired == "keep-last")
            return TlsFacts(ctx.minimum_version.name, ctx.maximum_version.name, ssl.VerifyMode(ctx.verify_mode).name,
                            bool(ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF))

        result: TlsFacts = self._once("tls", build)
        return result

    def config_command(self, *extra: str) -> str:
        cfg = str(self.deployment.config) if self.deployment.config else "serve.toml"
        return shlex.join(["edgeshield", "comply", "report", "--config", cfg, *extra])


def _result(check: Check, status: Status, reason: str, evidence: list[Evidence], command: str) -> CheckResult:
    return CheckResult(check.name, status, reason, tuple(evidence), command)


def _verdict(check: Check, problems: list[str], passed: str, evidence: list[Evidence], command: str) -> CheckResult:
    """Fail naming every problem found, else pass for the reason ``passed``."""
    if problems:
        return _result(check, "fail", "; ".join(problems), evidence, command)
    return _result(check, "pass", passed, evidence, command)


def _file_evidence(path: Path, what: str) -> tuple[Evidence, int | None]:
    try:
        st = path.stat()
    except OSError:
        return Evidence("file", f"{what}: not found", str(path), {"exists": False}), None
    mode = stat.S_IMODE(st.st_mode)
    return Evidence("file", f"{what}: mode {mode:04o}, {st.st_size} bytes", str(path),
                    {"exists": True, "mode": f"{mode:04o}", "size": st.st_size,
                     "regular_file": stat.S_ISREG(st.st_mode)}), mode


def _entry_time(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def _show(ctx: CheckContext) -> str:
    return shlex.join(["edgeshield", "audit", "show", str(ctx.deployment.audit_db or "audit.db"), "--json"])


# --- the checks -------------------------------------------------------------------------------------------------
class RawInputsOnDevice:
    name = "raw_inputs_on_device"
    title = "Raw inputs stay on the device; the audit log holds digests only"
    looks_at = ("every audit entry (no field that looks like raw input values; digests must be SHA-256), and the "
                "served-watermark evidence store: a local file of mode 0600")

    def run(self, ctx: CheckContext) -> CheckResult:
        src = ctx.audit()
        scan = src.scan
        inference = src.count("inference.predict", "input.rejected", "input.flagged", "inference.timeout",
                              "watermark.served", "extraction.blocked")
        ev = [Evidence("audit_scan", f"scanned all {scan.entries} audit entries ({inference} about inference "
                                     f"requests): {scan.raw_total} with a field that looks like raw input values",
                       str(src.path), {"entries": scan.entries, "inference_entries": inference,
                                       "raw_looking": scan.raw_total,
                                       "first_raw_looking": [{"seq": s, "kind": k, "fields": p}
                                                             for s, k, p in scan.raw]})]
        newest = src.newest("inference.predict")
        if newest is not None:
            ev.append(src.evidence(newest, "the newest inference entry: its input is recorded as a SHA-256 digest"))
        problems = []
        if scan.raw_total:
            problems.append(f"{scan.raw_total} audit entries hold fields that look like raw inputs (first: seq "
                            f"{scan.raw[0][0]}, {', '.join(scan.raw[0][2])})")
        store = ctx.deployment.served_watermark_evidence
        if store is not None:
            e, mode = _file_evidence(store, "served-watermark evidence store (the only store of raw inputs)")
            ev.append(e)
            if mode is not None and mode & 0o077:
                problems.append(f"the evidence store {store} is mode {mode:04o}, not 0600: others can read raw inputs")
        else:
            ev.append(Evidence("config", "no served-watermark evidence store is configured: no raw input is kept",
                               str(ctx.deployment.config) if ctx.deployment.config else None))
        cmd = _show(ctx) + (f" && stat -c %a {shlex.quote(str(store))}" if store is not None else "")
        return _verdict(self, problems, f"no audit entry of {scan.entries} holds raw input values (inputs are logged "
                                        "as SHA-256 digests) and raw inputs are kept only in a private local store",
                        ev, cmd)


class EncryptionAtRest:
    name = "encryption_at_rest"
    title = "The model is stored encrypted (EdgeShield bundle), with no plaintext copy beside it"
    looks_at = ("the configured bundle, verified with the owner's public key (signature, payload digest, AEAD "
                "suite, recipients), and *.onnx files in the bundle's and the config's directories")

    def run(self, ctx: CheckContext) -> CheckResult:
        from edgeshield import bundles, keys

        d = ctx.deployment
        bundle = d.require("bundle")
        owner = keys.load_owner_public_key(d.owner_key) if d.owner_key is not None and d.owner_key.is_file() else None
        cmd = shlex.join(["edgeshield", "verify", str(bundle), "--owner-key", str(d.owner_key)]) if owner \
            else shlex.join(["edgeshield", "inspect", str(bundle)])
        ev: list[Evidence] = []
        problems = []
        try:
            manifest, verified = bundles.inspect(bundle, owner)
        except EdgeShieldError as exc:
            return _result(self, "fail", f"{bundle} is not a valid EdgeShield bundle: {exc}",
                           [Evidence("file", f"bundle refused: {type(exc).__name__}", str(bundle),
                                     {"error": str(exc)})], cmd)
        ev.append(Evidence("bundle", f"EdgeShield encrypted bundle ({manifest.aead}, key wrap {manifest.key_wrap}, "
                                     f"{len(manifest.recipients)} recipient key(s)); signature and payload digest "
                                     f"{'verified with the owner key' if verified else 'NOT verified (no owner key)'}",
                           str(bundle), {"verified": verified, "format": manifest.format,
                                         "format_version": manifest.format_version, "aead": manifest.aead,
                                         "key_wrap": manifest.key_wrap, "bundle_id": manifest.bundle_id,
                                         "payload_sha256": manifest.payload_sha256,
                                         "recipients": manifest.recipient_key_ids}))
        if not verified:
            problems.append("the bundle could not be verified: the deployment names no readable owner-key")
        dirs = {bundle.resolve().parent} | ({d.config.resolve().parent} if d.config is not None else set())
        plain = sorted(str(p) for folder in dirs for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() == ".onnx")
        ev.append(Evidence("directory", f"plaintext models (*.onnx) beside the bundle: {len(plain) or 'none'}",
                           ", ".join(sorted(map(str, dirs))), {"plaintext_models": plain}))
        if plain:
            problems.append(f"plaintext model file(s) in the deployment directory: {', '.join(plain)}")
        return _verdict(self, problems, "the model exists on the device only as a signed, encrypted bundle (decrypted "
                                        "in memory); no plaintext copy beside it", ev, cmd)


def _split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidArgumentError(f"--probe-url must be https://HOST:PORT, not {url!r}")
    return parts.hostname, parts.port or 443


def probe_tls(host: str, port: int, version: ssl.TLSVersion, timeout_s: float) -> tuple[str, str]:
    """Handshake with only ``version`` and no client certificate, then send one request. Returns (outcome, detail):
    outcome ``unreachable`` (no TCP connection), ``refused`` (handshake failed or the server dropped us before
    answering) or ``answered``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a probe: it tests the server's refusal, not its identity
    ctx.minimum_version = ctx.maximum_version = version
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return "unreachable", f"no TCP connection: {exc.strerror or exc}"
    with sock:
        try:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                negotiated = tls.version()
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                data = tls.recv(64)
        except ssl.SSLError as exc:
            return "refused", f"TLS refused: {exc.reason or type(exc).__name__}"
        except TimeoutError:
            return "refused", f"no answer within {timeout_s:g} s"
        except OSError as exc:
            return "refused", f"connection dropped: {exc.strerror or type(exc).__name__}"
    if not data:
        return "refused", f"handshake ({negotiated}) then closed without an answer"
    return "answered", f"negotiated {negotiated} and the server answered {data[:12]!r}"


class EncryptionInTransit:
    name = "encryption_in_transit"
    title = "Traffic is encrypted with TLS 1.3 only, and every client must present a certificate (mTLS)"
    looks_at = ("the server TLS context built from the deployment's CA, certificate and key (minimum version, "
                "verify mode, CRL checking); with --probe-url, a real TLS 1.2 handshake and a TLS 1.3 handshake "
                "without a client certificate, both of which must be refused")

    def run(self, ctx: CheckContext) -> CheckResult:
        facts = ctx.tls()
        d = ctx.deployment
        ev = [Evidence("tls", f"server TLS context: minimum {facts.minimum_version}, client certificates "
                              f"{facts.verify_mode}, CRL checked: {'yes' if facts.crl_check else 'no'}",
                       str(d.cert), {"minimum_version": facts.minimum_version,
                                     "maximum_version": facts.maximum_version, "verify_mode": facts.verify_mode,
                                     "crl_check_leaf": facts.crl_check})]
        problems = []
        if not facts.tls13_only:
            problems.append(f"the server accepts {facts.minimum_version} (TLS 1.3 only is required)")
        if not facts.client_cert_required:
            problems.append(f"client certificates are {facts.verify_mode}, not required")
        cmd = ctx.config_command()
        if ctx.probe_url is not None:
            host, port = _split_url(ctx.probe_url)
            cmd = (ctx.config_command("--probe-url", ctx.probe_url) + " # like: openssl s_client -connect "
                   f"{host}:{port} -tls1_2 </dev/null (must fail)")
            for version, label in ((ssl.TLSVersion.TLSv1_2, "TLS 1.2 handshake"),
                                   (ssl.TLSVersion.TLSv1_3, "TLS 1.3 handshake without a client certificate")):
                outcome, detail = probe_tls(host, port, version, ctx.timeout_s)
                ev.append(Evidence("probe", f"{label} to {host}:{port}: {outcome} ({detail})", ctx.probe_url,
                                   {"version": version.name, "client_certificate": False, "outcome": outcome,
                                    "detail": detail}))
                if outcome == "unreachable":
                    problems.append(f"the probe could not reach {host}:{port}: {detail}")
                elif outcome == "answered":
                    problems.append(f"a {label} was served: {detail}")
        else:
            ev.append(Evidence("probe", "no live probe (give --probe-url https://HOST:PORT to test the running "
                                        "server)", None, {}))
        live = " and a live server refused TLS 1.2 and certificate-less TLS 1.3" if ctx.probe_url else ""
        return _verdict(self, problems, f"the server's TLS context is TLS 1.3 only and requires a client certificate"
                                        f"{live}", ev, cmd)


def _default_policy() -> Path:
    import edgeshield

    return Path(edgeshield.__file__).parent / "server" / "policy" / "policy.csv"


class AccessControl:
    name = "access_control"
    title = "Role-based access control is loaded and enforced"
    looks_at = ("the newest config.rbac audit entry's policy digest against the policy file now, client "
                "certificates required by the TLS context, and the count of auth.forbidden denials")

    def run(self, ctx: CheckContext) -> CheckResult:
        src = ctx.audit()
        d = ctx.deployment
        policy = d.policy if d.policy is not None else _default_policy()
        ev: list[Evidence] = []
        problems = []
        try:
            digest = sha256_file(policy)
        except OSError as exc:
            return _result(self, "fail", f"the RBAC policy {policy} cannot be read: {exc.strerror or exc}",
                           [Evidence("file", "RBAC policy: unreadable", str(policy), {})], _show(ctx))
        ev.append(Evidence("file", f"RBAC policy file now: SHA-256 {digest}", str(policy), {"sha256": digest}))
        loaded = src.newest("config.rbac")
        if loaded is None:
            problems.append("no config.rbac entry in the audit log: the server never recorded loading a policy")
        else:
            ev.append(src.evidence(loaded, "the policy the server loaded (newest config.rbac entry)"))
            if loaded.data.get("policy_sha256") != digest:
                problems.append(f"the policy file changed since the server loaded it (entry {loaded.seq} has "
                                f"{loaded.data.get('policy_sha256')}, the file has {digest})")
        try:
            facts = ctx.tls()
            ev.append(Evidence("tls", f"client certificates: {facts.verify_mode}", str(d.cert),
                               {"verify_mode": facts.verify_mode}))
            if not facts.client_cert_required:
                problems.append("client certificates are not required, so requests have no identity to authorise")
        except EdgeShieldError as exc:
            problems.append(f"the server TLS context cannot be built: {exc}")
        denials = src.count("auth.forbidden")
        newest = src.newest("auth.forbidden")
        ev.append(Evidence("audit_count", f"RBAC denials recorded (auth.forbidden): {denials}", str(src.path),
                           {"auth.forbidden": denials, "auth.failure": src.count("auth.failure")}))
        if newest is not None:
            ev.append(src.evidence(newest, "the newest RBAC denial: the policy is enforced"))
        cmd = _show(ctx) + f" && sha256sum {shlex.quote(str(policy))}"
        seen = f"{denials} denials observed" if denials else "no denial observed yet (enforcement not exercised)"
        return _verdict(self, problems, f"the RBAC policy the server loaded is the one on disk and every request needs "
                                        f"a client certificate; {seen}", ev, cmd)


class AuditLogVerifying:
    name = "audit_log_verifying"
    title = "The audit log is enabled, intact and signed"
    looks_at = ("AuditLog.verify with the device's checkpoint key (hash chain, every checkpoint root and "
                "signature); with a witness, the cosigned checkpoint the log must extend")

    def run(self, ctx: CheckContext) -> CheckResult:
        from edgeshield.audit import verify_against

        d = ctx.deployment
        db = d.require("audit-db")
        pub = d.audit_public_key
        cmd = shlex.join(["edgeshield", "audit", "verify", str(db), *(["--checkpoint-key", str(pub)] if pub else []),
                          *(["--require-checkpoint"] if d.require_checkpoint else [])])
        try:
            report = ctx.verified()
        except EdgeShieldError as exc:
            return _result(self, "fail", f"the audit log does not verify: {exc}",
                           [Evidence("audit_verify", f"verification failed: {type(exc).__name__}", str(db),
                                     {"error": str(exc)})], cmd)
        ev = [Evidence("audit_verify", f"{report.entries} entries, {report.checkpoints} checkpoints, signatures "
                                       f"{'verified' if report.signatures_checked else 'NOT checked'} (key "
                                       f"{report.key_id}); {report.uncovered} entries not yet under a checkpoint",
                       str(db), report.to_dict())]
        problems = []
        if not report.checkpoints or not report.signatures_checked:
            problems.append("the log has no signed checkpoint to verify")
        note = d.witness_note_path
        if d.witness is not None and note is not None:
            if note.is_file():
                try:
                    against = verify_against(ctx.audit().log, note.read_bytes(), public_key=ctx.audit_public_key())
                    ev.append(Evidence("witness", f"the log extends the checkpoint at tree size {against.tree_size} "
                                                  f"cosigned by the witness ({d.witness})", str(note),
                                       against.to_dict()))
                except EdgeShieldError as exc:
                    problems.append(f"the log does not extend the witnessed checkpoint: {exc}")
            else:
                ev.append(Evidence("witness", f"a witness is configured ({d.witness}) but no cosigned checkpoint is "
                                              "kept yet", str(note), {}))
        return _verdict(self, problems, "the audit log's hash chain and every signed checkpoint verify with the "
                                        "device's key", ev, cmd)


class LogRetention:
    name = "log_retention"
    title = "Automatically generated logs are kept (at least six months)"
    looks_at = ("the audit log's first entry (seq 0, with its proof) and age: the log is append-only and never "
                "purged, and it verifies from its genesis, so no entry was ever removed")

    def run(self, ctx: CheckContext) -> CheckResult:
        src = ctx.audit()
        cmd = shlex.join(["edgeshield", "audit", "export", str(src.path), "--out", "audit.jsonl"])
        try:
            report = ctx.verified()
        except EdgeShieldError as exc:
            return _result(self, "fail", f"the audit log does not verify, so its history cannot be shown kept: {exc}",
                           [Evidence("audit_verify", "verification failed", str(src.path), {"error": str(exc)})], cmd)
        first = next(iter(src.log.entries(0, 1)), None)
        if first is None:
            return _result(self, "fail", "the audit log is empty", [], cmd)
        age_days = (ctx.now - _entry_time(first.ts)) / 86400.0
        ev = [src.evidence(first, f"the log's first entry, {age_days:.1f} days old: every entry since is kept "
                                  f"({report.entries} entries, verified from the genesis hash)")]
        d = ctx.deployment
        detail = (f"the log began {age_days:.0f} days ago, less than six months: it holds everything since"
                  if age_days < _HALF_YEAR_DAYS else f"the log holds {age_days:.0f} days of entries")
        if d.retention_days is not None and d.retention_days < _HALF_YEAR_DAYS:
            detail += (f"; retention-days ({d.retention_days:g}) applies to personal-data stores only, never to "
                       "the audit log")
        return _result(self, "pass", f"audit entries are never deleted (append-only, tamper-evident); {detail}", ev,
                       cmd)


class RetentionPolicy:
    name = "retention_policy"
    title = "A retention period for personal data is set and enforced"
    looks_at = ("retention-days in the deployment, the newest retention.purged audit entry (must be within the "
                "period), and the oldest record left in each personal-data store (must be within the period)")

    def run(self, ctx: CheckContext) -> CheckResult:
        d = ctx.deployment
        cmd = _show(ctx) + " # and: edgeshield comply purge --config " + shlex.quote(str(d.config or "serve.toml"))
        if d.retention_days is None:
            return _result(self, "fail", "no retention period is configured (retention-days)",
                           [Evidence("config", "retention-days: not set", str(d.config) if d.config else None, {})],
                           cmd)
        period = d.retention_days * 86400.0
        cutoff = ctx.now - period
        ev = [Evidence("config", f"retention period: {d.retention_days:g} days", str(d.config) if d.config else None,
                       {"retention_days": d.retention_days})]
        problems = []
        store_path = d.served_watermark_evidence
        if store_path is not None and store_path.is_file():
            from edgeshield.watermark import EvidenceStore

            with EvidenceStore(store_path, create=False) as store:
                oldest, rows = store.oldest(), store.count()
            when = datetime.fromtimestamp(oldest, UTC).isoformat(timespec="seconds") if oldest else None
            ev.append(Evidence("store", f"served-watermark evidence: {rows} records, oldest {when or 'none'}",
                               str(store_path), {"records": rows, "oldest": when}))
            if oldest is not None and oldest < cutoff:
                problems.append(f"the evidence store keeps records older than {d.retention_days:g} days (oldest "
                                f"{when})")
        src = ctx.audit()
        purged = src.newest("retention.purged")
        if purged is None:
            problems.append("retention was never applied (no retention.purged entry): run `edgeshield comply purge` "
                            "on a schedule")
        else:
            ev.append(src.evidence(purged, "the newest retention purge"))
            if _entry_time(purged.ts) < cutoff:
                problems.append(f"the last purge ran {(ctx.now - _entry_time(purged.ts)) / 86400:.0f} days ago, "
                                f"longer than the retention period")
        return _verdict(self, problems, f"personal data is kept at most {d.retention_days:g} days: purged on schedule "
                                        "and no older record remains", ev, cmd)


class ErasureSupported:
    name = "erasure_supported"
    title = "A data subject's records can be erased on request"
    looks_at = ("the subject header in the deployment, the subject key store (exists, mode 0600), and "
                "subject.erased audit entries")

    def run(self, ctx: CheckContext) -> CheckResult:
        from edgeshield.compliance._subjects import SubjectKeys

        d = ctx.deployment
        cfg = str(d.config or "serve.toml")
        cmd = f"edgeshield comply erase --config {shlex.quote(cfg)} --subject ID  # and: {_show(ctx)}"
        ev: list[Evidence] = []
        problems = []
        if d.subject_header is None:
            problems.append("no subject-header is configured: requests cannot be tied to a data subject")
        else:
            ev.append(Evidence("config", f"data subjects are named by the {d.subject_header!r} header", cfg,
                               {"subject_header": d.subject_header}))
        if d.subject_keys is None:
            problems.append("no subject-keys store is configured")
        else:
            e, mode = _file_evidence(d.subject_keys, "subject key store")
            ev.append(e)
            if mode is None:
                problems.append(f"the subject key store {d.subject_keys} does not exist")
            else:
                if mode & 0o077:
                    problems.append(f"the subject key store is mode {mode:04o}, not 0600")
                with SubjectKeys(d.subject_keys, create=False) as keys:
                    ev.append(Evidence("store", f"subject keys held: {len(keys)}", str(d.subject_keys),
                                       {"keys": len(keys)}))
        src = ctx.audit()
        erased = src.count("subject.erased")
        ev.append(Evidence("audit_count", f"erasures recorded (subject.erased): {erased}", str(src.path),
                           {"subject.erased": erased}))
        newest = src.newest("subject.erased")
        if newest is not None:
            ev.append(src.evidence(newest, "the newest erasure (its reference is random: it names nobody)"))
        return _verdict(self, problems, f"subjects are pseudonymised under their own keys and can be erased "
                                        f"(crypto-shredding); {erased} erasures recorded", ev, cmd)


class DpOnSharedUpdates:
    name = "dp_on_shared_updates"
    title = "Model updates shared in federated learning carry differential privacy"
    looks_at = "federated-learning events (fl.*, privacy.*) in the audit log; not applicable without FL"

    def run(self, ctx: CheckContext) -> CheckResult:
        src = ctx.audit()
        fl = src.count("fl.update_rejected", "privacy.budget_exhausted")
        ev = [Evidence("audit_count", f"federated-learning events in the audit log: {fl}", str(src.path),
                       {"fl_events": fl})]
        if not fl:
            return _result(self, "not_applicable", "this deployment does not take part in federated learning: no "
                                                   "update leaves the device", ev, _show(ctx))
        return _result(self, "not_assessed", "federated-learning events were seen, but this build has no privacy "
                                             "ledger to check the updates' DP guarantee against", ev, _show(ctx))


def _allowed_addresses(interfaces: tuple[str, ...]) -> tuple[set[str], list[str]]:
    import psutil

    addrs, unknown = set(), []
    by_name = psutil.net_if_addrs()
    for item in interfaces:
        try:
            addrs.add(str(ipaddress.ip_address(item.split("%")[0])))
        except ValueError:
            if item not in by_name:
                unknown.append(item)
            for a in by_name.get(item, []):
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    addrs.add(str(ipaddress.ip_address(a.address.split("%")[0])))
    return addrs, unknown


def _exposed(address: str, allowed: set[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    if ip.is_loopback or (mapped is not None and mapped.is_loopback):
        return False
    return str(ip) not in allowed and (mapped is None or str(mapped) not in allowed)


class NetworkExposure:
    name = "network_exposure"
    title = "The device listens only on loopback or its management interfaces"
    looks_at = ("listening sockets (psutil.net_connections): the server's port (exposure = 'server') or every "
                "one (exposure = 'host'); a wildcard or other address fails, the socket listed; and, as evidence "
                "of network-layer segmentation, whether the listen address sits on a WireGuard interface or is "
                "covered by IPsec policies (ip addr/link/xfrm; reported, never required)")

    def run(self, ctx: CheckContext) -> CheckResult:
        import psutil

        d = ctx.deployment
        allowed, unknown = _allowed_addresses(d.management_interfaces)
        ports = {d.port} - {0}
        if ctx.probe_url is not None:
            ports.add(_split_url(ctx.probe_url)[1])
        listening = []
        for c in psutil.net_connections(kind="inet"):
            if not c.laddr or c.raddr:
                continue
            if c.type == socket.SOCK_STREAM and c.status != psutil.CONN_LISTEN:
                continue
            if d.exposure == "server" and (c.type != socket.SOCK_STREAM or c.laddr.port not in ports):
                continue
            listening.append({"address": c.laddr.ip, "port": c.laddr.port, "pid": c.pid,
                              "protocol": "tcp" if c.type == socket.SOCK_STREAM else "udp"})
        listening.sort(key=lambda s: (s["port"], str(s["address"])))
        bad = [s for s in listening if _exposed(str(s["address"]), allowed)]
        cmd = "ss -lntup" if d.exposure == "host" else f"ss -lnt 'sport = :{min(ports) if ports else d.port}'"
        ev = [Evidence("config", f"configured listen address {d.host}:{d.port}; management interfaces: "
                                 f"{', '.join(d.management_interfaces) or 'none'}", str(d.config) if d.config else None,
                       {"host": d.host, "port": d.port, "management_interfaces": list(d.management_interfaces),
                        "allowed_addresses": sorted(allowed), "exposure": d.exposure}),
              Evidence("sockets", f"{len(listening)} listening socket(s) judged, {len(bad)} exposed beyond loopback "
                                  "and the management interfaces", "psutil.net_connections",
                       {"listening": listening, "exposed": bad})]
        from edgeshield.hardware._netprobe import probe_network_layer, summarize

        try:  # evidence of network-layer protection (WireGuard / IPsec are the OS's): reported, not judged
            layer = probe_network_layer(f"{d.host}:{d.port}")
        except EdgeShieldError as exc:
            layer_note = f"network layer not probed: {exc}"
            ev.append(Evidence("network_layer", layer_note, "ip addr / ip link / ip xfrm", {}))
        else:
            layer_note = f"network layer {summarize(layer)}"
            ev.append(Evidence("network_layer", f"{layer_note}: {layer.reason}", "ip addr / ip link / ip xfrm",
                               layer.detail()))
        problems = []
        if unknown:
            problems.append(f"management interface(s) not found on this host: {', '.join(unknown)}")
        if _exposed(d.host, allowed) and d.host not in ("localhost",):
            problems.append(f"the server is configured to listen on {d.host}, beyond loopback and the management "
                            "interfaces")
        if bad:
            shown = ", ".join(f"{s['protocol']} {s['address']}:{s['port']}" for s in bad[:10])
            problems.append(f"{len(bad)} socket(s) listen beyond loopback and the management interfaces: {shown}")
        if not problems and d.exposure == "server" and not listening:
            port_list = ", ".join(map(str, sorted(ports))) or "none configured"
            return _result(self, "not_assessed", f"nothing listens on the server's port ({port_list}) now: run the "
                                                 "report while the server runs (with --probe-url when it listens "
                                                 "on a chosen port)", ev, cmd)
        return _verdict(self, problems, "every listening socket judged is on loopback or a management interface; "
                        f"{layer_note}", ev, cmd)


class MonitoringEnabled:
    name = "monitoring_enabled"
    title = "Security monitoring is running with its rules loaded"
    looks_at = ("the newest server.startup audit entry's monitor_rules_sha256 (against the rule file when "
                "monitor-rules is set) and the monitor's store (monitor-db)")

    def run(self, ctx: CheckContext) -> CheckResult:
        src = ctx.audit()
        d = ctx.deployment
        ev: list[Evidence] = []
        problems = []
        startup = src.newest("server.startup")
        if not d.monitor:
            problems.append("the deployment turns the security monitor off (monitor = false)")
        if startup is None:
            problems.append("no server.startup entry in the audit log: the server never started with this log")
        else:
            ev.append(src.evidence(startup, "the newest server start-up"))
            digest = startup.data.get("monitor_rules_sha256")
            if not digest:
                problems.append(f"the server started (entry {startup.seq}) without the security monitor: its "
                                "server.startup entry has no monitor_rules_sha256")
            elif d.monitor_rules is not None:
                try:
                    now = sha256_file(d.monitor_rules)
                except OSError as exc:
                    now = None
                    problems.append(f"the monitor rule file {d.monitor_rules} cannot be read: {exc.strerror or exc}")
                if now is not None:
                    ev.append(Evidence("file", f"monitor rule file now: SHA-256 {now}", str(d.monitor_rules),
                                       {"sha256": now}))
                    if now != digest:
                        problems.append("the monitor rule file changed since the server loaded it")
        if d.monitor_db is not None:
            e, mode = _file_evidence(d.monitor_db, "monitor store")
            ev.append(e)
            if mode is None:
                problems.append(f"the monitor store {d.monitor_db} does not exist")
        alerts = src.count("monitor.alert")
        ev.append(Evidence("audit_count", f"monitor alerts recorded: {alerts}", str(src.path),
                           {"monitor.alert": alerts, "monitor.response": src.count("monitor.response")}))
        return _verdict(self, problems, "the server runs the security monitor with the rules it recorded at start-up",
                        ev, _show(ctx))


_ALL: tuple[Check, ...] = (RawInputsOnDevice(), EncryptionAtRest(), EncryptionInTransit(), AccessControl(),
                           AuditLogVerifying(), LogRetention(), RetentionPolicy(), ErasureSupported(),
                           DpOnSharedUpdates(), NetworkExposure(), MonitoringEnabled())
CHECKS: Mapping[str, Check] = MappingProxyType({c.name: c for c in _ALL})


def run_check(check: Check, ctx: CheckContext) -> CheckResult:
    """Run one check; a deployment it cannot evaluate (a missing file or key, a log that will not open) is a fail
    with the reason, never an exception out of the report."""
    try:
        return check.run(ctx)
    except (EdgeShieldError, OSError) as exc:
        why = str(exc) if isinstance(exc, EdgeShieldError) else f"{exc.strerror or exc}"
        what = "not configured" if isinstance(exc, DeploymentError) else "could not be evaluated"
        return CheckResult(check.name, "fail", f"{what}: {why}", (), ctx.config_command())
