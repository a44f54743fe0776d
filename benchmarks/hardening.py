"""Benchmark: the negative matrices of issue 9 against a real `edgeshield serve`, in one run.

    python benchmarks/hardening.py [--quick] [--json PATH]

Protocol (fixed; every figure comes from this run; all traffic goes to 127.0.0.1):

0. Set-up (untimed): fresh keys, the shipped digits model protected *without* an input spec (the README's first
   example: the server derives the spec from the model), a fresh device CA with certificates for an honest client,
   an attacker, a fuzzer (admin role, so no request is refused by RBAC alone) and one certificate to revoke; a
   ``serve.toml`` with small connection limits (per address 32, per identity 8, handshake and request-head deadlines
   2 s, body 3 s; handshakes 200/s per address, so the fuzzer's reconnections are never refused). The server is a
   subprocess (`python -m edgeshield serve --config serve.toml`).
1. Fuzz: ``fuzz_requests`` requests from a seeded generator through mutual TLS: random JSON trees (wrapped in
   ``{"inputs": ...}`` or not), numeric batches of random shapes with huge, tiny and long numbers, random bytes under
   JSON / .npy / other content types, .npy headers claiming random dtypes and shapes up to 4e8 x 64, nesting up to
   200,000 deep, 400- to 5,000-digit numbers, random methods and paths, oversized declared and streamed bodies, and
   raw HTTP framing errors on fresh TLS connections. ``fuzz_5xx`` counts answers >= 500 (target 0).
2. Slow attack: for ``attack_s`` seconds one address (127.0.0.2, identity ``mallory``) keeps opening stalled TCP
   connections (no ClientHello), authenticated idle connections, slowloris connections (a header line every 0.5 s)
   and slow-body uploads, replacing each one the server closes, as many as the caps let it hold.
   ``slow_attack_connections`` is the most it held open at once, by the server's own count (the
   ``edgeshield_connections_busiest_address`` gauge, read every 50 ms from another address). Meanwhile an honest client
   (127.0.0.3, identity ``alice``) sends one prediction every 100 ms; ``honest_served_during_slow_attack`` is the
   fraction answered 200 within 2 s (target 1.0).
3. Revocation: 4 connections of one identity are opened and used (200), the certificate is revoked with
   `edgeshield pki revoke --name` (the running server reloads crl.pem), then each connection sends 4 more requests;
   ``revoked_requests_answered`` counts 200s among those 16 (target 0).
4. Audit tampering: ``benchmarks/_audit_tamper.py`` runs each tampering case on a fresh signed log;
   ``audit_tamper_undetected`` counts the cases nobody caught outside those the docs name as undetectable without a
   witness (target 0).
Finally SIGTERM (exit 0) and `audit verify --require-checkpoint` of the server's own log.

``--quick`` fuzzes 400 requests and attacks for 6 s (about a minute); the full run 3,000 and 20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import edgeshield  # before onnxruntime: switches its telemetry off
from edgeshield._progress import ProgressCallback, report
from edgeshield.cli._progress import progress_bars

from _machine import hardware, open_report, write_report  # benchmarks/_machine.py, beside this script

HOST, ATTACKER, HONEST = "127.0.0.1", "127.0.0.2", "127.0.0.3"
# Small caps, so the attack reaches them; a handshake rate high enough for the fuzzer, which reconnects after every
# refusal that closes its connection (413, 408) — the rate cap itself is tested in tests/server/test_listener.py.
LIMITS = {"max-connections-per-address": 32, "max-connections-per-identity": 8, "handshake-timeout": 2.0,
          "request-head-timeout": 2.0, "body-timeout": 3.0, "max-body": 65536, "handshake-rate": 200.0,
          "handshake-burst": 200}
SIZES = {"fuzz": (400, 3000), "attack_s": (6, 20)}
STAGES = 6


def _size(name: str, quick: bool) -> int:
    return SIZES[name][0 if quick else 1]


# --- set-up -------------------------------------------------------------------------------------------------------
def prepare(work: Path) -> dict[str, Any]:
    from edgeshield import audit, bundles, keys, transport
    from edgeshield.models import digits_model_path

    k = work / "keys"
    keys.init_keys(k)
    bundles.protect(digits_model_path(), work / "digits.esb", signing_key=keys.load_owner_private_key(k / "owner.key"),
                    recipients=[keys.load_device_public_key(k / "device.pub")])
    ca = work / "ca"
    transport.init_ca(ca)
    transport.issue(ca, name="edge-1", role="server", server=True, sans=[HOST])
    for name, role in (("alice", "client"), ("mallory", "client"), ("fuzzer", "admin"), ("revokee", "client")):
        transport.issue(ca, name=name, role=role)
    audit.generate_signing_key(work / "audit.key")
    port = _free_port()
    lines = {"bundle": "digits.esb", "owner-key": "keys/owner.pub", "device-key": "keys/device.key", "ca": "ca",
             "cert": "ca/issued/edge-1.crt", "key": "ca/issued/edge-1.key", "audit-db": "audit.db",
             "audit-key": "audit.key", "port": port, "log-level": "warning", "crl-poll": 0.2, **LIMITS}
    (work / "serve.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in lines.items()))
    return {"work": work, "ca": ca, "port": port}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _ctx(p: dict[str, Any], name: str) -> ssl.SSLContext:
    from edgeshield import transport

    issued = p["ca"] / "issued"
    return transport.client_context(p["ca"] / "ca.crt", issued / f"{name}.crt", issued / f"{name}.key")


def _client(p: dict[str, Any], name: str, source: str = HOST, timeout: float = 10.0) -> Any:
    import httpx

    return httpx.Client(base_url=f"https://{HOST}:{p['port']}", timeout=timeout,
                        transport=httpx.HTTPTransport(verify=_ctx(p, name), local_address=source))


def start_server(p: dict[str, Any]) -> subprocess.Popen[bytes]:
    log = open(p["work"] / "server.log", "wb")  # noqa: SIM115 - the process owns it until it exits
    proc = subprocess.Popen([sys.executable, "-m", "edgeshield", "serve", "--config", str(p["work"] / "serve.toml")],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((p["work"] / "server.log").read_text(errors="replace")[-2000:])
        try:
            with _client(p, "alice") as c:
                if c.get("/healthz").status_code == 200:
                    return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError("server not ready after 60 s")


# --- 1. fuzz ------------------------------------------------------------------------------------------------------
def _json_tree(rng: np.random.Generator, depth: int = 0) -> Any:
    kind = rng.integers(0, 9 if depth < 5 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.integers(-2**62, 2**62)) * int(rng.choice([1, 10**int(rng.integers(0, 40))]))
    if kind == 3:
        return float(rng.choice([rng.normal() * 10.0 ** rng.integers(-300, 300), 0.0, -0.0, 1e308]))
    if kind == 4:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, size=rng.integers(0, 8)))
    if kind in (5, 6, 7):
        return [_json_tree(rng, depth + 1) for _ in range(rng.integers(0, 6))]
    keys = ["inputs", "x", "", "\u0000", "inputs "]
    return {str(rng.choice(keys)): _json_tree(rng, depth + 1) for _ in range(rng.integers(0, 3))}


def _numeric_batch(rng: np.random.Generator) -> bytes:
    n, width = int(rng.integers(0, 40)), int(rng.choice([0, 1, 63, 64, 64, 64, 65, 200]))
    x = rng.normal(size=(n, width)) * 10.0 ** rng.integers(-40, 40, size=(n, width))
    rows: Any = x.tolist()
    if rows and rng.random() < 0.3:
        rows[int(rng.integers(0, len(rows)))] = rows[0][:-1] if rows[0] else [1.0]  # ragged
    if rng.random() < 0.3:
        rows = [rows]  # one level too deep
    return json.dumps({"inputs": rows}).encode()


def _npy_claim(rng: np.random.Generator) -> bytes:
    dtype = np.dtype(str(rng.choice(["<f4", "<f8", ">f4", "<i8", "|u1", "<U8", "|b1", "<c8"])))
    shape = tuple(int(d) for d in rng.choice([0, 1, 2, 64, 65, 1000, 400_000_000], size=rng.integers(0, 4)))
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": bool(rng.integers(0, 2)), "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + rng.bytes(int(rng.choice([0, 1, 256, 4096, 65536])))


def fuzz_cases(n: int, seed: int = 20261201) -> list[tuple[str, str, str, dict[str, str], bytes]]:
    """(category, method, path, headers, body) for ``n`` seeded requests."""
    rng = np.random.default_rng(seed)
    cases = []
    json_h, npy_h = {"content-type": "application/json"}, {"content-type": "application/x-npy"}
    for i in range(n):
        kind = i % 8
        if kind == 0:
            tree = _json_tree(rng)
            cases.append(("json-tree", "POST", "/v1/predict", json_h,
                          json.dumps({"inputs": tree} if rng.random() < 0.6 else tree).encode()))
        elif kind == 1:
            cases.append(("numeric-batch", "POST", "/v1/predict", json_h, _numeric_batch(rng)))
        elif kind == 2:
            ctype = str(rng.choice(["application/json", "application/x-npy", "text/plain", "",
                                    "application/x-npy; x=1"]))
            cases.append(("random-bytes", "POST", "/v1/predict", {"content-type": ctype},
                          rng.bytes(int(rng.integers(0, 4096)))))
        elif kind == 3:
            cases.append(("npy-header", "POST", "/v1/predict", npy_h, _npy_claim(rng)))
        elif kind == 4:
            depth = int(rng.choice([3, 10, 1000, 30_000]))
            cases.append(("deep-nesting", "POST", "/v1/predict", json_h,
                          b'{"inputs": ' + b"[" * depth + b"0.5" + b"]" * depth + b"}"))
        elif kind == 5:
            digits = int(rng.choice([33, 400, 5000]))
            cases.append(("long-number", "POST", "/v1/predict", json_h,
                          b'{"inputs": [[' + b"9" * digits + b"]]}"))
        elif kind == 6:
            method = str(rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
            path = str(rng.choice(["/v1/predict", "/v1/model", "/healthz", "/metrics", "/v1/predict/",
                                   "/../../etc/passwd", "/%00", "/" + "a" * 4000, "/openapi.json", "/docs"]))
            cases.append(("method-path", method, path, json_h, b""))
        else:
            size = int(rng.choice([65537, 200_000]))
            cases.append(("oversize", "POST", "/v1/predict", npy_h, b"\0" * size))
    return cases


RAW_FRAMING = [
    b"POST /v1/predict HTTP/1.1\r\nHost: e\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/predict HTTP/1.1\r\nHost: e\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n12345",
    b"POST /v1/predict HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /healthz HTTP/9.9\r\nHost: e\r\n\r\n",
    b"\x16\x03\x01\x02\x00GARBAGE\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(2000)) + b"\r\n",
    b"GET /healthz\r\n\r\n",
    b"POST /v1/predict HTTP/1.1\r\nHost: e\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n",
]


def _raw_status(p: dict[str, Any], request: bytes) -> str:
    with (socket.create_connection((HOST, p["port"]), timeout=5) as sock,
          _ctx(p, "fuzzer").wrap_socket(sock, server_hostname=HOST) as tls):
            try:
                tls.sendall(request)
                head = tls.recv(64)
            except (OSError, ssl.SSLError):
                return "closed"
    return head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") and b" " in head else "closed"


def run_fuzz(p: dict[str, Any], n: int, progress: ProgressCallback) -> dict[str, Any]:
    import httpx

    statuses: Counter[str] = Counter()
    by_category: dict[str, Counter[str]] = {}
    cases = fuzz_cases(n)
    t0 = time.perf_counter()
    with _client(p, "fuzzer") as c:
        for i, (category, method, path, headers, body) in enumerate(cases):
            try:
                code = str(c.request(method, path, headers=headers, content=body).status_code)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            statuses[code] += 1
            by_category.setdefault(category, Counter())[code] += 1
            if i % 50 == 0:
                report(progress, "fuzz", i, n + len(RAW_FRAMING))
    for j, request in enumerate(RAW_FRAMING):
        code = _raw_status(p, request)
        statuses[code] += 1
        by_category.setdefault("raw-framing", Counter())[code] += 1
        report(progress, "fuzz", n + j + 1, n + len(RAW_FRAMING))
    five = sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500)
    return {"fuzz_requests": n + len(RAW_FRAMING), "fuzz_5xx": five, "fuzz_statuses": dict(statuses),
            "fuzz_transport_errors": sum(v for k, v in statuses.items() if not k.isdigit() and k != "closed"),
            "fuzz_by_category": {k: dict(v) for k, v in by_category.items()},
            "fuzz_s": round(time.perf_counter() - t0, 2)}


# --- 2. slow attack -----------------------------------------------------------------------------------------------
class Attacker:
    """One address holding as many stalled, idle, slowloris and slow-body connections as the server lets it."""

    KINDS = ("stalled", "idle", "slowloris", "slow-body")

    def __init__(self, p: dict[str, Any]) -> None:
        self.p = p
        self.ctx = _ctx(p, "mallory")
        self.sel = selectors.DefaultSelector()
        self.open: dict[socket.socket, str] = {}
        self.peak, self.opened, self.refused = 0, Counter[str](), 0
        self.stop = threading.Event()

    def _open(self, kind: str) -> None:
        sock = socket.create_connection((HOST, self.p["port"]), timeout=3, source_address=(ATTACKER, 0))
        if kind != "stalled":
            sock = self.ctx.wrap_socket(sock, server_hostname=HOST)
            if kind == "slowloris":
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: e\r\n")
            elif kind == "slow-body":
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: e\r\ncontent-type: application/json\r\n"
                             b"content-length: 60000\r\n\r\n{")
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ)
        self.open[sock] = kind
        self.opened[kind] += 1

    def _close(self, sock: socket.socket) -> None:
        self.sel.unregister(sock)
        del self.open[sock]
        sock.close()

    def run(self) -> None:
        next_drip, i = time.monotonic() + 0.5, 0
        while not self.stop.is_set():
            if len(self.open) < LIMITS["max-connections-per-address"] + 8:  # always probing past the cap
                try:
                    self._open(self.KINDS[i % len(self.KINDS)])
                except (OSError, ssl.SSLError):
                    self.refused += 1
                i += 1
            for key, _ in self.sel.select(timeout=0.01):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except (OSError, ssl.SSLError):
                    data = b""
                if not data or data.startswith(b"HTTP/"):  # closed, or answered (408/503): the slot is gone
                    self._close(sock)  # type: ignore[arg-type]
            if time.monotonic() >= next_drip:
                next_drip = time.monotonic() + 0.5
                for sock, kind in list(self.open.items()):
                    with contextlib.suppress(OSError, ssl.SSLError):
                        if kind == "slowloris":
                            sock.sendall(b"X-Drip: 1\r\n")
                        elif kind == "slow-body":
                            sock.sendall(b"1")
            self.peak = max(self.peak, len(self.open))
        for sock in list(self.open):
            self._close(sock)


def run_slow_attack(p: dict[str, Any], seconds: float, progress: ProgressCallback) -> dict[str, Any]:
    import httpx

    attacker = Attacker(p)
    thread = threading.Thread(target=attacker.run, daemon=True)
    thread.start()
    held: list[float] = []  # the server's own count: open connections of the busiest address, every 50 ms
    sampler = threading.Thread(target=_sample_busiest, args=(p, attacker.stop, held), daemon=True)
    sampler.start()
    time.sleep(1.0)  # let it reach the caps first
    latencies, codes = [], Counter[str]()
    end = time.monotonic() + seconds
    with _client(p, "alice", HONEST, timeout=5) as c:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                code = str(c.post("/v1/predict", json={"inputs": [[0.5] * 64]}).status_code)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            latency = time.monotonic() - t0
            latencies.append(latency)
            codes["200 within 2 s" if code == "200" and latency <= 2.0 else code] += 1
            report(progress, "slow attack", int(seconds - max(0.0, end - time.monotonic())), int(seconds))
            time.sleep(0.1)
    attacker.stop.set()
    thread.join(timeout=10)
    sampler.join(timeout=10)
    served = codes["200 within 2 s"] / max(1, sum(codes.values()))
    return {"slow_attack_connections": int(max(held, default=0)), "slow_attack_attacker_side_peak": attacker.peak,
            "slow_attack_samples": len(held), "slow_attack_opened": dict(attacker.opened),
            "slow_attack_refused_attempts": attacker.refused, "honest_requests": sum(codes.values()),
            "honest_served_during_slow_attack": round(served, 4), "honest_outcomes": dict(codes),
            "honest_p50_ms": round(1000 * float(np.median(latencies)), 2),
            "honest_max_ms": round(1000 * max(latencies), 2), "attack_s": seconds}


def _sample_busiest(p: dict[str, Any], stop: threading.Event, out: list[float]) -> None:
    """Read the server's ``edgeshield_connections_busiest_address`` gauge until ``stop``."""
    with _client(p, "fuzzer", HONEST, timeout=5) as c:
        while not stop.wait(0.05):
            with contextlib.suppress(Exception):
                for line in c.get("/metrics").text.splitlines():
                    if line.startswith("edgeshield_connections_busiest_address "):
                        out.append(float(line.split()[1]))


# --- 3. revocation ------------------------------------------------------------------------------------------------
def run_revocation(p: dict[str, Any]) -> dict[str, Any]:
    import httpx

    from edgeshield import audit

    clients = [_client(p, "revokee", timeout=5) for _ in range(4)]
    before = [c.post("/v1/predict", json={"inputs": [[0.5] * 64]}).status_code for c in clients]
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "edgeshield", "pki", "revoke", str(p["ca"]), "--name", "revokee"],
                   check=True, capture_output=True)
    db = p["work"] / "audit.db"
    while not any(e.kind == "crl.reload" for e in audit.AuditLog(db, readonly=True).tail(50)):
        if time.monotonic() - t0 > 20:
            raise RuntimeError("the server did not reload the CRL within 20 s")
        time.sleep(0.05)
    reload_s = time.monotonic() - t0
    outcomes: Counter[str] = Counter()
    for c in clients:
        for _ in range(4):
            try:
                outcomes[str(c.post("/v1/predict", json={"inputs": [[0.5] * 64]}).status_code)] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
        c.close()
    return {"revoked_connections": len(clients), "revoked_before": before, "revoked_requests": sum(outcomes.values()),
            "revoked_requests_answered": outcomes["200"], "revoked_outcomes": dict(outcomes),
            "crl_reload_s": round(reload_s, 2)}


# --- 4. audit tampering -------------------------------------------------------------------------------------------
def run_tamper(work: Path) -> dict[str, Any]:
    from _audit_tamper import run_cases, summary, undetected  # benchmarks/_audit_tamper.py

    cases = run_cases(work / "tamper")
    return {**summary(cases), "audit_tamper_undetected_cases": [c["name"] for c in cases if undetected(c)],
            "audit_tamper_device_only_misses": [c["name"] for c in cases if not c["detected_device"]],
            "audit_tamper": cases}


# --- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="400 fuzz requests and a 6 s attack (about a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the results as one flat JSON object")
    args = ap.parse_args(argv)
    from rich.table import Table

    started = time.perf_counter()
    info = {"hardware": hardware(), "versions": f"Python {sys.version.split()[0]}, edgeshield {edgeshield.__version__}"}
    console = open_report(120, info)
    work = Path(tempfile.mkdtemp(prefix="edgeshield-hardening-"))
    r: dict[str, Any] = {"machine": info["hardware"], "quick": args.quick}
    with progress_bars(background=False) as progress:
        report(progress, "hardening benchmark", 0, STAGES, note="keys, bundle, CA, server")
        p = prepare(work)
        proc = start_server(p)
        try:
            report(progress, "hardening benchmark", 1, STAGES, note="fuzz")
            r.update(run_fuzz(p, _size("fuzz", args.quick), progress))
            report(progress, "hardening benchmark", 2, STAGES, note="slow attack")
            r.update(run_slow_attack(p, _size("attack_s", args.quick), progress))
            report(progress, "hardening benchmark", 3, STAGES, note="revocation")
            r.update(run_revocation(p))
        finally:
            proc.send_signal(signal.SIGTERM)
            r["sigterm_exit"] = proc.wait(timeout=30)
        report(progress, "hardening benchmark", 4, STAGES, note="audit tampering")
        verify = subprocess.run([sys.executable, "-m", "edgeshield", "audit", "verify", str(work / "audit.db"),
                                 "--checkpoint-key", str(work / "audit.pub"), "--require-checkpoint", "--json"],
                                capture_output=True, text=True, check=False)
        r["server_audit_verify_exit"] = verify.returncode
        r.update(run_tamper(work))
        report(progress, "hardening benchmark", STAGES, STAGES)
    log_lines = (work / "server.log").read_text(errors="replace").splitlines()
    r["server_log_lines_not_json"] = sum(1 for line in log_lines if not _is_json(line))
    r["wall_s"] = round(time.perf_counter() - started, 1)

    t = Table(title="Hardening: the negative matrices against a real server")
    for col in ("figure", "value", "target"):
        t.add_column(col)
    rows = [("fuzz requests / answered 5xx", f"{r['fuzz_requests']} / {r['fuzz_5xx']}", "0 5xx"),
            ("slow attack: connections one address held open at peak", str(r["slow_attack_connections"]),
             f"<= {LIMITS['max-connections-per-address']}"),
            ("honest client served 200 within 2 s during the attack",
             (f"{r['honest_served_during_slow_attack']:.3f} "
              f"({r['honest_requests']} requests, p50 {r['honest_p50_ms']} ms, max {r['honest_max_ms']} ms)"), "1.0"),
            ("requests answered on connections opened before a revocation",
             f"{r['revoked_requests_answered']} of {r['revoked_requests']}", "0"),
            ("audit tampering cases / undetected outside the documented ones",
             f"{r['audit_tamper_cases']} / {r['audit_tamper_undetected']}", "0"),
            ("SIGTERM exit / audit verify --require-checkpoint exit",
             f"{r['sigterm_exit']} / {r['server_audit_verify_exit']}", "0 / 0"),
            ("server log lines that are not one JSON object", str(r["server_log_lines_not_json"]), "0")]
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print(f"fuzz statuses: {r['fuzz_statuses']}; attacker opened {r['slow_attack_opened']}, "
                  f"{r['slow_attack_refused_attempts']} attempts refused; device alone misses: "
                  f"{r['audit_tamper_device_only_misses']}; wall {r['wall_s']} s")
    write_report(console, args.json, r)
    return 0


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
