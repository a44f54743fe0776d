"""Fuzzing the release server over real mutual TLS: raw bytes, random JSON and mutated real requests on every
endpoint. Every answer is a 4xx with a JSON object body: never a 5xx, never a connection dropped unanswered.

Also the released-key file parser: whatever bytes it is given, a ``ReleasedKeyFile`` or a typed error.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgeshield.hardware._attest as at
import edgeshield.hardware._release as rel
from edgeshield import bundles, keys, transport
from edgeshield.audit import AuditLog
from edgeshield.errors import InputError
from edgeshield.hardware._swtpm import SoftwareTPM
from edgeshield.monitor import EventStream, SecurityEvent

ENDPOINTS = ["/v1/nonce", "/v1/enrol/begin", "/v1/enrol/finish", "/v1/release"]
FIELDS = ["bundle_id", "nonce", "quote", "release_public", "certify_attest", "certify_signature", "floor",
          "ek_public", "ek_certificate", "ak_public", "challenge_id", "secret"]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
    | st.binary(max_size=48).map(rel._b64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


class Collect:
    durable = False

    def __init__(self) -> None:
        self.kinds: set[str] = set()

    def handle(self, event: SecurityEvent) -> None:
        self.kinds.add(event.kind)


class Target:
    def __init__(self, server: rel.ReleaseServer, context: ssl.SSLContext, real: dict[str, Any]) -> None:
        self.server, self.context, self.real = server, context, real

    def send(self, raw: bytes) -> tuple[int, Any]:
        """Send raw bytes on a fresh mTLS connection; return the status and the JSON body of the answer."""
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=15) as sock, \
                self.context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(raw)
            resp = http.client.HTTPResponse(tls, method="POST")
            resp.begin()  # raises if the server closed without an answer
            status, body = resp.status, resp.read()
        assert resp.getheader("Content-Type") == "application/json"
        return status, json.loads(body)

    def post(self, path: str, body: bytes) -> tuple[int, Any]:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return self.send(head.encode() + body)


def refused(answer: tuple[int, Any], ok: bool = False) -> None:
    """A 4xx (or, with ``ok``, a 200: a mutation that left a valid request) with a JSON object body."""
    status, body = answer
    if ok and status == 200:
        assert isinstance(body, dict), answer
        return
    assert 400 <= status < 500, answer
    assert isinstance(body, dict) and isinstance(body.get("error"), str), answer


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, swtpm_ek: SoftwareTPM) -> Iterator[Target]:
    from edgeshield.models import digits_model_path

    tmp = tmp_path_factory.mktemp("fuzz")
    ca = tmp / "ca"
    transport.init_ca(ca)
    srv = transport.issue(ca, name="keyrelease", role="operator", server=True, sans=["127.0.0.1"])
    cli = transport.issue(ca, name="fuzzer", role="client")
    keys.init_keys(tmp / "keys")
    owner = keys.load_owner_private_key(tmp / "keys" / "owner.key")
    bundle = tmp / "digits.esb"
    manifest = bundles.protect(digits_model_path(), bundle, signing_key=owner,
                               recipients=[keys.load_device_public_key(tmp / "keys" / "device.pub")])
    with at.DeviceTpm(swtpm_ek.tcti) as d:
        policy = at.PcrPolicy(d.pcr_values([0, 7]))
        dk = d.create_keys()
        ek, cert = d.endorsement()
    events = Collect()
    with rel.ReleaseStore(tmp / "release.db") as store, AuditLog(tmp / "audit.db") as audit:
        service = rel.ReleaseService(
            store=store, recipient_key=keys.load_device_private_key(tmp / "keys" / "device.key"),
            owner_key=owner.public_key(), bundles={manifest.bundle_id: bundle},
            trust=at.EkTrust.load(swtpm_ek.ek_ca_certs()), policy=policy, audit=audit, events=EventStream([events]),
            licences={manifest.bundle_id: rel.Licence(manifest.bundle_id, max_devices=5)})
        server = rel.ReleaseServer(service, transport.server_context(ca, srv.cert_path, srv.key_path))
        server.start()
        context = transport.client_context(ca, cli.cert_path, cli.key_path)
        client = rel.ReleaseClient("127.0.0.1", server.port, context)
        with at.DeviceTpm(swtpm_ek.tcti) as d:
            client.enrol(d, dk)  # an enrolled device, so mutated requests get past the first checks
            nonce = rel._unb64(client.call("/v1/nonce", {}), "nonce")
            q = d.quote(dk, nonce, [0, 7])
            attest, sig = d.certify_release_key(dk, nonce)
        real = {"bundle_id": manifest.bundle_id, "nonce": rel._b64(nonce), "quote": q.to_dict(),
                "release_public": rel._b64(dk.release_public), "certify_attest": rel._b64(attest),
                "certify_signature": rel._b64(sig), "ek_public": rel._b64(ek),
                "ek_certificate": rel._b64(cert or b""), "ak_public": rel._b64(dk.ak_public)}
        try:
            yield Target(server, context, real)
        finally:
            server.stop()
        assert events.kinds <= {"attestation.enrolled", "attestation.failed"}, events.kinds  # never a release


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), body=st.binary(min_size=1, max_size=2048))
def test_raw_bytes_bodies(target: Target, path: str, body: bytes) -> None:
    status, answer = target.post(path, body)
    if path == "/v1/nonce" and status == 200:  # any JSON object asks for a nonce
        return
    refused((status, answer))


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), body=json_values)
def test_random_json_bodies(target: Target, path: str, body: Any) -> None:
    status, answer = target.post(path, json.dumps(body).encode())
    if path == "/v1/nonce" and status == 200 and isinstance(body, dict):
        return
    refused((status, answer))


@FUZZ
@given(path=st.sampled_from(ENDPOINTS[1:]), keep=st.sets(st.sampled_from(FIELDS)),
       changes=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3))
def test_mutated_real_requests(target: Target, path: str, keep: set[str], changes: dict[str, Any]) -> None:
    body = {k: v for k, v in target.real.items() if k in keep} | changes
    if "nonce" in keep and "nonce" not in changes:  # a fresh nonce gets past the replay check to the quote's
        _, fresh = target.post("/v1/nonce", b"{}")
        body["nonce"] = fresh["nonce"]
    refused(target.post(path, json.dumps(body).encode()), ok=path == "/v1/enrol/begin")  # the real EK and AK


@pytest.mark.parametrize("raw", [
    b"GET /v1/nonce HTTP/1.1\r\nHost: x\r\n\r\n",
    b"DELETE /v1/release HTTP/1.1\r\nHost: x\r\n\r\n",
    b"BREW /pot HTTP/1.1\r\n\r\n",
    b"POST /v1/nonce HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/nonce HTTP/1.1\r\nContent-Length: many\r\n\r\n",
    b"POST /v1/nonce HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
    b"POST /v1/nonce HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/nonce HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/release HTTP/1.1\r\nContent-Length: 40000\r\n\r\n" + b"[" * 40000,
    b"POST /v1/release HTTP/1.1\r\nContent-Length: 30\r\n\r\n" + b'{"quote": {"pcrs": {"\xc2\xb2": 1}}}'[:30],
    b"POST /v1/nowhere HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"\x16\x03garbage\r\n\r\n",
    b"POST /v1/nonce HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
    b"POST /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
])
def test_malformed_http(target: Target, raw: bytes) -> None:
    refused(target.send(raw))


def test_a_body_shorter_than_its_length_is_answered(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rel, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(rel._Handler, "timeout", 0.5)
    refused(target.send(b"POST /v1/nonce HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}"))


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(st.binary(max_size=600), json_values.map(lambda v: json.dumps(v).encode()),
                      st.dictionaries(st.sampled_from(["format", "version", "bundle_id", "recipient_key_id", "nonce",
                                                       "wrapped", "licence"]), json_values)
                      .map(lambda d: json.dumps({"format": rel.RELEASED_KEY_FORMAT, "version": 1} | d).encode())))
def test_released_key_file_parser(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("rk") / "key.json"
    path.write_bytes(data)
    try:
        got = rel.ReleasedKeyFile.load(path)
    except InputError:
        return  # typed: NotAReleasedKeyFileError (any other exception fails the test)
    assert rel.ReleasedKeyFile.from_dict(got.to_dict()) == got


def test_a_good_released_key_file_round_trips(tmp_path: Path) -> None:
    file = rel.ReleasedKeyFile("ab" * 16, "k1", b"n" * 32, b"w" * 256,
                               {"bundle_id": "ab" * 16, "not_after": "2030-01-01T00:00:00+00:00",
                                "tpm_clock_at_release": 5, "tpm_clock_not_after": 9})
    file.save(tmp_path / "k.json")
    assert rel.ReleasedKeyFile.load(tmp_path / "k.json") == file
    assert (tmp_path / "k.json").stat().st_mode & 0o777 == 0o600
