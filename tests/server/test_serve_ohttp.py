"""Oblivious HTTP end to end: a real server (``serve --ohttp``), a real relay between it and the client, mutual TLS
1.3 on both hops — what the relay sees, replays, bad encapsulations, relay impersonation, revocation, and that the
inner identity is the one RBAC and the audit log see."""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import pytest

pytest.importorskip("pyhpke")

from edgeshield import audit, transport
from edgeshield.models import load_digits_split
from edgeshield.server import ServeConfig
from edgeshield.transport import _ohttp as o
from edgeshield.transport._ohttp_client import OhttpClient, OhttpRefusedError
from edgeshield.transport._relay import RelayConfig, running_relay

from _serving import mtls_client, protected_digits, serving


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("ohttp")
    bundle, k = protected_digits(root)
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    relay_server = transport.issue(ca, name="relay-1-tls", role="relay", server=True, sans=["127.0.0.1"])
    certs = {n: transport.issue(ca, name=n, role=r) for n, r in
             (("alice", "client"), ("bob", "client"), ("relay-1", "relay"))}
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, max_body_bytes=64 * 1024, crl_poll_s=0.1,
                      ohttp=True, ohttp_key=root / "ohttp.key", audit_durability="normal")
    with serving(cfg) as (_srv, _watcher, port):
        rcfg = RelayConfig(gateway_url=f"https://127.0.0.1:{port}", ca=ca, cert=relay_server.cert_path,
                           key=relay_server.key_path, client_cert=certs["relay-1"].cert_path,
                           client_key=certs["relay-1"].key_path, port=0, record=root / "relay.jsonl")
        with running_relay(rcfg) as (relay, relay_port):
            yield {"root": root, "ca": ca, "certs": certs, "port": port, "url": f"https://127.0.0.1:{port}",
                   "relay": relay, "relay_url": f"https://127.0.0.1:{relay_port}"}


def ohttp(world: Any, name: str = "alice") -> OhttpClient:
    cert = world["certs"][name]
    return OhttpClient(world["relay_url"], ca=world["ca"], cert=cert.cert_path, key=cert.key_path,
                       gateway_name="edge-1")


def entries(world: Any) -> list[Any]:
    return list(audit.AuditLog(world["root"] / "audit.db", readonly=True).entries())


def refusal(c: OhttpClient, data: bytes) -> int:
    with pytest.raises(OhttpRefusedError) as info:
        c.send(data)
    return info.value.status


def test_the_key_file_is_private(world: Any) -> None:
    assert (world["root"] / "ohttp.key").stat().st_mode & 0o777 == 0o600


def test_prediction_through_the_relay_matches_the_direct_one_and_the_relay_sees_only_ciphertext(world: Any) -> None:
    x = load_digits_split().x_test[:4].tolist()
    with mtls_client(world, "alice") as direct:
        want = direct.post("/v1/predict", json={"inputs": x})
    assert want.status_code == 200, want.text
    world["relay"].seen.clear()
    with ohttp(world) as c:
        got = c.predict(x)
    assert got.status == 200, got.body
    assert got.json()["predictions"] == want.json()["predictions"]
    seen = list(world["relay"].seen)
    assert [s.direction for s in seen] == ["request", "response"]
    inputs_json = json.dumps({"inputs": x}).encode()
    needles = [inputs_json, inputs_json[:40], got.body, got.body[:24], json.dumps(x[0][:8]).encode()[1:-1],
               b"predictions", b"inputs", b"alice", b"/v1/predict"]
    for s in seen:
        for needle in needles:
            assert needle not in s.data
    record = [json.loads(line) for line in (world["root"] / "relay.jsonl").read_text().splitlines()]
    assert record and all(set(r) >= {"bytes", "sha256", "prefix_hex"} for r in record)


def test_the_inner_identity_is_what_the_audit_log_and_rbac_see(world: Any) -> None:
    x = load_digits_split().x_test[:1].tolist()
    with ohttp(world, "bob") as c:
        assert c.predict(x).status == 200
    last = [e for e in entries(world) if e.kind == "inference.predict"][-1]
    assert last.actor == "bob"
    # the relay's own certificate as the inner identity: a valid assertion, but the relay role may not predict
    with ohttp(world, "relay-1") as c:
        answer = c.predict(x)
    assert answer.status == 403
    forbidden = [e for e in entries(world) if e.kind == "auth.forbidden"][-1]
    assert forbidden.actor == "relay-1"


def test_a_replayed_encapsulation_is_refused_every_time(world: Any) -> None:
    body = json.dumps({"inputs": load_digits_split().x_test[:1].tolist()}).encode()
    with ohttp(world) as c:
        data, sender = c.encapsulate("POST", "/v1/predict", body)
        first = o.BhttpResponse.parse(sender.open_response(c.send(data)))
        assert first.status == 200
        statuses = []
        for _ in range(5):
            try:
                c.send(data)
                statuses.append(200)
            except OhttpRefusedError as exc:
                statuses.append(exc.status)
    assert statuses == [409] * 5  # replays accepted: 0
    replays = [e for e in entries(world) if e.data.get("transport") == "ohttp"
               and e.data["reason"].startswith("OhttpReplayError")]
    assert len(replays) == 5 and all(e.kind == "input.rejected" and e.actor == "relay-1" for e in replays)
    assert replays[0].data["input_sha256"] == o.hashlib.sha256(data).hexdigest()  # the relay's record says the same


def test_bad_encapsulations_are_4xx_and_audited(world: Any) -> None:
    body = json.dumps({"inputs": load_digits_split().x_test[:1].tolist()}).encode()
    with ohttp(world) as c:
        data, _ = c.encapsulate("POST", "/v1/predict", body)
        before = len([e for e in entries(world) if e.data.get("transport") == "ohttp"])
        tampered = data[:-1] + bytes([data[-1] ^ 1])
        unknown = bytes([(data[0] + 1) % 256]) + data[1:]
        wrong_suite = data[:5] + struct.pack(">H", o.AEAD_AES_256_GCM) + data[7:]
        cases = {"tampered": tampered, "truncated": data[:40], "empty": b"", "unknown key id": unknown,
                 "wrong suite": wrong_suite, "garbage": b"\x00" * 200}
        statuses = {name: refusal(c, bad) for name, bad in cases.items()}
        assert all(400 <= s < 500 for s in statuses.values()), statuses
        assert refusal(c, b"\x01" * (200 * 1024)) == 413
    after = [e for e in entries(world) if e.data.get("transport") == "ohttp"]
    assert len(after) - before == len(cases) + 1
    assert all(e.actor == "relay-1" for e in after[before:])  # the outer identity refused: the relay's
    assert {e.kind for e in after[before:]} == {"input.rejected", "request.too_large"}


def test_the_relay_cannot_impersonate_a_client(world: Any) -> None:
    alice, relay = world["certs"]["alice"], world["certs"]["relay-1"]
    alice_der = o.x509.load_pem_x509_certificate(alice.cert_path.read_bytes()).public_bytes(
        o.serialization.Encoding.DER)
    relay_key = o.load_signing_key(relay.key_path)
    alice_key = o.load_signing_key(alice.key_path)
    body = json.dumps({"inputs": load_digits_split().x_test[:1].tolist()}).encode()
    with ohttp(world, "relay-1") as c:
        config = c.key_config()
        # alice's certificate, signed with the relay's key
        sender = o.RequestSender(config)
        forged = o.signed_request(sender, "POST", "/v1/predict", body, cert_der=alice_der, key=relay_key)
        assert refusal(c, sender.seal(forged.encode())) == 401
        # no assertion at all
        sender = o.RequestSender(config)
        bare = o.BhttpRequest(b"POST", b"/v1/predict", headers=((b"content-type", b"application/json"),),
                              content=body)
        assert refusal(c, sender.seal(bare.encode())) == 401
        # a genuine assertion of alice's (e.g. leaked from one request) moved into another encapsulation
        captured_for = o.RequestSender(config)
        genuine = o.signed_request(captured_for, "POST", "/v1/predict", body, cert_der=alice_der, key=alice_key)
        rewrapped = o.RequestSender(config)
        assert refusal(c, rewrapped.seal(genuine.encode())) == 401
        # ... or with another body under the same signature
        other = o.BhttpRequest(genuine.method, genuine.path, headers=genuine.headers, content=body.replace(b"0", b"1"))
        assert refusal(c, captured_for.seal(other.encode())) == 401
        # a stale assertion (before the gateway started)
        sender = o.RequestSender(config)
        stale = o.signed_request(sender, "POST", "/v1/predict", body, cert_der=alice_der, key=alice_key,
                                 now_ms=int((time.time() - 3600) * 1000))
        assert refusal(c, sender.seal(stale.encode())) == 401


def test_a_substituted_key_configuration_is_refused_by_the_client(world: Any) -> None:
    with ohttp(world) as c:
        r = c.http.get("/.well-known/ohttp-gateway")
    assert r.status_code == 200 and r.headers["content-type"] == o.KEYS_TYPE
    sig = o.base64.b64decode(r.headers[o.KEYS_SIGNATURE_HEADER])
    cert = o.base64.b64decode(r.headers[o.GATEWAY_CERT_HEADER])
    assert o.verify_key_configs(r.content, sig, cert, o.load_cas(world["ca"]), gateway_name="edge-1")
    mine = o.encode_key_configs([o.KeyPair.generate(1).config])
    with pytest.raises(o.OhttpKeyConfigError):
        o.verify_key_configs(mine, sig, cert, o.load_cas(world["ca"]))
    with pytest.raises(o.OhttpKeyConfigError):  # the right keys, but pinned to another gateway name
        o.verify_key_configs(r.content, sig, cert, o.load_cas(world["ca"]), gateway_name="edge-2")


def test_the_relay_refuses_what_is_not_ohttp(world: Any) -> None:
    with mtls_client({**world, "url": world["relay_url"]}, "alice") as c:
        assert c.get("/v1/model").status_code == 404
        assert c.post("/v1/predict", json={"inputs": []}).status_code == 415
        assert c.delete("/.well-known/ohttp-gateway").status_code == 405


def test_a_revoked_inner_client_is_refused(world: Any) -> None:
    x = load_digits_split().x_test[:1].tolist()
    cert = transport.issue(world["ca"], name="carol", role="client")
    world["certs"]["carol"] = cert
    with ohttp(world, "carol") as c:
        assert c.predict(x).status == 200
        transport.revoke(world["ca"], name="carol")
        deadline = time.monotonic() + 10
        status = 200
        while time.monotonic() < deadline:  # the server's CRL watcher polls every 0.1 s
            try:
                c.predict(x)
            except OhttpRefusedError as exc:
                status = exc.status
                break
            time.sleep(0.1)
    assert status == 401


def test_client_predict_ohttp_cli_through_the_relay(world: Any, tmp_path: Any) -> None:
    import numpy as np
    from typer.testing import CliRunner

    from edgeshield.cli import app

    x = load_digits_split().x_test[:3]
    np.save(tmp_path / "x.npy", x)
    alice = world["certs"]["alice"]
    common = ["--cert", str(alice.cert_path), "--key", str(alice.key_path), "--ca", str(world["ca"] / "ca.crt"),
              "--input", str(tmp_path / "x.npy"), "--json"]
    via = CliRunner().invoke(app, ["client", "predict", "--ohttp", "--gateway-name", "edge-1",
                                   "--url", world["relay_url"], *common])
    direct = CliRunner().invoke(app, ["client", "predict", "--url", world["url"], *common])
    assert via.exit_code == 0 and direct.exit_code == 0, (via.output, direct.output)
    assert json.loads(via.stdout)["predictions"] == json.loads(direct.stdout)["predictions"]
    wrong = CliRunner().invoke(app, ["client", "predict", "--ohttp", "--gateway-name", "edge-9",
                                     "--url", world["relay_url"], *common])
    assert isinstance(wrong.exception, o.OhttpKeyConfigError)  # main() prints it and exits 3


def test_predict_through_returns_the_answer_and_what_the_relay_forwarded(world: Any) -> None:
    alice = world["certs"]["alice"]
    x = load_digits_split().x_test[:2].tolist()
    answer, seen = transport.predict_through(world["relay"], world["relay_url"], x, ca=world["ca"],
                                             cert=alice.cert_path, key=alice.key_path, gateway_name="edge-1")
    assert len(answer["predictions"]) == 2
    assert [s.direction for s in seen] == ["request", "response"]
    assert all(json.dumps(answer["predictions"]).encode() not in s.data for s in seen)


def test_identity_refusals_never_charge_the_relays_certificate(world: Any) -> None:
    """A client's forged assertion is input.rejected (401) under the relay's name, never an auth.failure of the
    relay's certificate: the default pack's certificate_misuse rule (10 auth.failure of one serial in 60 s → deny
    the certificate) must not cut a relay off for what one client sent. A revoked inner client's verified request
    is an auth.failure of that client's own certificate."""
    alice, relay = world["certs"]["alice"], world["certs"]["relay-1"]
    alice_der = o.x509.load_pem_x509_certificate(alice.cert_path.read_bytes()).public_bytes(
        o.serialization.Encoding.DER)
    body = b'{"inputs": []}'
    with ohttp(world) as c:
        for _ in range(12):
            sender = o.RequestSender(c.key_config())
            forged = o.signed_request(sender, "POST", "/v1/predict", body, cert_der=alice_der,
                                      key=o.load_signing_key(relay.key_path))
            assert refusal(c, sender.seal(forged.encode())) == 401
        assert c.predict(load_digits_split().x_test[:1].tolist()).status == 200  # the relay still serves
    mine = [e for e in entries(world) if e.data.get("transport") == "ohttp" and e.data["status"] == 401]
    forged_entries = [e for e in mine if e.kind == "input.rejected"]
    assert len(forged_entries) >= 12 and all(e.actor == "relay-1" for e in forged_entries)
    revoked = [e for e in mine if e.kind == "auth.failure"]
    assert revoked and all(e.actor == "carol" and e.data["relay"] == "relay-1" for e in revoked)


def test_random_bodies_to_the_gateway_are_4xx_never_5xx(world: Any) -> None:
    import os

    with ohttp(world) as c:
        config = c.key_config().encode()
        statuses = set()
        for size in (0, 1, 7, 38, 39, 55, 56, 200, 1000):
            for prefix in (b"", config[:1] + b"\x00\x20\x00\x01\x00\x01"):  # random, and under our key id/suite
                body = prefix + os.urandom(size)
                statuses.add(refusal(c, body))
    assert statuses and all(400 <= s < 500 for s in statuses), statuses


def test_ohttp_straight_to_the_gateway_without_a_relay(world: Any) -> None:
    alice = world["certs"]["alice"]
    with OhttpClient(world["url"], ca=world["ca"], cert=alice.cert_path, key=alice.key_path,
                     gateway_name="edge-1") as c:
        answer = c.predict(load_digits_split().x_test[:1].tolist())
        assert answer.status == 200
        # and on /v1/predict itself, with the OHTTP media type
        data, sender = c.encapsulate("GET", "/v1/model")
        r = c.http.post("/v1/predict", content=data, headers={"content-type": o.REQUEST_TYPE})
        assert r.status_code == 200 and r.headers["content-type"] == o.RESPONSE_TYPE
        inner = o.BhttpResponse.parse(sender.open_response(r.content))
        assert inner.status == 200 and b"bundle_id" in inner.content


def test_the_relay_command_as_a_process(world: Any, tmp_path: Any) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tls = transport.issue(world["ca"], name="relay-2-tls", role="relay", server=True, sans=["127.0.0.1"])
    relay = world["certs"]["relay-1"]
    record = tmp_path / "seen.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "edgeshield", "relay", "--gateway", world["url"], "--ca",
                             str(world["ca"]), "--cert", str(tls.cert_path), "--key", str(tls.key_path),
                             "--client-cert", str(relay.cert_path), "--client-key", str(relay.key_path),
                             "--port", str(port), "--record", str(record)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        x = load_digits_split().x_test[:1].tolist()
        alice = world["certs"]["alice"]
        with OhttpClient(f"https://127.0.0.1:{port}", ca=world["ca"], cert=alice.cert_path, key=alice.key_path,
                         gateway_name="edge-1") as c:
            assert c.predict(x).status == 200
        lines = [json.loads(line) for line in record.read_text().splitlines()]
        assert [r["direction"] for r in lines] == ["request", "response"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
