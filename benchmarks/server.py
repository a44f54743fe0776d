"""Benchmark: the secure inference server (`edgeshield serve`) vs. the same ASGI app over plain HTTP, in one run.

    python benchmarks/server.py [--quick] [--json PATH]

Protocol (fixed; every figure comes from this run, all traffic goes to 127.0.0.1):

0. Set-up (untimed): fresh owner/device keys, the shipped digits model protected into a temporary bundle whose
   metadata carries the digits input spec, a fresh device CA (ECDSA P-256) with a server certificate for 127.0.0.1,
   a ``client`` certificate and an ``auditor`` certificate, and an audit signing key. Three servers run as
   subprocesses, each on its own loopback port, so that the client (this process) never shares a GIL with them:
   * secure: ``python -m edgeshield serve`` (mutual TLS 1.3, RBAC, input validation, audit log with a FULL-sync
     commit per request; no detector; ``--max-body 65536``; the per-address handshake rate and connection cap
     lifted, since this benchmark handshakes back to back from one address);
   * plain: the same ``create_app`` on a ``ServerState`` with rbac=None, audit=None, spec=None,
     require_client_cert=False, under plain uvicorn (no TLS), same uvicorn settings (httptools, keep-alive 5 s,
     limit_concurrency 256, the same JSON access log to a file); the app still parses each body against the spec
     it derives from the model (shape, dtype, NaN/Inf), as every EdgeShield server does;
   * secure-no-audit (attribution only): the secure server with ``state.audit = None`` (mTLS + RBAC + validation).
1. Handshakes, alternating per iteration against the secure server: TCP connect only; TCP connect + full mTLS 1.3
   handshake (Python ``ssl`` socket, client certificate, ``TCP_NODELAY``); TCP connect + resumed handshake with the
   ``SSLSession`` of the previous connection, after one HTTP request on it so that the TLS 1.3 ticket has arrived;
   the fraction of resumption attempts the client reports as ``session_reused``. Also "to first response": the
   handshake plus one ``GET /healthz`` (``Connection: close``) — which includes the server's own verification of
   the client certificate, since TLS 1.3 lets the client finish before the server has checked it — against a TCP
   connect + the same request on the plain server. Reference (when the ``openssl`` binary exists): the same
   Python client against ``openssl s_server`` with the same certificates, TLS 1.3 and a required client
   certificate, to separate the server's share from the client's and the library's. Then, in separate passes, the
   CPU time per connection (+ one request) of each server, from psutil. Targets: full p50 <= 2 ms, resumed p50 <= 1 ms.
2. Requests: httpx (keep-alive, one client) POSTs ``/v1/predict`` with one digit per request as a JSON body (the
   same pre-encoded bodies for every server), sequentially, in alternating blocks; then the same with a few client
   threads (one httpx client each). Target: secure ÷ plain requests/s >= 0.7 (sequential).
   2b. Scale (``benchmarks/_audit_scale.py``): the secure, secure-no-audit and plain servers at 1, 16 and 128
   concurrent keep-alive clients, each client its own identity (its own certificate, so the per-identity caps never
   bind; the in-flight cap is raised to 256 on every server), all connections opened before any sends, then each
   client sending one request at a time for a fixed window: requests/s, p50/p99 latency and the server's CPU ms
   per request over the window, the servers taking turns at each level. Targets at 16 clients: secure ÷ plain
   >= 0.8, secure ÷ secure-no-audit >= 0.95.
3. Audit: ``AuditLog.append`` from one thread (WAL, synchronous=FULL, checkpoint every 100) with the data the
   server writes per prediction, vs. one-row INSERT + COMMIT into a plain table of the same columns and row sizes
   under the same pragmas, and under synchronous=NORMAL for context; raw ``os.fsync`` for reference.
   3b. Durable appends/s at 1, 8 and 64 concurrent writer threads: ``AuditLog.append`` (group commit) vs plain
   SQLite with the same pragmas, each writer its own connection and transaction, and (the practical limit) one
   writer committing the same rows in transactions of as many rows as there are writers. Target: >= 20,000/s at 64.
   3c. Verification as the log grows: one log built through ``AuditLog.append_many`` (10k entries per transaction)
   to 10k, 100k and 1M entries, a full ``verify`` at each; then its newest checkpoint cosigned by a witness (in
   process), 10k more entries, and ``verify_from_witnessed`` timed.
4. Bounded load test on the secure server: a fixed schedule from a few client threads, 20 % malformed (bad JSON,
   wrong shape, NaN via .npy, out of range, oversize body, auditor role -> 403); status codes counted, the
   server's RSS sampled (start, middle, end), then liveness, graceful SIGTERM, and ``verify`` of its audit log with
   the entries cross-checked against the status codes the clients saw.

``--quick`` uses fewer iterations and a smaller scale, named in the ``scale`` key (verification at 1k/5k/20k
entries, 0.3 s per concurrency cell, 16 client identities shared by up to 8 connections each). ``--json PATH``
writes one flat JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import edgeshield  # noqa: F401  # before onnxruntime: switches its telemetry off
from _audit_scale import bench_appends, bench_concurrency, bench_verify  # benchmarks/_audit_scale.py
from edgeshield._progress import ProgressCallback, report
from edgeshield.cli._progress import progress_bars

from _machine import hardware, open_report, temp_dir, write_report  # benchmarks/_machine.py, beside this script

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

HOST = "127.0.0.1"
MAX_BODY = 64 * 1024
# Handshakes are measured back to back from one address, so the per-address handshake rate and connection cap (a
# policy against floods, measured in benchmarks/hardening.py) are lifted for the secure servers here.
# The in-flight cap (64 by default: admission control, answered 503) is raised to 256 so that 128 concurrent clients
# measure throughput, not the cap; every client has its own identity, so the per-identity caps never bind (the plain
# server sees one anonymous identity, so its per-identity cap is raised as well).
UNCAPPED = {"handshakes_per_second_per_address": 1e6, "handshake_burst_per_address": 1_000_000,
            "max_connections_per_address": 512, "max_in_flight": 256}
UNCAPPED_FLAGS = ["--handshake-rate", "1000000", "--handshake-burst", "1000000",
                  "--max-connections-per-address", "512", "--max-in-flight", "256"]
TARGET_FULL_HS_MS = 2.0
TARGET_RESUMED_HS_MS = 1.0
TARGET_RPS_RATIO = 0.7
MALFORMED_KINDS = ("bad_json", "wrong_shape", "nan_npy", "out_of_range", "oversize", "wrong_role")
EXPECTED = {"valid": 200, "bad_json": 422, "wrong_shape": 422, "nan_npy": 422, "out_of_range": 422,
            "oversize": 413, "wrong_role": 403}

# (quick, full) sizes
SIZES = {
    "handshakes": (200, 1000),
    "seq_requests": (300, 2000),
    "seq_blocks": (3, 8),
    "conc_threads": (4, 4),
    "conc_per_thread": (50, 250),
    "audit_rows": (300, 2000),
    "load_requests": (400, 3000),
    "load_threads": (3, 3),
    "scale_run_s": (0.3, 5),  # seconds per server per concurrency level (after 0.15 s / 0.5 s of warm-up)
    "append_total": (640, 6400),  # appends per concurrency level (split over the writers)
    "verify_incremental": (1000, 10_000),
}
SCALE_LEVELS = (1, 16, 128)  # concurrent keep-alive clients, each its own identity
APPEND_LEVELS = (1, 8, 64)
VERIFY_SIZES = {True: (1000, 5000, 20_000), False: (10_000, 100_000, 1_000_000)}  # quick, full
TARGET_SECURE_VS_PLAIN_C16 = 0.8
TARGET_AUDIT_VS_NOAUDIT_C16 = 0.95
COMMIT_DELAY_MS = 0.5  # the scale phase also runs the secure server with this --audit-commit-delay-ms (PostgreSQL's)
TARGET_APPENDS_C64 = 20_000
PHASE_DEADLINE_S = {"handshakes": (20, 120), "requests": (20, 150), "load": (25, 180)}


def _size(name: str, quick: bool) -> int:
    return SIZES[name][0 if quick else 1]


def _deadline(name: str, quick: bool) -> float:
    return time.monotonic() + PHASE_DEADLINE_S[name][0 if quick else 1]


# --- set-up ---------------------------------------------------------------------------------------------------------
def prepare(work: Path, quick: bool = False) -> dict[str, Any]:
    from edgeshield import audit, bundles, keys, transport
    from edgeshield.adversarial import METADATA_KEY
    from edgeshield.models import digits_input_spec, digits_model_path

    k = work / "keys"
    keys.init_keys(k)
    bundle = work / "digits.esb"
    bundles.protect(digits_model_path(), bundle, signing_key=keys.load_owner_private_key(k / "owner.key"),
                    recipients=[keys.load_device_public_key(k / "device.pub")],
                    metadata={METADATA_KEY: digits_input_spec().to_json()})
    ca = work / "ca"
    transport.init_ca(ca)  # ECDSA P-256
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=[HOST])
    alice = transport.issue(ca, name="alice", role="client")
    aud = transport.issue(ca, name="aud", role="auditor")
    audit.generate_signing_key(work / "audit.key")
    # one identity per concurrent client; --quick issues 16 and shares each among up to 8 connections (within the
    # per-identity caps of 8 in flight and 16 connections), to stay under a minute
    n_ids = 16 if quick else max(SCALE_LEVELS)
    clients = [transport.issue(ca, name=f"client-{i:03d}", role="client") for i in range(n_ids)]
    rules = work / "monitor-rules.yaml"
    _benchmark_rules(rules)
    return {"clients": [[str(c.cert_path), str(c.key_path)] for c in clients], "work": str(work),
            "bundle": str(bundle), "owner_pub": str(k / "owner.pub"),
            "device_key": str(k / "device.key"), "ca": str(ca), "ca_crt": str(ca / "ca.crt"),
            "server_crt": str(server.cert_path), "server_key": str(server.key_path),
            "alice": [str(alice.cert_path), str(alice.key_path)], "aud": [str(aud.cert_path), str(aud.key_path)],
            "audit_key": str(work / "audit.key"), "audit_pub": str(work / "audit.pub"), "monitor_rules": str(rules)}


def _benchmark_rules(path: Path) -> None:
    """The packaged monitor rule pack with one change: ``adversarial_input_burst`` alerts without throttling. The
    bounded load test sends 20 % malformed inputs from one identity on purpose (600 in a few seconds), which that
    rule would otherwise throttle to 2 requests/s for 5 minutes, turning the rest of the test into 429s; every
    rule still runs over every event, so the monitor's cost per request is the same."""
    from importlib import resources

    import yaml

    rules = yaml.safe_load(resources.files("edgeshield.monitor").joinpath("rules/default.yaml").read_text())
    for rule in rules if isinstance(rules, list) else rules.get("rules", []):
        if rule.get("rule") == "adversarial_input_burst":
            rule["responses"] = ["alert"]
    path.write_text(yaml.safe_dump(rules, sort_keys=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _serve_config(p: dict[str, Any], port: int, audit_db: str) -> Any:
    from edgeshield.server import ServeConfig
    from edgeshield.server._limits import Limits

    return ServeConfig(bundle=Path(p["bundle"]), owner_key=Path(p["owner_pub"]), device_key=Path(p["device_key"]),
                       ca=Path(p["ca"]), cert=Path(p["server_crt"]), key=Path(p["server_key"]),
                       audit_db=Path(audit_db), audit_key=Path(p["audit_key"]), host=HOST, port=port,
                       max_body_bytes=MAX_BODY, limits=Limits(**UNCAPPED), monitor_rules=Path(p["monitor_rules"]))


def child_plain(p: dict[str, Any], port: int) -> None:
    """The same ASGI app with no TLS, no RBAC, no validation and no audit log, under plain uvicorn."""
    import uvicorn

    from edgeshield import bundles, keys
    from edgeshield.server import ServerState, create_app
    from edgeshield.server._serve import log_config

    opened = bundles.open_bundle(p["bundle"], keys.load_owner_public_key(p["owner_pub"]),
                                 keys.load_device_private_key(p["device_key"]))
    from edgeshield.server._limits import Limits

    state = ServerState(session=opened.session, manifest=opened.manifest, rbac=None, audit=None, spec=None,
                        require_client_cert=False, max_body_bytes=MAX_BODY,
                        limits=Limits(**{**UNCAPPED, "max_in_flight_per_identity": 256,
                                         "max_connections_per_identity": 512}))
    config = uvicorn.Config(create_app(state), host=HOST, port=port, http="httptools", timeout_keep_alive=5,
                            timeout_graceful_shutdown=10, limit_concurrency=256, log_config=log_config(),
                            server_header=False, date_header=False)
    uvicorn.Server(config).run()


def child_noaudit(p: dict[str, Any], port: int, audit_db: str) -> None:
    """The secure server with its audit sink removed: mTLS + RBAC + validation (for attributing the overhead)."""
    from edgeshield.server import build_state, make_server

    cfg = _serve_config(p, port, audit_db)
    state = build_state(cfg)
    state.audit = None
    server, _watcher = make_server(cfg, state)
    server.run()


class ServerProc:
    """A server subprocess on 127.0.0.1, its log in a file (never a pipe: the access log would fill it)."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.rss_after_start: int | None = None

    def wait_ready(self, probe: Any, timeout_s: float = 60.0) -> None:
        import psutil

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                if probe():
                    self.rss_after_start = psutil.Process(self.proc.pid).memory_info().rss
                    return
            except Exception:  # noqa: BLE001, S110 - not up yet
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server not ready after {timeout_s} s")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def cpu_s(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


# --- clients --------------------------------------------------------------------------------------------------------
def client_ctx(p: dict[str, Any], who: str = "alice") -> ssl.SSLContext:
    from edgeshield import transport

    cert, key = p[who]
    return transport.client_context(p["ca_crt"], cert, key)


def https_client(p: dict[str, Any], port: int, who: str = "alice") -> Any:
    import httpx

    return httpx.Client(base_url=f"https://{HOST}:{port}", verify=client_ctx(p, who), timeout=10)


def http_client(port: int) -> Any:
    import httpx

    return httpx.Client(base_url=f"http://{HOST}:{port}", timeout=10)


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(samples), q))


def _ms(samples: list[float]) -> dict[str, float | None]:
    ms = [s * 1000 for s in samples]
    return {"p50": _pct(ms, 50), "p99": _pct(ms, 99), "mean": statistics.fmean(ms) if ms else None, "n": len(ms)}


# --- 1. handshakes --------------------------------------------------------------------------------------------------
def _connect(port: int) -> socket.socket:
    raw = socket.create_connection((HOST, port), timeout=5)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return raw


def _get(sock: Any, path: str = "/healthz") -> bytes:
    """One request on a fresh connection (Connection: close); read to EOF (bounded), expect a 200."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    buf = b""
    for _ in range(256):
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        buf += chunk
    if b" 200 " not in buf.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"unexpected answer to GET {path}: {buf[:80]!r}")
    return buf


def _tls_trial(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None,
               path: str) -> tuple[float, float, float, bool, ssl.SSLSession]:
    """(TCP connect s, connect + handshake s, connect + handshake + first response s, resumed, the new session)."""
    t0 = time.perf_counter()
    raw = _connect(port)
    t1 = time.perf_counter()
    s = ctx.wrap_socket(raw, server_hostname=HOST, session=session)
    t2 = time.perf_counter()
    try:
        reused = s.session_reused
        _get(s, path)  # the TLS 1.3 tickets arrive after the handshake, before the response
        t3 = time.perf_counter()
        return t1 - t0, t2 - t0, t3 - t0, reused, s.session
    finally:
        s.close()


class OpenSslServer:
    """Reference only: ``openssl s_server`` (C) with the same certificate, CA and TLS 1.3 + client-cert settings,
    to tell the server's share of the handshake time from the client's and the library's."""

    def __init__(self, p: dict[str, Any], log_path: Path) -> None:
        self.port = _free_port()
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        # The reference is whichever openssl is on PATH (hence the partial path, S607).
        self.proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"{HOST}:{self.port}", "-cert", p["server_crt"], "-key",  # noqa: S607
             p["server_key"], "-CAfile", p["ca_crt"], "-Verify", "1", "-tls1_3", "-www", "-quiet"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def bench_handshakes(p: dict[str, Any], secure: ServerProc, plain: ServerProc, n: int, deadline: float,
                     ref_port: int | None) -> dict[str, Any]:
    ctx = client_ctx(p)
    secure_port, plain_port = secure.port, plain.port
    client_cpu = {"full": 0.0, "resumed": 0.0}
    keys = ("tcp", "full", "full_hs_only", "full_first", "resumed", "resumed_hs_only", "resumed_first",
            "plain_first", "ref_full", "ref_resumed")
    lat: dict[str, list[float]] = {k: [] for k in keys}
    attempts = reused = ref_attempts = ref_reused = 0
    session = _tls_trial(ctx, secure_port, None, "/healthz")[4]
    ref_session = _tls_trial(ctx, ref_port, None, "/")[4] if ref_port else None
    warmup = 20
    for i in range(n + warmup):
        if time.monotonic() > deadline:
            break
        keep = i >= warmup
        # TCP connect only, to the secure server's port (closed before any TLS byte)
        t0 = time.perf_counter()
        raw = _connect(secure_port)
        t1 = time.perf_counter()
        raw.close()
        # TCP connect + full mTLS handshake, then one request (to first response)
        c0 = time.process_time()
        tcp, hs, first, _, _ = _tls_trial(ctx, secure_port, None, "/healthz")
        c1 = time.process_time()
        # TCP connect + handshake resuming the previous connection's session, then one request (new ticket)
        r_tcp, r_hs, r_first, was_reused, session = _tls_trial(ctx, secure_port, session, "/healthz")
        c2 = time.process_time()
        # plain server: TCP connect + the same request
        t2 = time.perf_counter()
        raw = _connect(plain_port)
        try:
            _get(raw)
        finally:
            raw.close()
        t3 = time.perf_counter()
        if ref_port:
            ref_full = _tls_trial(ctx, ref_port, None, "/")[1]
            _, ref_res, _, ref_was_reused, ref_session = _tls_trial(ctx, ref_port, ref_session, "/")
        if not keep:
            continue
        lat["tcp"].append(t1 - t0)
        client_cpu["full"] += c1 - c0
        client_cpu["resumed"] += c2 - c1
        lat["full"].append(hs)
        lat["full_hs_only"].append(hs - tcp)
        lat["full_first"].append(first)
        attempts += 1
        reused += bool(was_reused)
        if was_reused:
            lat["resumed"].append(r_hs)
            lat["resumed_hs_only"].append(r_hs - r_tcp)
            lat["resumed_first"].append(r_first)
        lat["plain_first"].append(t3 - t2)
        if ref_port:
            lat["ref_full"].append(ref_full)
            ref_attempts += 1
            ref_reused += bool(ref_was_reused)
            if ref_was_reused:
                lat["ref_resumed"].append(ref_res)
    out: dict[str, Any] = {k: _ms(v) for k, v in lat.items()}
    # CPU per connection (+ one GET /healthz), each kind in its own pass so the server's time can be attributed
    m = max(1, min((lat["full"] and len(lat["full"])) or 1, 200))
    cpu: dict[str, float | None] = {}
    for kind, server in (("full", secure), ("resumed", secure), ("plain", plain)):
        c0 = server.cpu_s()
        done = 0
        for _ in range(m):
            if time.monotonic() > deadline:
                break
            if kind == "plain":
                raw = _connect(plain_port)
                try:
                    _get(raw)
                finally:
                    raw.close()
            else:
                session = _tls_trial(ctx, secure_port, session if kind == "resumed" else None, "/healthz")[4]
            done += 1
        cpu[kind] = 1000 * (server.cpu_s() - c0) / done if done else None
    out.update(server_cpu_ms_full=cpu["full"], server_cpu_ms_resumed=cpu["resumed"], server_cpu_ms_plain=cpu["plain"],
               client_cpu_ms_full=1000 * client_cpu["full"] / attempts if attempts else None,
               client_cpu_ms_resumed=1000 * client_cpu["resumed"] / attempts if attempts else None)
    out.update(resumption_attempts=attempts, resumption_fraction=reused / attempts if attempts else None,
               ref_resumption_fraction=ref_reused / ref_attempts if ref_attempts else None)
    return out


# --- 2. requests ----------------------------------------------------------------------------------------------------
def _bodies() -> list[bytes]:
    from edgeshield.models import load_digits_split

    x = load_digits_split().x_test
    return [json.dumps({"inputs": [row.tolist()]}).encode() for row in x]


_JSON = {"content-type": "application/json"}


def _run_sequential(client: Any, bodies: list[bytes], start: int, count: int, deadline: float,
                    lat: list[float]) -> tuple[int, float, int]:
    errors = 0
    t_start = time.perf_counter()
    done = 0
    for i in range(start, start + count):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        r = client.post("/v1/predict", content=bodies[i % len(bodies)], headers=_JSON)
        lat.append(time.perf_counter() - t0)
        done += 1
        errors += r.status_code != 200
    return done, time.perf_counter() - t_start, errors


def bench_requests(p: dict[str, Any], servers: dict[str, ServerProc], quick: bool, bodies: list[bytes]) -> dict:
    n, blocks = _size("seq_requests", quick), _size("seq_blocks", quick)
    per_block = n // blocks
    deadline = _deadline("requests", quick)
    clients = {name: (http_client(s.port) if name == "plain" else https_client(p, s.port))
               for name, s in servers.items()}
    out: dict[str, Any] = {}
    try:
        for name, c in clients.items():  # warm-up: connection, first inference, allocator
            out[f"warm_200_{name}"] = sum(c.post("/v1/predict", content=bodies[i], headers=_JSON).status_code == 200
                                          for i in range(30))
        acc = {name: {"lat": [], "n": 0, "wall": 0.0, "errors": 0, "cpu": 0.0} for name in clients}
        order = list(clients)
        for b in range(blocks):
            for name in order if b % 2 == 0 else reversed(order):
                a = acc[name]
                cpu0 = servers[name].cpu_s()
                done, wall, errors = _run_sequential(clients[name], bodies, b * per_block, per_block, deadline,
                                                     a["lat"])
                a["cpu"] += servers[name].cpu_s() - cpu0
                a["n"] += done
                a["wall"] += wall
                a["errors"] += errors
        for name, a in acc.items():
            out[f"seq_{name}"] = {**_ms(a["lat"]), "rps": a["n"] / a["wall"] if a["wall"] else None,
                                  "errors": a["errors"], "requests": a["n"],
                                  "server_cpu_ms_per_req": 1000 * a["cpu"] / a["n"] if a["n"] else None}
    finally:
        for c in clients.values():
            c.close()
    # concurrent: a few threads, one client each
    threads, per_thread = _size("conc_threads", quick), _size("conc_per_thread", quick)
    for name, s in servers.items():
        lats: list[list[float]] = [[] for _ in range(threads)]
        errs = [0] * threads
        dones = [0] * threads
        tclients = [http_client(s.port) if name == "plain" else https_client(p, s.port) for _ in range(threads)]
        out[f"conc_warm_200_{name}"] = sum(c.post("/v1/predict", content=bodies[0], headers=_JSON).status_code == 200
                                           for c in tclients)
        barrier = threading.Barrier(threads + 1)

        def work(k: int, c: Any, barrier: threading.Barrier, dones: list[int], errs: list[int],
                 lats: list[list[float]]) -> None:
            barrier.wait()
            dones[k], _, errs[k] = _run_sequential(c, bodies, k * per_thread, per_thread, deadline, lats[k])

        ts = [threading.Thread(target=work, args=(k, tclients[k], barrier, dones, errs, lats)) for k in range(threads)]
        for t in ts:
            t.start()
        cpu0 = s.cpu_s()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join(timeout=max(1.0, deadline - time.monotonic() + 15))
        wall = time.perf_counter() - t0
        cpu = s.cpu_s() - cpu0
        for c in tclients:
            c.close()
        total = sum(dones)
        out[f"conc_{name}"] = {**_ms([x for lt in lats for x in lt]), "rps": total / wall if wall else None,
                               "errors": sum(errs), "requests": total, "threads": threads,
                               "server_cpu_ms_per_req": 1000 * cpu / total if total else None}
    return out


# --- 3. audit log ---------------------------------------------------------------------------------------------------
def bench_audit(work: Path, n: int) -> dict[str, Any]:
    import hashlib

    from edgeshield.audit import AuditLog, load_signing_key

    d = work / "audit-bench"
    d.mkdir()
    datas = [{"role": "client", "input_sha256": hashlib.sha256(str(i).encode()).hexdigest(), "batch": 1,
              "decisions": None} for i in range(n)]
    log = AuditLog(d / "audit.db", signing_key=load_signing_key(work / "audit.key"))
    lat: list[float] = []
    t0 = time.perf_counter()
    for data in datas:
        t = time.perf_counter()
        log.append("inference.predict", "alice", data)
        lat.append(time.perf_counter() - t)
    audit_wall = time.perf_counter() - t0
    log.close()
    # the rows the log wrote, replayed into a plain table of the same columns (same sizes)
    rows = sqlite3.connect(d / "audit.db").execute(
        "SELECT seq, ts, kind, actor, data, prev_hash, entry_hash FROM entries ORDER BY seq").fetchall()
    out: dict[str, Any] = {"audit": {**_ms(lat), "per_s": n / audit_wall}}
    for sync in ("FULL", "NORMAL"):
        conn = sqlite3.connect(d / f"plain-{sync}.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute("CREATE TABLE entries (seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, "
                     "actor TEXT NOT NULL, data TEXT NOT NULL, prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL)")
        lat = []
        t0 = time.perf_counter()
        for row in rows:
            t = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            conn.execute("COMMIT")
            lat.append(time.perf_counter() - t)
        out[f"sqlite_{sync.lower()}"] = {**_ms(lat), "per_s": len(rows) / (time.perf_counter() - t0)}
        conn.close()
    # raw fsync of a small append, for reference
    fd = os.open(d / "fsync.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lat = []
    try:
        for _ in range(min(n, 500)):
            os.write(fd, b"x" * 256)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    out["fsync"] = _ms(lat)
    out["row_bytes"] = statistics.fmean(sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in r) for r in rows)
    return out


# --- 4. bounded load test -------------------------------------------------------------------------------------------
def _load_bodies(bodies: list[bytes]) -> dict[str, tuple[bytes, dict[str, str]]]:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.full((1, 64), np.nan, np.float32))
    return {
        "bad_json": (b"{not json", _JSON),
        "wrong_shape": (json.dumps({"inputs": [[0.5] * 63]}).encode(), _JSON),
        "nan_npy": (buf.getvalue(), {"content-type": "application/x-npy"}),
        "out_of_range": (json.dumps({"inputs": [[2.0] * 64]}).encode(), _JSON),
        "oversize": (b"x" * (2 * MAX_BODY), {"content-type": "application/x-npy"}),
    }


def schedule(n: int, share_every: int = 5) -> list[str]:
    """Every ``share_every``-th request malformed (20 %), cycling through the malformed kinds."""
    out, m = [], 0
    for i in range(n):
        if i % share_every == share_every - 1:
            out.append(MALFORMED_KINDS[m % len(MALFORMED_KINDS)])
            m += 1
        else:
            out.append("valid")
    return out


def bench_load(p: dict[str, Any], server: ServerProc, quick: bool, bodies: list[bytes]) -> dict[str, Any]:
    import httpx

    n, threads = _size("load_requests", quick), _size("load_threads", quick)
    plan = schedule(n)
    special = _load_bodies(bodies)
    deadline = _deadline("load", quick)
    statuses: Counter[tuple[str, int | str]] = Counter()
    lock = threading.Lock()
    progress = {"done": 0}
    samples: list[tuple[float, int, int]] = []  # (t, done, rss)
    stop = threading.Event()

    def monitor() -> None:
        t0 = time.monotonic()
        while not stop.is_set() and time.monotonic() < deadline + 5:
            try:
                samples.append((time.monotonic() - t0, progress["done"], server.rss()))
            except Exception:  # noqa: BLE001 - the process is gone: reported as not alive
                break
            stop.wait(0.05)

    def work(k: int) -> None:
        with https_client(p, server.port) as alice, https_client(p, server.port, "aud") as aud:
            for i in range(k, n, threads):
                if time.monotonic() > deadline:
                    return
                kind = plan[i]
                if kind in special:
                    content, headers = special[kind]
                else:
                    content, headers = bodies[i % len(bodies)], _JSON
                c = aud if kind == "wrong_role" else alice
                try:
                    code: int | str = c.post("/v1/predict", content=content, headers=headers).status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                with lock:
                    statuses[(kind, code)] += 1
                    progress["done"] += 1

    rss_start = server.rss()
    cpu0 = server.cpu_s()
    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=max(1.0, deadline - time.monotonic() + 15))
    wall = time.perf_counter() - t0
    time.sleep(0.2)
    stop.set()
    mon.join(timeout=5)
    alive = server.proc.poll() is None
    rss_end = server.rss() if alive else None
    cpu = server.cpu_s() - cpu0 if alive else None
    healthz = None
    if alive:
        with https_client(p, server.port) as c:
            healthz = c.get("/healthz").status_code
    mid = next((rss for _, done, rss in samples if done >= n // 2), None)
    done = sum(statuses.values())
    codes: Counter[int | str] = Counter()
    for (_, code), v in statuses.items():
        codes[code] += v
    malformed = {k: v for k, v in statuses.items() if k[0] != "valid"}
    return {
        "requests": done, "planned": n, "threads": threads, "wall_s": wall, "rps": done / wall if wall else None,
        "statuses": {f"{kind}:{code}": v for (kind, code), v in sorted(statuses.items(), key=str)},
        "codes": dict(sorted(codes.items(), key=str)),
        "n_5xx": sum(v for c, v in codes.items() if isinstance(c, int) and c >= 500),
        "n_transport_errors": sum(v for c, v in codes.items() if not isinstance(c, int)),
        "malformed": sum(malformed.values()),
        "malformed_4xx": sum(v for (_, c), v in malformed.items() if isinstance(c, int) and 400 <= c < 500),
        "unexpected": sum(v for (kind, c), v in statuses.items() if c != EXPECTED[kind]),
        "alive": alive and healthz == 200, "rss_start": rss_start, "rss_mid": mid, "rss_end": rss_end,
        "rss_max": max((r for _, _, r in samples), default=None), "server_cpu_s": cpu,
        "predict_200": statuses.get(("valid", 200), 0), "n_422": codes.get(422, 0), "n_403": codes.get(403, 0),
    }


SCALE_SERVERS = ("secure", "secure_delay", "secure_noaudit", "plain")


def _entries(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])


def _commit_groups(db: Path, since: int) -> dict[str, float]:
    """Entries per committed transaction from ``since`` on: every entry of one group commit carries its time."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        sizes = sorted(n for (n,) in conn.execute("SELECT count(*) FROM entries WHERE seq >= ? GROUP BY ts", (since,)))
    if not sizes:
        return {"mean": 0.0, "p90": 0.0, "commits": 0}
    return {"mean": sum(sizes) / len(sizes), "p90": float(sizes[int(0.9 * (len(sizes) - 1))]), "commits": len(sizes)}


def audit_check(p: dict[str, Any], db: Path) -> dict[str, Any]:
    from edgeshield.audit import AuditLog, load_verify_key

    log = AuditLog(db, readonly=True)
    t0 = time.perf_counter()
    report = log.verify(public_key=load_verify_key(p["audit_pub"]))
    verify_s = time.perf_counter() - t0
    kinds: Counter[str] = Counter()
    refused_403 = 0  # 403s the monitor answered (the packaged rbac_denials rule blocks an identity after 20 denials)
    for e in log.entries():
        kinds[e.kind] += 1
        refused_403 += e.kind == "monitor.refused" and e.data.get("status") == 403
    return {"entries": report.entries, "checkpoints": report.checkpoints, "verify_s": verify_s,
            "kinds": dict(kinds), "signatures_checked": report.signatures_checked, "refused_403": refused_403}


# --- reporting ------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    import fastapi
    import httptools
    import httpx
    import uvicorn

    hw = f"{hardware()}; {temp_dir()}"
    versions = (f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, SQLite {sqlite3.sqlite_version}, "
                f"uvicorn {uvicorn.__version__} (httptools {httptools.__version__}), fastapi {fastapi.__version__}, "
                f"httpx {httpx.__version__}")
    return {"machine": f"{hw}; {versions}", "hardware": hw, "versions": versions}


def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _mark(ok: bool | None) -> str:
    if ok is None:
        return ""
    return "[green]met[/green]" if ok else "[red]MISSED[/red]"


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / (1 << 20):.1f}"


STAGES = 8


@contextlib.contextmanager
def _stage(progress: ProgressCallback, i: int, what: str) -> Iterator[None]:
    """Advance the step counter on stderr (drawn only here, between stages: never while a stage measures)."""
    report(progress, "server benchmark", i, STAGES, note=what)
    yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer handshakes, requests and rows (< 1 minute)")
    ap.add_argument("--json", metavar="PATH", help="write the results as one flat JSON object")
    ap.add_argument("--_child", choices=["plain", "noaudit"], help=argparse.SUPPRESS)
    ap.add_argument("--prepared", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--audit-db", help=argparse.SUPPRESS)
    ap.add_argument("--no-monitor-scale", action="store_true",
                    help="skip the extraction monitor's memory at 10k client identities (benchmarks/_monitor_scale.py: "
                         "about 13 minutes on two cores; --quick runs it at 200 identities, deployed configuration)")
    args = ap.parse_args(argv)

    if args._child:
        prepared = json.loads(Path(args.prepared).read_text())
        if args._child == "plain":
            child_plain(prepared, args.port)
        else:
            child_noaudit(prepared, args.port, args.audit_db)
        return 0

    from rich.table import Table

    started = time.perf_counter()
    quick = args.quick
    info = machine_info()
    console = open_report(130, info)
    load_start = os.getloadavg()[0]
    busy0, total0 = _cpu_ticks()
    own0 = os.times()
    work = Path(tempfile.mkdtemp(prefix="edgeshield-srvbench-"))
    servers: dict[str, ServerProc] = {}
    stack = contextlib.ExitStack()
    progress = stack.enter_context(progress_bars(background=False))
    try:
        with _stage(progress, 0, "keys, bundle, CA, certificates (untimed)"):
            p = prepare(work, quick)
            (work / "prepared.json").write_text(json.dumps(p))
            bodies = _bodies()
        ports = {"secure": _free_port(), "plain": _free_port(), "secure_noaudit": _free_port(),
                 "secure_delay": _free_port(),
                 "secure_normal": _free_port()}
        me = [sys.executable, str(Path(__file__).resolve()), "--prepared", str(work / "prepared.json")]
        secure_db = work / "audit.db"
        argv = {
            "secure": [sys.executable, "-m", "edgeshield", "serve", p["bundle"], "--owner-key", p["owner_pub"],
                       "--device-key", p["device_key"], "--ca", p["ca"], "--cert", p["server_crt"], "--key",
                       p["server_key"], "--audit-db", str(secure_db), "--audit-key", p["audit_key"], "--host", HOST,
                       "--port", str(ports["secure"]), "--max-body", str(MAX_BODY), "--monitor-rules",
                       p["monitor_rules"], *UNCAPPED_FLAGS],
            "plain": [*me, "--_child", "plain", "--port", str(ports["plain"])],
            "secure_noaudit": [*me, "--_child", "noaudit", "--port", str(ports["secure_noaudit"]),
                               "--audit-db", str(work / "audit-noaudit.db")],
            # the same server with the audit log's durability relaxed to "normal" (survives kill -9, not power loss)
            "secure_normal": [sys.executable, "-m", "edgeshield", "serve", p["bundle"], "--owner-key", p["owner_pub"],
                              "--device-key", p["device_key"], "--ca", p["ca"], "--cert", p["server_crt"], "--key",
                              p["server_key"], "--audit-db", str(work / "audit-normal.db"), "--audit-key",
                              p["audit_key"], "--host", HOST, "--port", str(ports["secure_normal"]), "--max-body",
                              str(MAX_BODY), "--audit-durability", "normal", "--monitor-rules", p["monitor_rules"],
                              *UNCAPPED_FLAGS],
        }
        # the secure server again, its group-commit leader waiting COMMIT_DELAY_MS for company (scale phase only)
        delay_db = work / "audit-delay.db"
        argv["secure_delay"] = list(argv["secure"])
        argv["secure_delay"][argv["secure_delay"].index("--port") + 1] = str(ports["secure_delay"])
        argv["secure_delay"][argv["secure_delay"].index("--audit-db") + 1] = str(delay_db)
        argv["secure_delay"] += ["--audit-commit-delay-ms", str(COMMIT_DELAY_MS)]
        with _stage(progress, 1, "starting the four servers"):
            for name in argv:
                servers[name] = ServerProc(name, argv[name], ports[name], work / f"{name}.log")
            for name, s in servers.items():
                if name == "plain":
                    s.wait_ready(lambda s=s: http_client_probe(s.port))
                else:
                    s.wait_ready(lambda s=s: https_client_probe(p, s.port))
        secure, plain = servers["secure"], servers["plain"]
        rss_secure_started = secure.rss_after_start

        n_hs = _size("handshakes", quick)
        with _stage(progress, 2, f"handshakes ({n_hs} of each, alternating)"):
            ref = OpenSslServer(p, work / "openssl.log") if shutil.which("openssl") else None
            ref_port = None
            try:
                if ref is not None:
                    ref_port = _wait_openssl(p, ref)
                hs = bench_handshakes(p, secure, plain, n_hs, _deadline("handshakes", quick), ref_port)
            finally:
                if ref is not None:
                    ref.stop()
        with _stage(progress, 3, "requests: sequential and concurrent"):
            rq = bench_requests(p, {k: v for k, v in servers.items() if k != "secure_delay"}, quick, bodies)
        servers["secure_normal"].stop()
        with _stage(progress, 4, "audit log vs. plain SQLite"):
            au = bench_audit(work, _size("audit_rows", quick))
        with _stage(progress, 5, f"bounded load test ({_size('load_requests', quick)} requests)"):
            ld = bench_load(p, secure, quick, bodies)
        # After the load test, so that alice's load follows her request phase as before (a long idle gap, then a
        # burst, is what the monitor's rate-anomaly rule throttles); these clients are 128 other identities.
        with _stage(progress, 6, f"requests at {', '.join(map(str, SCALE_LEVELS))} keep-alive clients"):
            from edgeshield import transport

            scale_from = _entries(secure_db)

            ids = [transport.client_context(p["ca_crt"], cert, key) for cert, key in p["clients"]]
            ids = [ids[i % len(ids)] for i in range(max(SCALE_LEVELS))]
            sc = bench_concurrency({n: servers[n] for n in SCALE_SERVERS},
                                   {"secure": list(ids), "secure_noaudit": list(ids), "plain": [None] * len(ids),
                                    "secure_delay": list(ids)},
                                   bodies[0], SCALE_LEVELS, _size("scale_run_s", quick),
                                   warm_s=0.15 if quick else 0.5)
        servers["secure_noaudit"].stop()
        servers["secure_delay"].stop()
        secure_exit = secure.stop()
        plain.stop()
        ac = audit_check(p, secure_db)
        groups = {"secure": _commit_groups(secure_db, scale_from), "secure_delay": _commit_groups(delay_db, 0)}
        log_tail = secure.log_path.read_text(errors="replace")
        server_tracebacks = log_tail.count("Traceback")
        with _stage(progress, 7, "audit log at 1/8/64 writers; verification as the log grows (servers stopped)"):
            ap = bench_appends(work, work / "audit.key", APPEND_LEVELS, _size("append_total", quick))
            vs = bench_verify(work, work / "audit.key", VERIFY_SIZES[quick], _size("verify_incremental", quick))
    finally:
        stack.close()
        for s in servers.values():
            if s.proc.poll() is None:
                s.stop()
        shutil.rmtree(work, ignore_errors=True)

    busy1, total1 = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    own1 = os.times()
    own_cpu = (own1.user + own1.system + own1.children_user + own1.children_system
               - own0.user - own0.system - own0.children_user - own0.children_system)
    # the server subprocesses were reaped above, so their CPU time is in os.times()' children_* (own_cpu)
    others_cpu_s = max(0.0, (busy1 - busy0) / hz - own_cpu)
    machine_cpu_s = (total1 - total0) / hz

    # predictions the clients saw answered 200 on the secure server, across every phase, for the audit cross-check
    sec_seq, sec_conc = rq["seq_secure"], rq["conc_secure"]
    predicts_200 = (rq["warm_200_secure"] + sec_seq["requests"] - sec_seq["errors"] + rq["conc_warm_200_secure"]
                    + sec_conc["requests"] - sec_conc["errors"] + ld["predict_200"]
                    + sum(sc[f"secure_c{n}"]["ok_all"] for n in SCALE_LEVELS))
    kinds = ac["kinds"]
    r: dict[str, Any] = {
        "quick": quick, "machine": info["machine"], "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
        # handshakes
        "handshakes_n": hs["full"]["n"],
        "tcp_connect_p50_ms": hs["tcp"]["p50"], "tcp_connect_p99_ms": hs["tcp"]["p99"],
        "handshake_p50_ms": hs["full"]["p50"], "handshake_p99_ms": hs["full"]["p99"],
        "handshake_only_p50_ms": hs["full_hs_only"]["p50"],
        "resumed_handshake_p50_ms": hs["resumed"]["p50"], "resumed_handshake_p99_ms": hs["resumed"]["p99"],
        "resumed_handshake_only_p50_ms": hs["resumed_hs_only"]["p50"],
        "resumption_fraction": hs["resumption_fraction"], "resumption_attempts": hs["resumption_attempts"],
        "full_first_response_p50_ms": hs["full_first"]["p50"], "full_first_response_p99_ms": hs["full_first"]["p99"],
        "resumed_first_response_p50_ms": hs["resumed_first"]["p50"],
        "resumed_first_response_p99_ms": hs["resumed_first"]["p99"],
        "plain_first_response_p50_ms": hs["plain_first"]["p50"],
        "plain_first_response_p99_ms": hs["plain_first"]["p99"],
        "openssl_s_server_handshake_p50_ms": hs["ref_full"]["p50"],
        "openssl_s_server_handshake_p99_ms": hs["ref_full"]["p99"],
        "openssl_s_server_resumed_handshake_p50_ms": hs["ref_resumed"]["p50"],
        "openssl_s_server_resumed_handshake_p99_ms": hs["ref_resumed"]["p99"],
        "openssl_s_server_resumption_fraction": hs["ref_resumption_fraction"],
        "server_cpu_ms_per_full_connection": hs["server_cpu_ms_full"],
        "server_cpu_ms_per_resumed_connection": hs["server_cpu_ms_resumed"],
        "plain_server_cpu_ms_per_connection": hs["server_cpu_ms_plain"],
        "client_cpu_ms_per_full_connection": hs["client_cpu_ms_full"],
        "client_cpu_ms_per_resumed_connection": hs["client_cpu_ms_resumed"],
        "handshake_target_p50_ms": TARGET_FULL_HS_MS, "resumed_handshake_target_p50_ms": TARGET_RESUMED_HS_MS,
        "handshake_target_met": hs["full"]["p50"] is not None and hs["full"]["p50"] <= TARGET_FULL_HS_MS,
        "resumed_handshake_target_met": (hs["resumed"]["p50"] is not None
                                         and hs["resumed"]["p50"] <= TARGET_RESUMED_HS_MS),
    }
    for mode in ("seq", "conc"):
        for name in (n for n in servers if n != "secure_delay"):  # the delayed server runs the scale phase only
            m = rq[f"{mode}_{name}"]
            pre = f"{mode}_{name}" if mode == "conc" else name
            r.update({f"{pre}_rps": m["rps"], f"{pre}_p50_ms": m["p50"], f"{pre}_p99_ms": m["p99"],
                      f"{pre}_requests": m["requests"], f"{pre}_errors": m["errors"],
                      f"{pre}_server_cpu_ms_per_req": m["server_cpu_ms_per_req"]})
    r["conc_threads"] = rq["conc_secure"]["threads"]
    r["secure_vs_plain_rps_ratio"] = r["secure_rps"] / r["plain_rps"]
    r["conc_secure_vs_plain_rps_ratio"] = r["conc_secure_rps"] / r["conc_plain_rps"]
    r["secure_noaudit_vs_plain_rps_ratio"] = r["secure_noaudit_rps"] / r["plain_rps"]
    r["secure_normal_vs_plain_rps_ratio"] = r["secure_normal_rps"] / r["plain_rps"]
    r["rps_ratio_target"] = TARGET_RPS_RATIO
    r["rps_ratio_target_met"] = r["secure_vs_plain_rps_ratio"] >= TARGET_RPS_RATIO
    r["secure_overhead_p50_ms"] = r["secure_p50_ms"] - r["plain_p50_ms"]
    r["audit_share_of_overhead_p50_ms"] = r["secure_p50_ms"] - r["secure_noaudit_p50_ms"]
    r.update({
        "audit_rows": au["audit"]["n"], "audit_row_bytes": au["row_bytes"],
        "audit_appends_per_s": au["audit"]["per_s"], "audit_append_p50_ms": au["audit"]["p50"],
        "audit_append_p99_ms": au["audit"]["p99"],
        "sqlite_inserts_per_s": au["sqlite_full"]["per_s"], "sqlite_insert_p50_ms": au["sqlite_full"]["p50"],
        "sqlite_insert_p99_ms": au["sqlite_full"]["p99"],
        "sqlite_normal_inserts_per_s": au["sqlite_normal"]["per_s"],
        "sqlite_normal_insert_p50_ms": au["sqlite_normal"]["p50"],
        "sqlite_normal_insert_p99_ms": au["sqlite_normal"]["p99"],
        "audit_vs_sqlite_ratio": au["audit"]["per_s"] / au["sqlite_full"]["per_s"],
        "fsync_p50_ms": au["fsync"]["p50"], "fsync_p99_ms": au["fsync"]["p99"],
    })
    r.update({
        "load_requests": ld["requests"], "load_planned": ld["planned"], "load_threads": ld["threads"],
        "load_wall_s": ld["wall_s"], "load_rps": ld["rps"], "load_5xx": ld["n_5xx"],
        "load_transport_errors": ld["n_transport_errors"], "load_malformed": ld["malformed"],
        "load_malformed_4xx": ld["malformed_4xx"], "load_unexpected_status": ld["unexpected"],
        "load_status_counts": json.dumps(ld["statuses"], sort_keys=True),
        "load_server_alive": ld["alive"], "load_server_cpu_s": ld["server_cpu_s"],
        "server_rss_after_start_mib": (rss_secure_started or 0) / (1 << 20),
        "load_rss_start_mib": ld["rss_start"] / (1 << 20),
        "load_rss_mid_mib": None if ld["rss_mid"] is None else ld["rss_mid"] / (1 << 20),
        "load_rss_end_mib": None if ld["rss_end"] is None else ld["rss_end"] / (1 << 20),
        "load_rss_max_mib": None if ld["rss_max"] is None else ld["rss_max"] / (1 << 20),
        "load_rss_growth_mib": None if ld["rss_end"] is None else (ld["rss_end"] - ld["rss_start"]) / (1 << 20),
        "secure_server_exit_code": secure_exit, "secure_server_log_tracebacks": server_tracebacks,
        "audit_log_entries": ac["entries"], "audit_log_checkpoints": ac["checkpoints"],
        "audit_log_verified": True, "audit_log_signatures_checked": ac["signatures_checked"],
        "audit_log_verify_s": ac["verify_s"],
        "audit_kinds": json.dumps(kinds, sort_keys=True),
        "audit_predict_entries": kinds.get("inference.predict", 0), "client_predict_200s": predicts_200,
        "audit_rejected_entries": kinds.get("input.rejected", 0), "client_422s": ld["n_422"],
        "audit_forbidden_entries": kinds.get("auth.forbidden", 0) + ac["refused_403"], "client_403s": ld["n_403"],
        "audit_monitor_refused_403_entries": ac["refused_403"],
        "audit_auth_failure_entries": kinds.get("auth.failure", 0),
        "audit_matches_clients": (kinds.get("inference.predict", 0) == predicts_200
                                  and kinds.get("input.rejected", 0) == ld["n_422"]
                                  and kinds.get("auth.forbidden", 0) + ac["refused_403"] == ld["n_403"]),
    })
    # ---- scale: servers at 1/16/128 clients, appends at 1/8/64 writers, verification as the log grows ------------
    vsz = VERIFY_SIZES[quick]
    r["scale"] = (f"{'quick' if quick else 'full'}: servers at {'/'.join(map(str, SCALE_LEVELS))} keep-alive clients "
                  f"({len(p['clients'])} identities) "
                  f"for {_size('scale_run_s', quick)} s each; appends at {'/'.join(map(str, APPEND_LEVELS))} writers, "
                  f"{_size('append_total', quick)} per level; full verify at {'/'.join(f'{x:,}' for x in vsz)} "
                  f"entries (the *_1m key holds the largest); incremental verify of "
                  f"{_size('verify_incremental', quick):,} new entries on top of the largest")
    for n in SCALE_LEVELS:
        for name in SCALE_SERVERS:
            m = sc[f"{name}_c{n}"]
            r.update({f"scale_{name}_c{n}_rps": m["rps"], f"scale_{name}_c{n}_p50_ms": m["p50_ms"],
                      f"scale_{name}_c{n}_p99_ms": m["p99_ms"], f"scale_{name}_c{n}_errors": m["errors"],
                      f"scale_{name}_c{n}_requests": m["requests"],
                      f"scale_{name}_c{n}_server_cpu_ms_per_req": m["server_cpu_ms_per_req"]})
        r[f"secure_vs_plain_rps_ratio_c{n}"] = _ratio(sc[f"secure_c{n}"]["rps"], sc[f"plain_c{n}"]["rps"])
        r[f"audit_vs_noaudit_rps_ratio_c{n}"] = _ratio(sc[f"secure_c{n}"]["rps"], sc[f"secure_noaudit_c{n}"]["rps"])
        r[f"audit_delay_vs_noaudit_rps_ratio_c{n}"] = _ratio(sc[f"secure_delay_c{n}"]["rps"],
                                                             sc[f"secure_noaudit_c{n}"]["rps"])
        r[f"secure_noaudit_vs_plain_rps_ratio_c{n}"] = _ratio(sc[f"secure_noaudit_c{n}"]["rps"],
                                                              sc[f"plain_c{n}"]["rps"])
    r["audit_commit_delay_ms"] = COMMIT_DELAY_MS
    for name, g in groups.items():  # entries per committed transaction in the scale phase (one timestamp each)
        r[f"scale_{name}_entries_per_commit_mean"] = g["mean"]
        r[f"scale_{name}_entries_per_commit_p90"] = g["p90"]
        r[f"scale_{name}_commits"] = g["commits"]
    r["secure_vs_plain_rps_ratio_c16_target"] = TARGET_SECURE_VS_PLAIN_C16
    r["secure_vs_plain_rps_ratio_c16_target_met"] = ((r["secure_vs_plain_rps_ratio_c16"] or 0)
                                                      >= TARGET_SECURE_VS_PLAIN_C16)
    r["audit_vs_noaudit_rps_ratio_c16_target"] = TARGET_AUDIT_VS_NOAUDIT_C16
    r["audit_vs_noaudit_rps_ratio_c16_target_met"] = ((r["audit_vs_noaudit_rps_ratio_c16"] or 0)
                                                      >= TARGET_AUDIT_VS_NOAUDIT_C16)
    for n in APPEND_LEVELS:
        a, q, b = ap[f"audit_c{n}"], ap[f"sqlite_c{n}"], ap[f"sqlite_batched_c{n}"]
        r.update({f"audit_appends_per_s_c{n}": a["per_s"], f"audit_append_p50_ms_c{n}": a["p50_ms"],
                  f"audit_append_p99_ms_c{n}": a["p99_ms"], f"audit_append_cpu_us_c{n}": a["cpu_us_per_append"],
                  f"sqlite_commits_per_s_c{n}": q["per_s"], f"sqlite_commit_p99_ms_c{n}": q["p99_ms"],
                  f"sqlite_batched_rows_per_s_c{n}": b["per_s"],
                  f"audit_vs_sqlite_ratio_c{n}": a["per_s"] / q["per_s"]})
    r["audit_appends_per_s_c64_target"] = TARGET_APPENDS_C64
    r["audit_appends_per_s_c64_target_met"] = r["audit_appends_per_s_c64"] >= TARGET_APPENDS_C64
    names = ("10k", "100k", "1m")
    for label, size in zip(names, vsz, strict=True):
        r[f"audit_verify_full_s_{label}"] = vs[f"full_{size}"]["s"]
        r[f"audit_verify_full_entries_{label}"] = vs[f"full_{size}"]["entries"]
    r["audit_verify_full_us_per_entry_1m"] = 1e6 * vs[f"full_{vsz[-1]}"]["s"] / vs[f"full_{vsz[-1]}"]["entries"]
    r["audit_verify_incremental_s_10k_of_1m"] = vs["incremental"]["s"]
    r["audit_verify_incremental_new_entries"] = vs["incremental"]["new_entries"]
    r["audit_verify_incremental_from_size"] = vs["incremental"]["from_size"]
    r["audit_verify_incremental_us_per_new_entry"] = 1e6 * vs["incremental"]["s"] / vs["incremental"]["new_entries"]
    r["audit_bulk_append_entries_per_s"] = vs["build_entries_per_s"]
    r["audit_verify_scale_db_mib"] = vs["db_bytes"] / (1 << 20)
    r["wall_s"] = time.perf_counter() - started
    r["loadavg_1min_start"] = load_start
    r["loadavg_1min_end"] = os.getloadavg()[0]
    r["other_processes_cpu_share"] = others_cpu_s / machine_cpu_s if machine_cpu_s else None

    # ---- print ---------------------------------------------------------------------------------------------------
    t = Table(title=f"1. Connection set-up to the secure server, {hs['full']['n']} each, alternating (ms)")
    for col in ("what", "p50", "p99", "mean", "target (p50)", ""):
        t.add_column(col, justify="left" if col in ("what", "") else "right")
    rows = [
        ("TCP connect only", hs["tcp"], None),
        ("TCP connect + full mTLS 1.3 handshake (ECDSA P-256, client cert)", hs["full"], TARGET_FULL_HS_MS),
        ("  of which the TLS handshake alone", hs["full_hs_only"], None),
        ((f"TCP connect + resumed handshake ({100 * (hs['resumption_fraction'] or 0):.1f} % of "
          f"{hs['resumption_attempts']} attempts resumed)"), hs["resumed"], TARGET_RESUMED_HS_MS),
        ("  of which the TLS handshake alone", hs["resumed_hs_only"], None),
        ("full handshake + first response (GET /healthz)", hs["full_first"], None),
        ("resumed handshake + first response (GET /healthz)", hs["resumed_first"], None),
        ("plain server: TCP connect + first response (GET /healthz)", hs["plain_first"], None),
    ]
    if hs["ref_full"]["n"]:
        rows += [
            ("reference, openssl s_server (C), same certs: TCP connect + full handshake", hs["ref_full"], None),
            ((f"reference, openssl s_server: TCP connect + resumed handshake "
              f"({100 * (hs['ref_resumption_fraction'] or 0):.1f} % resumed)"), hs["ref_resumed"], None),
        ]
    for what, m, target in rows:
        t.add_row(what, _fmt(m["p50"], 3), _fmt(m["p99"], 3), _fmt(m["mean"], 3),
                  "-" if target is None else f"≤ {target}",
                  "" if target is None else _mark(m["p50"] is not None and m["p50"] <= target))
    console.print(t)
    console.print(
        f"CPU per connection + one GET /healthz (ms): secure server {_fmt(hs['server_cpu_ms_full'])} full / "
        f"{_fmt(hs['server_cpu_ms_resumed'])} resumed, plain server {_fmt(hs['server_cpu_ms_plain'])}; "
        f"client (Python ssl) {_fmt(hs['client_cpu_ms_full'])} full / {_fmt(hs['client_cpu_ms_resumed'])} resumed. "
        "The client's handshake ends when it has sent its Finished; the server verifies the client certificate "
        "(chain + CRL) after that, which the 'first response' rows include."
    )

    t = Table(title="2. POST /v1/predict, 1 digit per request, JSON body, httpx keep-alive")
    for col in ("server", "mode", "requests", "errors", "req/s", "p50 ms", "p99 ms", "server CPU ms/req",
                "÷ plain req/s", "target", ""):
        t.add_column(col, justify="left" if col in ("server", "mode", "") else "right")
    labels = {"secure": "secure", "plain": "plain", "secure_noaudit": "secure, no audit",
              "secure_normal": "secure, audit normal", "secure_delay": f"secure, commit delay {COMMIT_DELAY_MS} ms"}
    for mode, mlabel in (("seq", "sequential"), ("conc", f"{r['conc_threads']} threads")):
        for name in ("secure", "secure_normal", "secure_noaudit", "plain"):
            m = rq[f"{mode}_{name}"]
            ratio = m["rps"] / rq[f"{mode}_plain"]["rps"]
            target = mode == "seq" and name == "secure"
            t.add_row(labels[name], mlabel, str(m["requests"]), str(m["errors"]), _fmt(m["rps"], 0),
                      _fmt(m["p50"], 3), _fmt(m["p99"], 3), _fmt(m["server_cpu_ms_per_req"], 3),
                      "" if name == "plain" else _fmt(ratio, 3), f"≥ {TARGET_RPS_RATIO}" if target else "",
                      _mark(ratio >= TARGET_RPS_RATIO) if target else "")
    console.print(t)
    console.print(
        "secure = edgeshield serve (mTLS 1.3 + RBAC + validation + audit commit, synchronous=FULL, per request); "
        "secure, audit normal = --audit-durability normal (no fsync per entry: survives a killed process, not a "
        "power cut); secure, no audit = the same with state.audit = None; plain = the same app over plain HTTP, no "
        "RBAC, no "
        "validation, no audit. Sequential: one keep-alive client, alternating blocks."
    )
    console.print(
        f"secure − plain p50 = {r['secure_overhead_p50_ms']:.3f} ms per request, of which the audit commit "
        f"(secure − secure-no-audit) = {r['audit_share_of_overhead_p50_ms']:.3f} ms; an AuditLog.append alone "
        f"costs {r['audit_append_p50_ms']:.3f} ms p50 (table 3)."
    )

    t = Table(title=f"3. Audit log vs. plain SQLite, {au['audit']['n']} committed rows each "
                    f"(~{au['row_bytes']:.0f} B/row), WAL")
    for col in ("what", "rows/s", "p50 ms", "p99 ms"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for what, m in (("AuditLog.append (chain hash + Merkle frontier + Ed25519 checkpoint/100, FULL)", au["audit"]),
                    ("plain INSERT + COMMIT, synchronous=FULL", au["sqlite_full"]),
                    ("plain INSERT + COMMIT, synchronous=NORMAL", au["sqlite_normal"])):
        t.add_row(what, _fmt(m["per_s"], 0), _fmt(m["p50"], 3), _fmt(m["p99"], 3))
    t.add_row("raw os.fsync of a 256 B append (reference)", _fmt(1000 / au["fsync"]["p50"], 0),
              _fmt(au["fsync"]["p50"], 3), _fmt(au["fsync"]["p99"], 3))
    console.print(t)

    t = Table(title=f"2b. POST /v1/predict at {'/'.join(map(str, SCALE_LEVELS))} concurrent keep-alive clients, each "
                    f"its own identity, {_size('scale_run_s', quick)} s per cell (asyncio client)")
    for col in ("clients", "server", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "÷ plain", "audit ÷ no audit",
                "target", ""):
        t.add_column(col, justify="left" if col in ("server", "") else "right")
    for n in SCALE_LEVELS:
        for name in SCALE_SERVERS:
            m = sc[f"{name}_c{n}"]
            target = ""
            mark = ""
            if n == 16 and name == "secure":
                target = f"≥ {TARGET_SECURE_VS_PLAIN_C16} / ≥ {TARGET_AUDIT_VS_NOAUDIT_C16}"
                mark = _mark(r["secure_vs_plain_rps_ratio_c16_target_met"]
                             and r["audit_vs_noaudit_rps_ratio_c16_target_met"])
            t.add_row(str(n), labels[name], _fmt(m["rps"], 0), _fmt(m["p50_ms"], 2), _fmt(m["p99_ms"], 2),
                      _fmt(m["server_cpu_ms_per_req"], 3),
                      "" if name == "plain" else _fmt(_ratio(m["rps"], sc[f"plain_c{n}"]["rps"]), 3),
                      _fmt(r[f"audit_{'delay_' if name == 'secure_delay' else ''}vs_noaudit_rps_ratio_c{n}"], 3)
                      if name in ("secure", "secure_delay") else "", target, mark)
    console.print(t)
    console.print("Audit entries per group commit over the scale phase (entries sharing one commit timestamp): "
                  + "; ".join(f"{labels[k]} mean {r[f'scale_{k}_entries_per_commit_mean']:.2f}, p90 "
                              f"{r[f'scale_{k}_entries_per_commit_p90']:.0f} over {r[f'scale_{k}_commits']:,} commits"
                              for k in groups))

    t = Table(title=f"3b. Durable appends at {'/'.join(map(str, APPEND_LEVELS))} concurrent writers (WAL, "
                    "synchronous=FULL), one run")
    for col in ("writers", "AuditLog.append (group commit)/s", "p99 ms", "CPU µs/append", "plain SQLite commit/s",
                "÷ plain", "SQLite, writers rows per txn/s", "target", ""):
        t.add_column(col, justify="right" if col not in ("",) else "left")
    for n in APPEND_LEVELS:
        t.add_row(str(n), _fmt(r[f"audit_appends_per_s_c{n}"], 0), _fmt(r[f"audit_append_p99_ms_c{n}"], 2),
                  _fmt(r[f"audit_append_cpu_us_c{n}"], 0), _fmt(r[f"sqlite_commits_per_s_c{n}"], 0),
                  _fmt(r[f"audit_vs_sqlite_ratio_c{n}"], 2), _fmt(r[f"sqlite_batched_rows_per_s_c{n}"], 0),
                  f"≥ {TARGET_APPENDS_C64:,}" if n == 64 else "",
                  _mark(r["audit_appends_per_s_c64_target_met"]) if n == 64 else "")
    console.print(t)

    t = Table(title="3c. Verification as the log grows (built through AuditLog.append_many, checkpoint every 100)")
    for col in ("what", "entries", "seconds", "µs/entry"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for size in vsz:
        m = vs[f"full_{size}"]
        t.add_row("full audit verify (chain, every checkpoint and signature, quick_check)", f"{m['entries']:,}",
                  _fmt(m["s"], 2), _fmt(1e6 * m["s"] / m["entries"], 1))
    inc = vs["incremental"]
    t.add_row(f"incremental, from the witness-cosigned checkpoint at {inc['from_size']:,}",
              f"{inc['new_entries']:,} new", _fmt(inc["s"], 3), _fmt(1e6 * inc["s"] / inc["new_entries"], 1))
    console.print(t)
    console.print(f"bulk path: {vs['appended_entries']:,} entries appended at {_fmt(vs['build_entries_per_s'], 0)}/s "
                  f"(10k per transaction); log file {r['audit_verify_scale_db_mib']:.0f} MiB.")

    t = Table(title=f"4. Bounded load test on the secure server: {ld['requests']} of {ld['planned']} requests, "
                    f"{ld['threads']} threads, 20 % malformed")
    t.add_column("kind")
    t.add_column("expected", justify="right")
    t.add_column("got", justify="left")
    by_kind: dict[str, list[str]] = {}
    for key, v in ld["statuses"].items():
        kind, code = key.split(":", 1)
        by_kind.setdefault(kind, []).append(f"{code} × {v}")
    for kind in ("valid", *MALFORMED_KINDS):
        t.add_row(kind, str(EXPECTED[kind]), ", ".join(by_kind.get(kind, ["-"])))
    console.print(t)
    t = Table(title="Load test outcome")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("")
    t.add_row("requests / wall s / req/s", f"{ld['requests']} / {ld['wall_s']:.1f} / {ld['rps']:.0f}", "")
    t.add_row("5xx", str(ld["n_5xx"]), _mark(ld["n_5xx"] == 0))
    t.add_row("transport errors (client side)", str(ld["n_transport_errors"]), _mark(ld["n_transport_errors"] == 0))
    t.add_row("malformed answered 4xx", f"{ld['malformed_4xx']} / {ld['malformed']}",
              _mark(ld["malformed_4xx"] == ld["malformed"]))
    t.add_row("status not the expected one", str(ld["unexpected"]), _mark(ld["unexpected"] == 0))
    t.add_row("server alive afterwards (process up, /healthz 200)", str(ld["alive"]), _mark(ld["alive"]))
    t.add_row("server RSS MiB: after start-up / load start / middle / end / max",
              f"{_mib(rss_secure_started)} / {_mib(ld['rss_start'])} / {_mib(ld['rss_mid'])} / "
              f"{_mib(ld['rss_end'])} / {_mib(ld['rss_max'])}", "")
    t.add_row("RSS growth during the load test, MiB", _fmt(r["load_rss_growth_mib"], 1), "")
    t.add_row("SIGTERM exit code", str(secure_exit), _mark(secure_exit == 0))
    t.add_row("audit log verify (chain + signed checkpoints)",
              f"ok: {ac['entries']} entries, {ac['checkpoints']} checkpoints, {ac['verify_s'] * 1000:.0f} ms", "")
    t.add_row("audit entries = client-seen codes (predict 200 / 422 / 403: auth.forbidden + monitor.refused)",
              f"{r['audit_predict_entries']}={predicts_200} / {r['audit_rejected_entries']}={ld['n_422']} / "
              f"{r['audit_forbidden_entries']}={ld['n_403']}", _mark(r["audit_matches_clients"]))
    t.add_row("auth.failure entries (TLS-level; handshake phase)", str(r["audit_auth_failure_entries"]), "")
    t.add_row("tracebacks in the server log", str(server_tracebacks), _mark(server_tracebacks == 0))
    console.print(t)

    console.print(
        f"{'quick' if quick else 'full'} run, {r['wall_s']:.1f} s. Client (this process) and each server are "
        f"separate processes on {os.cpu_count()} CPUs: with few cores the client's own CPU time competes with the "
        f"server's, which compresses the plain server's lead. Background: other processes used "
        f"{100 * (r['other_processes_cpu_share'] or 0):.0f}% of the machine's CPU during the run; 1-min load average "
        f"{load_start:.2f} at start, {r['loadavg_1min_end']:.2f} at end."
    )
    if not args.no_monitor_scale:
        # the extraction monitor's memory, driven through the library in fresh children (after the servers are gone)
        from _monitor_scale import monitor_scale

        with console.status("extraction monitor: memory with many client identities"):
            ms = (monitor_scale(True, parallel=2, configs=("deployed",), clients=200) if quick
                  else monitor_scale(False, parallel=2))
        r.update(ms)
        console.print(f"Extraction monitor ({ms['monitor_scale']}, deployed cap and state file): resident set grew "
                      f"{ms['monitor_rss_growth_mb_10k_clients']:.1f} MB "
                      f"({ms['monitor_deployed_bytes_per_client'] / 1000:.1f} kB per client held); one PRADA client "
                      f"filled to its bounds {ms['prada_full_client_mb']:.2f} MB. Details: docs/extraction.md.")
    write_report(console, args.json, r)
    return 0


def _wait_openssl(p: dict[str, Any], ref: OpenSslServer, timeout_s: float = 10.0) -> int | None:
    """The reference server's port once it answers, or None (then the reference rows are left out)."""
    ctx = client_ctx(p)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and ref.proc.poll() is None:
        try:
            _tls_trial(ctx, ref.port, None, "/")
            return ref.port
        except (OSError, RuntimeError):
            time.sleep(0.1)
    return None


def http_client_probe(port: int) -> bool:
    with http_client(port) as c:
        return c.get("/healthz").status_code == 200


def https_client_probe(p: dict[str, Any], port: int) -> bool:
    with https_client(p, port) as c:
        return c.get("/healthz").status_code == 200


if __name__ == "__main__":
    sys.exit(main())
