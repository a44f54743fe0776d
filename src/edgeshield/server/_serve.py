"""Run the inference server: one protected bundle, mutual TLS 1.3, RBAC, robust inference and an audit log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.config
import math
import os
import re
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from edgeshield._io import check_readable_file, sha256_file
from edgeshield.server._app import ServerState
from edgeshield.server._crl import CrlGuard, CrlWatcher
from edgeshield.server._limits import Limits
from edgeshield.server._listener import ConnectionEvents, ConnectionGate, Listener, listening_socket

if TYPE_CHECKING:
    import uvicorn
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgeshield.audit import AuditLog
    from edgeshield.bundles import Manifest
    from edgeshield.bundles._ort import onnxruntime
    from edgeshield.extraction import Detector, MonitorStore, OutputPolicy, QueryMonitor, RateLimiter
    from edgeshield.server._publisher import WitnessPublisher
    from edgeshield.watermark import EvidenceStore, ServedWatermark

log = logging.getLogger("edgeshield.server")
PathLike = str | os.PathLike[str]
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")  # an RFC 9110 token
FLEET_GROUPS = ("role",)  # what --fleet-group may name (the certificate's issuing batch is not in Identity yet)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    bundle: Path | None = None  # None: the current slot of ``update_dir``
    owner_key: Path
    device_key: Path | None = None  # None: the bundle is opened with ``released_key`` instead
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
    max_batch: int = 1024
    inference_timeout_s: float = 10.0
    crl_poll_s: float = 2.0
    log_level: str = "info"
    audit_durability: str = "full"  # "normal": no fsync per entry (survives kill -9, not a power cut)
    audit_commit_delay_s: float = 0.0  # a group-commit leader waits this long for more entries (when concurrent)
    # model-extraction defence
    rate_limits: tuple[tuple[str, float, float], ...] = ()  # (role, tokens per second, burst); cost = batch size
    extraction_action: str | None = None  # PRADA monitor on, and what an alarm does: flag/throttle/degrade/block
    outputs: str | None = None  # JSON output-policy config, e.g. '{"policy": "top_k", "k": 3}'; None: labels only
    query_budget: int | None = None  # distinct inputs per client per window before the extraction action
    query_window_s: float = 86400.0
    served_watermark_key: Path | None = None  # DAWN ownership proof: key file, rate, evidence store
    served_watermark_rate: float = 0.01
    served_watermark_evidence: Path | None = None
    # long-horizon, fleet and persisted extraction state (issue 14)
    extraction_state: Path | None = None  # MonitorStore: budgets, blocks, PRADA sets, key registry across restarts
    decaying_budget: tuple[int, float] | None = None  # (burst, per_day): distinct inputs per identity over its life
    fleet_budget: int | None = None  # distinct inputs per group per UTC day
    fleet_group: str = "role"  # what a group is: the identity's role
    max_monitored_clients: int = 10_000  # clients the monitor holds in memory (the rest in --extraction-state)
    ood_reference: Path | None = None  # .npz with array "x": clean inputs the OOD-rate signal is fitted on
    prada_dup_distance: float | None = None  # L2: PRADA ignores a query this close to one the client sent before
    ood_transforms: str | None = None  # JSON BenignTransforms config, e.g. '{"shifts": 1, "noise": 0.05}'
    # what one client may hold (connections, handshakes, time, concurrency): see edgeshield.server._limits
    limits: Limits = field(default_factory=Limits)
    crl_expired: str = "fail-closed"  # or "keep-last": keep revoking with the last CRL's serials, loudly
    crl_warn_days: float = 2.0  # warn (log, metric, audit) this long before the CRL's nextUpdate
    # publish audit checkpoints to a witness off the device (C2SP tlog-witness over TLS 1.3); all optional
    witness_url: str | None = None
    witness_ca: Path | None = None  # CA the witness's TLS certificate chains to
    witness_cert: Path | None = None  # client certificate to present to the witness, with its key
    witness_cert_key: Path | None = None
    witness_vkeys: tuple[str, ...] = ()  # the witness's cosignature verifier keys (vkey text or a file holding one)
    witness_every_s: float = 60.0
    witness_note: Path | None = None  # where the newest cosigned checkpoint is kept (default: beside the log)
    # security monitoring (edgeshield.monitor): on by default with the packaged rule pack
    monitor: bool = True
    monitor_rules: Path | None = None  # a rule file (default: the packaged default pack)
    monitor_db: Path | None = None  # blocks, denials, quarantines, alerts (default: AUDIT_DB.monitor)
    webhook_url: str | None = None  # alerts POSTed here as JSON (https, or http to loopback)
    webhook_token_env: str | None = None  # environment variable holding the webhook's bearer token
    webhook_ca: Path | None = None
    events_socket: Path | None = None  # the local event endpoint for other processes (Unix socket); off by default
    watch_interval_s: float = 2.0  # file digests (bundle, detector, policy, rules, config)
    resource_interval_s: float = 5.0
    config_file: Path | None = None  # the serve.toml this came from: watched like the policy
    # data subjects and retention (edgeshield.compliance)
    subject_header: str | None = None  # request header naming the data subject a request is about
    subject_keys: Path | None = None  # per-subject pseudonym keys (default: AUDIT_DB.subjects when a header is set)
    retention_days: float | None = None  # purge personal-data records older than this (served-watermark evidence)
    # where the model comes from: an update directory (``edgeshield update init``) serves its current slot's bundle,
    # detector and input spec, and a reload follows the slot; a released key (``attest fetch-key --out``) opens the
    # bundle in the TPM instead of a device key, under its licence
    update_dir: Path | None = None
    released_key: Path | None = None
    tpm_keys: Path | None = None  # the device's TPM key file (``attest keys``), with ``released_key``
    tcti: str | None = None  # the TPM to use with ``released_key`` (default: the platform's)
    http3_port: int | None = None  # also serve HTTP/3 (mutual TLS 1.3 over QUIC) on this UDP port (the h3 extra)
    # Oblivious HTTP (RFC 9458; the ohttp extra): the gateway at /.well-known/ohttp-gateway and message/ohttp-req
    # on /v1/predict; its X25519 key (created 0600 if missing; default AUDIT_DB.ohttp-key) and replay window
    ohttp: bool = False
    ohttp_key: Path | None = None
    ohttp_window_s: float = 30.0

    def __post_init__(self) -> None:
        from edgeshield.errors import InvalidArgumentError
        from edgeshield.server._crl import CRL_POLICIES

        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise InvalidArgumentError(f"log level must be debug, info, warning or error, not {self.log_level!r}")
        if self.crl_expired not in CRL_POLICIES:
            raise InvalidArgumentError(f"--crl-expired must be one of {', '.join(CRL_POLICIES)}, not "
                                       f"{self.crl_expired!r}")
        for name in ("max_body_bytes", "max_batch", "inference_timeout_s", "crl_poll_s", "watch_interval_s",
                     "resource_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise InvalidArgumentError(f"{name} must be a positive number, got {value!r}")
        if self.fleet_group not in FLEET_GROUPS:
            raise InvalidArgumentError(f"--fleet-group must be one of {', '.join(FLEET_GROUPS)}, not "
                                       f"{self.fleet_group!r}")
        if isinstance(self.max_monitored_clients, bool) or not isinstance(self.max_monitored_clients, int) \
                or self.max_monitored_clients < 1:
            raise InvalidArgumentError(f"max_monitored_clients must be a positive integer, got "
                                       f"{self.max_monitored_clients!r}")
        if self.decaying_budget is not None:
            burst, per_day = self.decaying_budget
            if not (isinstance(burst, int) and burst >= 1 and per_day > 0):
                raise InvalidArgumentError(f"--decaying-budget needs BURST >= 1 and PER_DAY > 0, got "
                                           f"{self.decaying_budget!r}")
        if self.prada_dup_distance is not None and not (
                isinstance(self.prada_dup_distance, int | float) and math.isfinite(self.prada_dup_distance)
                and self.prada_dup_distance > 0):
            raise InvalidArgumentError(f"--prada-dup-distance must be a positive number, got "
                                       f"{self.prada_dup_distance!r}")
        if self.fleet_budget is not None and self.fleet_budget < 1:
            raise InvalidArgumentError(f"--fleet-budget must be at least 1, got {self.fleet_budget!r}")
        if self.ood_transforms is not None and self.ood_reference is None:
            raise InvalidArgumentError("--ood-transforms needs --ood-reference (the data the OOD signal is fitted on)")
        if self.retention_days is not None and not self.retention_days > 0:
            raise InvalidArgumentError(f"retention_days must be a positive number, got {self.retention_days!r}")
        if self.subject_header is not None and not _HEADER.fullmatch(self.subject_header):
            raise InvalidArgumentError(f"--subject-header must be an HTTP header name, not {self.subject_header!r}")
        if (self.bundle is None) == (self.update_dir is None):
            raise InvalidArgumentError("serve needs either a BUNDLE or --update-dir (whose current slot it serves)")
        if self.update_dir is not None and self.detector is not None:
            raise InvalidArgumentError("--detector comes from the update directory's slot with --update-dir")
        if (self.device_key is None) == (self.released_key is None):
            raise InvalidArgumentError("serve needs either --device-key or --released-key (with --tpm-keys)")
        if self.released_key is not None and self.tpm_keys is None:
            raise InvalidArgumentError("--released-key needs --tpm-keys (the key file `attest keys` wrote)")
        if self.tpm_keys is not None and self.released_key is None:
            raise InvalidArgumentError("--tpm-keys is for --released-key")
        if self.ohttp_key is not None and not self.ohttp:
            raise InvalidArgumentError("--ohttp-key is for --ohttp")
        if isinstance(self.ohttp_window_s, bool) or not isinstance(self.ohttp_window_s, int | float) \
                or not self.ohttp_window_s > 0:
            raise InvalidArgumentError(f"--ohttp-window must be a positive number of seconds, got "
                                       f"{self.ohttp_window_s!r}")
        if self.update_dir is not None and self.released_key is not None:
            raise InvalidArgumentError("--update-dir needs --device-key: the updater checks each update is addressed "
                                       "to this device's key (a released key is not supported with it)")



def build_state(cfg: ServeConfig, *, clock: Callable[[], float] = time.time) -> ServerState:
    """Open the model (bundle, detector, spec), the policy and the audit log; audit the start-up with the bundle
    digests. The model is held by a ``Reloader`` (``state.reload``) that SIGHUP and the admin API call. ``clock``:
    the extraction defence's day-scale clock."""
    from edgeshield.audit import AuditLog, load_signing_key
    from edgeshield.server._model import ModelLoader
    from edgeshield.server._rbac import Rbac
    from edgeshield.server._reload import Reloader

    store = open_extraction_state(cfg)  # a file that is not one stops the start-up here, before anything opens
    signing_key = load_signing_key(cfg.audit_key, cfg.passphrase)
    audit = AuditLog(cfg.audit_db, signing_key=signing_key, durability=cfg.audit_durability,
                     commit_delay_s=cfg.audit_commit_delay_s)
    publisher = _witness_publisher(cfg, audit, signing_key.public_key())  # checked before anything starts
    # The whole log must verify before the device serves again (a tampered log stops it: exit 3), and entries a
    # crash left without a checkpoint are covered now, with a server.recovered entry saying which.
    recovery = audit.recover()
    if recovery.recovered:
        log.warning("audit log: %d entries a crash left without a checkpoint are now covered (server.recovered)",
                    recovery.uncovered)
    loader = ModelLoader(cfg)
    model = loader.load()  # an expired licence stops the server here (LicenceExpiredError)
    m = cast("Manifest", model.manifest)  # the loader's is always a bundle's Manifest
    rbac = Rbac(cfg.policy)
    limiter, monitor, outputs = _extraction_defence(cfg, store=store, clock=clock)
    served, evidence = _served_watermark(cfg, model.session)
    rules = None
    if cfg.monitor:
        from edgeshield.monitor import load_rules

        rules = load_rules(cfg.monitor_rules)  # a bad rule file stops the server before it serves
    detector = model.files.get("detector")
    audit.append("server.startup", "server", {
        "bundle_id": m.bundle_id, "model_sha256": m.model_sha256, "payload_sha256": m.payload_sha256,
        "model_version": m.model_version, "detector": str(detector) if detector else None,
        "listen": f"{cfg.host}:{cfg.port}",
        "served_watermark_rate": cfg.served_watermark_rate if served is not None else None,
        "monitor_rules_sha256": rules.sha256 if rules is not None else None,
        "monitor_rules": len(rules) if rules is not None else 0,
        "subject_header": cfg.subject_header, "retention_days": cfg.retention_days,
        **({"update_dir": str(cfg.update_dir), "slot": model.slot} if cfg.update_dir is not None else {}),
        **({"licence": model.licence.describe()} if model.licence is not None else {})})
    audit.append("model.load", "server", {"bundle_id": m.bundle_id, "model_sha256": m.model_sha256})
    audit.append("config.rbac", "server", {"policy_sha256": sha256_file(rbac.policy_path),
                                           "model_sha256": sha256_file(rbac.model_path)})
    state = ServerState(session=model.session, manifest=m, rbac=rbac, audit=audit,
                        max_body_bytes=cfg.max_body_bytes, max_batch=cfg.max_batch,
                        inference_timeout_s=cfg.inference_timeout_s, limits=cfg.limits, rate_limiter=limiter,
                        monitor=monitor, outputs=outputs, served_evidence=evidence,
                        on_shutdown=[evidence.close] if evidence is not None else [],
                        subject_header=cfg.subject_header, extraction_store=store, clock=clock)
    if store is not None:  # closed after the lifespan's last flush
        state.on_shutdown.append(store.close)
    state.model = model  # the loader's, whole: the files and digests it was opened from, its licence
    state.reload = Reloader(state, loader).reload
    if cfg.subject_header is not None:
        from edgeshield.compliance import SubjectKeys

        state.subjects = SubjectKeys(cfg.subject_keys or cfg.audit_db.with_name(cfg.audit_db.name + ".subjects"))
    if model.licence is not None:
        from edgeshield.server._licence import LicenceWatcher

        licence_watcher = LicenceWatcher(state, cfg.watch_interval_s)
        licence_watcher.start()
        state.on_shutdown.insert(0, licence_watcher.stop)
    if rules is not None:
        from edgeshield.server._operations import start_operations

        start_operations(cfg, state, rules, rbac)
    if publisher is not None:
        publisher.emit = state.events.publish
        publisher.start()
        state.after_shutdown.append(publisher.finish)
    return state


def _witness_publisher(cfg: ServeConfig, audit_log: AuditLog,
                       public_key: Ed25519PublicKey) -> WitnessPublisher | None:
    """The background publisher of audit checkpoints to ``cfg.witness_url``, or None without one."""
    from edgeshield import audit
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.server._publisher import WitnessPublisher

    if cfg.witness_url is None:
        if cfg.witness_ca or cfg.witness_cert or cfg.witness_vkeys:
            raise InvalidArgumentError("--witness-ca, --witness-cert and --witness-vkey need --witness URL")
        return None
    if cfg.witness_ca is None:
        raise InvalidArgumentError("--witness needs --witness-ca: the CA the witness's TLS certificate chains to")
    vkeys = [audit.parse_vkey(Path(v).read_text(encoding="utf-8") if Path(v).is_file() else v)
             for v in cfg.witness_vkeys]
    ctx = audit.witness_client_context(cfg.witness_ca, cfg.witness_cert, cfg.witness_cert_key,
                                       passphrase=cfg.passphrase)
    note = cfg.witness_note or cfg.audit_db.with_name(cfg.audit_db.name + ".cosigned")
    return WitnessPublisher(audit_log, audit.WitnessClient(cfg.witness_url, ctx), public_key, witness_keys=vkeys,
                            every_s=cfg.witness_every_s, note_path=note)


def open_extraction_state(cfg: ServeConfig) -> MonitorStore | None:
    """The extraction state file (``--extraction-state``), or None; a file that is not one raises
    NotAnExtractionStateError (one line, at start-up)."""
    from edgeshield.errors import InvalidArgumentError

    if cfg.extraction_state is None:
        return None
    if cfg.extraction_action is None and cfg.served_watermark_key is None:
        raise InvalidArgumentError("--extraction-state keeps the extraction monitor's and the served watermark's "
                                   "state: it needs --extraction-monitor or --served-watermark-key")
    from edgeshield.extraction import MonitorStore

    return MonitorStore(cfg.extraction_state)


def _extraction_defence(cfg: ServeConfig, *, store: MonitorStore | None = None,
                        clock: Callable[[], float] = time.time,
                        ) -> tuple[RateLimiter | None, QueryMonitor | None, OutputPolicy | None]:
    """Rate limiter, query monitor (PRADA, budgets, fleet view, OOD rate; its state in ``store``) and output policy
    from the configuration (each optional)."""
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.extraction import (
        DecayingBudget,
        FleetBudget,
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
    needs_action = {"--query-budget": cfg.query_budget, "--decaying-budget": cfg.decaying_budget,
                    "--fleet-budget": cfg.fleet_budget, "--ood-reference": cfg.ood_reference}
    for flag, value in needs_action.items():
        if value is not None and cfg.extraction_action is None:
            raise InvalidArgumentError(f"{flag} needs an extraction action (--extraction-monitor ACTION)")
    if cfg.extraction_action is not None:
        detectors: list[Detector] = [PradaDetector(dup_distance=cfg.prada_dup_distance)]
        if cfg.query_budget is not None:
            detectors.append(QueryBudget(cfg.query_budget, window_s=cfg.query_window_s, clock=clock))
        if cfg.decaying_budget is not None:
            detectors.append(DecayingBudget(cfg.decaying_budget[0], cfg.decaying_budget[1], clock=clock))
        on_alarm = {}
        if cfg.fleet_budget is not None:
            detectors.append(FleetBudget(cfg.fleet_budget, clock=clock))
            on_alarm["fleet_budget"] = "flag"  # an alert about a whole group: its honest members share the verdict
        if cfg.ood_reference is not None:
            detectors.append(_ood_signal(cfg))
        monitor = QueryMonitor(detectors, response=ResponsePolicy(on_alarm=on_alarm, default=cfg.extraction_action),
                               store=store, max_clients=cfg.max_monitored_clients, clock=clock)
    outputs = None
    if cfg.outputs is not None:
        try:
            outputs = from_config(json.loads(cfg.outputs))
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"output policy is not JSON: {exc}") from None
    return limiter, monitor, outputs


def _ood_signal(cfg: ServeConfig) -> Detector:
    """The OOD-rate signal fitted at start-up on ``--ood-reference`` (plus ``--ood-transforms``, its declared benign
    sensor variations)."""
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.extraction import BenignTransforms, OodRateSignal

    # By default the honest sensors' variations are in distribution: calibrated on clean data alone, a camera one
    # pixel off is blocked on its first batch.
    transforms: BenignTransforms | None = BenignTransforms()
    if cfg.ood_transforms is not None and cfg.ood_transforms.strip().lower() == "none":
        transforms = None
    elif cfg.ood_transforms is not None:
        try:
            transforms = BenignTransforms.from_config(json.loads(cfg.ood_transforms))
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"--ood-transforms is not JSON: {exc}") from None
    if cfg.ood_reference is None:  # the caller checked
        raise InvalidArgumentError("the OOD-rate signal needs --ood-reference")
    return OodRateSignal.from_reference_file(cfg.ood_reference, transforms=transforms)


def _served_watermark(cfg: ServeConfig, session: onnxruntime.InferenceSession,
                      ) -> tuple[ServedWatermark, EvidenceStore] | tuple[None, None]:
    """The DAWN served watermark and its evidence store, when configured (both or neither)."""
    from edgeshield.errors import InvalidArgumentError

    if cfg.served_watermark_key is None:
        if cfg.served_watermark_evidence is not None:
            raise InvalidArgumentError("--served-watermark-evidence needs --served-watermark-key")
        return None, None
    if cfg.served_watermark_evidence is None:
        raise InvalidArgumentError("a served watermark needs an evidence file (--served-watermark-evidence), "
                                   "or a stolen copy could never be proven")
    from edgeshield.server._model import served_watermark_for
    from edgeshield.watermark import EvidenceStore

    served = served_watermark_for(cfg, session)
    if served is None:  # cannot happen: the key is configured
        return None, None
    return served, EvidenceStore(cfg.served_watermark_evidence)


def tls_context(cfg: ServeConfig) -> ssl.SSLContext:
    """The server's TLS 1.3 mutual-auth context (the listener reports its failed handshakes as events)."""
    from edgeshield.transport import server_context

    ctx = server_context(cfg.ca, cfg.cert, cfg.key, crl=cfg.crl, passphrase=cfg.passphrase,
                         allow_expired_crl=cfg.crl_expired == "keep-last")
    return ctx


def crl_path_for(cfg: ServeConfig) -> Path:
    return cfg.crl if cfg.crl is not None else Path(cfg.ca) / "crl.pem"


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, a traceback included as one field; messages never contain secrets or raw
    inputs (only what the code logs)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                                "logger": record.name, "msg": record.getMessage()}
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            line["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(line)


def log_config(level: str = "info") -> dict[str, Any]:
    """Every logger, ours, uvicorn's and any library's, writes one JSON object per line to stderr.

    The root logger takes whatever a library logs (at WARNING and above), Python warnings are routed into logging,
    and pycasbin's per-request "Request: ... ---> False" lines are silenced: every denial is in the audit log.
    """
    ours = {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "edgeshield")}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {**ours, "casbin": {"level": "ERROR"}, "py.warnings": {"level": "ERROR"}},
    }


class GuardedServer(Protocol):
    """What ``make_server`` returns: a ``uvicorn.Server`` behind EdgeShield's connection gate (the class itself is
    made by ``_server_class``, so that uvicorn is imported only to serve)."""

    gate: ConnectionGate
    on_hangup: Callable[[], None] | None
    h3: Any  # the HTTP/3 listener, or None
    started: bool
    should_exit: bool
    servers: list[asyncio.Server]

    def run(self, sockets: list[socket.socket] | None = None) -> None: ...


def _server_class() -> Callable[[uvicorn.Config], GuardedServer]:
    import signal

    import uvicorn

    from edgeshield.errors import EdgeShieldError
    from edgeshield.server._tls_scope import TlsHttpToolsProtocol

    class GuardedServer(uvicorn.Server):
        """uvicorn behind EdgeShield's own listener (admission before TLS, a handshake deadline; ``_listener``).

        It also returns from SIGINT/SIGTERM instead of re-raising them after the graceful shutdown (which would kill
        the process before our own clean-up, the audit log's shutdown entry), so ``serve`` exits 0; and SIGHUP runs
        ``on_hangup`` (the model reload) instead of ending the process.
        """

        gate: ConnectionGate
        on_hangup: Callable[[], None] | None = None
        h3: Any = None  # the HTTP/3 listener (``_h3.H3Server``) started and stopped with this one, or None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await self.lifespan.startup()
            if self.lifespan.should_exit:
                self.should_exit = True
                return
            config, loop = self.config, asyncio.get_running_loop()
            self.gate.loop = loop

            def http(address: str) -> asyncio.Protocol:
                return TlsHttpToolsProtocol(config=config, server_state=self.server_state,
                                            app_state=self.lifespan.state, _loop=loop, gate=self.gate,
                                            address=address)

            try:
                server = Listener(listening_socket(config.host, config.port, config.backlog), self.gate, http)
            except OSError as exc:
                await self.lifespan.shutdown()
                raise EdgeShieldError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
            server.start()
            self.servers = [server]  # type: ignore[list-item]  # uvicorn only calls close() and wait_closed()
            host, port = server.sockets[0].getsockname()[:2]
            log.info("serving on https://%s:%d (mutual TLS 1.3)", host, port)
            if self.h3 is not None:
                try:
                    await self.h3.start()
                except OSError as exc:
                    server.close()
                    await self.lifespan.shutdown()
                    raise EdgeShieldError(f"cannot listen on udp {config.host}:{self.h3.port}: "
                                          f"{exc.strerror or exc}") from None
            self.started = True

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            self.gate.abort_handshakes()
            if self.h3 is not None:
                self.h3.close()
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            hangup = self.on_hangup
            if hangup is not None:
                original[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda _sig, _frame: hangup())
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GuardedServer


def make_server(cfg: ServeConfig, state: ServerState | None = None) -> tuple[GuardedServer, CrlWatcher]:
    """A configured ``uvicorn.Server`` behind EdgeShield's listener (not started) and its CRL watcher."""
    import uvicorn

    from edgeshield.server._app import create_app

    check_readable_file(cfg.cert, what="server certificate")
    check_readable_file(cfg.key, what="server key")
    logging.config.dictConfig(log_config(cfg.log_level))  # JSON lines from the first one: start-up logs too
    logging.captureWarnings(True)  # a library's warnings.warn goes to the JSON log, never bare to stderr
    state = state or build_state(cfg)
    events = ConnectionEvents(state)
    ctx = tls_context(cfg)
    guard = CrlGuard(ctx, cfg.crl_expired)
    state.revocation = guard.refusal
    app: Any = create_app(state)
    if cfg.ohttp:
        from edgeshield.server._ohttp import gateway_for

        app = gateway_for(app, state, ca=cfg.ca, cert=cfg.cert, key=cfg.key, passphrase=cfg.passphrase,
                          key_path=cfg.ohttp_key or cfg.audit_db.with_name(cfg.audit_db.name + ".ohttp-key"),
                          window_s=cfg.ohttp_window_s)
    config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, timeout_keep_alive=max(1, round(cfg.limits.keep_alive_s)),
        timeout_graceful_shutdown=10, limit_concurrency=None, log_config=log_config(cfg.log_level),
        server_header=False, date_header=False,
    )
    server = _server_class()(config)
    server.gate = gate = ConnectionGate(cfg.limits, ctx, events)
    monitor = state.security_monitor
    if monitor is not None:  # the monitor's responses reach the listener: address blocks before TLS, denials now
        gate.address_check = monitor.address_refused
        monitor.on_deny = gate.close_revoked_threadsafe
    state.metrics.connections_open.set_function(lambda: gate.total)
    state.metrics.busiest_address.set_function(gate.busiest_address)
    reload = state.reload
    if reload is not None:
        server.on_hangup = lambda: _reload_in_background(reload, "SIGHUP")
    on_reload: Callable[[frozenset[int]], None] = server.gate.close_revoked_threadsafe
    if cfg.http3_port is not None:
        server.h3 = _h3_server(cfg, app, guard, events, ctx)
        server.h3.gate.address_check = gate.address_check
        on_reload = _both(on_reload, server.h3.close_revoked_threadsafe)
    watcher = CrlWatcher(guard, crl_path_for(cfg), state, cfg.crl_poll_s, warn_before_s=cfg.crl_warn_days * 86400,
                         on_reload=on_reload)
    watcher.check_expiry()
    return server, watcher


def _h3_server(cfg: ServeConfig, app: Any, guard: CrlGuard, events: ConnectionEvents, ctx: ssl.SSLContext) -> Any:
    """The HTTP/3 listener beside the TCP one (``--http3-port``): same app, CRL and events, its own UDP caps."""
    from edgeshield.errors import MissingDependencyError

    try:
        from edgeshield.server._h3 import h3_server_for
    except ImportError:
        raise MissingDependencyError("--http3-port needs aioquic: pip install 'edgeshield[h3]'") from None
    return h3_server_for(app, cfg, guard=guard, gate=ConnectionGate(cfg.limits, ctx, events), events=events)


def _both(first: Callable[[frozenset[int]], None],
          second: Callable[[frozenset[int]], None]) -> Callable[[frozenset[int]], None]:
    def both(serials: frozenset[int]) -> None:
        first(serials)
        second(serials)

    return both


def _reload_in_background(reload: Callable[[str], object], by: str) -> None:
    """From a signal handler: reload on a thread of its own (opening a model takes a while; the loop serves on).
    A refused reload is already logged and audited by the reloader; nobody is waiting for its answer."""
    from edgeshield.errors import EdgeShieldError

    def run() -> None:
        try:
            reload(by)
        except EdgeShieldError:
            pass
        except Exception:
            log.exception("model reload by %s failed", by)

    threading.Thread(target=run, name="edgeshield-reload", daemon=True).start()


@contextlib.contextmanager
def running(cfg: ServeConfig, state: ServerState | None = None, *,
            start_timeout_s: float = 20.0) -> Iterator[tuple[GuardedServer, CrlWatcher, int]]:
    """``make_server(cfg)`` serving on a background thread, with its CRL watcher: yields (server, watcher, port)
    once it listens, and shuts it down gracefully (audit shutdown entry and checkpoint) when the block ends."""
    from edgeshield.errors import EdgeShieldError

    server, watcher = make_server(cfg, state)
    thread = threading.Thread(target=server.run, name="edgeshield-server", daemon=True)
    thread.start()
    watcher.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise EdgeShieldError(f"the server did not start within {start_timeout_s:g} s")
            time.sleep(0.02)
        yield server, watcher, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        watcher.stop.set()
        thread.join(timeout=15)


def serve(cfg: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn finishes in-flight requests (graceful shutdown, 10 s at most)."""
    server, watcher = make_server(cfg)
    watcher.start()
    try:
        server.run()
    finally:
        watcher.stop.set()
