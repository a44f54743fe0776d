"""Benchmark: the trade-off behind issue 13's adversarial target — robust accuracy vs clean accuracy vs ε — for
digits MLPs trained with TRADES at several budgets, each model alone and as the whole defended system.

    python benchmarks/tradeoff.py [--quick] [--json PATH]

The target (end-to-end attack success ≤ 5 % at L∞ 2/16 with clean accuracy ≥ 96 % and measured FPR ≤ 2 %) is a
point on a curve: a larger training budget buys robustness with clean accuracy. This run draws the curve, so that a
missed target says by how much and in which direction the next model would have to move.

Protocol (fixed before the results; printed with them):

1. Models, all the digits MLP (``edgeshield.training.digits_mlp``): the shipped standard model (``digits.onnx``),
   and TRADES (β 6, L∞, 10 attack steps, the epochs and optimiser of ``digits_robust_config(arch="mlp",
   method="trades")``) at training ε 1/16, 2/16, 3/16 and 4/16, plus two β variants at 2/16 (β 1 and β 12). The
   2/16, β 6 model is the shipped ``digits_robust.onnx`` (that recipe; not retrained here). The others are trained
   here on x_train: ``torch.manual_seed(0)`` before the model is built, config seed 0, deterministic algorithms,
   exported with ``onnx_bytes`` (checked against ONNX Runtime on every digit). One torch thread for the whole run,
   training and attacks.
2. Model figures on all 450 test digits (``load_digits_split().x_test``): clean accuracy (ONNX Runtime) and
   AutoAttack robust accuracy (``autoattack_accuracy``: torchattacks 3.5.1 ``AutoAttack(version="standard")``,
   10 iterations, seed 0; continuous, no grid, no detectors) at L∞ 1/16, 2/16 and 3/16, on the torch twin of the
   protected model. Every rate with its 95 % Clopper–Pearson interval.
3. System figures at L∞ 2/16: each model becomes the defended system ``benchmarks/adversarial.py`` builds
   (``prepare_system``: hidden layers exposed, protected into a bundle whose input spec has the 1/16 grid, runtime
   detectors squeeze, noise, reconstruction, mahalanobis and lid calibrated to 2 % FPR on x_test[:225], decision
   "fisher"), and ``evaluate_system`` attacks it per input on the evaluation half x_test[225:] with AutoAttack
   projected onto the grid and the adaptive sweep, the same ``SuiteConfig()`` as ``benchmarks/adversarial.py``
   (λ ∈ {0, 0.3, 1, 3}, CE and margin losses, the combined penalty, 40 iterations). Reported: model and system
   clean accuracy, measured FPR (clean evaluation digits refused), system robust accuracy and end-to-end success,
   each with its interval.
4. Target per model (point estimates): end-to-end success ≤ 0.05, clean accuracy on the 450 test digits ≥ 0.96,
   measured FPR ≤ 0.02. Conclusion: the lowest end-to-end success among the models that meet the clean-accuracy
   and FPR parts, and the lowest overall with the clean accuracy it costs.

``--quick``: the standard and the shipped 2/16 model only, 60 evaluation inputs, ``SuiteConfig.quick()``,
AutoAttack at L∞ 2/16 only on the first 100 test digits: a smoke run, not figures. ``--json PATH`` writes one flat
JSON object and the plot (``<name>.png``, beside it): robust accuracy against the attack's ε per model, and
end-to-end success against clean accuracy with the target box.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import edgeshield  # noqa: F401  # before onnxruntime: switches its telemetry off
from adversarial import (  # benchmarks/adversarial.py: the same defended system, built the same way
    N_CAL,
    QUANTUM,
    SYSTEM_DECISION,
    SYSTEM_DETECTORS,
    TARGET_FPR,
    machine_info,
    prepare_system,
)

from _machine import Background, open_report, write_report

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

TARGET_E2E, TARGET_CLEAN = 0.05, 0.96
TRADES_BETA = 6.0
ATTACK_EPS = (1 / 16, 2 / 16, 3 / 16)
QUICK_EVAL, QUICK_AA = 60, 100


def _suite(quick: bool) -> Any:
    from edgeshield.evaluation._system import SuiteConfig

    if quick:
        return SuiteConfig.quick()
    return SuiteConfig()  # the suite of benchmarks/adversarial.py: its figures and these compare directly


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    key: str  # for the flat figure names: tradeoff_<key>_...
    label: str
    train_eps: float | None  # None: the standard (cross-entropy) model
    beta: float | None
    shipped: str | None  # "standard" / "robust": the shipped file instead of training


def model_specs(quick: bool) -> list[ModelSpec]:
    specs = [ModelSpec("standard", "standard", None, None, "standard")]
    for levels in ((2,) if quick else (1, 2, 3, 4)):
        specs.append(ModelSpec(f"eps{levels}_16", f"TRADES β 6, ε {levels}/16", levels / 16, TRADES_BETA,
                               "robust" if levels == 2 else None))
    if not quick:
        specs += [ModelSpec(f"eps2_16_beta{b:g}", f"TRADES β {b:g}, ε 2/16", 2 / 16, b, None) for b in (1.0, 12.0)]
    return specs


def train_model(m: ModelSpec, split: Any) -> bytes:
    """A TRADES MLP at ``m``'s budget and β, the shipped robust model's recipe otherwise, as ONNX bytes."""
    import torch

    from edgeshield.models import DIGITS_INPUT_NAME, DIGITS_OUTPUT_NAME
    from edgeshield.training import digits_mlp, digits_robust_config, train_robust
    from edgeshield.training._robust import onnx_bytes

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # run() already did; the recipe is reproducible on one thread
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        model = digits_mlp()
        config = digits_robust_config(arch="mlp", method="trades", eps=m.train_eps, beta=m.beta, seed=0)
        train_robust(model, split.x_train, split.y_train, config)
        return onnx_bytes(model.eval(), np.concatenate([split.x_train, split.x_test]),
                          input_name=DIGITS_INPUT_NAME, output_name=DIGITS_OUTPUT_NAME)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _rate(k: int, n: int) -> dict[str, float]:
    from edgeshield.evaluation._autoattack import clopper_pearson_interval

    low, high = clopper_pearson_interval(k, n)
    return {"rate": k / n, "ci_low": low, "ci_high": high}


def run(quick: bool) -> dict[str, Any]:
    import torch

    from edgeshield._progress import report
    from edgeshield.cli._progress import progress_bars
    from edgeshield.evaluation._autoattack import autoattack_accuracy
    from edgeshield.evaluation._system import HEADLINE, Budget, evaluate_system
    from edgeshield.models import digits_input_spec, digits_model_path, digits_robust_model_path, load_digits_split

    # One torch thread throughout: the MLP's attacks are barely faster on two, and two threads beside any other
    # load on a two-core machine spin against it (measured: a forward and backward pass 20-80x slower).
    torch.set_num_threads(1)
    spec = dataclasses.replace(digits_input_spec(), quantum=QUANTUM)
    split = load_digits_split()
    x_eval, y_eval = split.x_test[N_CAL:], split.y_test[N_CAL:]
    if quick:
        x_eval, y_eval = x_eval[:QUICK_EVAL], y_eval[:QUICK_EVAL]
    n_aa = QUICK_AA if quick else len(split.x_test)
    x_aa, y_aa = split.x_test[:n_aa], split.y_test[:n_aa]
    attack_budgets = (HEADLINE,) if quick else tuple(Budget("Linf", e) for e in ATTACK_EPS)
    suite = _suite(quick)
    shipped = {"standard": digits_model_path(), "robust": digits_robust_model_path()}
    specs = model_specs(quick)
    flat: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="edgeshield-tradeoff-"))
    try:
        with progress_bars(background=False) as progress:
            for i, m in enumerate(specs):
                row: dict[str, Any] = {"spec": m, "label": m.label, "seconds": {}}
                t0 = time.perf_counter()
                if m.shipped:
                    report(progress, "trade-off models", i, len(specs), note=f"{row['label']}: shipped file")
                    raw = shipped[m.shipped].read_bytes()
                    row["source"] = shipped[m.shipped].name
                else:
                    report(progress, "trade-off models", i, len(specs), note=f"{row['label']}: training")
                    raw = train_model(m, split)
                    row["source"] = "trained here"
                row["seconds"]["train"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                system = prepare_system(m.key, raw, split, spec, work)  # a file name: the key, not the label
                system.name = m.label
                row["seconds"]["calibrate"] = time.perf_counter() - t0
                clean = system.robust.clf.predict(split.x_test) == split.y_test
                row["clean"] = _rate(int(clean.sum()), len(clean))
                row["autoattack"] = {}
                t0 = time.perf_counter()
                for b in attack_budgets:
                    report(progress, "trade-off models", i, len(specs), note=f"{row['label']}: AutoAttack {b.label}")
                    aa = autoattack_accuracy(system.torch_model, x_aa, y_aa, norm="Linf", eps=b.eps, seed=0)
                    row["autoattack"][b] = {"rate": aa.robust_accuracy, "ci_low": aa.ci_low, "ci_high": aa.ci_high}
                    flat["tradeoff_autoattack_variant"] = aa.variant
                row["seconds"]["autoattack"] = time.perf_counter() - t0
                report(progress, "trade-off models", i, len(specs), note=f"{row['label']}: system, {HEADLINE.label}")
                t0 = time.perf_counter()
                row["system"] = evaluate_system(system, x_eval, y_eval, (HEADLINE,), suite=suite, progress=progress)
                row["seconds"]["system"] = time.perf_counter() - t0
                rows.append(row)
                _flatten(flat, row, attack_budgets)
            report(progress, "trade-off models", len(specs), len(specs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    conclusion = _conclude(rows, flat)
    return {"rows": rows, "flat": flat, "attack_budgets": attack_budgets, "conclusion": conclusion,
            "protocol": _protocol_text(quick, len(x_eval), n_aa, suite), "suite": suite}


def _put(flat: dict[str, Any], name: str, r: dict[str, Any] | None) -> None:
    if r is not None:
        flat[name], flat[f"{name}_ci_low"], flat[f"{name}_ci_high"] = r["rate"], r["ci_low"], r["ci_high"]


def _meets(row: dict[str, Any]) -> dict[str, bool]:
    e2e = row["system"].budgets[0].end_to_end_success["rate"]
    return {"clean": row["clean"]["rate"] >= TARGET_CLEAN, "fpr": row["system"].fpr["rate"] <= TARGET_FPR,
            "e2e": e2e is not None and e2e <= TARGET_E2E}


def _flatten(flat: dict[str, Any], row: dict[str, Any], attack_budgets: tuple[Any, ...]) -> None:
    from edgeshield.evaluation._system import flat_figures

    m, p = row["spec"], f"tradeoff_{row['spec'].key}_"
    _put(flat, f"{p}clean_accuracy", row["clean"])
    for b in attack_budgets:
        _put(flat, f"{p}autoattack_robust_accuracy_{b.key}", row["autoattack"][b])
    flat.update(flat_figures(row["system"], prefix=p))
    met = _meets(row)
    flat.update({f"{p}label": row["label"], f"{p}source": row["source"], f"{p}train_eps": m.train_eps,
                 f"{p}beta": m.beta, f"{p}target_met": all(met.values()),
                 **{f"{p}seconds_{k}": round(v, 1) for k, v in row["seconds"].items()}})


def _e2e(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = row["system"].budgets[0].end_to_end_success
    return out


def _conclude(rows: list[dict[str, Any]], flat: dict[str, Any]) -> str:
    """One line from the figures: the best end-to-end success where clean accuracy and FPR meet the target."""
    scored = [r for r in rows if _e2e(r)["rate"] is not None]
    eligible = [r for r in scored if _meets(r)["clean"] and _meets(r)["fpr"]]
    met = [r["label"] for r in rows if all(_meets(r).values())]
    flat["tradeoff_target_met_by"] = met
    parts = []
    if eligible:
        best = min(eligible, key=lambda r: _e2e(r)["rate"])
        e = _e2e(best)
        flat["tradeoff_best_eligible_model"] = best["spec"].key
        _put(flat, "tradeoff_best_eligible_end_to_end_success", e)
        gap = e["rate"] - TARGET_E2E
        parts.append(f"among models with clean accuracy ≥ {TARGET_CLEAN} and FPR ≤ {TARGET_FPR}, the lowest "
                     f"end-to-end success at L∞ 2/16 is {e['rate']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}] "
                     f"({best['label']}): " + (f"{-gap:.3f} under the {TARGET_E2E} target" if gap <= 0
                                               else f"{gap:.3f} above the {TARGET_E2E} target"))
    else:
        flat["tradeoff_best_eligible_model"] = None
        parts.append(f"no model meets both clean accuracy ≥ {TARGET_CLEAN} and FPR ≤ {TARGET_FPR}")
    if scored:
        low = min(scored, key=lambda r: _e2e(r)["rate"])
        flat["tradeoff_lowest_end_to_end_model"] = low["spec"].key
        parts.append(f"the lowest overall is {_e2e(low)['rate']:.3f} ({low['label']}) at clean accuracy "
                     f"{low['clean']['rate']:.3f} and FPR {low['system'].fpr['rate']:.3f}")
    parts.append(f"target met by {', '.join(met)}" if met else "no model meets the whole target")
    return "; ".join(parts) + "."


def _protocol_text(quick: bool, n_eval: int, n_aa: int, suite: Any) -> str:
    models = ("standard (digits.onnx) and TRADES β 6 ε 2/16 (digits_robust.onnx)" if quick else
              "standard (digits.onnx); TRADES β 6 at training ε 1/16, 3/16, 4/16 (trained here, seed 0, one "
              "thread, deterministic) and 2/16 (digits_robust.onnx, the same recipe, not retrained); TRADES ε 2/16 "
              "β 1 and β 12 (trained here)")
    eps = "L∞ 2/16" if quick else "L∞ 1/16, 2/16, 3/16"
    return (f"models = {models}; clean accuracy on the 450 test digits; AutoAttack (torchattacks standard, 10 "
            f"iterations, seed 0) at {eps} on the first {n_aa} test digits; system = benchmarks/adversarial.py's "
            f"prepare_system (1/16 grid, {', '.join(SYSTEM_DETECTORS)} calibrated to {TARGET_FPR} FPR on "
            f"x_test[:{N_CAL}], decision {SYSTEM_DECISION}), evaluate_system at L∞ 2/16 on x_test[{N_CAL}:]"
            + (f" (first {n_eval}, --quick)" if quick else "")
            + f"; suite = AutoAttack on the grid + adaptive sweep λ {list(suite.lambdas)}, losses "
            f"{list(suite.losses)}, penalties {list(suite.penalties)}, {suite.iters} iterations, {suite.eot_draws} "
            f"EOT draws; one torch thread; target: end-to-end success ≤ {TARGET_E2E}, clean accuracy ≥ "
            f"{TARGET_CLEAN}, FPR ≤ {TARGET_FPR} (point estimates).")


def _ci(r: dict[str, Any] | None) -> str:
    if r is None or r["rate"] is None:
        return "-"
    return f"{r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def print_tables(console: Any, out: dict[str, Any]) -> None:
    from rich.table import Table

    from edgeshield.evaluation._system import report_table

    budgets = out["attack_budgets"]
    t = Table(title="The models alone: clean accuracy and AutoAttack robust accuracy [95% CI] against the attack's ε")
    for col in ("model", "source", "clean acc (450)", *(f"AA {b.label}" for b in budgets), "train / calibrate / AA s"):
        t.add_column(col, justify="left" if col in ("model", "source") else "right")
    for r in out["rows"]:
        s = r["seconds"]
        t.add_row(r["label"], r["source"], _ci(r["clean"]), *(_ci(r["autoattack"][b]) for b in budgets),
                  f"{s['train']:.0f} / {s['calibrate']:.0f} / {s['autoattack']:.0f}")
    console.print(t)
    console.print(report_table([r["system"] for r in out["rows"]],
                               title="The defended systems at L∞ 2/16 (per-input worst case over the suite)"))
    t = Table(title=f"Target per model (✗ = missed): end-to-end ≤ {TARGET_E2E} at L∞ 2/16, clean ≥ {TARGET_CLEAN}, "
                    f"FPR ≤ {TARGET_FPR}")
    for col in ("model", "clean acc", "FPR", "end-to-end success", "system s", "met"):
        t.add_column(col, justify="left" if col == "model" else "right")
    def mark(ok: bool) -> str:
        return "" if ok else " ✗"

    for r in out["rows"]:
        met = _meets(r)
        e2e = _e2e(r)["rate"]
        t.add_row(r["label"], f"{r['clean']['rate']:.3f}{mark(met['clean'])}",
                  f"{r['system'].fpr['rate']:.3f}{mark(met['fpr'])}",
                  ("-" if e2e is None else f"{e2e:.3f}") + mark(met["e2e"]), f"{r['seconds']['system']:.0f}",
                  "yes" if all(met.values()) else "NO")
    console.print(t)
    console.print(f"[bold]Conclusion:[/bold] {out['conclusion']}")


def make_plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    budgets = out["attack_budgets"]
    xs = [b.eps * 16 for b in budgets]
    for i, r in enumerate(out["rows"]):
        ys = [r["autoattack"][b]["rate"] for b in budgets]
        err = [[y - r["autoattack"][b]["ci_low"] for b, y in zip(budgets, ys, strict=True)],
               [r["autoattack"][b]["ci_high"] - y for b, y in zip(budgets, ys, strict=True)]]
        left.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=r["label"])
    left.set_xticks(xs, [b.label for b in budgets])
    left.set_xlabel("attack budget (AutoAttack, torchattacks standard)")
    left.set_ylabel("robust accuracy (test digits)")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best")
    left.set_title("The models alone: robust accuracy vs attack ε")
    right.add_patch(Rectangle((TARGET_CLEAN, 0), 1 - TARGET_CLEAN, TARGET_E2E, facecolor="C2", alpha=0.2,
                              edgecolor="C2", label=f"target (≥ {TARGET_CLEAN}, ≤ {TARGET_E2E})"))
    for i, r in enumerate(out["rows"]):
        c, e = r["clean"], _e2e(r)
        if e["rate"] is None:
            continue
        right.errorbar([c["rate"]], [e["rate"]], xerr=[[c["rate"] - c["ci_low"]], [c["ci_high"] - c["rate"]]],
                       yerr=[[e["rate"] - e["ci_low"]], [e["ci_high"] - e["rate"]]], marker="o", capsize=3,
                       color=f"C{i}", label=r["label"])
    right.set_xlabel("clean accuracy (450 test digits)")
    right.set_ylabel("end-to-end success at L∞ 2/16 (system)")
    top = max([e["ci_high"] for e in map(_e2e, out["rows"]) if e["rate"] is not None], default=1.0)
    right.set_ylim(0, min(1.0, max(0.2, top + 0.05)))
    right.set_xlim(min(0.85, *(r["clean"]["ci_low"] - 0.01 for r in out["rows"])), 1.0)
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper left")
    right.set_title("The defended systems: end-to-end success vs clean accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="standard + shipped robust model, 60 evaluation inputs, the quick suite (< 2 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write one flat JSON object, and the plot <name>.png beside it")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    info = machine_info()
    console = open_report(150, info)
    background = Background()
    out = run(args.quick)
    console.print(f"[bold]Protocol:[/bold] {out['protocol']}")
    print_tables(console, out)
    flat = dict(out["flat"])
    flat.update(tradeoff_conclusion=out["conclusion"], quick=args.quick, machine=info["machine"],
                date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), protocol=out["protocol"],
                tradeoff_suite=dataclasses.asdict(out["suite"]), wall_s=time.perf_counter() - started,
                **background.stop())
    console.print(f"{'quick' if args.quick else 'full'} run, {flat['wall_s']:.1f} s. {Background.note(flat)}")
    if args.json:
        png = Path(args.json).with_suffix(".png")
        make_plot(out, png)
        flat["plot"] = png.name
        write_report(console, args.json, flat, also=f" and {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
