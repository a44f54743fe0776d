"""`edgeshield serve`: the server a device runs.

Every option can come from three places, the first that has it winning: the command line, an environment variable
``EDGESHIELD_<OPTION>`` (``--owner-key`` is ``EDGESHIELD_OWNER_KEY``; the bundle ``EDGESHIELD_BUNDLE``), and a
TOML file given with ``--config serve.toml`` whose keys are the option names without their dashes
(``owner-key = "keys/owner.pub"``; repeatable options take a list; relative paths are relative to the file).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from edgeshield import keys
from edgeshield.cli._common import PassphraseEnvOpt, gradient_detector_file, requires
from edgeshield.errors import InvalidArgumentError

ENV_PREFIX = "EDGESHIELD"
_LIMITS, _REVOCATION, _EXTRACTION = "Connection limits", "Revocation", "Model-extraction defence"
_WITNESS, _MONITOR, _SUBJECTS = "Audit witness", "Security monitoring", "Data subjects and retention"
_MODEL = "Model source (updates, released keys)"


def _load_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """``--config FILE``: its keys become defaults for the options not given on the command line or in the env."""
    if value is None:
        return None
    from edgeshield._io import check_readable_file

    path = check_readable_file(value, what="serve config")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{path} is not valid TOML: {exc}") from None
    by_key: dict[str, click.Parameter] = {}
    for param in ctx.command.params:
        if isinstance(param, click.Argument) and param.name:
            by_key[param.name] = param
        for opt in getattr(param, "opts", ()):
            if opt.startswith("--"):
                by_key[opt[2:]] = param
    from edgeshield.compliance._deployment import COMPLIANCE_KEYS

    defaults: dict[str, Any] = {}
    for key, item in data.items():
        if key in COMPLIANCE_KEYS:  # read by `edgeshield comply` from the same file; nothing serve uses
            continue
        target = by_key.get(key)
        if target is None or target.name is None or target.name == "config":
            known = ", ".join(sorted(k for k in by_key if k != "config"))
            raise InvalidArgumentError(f"{path}: unknown key {key!r}; the keys are the serve options: {known}")
        if isinstance(item, dict):
            raise InvalidArgumentError(f"{path}: {key} must be a value or a list, not a table")
        if isinstance(target.type, click.Path) or (isinstance(target.type, click.types.FuncParamType)
                                                    and target.type.func is Path):
            defaults[target.name] = ([str(path.parent / Path(v)) for v in item] if isinstance(item, list)
                                     else str(path.parent / item))
        else:
            defaults[target.name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


@requires("tpm", when=lambda args: args.get("released_key") is not None)
@requires("ohttp", when=lambda args: bool(args.get("ohttp")))
@requires("h3", when=lambda args: args.get("http3_port") is not None)
@requires("eval", "torch", "onnx", when=gradient_detector_file("detector"))
def serve(
    owner_key: Annotated[Path, typer.Option("--owner-key", help="The model owner's public key.")],
    ca: Annotated[Path, typer.Option("--ca", help="CA directory from `pki init` (ca.crt + crl.pem).")],
    cert: Annotated[Path, typer.Option("--cert", help="Server certificate (`pki issue --server`).")],
    key: Annotated[Path, typer.Option("--key", help="Server private key.")],
    audit_db: Annotated[Path, typer.Option("--audit-db", help="Audit log (SQLite), created if missing.")],
    audit_key: Annotated[Path, typer.Option("--audit-key",
                                            help="Ed25519 key signing audit checkpoints (`audit keygen`).")],
    bundle: Annotated[Path | None, typer.Argument(help="The protected model to serve (or --update-dir).",
                                                  envvar=f"{ENV_PREFIX}_BUNDLE", show_default=False)] = None,
    device_key: Annotated[
        Path | None, typer.Option("--device-key", help="This device's private key, or tpm:HANDLE / tpm:FILE (sealed "
                                                       "in the TPM, unsealed at start); or --released-key.")
    ] = None,
    update_dir: Annotated[
        Path | None, typer.Option("--update-dir", rich_help_panel=_MODEL,
                                  help="Serve the current slot of this update directory (`update init`): its bundle, "
                                       "detector and input spec; SIGHUP or POST /v1/admin/reload follows an update.")
    ] = None,
    released_key: Annotated[
        Path | None, typer.Option("--released-key", rich_help_panel=_MODEL,
                                  help="Open the bundle with this released key (`attest fetch-key --out`), decrypted "
                                       "in the TPM under its licence, instead of --device-key.")
    ] = None,
    tpm_keys: Annotated[
        Path | None, typer.Option("--tpm-keys", rich_help_panel=_MODEL,
                                  help="The TPM key file `attest keys` wrote (with --released-key).")
    ] = None,
    tcti: Annotated[
        str | None, typer.Option("--tcti", rich_help_panel=_MODEL,
                                 help="The TPM to use with --released-key, e.g. swtpm:port=2321 (default: the "
                                      "platform's).")
    ] = None,
    ohttp: Annotated[
        bool, typer.Option("--ohttp", rich_help_panel="Oblivious HTTP",
                           help="Also accept Oblivious HTTP (RFC 9458; the ohttp extra): key configuration at GET "
                                "/.well-known/ohttp-gateway, message/ohttp-req on POST there and on /v1/predict.")
    ] = False,
    ohttp_key: Annotated[
        Path | None, typer.Option("--ohttp-key", rich_help_panel="Oblivious HTTP",
                                  help="The gateway's X25519 key file, created 0600 if missing (default: "
                                       "AUDIT_DB.ohttp-key).")
    ] = None,
    ohttp_window: Annotated[
        float, typer.Option("--ohttp-window", min=1.0, rich_help_panel="Oblivious HTTP",
                            help="Seconds an encapsulated request's client timestamp stays acceptable (and its "
                                 "encapsulation remembered against replay).")
    ] = 30.0,
    config: Annotated[
        Path | None,
        typer.Option("--config", is_eager=True, callback=_load_config,
                     help="TOML file of serve options (keys are the option names: owner-key = \"…\"); the command "
                          "line and EDGESHIELD_* environment variables override it."),
    ] = None,
    detector: Annotated[Path | None, typer.Option("--detector", help="Detector file: robust inference.")] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="RBAC policy CSV (default: the shipped one).")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8443,
    http3_port: Annotated[
        int | None, typer.Option("--http3-port", min=0, max=65535,
                                 help="Also serve HTTP/3 (mutual TLS 1.3 over QUIC; the h3 extra) on this UDP port "
                                      "of --host, started and stopped with the TCP server.")
    ] = None,
    max_body: Annotated[int, typer.Option("--max-body", min=1,
                                          help="Largest request body in bytes.")] = 4 * 1024 * 1024,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most inputs in one request.")] = 1024,
    inference_timeout: Annotated[
        float, typer.Option("--inference-timeout", min=0.001, help="Seconds before inference answers 504.")
    ] = 10.0,
    audit_durability: Annotated[
        str,
        typer.Option("--audit-durability", help="full: fsync every entry (survives power loss; default). "
                                                "normal: survives a killed process but not a power cut; faster."),
    ] = "full",
    audit_commit_delay: Annotated[
        float,
        typer.Option("--audit-commit-delay-ms", min=0.0, max=10.0,
                     help="Milliseconds a group commit waits for more audit entries when requests are concurrent "
                          "(PostgreSQL's commit_delay; default 0)."),
    ] = 0.0,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    handshake_timeout: Annotated[
        float, typer.Option("--handshake-timeout", min=0.1, rich_help_panel=_LIMITS,
                            help="Seconds a client has to finish the TLS handshake.")
    ] = 10.0,
    request_head_timeout: Annotated[
        float, typer.Option("--request-head-timeout", min=0.1, rich_help_panel=_LIMITS,
                            help="Seconds an idle connection has to deliver a complete request head.")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option("--body-timeout", min=0.1, rich_help_panel=_LIMITS,
                            help="Seconds a request has to deliver its whole body (else 408).")
    ] = 30.0,
    keep_alive: Annotated[
        float, typer.Option("--keep-alive", min=1.0, rich_help_panel=_LIMITS, help="Idle keep-alive, seconds.")
    ] = 5.0,
    max_connections: Annotated[
        int, typer.Option("--max-connections", min=1, rich_help_panel=_LIMITS, help="Open connections in all.")
    ] = 512,
    max_connections_per_address: Annotated[
        int, typer.Option("--max-connections-per-address", min=1, rich_help_panel=_LIMITS,
                          help="Open connections per client address (an IPv6 /64), before TLS.")
    ] = 64,
    handshake_rate: Annotated[
        float, typer.Option("--handshake-rate", min=0.01, rich_help_panel=_LIMITS,
                            help="TLS handshakes per second per client address.")
    ] = 20.0,
    handshake_burst: Annotated[
        int, typer.Option("--handshake-burst", min=1, rich_help_panel=_LIMITS,
                          help="Handshakes a client address may make at once.")
    ] = 40,
    max_connections_per_identity: Annotated[
        int, typer.Option("--max-connections-per-identity", min=1, rich_help_panel=_LIMITS,
                          help="Open connections per client certificate identity (more: 503).")
    ] = 16,
    max_in_flight: Annotated[
        int, typer.Option("--max-in-flight", min=1, rich_help_panel=_LIMITS, help="Requests served at once.")
    ] = 64,
    max_in_flight_per_identity: Annotated[
        int, typer.Option("--max-in-flight-per-identity", min=1, rich_help_panel=_LIMITS,
                          help="Requests one identity may have served at once (more: 503).")
    ] = 8,
    crl_expired: Annotated[
        str, typer.Option("--crl-expired", rich_help_panel=_REVOCATION,
                          help="When the CRL passes nextUpdate: fail-closed (refuse everyone; default) or keep-last "
                               "(keep revoking with the last CRL's serials, loudly logged).")
    ] = "fail-closed",
    crl_warn_days: Annotated[
        float, typer.Option("--crl-warn-days", min=0.0, rich_help_panel=_REVOCATION,
                            help="Warn (log, metric, audit) this many days before the CRL's nextUpdate.")
    ] = 2.0,
    crl_poll: Annotated[
        float, typer.Option("--crl-poll", min=0.1, rich_help_panel=_REVOCATION,
                            help="Seconds between checks of crl.pem for a new CRL.")
    ] = 2.0,
    rate_limit: Annotated[
        list[str] | None,
        typer.Option("--rate-limit", rich_help_panel=_EXTRACTION,
                     help="ROLE=RATE:BURST token bucket per client (inputs per second, burst); repeatable."),
    ] = None,
    extraction_monitor: Annotated[
        str | None,
        typer.Option("--extraction-monitor", rich_help_panel=_EXTRACTION,
                     help="Watch each client with PRADA; on alarm: flag, throttle, degrade or block."),
    ] = None,
    outputs: Annotated[
        str | None,
        typer.Option("--outputs", rich_help_panel=_EXTRACTION,
                     help='Return hardened probabilities, e.g. \'{"policy": "top_k", "k": 3}\' '
                          '(default: labels only).'),
    ] = None,
    query_budget: Annotated[
        int | None,
        typer.Option("--query-budget", min=1, rich_help_panel=_EXTRACTION,
                     help="Most distinct inputs a client may send per --query-window before the --extraction-monitor "
                          "action (repeats are free)."),
    ] = None,
    query_window: Annotated[
        float, typer.Option("--query-window", min=1.0, rich_help_panel=_EXTRACTION,
                            help="Query-budget window, seconds.")
    ] = 86400.0,
    served_watermark_key: Annotated[
        Path | None,
        typer.Option("--served-watermark-key", rich_help_panel=_EXTRACTION,
                     help="Owner watermark key: answer a keyed fraction of inputs with a watermark label, so a copy "
                          "stolen through the API can be proven."),
    ] = None,
    served_watermark_rate: Annotated[
        float, typer.Option("--served-watermark-rate", min=0.0001, max=0.5, rich_help_panel=_EXTRACTION,
                            help="Fraction of inputs marked.")
    ] = 0.01,
    served_watermark_evidence: Annotated[
        Path | None,
        typer.Option("--served-watermark-evidence", rich_help_panel=_EXTRACTION,
                     help="SQLite file keeping the marked inputs (for `watermark verify-copy`); "
                          "required with the key."),
    ] = None,
    extraction_state: Annotated[
        Path | None,
        typer.Option("--extraction-state", rich_help_panel=_EXTRACTION,
                     help="SQLite file keeping the extraction monitor's state (budgets, blocks, PRADA sets) and the "
                          "canonical-key registry across restarts; written every 30 s and at shutdown."),
    ] = None,
    decaying_budget: Annotated[
        str | None,
        typer.Option("--decaying-budget", metavar="BURST:PER_DAY", rich_help_panel=_EXTRACTION,
                     help="Per-identity budget of distinct inputs over its whole life: BURST deep, refilled at PER_DAY "
                          "a day; a device sending at most BURST + PER_DAY*T in any T days is never alarmed."),
    ] = None,
    prada_dup_distance: Annotated[
        float | None,
        typer.Option("--prada-dup-distance", rich_help_panel=_EXTRACTION,
                     help="L2 distance within which PRADA takes a query for a retake of one the client sent before "
                          "and ignores it (calibrate with edgeshield.extraction.calibrate_dup_distance on honest "
                          "retakes); default: only inputs with the same canonical key."),
    ] = None,
    fleet_budget: Annotated[
        int | None,
        typer.Option("--fleet-budget", min=1, rich_help_panel=_EXTRACTION,
                     help="Most distinct inputs a group of identities (--fleet-group) may send per UTC day, counted "
                          "as one union; beyond it every identity of the group is flagged."),
    ] = None,
    fleet_group: Annotated[
        str, typer.Option("--fleet-group", rich_help_panel=_EXTRACTION,
                          help="What a fleet group is: role (the identity's certificate role).")
    ] = "role",
    max_monitored_clients: Annotated[
        int, typer.Option("--max-monitored-clients", min=1, rich_help_panel=_EXTRACTION,
                          help="Clients the extraction monitor holds in memory; the least recently seen go to "
                               "--extraction-state (without one their budgets are forgotten, blocks kept).")
    ] = 10_000,
    ood_reference: Annotated[
        Path | None,
        typer.Option("--ood-reference", rich_help_panel=_EXTRACTION,
                     help="An .npz with array x of clean task inputs: watch each client's out-of-distribution rate, "
                          "calibrated on them (and --ood-transforms)."),
    ] = None,
    ood_transforms: Annotated[
        str | None,
        typer.Option("--ood-transforms", metavar="JSON", rich_help_panel=_EXTRACTION,
                     help='Benign sensor variations the OOD calibration includes (default: shifts of one pixel, '
                          'noise 0.05, contrast 0.7-1.0, on square images), e.g. \'{"shifts": 1, "noise": 0.05, '
                          '"contrast": [0.7, 1.0], "image_shape": [8, 8]}\', or none (clean data only).'),
    ] = None,
    witness: Annotated[
        str | None,
        typer.Option("--witness", metavar="URL", rich_help_panel=_WITNESS,
                     help="Publish each new audit checkpoint to this witness (C2SP tlog-witness, HTTPS) in the "
                          "background; the cosigned note is kept beside the log."),
    ] = None,
    witness_ca: Annotated[
        Path | None, typer.Option("--witness-ca", rich_help_panel=_WITNESS,
                                  help="CA certificate the witness's TLS certificate chains to.")
    ] = None,
    witness_cert: Annotated[
        Path | None, typer.Option("--witness-cert", rich_help_panel=_WITNESS,
                                  help="Client certificate to present to the witness (with --witness-cert-key).")
    ] = None,
    witness_cert_key: Annotated[
        Path | None, typer.Option("--witness-cert-key", rich_help_panel=_WITNESS, help="Its private key.")
    ] = None,
    witness_vkey: Annotated[
        list[str] | None,
        typer.Option("--witness-vkey", metavar="VKEY", rich_help_panel=_WITNESS,
                     help="The witness's cosignature verifier key (C2SP vkey, or a file holding one); repeatable."),
    ] = None,
    witness_every: Annotated[
        float, typer.Option("--witness-every", min=1.0, rich_help_panel=_WITNESS,
                            help="Seconds between publications (only when the log has a newer checkpoint).")
    ] = 60.0,
    witness_note: Annotated[
        Path | None, typer.Option("--witness-note", rich_help_panel=_WITNESS,
                                  help="Where to keep the newest cosigned checkpoint (default: AUDIT_DB.cosigned).")
    ] = None,
    monitor: Annotated[
        bool, typer.Option("--monitor/--no-monitor", rich_help_panel=_MONITOR,
                           help="Run the security monitor: rules over every security event, automated responses.")
    ] = True,
    monitor_rules: Annotated[
        Path | None, typer.Option("--monitor-rules", rich_help_panel=_MONITOR,
                                  help="Rule file (YAML; default: the packaged rule pack, `monitor rules show`).")
    ] = None,
    monitor_db: Annotated[
        Path | None, typer.Option("--monitor-db", rich_help_panel=_MONITOR,
                                  help="Where blocks, denials and quarantines persist (default: AUDIT_DB.monitor).")
    ] = None,
    webhook: Annotated[
        str | None, typer.Option("--webhook", metavar="URL", rich_help_panel=_MONITOR,
                                 help="POST every alert here as JSON (https; http only to loopback).")
    ] = None,
    webhook_token_env: Annotated[
        str | None, typer.Option("--webhook-token-env", metavar="VAR", rich_help_panel=_MONITOR,
                                 help="Environment variable holding the webhook's bearer token.")
    ] = None,
    webhook_ca: Annotated[
        Path | None, typer.Option("--webhook-ca", rich_help_panel=_MONITOR,
                                  help="CA certificate the webhook's TLS certificate chains to.")
    ] = None,
    events_socket: Annotated[
        Path | None, typer.Option("--events-socket", rich_help_panel=_MONITOR,
                                  help="Local event endpoint (Unix socket, mode 0600) other processes report to.")
    ] = None,
    watch_interval: Annotated[
        float, typer.Option("--watch-interval", min=0.1, rich_help_panel=_MONITOR,
                            help="Seconds between checks of the bundle, detector, policy and config digests.")
    ] = 2.0,
    subject_header: Annotated[
        str | None, typer.Option("--subject-header", metavar="NAME", rich_help_panel=_SUBJECTS,
                                 help="Request header naming the data subject a request is about (audited as a "
                                      "pseudonym; `comply erase` forgets it).")
    ] = None,
    subject_keys: Annotated[
        Path | None, typer.Option("--subject-keys", rich_help_panel=_SUBJECTS,
                                  help="Per-subject pseudonym keys (default: AUDIT_DB.subjects).")
    ] = None,
    retention_days: Annotated[
        float | None, typer.Option("--retention-days", min=0.001, rich_help_panel=_SUBJECTS,
                                   help="Purge personal-data records (served-watermark evidence) older than this.")
    ] = None,
    passphrase_env: PassphraseEnvOpt = None,
) -> None:
    """Serve BUNDLE (or an update directory's current slot) over mutual TLS 1.3 with RBAC, validation and an audit
    log. SIGHUP reloads the model without dropping connections; Ctrl-C stops gracefully."""
    from edgeshield.server import ServeConfig
    from edgeshield.server import serve as run_server
    from edgeshield.server._limits import Limits

    limits = Limits(handshake_timeout_s=handshake_timeout, max_connections=max_connections,
                    max_connections_per_address=max_connections_per_address,
                    handshakes_per_second_per_address=handshake_rate, handshake_burst_per_address=handshake_burst,
                    max_connections_per_identity=max_connections_per_identity,
                    request_head_timeout_s=request_head_timeout, keep_alive_s=keep_alive, body_timeout_s=body_timeout,
                    max_in_flight=max_in_flight, max_in_flight_per_identity=max_in_flight_per_identity)
    run_server(ServeConfig(bundle=bundle, owner_key=owner_key, device_key=device_key, ca=ca, cert=cert, key=key,
                           audit_db=audit_db, audit_key=audit_key, detector=detector, policy=policy, host=host,
                           port=port, passphrase=keys.passphrase_from_env(passphrase_env), max_body_bytes=max_body,
                           max_batch=max_batch, inference_timeout_s=inference_timeout, crl_poll_s=crl_poll,
                           log_level=log_level, audit_durability=audit_durability,
                           audit_commit_delay_s=audit_commit_delay / 1000,
                           rate_limits=_parse_rate_limits(rate_limit or []), extraction_action=extraction_monitor,
                           outputs=outputs, query_budget=query_budget, query_window_s=query_window,
                           served_watermark_key=served_watermark_key, served_watermark_rate=served_watermark_rate,
                           served_watermark_evidence=served_watermark_evidence, limits=limits,
                           extraction_state=extraction_state,
                           decaying_budget=_parse_decaying_budget(decaying_budget), fleet_budget=fleet_budget,
                           prada_dup_distance=prada_dup_distance,
                           fleet_group=fleet_group, max_monitored_clients=max_monitored_clients,
                           ood_reference=ood_reference, ood_transforms=ood_transforms,
                           crl_expired=crl_expired, crl_warn_days=crl_warn_days, witness_url=witness,
                           witness_ca=witness_ca, witness_cert=witness_cert, witness_cert_key=witness_cert_key,
                           witness_vkeys=tuple(witness_vkey or ()), witness_every_s=witness_every,
                           witness_note=witness_note, monitor=monitor, monitor_rules=monitor_rules,
                           monitor_db=monitor_db, webhook_url=webhook, webhook_token_env=webhook_token_env,
                           webhook_ca=webhook_ca, events_socket=events_socket, watch_interval_s=watch_interval,
                           config_file=config, subject_header=subject_header, subject_keys=subject_keys,
                           retention_days=retention_days, update_dir=update_dir, released_key=released_key,
                           tpm_keys=tpm_keys, tcti=tcti, ohttp=ohttp, ohttp_key=ohttp_key,
                           ohttp_window_s=ohttp_window, http3_port=http3_port))


def _parse_rate_limits(items: list[str]) -> tuple[tuple[str, float, float], ...]:
    out = []
    for item in items:
        role, _, spec = item.partition("=")
        rate, _, burst = spec.partition(":")
        try:
            out.append((role, float(rate), float(burst)))
        except ValueError:
            raise InvalidArgumentError(f"--rate-limit expects ROLE=RATE:BURST, got {item!r}") from None
        if not role:
            raise InvalidArgumentError(f"--rate-limit expects ROLE=RATE:BURST, got {item!r}")
    return tuple(out)


def _parse_decaying_budget(value: str | None) -> tuple[int, float] | None:
    if value is None:
        return None
    burst, sep, per_day = value.partition(":")
    try:
        parsed = (int(burst), float(per_day))
    except ValueError:
        parsed = None
    if not sep or parsed is None or parsed[0] < 1 or not parsed[1] > 0 or parsed[1] == float("inf"):
        raise InvalidArgumentError(f"--decaying-budget expects BURST:PER_DAY (a positive integer and a positive "
                                   f"number), got {value!r}")
    return parsed
