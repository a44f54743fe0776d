"""Binary HTTP and OHTTP messages: round trips for any content, and parsing random or cut bytes raises only the
typed OHTTP errors; the client assertion, the replay window and the key file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("pyhpke")

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield import transport
from edgeshield.errors import KeyFileError
from edgeshield.transport import _ohttp as o

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).map(str.encode)
values = st.binary(max_size=60).filter(lambda v: not any(c in b"\r\n\x00" for c in v))
fields = st.lists(st.tuples(names, values), max_size=8).map(tuple)
PAIR = o.KeyPair.generate(3)


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from([b"GET", b"POST", b"PUT"]), path=st.text(alphabet="abc/?=&0123", max_size=30),
       headers=fields, content=st.binary(max_size=300), trailers=fields, padding=st.integers(0, 8))
def test_request_round_trip(method: bytes, path: str, headers: o.Fields, content: bytes, trailers: o.Fields,
                            padding: int) -> None:
    request = o.BhttpRequest(method, b"/" + path.encode(), authority=b"edge", headers=headers, content=content,
                             trailers=trailers)
    assert o.BhttpRequest.parse(request.encode() + b"\x00" * padding) == request


@settings(max_examples=60, deadline=None)
@given(status=st.integers(200, 599), headers=fields, content=st.binary(max_size=300))
def test_response_round_trip_through_the_encapsulation(status: int, headers: o.Fields, content: bytes) -> None:
    response = o.BhttpResponse(status, headers, content)
    data, sender = o.encapsulate_request(PAIR.config, b"\x00\x03GET\x00\x00\x01/")
    _, receiver = o.decapsulate_request([PAIR], data)
    assert o.BhttpResponse.parse(sender.open_response(receiver.seal_response(response.encode()))) == response


def test_informational_responses_are_skipped_and_bounded() -> None:
    one = o.encode_varint(1) + o.encode_varint(103) + o._section(((b"link", b"</a>"),))
    final = o.encode_varint(204) + o._section(()) + o._vbytes(b"") + o._section(())
    assert o.BhttpResponse.parse(one + final).status == 204
    many = o.encode_varint(1) + (o.encode_varint(100) + o._section(())) * 20 + final
    with pytest.raises(o.OhttpMalformedError):
        o.BhttpResponse.parse(many)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parsing_random_bytes_raises_only_typed_errors(data: bytes) -> None:
    for parse in (o.BhttpRequest.parse, o.BhttpResponse.parse, o.KeyConfig.parse, o.parse_key_configs):
        with contextlib.suppress(o.OhttpError):
            parse(data)
    with contextlib.suppress(o.OhttpError):
        o.decapsulate_request([PAIR], data)


def test_every_truncation_of_a_request_is_typed() -> None:
    request = o.BhttpRequest(b"POST", b"/v1/predict", headers=((b"content-type", b"application/json"),),
                             content=b'{"inputs": [[1, 2]]}', trailers=((b"x", b"y"),))
    encoded = request.encode()
    data, _ = o.encapsulate_request(PAIR.config, encoded)
    parsed: list[o.BhttpRequest | None] = []
    for cut in range(len(encoded)):
        try:  # a cut between sections is a valid truncation (RFC 9292 §3.8); inside one it is malformed
            parsed.append(o.BhttpRequest.parse(encoded[:cut]))
        except o.OhttpMalformedError:
            parsed.append(None)
    kept = [r for r in parsed if r is not None]
    assert kept and None in parsed
    assert all(r.method == b"POST" and r.content in (b"", request.content) for r in kept)
    for cut in range(len(data)):
        with pytest.raises(o.OhttpError):
            o.decapsulate_request([PAIR], data[:cut])
    with pytest.raises(o.OhttpMalformedError):  # not zero padding after the message
        o.BhttpRequest.parse(encoded + b"\x01")


def test_bounds() -> None:
    many = o.BhttpRequest(b"GET", b"/", headers=tuple((b"h%d" % i, b"v") for i in range(65)))
    with pytest.raises(o.OhttpMalformedError, match="fields"):
        o.BhttpRequest.parse(many.encode())
    big = o.BhttpRequest(b"POST", b"/", content=b"x" * 2000)
    with pytest.raises(o.OhttpMalformedError, match="content"):
        o.BhttpRequest.parse(big.encode(), o.BhttpLimits(max_content_bytes=1000))
    data, _ = o.encapsulate_request(PAIR.config, big.encode())
    with pytest.raises(o.OhttpMalformedError):
        o.decapsulate_request([PAIR], data, max_bytes=1000)
    with pytest.raises(o.OhttpMalformedError):
        o.BhttpRequest.parse(o.BhttpRequest(b"GET", b"/", headers=((b"Upper", b"v"),)).encode())
    with pytest.raises(o.OhttpMalformedError):
        o.BhttpRequest.parse(o.BhttpRequest(b"GET", b"/", headers=((b"x", b"a\r\nb"),)).encode())


def test_unknown_key_and_suite() -> None:
    data, _ = o.encapsulate_request(PAIR.config, b"x")
    with pytest.raises(o.OhttpUnknownKeyError):
        o.decapsulate_request([PAIR], bytes([(PAIR.key_id + 1) % 256]) + data[1:])
    with pytest.raises(o.OhttpSuiteError):
        o.decapsulate_request([PAIR], data[:5] + o.AEAD_AES_256_GCM.to_bytes(2, "big") + data[7:])
    with pytest.raises(o.OhttpSuiteError):
        o.RequestSender(PAIR.config, (o.KDF_HKDF_SHA256, o.AEAD_AES_256_GCM))
    with pytest.raises(o.OhttpSuiteError):
        o.KeyConfig.parse(b"\x01\x00\x10" + bytes(65) + b"\x00\x04\x00\x01\x00\x01")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    ca = tmp_path_factory.mktemp("ohttp-pki") / "ca"
    transport.init_ca(ca)
    other = ca.parent / "other"
    transport.init_ca(other)
    return {"ca": ca, "alice": transport.issue(ca, name="alice", role="client"),
            "server": transport.issue(ca, name="edge", role="server", server=True, sans=["127.0.0.1"]),
            "foreign": transport.issue(other, name="alice", role="client")}


def _der(cert: transport.IssuedCert) -> bytes:
    return o.x509.load_pem_x509_certificate(cert.cert_path.read_bytes()).public_bytes(o.serialization.Encoding.DER)


def test_the_assertion_binds_this_encapsulation(pki: dict[str, object]) -> None:
    alice, foreign, server = pki["alice"], pki["foreign"], pki["server"]
    assert isinstance(alice, transport.IssuedCert) and isinstance(foreign, transport.IssuedCert)
    assert isinstance(server, transport.IssuedCert)
    cas = o.load_cas(pki["ca"])  # type: ignore[arg-type]
    sender = o.RequestSender(PAIR.config)
    request = o.signed_request(sender, "POST", "/v1/predict", b"{}", cert_der=_der(alice),
                               key=o.load_signing_key(alice.key_path))
    identity, ts = o.verify_assertion(request, sender.enc, cas)
    assert identity.name == "alice" and identity.role == "client" and abs(ts / 1000 - time.time()) < 60
    with pytest.raises(o.OhttpIdentityError):  # another encapsulation
        o.verify_assertion(request, o.RequestSender(PAIR.config).enc, cas)
    with pytest.raises(o.OhttpIdentityError):  # another path under the same signature
        o.verify_assertion(o.BhttpRequest(b"POST", b"/v1/admin/reload", headers=request.headers,
                                          content=request.content), sender.enc, cas)
    forged = o.signed_request(sender, "POST", "/v1/predict", b"{}", cert_der=_der(foreign),
                              key=o.load_signing_key(foreign.key_path))
    with pytest.raises(o.OhttpIdentityError, match="CA"):  # a foreign CA's "alice"
        o.verify_assertion(forged, sender.enc, cas)
    as_server = o.signed_request(sender, "POST", "/v1/predict", b"{}", cert_der=_der(server),
                                 key=o.load_signing_key(server.key_path))
    with pytest.raises(o.OhttpIdentityError, match="purpose"):  # a serverAuth certificate is not a client's
        o.verify_assertion(as_server, sender.enc, cas)


def test_replay_window() -> None:
    guard = o.ReplayGuard(window_s=30, skew_s=2, max_entries=3, started=1000.0)
    guard.check(b"a", 1000_500, now=1001.0)
    with pytest.raises(o.OhttpReplayError):
        guard.check(b"a", 1000_500, now=1001.5)
    with pytest.raises(o.OhttpIdentityError):  # from before the gateway started: a restart reopens nothing
        guard.check(b"b", 999_000, now=1001.0)
    with pytest.raises(o.OhttpIdentityError):  # in the future
        guard.check(b"c", 1010_000, now=1001.0)
    with pytest.raises(o.OhttpIdentityError):  # too old
        guard.check(b"d", 1010_000, now=1050.0)
    guard.check(b"e", 1049_000, now=1050.0)  # "a" has aged out of memory and of the window alike
    assert len(guard) == 1
    guard.check(b"f", 1049_000, now=1050.0)
    guard.check(b"g", 1049_000, now=1050.0)
    with pytest.raises(o.OhttpError, match="full"):
        guard.check(b"h", 1049_000, now=1050.0)


def test_key_file(tmp_path: Path) -> None:
    path = tmp_path / "ohttp.key"
    pair = o.KeyPair.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert o.KeyPair.load_or_create(path).config == pair.config
    path.write_text("{}")
    with pytest.raises(KeyFileError):
        o.KeyPair.load(path)


def test_serve_config_checks_the_ohttp_options(tmp_path: Path) -> None:
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.server import ServeConfig

    base = {"bundle": tmp_path / "b", "owner_key": tmp_path / "o", "device_key": tmp_path / "d", "ca": tmp_path,
            "cert": tmp_path / "c", "key": tmp_path / "k", "audit_db": tmp_path / "a", "audit_key": tmp_path / "ak"}
    assert ServeConfig(**base, ohttp=True, ohttp_key=tmp_path / "g").ohttp_window_s == 30.0
    with pytest.raises(InvalidArgumentError, match="--ohttp-key is for --ohttp"):
        ServeConfig(**base, ohttp_key=tmp_path / "g")
    with pytest.raises(InvalidArgumentError, match="--ohttp-window"):
        ServeConfig(**base, ohttp=True, ohttp_window_s=0)
