"""`edgeshield relay`: a small Oblivious HTTP relay in front of a `serve --ohttp` gateway (docs/ohttp.md).

Clients connect with mutual TLS 1.3 (certificates from --ca required, its CRL checked); the relay forwards only
the gateway's key configuration and encapsulated requests, over its own mutual TLS with a `relay`-role
certificate. It never holds a key that opens them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeshield import keys
from edgeshield.cli._common import PassphraseEnvOpt, console


def relay(
    gateway: Annotated[str, typer.Option("--gateway", help="The gateway's URL, e.g. https://10.0.0.5:8443.")],
    ca: Annotated[Path, typer.Option("--ca", help="CA directory (ca.crt and crl.pem): clients and the gateway "
                                                  "are checked against it.")],
    cert: Annotated[Path, typer.Option("--cert", help="The relay's server certificate (clients connect to it).")],
    key: Annotated[Path, typer.Option("--key", help="Its private key.")],
    client_cert: Annotated[Path, typer.Option("--client-cert", help="The relay's client certificate (role "
                                                                    "`relay`) for the gateway.")],
    client_key: Annotated[Path, typer.Option("--client-key", help="Its private key.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8444,
    record: Annotated[Path | None, typer.Option("--record", help="Append what was forwarded to this JSON-lines "
                                                "file: direction, size, SHA-256, a hex prefix (ciphertext only).")
                      ] = None,
    max_body: Annotated[int, typer.Option("--max-body", min=1, help="Largest request body forwarded, in bytes.")
                        ] = 5 * 1024 * 1024,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds for a body to arrive and for the "
                                           "gateway to answer.")] = 10.0,
    passphrase_env: PassphraseEnvOpt = None,
) -> None:
    """Relay Oblivious HTTP (RFC 9458) from clients to a gateway: it sees only ciphertext and sizes."""
    from edgeshield.transport._relay import RelayConfig, serve_relay

    if not gateway.lower().startswith("https://"):
        from edgeshield.errors import InvalidArgumentError

        raise InvalidArgumentError(f"--gateway must be an https:// URL, not {gateway!r}")
    cfg = RelayConfig(gateway_url=gateway, ca=ca, cert=cert, key=key, client_cert=client_cert, client_key=client_key,
                      host=host, port=port, passphrase=keys.passphrase_from_env(passphrase_env), record=record,
                      max_body_bytes=max_body, timeout_s=timeout)
    console.print(f"relaying Oblivious HTTP on https://{host}:{port} to {gateway}")
    serve_relay(cfg)
