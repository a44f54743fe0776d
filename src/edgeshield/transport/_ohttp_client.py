"""An Oblivious HTTP client for the EdgeShield gateway, directly or through any relay (``edgeshield relay``).

``OhttpClient(url, ca=..., cert=..., key=...)``: ``url`` is the relay (or the server itself); the TLS connection is
mutual TLS 1.3 to it with the client's certificate. The key configuration is fetched through the same URL and
checked against the CA (signed by a serverAuth certificate the CA issued, optionally of a given name), so a relay
cannot substitute its own key; each request is signed with the client's key over its own encapsulation.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeshield._io import check_readable_file
from edgeshield.transport._ohttp import (
    GATEWAY_CERT_HEADER,
    KEYS_SIGNATURE_HEADER,
    KEYS_TYPE,
    REQUEST_TYPE,
    RESPONSE_TYPE,
    BhttpResponse,
    KeyConfig,
    OhttpError,
    OhttpKeyConfigError,
    RequestSender,
    load_cas,
    load_signing_key,
    signed_request,
    verify_key_configs,
)

PathLike = str | os.PathLike[str]
GATEWAY_PATH = "/.well-known/ohttp-gateway"


class OhttpRefusedError(OhttpError):
    """The gateway (or the relay) refused the encapsulated request in the clear: ``status`` and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True)
class OhttpAnswer:
    """The inner answer: status, headers and body, as the server's app gave them."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class OhttpClient:
    """Fetch-and-verify the gateway's key configuration, then send encapsulated, signed requests."""

    def __init__(self, url: str, *, ca: PathLike, cert: PathLike, key: PathLike, passphrase: bytes | None = None,
                 gateway_name: str | None = None, timeout_s: float = 10.0) -> None:
        import httpx

        from edgeshield.transport._tls import client_context

        self.cas = load_cas(ca)
        pem = check_readable_file(cert, what="certificate").read_bytes()
        self.cert_der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        self.key = load_signing_key(key, passphrase)
        self.gateway_name = gateway_name
        self.http = httpx.Client(base_url=url, verify=client_context(ca, cert, key, passphrase=passphrase),
                                 timeout=timeout_s)
        self._config: KeyConfig | None = None

    def __enter__(self) -> OhttpClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def key_config(self) -> KeyConfig:
        """The gateway's first key configuration, verified against the CA (fetched once)."""
        if self._config is None:
            r = self.http.get(GATEWAY_PATH, headers={"accept": KEYS_TYPE})
            if r.status_code != 200:
                raise OhttpRefusedError(r.status_code, r.text[:200])
            try:
                sig = base64.b64decode(r.headers.get(KEYS_SIGNATURE_HEADER, ""), validate=True)
                cert = base64.b64decode(r.headers.get(GATEWAY_CERT_HEADER, ""), validate=True)
            except ValueError:
                raise OhttpKeyConfigError("the key configuration's signature headers are not base64") from None
            self._config = verify_key_configs(r.content, sig, cert, self.cas, gateway_name=self.gateway_name)[0]
        return self._config

    def encapsulate(self, method: str, path: str, body: bytes = b"", *, content_type: str = "application/json",
                    suite: tuple[int, int] | None = None) -> tuple[bytes, RequestSender]:
        """(the encapsulated, signed request, the context that opens its answer): for tests and the benchmark."""
        sender = RequestSender(self.key_config(), suite)
        inner = signed_request(sender, method, path, body, cert_der=self.cert_der, key=self.key,
                               content_type=content_type)
        return sender.seal(inner.encode()), sender

    def send(self, data: bytes) -> bytes:
        """POST one encapsulated request; the encapsulated answer, or OhttpRefusedError."""
        r = self.http.post(GATEWAY_PATH, content=data, headers={"content-type": REQUEST_TYPE})
        if r.status_code != 200 or r.headers.get("content-type", "").split(";")[0] != RESPONSE_TYPE:
            raise OhttpRefusedError(r.status_code, r.text[:300])
        return r.content

    def request(self, method: str, path: str, body: bytes = b"", *,
                content_type: str = "application/json") -> OhttpAnswer:
        data, sender = self.encapsulate(method, path, body, content_type=content_type)
        inner = BhttpResponse.parse(sender.open_response(self.send(data)))
        return OhttpAnswer(inner.status, {n.decode(): v.decode("latin-1") for n, v in inner.headers}, inner.content)

    def predict(self, inputs: Any) -> OhttpAnswer:
        """``POST /v1/predict {"inputs": ...}`` end to end encrypted."""
        return self.request("POST", "/v1/predict", json.dumps({"inputs": inputs}).encode())


def ohttp_predict(relay_url: str, inputs: Any, *, ca: PathLike, cert: PathLike, key: PathLike,
                  passphrase: bytes | None = None, gateway_name: str | None = None) -> dict[str, Any]:
    """One full OHTTP prediction through ``relay_url``: the decoded answer (raises on a refusal)."""
    with OhttpClient(relay_url, ca=ca, cert=cert, key=key, passphrase=passphrase, gateway_name=gateway_name) as c:
        answer = c.predict(inputs)
    if answer.status != 200:
        raise OhttpRefusedError(answer.status, answer.body.decode("utf-8", "replace")[:300])
    out: dict[str, Any] = answer.json()
    return out


__all__ = ["OhttpAnswer", "OhttpClient", "OhttpRefusedError", "ohttp_predict"]
