"""`edgeshield client …`: talk to an EdgeShield server over mutual TLS."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated

import typer

from edgeshield import keys
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json
from edgeshield.errors import ConnectionFailedError, ServerRefusedError

app = typer.Typer(help="Talk to an EdgeShield server over mutual TLS.", no_args_is_help=True)


@app.command("predict")
def predict(
    url: Annotated[str, typer.Option("--url", help="Server URL, e.g. https://127.0.0.1:8443")],
    cert: Annotated[Path, typer.Option("--cert", help="Client certificate.")],
    key: Annotated[Path, typer.Option("--key", help="Client private key.")],
    ca: Annotated[Path, typer.Option("--ca", help="CA certificate (ca.crt) the server's certificate chains to.")],
    input: Annotated[Path, typer.Option("--input", help="Input batch (.npy).")],
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send INPUT to /v1/predict and print the predictions (or accept/flag/reject decisions)."""
    import httpx
    import numpy as np

    from edgeshield.bundles._predict import load_npy
    from edgeshield.transport import client_context

    x = load_npy(input)
    ctx = client_context(ca, cert, key, passphrase=keys.passphrase_from_env(passphrase_env))
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    try:
        with httpx.Client(base_url=url, verify=ctx, timeout=30) as c:
            r = c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
    except httpx.HTTPError as exc:
        raise ConnectionFailedError(f"cannot reach {url}: {' '.join(str(exc).split())[:200]}") from None
    if r.status_code != 200:
        try:
            message = r.json().get("error", r.text)
        except (json.JSONDecodeError, AttributeError):
            message = r.text
        raise ServerRefusedError(r.status_code, str(message)[:300])
    body = r.json()
    if as_json:
        emit_json(body)
    elif "predictions" in body:
        console.print(f"predictions ({len(body['predictions'])}): {body['predictions']}")
    else:
        console.print(f"decisions: {body['counts']}")
        console.print([d["prediction"] if d["prediction"] is not None else "rejected" for d in body["decisions"]])
