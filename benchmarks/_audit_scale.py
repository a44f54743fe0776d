"""How the audit log's costs grow, for benchmarks/server.py: group-committed appends at 1, 8 and 64 concurrent
writers against plain SQLite with the same durability, full verification at growing sizes, incremental
verification from a witness-cosigned checkpoint, and the concurrency sweep of the servers (keep-alive clients with
distinct identities, an asyncio client so that 128 connections cost the client little).

Every figure comes from the run that prints it; nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import ssl
import statistics
import threading
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ENTRY_DDL = ("CREATE TABLE entries (seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, "
             "actor TEXT NOT NULL, data TEXT NOT NULL, prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL)")


def _data(i: int) -> dict[str, Any]:
    """What the server writes per prediction."""
    return {"role": "client", "input_sha256": hashlib.sha256(str(i).encode()).hexdigest(), "batch": 1,
            "decisions": None}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


# --- appends at 1, 8, 64 concurrent writers -------------------------------------------------------------------------
def _threads(n: int, per: int, fn: Any) -> tuple[float, list[float]]:
    """Run ``fn(t, i)`` ``per`` times in each of ``n`` threads started together; (wall s, latencies s)."""
    lats: list[list[float]] = [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        barrier.wait()
        try:
            for i in range(per):
                t0 = time.perf_counter()
                fn(t, i)
                lats[t].append(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for th in ts:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in ts:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, [x for lt in lats for x in lt]


def bench_appends(work: Path, key_path: Path, levels: tuple[int, ...], total: int) -> dict[str, Any]:
    """Durable appends/s at each concurrency: ``AuditLog.append`` (group commit: WAL, synchronous=FULL, a signed
    checkpoint every 100) vs plain SQLite under the same pragmas, each writer its own connection and its own
    BEGIN IMMEDIATE / INSERT / COMMIT (what a plain table gives concurrent writers), and, for the practical limit, one
    writer committing the same rows in transactions of as many rows as there are writers."""
    from edgeshield.audit import AuditLog, load_signing_key

    key = load_signing_key(key_path)
    out: dict[str, Any] = {}
    for n in levels:
        per = max(1, total // n)
        d = work / f"appends-c{n}"
        d.mkdir()
        log = AuditLog(d / "audit.db", signing_key=key)
        log.recover()
        c0 = time.process_time()
        wall, lat = _threads(n, per, lambda t, i, log=log, per=per: log.append("inference.predict", f"client-{t}",
                                                                                _data(t * per + i)))
        cpu = time.process_time() - c0
        log.close()
        rows = sqlite3.connect(d / "audit.db").execute(
            "SELECT seq, ts, kind, actor, data, prev_hash, entry_hash FROM entries ORDER BY seq").fetchall()
        out[f"audit_c{n}"] = {"per_s": n * per / wall, "p50_ms": 1000 * (_pct(lat, 50) or 0),
                              "p99_ms": 1000 * (_pct(lat, 99) or 0), "cpu_us_per_append": 1e6 * cpu / (n * per),
                              "n": n * per}
        # plain SQLite, same durability, one connection and one transaction per append
        plain = d / "plain.db"
        setup = sqlite3.connect(plain, isolation_level=None)
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute(ENTRY_DDL)
        setup.close()
        local = threading.local()

        def insert(t: int, i: int, plain: Path = plain, local: threading.local = local, rows: list = rows,
                   per: int = per) -> None:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = sqlite3.connect(plain, isolation_level=None, timeout=60,
                                                    check_same_thread=False)
                conn.execute("PRAGMA synchronous=FULL")
            row = rows[(t * per + i) % len(rows)]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", (t * per + i, *row[1:]))
            conn.execute("COMMIT")

        wall, lat = _threads(n, per, insert)
        out[f"sqlite_c{n}"] = {"per_s": n * per / wall, "p50_ms": 1000 * (_pct(lat, 50) or 0),
                               "p99_ms": 1000 * (_pct(lat, 99) or 0), "n": n * per}
        # the practical limit at this group size: the same rows, n per transaction, one writer
        batched = d / "batched.db"
        conn = sqlite3.connect(batched, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(ENTRY_DDL)
        t0 = time.perf_counter()
        for at in range(0, n * per, n):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(j, *rows[j % len(rows)][1:]) for j in range(at, min(at + n, n * per))])
            conn.execute("COMMIT")
        out[f"sqlite_batched_c{n}"] = {"per_s": n * per / (time.perf_counter() - t0), "n": n * per}
        conn.close()
    return out


# --- verification as the log grows ----------------------------------------------------------------------------------
def bench_verify(work: Path, key_path: Path, sizes: tuple[int, ...], incremental: int) -> dict[str, Any]:
    """Build one log through the library's bulk path (``append_many``, 10k entries per transaction, a signed
    checkpoint every 100), growing it to each of ``sizes`` and timing a full ``verify`` at each; then publish its
    newest checkpoint to a witness (in process), append ``incremental`` more entries and time
    ``verify_from_witnessed`` against a full verify of the same log."""
    from edgeshield import audit

    key = audit.load_signing_key(key_path)
    pub = key.public_key()
    d = work / "verify-scale"
    d.mkdir()
    log = audit.AuditLog(d / "audit.db", signing_key=key)
    out: dict[str, Any] = {"build_s": 0.0}
    built = 0
    chunk = 10_000

    def grow(to: int) -> None:
        nonlocal built
        t0 = time.perf_counter()
        while built < to:
            n = min(chunk, to - built)
            log.append_many([("inference.predict", f"client-{(built + i) % 128}", _data(built + i))
                             for i in range(n)])
            built += n
        out["build_s"] += time.perf_counter() - t0

    for size in sizes:
        grow(size)
        log.checkpoint()
        t0 = time.perf_counter()
        report = log.verify(public_key=pub, require_checkpoint=True)
        out[f"full_{size}"] = {"s": time.perf_counter() - t0, "entries": report.entries,
                               "checkpoints": report.checkpoints}
    out["appended_entries"] = built
    out["build_entries_per_s"] = built / out["build_s"] if out["build_s"] else None
    wkey = audit.generate_signing_key(d / "witness.key")
    vkey = audit.log_vkey(pub)
    witness = audit.Witness(d / "witness.db", wkey, "witness.example/bench", {vkey.name: [vkey]})
    published = audit.publish(log, witness, public_key=pub, witness_keys=[witness.vkey])
    witness.close()
    start = built
    grow(built + incremental)
    log.checkpoint()
    ro = audit.AuditLog(d / "audit.db", readonly=True)
    t0 = time.perf_counter()
    inc = audit.verify_from_witnessed(ro, published.note, public_key=pub, witness_keys=[witness.vkey],
                                      require_checkpoint=True)
    inc_s = time.perf_counter() - t0
    out["incremental"] = {"s": inc_s, "from_size": inc.tree_size, "new_entries": inc.verified.entries - inc.tree_size,
                          "appended": built - start, "entries": inc.verified.entries}
    log.close()
    out["db_bytes"] = os.path.getsize(d / "audit.db")
    return out


# --- servers at 1, 16 and 128 concurrent keep-alive clients -----------------------------------------------------------
async def _client(port: int, ctx: ssl.SSLContext | None, body: bytes, window: dict[str, float],
                  opened: list[int], go: asyncio.Event, lat: list[float], codes: dict[int, int],
                  all_ok: list[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST if ctx else None)
    opened[0] += 1
    request = (b"POST /v1/predict HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\ncontent-type: application/json\r\n"
               b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await go.wait()  # every connection (and its handshake) is up before anyone sends
    start, stop = window["start"], window["stop"]
    try:
        while True:
            now = time.perf_counter()
            if now >= stop:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            code = int(head[9:12])
            all_ok[0] += code == 200
            if now >= start:  # requests sent before the window opened are warm-up
                lat.append(time.perf_counter() - now)
                codes[code] = codes.get(code, 0) + 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def _sweep_one(server: Any, ctxs: list[ssl.SSLContext | None], body: bytes, warm_s: float,
                     run_s: float) -> tuple[list[float], dict[int, int], float, int]:
    lat: list[float] = []
    codes: dict[int, int] = {}
    all_ok, opened = [0], [0]
    cpu: list[float] = []
    go = asyncio.Event()
    window: dict[str, float] = {}

    async def conduct() -> None:
        while opened[0] < len(ctxs):  # noqa: ASYNC110 - polls a counter the clients bump; an Event per count is more
            await asyncio.sleep(0.01)
        window["start"] = time.perf_counter() + warm_s
        window["stop"] = window["start"] + run_s
        go.set()
        await asyncio.sleep(max(0.0, window["start"] - time.perf_counter()))
        cpu.append(server.cpu_s())  # the server's CPU time over the timed window only
        await asyncio.sleep(max(0.0, window["stop"] - time.perf_counter()))
        cpu.append(server.cpu_s())

    await asyncio.gather(conduct(), *(_client(server.port, ctx, body, window, opened, go, lat, codes, all_ok)
                                      for ctx in ctxs))
    return lat, codes, cpu[1] - cpu[0], all_ok[0]


def bench_concurrency(servers: dict[str, Any], contexts: dict[str, list[ssl.SSLContext | None]], body: bytes,
                      levels: tuple[int, ...], run_s: float, warm_s: float = 0.5) -> dict[str, Any]:
    """Each server at each level: ``n`` keep-alive connections, each its own client identity (certificate), all
    opened (handshakes done) before any sends, then each sending one request at a time for ``warm_s`` + ``run_s``
    seconds; requests/s, latency percentiles and the
    server's CPU ms per request over the timed window (responses to requests sent in it). The servers take turns at
    each level, in rotating order."""
    out: dict[str, Any] = {}
    names = list(servers)
    for li, n in enumerate(levels):
        order = names[li % len(names):] + names[:li % len(names)]
        for name in order:
            s = servers[name]
            lat, codes, cpu, all_ok = asyncio.run(_sweep_one(s, contexts[name][:n], body, warm_s, run_s))
            ok = codes.get(200, 0)
            total = sum(codes.values())
            out[f"{name}_c{n}"] = {
                "rps": total / run_s, "ok": ok, "requests": total, "errors": total - ok, "ok_all": all_ok,
                "codes": dict(sorted(codes.items())),
                "p50_ms": 1000 * (_pct(lat, 50) or 0), "p99_ms": 1000 * (_pct(lat, 99) or 0),
                "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
                "server_cpu_ms_per_req": 1000 * cpu / total if total else None,
            }
    return out
