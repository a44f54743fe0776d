"""`edgeshield client …`: talk to an EdgeShield server over mutual TLS, and say plainly what went wrong.

Every command goes through one connection helper (:func:`_call`). Its failures, as the user sees them:

* the server refused our client certificate: in TLS 1.3 the server checks it *after* our side of the handshake
  is complete, so httpx only sees the connection close ("Server disconnected without sending a response"), or a
  TLS alert when the server sends one. When a request dies that way, the client opens one more TLS connection and
  waits a moment: a server that accepted the certificate waits for a request (after sending its session tickets),
  one that refused it closes or alerts at once. That becomes ``CertificateRefusedError`` (exit 4), "server refused
  our certificate (revoked, expired or from another CA?)", plus the alert and what the local certificate shows;
* the server's certificate does not chain to ``--ca`` or name the host: ``ConnectionFailedError`` saying so;
* no server there, or no answer in time: ``ConnectionFailedError`` naming the URL;
* an HTTP refusal: ``ServerRefusedError`` with the status, the server's one-line reason and, for 429 and 503, its
  ``Retry-After`` (exit 4 for 401/403, 2 for other 4xx, 1 for 5xx).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from edgeshield import keys
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json, requires
from edgeshield.cli._tables import fields
from edgeshield.errors import CertificateRefusedError, ConnectionFailedError, InvalidArgumentError, ServerRefusedError

if TYPE_CHECKING:
    import httpx

app = typer.Typer(help="Talk to an EdgeShield server over mutual TLS.", no_args_is_help=True)

UrlOpt = Annotated[str, typer.Option("--url", help="Server URL, e.g. https://127.0.0.1:8443")]
CertOpt = Annotated[Path, typer.Option("--cert", help="Client certificate.")]
KeyOpt = Annotated[Path, typer.Option("--key", help="Client private key.")]
CaOpt = Annotated[Path, typer.Option("--ca", help="CA certificate (ca.crt) the server's certificate chains to.")]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the connection and for each read.")
]

REFUSED = "server refused our certificate (revoked, expired or from another CA?)"
_PROBE_WAIT = 1.0  # seconds a server that accepted our certificate is given to close on us (it does so in ms)
# TLS alerts a server sends when it rejects a client certificate (OpenSSL's reason names, any protocol prefix).
_CERT_ALERTS = {
    "CERTIFICATE_REVOKED": "certificate_revoked", "CERTIFICATE_EXPIRED": "certificate_expired",
    "UNKNOWN_CA": "unknown_ca", "BAD_CERTIFICATE": "bad_certificate", "CERTIFICATE_UNKNOWN": "certificate_unknown",
    "UNSUPPORTED_CERTIFICATE": "unsupported_certificate", "CERTIFICATE_REQUIRED": "certificate_required",
    "ACCESS_DENIED": "access_denied",
}


@dataclass(frozen=True)
class _Server:
    url: str
    ctx: ssl.SSLContext
    timeout: float
    cert: Path
    ca: Path


def _server(url: str, ca: Path, cert: Path, key: Path, passphrase_env: str | None, timeout: float) -> _Server:
    from edgeshield.transport import client_context

    if not url.lower().startswith("https://"):
        raise InvalidArgumentError(f"--url must be an https:// URL (the server speaks only mutual TLS), not {url!r}")
    ctx = client_context(ca, cert, key, passphrase=keys.passphrase_from_env(passphrase_env))
    return _Server(url.rstrip("/"), ctx, timeout, cert, ca)


def _call(server: _Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request on a fresh mutual-TLS connection; any failure becomes one typed, explained error."""
    import httpx

    try:
        with httpx.Client(base_url=server.url, verify=server.ctx, timeout=server.timeout) as c:
            r = c.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise _explain(server, exc) from None
    if r.status_code != 200:
        raise _refusal(r)
    return r


def _refusal(r: httpx.Response) -> ServerRefusedError:
    try:
        body = r.json()
        message = body.get("error", r.text) if isinstance(body, dict) else r.text
    except (json.JSONDecodeError, UnicodeDecodeError):
        message = r.text
    reason = " ".join(str(message).split())[:300] or r.reason_phrase
    retry = r.headers.get("retry-after")
    if retry:
        reason += f"; retry after {retry} s" if retry.strip().isdigit() else f"; retry after {retry}"
    return ServerRefusedError(r.status_code, reason)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _alert(exc: BaseException) -> str | None:
    """The certificate-rejection alert in an ``ssl.SSLError`` (e.g. ``certificate_revoked``), if it is one."""
    reason = getattr(exc, "reason", None) or ""
    for key, name in _CERT_ALERTS.items():
        if reason.endswith("ALERT_" + key):
            return name
    return None


def _explain(server: _Server, exc: Exception) -> Exception:
    import httpx

    chain = _chain(exc)
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return ConnectionFailedError(
                f"the server at {server.url} is not who it should be: {e.verify_message or e.reason} (is --ca "
                "the CA that issued its certificate, and does the URL name a host it is issued for?)")
    for e in chain:
        if isinstance(e, ssl.SSLError) and _alert(e):
            return _refused(server, _alert(e))
    if isinstance(exc, httpx.TimeoutException):
        return ConnectionFailedError(f"no answer from {server.url} within {server.timeout:g} s")
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return ConnectionFailedError(f"cannot reach {server.url}: connection refused (is the server running?)")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        verdict = _probe(server)
        if verdict is not None:
            return _refused(server, verdict or None)
        return ConnectionFailedError(f"{server.url} closed the connection without answering (a new connection "
                                     "is accepted, so not our certificate: a server limit or a restart?)")
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return ConnectionFailedError(f"TLS handshake with {server.url} failed: {e.reason or e}")
    return ConnectionFailedError(f"cannot reach {server.url}: {' '.join(str(exc).split())[:200] or type(exc).__name__}")


def _probe(server: _Server) -> str | None:
    """After a connection died without an answer: did the server refuse our certificate?

    Returns None if it accepted it (it kept the new connection open, waiting for a request), else the TLS alert
    it sent (``""`` when it just closed, as Python's asyncio servers do).
    """
    import httpx

    u = httpx.URL(server.url)
    host, port = u.host, u.port or 443
    try:
        with socket.create_connection((host, port), timeout=server.timeout) as raw, \
                server.ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(min(_PROBE_WAIT, server.timeout))
            try:
                data = tls.recv(1)
            except TimeoutError:
                return None  # still open: accepted
            except ssl.SSLError as e:
                return _alert(e) or ""
            except OSError:  # reset: closed on us
                return ""
            return "" if data == b"" else None
    except ssl.SSLError as e:  # a server may also reject during the handshake
        return _alert(e)
    except OSError:
        return None


def _refused(server: _Server, alert: str | None) -> CertificateRefusedError:
    details = [f"TLS alert {alert}"] if alert else []
    details += _local_hints(server)
    return CertificateRefusedError(REFUSED + (": " + "; ".join(details) if details else ""))


def _local_hints(server: _Server) -> list[str]:
    """What our own certificate shows that would explain a refusal (expiry, another issuer than --ca)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
        ca_path = server.ca / "ca.crt" if server.ca.is_dir() else server.ca
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except (OSError, ValueError):
        return []
    hints = []
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        hints.append(f"{server.cert} expired at {cert.not_valid_after_utc.isoformat()}")
    elif cert.not_valid_before_utc > now:
        hints.append(f"{server.cert} is valid only from {cert.not_valid_before_utc.isoformat()}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        hints.append(f"{server.cert} is not issued by the CA of {ca_path}, which issued the server's certificate")
    return hints


# --- commands -------------------------------------------------------------------------------------------------
@app.command("predict")
@requires("ohttp", when=lambda args: bool(args.get("ohttp")))
@requires("h3", when=lambda args: bool(args.get("http3")))
def predict(
    url: UrlOpt,
    cert: CertOpt,
    key: KeyOpt,
    ca: CaOpt,
    input: Annotated[Path, typer.Option("--input", help="Input batch (.npy).")],  # noqa: A002 - names --input
    timeout: TimeoutOpt = 30.0,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
    ohttp: Annotated[bool, typer.Option("--ohttp", help="End to end encrypted with Oblivious HTTP (RFC 9458; the "
                                        "ohttp extra): --url is then a relay (`edgeshield relay`) or the server.")
                     ] = False,
    gateway_name: Annotated[str | None, typer.Option("--gateway-name", help="With --ohttp: the server certificate's "
                                                     "CN the signed key configuration must come from.")] = None,
    http3: Annotated[bool, typer.Option("--http3", help="Over HTTP/3 (mutual TLS 1.3 over QUIC; the h3 extra): "
                                        "--url is then https://HOST:UDP-PORT of `serve --http3-port`.")] = False,
) -> None:
    """Send INPUT to /v1/predict and print the predictions (or accept/flag/reject decisions)."""
    import numpy as np

    from edgeshield.bundles._predict import load_npy

    x = load_npy(input)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    if ohttp and http3:
        raise InvalidArgumentError("--ohttp and --http3 are separate transports: give one")
    if ohttp:
        body = _ohttp_predict(url, ca, cert, key, passphrase_env, timeout, buf.getvalue(), gateway_name)
    elif http3:
        body = _h3_predict(url, ca, cert, key, passphrase_env, timeout, buf.getvalue())
    else:
        server = _server(url, ca, cert, key, passphrase_env, timeout)
        body = _call(server, "POST", "/v1/predict", content=buf.getvalue(),
                     headers={"content-type": "application/x-npy"}).json()
    if as_json:
        emit_json(body)
    elif "predictions" in body:
        console.print(f"predictions ({len(body['predictions'])}): {body['predictions']}")
    else:
        console.print(f"decisions: {body['counts']}")
        console.print([d["prediction"] if d["prediction"] is not None else "rejected" for d in body["decisions"]])


def _ohttp_predict(url: str, ca: Path, cert: Path, key: Path, passphrase_env: str | None, timeout: float,
                   npy: bytes, gateway_name: str | None) -> Any:
    """One encapsulated prediction through a relay (or to the gateway itself), its inner answer decoded."""
    import httpx

    from edgeshield.transport import OhttpClient, OhttpRefusedError

    if not url.lower().startswith("https://"):
        raise InvalidArgumentError(f"--url must be an https:// URL, not {url!r}")
    try:
        with OhttpClient(url.rstrip("/"), ca=ca, cert=cert, key=key, timeout_s=timeout, gateway_name=gateway_name,
                         passphrase=keys.passphrase_from_env(passphrase_env)) as client:
            answer = client.request("POST", "/v1/predict", npy, content_type="application/x-npy")
    except OhttpRefusedError as exc:
        raise ServerRefusedError(exc.status, str(exc)) from None
    except httpx.HTTPError as exc:
        raise ConnectionFailedError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    _refuse_unless_ok(answer)
    return answer.json()


def _refuse_unless_ok(answer: Any) -> None:
    """An OHTTP or HTTP/3 answer (``status``, ``json()``, ``body``) that is not a 200, as ServerRefusedError."""
    if answer.status != 200:
        try:
            message = str(answer.json().get("error", ""))
        except ValueError:
            message = answer.body[:200].decode("utf-8", "replace")
        raise ServerRefusedError(answer.status, message)


def _h3_predict(url: str, ca: Path, cert: Path, key: Path, passphrase_env: str | None, timeout: float,
                npy: bytes) -> Any:
    """One prediction over HTTP/3 (``serve --http3-port``), its JSON answer."""
    import json

    from edgeshield.transport._h3client import h3_request

    answer = h3_request(url.rstrip("/") + "/v1/predict", "POST", npy, ca=ca, cert=cert, key=key,
                        passphrase=keys.passphrase_from_env(passphrase_env),
                        headers={"content-type": "application/x-npy"}, timeout_s=timeout)
    _refuse_unless_ok(answer)
    return json.loads(answer.body)


@app.command("model")
def model(
    url: UrlOpt,
    cert: CertOpt,
    key: KeyOpt,
    ca: CaOpt,
    timeout: TimeoutOpt = 30.0,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Describe the model the server serves (GET /v1/model): bundle, version, inputs and outputs."""
    from edgeshield.bundles._modelio import from_metadata, is_reserved
    from edgeshield.cli._bundles import print_model_io

    body = _call(_server(url, ca, cert, key, passphrase_env, timeout), "GET", "/v1/model").json()
    metadata = body.get("metadata") or {}
    model_io = from_metadata(metadata)
    if as_json:
        emit_json(body | {"model_io": None if model_io is None else model_io.to_dict()})
        return
    rows = [(k, str(body[k])) for k in ("bundle_id", "model_sha256", "model_version", "created", "detector")
            if k in body]
    shown = sorted((k, v) for k, v in metadata.items() if not is_reserved(k))
    rows.append(("metadata", "\n".join(f"{k}={v}" for k, v in shown) or "-"))
    console.print(fields(f"model served by {url}", rows))
    print_model_io(model_io)


@app.command("health")
def health(
    url: UrlOpt,
    cert: CertOpt,
    key: KeyOpt,
    ca: CaOpt,
    timeout: TimeoutOpt = 10.0,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check that the server is up and accepts our certificate (GET /healthz); exit 0 when it answers."""
    body = _call(_server(url, ca, cert, key, passphrase_env, timeout), "GET", "/healthz").json()
    if as_json:
        emit_json(body | {"url": url})
        return
    console.print(Text(f"{url}: {body.get('status', body)}"))
