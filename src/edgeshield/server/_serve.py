"""Run the inference server: one protected bundle, mutual TLS 1.3, RBAC, robust inference and an audit log."""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeshield._io import check_readable_file
from edgeshield.server._app import ServerState

log = logging.getLogger("edgeshield.server")
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    owner_key: Path
    device_key: Path
    ca: Path  # CA directory (ca.crt + crl.pem) or CA certificate (then crl is required)
    cert: Path
    key: Path
    audit_db: Path
    audit_key: Path
    crl: Path | None = None
    detector: Path | None = None
    policy: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8443
    passphrase: bytes | None = None  # for the device key, the server key and the audit key
    max_body_bytes: int = 4 * 1024 * 1024
    inference_timeout_s: float = 10.0
    crl_poll_s: float = 2.0
    log_level: str = "info"
    audit_durability: str = "full"  # "normal": no fsync per entry (survives kill -9, not a power cut)
    # model-extraction defence
    rate_limits: tuple[tuple[str, float, float], ...] = ()  # (role, tokens per second, burst); cost = batch size
    extraction_action: str | None = None  # PRADA monitor on, and what an alarm does: flag/throttle/degrade/block
    outputs: str | None = None  # JSON output-policy config, e.g. '{"policy": "top_k", "k": 3}'; None: labels only
    query_budget: int | None = None  # distinct inputs per client per window before the extraction action
    query_window_s: float = 86400.0
    served_watermark_key: Path | None = None  # DAWN ownership proof: key file, rate, evidence store
    served_watermark_rate: float = 0.01
    served_watermark_evidence: Path | None = None


def build_state(cfg: ServeConfig) -> ServerState:
    """Open the bundle, the detector, the policy and the audit log; audit the start-up with the bundle digests."""
    from edgeshield import bundles, keys
    from edgeshield.adversarial import DetectorFile, InputSpec, RobustModel
    from edgeshield.audit import AuditLog, load_signing_key
    from edgeshield.server._rbac import Rbac

    audit = AuditLog(cfg.audit_db, signing_key=load_signing_key(cfg.audit_key, cfg.passphrase),
                     durability=cfg.audit_durability)
    opened = bundles.open_bundle(cfg.bundle, keys.load_owner_public_key(cfg.owner_key),
                                 keys.load_device_private_key(cfg.device_key, cfg.passphrase))
    m = opened.manifest
    spec = InputSpec.from_metadata(m.metadata)
    robust = None
    if cfg.detector is not None:
        file = DetectorFile.load(cfg.detector)
        file.check_model(m.model_sha256)
        robust = RobustModel(opened.session, file)
        spec = file.input_spec
    rbac = Rbac(cfg.policy)
    limiter, monitor, outputs = _extraction_defence(cfg)
    served, evidence = _served_watermark(cfg, opened.session)
    audit.append("server.startup", "server", {
        "bundle_id": m.bundle_id, "model_sha256": m.model_sha256, "payload_sha256": m.payload_sha256,
        "model_version": m.model_version, "detector": str(cfg.detector) if cfg.detector else None,
        "listen": f"{cfg.host}:{cfg.port}",
        "served_watermark_rate": cfg.served_watermark_rate if served is not None else None})
    audit.append("model.load", "server", {"bundle_id": m.bundle_id, "model_sha256": m.model_sha256})
    audit.append("config.rbac", "server", {"policy_sha256": _sha256(rbac.policy_path),
                                           "model_sha256": _sha256(rbac.model_path)})
    return ServerState(session=opened.session, manifest=m, rbac=rbac, audit=audit, spec=spec, robust=robust,
                       max_body_bytes=cfg.max_body_bytes, inference_timeout_s=cfg.inference_timeout_s,
                       rate_limiter=limiter, monitor=monitor, outputs=outputs, served_watermark=served,
                       served_evidence=evidence, on_shutdown=[evidence.close] if evidence is not None else [])


def _extraction_defence(cfg: ServeConfig) -> tuple[Any, Any, Any]:
    """Rate limiter, PRADA query monitor and output policy from the configuration (each optional)."""
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.extraction import (
        PradaDetector,
        QueryBudget,
        QueryMonitor,
        RateLimiter,
        ResponsePolicy,
        from_config,
    )

    limits = {role: (rate, burst) for role, rate, burst in cfg.rate_limits}
    if cfg.extraction_action == "throttle" and "throttled" not in limits:
        limits["throttled"] = (1.0, 10.0)  # what a throttled client gets unless configured
    limiter = RateLimiter(limits) if limits else None
    monitor = None
    if cfg.query_budget is not None and cfg.extraction_action is None:
        raise InvalidArgumentError("a query budget needs an extraction action (--extraction-monitor ACTION)")
    if cfg.extraction_action is not None:
        detectors: list[Any] = [PradaDetector()]
        if cfg.query_budget is not None:
            detectors.append(QueryBudget(cfg.query_budget, window_s=cfg.query_window_s))
        monitor = QueryMonitor(detectors, response=ResponsePolicy(default=cfg.extraction_action))
    outputs = None
    if cfg.outputs is not None:
        try:
            outputs = from_config(json.loads(cfg.outputs))
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"output policy is not JSON: {exc}") from None
    return limiter, monitor, outputs


def _served_watermark(cfg: ServeConfig, session: Any) -> tuple[Any, Any]:
    """The DAWN served watermark and its evidence store, when configured (both or neither)."""
    from edgeshield.errors import InvalidArgumentError

    if cfg.served_watermark_key is None:
        if cfg.served_watermark_evidence is not None:
            raise InvalidArgumentError("--served-watermark-evidence needs --served-watermark-key")
        return None, None
    if cfg.served_watermark_evidence is None:
        raise InvalidArgumentError("a served watermark needs an evidence file (--served-watermark-evidence), "
                                   "or a stolen copy could never be proven")
    from edgeshield.watermark import EvidenceStore, ServedWatermark, load_key

    shape = session.get_outputs()[0].shape
    classes = shape[-1] if shape and isinstance(shape[-1], int) else None
    if classes is None or classes < 2:
        raise InvalidArgumentError("a served watermark needs a classifier with a fixed number of classes")
    return (ServedWatermark(load_key(cfg.served_watermark_key), cfg.served_watermark_rate, classes=classes),
            EvidenceStore(cfg.served_watermark_evidence))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


class HandshakeFailures:
    """Counts failed TLS handshakes and writes them to the audit log at most once per ``interval`` seconds.

    A failed handshake happens on the event loop, before any request; writing an fsync'd audit entry there for each
    one would let unauthenticated peers stall every connection and grow the log without bound. So the loop only
    counts (by reason), and a background thread records one ``auth.failure`` entry per interval with the counts.
    """

    def __init__(self, state: ServerState, interval: float = 1.0) -> None:
        self.state, self.interval = state, interval
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeshield-handshake-audit", daemon=True)

    def record(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + 1

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        if counts and self.state.audit is not None:
            self.state.audit.append("auth.failure", "anonymous",
                                    {"stage": "tls-handshake", "count": sum(counts.values()), "reasons": counts})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.flush()


def tls_context(cfg: ServeConfig, failures: HandshakeFailures) -> ssl.SSLContext:
    """The server's TLS 1.3 mutual-auth context, whose failed handshakes are counted for the audit log."""
    from edgeshield.transport import server_context

    ctx = server_context(cfg.ca, cfg.cert, cfg.key, crl=cfg.crl, passphrase=cfg.passphrase)

    class AuditingSSLObject(ssl.SSLObject):
        # asyncio drives handshakes through SSLObject.do_handshake; a failure here never reaches the app.
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                failures.record((exc.reason or type(exc).__name__)[:100])
                raise

    ctx.sslobject_class = AuditingSSLObject
    return ctx


class CrlWatcher(threading.Thread):
    """Reloads the CRL into the live context when the file changes (no restart) and audits each reload."""

    def __init__(self, ctx: ssl.SSLContext, crl_path: Path, state: ServerState, poll_s: float) -> None:
        super().__init__(name="edgeshield-crl", daemon=True)
        self.ctx, self.path, self.state, self.poll_s = ctx, crl_path, state, poll_s
        self.stop = threading.Event()
        self._mtime = crl_path.stat().st_mtime_ns

    def check(self) -> bool:
        from edgeshield.errors import EdgeShieldError
        from edgeshield.transport import reload_crl

        mtime = self.path.stat().st_mtime_ns
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            info = reload_crl(self.ctx, self.path)
        except EdgeShieldError as exc:
            if self.state.audit is not None:
                self.state.audit.append("crl.reload_failed", "server", {"reason": str(exc)[:200]})
            return False
        if self.state.audit is not None:
            self.state.audit.append("crl.reload", "server", {"crl_number": info.number, "revoked": len(info.revoked)})
        return True

    def run(self) -> None:
        while not self.stop.wait(self.poll_s):
            try:
                self.check()
            except OSError:
                continue


def crl_path_for(cfg: ServeConfig) -> Path:
    return cfg.crl if cfg.crl is not None else Path(cfg.ca) / "crl.pem"


class JsonFormatter(logging.Formatter):
    """One JSON object per log line; messages never contain secrets or raw inputs (only what the code logs)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                           "logger": record.name, "msg": record.getMessage()})


def log_config(level: str = "info") -> dict[str, Any]:
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "edgeshield")},
    }


def _server_class() -> type:
    import contextlib
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, killing the process before our own
        clean-up (the audit log's shutdown entry) runs; this variant just returns, so ``serve`` exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer


def make_server(cfg: ServeConfig, state: ServerState | None = None) -> tuple[Any, CrlWatcher]:
    """A configured ``uvicorn.Server`` (not started) and its CRL watcher."""
    import uvicorn

    from edgeshield.server._app import create_app
    from edgeshield.server._tls_scope import TlsHttpToolsProtocol

    check_readable_file(cfg.cert, what="server certificate")
    check_readable_file(cfg.key, what="server key")
    state = state or build_state(cfg)
    failures = HandshakeFailures(state)
    state.on_shutdown.append(failures.stop)
    failures.start()
    ctx = tls_context(cfg, failures)
    config = uvicorn.Config(
        create_app(state), host=cfg.host, port=cfg.port, http=TlsHttpToolsProtocol,
        ssl_context_factory=lambda _config, _default: ctx,
        timeout_keep_alive=5, timeout_graceful_shutdown=10, limit_concurrency=256, log_config=log_config(cfg.log_level),
        server_header=False, date_header=False,
    )
    return _server_class()(config), CrlWatcher(ctx, crl_path_for(cfg), state, cfg.crl_poll_s)


def serve(cfg: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn finishes in-flight requests (graceful shutdown, 10 s at most)."""
    server, watcher = make_server(cfg)
    watcher.start()
    try:
        server.run()
    finally:
        watcher.stop.set()
