"""The C2SP witness: its checks against published vectors, its HTTPS service over TLS 1.3, and the device's side
(publish, verify --against, verify --witness) end to end, including a rewritten and a cut-back log."""

from __future__ import annotations

import base64
import json
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshield import audit, transport
from edgeshield.audit._witness import WitnessStoreError, format_add_checkpoint, parse_add_checkpoint
from edgeshield.errors import (
    AuditNotExtendedError,
    ConnectionFailedError,
    InputError,
    MalformedNoteError,
    NoteSignatureError,
)

from _auditlogs import tamper_module

tamper = tamper_module()

# transparency-dev/witness witness/witness_test.go: a log key, two checkpoints it signed (sizes 5 and 8), the
# RFC 6962 consistency proof between them, and a witness key.
M_VKEY = "monkeys+db4d9f7e+AULaJMvTtDLHPUcUrjdDad9vDlh/PTfC2VV60JUtCfWT"
W_SKEY = "PRIVATE+KEY+witness+f13a86db+AaLa/dfyBhyo/m0Z7WCi98ENVZWtrP8pxgRNrx7tIWiA"
M_INIT = ("monkeys\n5\n41smjBUiAU70EtKlT6lIOIYtRTYxYXsDB+XHfcvu/BE=\n\n"
          "— monkeys 202fftzGl3LVoqjXfwCFZZXs8I+5G22+Ek2K0AOyBuSJ/8/CZawNF+6fNlTKOCd622pbzJNkkJFWuw9DbicZCkEx9AY=\n")
M_NEXT = ("monkeys\n8\nV8K9aklZ4EPB+RMOk1/8VsJUdFZR77GDtZUQq84vSbo=\n\n"
          "— monkeys 202ffoUEboiQYpHzICeaFmoy3RNviHTpAxYrq/eO4QQVQMvu9UebKBMX2MJC76NLthZaKsnKbCA8GxrjePZhvDCH7Ag=\n")
CONS_PROOF = [bytes.fromhex(h) for h in (
    "b9e1d62618f7fee8034e4c5010f727ab24d8e4705cb296c374bf2025a87a10d2",
    "aac66cd7a79ce4012d80762fe8eec3a77f22d1ca4145c3f4cee022e7efcd599d",
    "89d0f753f66a290c483b39cd5e9eafb12021293395fad3d4a2ad053cfbcfdc9e",
    "29e40bb79c966f4c6fe96aff6f30acfce5f3e8d84c02215175d6e018a5dee833")]

# c2sp.org/tlog-witness, the example add-checkpoint request body, verbatim.
SPEC_REQUEST = (
    "old 20852014\n"
    "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"
    "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=\n"
    "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=\n"
    "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=\n"
    "\n"
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE"
    "+xeMcTOAYQ8=\n"
    "— example.com/behind-the-sofa opLqBQsREYCgu6xQkYQwJr9fo45a62DN9EdmHXnZdXNqlcVGlCum2Wks+49/V6267UEjw6QUXTS5Rovn"
    "zv++qbSzm9Q=\n").encode()


def witness_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(W_SKEY.split("+", 4)[4])[1:])


def monkeys_witness(path: Path) -> audit.Witness:
    return audit.Witness(path, witness_key(), "witness", {"monkeys": [audit.parse_vkey(M_VKEY)]},
                         clock=lambda: 1700000000)


# --- the request format and the witness's checks ------------------------------------------------------------------
def test_spec_example_request_parses_and_formats_byte_for_byte() -> None:
    req = parse_add_checkpoint(SPEC_REQUEST)
    assert req.old_size == 20852014 and len(req.proof) == 4
    assert base64.b64encode(req.proof[0]).decode() == "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw="
    note = audit.note.parse_note(req.checkpoint)
    cp = audit.note.parse_checkpoint(note.text)
    assert (cp.origin, cp.tree_size, len(note.signatures)) == ("example.com/behind-the-sofa", 20852163, 2)
    assert format_add_checkpoint(req.old_size, req.proof, req.checkpoint) == SPEC_REQUEST


def test_published_checkpoints_and_proof_are_cosigned(tmp_path: Path) -> None:
    w = monkeys_witness(tmp_path / "w.db")
    first = w.add_checkpoint(format_add_checkpoint(0, [], M_INIT))
    assert first.status == 200, first.body
    second = w.add_checkpoint(format_add_checkpoint(5, CONS_PROOF, M_NEXT))
    assert second.status == 200, second.body
    [cosig] = audit.note.parse_signature_lines(second.body.decode())
    assert cosig.name == "witness" and int.from_bytes(cosig.signature[:8], "big") == 1700000000
    text = audit.note.parse_note(M_NEXT).text
    [checked] = audit.note.verify_note(audit.note.Note(text, (cosig,)), [w.vkey])
    assert checked.timestamp == 1700000000 and str(w.vkey).startswith("witness+")
    held = w.checkpoint("monkeys")  # the log's signature it verified, then its own cosignature
    assert held == M_NEXT + second.body.decode()
    assert (tmp_path / "w.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("body", "status"), [
    (format_add_checkpoint(0, [], M_INIT.replace("monkeys\n5", "bananas\n5")), 404),  # unknown origin
    (format_add_checkpoint(0, [], M_INIT.replace("41sm", "41sn")), 403),  # the log signature fails
    (format_add_checkpoint(0, [], M_INIT.replace("— monkeys 202f", "— other 202f")), 403),  # no trusted signature
    (format_add_checkpoint(9, [], M_INIT), 400),  # old size above the checkpoint's
    (format_add_checkpoint(0, CONS_PROOF, M_INIT), 422),  # a proof from size 0
    (b"old 0\n" + M_INIT.encode(), 400),  # no blank line before the checkpoint
    (b"old 00\n\n" + M_INIT.encode(), 400), (b"new 0\n\n" + M_INIT.encode(), 400),
    (b"old 0\nnot base64!\n\n" + M_INIT.encode(), 400), (b"old 0\n" + b"A" * 44 + b"\n\n" + M_INIT.encode(), 400),
    (format_add_checkpoint(0, [bytes(32)] * 64, M_INIT), 400),  # more than 63 proof lines
    (b"\xff" * 100, 400), (b"", 400), (b"x" * 20000, 400),
])
def test_witness_refuses_with_the_status_the_spec_names(tmp_path: Path, body: bytes, status: int) -> None:
    resp = monkeys_witness(tmp_path / "w.db").add_checkpoint(body)
    assert resp.status == status, resp.body
    assert resp.body.endswith(b"\n") and resp.body.count(b"\n") == 1  # a one-line reason


def test_conflicts_and_inconsistent_proofs(tmp_path: Path) -> None:
    w = monkeys_witness(tmp_path / "w.db")
    assert w.add_checkpoint(format_add_checkpoint(0, [], M_INIT)).status == 200
    stale = w.add_checkpoint(format_add_checkpoint(0, [], M_NEXT))
    assert (stale.status, stale.body, stale.content_type) == (409, b"5\n", "text/x.tlog.size")
    bad = [CONS_PROOF[0], CONS_PROOF[2], CONS_PROOF[1], CONS_PROOF[3]]
    assert w.add_checkpoint(format_add_checkpoint(5, bad, M_NEXT)).status == 422
    assert w.add_checkpoint(format_add_checkpoint(5, [], M_NEXT)).status == 422
    assert w.add_checkpoint(format_add_checkpoint(5, [bytes(32)], M_INIT)).status == 422  # same size, a proof
    assert next(r[2] for r in w.refused("monkeys")).startswith("the consistency proof")  # kept as evidence
    assert w.add_checkpoint(format_add_checkpoint(5, [], M_INIT)).status == 200  # same size, same root: fine
    assert w.checkpoint("monkeys").startswith("monkeys\n5\n")


def test_racing_submissions_never_roll_the_witness_back(tmp_path: Path) -> None:
    w = monkeys_witness(tmp_path / "w.db")
    assert w.add_checkpoint(format_add_checkpoint(0, [], M_INIT)).status == 200
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def submit(body: bytes) -> None:
        barrier.wait()
        statuses.append(w.add_checkpoint(body).status)

    bodies = [format_add_checkpoint(5, CONS_PROOF, M_NEXT)] * 3 + [format_add_checkpoint(5, [], M_INIT)] * 3
    threads = [threading.Thread(target=submit, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.checkpoint("monkeys").startswith("monkeys\n8\n")  # once at 8, never back at 5
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409}


def test_size_zero_checkpoint_must_be_the_empty_tree(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    vkey = audit.note.make_vkey("example.org/log", key.public_key())
    w = audit.Witness(tmp_path / "w.db", witness_key(), "witness", {"example.org/log": [vkey]})
    for root, status in ((bytes(32), 422), (audit.merkle.EMPTY_ROOT, 200)):
        text = audit.note.CheckpointBody("example.org/log", 0, root).text()
        note = audit.note.format_note(text, [audit.note.sign_note(text, "example.org/log", key)])
        assert w.add_checkpoint(format_add_checkpoint(0, [], note)).status == status


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600) | st.builds(lambda old, tail: f"old {old}\n".encode() + tail,
                                          st.integers(0, 20), st.binary(max_size=300))
       | st.sampled_from([M_INIT, M_NEXT]).map(lambda s: format_add_checkpoint(0, [], s)))
def test_no_request_body_gets_a_5xx(tmp_path: Path, body: bytes) -> None:
    assert monkeys_witness(tmp_path / "fuzz.db").add_checkpoint(body).status in {200, 400, 403, 404, 409, 422}


def test_store_is_refused_when_it_is_not_a_witness_store(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(WitnessStoreError):
        monkeys_witness(tmp_path / "other.db")


# --- over HTTPS, with a real device log ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    transport.init_ca(d / "ca")
    server = transport.issue(d / "ca", name="witness-1", role="operator", server=True, sans=["127.0.0.1"])
    device = transport.issue(d / "ca", name="edge-1", role="client")
    return {"ca": d / "ca", "ca_crt": d / "ca" / "ca.crt", "server": server, "device": device}


@pytest.fixture
def device(tmp_path: Path) -> dict[str, Any]:
    key = audit.generate_signing_key(tmp_path / "audit.key")
    db = tmp_path / "audit.db"
    with audit.AuditLog(db, signing_key=key, checkpoint_every=10) as log:
        for i in range(25):
            log.append("test.event", "tester", {"i": i})
        log.checkpoint()
    return {"key": key, "pub": key.public_key(), "db": db, "vkey": audit.log_vkey(key.public_key())}


@pytest.fixture
def served(tmp_path: Path, pki: dict[str, Any], device: dict[str, Any]) -> Iterator[dict[str, Any]]:
    wkey = Ed25519PrivateKey.generate()
    w = audit.Witness(tmp_path / "witness.db", wkey, "witness.example/w1", {device["vkey"].name: [device["vkey"]]})
    ctx = audit.witness_server_context(pki["server"].cert_path, pki["server"].key_path)
    server = audit.WitnessServer(w, ("127.0.0.1", 0), ctx, timeout=3.0)
    audit.serve_in_thread(server)
    client = audit.WitnessClient(server.url, audit.witness_client_context(pki["ca_crt"]), timeout=5.0)
    yield {"witness": w, "server": server, "client": client, "url": server.url}
    server.shutdown()
    server.server_close()
    w.close()


def raw_attacker(db: Path) -> sqlite3.Connection:
    return tamper.attacker(db)


def rewrite_with_the_device_key(db: Path, key: Ed25519PrivateKey, seq: int) -> None:
    """The attack only a witness catches: edit an entry, rechain, re-sign every checkpoint with the stolen key."""
    conn = tamper.attacker(db)
    conn.execute("UPDATE entries SET data = '{\"i\":999}' WHERE seq = ?", (seq,))
    tamper.rechain_and_resign(conn, key)
    conn.close()


def test_publish_and_verify_against_over_tls(served: dict[str, Any], device: dict[str, Any], tmp_path: Path) -> None:
    log = audit.AuditLog(device["db"], readonly=True)
    first = audit.publish(log, served["client"], public_key=device["pub"], witness_keys=[served["witness"].vkey])
    assert (first.witness_size, first.checkpoint.tree_size) == (0, 27)
    assert first.verified_witnesses == ("witness.example/w1",)
    with audit.AuditLog(device["db"], signing_key=device["key"], checkpoint_every=10) as writer:
        for i in range(12):
            writer.append("test.event", "tester", {"i": i})
        writer.checkpoint()
    second = audit.publish(log, served["client"], public_key=device["pub"])  # old 0: a 409 says 27, then a proof
    assert (second.witness_size, second.checkpoint.tree_size, second.verified_witnesses) == (27, 42, ())
    fetched = served["client"].checkpoint(device["vkey"].name)
    assert fetched is not None and fetched.startswith(f"{device['vkey'].name}\n42\n")
    result = audit.verify_against(log, fetched, public_key=device["pub"], witness_keys=[served["witness"].vkey])
    assert (result.tree_size, result.cosigned_by, result.witness_checked) == (42, ("witness.example/w1",), True)
    assert audit.verify_against(log, first.note, public_key=device["pub"]).tree_size == 27  # an older one too
    with pytest.raises(NoteSignatureError):  # a cosignature from a witness we do not trust
        audit.verify_against(log, fetched, public_key=device["pub"], witness_keys=[audit.note.make_vkey(
            "witness.example/w1", Ed25519PrivateKey.generate().public_key(), audit.note.SIG_COSIGNATURE_V1)])
    assert served["client"].checkpoint("edgeshield/audit/unknown") is None


def test_a_rewritten_log_is_refused_by_the_witness_and_by_verify_against(
        served: dict[str, Any], device: dict[str, Any]) -> None:
    log = audit.AuditLog(device["db"], readonly=True)
    published = audit.publish(log, served["client"], public_key=device["pub"])
    rewrite_with_the_device_key(device["db"], device["key"], seq=5)
    report = log.verify(public_key=device["pub"], require_checkpoint=True)  # on the device alone it looks whole
    assert report.entries == 28 and report.latest_checkpoint == 27
    with pytest.raises(AuditNotExtendedError) as info:
        audit.verify_against(log, published.note, public_key=device["pub"])
    assert (info.value.reason, info.value.exit_code, info.value.tree_size) == ("rewritten", 3, 27)
    with audit.AuditLog(device["db"], signing_key=device["key"]) as writer:  # the attacker grows it and publishes
        writer.append("test.event", "mallory", {})
        writer.checkpoint()
    with pytest.raises(audit.WitnessInconsistentError) as refused:
        audit.publish(log, served["client"], public_key=device["pub"], old_size=27)
    assert refused.value.reason == "rewritten" and refused.value.exit_code == 3
    assert served["witness"].refused(device["vkey"].name)  # the witness kept the forged checkpoint as evidence
    assert served["witness"].checkpoint(device["vkey"].name).startswith(f"{device['vkey'].name}\n27\n")


def test_a_cut_back_log_is_refused_by_the_witness_and_by_verify_against(
        served: dict[str, Any], device: dict[str, Any]) -> None:
    log = audit.AuditLog(device["db"], readonly=True)
    published = audit.publish(log, served["client"], public_key=device["pub"])
    conn = raw_attacker(device["db"])  # back to right after checkpoint 20: undetectable on the device alone
    conn.execute("DELETE FROM entries WHERE seq > 20")
    conn.execute("DELETE FROM checkpoints WHERE tree_size > 20")
    conn.close()
    assert log.verify(public_key=device["pub"], require_checkpoint=True).entries == 21
    with pytest.raises(AuditNotExtendedError) as info:
        audit.verify_against(log, published.note, public_key=device["pub"])
    assert (info.value.reason, info.value.seq, info.value.tree_size) == ("cut-back", 21, 27)
    with pytest.raises(audit.WitnessInconsistentError) as refused:  # the witness answers 409: it holds 27
        audit.publish(log, served["client"], public_key=device["pub"])
    assert refused.value.reason == "cut-back" and refused.value.tree_size == 27


def _http(url: str, raw_request: bytes, ca: Path) -> bytes:
    host, port = url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname=host) as tls:
        tls.sendall(raw_request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    (b"GET /" + b"0" * 64 + b"/checkpoint HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    (b"PUT /add-checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405),
    (b"BREW /add-checkpoint HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 411),
    (b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\nConnection: close\r\n\r\n", 413),
    (b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
     411),
    (b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 400), (b"\x00\x01garbage\r\n\r\n", 400),
])
def test_http_oddities_get_a_4xx(served: dict[str, Any], pki: dict[str, Any], request_bytes: bytes,
                                 status: int) -> None:
    answer = _http(served["url"], request_bytes, pki["ca_crt"])
    assert answer.split(b" ", 2)[1] == str(status).encode(), answer[:200]


def test_tls_1_2_and_unknown_servers_are_refused(served: dict[str, Any], pki: dict[str, Any]) -> None:
    host, port = served["url"].removeprefix("https://").split(":")
    old = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError), socket.create_connection((host, int(port)), timeout=5) as sock:
        old.wrap_socket(sock, server_hostname=host).close()
    other = Path(served["witness"].path).parent / "other-ca"
    transport.init_ca(other)
    client = audit.WitnessClient(served["url"], audit.witness_client_context(other / "ca.crt"), timeout=5)
    with pytest.raises(ConnectionFailedError):  # the witness's certificate is not from our CA
        client.checkpoint("x")


def test_a_silent_peer_holds_a_connection_for_the_timeout_only(served: dict[str, Any], pki: dict[str, Any]) -> None:
    host, port = served["url"].removeprefix("https://").split(":")
    silent = socket.create_connection((host, int(port)), timeout=10)  # never sends a ClientHello
    try:
        silent.settimeout(10)
        assert silent.recv(1) == b""  # the witness closes it after its 3 s timeout
    finally:
        silent.close()
    assert served["client"].checkpoint("nobody") is None  # and it served others meanwhile


def test_client_certificates_from_the_device_pki(tmp_path: Path, pki: dict[str, Any], device: dict[str, Any]) -> None:
    w = audit.Witness(tmp_path / "w.db", Ed25519PrivateKey.generate(), "w", {device["vkey"].name: [device["vkey"]]})
    ctx = audit.witness_server_context(pki["server"].cert_path, pki["server"].key_path, client_ca=pki["ca"])
    server = audit.WitnessServer(w, ("127.0.0.1", 0), ctx, timeout=3.0)
    audit.serve_in_thread(server)
    try:
        log = audit.AuditLog(device["db"], readonly=True)
        anonymous = audit.WitnessClient(server.url, audit.witness_client_context(pki["ca_crt"]), timeout=5)
        with pytest.raises(ConnectionFailedError):  # no client certificate: no handshake
            audit.publish(log, anonymous, public_key=device["pub"])
        mtls = audit.WitnessClient(server.url, audit.witness_client_context(
            pki["ca_crt"], pki["device"].cert_path, pki["device"].key_path), timeout=5)
        assert audit.publish(log, mtls, public_key=device["pub"]).checkpoint.tree_size == 27
    finally:
        server.shutdown()
        server.server_close()


# --- the CLI, with the witness as a real process -----------------------------------------------------------------
def cli(*args: object, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeshield", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw, check=False)


def test_cli_end_to_end_with_a_witness_process(tmp_path: Path, pki: dict[str, Any], device: dict[str, Any]) -> None:
    keygen = cli("audit", "witness", "keygen", tmp_path / "w.key", "--name", "witness.example/w1", "--json")
    assert keygen.returncode == 0, keygen.stderr
    wvkey = json.loads(keygen.stdout)["vkey"]
    assert (tmp_path / "w.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "w.vkey").read_text().strip() == wvkey
    log_vkey = cli("audit", "vkey", tmp_path / "audit.pub").stdout.strip()
    assert log_vkey == str(device["vkey"])
    (tmp_path / "witness.toml").write_text(f'db = "witness.db"\n[[log]]\nvkey = "{log_vkey}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "edgeshield", "audit", "witness", "serve", "--config",
                             tmp_path / "witness.toml", "--signing-key", tmp_path / "w.key", "--tls-cert",
                             pki["server"].cert_path, "--tls-key", pki["server"].key_path, "--port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        url = info["url"]
        assert info["name"] == "witness.example/w1" and info["vkey"] == wvkey
        assert (tmp_path / "witness.db").stat().st_mode & 0o777 == 0o600
        net = ("--ca", pki["ca_crt"])
        note = tmp_path / "cosigned.note"
        pub = cli("audit", "publish", device["db"], "--witness", url, *net, "--checkpoint-key",
                  tmp_path / "audit.pub", "--witness-key", wvkey, "--out", note)
        assert pub.returncode == 0 and "cosigned by witness.example/w1" in pub.stdout, pub.stderr
        ok = cli("audit", "verify", device["db"], "--checkpoint-key", tmp_path / "audit.pub", "--against", note,
                 "--witness-key", tmp_path / "w.vkey")
        assert ok.returncode == 0 and "extends the witnessed checkpoint at tree size 27" in ok.stdout, ok.stderr
        assert "cosigned by witness witness.example/w1" in ok.stdout
        live = cli("audit", "verify", device["db"], "--checkpoint-key", tmp_path / "audit.pub", "--witness", url,
                   *net, "--witness-key", wvkey, "--json")
        assert live.returncode == 0 and json.loads(live.stdout)["witnessed_size"] == 27, live.stderr
        unchecked = cli("audit", "verify", device["db"], "--checkpoint-key", tmp_path / "audit.pub", "--against", note)
        assert "witness cosignature NOT checked" in unchecked.stdout
        conn = raw_attacker(device["db"])  # cut back to right after checkpoint 20
        conn.execute("DELETE FROM entries WHERE seq > 20")
        conn.execute("DELETE FROM checkpoints WHERE tree_size > 20")
        conn.close()
        assert cli("audit", "verify", device["db"], "--checkpoint-key", tmp_path / "audit.pub").returncode == 0
        for args in (("--against", note), ("--witness", url, *net)):
            cut = cli("audit", "verify", device["db"], "--checkpoint-key", tmp_path / "audit.pub", *args)
            assert cut.returncode == 3 and "cut back" in cut.stderr, (args, cut.stderr)
            assert len(cut.stderr.strip().splitlines()) == 1
        again = cli("audit", "publish", device["db"], "--witness", url, *net, "--checkpoint-key",
                    tmp_path / "audit.pub")
        assert again.returncode == 3 and "holds tree size 27" in again.stderr, again.stderr
        bad = cli("audit", "verify", device["db"], "--against", note)
        assert bad.returncode == 2 and "--checkpoint-key" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in err.splitlines()]  # the witness's log: one JSON object per line
    assert {x["event"] for x in lines} >= {"witness.request"} and any(x.get("status") == 409 for x in lines)


def test_cli_witness_errors(tmp_path: Path) -> None:
    assert cli("audit", "witness", "serve").returncode == 2
    bad_name = cli("audit", "witness", "keygen", tmp_path / "k.key", "--name", "has space")
    assert bad_name.returncode == 2 and not (tmp_path / "k.key").exists()
    (tmp_path / "bad.toml").write_text("nope = 1\n")
    assert cli("audit", "witness", "serve", "--config", tmp_path / "bad.toml").returncode == 2



def test_cli_refuses_a_plain_http_witness(device: dict[str, Any], tmp_path: Path, pki: dict[str, Any]) -> None:
    proc = cli("audit", "verify", device["db"], "--checkpoint-key", tmp_path / "audit.pub", "--witness",
               "http://127.0.0.1:1", "--ca", pki["ca_crt"])
    assert proc.returncode == 2 and "https://" in proc.stderr, proc.stderr


def test_malformed_notes_for_verify_against(tmp_path: Path, device: dict[str, Any]) -> None:
    log = audit.AuditLog(device["db"], readonly=True)
    with pytest.raises(MalformedNoteError):
        audit.verify_against(log, b"not a note", public_key=device["pub"])
    other = Ed25519PrivateKey.generate()
    with pytest.raises(InputError):  # a checkpoint of another log
        audit.verify_against(log, log.latest_checkpoint().signed_note(other.public_key()),
                             public_key=other.public_key())
