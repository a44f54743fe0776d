"""Demo stage: the real server under attack — slow and idle clients at every cap, hostile bodies, a certificate
revoked while its connection is open — and an honest client served throughout."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import httpx

from edgeshield import audit, transport
from edgeshield.demo import DemoContext, DemoFailure, Stage

if TYPE_CHECKING:
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from rich.table import Table

    from edgeshield.server import ServeConfig
    from edgeshield.server._limits import Limits
    from edgeshield.server._serve import GuardedServer

ATTACKER, HONEST = "127.0.0.2", "127.0.0.3"  # two loopback addresses: the per-address caps tell them apart
HOSTILE = {  # each once an HTTP 500; now a 4xx with a one-line reason
    "400-digit number": b'{"inputs": [[' + b"9" * 400 + b"]]}",
    "JSON nested 100,000 deep": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "wrong width": b'{"inputs": [[0, 1, 2]]}',
    "null values": b'{"inputs": [[[null, null]]]}',
}


def _config(ctx: DemoContext, limits: Limits) -> tuple[ServeConfig, dict[str, Any]]:
    """A fresh CA, certificates and audit key, and the server's configuration with ``limits``."""
    from edgeshield.server import ServeConfig

    work, kdir = ctx.workdir / "hardening", ctx.state["kdir"]
    ca = work / "ca"
    transport.init_ca(ca)
    server_cert = transport.issue(ca, name="edge-gateway", role="server", server=True, sans=["127.0.0.1"])
    certs = {n: transport.issue(ca, name=n, role="client") for n in ("alice", "mallory", "lost-laptop")}
    audit.generate_signing_key(work / "audit.key")
    cfg = ServeConfig(bundle=ctx.state["bundle"], owner_key=kdir / "owner.pub", device_key=kdir / "device.key", ca=ca,
                      cert=server_cert.cert_path, key=server_cert.key_path, audit_db=work / "audit.db",
                      audit_key=work / "audit.key", port=0, log_level="error", crl_poll_s=0.2, limits=limits)
    return cfg, {"ca": ca, "certs": certs, "db": work / "audit.db", "audit_key": work / "audit.key"}


def _hardening(ctx: DemoContext) -> str:
    from edgeshield.server import running
    from edgeshield.server._limits import Limits

    limits = Limits(max_connections_per_address=12, max_connections_per_identity=4, handshake_timeout_s=1.5,
                    request_head_timeout_s=1.5)
    cfg, w = _config(ctx, limits)
    with running(cfg) as (server, _watcher, port):
        table, held, served, slowest, after = _attack(ctx, server, port, limits, w)
    ctx.tables.append(table)
    ctx.state["hardening"] = w
    ctx.summary["hardening"] = {"attacker_peak_connections": held["peak"], "honest_served": served,
                                "honest_slowest_ms": round(slowest * 1000), "hostile_bodies": len(HOSTILE),
                                "revoked_open_connection": after}
    return (f"honest client 30/30 served during a slow attack; {len(HOSTILE)} hostile bodies 422; a revoked "
            f"certificate's open connection: {after}")


def _attack(ctx: DemoContext, server: GuardedServer, port: int, limits: Limits,
            w: dict[str, Any]) -> tuple[Table, dict[str, int], int, float, str]:
    """The three attacks against the running server; the table and what was seen."""
    from rich.table import Table

    url = f"https://127.0.0.1:{port}"

    def ctx_for(name: str) -> ssl.SSLContext:
        cert = w["certs"][name]
        return transport.client_context(w["ca"] / "ca.crt", cert.cert_path, cert.key_path)

    def client(name: str, source: str) -> httpx.Client:
        return httpx.Client(base_url=url, timeout=5,
                            transport=httpx.HTTPTransport(verify=ctx_for(name), local_address=source))

    table = Table(title=f"a real server at {url} under attack")
    for col in ("attack", "what the server did", "honest client"):
        table.add_column(col)
    x = {"inputs": [[0.5] * 64]}
    # 1. one address holds stalled handshakes, idle and slowloris connections, re-opening what gets closed
    stop, held = threading.Event(), {"peak": 0, "cut": 0}

    def attack() -> None:
        with ExitStack() as stack:
            sockets: list[socket.socket] = []
            while not stop.is_set():
                for sock in select.select(sockets, [], [], 0)[0]:  # what the server closed, the attacker reopens
                    try:
                        closed = not sock.recv(1)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        closed = False  # a TLS session ticket, not data
                    except OSError:
                        closed = True
                    if closed:
                        sockets.remove(sock)
                        sock.close()
                        held["cut"] += 1
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(ATTACKER, 0))
                    if len(sockets) % 3:  # two in three finish TLS and then idle or trickle a header
                        sock = ctx_for("mallory").wrap_socket(sock, server_hostname="127.0.0.1")
                        sock.sendall(b"POST /v1/predict HTTP/1.1\r\n" if len(sockets) % 3 == 2 else b"")
                    sock.setblocking(False)
                    sockets.append(stack.enter_context(sock))
                except (OSError, ssl.SSLError):
                    held["cut"] += 1  # refused before or during the handshake
                stop.wait(0.02)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    served, slowest = 0, 0.0
    with client("alice", HONEST) as alice:
        for i in range(30):
            ctx.step(i, 40, "slow attacker holding connections")
            t0 = time.monotonic()
            served += alice.post("/v1/predict", json=x).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
            with contextlib.suppress(RuntimeError):  # the server's own count, read across threads
                held["peak"] = max(held["peak"], server.gate.busiest_address())
            time.sleep(0.1)
    stop.set()
    attacker.join(timeout=10)
    if served != 30 or slowest > 2.0:
        raise DemoFailure(f"the honest client was served {served} of 30 (slowest {slowest:.2f} s) under attack")
    table.add_row(f"slowloris, idle and stalled connections from {ATTACKER}",
                  f"held {held['peak']} at most (cap {limits.max_connections_per_address} per address), each "
                  f"cut after {limits.request_head_timeout_s:g} s or refused: {held['cut']} connections",
                  f"30/30 answered, slowest {slowest * 1000:.0f} ms")
    # 2. bodies that once made it answer 500
    with client("alice", HONEST) as alice:
        codes = {what: alice.post("/v1/predict", content=body, headers={"content-type": "application/json"})
                 for what, body in HOSTILE.items()}
    if any(r.status_code != 422 for r in codes.values()):
        raise DemoFailure(f"a hostile body was not refused with 422: {[r.status_code for r in codes.values()]}")
    table.add_row(", ".join(HOSTILE), "422 each, before allocating: " + codes["400-digit number"].json()["error"],
                  "-")
    # 3. a certificate revoked while its connection is open
    ctx.step(32, 40, "revoking a certificate with an open connection")
    with client("lost-laptop", HONEST) as laptop:
        if laptop.post("/v1/predict", json=x).status_code != 200:
            raise DemoFailure("the laptop was not served before its revocation")
        transport.revoke(w["ca"], name="lost-laptop")
        deadline = time.monotonic() + 10
        while not any(e.kind == "crl.reload" for e in audit.AuditLog(w["db"], readonly=True).tail(20)):
            if time.monotonic() > deadline:
                raise DemoFailure("the server did not reload the CRL")
            time.sleep(0.1)
        try:
            after = str(laptop.post("/v1/predict", json=x).status_code)
        except httpx.HTTPError:
            after = "connection closed"
    if after == "200":
        raise DemoFailure("a revoked certificate was served on its open connection")
    table.add_row("lost laptop's certificate revoked mid-connection",
                  f"CRL reloaded without restart; the open connection: {after}", "-")
    return table, held, served, slowest, after


def _busy_device(db: Path, key: Ed25519PrivateKey, writers: int = 8, each: int = 25) -> dict[str, float]:
    """The device keeps working after publishing: ``writers`` threads append at once, group-committed."""
    log = audit.AuditLog(db, signing_key=key)
    try:
        threads = [threading.Thread(target=lambda w=w: [log.append("demo.event", f"writer-{w}", {"n": i})
                                                         for i in range(each)]) for w in range(writers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        log.checkpoint()
        return log.group_stats
    finally:
        log.close()


def _witness(ctx: DemoContext) -> str:
    """Publish the device's audit checkpoint to a witness over TLS 1.3; the device goes on appending (group
    commits) and verifies only its new entries from the cosigned checkpoint; then cut the log back to an older
    checkpoint: on the device alone the cut is invisible; against the witness's cosigned checkpoint it is not."""
    import sqlite3

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from rich.table import Table

    w = ctx.state["hardening"]
    key = audit.load_signing_key(w["audit_key"])
    pub = key.public_key()
    log = audit.AuditLog(w["db"], signing_key=key)
    older = log.latest_checkpoint()  # the server's shutdown checkpoint
    for i in range(3):  # the device keeps working after it: three more events, then a checkpoint
        log.append("demo.event", "server", {"n": i})
    newest = log.checkpoint()
    log.close()
    if older is None or newest.tree_size <= older.tree_size:
        raise DemoFailure("the audit log has no older checkpoint to cut back to")
    cert = transport.issue(w["ca"], name="witness", role="server", server=True, sans=["127.0.0.1"])
    vkey = audit.log_vkey(pub)
    witness = audit.Witness(w["db"].with_name("witness.db"), Ed25519PrivateKey.generate(), "witness.demo/w1",
                            {vkey.name: [vkey]})
    wserver = audit.WitnessServer(witness, ("127.0.0.1", 0),
                                  audit.witness_server_context(cert.cert_path, cert.key_path))
    audit.serve_in_thread(wserver)
    client = audit.WitnessClient(f"https://127.0.0.1:{wserver.server_address[1]}",
                                 audit.witness_client_context(w["ca"] / "ca.crt"))
    table = Table(title="the audit log, its witness, and a log cut back to an older checkpoint")
    for col in ("step", "on the device alone", "with the witness"):
        table.add_column(col)
    try:
        published = audit.publish(audit.AuditLog(w["db"], readonly=True), client, public_key=pub,
                                  witness_keys=[witness.vkey])
        table.add_row(f"publish checkpoint {newest.tree_size}", "-",
                      f"cosigned by {', '.join(published.verified_witnesses)}")
        groups = _busy_device(w["db"], key)
        full = audit.AuditLog(w["db"], readonly=True).verify(public_key=pub)
        inc = audit.verify_from_witnessed(audit.AuditLog(w["db"], readonly=True), published.note, public_key=pub,
                                          witness_keys=[witness.vkey])
        new = inc.verified.entries - inc.tree_size
        table.add_row(f"8 writers append {groups['entries']:.0f} entries at once",
                      f"group commit: {groups['groups']:.0f} commits (fsyncs) for {groups['entries']:.0f} entries",
                      f"verify from the cosigned checkpoint: {new} new entries read, not {full.entries}")
        with sqlite3.connect(w["db"]) as conn:  # the attacker with the file: back to the older checkpoint
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
                conn.execute(f'DROP TRIGGER "{name}"')
            conn.execute("DELETE FROM entries WHERE seq > ?", (older.tree_size,))
            conn.execute("DELETE FROM checkpoints WHERE tree_size > ?", (older.tree_size,))
        cut = audit.AuditLog(w["db"], readonly=True)
        report = cut.verify(public_key=pub, require_checkpoint=True)
        try:
            audit.verify_against(cut, published.note, public_key=pub, witness_keys=[witness.vkey])
        except audit.AuditNotExtendedError as exc:
            caught = str(exc)
        else:
            raise DemoFailure("a log cut back below the witnessed checkpoint verified against it")
        table.add_row(f"cut the log back to checkpoint {older.tree_size}",
                      f"verify: {report.entries} entries, all covered: looks intact",
                      f"verify --against the cosigned note: {caught}")
    finally:
        wserver.shutdown()
    ctx.tables.append(table)
    ctx.summary["witness"] = {"published": newest.tree_size, "cut_back_to": older.tree_size, "caught": caught,
                              "group_commits": groups, "incremental_new_entries": new, "full_entries": full.entries}
    return (f"checkpoint {newest.tree_size} cosigned by the witness; {groups['entries']:.0f} concurrent appends in "
            f"{groups['groups']:.0f} group commits, {new} verified incrementally; the log cut back to "
            f"{older.tree_size} passes verify on the device but not against the witness")


STAGES = [Stage("Hold the server against slow clients, hostile bodies and a revocation", _hardening),
          Stage("Catch a cut-back audit log with a witness off the device", _witness)]
