"""Benchmark: what a labels-only copy of the served-watermarked digits model carries, per unit kind, rate, key and
copy training length (the table of docs/extraction.md, "Served watermark: units, regions ...").

    python benchmarks/served_marks.py [--quick] [--json PATH]

Protocol (through the library, no server: the answers are what the app's ``_watch_extraction`` gives a labels-only
client). Victim: the shipped digits MLP with the owner's weight watermark (what is served). Canonical keys:
``LeaderKeys`` over x_train then x_test, as the app keys them. Served mark: ``ServedWatermark(key, rate,
classes=10, regions=bits, reference=x_train)`` (``bits`` None: point units on the canonical keys).

* Honest drop: the victim's accuracy on x_test minus the accuracy of the labels a client receives for x_test.
* Thief: a labels-only CopycatCNN-equivalent session of ``SESSION`` distinct x_train digits (a seeded draw), the
  thief keeping the answered labels; copies are the evaluation's (``_copies``: a 64-128-64-10 MLP, Adam 1e-3,
  batch 32, one training run snapshotted at each length). Evidence: the marked rows, with their units. Proof:
  ``verify_copy(copy, ..., units=, victim=)``: matched units / units and p.
* Larger session: all 1,347 training digits, copies at 30 epochs.
* Sybil pool: ``SESSION`` digits each sent 3 times with one pixel moved 1e-6..5e-5 (``jittered``), keyed by
  ``LeaderKeys`` (the copies share their digit's key), the thief's label the majority of the 3 answers; the copy
  trained on all 3 x ``SESSION`` rows.
* False claims: the victim itself and independently trained MLPs (the evaluation's controls, trained on the true
  labels) against every cell's evidence, with and without the victim exclusion.

Full run: copies at 10/30/100 epochs in every 1,000-digit cell, and at 200 too for points at 1 % (the cell whose
100-epoch copy is not proven); the Sybil pool at 10/30; keys 0 and 1 for points at 1/2/5 %, regions of 6 bits at
5 % (both session sizes), key 0 elsewhere: what two loaded CPU cores ran in about 17 minutes (``--workers 2``: the
cells shared by two processes; the figures do not depend on it). ``--quick``: key 0, four cells, copies up to 100
epochs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import edgeshield  # noqa: F401  # before onnxruntime: switches its telemetry off

from _machine import Background, eval_stack, hardware, open_report, write_report  # benchmarks/_machine.py

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

SESSION = 1000  # distinct answers of one thief session (CopycatCNN at the evaluation's largest budget)
LENGTHS = (10, 30, 100, 200)
SHORT_LENGTHS = (10, 30, 100)  # what two CPU cores allow in one run for most cells
SYBIL_LENGTHS = (10, 30)  # the pooled thief trains on 3x the rows: the 30-epoch copy is the question
QUICK_LENGTHS = (10, 30, 100)
LARGE_LENGTH = 30


@dataclass(frozen=True)
class Cell:
    bits: int | None  # None: point units
    rate: float
    session: int = SESSION
    sybil: bool = False
    long: bool = False  # copies up to 200 epochs (else SHORT_LENGTHS)
    keys: int = 1  # how many served-watermark keys (0, 1, ...)

    @property
    def kind(self) -> str:
        return "points" if self.bits is None else f"regions{self.bits}"

    def tag(self, key: int) -> str:
        extra = "_sybil" if self.sybil else ("" if self.session == SESSION else f"_n{self.session}")
        return f"{self.kind}_{round(self.rate * 1000):03d}pm{extra}_k{key}"


FULL_CELLS = (
    [Cell(None, 0.01, long=True, keys=2), Cell(None, 0.02, keys=2), Cell(None, 0.05, keys=2), Cell(None, 0.10)]
    + [Cell(5, 0.05), Cell(6, 0.05, keys=2), Cell(7, 0.05)]
    + [Cell(6, r) for r in (0.02, 0.10)]
    + [Cell(6, 0.05, session=1347, keys=2), Cell(None, 0.05, session=1347)]
    + [Cell(None, r, sybil=True) for r in (0.01, 0.02, 0.05)]
)
QUICK_CELLS = (Cell(None, 0.02), Cell(None, 0.05), Cell(6, 0.05), Cell(None, 0.02, sybil=True))


def served_key(i: int) -> bytes:
    """The i-th served-watermark key of the run (key 0 is the evaluation's WATERMARK_KEY)."""
    from edgeshield.evaluation._extraction import WATERMARK_KEY

    return WATERMARK_KEY if i == 0 else hashlib.sha256(b"edgeshield/bench/served-marks/key" + bytes([i])).digest()


@dataclass
class _Context:
    """What every cell shares: the data, the served victim, its labels and the app's canonical keys."""

    split: Any
    victim: bytes
    v_train: np.ndarray
    v_test: np.ndarray
    keys_train: list[bytes]
    keys_test: list[bytes]
    leader: Any
    victim_accuracy: float


_CTX: _Context | None = None


def _context() -> _Context:
    global _CTX  # noqa: PLW0603 - one per (worker) process
    if _CTX is None:
        import torch

        from edgeshield.bundles._ort import onnxruntime as ort
        from edgeshield.extraction import LeaderKeys
        from edgeshield.models import digits_model_path, load_digits_split
        from edgeshield.watermark import embed

        torch.set_num_threads(1)
        split = load_digits_split()
        victim, _ = embed(digits_model_path().read_bytes(), served_key(0))
        sess = ort.InferenceSession(victim, providers=["CPUExecutionProvider"])

        def labels_of(x: np.ndarray) -> np.ndarray:
            return np.asarray(sess.run(None, {"input": x.astype(np.float32)})[0]).argmax(axis=1)

        leader = LeaderKeys()
        keys_train, keys_test = leader.keys(split.x_train), leader.keys(split.x_test)  # as the app keys them
        v_train, v_test = labels_of(split.x_train), labels_of(split.x_test)
        _CTX = _Context(split, victim, v_train, v_test, keys_train, keys_test, leader,
                        float((v_test == split.y_test).mean()))
    return _CTX


def run_cell(cell: Cell, k: int, lengths: tuple[int, ...], controls: list[tuple[str, bytes]]) -> dict[str, Any]:
    """One (unit kind, rate, key, session kind): the honest drop, the thief's copies' proofs and the controls'."""
    from edgeshield.evaluation._extraction import _copies, _majority, _onehot, jittered
    from edgeshield.watermark import ServedWatermark, verify_copy

    ctx = _context()
    split = ctx.split
    wm = ServedWatermark(served_key(k), cell.rate, classes=10, regions=cell.bits, reference=split.x_train)
    honest = wm.mark(split.x_test, ctx.v_test, keys=ctx.keys_test).labels
    rng = np.random.default_rng(1000 + k)
    pick = rng.choice(len(split.x_train), min(cell.session, len(split.x_train)), replace=False)
    x, v, keys = split.x_train[pick], ctx.v_train[pick], [ctx.keys_train[i] for i in pick]
    if cell.sybil:  # every digit sent 3 times, jittered; the app keys each copy as its digit's leader
        sent = [jittered(x, rng) for _ in range(3)]
        marks = [wm.mark(s, v, keys=ctx.leader.keys(s)) for s in sent]
        y_thief, _ = _majority([_onehot(m.labels) for m in marks])
        x_fit, y_fit = np.concatenate(sent), np.tile(y_thief, 3)
        x_ev = np.concatenate([s[m.marked] for s, m in zip(sent, marks, strict=True)])
        y_ev = np.concatenate([m.labels[m.marked] for m in marks])
        units = [u for m in marks for u in m.marked_units()]
    else:
        m = wm.mark(x, v, keys=keys)
        x_fit, y_fit = x, m.labels
        x_ev, y_ev, units = x[m.marked], m.labels[m.marked], m.marked_units()
    row: dict[str, Any] = {
        "tag": cell.tag(k), "units_kind": cell.kind, "bits": cell.bits, "rate": cell.rate, "key": k,
        "session": len(x), "answers": len(x_fit), "sybil": cell.sybil,
        "honest_accuracy_drop": ctx.victim_accuracy - float((honest == split.y_test).mean()),
        "answers_marked_fraction": float((y_fit != np.tile(v, len(x_fit) // len(x))).mean()),
        "evidence_rows": len(y_ev), "copies": {}, "control_p": [],
    }
    for epochs, snapshot in _copies(x_fit, y_fit, lengths, seed=7 + k).items():
        r = verify_copy(snapshot.predict, x_ev, y_ev, classes=10, units=units, victim=ctx.victim)
        row["copies"][epochs] = {"matches": r.matches, "units": r.units, "p": r.p_value, "proven": r.present}
    for _, model in controls:
        for kw in ({"victim": ctx.victim}, {}):
            row["control_p"].append(verify_copy(model, x_ev, y_ev, classes=10, units=units, **kw).p_value)
    return row


def _lengths(cell: Cell, quick: bool) -> tuple[int, ...]:
    if cell.session != SESSION:
        return (LARGE_LENGTH,)
    if quick:
        return QUICK_LENGTHS
    if cell.sybil:
        return SYBIL_LENGTHS
    return LENGTHS if cell.long else SHORT_LENGTHS


def served_marks(quick: bool = False, progress: Any = None, workers: int = 1) -> dict[str, Any]:
    """Run the protocol (``workers`` processes share the cells); returns ``{"cells": [...], "flat": {...}}``."""
    import concurrent.futures as cf

    import torch

    from edgeshield.evaluation._extraction import _train, build_mlp, mlp_as_onnx
    from edgeshield.models import digits_model_path
    from edgeshield.watermark import marks_needed

    started = time.perf_counter()
    ctx = _context()
    base = digits_model_path().read_bytes()
    controls: list[tuple[str, bytes]] = [("victim", ctx.victim)]
    for i in range(1 if quick else 2):  # as evaluate_watermark trains its independent models
        torch.manual_seed(100 + i)
        module = _train(build_mlp(), ctx.split.x_train, ctx.split.y_train, 8, 100 + i)
        controls.append((f"independent{i}", mlp_as_onnx(base, module)))
    todo = [(c, k) for c in (QUICK_CELLS if quick else FULL_CELLS) for k in range(1 if quick else c.keys)]
    n_keys = max(k for _, k in todo) + 1
    rows: dict[int, dict[str, Any]] = {}
    if workers <= 1:
        for i, (cell, k) in enumerate(todo):
            rows[i] = run_cell(cell, k, _lengths(cell, quick), controls)
            if progress is not None:
                progress(len(rows), len(todo), cell.tag(k))
    else:
        import multiprocessing

        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_cell, c, k, _lengths(c, quick), controls): i for i, (c, k) in enumerate(todo)}
            for f in cf.as_completed(futures):
                rows[futures[f]] = f.result()
                print("row " + json.dumps(rows[futures[f]]), file=sys.stderr, flush=True)  # kept if a later cell fails
                if progress is not None:
                    progress(len(rows), len(todo), rows[futures[f]]["tag"])
    ordered = [rows[i] for i in range(len(todo))]
    control_p = [p for row in ordered for p in row.pop("control_p")]
    flat: dict[str, Any] = {
        "scale": "quick" if quick else "full", "session": SESSION, "keys": n_keys,
        "victim_accuracy": ctx.victim_accuracy, "marks_needed_1e-6": marks_needed(10),
        "false_claims": sum(p < 1e-6 for p in control_p), "false_claim_checks": len(control_p),
        "false_claim_p_min": min(control_p) if control_p else None, "controls": [name for name, _ in controls],
        "workers": workers,
    }
    for row in ordered:
        t = row["tag"]
        flat[f"{t}_honest_accuracy_drop"] = row["honest_accuracy_drop"]
        flat[f"{t}_evidence_rows"] = row["evidence_rows"]
        for epochs, c in row["copies"].items():
            for field in ("matches", "units", "p"):
                flat[f"{t}_copy{epochs:03d}_{field}"] = c[field]
    flat["wall_s"] = time.perf_counter() - started
    return {"cells": ordered, "flat": flat}


def _cell_text(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    return f"{c['matches']}/{c['units']} ({c['p']:.2g})"


def table(result: dict[str, Any]):  # type: ignore[no-untyped-def]
    from rich.table import Table

    lengths = sorted({e for row in result["cells"] for e in row["copies"]})
    t = Table(title="Served marks: matched units / units (p) per copy training length, victim= exclusion")
    for col in ("marks", "rate", "key", "session", "answers", "honest drop (pt)", "evidence rows",
                *(f"{e} ep" for e in lengths)):
        t.add_column(col, justify="left" if col == "marks" else "right")
    for row in result["cells"]:
        marks = row["units_kind"] + (" (Sybil pool)" if row["sybil"] else "")
        t.add_row(marks, f"{row['rate']:.0%}", str(row["key"]), str(row["session"]), str(row["answers"]),
                  f"{100 * row['honest_accuracy_drop']:.1f}", str(row["evidence_rows"]),
                  *(_cell_text(row["copies"].get(e)) for e in lengths))
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one key, fewer cells, copies up to 100 epochs")
    parser.add_argument("--json", metavar="PATH", help="write the flat results as JSON")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the cells (same figures)")
    args = parser.parse_args(argv)
    info = {"hardware": hardware(), "versions": eval_stack()}
    console = open_report(140, info)
    background = Background()
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def progress(done: int, total: int, note: str) -> None:
        print(f"  [{done}/{total}] {note}", file=sys.stderr, flush=True)

    result = served_marks(args.quick, progress, args.workers)
    flat = result["flat"]
    flat.update(background.stop())
    flat.update({"machine": f"{info['hardware']}; {info['versions']}", "date": when,
                 "command": "python benchmarks/served_marks.py" + (" --quick" if args.quick else "")
                 + (f" --workers {args.workers}" if args.workers > 1 else "")})
    console.print(table(result))
    console.print(f"False claims: {flat['false_claims']} of {flat['false_claim_checks']} checks (the victim and "
                  f"{len(flat['controls']) - 1} independent MLPs against every cell's evidence, with and without "
                  f"the victim exclusion); smallest p {flat['false_claim_p_min']:.2g}.")
    console.print(f"p < 1e-6 needs >= {flat['marks_needed_1e-6']} matched units. Run {when}, "
                  f"{flat['wall_s']:.0f} s. {Background.note(flat)}")
    write_report(console, args.json, flat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
