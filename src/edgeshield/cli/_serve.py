"""`edgeshield serve`: the server a device runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeshield import keys
from edgeshield.cli._common import PassphraseEnvOpt


def serve(
    bundle: Annotated[Path, typer.Argument(help="The protected model to serve.")],
    owner_key: Annotated[Path, typer.Option("--owner-key", help="The model owner's public key.")],
    device_key: Annotated[Path, typer.Option("--device-key", help="This device's private key.")],
    ca: Annotated[Path, typer.Option("--ca", help="CA directory from `pki init` (ca.crt + crl.pem).")],
    cert: Annotated[Path, typer.Option("--cert", help="Server certificate (`pki issue --server`).")],
    key: Annotated[Path, typer.Option("--key", help="Server private key.")],
    audit_db: Annotated[Path, typer.Option("--audit-db", help="Audit log (SQLite), created if missing.")],
    audit_key: Annotated[Path, typer.Option("--audit-key", help="Ed25519 key signing audit checkpoints (`audit keygen`).")],
    detector: Annotated[Path | None, typer.Option("--detector", help="Detector file: robust inference.")] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="RBAC policy CSV (default: the shipped one).")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8443,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body in bytes.")] = 4 * 1024 * 1024,
    audit_durability: Annotated[
        str,
        typer.Option("--audit-durability", help="full: fsync every entry (survives power loss; default). "
                                                "normal: survives a killed process but not a power cut; faster."),
    ] = "full",
    rate_limit: Annotated[
        list[str] | None,
        typer.Option("--rate-limit", help="ROLE=RATE:BURST token bucket per client (inputs per second, burst); repeatable."),
    ] = None,
    extraction_monitor: Annotated[
        str | None,
        typer.Option("--extraction-monitor", help="Watch each client with PRADA; on alarm: flag, throttle, degrade or block."),
    ] = None,
    outputs: Annotated[
        str | None,
        typer.Option("--outputs", help='Return hardened probabilities, e.g. \'{"policy": "top_k", "k": 3}\' (default: labels only).'),
    ] = None,
    query_budget: Annotated[
        int | None,
        typer.Option("--query-budget", min=1, help="Most distinct inputs a client may send per --query-window "
                                                   "before the --extraction-monitor action (repeats are free)."),
    ] = None,
    query_window: Annotated[float, typer.Option("--query-window", min=1.0, help="Query-budget window, seconds.")] = 86400.0,
    served_watermark_key: Annotated[
        Path | None,
        typer.Option("--served-watermark-key", help="Owner watermark key: answer a keyed fraction of inputs with a "
                                                    "watermark label, so a copy stolen through the API can be proven."),
    ] = None,
    served_watermark_rate: Annotated[
        float, typer.Option("--served-watermark-rate", min=0.0001, max=0.5, help="Fraction of inputs marked.")
    ] = 0.01,
    served_watermark_evidence: Annotated[
        Path | None,
        typer.Option("--served-watermark-evidence", help="SQLite file keeping the marked inputs (for "
                                                         "`watermark verify-copy`); required with the key."),
    ] = None,
    passphrase_env: PassphraseEnvOpt = None,
) -> None:
    """Serve BUNDLE over mutual TLS 1.3 with RBAC, validation and an audit log (Ctrl-C stops gracefully)."""
    from edgeshield.server import ServeConfig
    from edgeshield.server import serve as run_server

    run_server(ServeConfig(bundle=bundle, owner_key=owner_key, device_key=device_key, ca=ca, cert=cert, key=key,
                           audit_db=audit_db, audit_key=audit_key, detector=detector, policy=policy, host=host,
                           port=port, passphrase=keys.passphrase_from_env(passphrase_env), max_body_bytes=max_body,
                           audit_durability=audit_durability, rate_limits=_parse_rate_limits(rate_limit or []),
                           extraction_action=extraction_monitor, outputs=outputs, query_budget=query_budget,
                           query_window_s=query_window, served_watermark_key=served_watermark_key,
                           served_watermark_rate=served_watermark_rate,
                           served_watermark_evidence=served_watermark_evidence))


def _parse_rate_limits(items: list[str]) -> tuple[tuple[str, float, float], ...]:
    from edgeshield.errors import InvalidArgumentError

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
