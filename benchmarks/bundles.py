"""Benchmark: opening an EdgeShield bundle vs. opening the plain ONNX model, measured side by side in one run.

    python benchmarks/bundles.py [--quick] [--json PATH]

What it measures (every figure comes from this run; nothing is hard-coded):

1. Models of about 1 MB, 100 MB and 1 GB (a chain of MatMul nodes with deterministic random float32 weights) are
   generated into a temporary directory, keys are made with ``init_keys`` and each model is protected (untimed).
2. Time to open the bundle (``open_session``: signature + unwrap + decrypt and per-recipient GMAC in one pass +
   create session) vs. time to create a session from the plain file, as the median of alternating repetitions with
   a warm page cache; plus where the bundle's opening time goes (header + signature + key unwrap + data-key
   commitment, the device's decrypt + MAC pass, session creation from memory) and, for comparison, the gateway's
   ``verify`` (signature + SHA-256 hash list of the ciphertext, no device key).
3. Decryption throughput of the real device path (``_stream.process_payload(data_key, ..., out, mac_key=mac_key,
   digest=False)`` with the data and MAC keys unwrapped from the 100 MB bundle, as ``open_bundle`` calls it) with
   the default number of workers and with one, against raw AES-256-GCM of ``cryptography`` on one core and against
   Fernet; plus the gateway path (``process_payload(None, ...)``: SHA-256 hash list only) for comparison.
4. Peak memory while opening, divided by the model size, each in a fresh subprocess, with ONNX Runtime's weight
   pre-packing on (its default) and off (``session.disable_prepacking``), for the bundle, the plain file and the
   same model as a format version 1 bundle (the earlier open path: decrypt the whole image, then hand it over).
5. What pre-packing buys at inference: the 100 MB model run at batch 1 and 64 with pre-packing on and off.

Version 2 bundles (the default) stream verified chunks into ONNX Runtime's loader (``bundles._session``): the
"physical limit" printed beside the open ratio is the plain load plus one AES-256-GCM pass over the model at the
measured single-core rate spread over the usable cores (at most 2 here), i.e. decryption that overlapped nothing.

``--quick`` skips the 1 GB model and uses fewer repetitions. ``--json PATH`` writes one flat JSON object.
MB means 10**6 bytes throughout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import edgeshield  # noqa: F401  # before onnxruntime: switches its telemetry off
from edgeshield._progress import report

from _machine import (  # benchmarks/_machine.py and _models.py, beside this script
    Background,
    bundle_stack,
    hardware,
    hwm_warning,
    open_report,
    peak_rss_bytes,
    rss_bytes,
    run_child,
    vm_hwm_bytes,
    write_report,
)
from _models import write_matmul_chain

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

MB = 1_000_000
MIB = 1 << 20
OPEN_RATIO_TARGET = 1.15  # at 100 MB and above (issue 15; the earlier 1.05 was below the physical limit)
DECRYPT_VS_AESGCM_TARGET = 0.8
PEAK_MEM_TARGET = 1.4  # at 100 MB

# (label, target size in bytes, matrix dimension); the number of d x d float32 blocks is chosen to come close.
SIZES = [("1mb", 1 * MB, 512), ("100mb", 100 * MB, 1024), ("1gb", 1000 * MB, 1024)]


# --- model generation and protection (runs in a child process) --------------------------------------------------
def _make_model(path: Path, target_bytes: int, dim: int, seed: int) -> int:
    """A self-contained MatMul chain of about ``target_bytes`` (benchmarks/_models.py); returns its block count."""
    blocks = max(1, round(target_bytes / (dim * dim * 4)))
    write_matmul_chain(path, blocks=blocks, dim=dim, seed=seed)
    return blocks


def _child_prepare(workdir: Path, quick: bool) -> dict[str, Any]:
    from edgeshield import bundles, keys

    keydir = workdir / "keys"
    keys.init_keys(keydir)
    owner = keys.load_owner_private_key(keydir / "owner.key")
    device = keys.load_device_public_key(keydir / "device.pub")
    out: dict[str, Any] = {"keys": str(keydir), "models": []}
    for seed, (label, target, dim) in enumerate(SIZES):
        if quick and label == "1gb":
            continue
        model = workdir / f"model_{label}.onnx"
        bundle = workdir / f"model_{label}.esb"
        blocks = _make_model(model, target, dim, seed=1234 + seed)
        gc.collect()
        t0 = time.perf_counter()
        bundles.protect(model, bundle, signing_key=owner, recipients=[device])
        protect_s = time.perf_counter() - t0
        gc.collect()
        bundle_v1 = workdir / f"model_{label}_v1.esb"  # the earlier format and layout, for the earlier open path
        bundles.protect(model, bundle_v1, signing_key=owner, recipients=[device], format_version=1)
        gc.collect()
        out["models"].append(
            {
                "label": label,
                "dim": dim,
                "blocks": blocks,
                "model": str(model),
                "bundle": str(bundle),
                "bundle_v1": str(bundle_v1),
                "model_bytes": model.stat().st_size,
                "bundle_bytes": bundle.stat().st_size,
                "protect_s": protect_s,
            }
        )
    return out


# --- peak memory (each measurement in a fresh child process) ----------------------------------------------------
def _session_options(prepack: bool) -> Any:
    from edgeshield.bundles._ort import onnxruntime as ort

    opts = ort.SessionOptions()
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def _child_mem(kind: str, path: str, keydir: str, prepack: bool = True) -> dict[str, Any]:
    from edgeshield import bundles, keys
    from edgeshield.bundles._ort import onnxruntime as ort

    owner_pub = keys.load_owner_public_key(Path(keydir) / "owner.pub")
    device_priv = keys.load_device_private_key(Path(keydir) / "device.key")
    import numpy  # noqa: F401  # onnxruntime imports it anyway; make sure it is in the baseline

    gc.collect()
    baseline = rss_bytes()
    t0 = time.perf_counter()
    if kind in ("bundle", "bundle_v1"):
        session = bundles.open_session(path, owner_pub, device_priv, session_options=_session_options(prepack))
    else:
        session = ort.InferenceSession(path, _session_options(prepack), providers=["CPUExecutionProvider"])
    elapsed = time.perf_counter() - t0
    peak = peak_rss_bytes()
    hwm = vm_hwm_bytes()  # the same high-water mark, for this process image only
    after = rss_bytes()
    del session
    return {"baseline": baseline, "peak": peak, "vm_hwm": hwm, "after": after, "elapsed_s": elapsed}


def _run_child(args: list[str]) -> dict[str, Any]:
    """This script's ``--_child`` mode in a fresh interpreter, through ``sh`` (see ``_machine.run_child``)."""
    return run_child(__file__, args)


# --- timing helpers ---------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, after a full collection; the result is dropped after the clock stops."""
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    del result
    gc.collect()
    return elapsed


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


# --- the measurements -------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, prepared: dict[str, Any], quick: bool) -> None:
        from edgeshield import bundles, keys
        from edgeshield.bundles._ort import onnxruntime as ort

        self.ort = ort
        self.bundles = bundles
        self.quick = quick
        keydir = Path(prepared["keys"])
        self.keydir = keydir
        self.owner_pub = keys.load_owner_public_key(keydir / "owner.pub")
        self.device_priv = keys.load_device_private_key(keydir / "device.key")
        self.models = prepared["models"]

    # 2. open time -----------------------------------------------------------------------------------------------
    def open_times(self, m: dict[str, Any], reps: int, progress: Any = None) -> dict[str, Any]:
        import numpy as np

        ort, bundles = self.ort, self.bundles

        def plain() -> Any:
            return ort.InferenceSession(m["model"], providers=["CPUExecutionProvider"])

        def bundle() -> Any:
            return bundles.open_session(m["bundle"], self.owner_pub, self.device_priv)

        def bundle_v1() -> Any:  # the earlier format: whole image decrypted and checked, then handed over
            return bundles.open_session(m["bundle_v1"], self.owner_pub, self.device_priv)

        def plain_np() -> Any:
            return ort.InferenceSession(m["model"], _session_options(False), providers=["CPUExecutionProvider"])

        def bundle_np() -> Any:
            return bundles.open_session(m["bundle"], self.owner_pub, self.device_priv,
                                        session_options=_session_options(False))

        # Warm-up (untimed): fills the page cache and checks the sessions compute the same thing (pre-packing
        # changes the kernel's summation order, so each is compared with the plain model under the same setting).
        x = np.random.default_rng(7).standard_normal((2, m["dim"]), dtype=np.float32)
        for a, b in ((plain, bundle), (plain, bundle_v1), (plain_np, bundle_np)):
            if not np.array_equal(a().run(None, {"x": x})[0], b().run(None, {"x": x})[0]):
                raise AssertionError(f"{m['label']}: {b.__name__} session output differs from {a.__name__}'s")

        cases = {"plain": plain, "bundle": bundle, "bundle_v1": bundle_v1, "plain_np": plain_np,
                 "bundle_np": bundle_np}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for i in range(reps):  # alternate the order
            report(progress, f"{m['label']}: open time (alternating repetitions)", i, reps)  # between timings
            order = list(cases.items())
            for name, fn in order if i % 2 == 0 else reversed(order):
                times[name].append(_timed(fn))
        report(progress, f"{m['label']}: open time (alternating repetitions)", reps, reps)
        return times

    def inference(self, m: dict[str, Any], reps: int) -> dict[str, float]:
        """Median ms of one run at batch 1 and 64, with pre-packing on and off (what pre-packing buys later)."""
        import numpy as np

        out: dict[str, float] = {}
        for prepack in (True, False):
            session = self.ort.InferenceSession(m["model"], _session_options(prepack),
                                                providers=["CPUExecutionProvider"])
            for batch in (1, 64):
                x = np.random.default_rng(batch).standard_normal((batch, m["dim"]), dtype=np.float32)
                session.run(None, {"x": x})  # warm-up
                samples = [_timed(lambda s=session, x=x: s.run(None, {"x": x})) for _ in range(reps)]
                out[f"b{batch}_{'prepack' if prepack else 'no_prepack'}"] = _median_ms(samples)
            del session
        return out

    def open_breakdown(self, m: dict[str, Any], reps: int, progress: Any = None) -> dict[str, list[float]]:
        """The stages of ``open_bundle`` timed one by one (same private helpers it calls, same order)."""
        import hmac

        import numpy as np

        from edgeshield.bundles import _api, _format, _stream, _wrap
        from edgeshield.keys import key_id

        path = m["bundle"]
        device_id = key_id(self.device_priv.public_key())

        def header_and_signature() -> Any:  # header + signature + recipient lookup + unwrap + key commitment
            with _api._open_for_read(path) as (read_at, size):
                manifest = _api._authenticated_manifest(read_at, size, self.owner_pub)
                stanza = next(r for r in manifest.recipients if hmac.compare_digest(r.key_id, device_id))
                bundle_id = bytes.fromhex(manifest.bundle_id)
                data_key, mac_key = _wrap.unwrap_key(stanza.wrapped_key, self.device_priv, bundle_id)
                commitment = _format.data_key_commitment(bundle_id, data_key)
                if not hmac.compare_digest(commitment, manifest.data_key_commitment):
                    raise AssertionError("data key commitment mismatch")
            return manifest, stanza, data_key, mac_key

        manifest, stanza, data_key, mac_key = header_and_signature()

        def hash_only() -> Any:  # the gateway's verify(): signature + SHA-256 of every sealed chunk, no decryption
            return self.bundles.verify(path, self.owner_pub)

        def decrypt() -> Any:  # the device pass: decrypt + GMAC, no SHA-256; fresh output buffer (in-memory path)
            if _api.streams(manifest):  # what the streamed open runs: per-chunk MAC + GCM, chunk by chunk
                with _api._open_for_read(path) as (read_at, size):
                    n = 0
                    args = _api._payload_args(read_at, size, manifest)
                    for chunk in _stream.verified_chunks(data_key, mac_key, *args, stanza.chunk_mac):
                        n += len(chunk)
                    if n != manifest.plaintext_size:
                        raise AssertionError("short stream")
                return None
            with _api._open_for_read(path) as (read_at, size):
                plaintext = np.empty(manifest.plaintext_size, dtype=np.uint8)
                digest, mac = _stream.process_payload(
                    data_key,
                    *_api._payload_args(read_at, size, manifest),
                    memoryview(plaintext),
                    mac_key=mac_key,
                    digest=False,
                )
                if digest is not None or mac is None or not hmac.compare_digest(mac.hex(), stanza.payload_mac):
                    raise AssertionError("payload MAC mismatch")
            return plaintext

        # ONNX Runtime's share alone: the session from an already decrypted image (for a version 2 bundle streamed
        # through the pipe from memory, as the open does, minus the decryption it overlaps with).
        image = _api._decrypt_image(path, self.owner_pub, self.device_priv, False)[1] if _api.streams(manifest) \
            else None

        def session(plaintext: Any) -> Any:
            return _api.session_from_image(manifest, plaintext).session

        def decrypt_then_session() -> tuple[float, float]:
            # As in open_bundle: the plaintext lives while the session is created, and is dropped afterwards.
            gc.collect()
            t0 = time.perf_counter()
            plaintext = decrypt()
            t1 = time.perf_counter()
            sess = session(plaintext if image is None else image)
            t2 = time.perf_counter()
            del sess, plaintext
            gc.collect()
            return t1 - t0, t2 - t1

        def plain_no_prepack() -> Any:  # diagnostic: how much of session creation is MatMul weight pre-packing
            opts = self.ort.SessionOptions()
            opts.add_session_config_entry("session.disable_prepacking", "1")
            return self.ort.InferenceSession(m["model"], opts, providers=["CPUExecutionProvider"])

        decrypt_then_session()  # warm-up
        hash_only()
        plain_no_prepack()
        stages = ("signature", "hash_only", "decrypt", "session", "plain_no_prepack")
        out: dict[str, list[float]] = {k: [] for k in stages}
        task = f"{m['label']}: where the opening time goes"
        for i in range(reps):
            report(progress, task, i, reps)  # between timings
            out["signature"].append(_timed(header_and_signature))
            out["hash_only"].append(_timed(hash_only))
            t_dec, t_sess = decrypt_then_session()
            out["decrypt"].append(t_dec)
            out["session"].append(t_sess)
            out["plain_no_prepack"].append(_timed(plain_no_prepack))
        report(progress, task, reps, reps)
        return out

    # 3. throughput ----------------------------------------------------------------------------------------------
    def throughput(self, m: dict[str, Any], reps: int, progress: Any = None) -> dict[str, Any]:
        import hashlib
        import hmac

        import numpy as np
        from cryptography.fernet import Fernet
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from edgeshield.bundles import _api, _stream, _wrap
        from edgeshield.keys import key_id

        res: dict[str, Any] = {}
        device_id = key_id(self.device_priv.public_key())
        fd = os.open(m["bundle"], os.O_RDONLY)  # read like _api does: os.pread on one descriptor
        try:
            size = os.fstat(fd).st_size
            manifest = _api._authenticated_manifest(lambda off, n: os.pread(fd, n, off), size, self.owner_pub)
            aad = bytes.fromhex(manifest.bundle_id)
            stanza = next(r for r in manifest.recipients if hmac.compare_digest(r.key_id, device_id))
            data_key, mac_key = _wrap.unwrap_key(stanza.wrapped_key, self.device_priv, aad)
            payload_offset = size - manifest.payload_size
            total, chunk = manifest.plaintext_size, manifest.chunk_size
            n = _stream.chunk_count(total, chunk)
            spans = []  # (offset, length) of each sealed chunk within the payload
            for i in range(n):
                start, length = _stream._bounds(total, chunk, i)
                spans.append((start + i * _stream.TAG_SIZE, length + _stream.TAG_SIZE))

            def read_sealed(offset: int, length: int) -> bytes:
                return os.pread(fd, length, payload_offset + offset)

            def device(workers: int | None) -> Callable[[], Any]:
                """What open_bundle runs: decrypt + per-recipient GMAC in one pass, no SHA-256."""

                def run() -> Any:
                    out = np.empty(total, dtype=np.uint8)  # fresh, as open_bundle allocates one per call
                    digest, mac = _stream.process_payload(
                        data_key, aad, total, chunk, read_sealed, memoryview(out), mac_key=mac_key, digest=False,
                        workers=workers,
                    )
                    if digest is not None or mac is None or not hmac.compare_digest(mac.hex(), stanza.payload_mac):
                        raise AssertionError("payload MAC mismatch")
                    return out

                return run

            def gateway(workers: int | None) -> Callable[[], Any]:
                """What verify() runs after the signature: SHA-256 of every sealed chunk, no key, no decryption."""

                def run() -> Any:
                    digest, mac = _stream.process_payload(None, aad, total, chunk, read_sealed, workers=workers)
                    if mac is not None or digest is None or digest.hex() != manifest.payload_sha256:
                        raise AssertionError("payload digest mismatch")

                return run

            # The same sealed chunks held in memory, for the single-core primitives.
            sealed = [read_sealed(off, ln) for off, ln in spans]
            aead = AESGCM(data_key)
            gmac = AESGCM(mac_key)

            def raw_aesgcm() -> Any:
                for i, c in enumerate(sealed):
                    aead.decrypt(_stream.nonce(i, i == n - 1), c, aad)

            def raw_gmac() -> Any:
                for i, c in enumerate(sealed):
                    _stream.chunk_mac(gmac, i, i == n - 1, c)

            def raw_sha256() -> Any:
                for c in sealed:
                    hashlib.sha256(c).digest()

            def raw_pread() -> Any:
                for off, ln in spans:
                    read_sealed(off, ln)

            cases: list[tuple[str, Callable[[], Any]]] = [
                ("pipeline", device(None)),
                ("pipeline_1worker", device(1)),
                ("gateway", gateway(None)),
                ("aesgcm_1core", raw_aesgcm),
                ("gmac_1core", raw_gmac),
                ("sha256_1core", raw_sha256),
                ("pread_1core", raw_pread),
            ]
            for _, fn in cases:  # warm-up
                _timed(fn)
            samples: dict[str, list[float]] = {name: [] for name, _ in cases}
            for i in range(reps):  # interleaved, so drift hits every case alike
                report(progress, "decryption throughput (100 MB bundle)", i, reps)  # between timings
                for name, fn in cases:
                    samples[name].append(_timed(fn))
            report(progress, "decryption throughput (100 MB bundle)", reps, reps)
            plain = bytes(device(None)())
            if hashlib.sha256(plain).hexdigest() != manifest.plaintext_sha256:
                raise AssertionError("decrypted image does not match the manifest's plaintext digest")
        finally:
            os.close(fd)
        for name, _ in cases:
            res[f"{name}_s"] = statistics.median(samples[name])
            res[f"{name}_mbps"] = total / statistics.median(samples[name]) / MB
        res["pipeline_workers"] = min(4, os.cpu_count() or 1)  # process_payload's own default
        res["bytes"] = total
        res["sealed_bytes"] = manifest.payload_size
        sealed.clear()  # the chunks go; the closures above, done with, keep an empty list
        gc.collect()

        # Fernet on the same plaintext (the decrypted image); fall back to a 32 MB sample if the full size is slow.
        f = Fernet(Fernet.generate_key())
        sample = plain
        t0 = time.perf_counter()
        token = f.encrypt(sample)
        enc_s = time.perf_counter() - t0
        if enc_s > 10.0:
            sample = plain[: 32 * MB]
            token = f.encrypt(sample)
        del plain
        f.decrypt(token)  # warm-up
        fernet = [_timed(lambda: f.decrypt(token)) for _ in range(max(2, reps - 2))]
        res["fernet_bytes"] = len(sample)
        res["fernet_s"] = statistics.median(fernet)
        res["fernet_mbps"] = len(sample) / statistics.median(fernet) / MB
        token = b""  # the lambda above, done with, keeps an empty token
        del sample
        gc.collect()
        return res

    # 4. memory --------------------------------------------------------------------------------------------------
    def memory(self, m: dict[str, Any], progress: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {"warnings": []}
        cases = [("bundle", m["bundle"], True), ("plain", m["model"], True), ("bundle_np", m["bundle"], False),
                 ("plain_np", m["model"], False), ("bundle_v1", m["bundle_v1"], True)]
        for i, (name, path, prepack) in enumerate(cases):
            report(progress, f"{m['label']}: peak memory (fresh subprocesses)", i, len(cases), note=name)
            kind = name.removesuffix("_np")
            r = _run_child(["mem", "--kind", kind, "--path", path, "--keys", str(self.keydir),
                            "--prepack", "1" if prepack else "0"])
            out[name] = r
            out[f"{name}_ratio"] = (r["peak"] - r["baseline"]) / m["model_bytes"]
            warning = hwm_warning(f"{m['label']} {name}", r)
            if warning:
                out["warnings"].append(warning)
        report(progress, f"{m['label']}: peak memory (fresh subprocesses)", len(cases), len(cases))
        return out


# --- reporting --------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    hw, versions = hardware(), bundle_stack()
    return {"machine": f"{hw}; {versions}", "hardware": hw, "versions": versions}


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _mark(ok: bool | None) -> str:
    if ok is None:
        return ""
    return "[green]ok[/green]" if ok else "[red]MISSED[/red]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the 1 GB model, fewer repetitions (< 1 minute)")
    ap.add_argument("--json", metavar="PATH", help="write the results as one flat JSON object")
    ap.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_child", choices=["prepare", "mem"], help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--keys", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--prepack", default="1", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child == "prepare":
        print(json.dumps(_child_prepare(Path(args.dir), args.quick)))
        return 0
    if args._child == "mem":
        print(json.dumps(_child_mem(args.kind, args.path, args.keys, args.prepack == "1")))
        return 0

    from rich.table import Table

    started = time.perf_counter()
    quick = args.quick
    info = machine_info()
    console = open_report(110, info)
    reps_for = {"1mb": 5, "100mb": 3} if quick else {"1mb": 7, "100mb": 7, "1gb": 5}
    tp_reps = 3 if quick else 5

    background = Background()
    workdir = Path(tempfile.mkdtemp(prefix="edgeshield-bench-"))
    results: dict[str, Any] = {}
    from edgeshield.cli._progress import progress_bars

    try:
        # Progress on stderr, drawn only between measurements: no refresh thread competes with what is timed.
        with progress_bars(background=False) as progress:
            report(progress, "generate and protect models (untimed)", 0, 1)
            cmd = ["prepare", "--dir", str(workdir)] + (["--quick"] if quick else [])
            prepared = _run_child(cmd)
            report(progress, "generate and protect models (untimed)", 1, 1)
            bench = Bench(prepared, quick)
            opens, breakdown, mem = {}, {}, {}
            for m in bench.models:
                label, reps = m["label"], reps_for[m["label"]]
                opens[label] = bench.open_times(m, reps, progress)
                breakdown[label] = bench.open_breakdown(m, reps, progress)
                mem[label] = bench.memory(m, progress)
            m100 = next(m for m in bench.models if m["label"] == "100mb")
            tp = bench.throughput(m100, tp_reps, progress)
            report(progress, "inference with and without pre-packing (100 MB)", 0, 1)
            run_ms = bench.inference(m100, 5 if quick else 15)
            report(progress, "inference with and without pre-packing (100 MB)", 1, 1)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    results.update(background.stop())

    # ---- assemble the flat result --------------------------------------------------------------------------------
    results.update(
        quick=quick,
        machine=info["machine"],
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        python=platform.python_version(),
    )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for label, _, _ in SIZES:
        m = next((x for x in bench.models if x["label"] == label), None)
        if m is None:
            continue
        o, b, mm = opens[label], breakdown[label], mem[label]
        bundle_ms, plain_ms = _median_ms(o["bundle"]), _median_ms(o["plain"])
        results.update(
            {
                f"model_bytes_{label}": m["model_bytes"],
                f"bundle_bytes_{label}": m["bundle_bytes"],
                f"reps_{label}": len(o["bundle"]),
                f"open_bundle_ms_{label}": bundle_ms,
                f"open_plain_ms_{label}": plain_ms,
                f"open_bundle_min_ms_{label}": min(o["bundle"]) * 1000,
                f"open_plain_min_ms_{label}": min(o["plain"]) * 1000,
                f"open_ratio_{label}": bundle_ms / plain_ms,
                f"signature_ms_{label}": _median_ms(b["signature"]),
                f"hash_only_ms_{label}": _median_ms(b["hash_only"]),
                f"decrypt_mac_ms_{label}": _median_ms(b["decrypt"]),
                f"session_from_memory_ms_{label}": _median_ms(b["session"]),
                f"stages_sum_ms_{label}": _median_ms(b["signature"])
                + _median_ms(b["decrypt"])
                + _median_ms(b["session"]),
                f"plain_no_prepack_ms_{label}": _median_ms(b["plain_no_prepack"]),
                f"peak_mem_ratio_{label}": mm["bundle_ratio"],
                f"plain_peak_mem_ratio_{label}": mm["plain_ratio"],
                f"peak_mem_mb_{label}": (mm["bundle"]["peak"] - mm["bundle"]["baseline"]) / MB,
                f"plain_peak_mem_mb_{label}": (mm["plain"]["peak"] - mm["plain"]["baseline"]) / MB,
                f"protect_s_{label}": m["protect_s"],
                # format version 2's streamed open against the earlier path and with pre-packing off
                f"format_version_{label}": 2,
                f"open_bundle_v1_ms_{label}": _median_ms(o["bundle_v1"]),
                f"open_ratio_v1_{label}": _median_ms(o["bundle_v1"]) / plain_ms,
                f"open_bundle_no_prepack_ms_{label}": _median_ms(o["bundle_np"]),
                f"open_plain_no_prepack_ms_{label}": _median_ms(o["plain_np"]),
                f"open_ratio_no_prepack_{label}": _median_ms(o["bundle_np"]) / _median_ms(o["plain_np"]),
                f"overlap_saved_ms_{label}": _median_ms(b["decrypt"]) + _median_ms(b["session"])
                + _median_ms(b["signature"]) - bundle_ms,
                f"peak_mem_ratio_no_prepack_{label}": mm["bundle_np_ratio"],
                f"plain_peak_mem_ratio_no_prepack_{label}": mm["plain_np_ratio"],
                f"peak_mem_ratio_v1_{label}": mm["bundle_v1_ratio"],
                # the physical limit: the plain load plus one AES-GCM pass at the single-core rate over <= 2 cores
                f"aesgcm_pass_ms_{label}": m["model_bytes"] / MB / (tp["aesgcm_1core_mbps"] * min(2, usable)) * 1000,
            }
        )
        results[f"open_ratio_limit_{label}"] = (plain_ms + results[f"aesgcm_pass_ms_{label}"]) / plain_ms
    present = next(x["label"] for x in bench.models)
    for label, _, _ in SIZES:  # same keys in every run: a size not run (the 1 GB model under --quick) is None
        for key in [k for k in results if k.endswith(f"_{present}")]:
            results.setdefault(key.removesuffix(f"_{present}") + f"_{label}", None)
    results.update(
        open_ratio_target=OPEN_RATIO_TARGET,
        peak_mem_target=PEAK_MEM_TARGET,
        scale="quick: 1 MB and 100 MB models, fewer repetitions" if quick else "full: 1 MB, 100 MB and 1 GB models",
        run_b1_ms_prepack_100mb=run_ms["b1_prepack"],
        run_b1_ms_no_prepack_100mb=run_ms["b1_no_prepack"],
        run_b64_ms_prepack_100mb=run_ms["b64_prepack"],
        run_b64_ms_no_prepack_100mb=run_ms["b64_no_prepack"],
    )
    results.update(
        decrypt_bytes=tp["bytes"],
        decrypt_workers=tp["pipeline_workers"],
        decrypt_path="device open path: process_payload(data_key, ..., out, mac_key=mac_key, digest=False)",
        decrypt_pipeline_mbps=tp["pipeline_mbps"],
        decrypt_pipeline_1worker_mbps=tp["pipeline_1worker_mbps"],
        gateway_verify_hash_mbps=tp["gateway_mbps"],
        aesgcm_1core_mbps=tp["aesgcm_1core_mbps"],
        gmac_1core_mbps=tp["gmac_1core_mbps"],
        sha256_1core_mbps=tp["sha256_1core_mbps"],
        pread_1core_mbps=tp["pread_1core_mbps"],
        fernet_mbps=tp["fernet_mbps"],
        fernet_bytes=tp["fernet_bytes"],
        decrypt_vs_aesgcm=tp["pipeline_mbps"] / tp["aesgcm_1core_mbps"],
        decrypt_vs_fernet=tp["pipeline_mbps"] / tp["fernet_mbps"],
        decrypt_vs_gateway_verify=tp["pipeline_mbps"] / tp["gateway_mbps"],
    )
    results["wall_s"] = time.perf_counter() - started
    results["memory_warnings"] = "; ".join(w for lb in mem for w in mem[lb]["warnings"]) or None

    # ---- print ---------------------------------------------------------------------------------------------------
    t = Table(title="Opening: bundle (verify + decrypt + session) vs. plain ONNX file; medians, warm page cache")
    for col in ("model", "size MB", "reps", "plain ms", "bundle ms", "ratio", "ratio of minima", "physical limit",
                "target", "", "v1 bundle ms", "v1 ratio"):
        t.add_column(col, justify="right" if col not in ("model", "") else "left")
    for m in bench.models:
        lb = m["label"]
        ratio = results[f"open_ratio_{lb}"]
        big = lb != "1mb"
        t.add_row(
            lb,
            _fmt(m["model_bytes"] / MB),
            str(results[f"reps_{lb}"]),
            _fmt(results[f"open_plain_ms_{lb}"]),
            _fmt(results[f"open_bundle_ms_{lb}"]),
            _fmt(ratio, 3),
            _fmt(results[f"open_bundle_min_ms_{lb}"] / results[f"open_plain_min_ms_{lb}"], 3),
            _fmt(results[f"open_ratio_limit_{lb}"], 3),
            f"≤ {OPEN_RATIO_TARGET}" if big else "-",
            _mark(ratio <= OPEN_RATIO_TARGET) if big else "",
            _fmt(results[f"open_bundle_v1_ms_{lb}"]),
            _fmt(results[f"open_ratio_v1_{lb}"], 3),
        )
    console.print(t)
    console.print(
        "bundle = format version 2 (the default): verified chunks streamed into ONNX Runtime's loader; v1 = the same "
        "model as a version 1 bundle (whole image decrypted and checked, then handed over from memory). Physical "
        "limit = (plain + one AES-256-GCM pass over the model at the single-core rate on at most 2 cores) ÷ plain."
    )

    t = Table(title="Pre-packing (ONNX Runtime's own packed copy of MatMul weights): what it costs and buys")
    for col in ("model", "plain ms", "bundle ms", "ratio", "peak ÷ size: plain", "bundle", "v1 bundle",
                "off: plain ms", "bundle ms", "ratio", "peak ÷ size: plain", "bundle"):
        t.add_column(col, justify="right")
    for m in bench.models:
        lb = m["label"]
        t.add_row(
            lb,
            _fmt(results[f"open_plain_ms_{lb}"]),
            _fmt(results[f"open_bundle_ms_{lb}"]),
            _fmt(results[f"open_ratio_{lb}"], 3),
            _fmt(results[f"plain_peak_mem_ratio_{lb}"], 2),
            _fmt(results[f"peak_mem_ratio_{lb}"], 2),
            _fmt(results[f"peak_mem_ratio_v1_{lb}"], 2),
            _fmt(results[f"open_plain_no_prepack_ms_{lb}"]),
            _fmt(results[f"open_bundle_no_prepack_ms_{lb}"]),
            _fmt(results[f"open_ratio_no_prepack_{lb}"], 3),
            _fmt(results[f"plain_peak_mem_ratio_no_prepack_{lb}"], 2),
            _fmt(results[f"peak_mem_ratio_no_prepack_{lb}"], 2),
        )
    console.print(t)
    console.print(
        f"100 MB model, one run (median ms): batch 1 {results['run_b1_ms_prepack_100mb']:.2f} with pre-packing, "
        f"{results['run_b1_ms_no_prepack_100mb']:.2f} without; batch 64 {results['run_b64_ms_prepack_100mb']:.2f} "
        f"with, {results['run_b64_ms_no_prepack_100mb']:.2f} without (ONNX Runtime's default, pre-packing on, is "
        "kept: it is paid once per open; whether it pays back depends on the batch, as these figures show)."
    )

    t = Table(title="Where the bundle's opening time goes (medians, ms, each stage timed alone)")
    for col in (
        "model",
        "header + sig + unwrap + commit",
        "gateway verify (hash only)",
        "device decrypt + MAC",
        "session from memory",
        "sum",
        "open session",
        "sum ÷ open",
        "overlap saved",
        "plain, prepacking off",
    ):
        t.add_column(col, justify="right")
    for m in bench.models:
        lb = m["label"]
        t.add_row(
            lb,
            _fmt(results[f"signature_ms_{lb}"], 2),
            _fmt(results[f"hash_only_ms_{lb}"]),
            _fmt(results[f"decrypt_mac_ms_{lb}"]),
            _fmt(results[f"session_from_memory_ms_{lb}"]),
            _fmt(results[f"stages_sum_ms_{lb}"]),
            _fmt(results[f"open_bundle_ms_{lb}"]),
            _fmt(results[f"stages_sum_ms_{lb}"] / results[f"open_bundle_ms_{lb}"], 2),
            _fmt(results[f"overlap_saved_ms_{lb}"]),
            _fmt(results[f"plain_no_prepack_ms_{lb}"]),
        )
    console.print(t)
    console.print(
        "sum = header+sig+unwrap+commit + device decrypt+MAC + session from memory (the stages of open_session, "
        "which no longer hashes the ciphertext; for a version 2 bundle the decrypt + MAC pass is the per-chunk "
        "check and decryption alone, and 'session from memory' ONNX Runtime loading the decrypted model through the "
        "same pipe); 'open session' is open_session's median from the table above, 'overlap saved' = sum − open "
        "(decryption hidden behind ONNX Runtime's parsing); "
        "'gateway verify' is verify() with no device key (signature + SHA-256 hash list), not part of the sum; "
        "'plain, prepacking off' is the plain-file session with "
        "session.disable_prepacking=1, to show how much of session creation is ONNX Runtime re-packing MatMul weights."
    )

    t = Table(title=f"Decryption throughput, {tp['bytes'] / MB:.1f} MB plaintext of the 100 MB bundle (medians)")
    t.add_column("what")
    t.add_column("MB/s", justify="right")
    t.add_column("device path ÷ this", justify="right")
    t.add_column("target", justify="right")
    t.add_column("")
    pipe = tp["pipeline_mbps"]
    fernet_what = "Fernet decrypt (AES-128-CBC + HMAC-SHA256 + base64), 1 core"
    if tp["fernet_bytes"] != tp["bytes"]:
        fernet_what += f" ({tp['fernet_bytes'] / MB:.0f} MB sample)"
    rows = [
        (f"device open path (pread + AES-GCM decrypt + GMAC), {tp['pipeline_workers']} workers", pipe, None),
        ("device open path, workers=1", tp["pipeline_1worker_mbps"], None),
        (
            f"gateway verify path (pread + SHA-256 hash list), {tp['pipeline_workers']} workers",
            tp["gateway_mbps"],
            None,
        ),
        ("raw AES-256-GCM decrypt, 1 MiB chunks, 1 core", tp["aesgcm_1core_mbps"], DECRYPT_VS_AESGCM_TARGET),
        ("  (for reference) raw GMAC of the sealed chunk, 1 MiB, 1 core", tp["gmac_1core_mbps"], None),
        ("  (for reference) raw SHA-256, 1 MiB chunks, 1 core", tp["sha256_1core_mbps"], None),
        ("  (for reference) os.pread, 1 MiB chunks, 1 core", tp["pread_1core_mbps"], None),
        (fernet_what, tp["fernet_mbps"], None),
    ]
    for i, (what, mbps, target) in enumerate(rows):
        ratio = pipe / mbps
        t.add_row(
            what,
            _fmt(mbps, 0),
            "" if i == 0 else _fmt(ratio, 2),
            "" if target is None else f"≥ {target}",
            "" if target is None else _mark(ratio >= target),
        )
    console.print(t)

    t = Table(title="Peak memory while opening, fresh process each: (ru_maxrss − RSS after imports) ÷ model file size")
    for col in ("model", "bundle MB", "bundle ratio", "plain MB", "plain ratio", "target", ""):
        t.add_column(col, justify="right" if col not in ("model", "") else "left")
    for m in bench.models:
        lb = m["label"]
        r = results[f"peak_mem_ratio_{lb}"]
        t.add_row(
            lb,
            _fmt(results[f"peak_mem_mb_{lb}"]),
            _fmt(r, 2),
            _fmt(results[f"plain_peak_mem_mb_{lb}"]),
            _fmt(results[f"plain_peak_mem_ratio_{lb}"], 2),
            f"≤ {PEAK_MEM_TARGET}" if lb == "100mb" else "-",
            _mark(r <= PEAK_MEM_TARGET) if lb == "100mb" else "",
        )
    console.print(t)
    if results["memory_warnings"]:
        console.print(f"[yellow]memory: {results['memory_warnings']}[/yellow]")
    console.print(
        f"{'quick' if quick else 'full'} run, {results['wall_s']:.1f} s; MB = 10^6 bytes. {Background.note(results)}"
    )

    write_report(console, args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
