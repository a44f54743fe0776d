"""`serve --witness`: the server publishes its audit checkpoints to a real witness over TLS 1.3 in the background,
keeps the cosigned note beside the log, and raises the alarm when a restarted device's log no longer extends what
the witness cosigned (a log cut back to an older copy)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeshield import audit, transport
from edgeshield.errors import AuditNotExtendedError, InvalidArgumentError
from edgeshield.server import ServeConfig, build_state

from _serving import protected_digits, serving


@pytest.fixture
def world(tmp_path: Path) -> Any:
    bundle, k = protected_digits(tmp_path)
    ca = tmp_path / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    witness_cert = transport.issue(ca, name="witness", role="server", server=True, sans=["127.0.0.1"])
    alice = transport.issue(ca, name="alice", role="client")
    device_key = audit.generate_signing_key(tmp_path / "audit.key")
    log_vkey = audit.log_vkey(device_key.public_key())
    witness = audit.Witness(tmp_path / "witness.db", Ed25519PrivateKey.generate(), "witness.example/w1",
                            {log_vkey.name: [log_vkey]})
    wserver = audit.WitnessServer(witness, ("127.0.0.1", 0), audit.witness_server_context(witness_cert.cert_path,
                                                                                          witness_cert.key_path))
    audit.serve_in_thread(wserver)
    url = f"https://127.0.0.1:{wserver.server_address[1]}"
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=tmp_path / "audit.db",
                      audit_key=tmp_path / "audit.key", port=0, log_level="warning", witness_url=url,
                      witness_ca=ca / "ca.crt", witness_vkeys=(str(witness.vkey),), witness_every_s=0.2)
    yield {"cfg": cfg, "ca": ca, "alice": alice, "witness": witness, "root": tmp_path, "pub": device_key.public_key()}
    wserver.shutdown()


def _traffic(w: dict[str, Any], port: int, n: int) -> None:
    ctx = transport.client_context(w["ca"] / "ca.crt", w["alice"].cert_path, w["alice"].key_path)
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=10) as c:
        for _ in range(n):
            assert c.post("/v1/predict", json={"inputs": [[0.5] * 64]}).status_code == 200


def _kinds(db: Path) -> list[str]:
    return [e.kind for e in audit.AuditLog(db, readonly=True).entries()]


def test_checkpoints_reach_the_witness_and_a_cut_back_log_is_caught(world: dict[str, Any]) -> None:
    cfg, db = world["cfg"], world["root"] / "audit.db"
    with serving(cfg) as (_srv, _wt, port):
        _traffic(world, port, 120)  # past the first checkpoint at 100 entries
        deadline = time.monotonic() + 10
        while "witness.cosigned" not in _kinds(db):
            assert time.monotonic() < deadline, "the checkpoint was not published"
            time.sleep(0.1)
        with sqlite3.connect(db) as src, sqlite3.connect(world["root"] / "backup.db") as dst:
            src.backup(dst)  # a consistent copy of the log as it is now: what an attacker will later put back
    final = audit.AuditLog(db, readonly=True)
    note = (world["root"] / "audit.db.cosigned").read_text()
    # the shutdown checkpoint, cosigned, and the log ends covered
    report = audit.verify_against(final, note, public_key=world["pub"], witness_keys=[world["witness"].vkey],
                                  require_checkpoint=True)
    assert report.tree_size == final.latest_checkpoint().tree_size  # type: ignore[union-attr]
    held = world["witness"].checkpoint(audit.log_vkey(world["pub"]).name)
    assert held is not None and f"\n{report.tree_size}\n" in held

    # the attacker restores the older copy: on the device alone it verifies; against the witness it does not
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    shutil.copy(world["root"] / "backup.db", db)
    audit.AuditLog(db, readonly=True).verify(public_key=world["pub"])
    with pytest.raises(AuditNotExtendedError):
        audit.verify_against(audit.AuditLog(db, readonly=True), note, public_key=world["pub"])
    with serving(cfg) as (_srv, _wt, port):  # and the restarted server's publisher raises the alarm
        deadline = time.monotonic() + 10
        while "witness.inconsistent" not in _kinds(db):
            assert time.monotonic() < deadline, "the witness inconsistency was not audited"
            time.sleep(0.1)


def test_witness_options_are_checked_before_serving(world: dict[str, Any]) -> None:
    from dataclasses import replace

    with pytest.raises(InvalidArgumentError, match="--witness-ca"):
        build_state(replace(world["cfg"], witness_ca=None))
    with pytest.raises(InvalidArgumentError, match="need --witness"):
        build_state(replace(world["cfg"], witness_url=None))
