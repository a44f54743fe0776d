"""Benchmark: what ``protect`` costs the owner in time and memory, and what opening its bundle costs the device.

    python benchmarks/protect.py [--quick] [--json PATH]

What it measures (every figure comes from this run; nothing is hard-coded):

1. Two models are generated into a temporary directory (benchmarks/_models.py: a chain of MatMul nodes with
   deterministic random float32 weights, 1/sqrt(dim)-scaled): a self-contained ONNX file of 128 MiB (8 blocks of
   2048 x 2048), and a model saved with external data, its 40 weights of 4096 x 4096 in one data file beside the
   graph (2.68 GB, over the 2 GB a single protobuf can hold; ``--quick``: 4 weights, 268 MB).
2. For each model, in a fresh child process each (started through ``sh``, so that ``ru_maxrss`` starts clean; VmHWM
   is cross-checked): ``bundles.protect`` for one recipient (wall time, peak RSS); the device's
   ``bundles.open_session`` of the bundle it wrote (wall time, peak RSS), which then runs the model once on a fixed
   input; and, for comparison, an ONNX Runtime session from the plain model file, run on the same input.
3. The bundle's output must equal the plain model's bit for bit (``numpy.array_equal``); the run fails otherwise.

Peak RSS includes the interpreter and the libraries each child imports before it measures ("RSS after imports":
numpy, onnx, onnxruntime, cryptography, edgeshield); the ratios divide by the model's bytes on disk (graph file plus
data file). Files are read with a warm page cache (each was just written). The model and bundle of one case are
deleted before the next is generated, and the temporary directory is removed at the end, also on failure.
MB means 10**6 bytes, MiB and GiB 2**20 and 2**30.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import edgeshield  # noqa: F401  # before onnxruntime: switches its telemetry off
from edgeshield._progress import report

from _machine import (  # benchmarks/_machine.py and _models.py, beside this script
    Background,
    bundle_stack,
    hardware,
    hwm_warning,
    mem_available_bytes,
    open_report,
    peak_rss_bytes,
    rss_bytes,
    run_child,
    temp_dir,
    vm_hwm_bytes,
    write_report,
)
from _models import write_matmul_chain

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

MB = 1_000_000
MIB = 1 << 20
GIB = 1 << 30
BATCH = 2  # rows of the fixed input


# (label, what, blocks, dim, external data file or None); the quick run shrinks the external-data model only.
def cases(quick: bool) -> list[tuple[str, str, int, int, str | None]]:
    return [
        ("inline", "self-contained", 8, 2048, None),
        ("external", "external data", 4 if quick else 40, 4096, "model.data"),
    ]


# --- child processes: each measures one thing from a clean high-water mark --------------------------------------
def _child_make(out: Path, blocks: int, dim: int, seed: int, data_file: str | None) -> dict[str, Any]:
    import numpy as np

    t0 = time.perf_counter()
    size = write_matmul_chain(out / "model.onnx", blocks=blocks, dim=dim, seed=seed, data_file=data_file)
    x = np.random.default_rng(7).standard_normal((BATCH, dim), dtype=np.float32)
    np.save(out / "x.npy", x)
    return {"model_bytes": size, "generate_s": time.perf_counter() - t0, "data_file": data_file}


def _imports() -> None:
    """What protect and open_session import, loaded before the baseline is taken."""
    import numpy  # noqa: F401
    import onnx  # noqa: F401

    import edgeshield.bundles._image  # noqa: F401  # the owner-side split, imported by protect on first use
    from edgeshield.bundles._ort import onnxruntime  # noqa: F401


def _measured(fn: Any) -> tuple[Any, dict[str, Any]]:
    gc.collect()
    baseline = rss_bytes()
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    return result, {"baseline": baseline, "peak": peak_rss_bytes(), "vm_hwm": vm_hwm_bytes(), "elapsed_s": elapsed}


def _child_protect(workdir: Path, keydir: Path) -> dict[str, Any]:
    from edgeshield import bundles, keys

    _imports()
    owner = keys.load_owner_private_key(keydir / "owner.key")
    device = keys.load_device_public_key(keydir / "device.pub")
    bundle = workdir / "model.esb"
    manifest, r = _measured(lambda: bundles.protect(workdir / "model.onnx", bundle, signing_key=owner,
                                                    recipients=[device]))
    r.update(bundle_bytes=bundle.stat().st_size, plaintext_bytes=manifest.plaintext_size)
    return r


def _run_on_input(session: Any, workdir: Path, name: str) -> None:
    import numpy as np

    y = session.run(None, {"x": np.load(workdir / "x.npy")})[0]
    np.save(workdir / name, y)


def _child_open(workdir: Path, keydir: Path) -> dict[str, Any]:
    from edgeshield import bundles, keys

    _imports()
    owner_pub = keys.load_owner_public_key(keydir / "owner.pub")
    device_priv = keys.load_device_private_key(keydir / "device.key")
    session, r = _measured(lambda: bundles.open_session(workdir / "model.esb", owner_pub, device_priv))
    _run_on_input(session, workdir, "y_bundle.npy")
    return r


def _child_plain(workdir: Path) -> dict[str, Any]:
    from edgeshield.bundles._ort import onnxruntime as ort

    _imports()
    session, r = _measured(lambda: ort.InferenceSession(str(workdir / "model.onnx"),
                                                        providers=["CPUExecutionProvider"]))
    _run_on_input(session, workdir, "y_plain.npy")
    return r


# --- the run ----------------------------------------------------------------------------------------------------
def _compare_outputs(workdir: Path, label: str) -> dict[str, Any]:
    import numpy as np

    y_bundle, y_plain = np.load(workdir / "y_bundle.npy"), np.load(workdir / "y_plain.npy")
    if not np.isfinite(y_plain).all() or not y_plain.any():
        raise AssertionError(f"{label}: the plain model's output is not a usable reference (non-finite or all zero)")
    if y_bundle.shape != y_plain.shape or not np.array_equal(y_bundle, y_plain):
        diff = float(np.max(np.abs(y_bundle - y_plain))) if y_bundle.shape == y_plain.shape else float("nan")
        raise AssertionError(f"{label}: the bundle's output differs from the plain model's (shapes {y_bundle.shape} "
                             f"vs {y_plain.shape}, max |difference| {diff})")
    return {"outputs_equal": True, "output_shape": list(y_plain.shape)}


def run_case(workdir: Path, keydir: Path, case: tuple[str, str, int, int, str | None], seed: int,
             progress: Any) -> dict[str, Any]:
    label, _, blocks, dim, data_file = case
    here = workdir / label
    here.mkdir()
    steps = ["generate", "protect", "open_session", "plain session"]
    script = __file__
    try:
        report(progress, f"{label}: generate the model (untimed)", 0, len(steps))
        out: dict[str, Any] = run_child(script, ["make", "--dir", str(here), "--blocks", str(blocks), "--dim",
                                                 str(dim), "--seed", str(seed), "--data-file", data_file or ""])
        need = 3 * out["model_bytes"] + GIB  # protect holds about twice the model; keep a margin
        available = mem_available_bytes()
        if 0 <= available < need:
            raise RuntimeError(f"{label}: {available / GIB:.1f} GiB of memory available, the run needs about "
                               f"{need / GIB:.1f} GiB; try --quick")
        report(progress, f"{label}: protect (fresh process)", 1, len(steps))
        out["protect"] = run_child(script, ["protect", "--dir", str(here), "--keys", str(keydir)])
        report(progress, f"{label}: device open_session (fresh process)", 2, len(steps))
        out["open"] = run_child(script, ["open", "--dir", str(here), "--keys", str(keydir)])
        report(progress, f"{label}: plain ONNX Runtime session (fresh process)", 3, len(steps))
        out["plain"] = run_child(script, ["plain", "--dir", str(here)])
        out.update(_compare_outputs(here, label))
        report(progress, f"{label}: done", len(steps), len(steps))
    finally:
        shutil.rmtree(here, ignore_errors=True)  # multi-GB: gone before the next case is generated
    return out


def machine_info() -> dict[str, str]:
    import onnx

    hw = f"{hardware()}; {temp_dir()}"
    versions = f"{bundle_stack()}, onnx {onnx.__version__}"
    return {"machine": f"{hw}; {versions}", "hardware": hw, "versions": versions}


def _flatten(label: str, what: str, blocks: int, dim: int, r: dict[str, Any]) -> dict[str, Any]:
    size = r["model_bytes"]
    flat: dict[str, Any] = {
        f"{label}_model": f"{what}: {blocks} MatMul weights of {dim} x {dim} float32"
        + (" in one data file" if r["data_file"] else ""),
        f"{label}_model_bytes": size,
        f"{label}_bundle_bytes": r["protect"]["bundle_bytes"],
        f"{label}_generate_s": r["generate_s"],
        f"{label}_outputs_equal": r["outputs_equal"],
    }
    for step in ("protect", "open", "plain"):
        m = r[step]
        flat.update({
            f"{label}_{step}_s": m["elapsed_s"],
            f"{label}_{step}_peak_bytes": m["peak"],
            f"{label}_{step}_vm_hwm_bytes": m["vm_hwm"],
            f"{label}_{step}_after_imports_bytes": m["baseline"],
            f"{label}_{step}_peak_ratio": m["peak"] / size,
            f"{label}_{step}_above_imports_ratio": (m["peak"] - m["baseline"]) / size,
        })
    return flat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 268 MB external-data model instead of 2.68 GB")
    ap.add_argument("--json", metavar="PATH", help="write the results as one flat JSON object")
    ap.add_argument("--_child", choices=["make", "protect", "open", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--keys", help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        d = Path(args.dir)
        if args._child == "make":
            r = _child_make(d, args.blocks, args.dim, args.seed, args.data_file or None)
        elif args._child == "protect":
            r = _child_protect(d, Path(args.keys))
        elif args._child == "open":
            r = _child_open(d, Path(args.keys))
        else:
            r = _child_plain(d)
        print(json.dumps(r))
        return 0

    from rich.table import Table

    from edgeshield import keys
    from edgeshield.cli._progress import progress_bars

    started = time.perf_counter()
    quick = args.quick
    info = machine_info()
    console = open_report(130, info)
    background = Background()
    workdir = Path(tempfile.mkdtemp(prefix="edgeshield-bench-protect-"))
    measured: dict[str, dict[str, Any]] = {}
    try:
        keydir = workdir / "keys"
        keys.init_keys(keydir)
        # Progress on stderr, drawn only between measurements (no refresh thread while a child runs).
        with progress_bars(background=False) as progress:
            for seed, case in enumerate(cases(quick)):
                measured[case[0]] = run_case(workdir, keydir, case, 4321 + seed, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {
        **background.stop(),
        "quick": quick,
        "machine": info["machine"],
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    warnings = []
    for label, what, blocks, dim, _ in cases(quick):
        results.update(_flatten(label, what, blocks, dim, measured[label]))
        for step in ("protect", "open", "plain"):
            w = hwm_warning(f"{label} {step}", measured[label][step])
            if w:
                warnings.append(w)
    results.update(wall_s=time.perf_counter() - started, memory_warnings="; ".join(warnings) or None)

    t = Table(title="protect (owner) and open_session (device): wall time and peak RSS, a fresh process each")
    columns = ("model", "size", "step", "wall s", "peak RSS", "after imports", "peak ÷ size", "(peak − imports) ÷ size")
    for col in columns:
        t.add_column(col, justify="left" if col in ("model", "step") else "right")
    names = {"protect": "owner: protect", "open": "device: open_session", "plain": "plain-file session"}
    for label, what, blocks, dim, _ in cases(quick):
        size = results[f"{label}_model_bytes"]
        first = [what, f"{blocks} × {dim}² weights", ""]
        sizes = [f"{size / MB:,.0f} MB", f"{size / MIB:,.0f} MiB", ""]
        for i, step in enumerate(("protect", "open", "plain")):
            m = measured[label][step]
            t.add_row(
                first[i],
                sizes[i],
                names[step],
                f"{m['elapsed_s']:.2f}",
                f"{m['peak'] / GIB:.2f} GiB",
                f"{m['baseline'] / MB:.0f} MB",
                f"{results[f'{label}_{step}_peak_ratio']:.2f}",
                f"{results[f'{label}_{step}_above_imports_ratio']:.2f}",
                end_section=i == 2,
            )
    console.print(t)
    for label, *_ in cases(quick):
        shape = "x".join(str(n) for n in measured[label]["output_shape"])
        console.print(f"{results[f'{label}_model']}: bundle output equals the plain model's on a fixed {shape} input: "
                      f"[green]yes[/green] (bundle {results[f'{label}_bundle_bytes'] / MB:,.0f} MB)")
    if results["memory_warnings"]:
        console.print(f"[yellow]memory: {results['memory_warnings']}[/yellow]")
    console.print(
        f"{'quick' if quick else 'full'} run, {results['wall_s']:.1f} s; warm page cache; peak RSS is ru_maxrss of "
        f"each child (VmHWM agrees within 2 % unless warned above); 'plain-file session' is ONNX Runtime opening the "
        f"unprotected model, for comparison. MB = 10^6 bytes, MiB/GiB = 2^20/2^30. {Background.note(results)}"
    )
    write_report(console, args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
