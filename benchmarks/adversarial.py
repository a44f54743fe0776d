"""Benchmark: the adversarial-input defence on the bundled digits model, against real attacks, in one run.

    python benchmarks/adversarial.py [--quick] [--json PATH]

Protocol (fixed; printed with the results):

1. Model: the shipped digits MLP (input "input", float32 [N, 64] in [0, 1], 17 grey levels k/16). Fresh keys are
   made with ``init_keys`` and the model is protected into a temporary bundle whose metadata carries the input
   spec with ``quantum = 1/16``; everything below uses ``open_bundle``'s session, the manifest's ``model_sha256``
   and the bundle's model decrypted in memory and converted with ``onnx_to_torch`` (for gradients).
2. Data: ``load_digits_split()``; reconstruction reference = x_train; calibration = first half of x_test (225);
   evaluation = second half (225). Nothing is calibrated or tuned on the evaluation half.
3. Detectors calibrated to a target FPR of 0.02: squeeze, noise, reconstruction, gradient and their ensemble
   (the decision detector). A second file calibrates the runtime-only ensemble (squeeze, noise, reconstruction;
   no torch at run time) on the same calibration half, reported as ``ensemble_runtime``.
4. ART attacks on the correctly classified evaluation inputs (budgets in the table); per attack and detector:
   success on the undefended model, detection rate at the calibrated threshold over successful examples, AUROC
   (clean evaluation inputs vs. successful examples), FPR measured on the clean evaluation inputs; the spec's
   validation (the 1/16 grid) reported as a separate layer, not folded into the detection rates.
5. Adaptive white-box attack (``edgeshield/evaluation/_adaptive.py``) at L∞ 0.1 on the 1/16 grid, sweep of λ,
   loss and penalty; the strongest configuration is reported. Two supplementary budgets: L∞ 2/16 on the grid,
   and L∞ 0.1 off the grid against the detectors alone.
6. Cost: RobustModel.decide (vectorised robust inference) ÷ session.run, batch of 1 and batch of 225, per detector.

``--quick`` evaluates 100 evaluation inputs, with fewer iterations, no HopSkipJump, a small adaptive sweep, no
supplementary budgets and fewer timing repetitions. ``--json PATH`` writes one flat JSON object and the ROC plots
(``roc_<attack>.png``) next to it.
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

from _machine import eval_stack, hardware, open_report, write_report  # benchmarks/_machine.py, beside this script

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

N_CAL = 225
QUANTUM = 1 / 16
NOISE_SEED = 0  # calibrate() draws a fresh seed per deployment; fixed here so the figures can be rerun exactly
TARGET_FPR = 0.02


def machine_info() -> dict[str, str]:
    hw, versions = hardware(), eval_stack()
    return {"machine": f"{hw}; {versions}", "hardware": hw, "versions": versions}


def _protocol_text(quick: bool, n_eval: int) -> str:
    return (
        "model = shipped digits MLP, protected into a temporary bundle (fresh keys; input spec with quantum 1/16 in "
        "its metadata); split = load_digits_split(); reference (reconstruction PCA) = x_train; calibration = "
        f"x_test[:{N_CAL}]; evaluation = x_test[{N_CAL}:]" + (f" (first {n_eval}, --quick)" if quick else "")
        + f"; target FPR {TARGET_FPR}; decision detector = ensemble(squeeze, noise, reconstruction, gradient); "
        "detection counted at the reject threshold over successful adversarial examples; attacks untargeted on "
        "correctly classified inputs; detection_rate_avg = decision detector averaged over the non-adaptive "
        "attacks; validation (1/16 grid) reported separately."
    )


def run(quick: bool, png_dir: Path | None, console: Any) -> dict[str, Any]:
    from edgeshield import bundles, keys
    from edgeshield.adversarial import METADATA_KEY, OnnxClassifier, calibrate
    from edgeshield.evaluation._adversarial import (
        detectors_with_thresholds,
        evaluate,
        run_adaptive,
        torch_model_for_bundle,
    )
    from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

    spec = dataclasses.replace(digits_input_spec(), quantum=QUANTUM)
    split = load_digits_split()
    x_cal, y_cal = split.x_test[:N_CAL], split.y_test[:N_CAL]
    x_eval, y_eval = split.x_test[N_CAL:], split.y_test[N_CAL:]
    if quick:
        x_eval, y_eval = x_eval[:100], y_eval[:100]
    work = Path(tempfile.mkdtemp(prefix="edgeshield-adv-"))
    try:
        keys.init_keys(work / "keys")
        bundle = work / "digits.esb"
        bundles.protect(digits_model_path(), bundle, signing_key=keys.load_owner_private_key(work / "keys/owner.key"),
                        recipients=[keys.load_device_public_key(work / "keys/device.pub")],
                        metadata={METADATA_KEY: spec.to_json()})
        opened = bundles.open_bundle(bundle, keys.load_owner_public_key(work / "keys/owner.pub"),
                                     keys.load_device_private_key(work / "keys/device.key"))
        torch_model = torch_model_for_bundle(bundle, work / "keys/owner.pub", work / "keys/device.key")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    session, sha = opened.session, opened.manifest.model_sha256
    from edgeshield._progress import report
    from edgeshield.cli._progress import progress_bars

    # Progress on stderr, drawn only when the evaluation reports (between attacks and timings), never while it times.
    with progress_bars(background=False) as progress:
        report(progress, "calibrate on the calibration half", 0, 2, note="with the gradient detector")
        file = calibrate(session, x_cal, model_sha256=sha, input_spec=spec, target_fpr=TARGET_FPR,
                         detectors=("squeeze", "noise", "reconstruction", "gradient"), reference=split.x_train,
                         torch_model=torch_model, noise={"seed": NOISE_SEED})
        report(progress, "calibrate on the calibration half", 1, 2, note="runtime detectors only")
        runtime_file = calibrate(session, x_cal, model_sha256=sha, input_spec=spec, target_fpr=TARGET_FPR,
                                 detectors=("squeeze", "noise", "reconstruction"), reference=split.x_train,
                                 noise={"seed": NOISE_SEED})
        report(progress, "calibrate on the calibration half", 2, 2)
        result = evaluate(session, torch_model, file, x_eval, y_eval, quick=quick, out_dir=png_dir,
                          extra={"ensemble_runtime": runtime_file}, progress=progress)
    result["calibration_accuracy"] = float((OnnxClassifier(session).predict(x_cal) == y_cal).mean())
    supplements: dict[str, Any] = {}
    if not quick:
        clf = OnnxClassifier(session)
        dets = detectors_with_thresholds(file, clf, torch_model, {"ensemble_runtime": runtime_file})
        clean_scores = {n: d.scores(x_eval) for n, (d, _) in dets.items()}
        correct = clf.predict(x_eval) == y_eval
        x, y = x_eval[correct], y_eval[correct]
        with progress_bars(background=False) as progress:
            report(progress, "supplementary adaptive budgets", 0, 2, note="ε = 2/16")
            supplements["eps0125"] = run_adaptive(torch_model, clf, file, dets, clean_scores, x, y, eps=2 / 16,
                                                  progress=progress)
            report(progress, "supplementary adaptive budgets", 1, 2, note="no grid")
            supplements["nogrid"] = run_adaptive(torch_model, clf, file, dets, clean_scores, x, y, eps=0.1,
                                                 quantum=0.0, spec=dataclasses.replace(spec, quantum=None),
                                                 progress=progress)
            report(progress, "supplementary adaptive budgets", 2, 2)
    result["supplements"] = supplements
    result["protocol_text"] = _protocol_text(quick, len(x_eval))
    result["detector_file"] = file
    return result


# --- the system evaluation: four models, each with its detectors, under the per-input worst case ------------------
SYSTEM_DETECTORS = ("squeeze", "noise", "reconstruction", "mahalanobis", "lid")  # the runtime detectors
SYSTEM_DECISION = "fisher"
SMOOTHING_SIGMA = 0.25
TARGET_E2E, TARGET_CLEAN, TARGET_DETECT_OR_ROBUST = 0.05, 0.96, 0.97


def _train_cnn(method: str, split: Any) -> bytes:
    """The small CNN, standard or TRADES (the recipe of ``benchmarks/robust_training.py``), as ONNX bytes."""
    import torch

    from edgeshield.training import digits_cnn, digits_robust_config, train_robust, train_standard
    from edgeshield.training._robust import onnx_bytes

    torch.manual_seed(0)
    model = digits_cnn()
    if method == "standard":
        train_standard(model, split.x_train, split.y_train, epochs=60, seed=0)
    else:
        train_robust(model, split.x_train, split.y_train, digits_robust_config(arch="cnn", method="trades"))
    return onnx_bytes(model.eval(), split.x_train[:1])


def prepare_system(name: str, model_bytes: bytes, split: Any, spec: Any, work: Path,
                   smoothing: Any = None, target_fpr: float = TARGET_FPR) -> Any:
    """Expose the hidden layers, protect, open, calibrate on the calibration half: what a device would run."""
    from edgeshield import bundles, keys
    from edgeshield.adversarial import METADATA_KEY, calibrate, expose_hidden
    from edgeshield.adversarial._torch import onnx_to_torch
    from edgeshield.evaluation._system import DefendedSystem

    kdir = work / "keys"
    if not kdir.exists():
        keys.init_keys(kdir)
    exposed, _ = expose_hidden(model_bytes)
    src = work / f"{name.replace(' ', '_')}.onnx"
    src.write_bytes(exposed)
    bundle = src.with_suffix(".esb")
    bundles.protect(src, bundle, signing_key=keys.load_owner_private_key(kdir / "owner.key"),
                    recipients=[keys.load_device_public_key(kdir / "device.pub")],
                    metadata={METADATA_KEY: spec.to_json()})
    owner, device = keys.load_owner_public_key(kdir / "owner.pub"), keys.load_device_private_key(kdir / "device.key")
    opened = bundles.open_bundle(bundle, owner, device)
    torch_model = onnx_to_torch(bundles.decrypt_model(bundle, owner, device))
    file = calibrate(opened.session, split.x_test[:N_CAL], model_sha256=opened.manifest.model_sha256,
                     input_spec=spec, target_fpr=target_fpr, detectors=SYSTEM_DETECTORS, reference=split.x_train,
                     reference_labels=split.y_train, noise={"seed": NOISE_SEED}, decision=SYSTEM_DECISION)
    return DefendedSystem(name, opened.session, torch_model, file, smoothing=smoothing)


def run_system(quick: bool, console: Any) -> dict[str, Any]:
    """The headline: every model as a defended system, attacked per input; plus the figures around it."""
    from edgeshield._progress import report
    from edgeshield.adversarial import SmoothedClassifier, SmoothingConfig
    from edgeshield.cli._progress import progress_bars
    from edgeshield.evaluation._adversarial import evaluate, measure_cost_ratios
    from edgeshield.evaluation._autoattack import REFERENCE_ITERATIONS, autoattack_accuracy
    from edgeshield.evaluation._system import (
        BUDGETS,
        HEADLINE,
        DefendedSystem,
        SuiteConfig,
        evaluate_system,
        flat_figures,
    )
    from edgeshield.models import digits_input_spec, digits_model_path, digits_robust_model_path, load_digits_split

    spec = dataclasses.replace(digits_input_spec(), quantum=QUANTUM)
    split = load_digits_split()
    x_eval, y_eval = split.x_test[N_CAL:], split.y_test[N_CAL:]
    if quick:
        x_eval, y_eval = x_eval[:100], y_eval[:100]
    budgets = (HEADLINE,) if quick else BUDGETS
    suite = SuiteConfig.quick() if quick else SuiteConfig()
    flat: dict[str, Any] = {}
    out: dict[str, Any] = {"systems": [], "flat": flat}
    work = Path(tempfile.mkdtemp(prefix="edgeshield-system-"))
    try:
        with progress_bars(background=False) as progress:
            models: list[tuple[str, str, Any]] = [("mlp_robust", "robust MLP (TRADES)", digits_robust_model_path()),
                                                  ("mlp_standard", "standard MLP", digits_model_path())]
            if not quick:
                models += [("cnn_robust", "robust CNN (TRADES)", "trades"), ("cnn_standard", "standard CNN",
                                                                            "standard")]
            systems = {}
            for i, (key, label, source) in enumerate(models):
                report(progress, "prepare the defended systems", i, len(models), note=label)
                raw = source.read_bytes() if isinstance(source, Path) else _train_cnn(source, split)
                systems[key] = prepare_system(label, raw, split, spec, work)
            report(progress, "prepare the defended systems", len(models), len(models))
            for key, system in systems.items():
                # every budget for the headline system; the others (minutes per budget each) at the headline budget
                res = evaluate_system(system, x_eval, y_eval, budgets if key == "mlp_robust" else (HEADLINE,),
                                      suite=suite, progress=progress)
                out["systems"].append(res)
                flat.update(flat_figures(res, prefix=f"{key}_"))
            robust = systems["mlp_robust"]
            if not quick:  # design alternatives around the headline system, at the headline budget
                alternatives = [
                    ("alt_max", DefendedSystem("robust MLP, max ensemble", robust.session, robust.torch_model,
                                               robust.detector_file, decision="ensemble")),
                    ("alt_fpr1", prepare_system("robust MLP, fisher at 1% FPR", digits_robust_model_path().read_bytes(),
                                                split, spec, work, target_fpr=0.01)),
                    ("alt_smoothing", prepare_system("robust MLP + smoothing", digits_robust_model_path().read_bytes(),
                                                     split, spec, work,
                                                     smoothing=SmoothingConfig(sigma=SMOOTHING_SIGMA))),
                ]
                out["alternatives"] = []
                for key, system in alternatives:
                    res = evaluate_system(system, x_eval, y_eval, (HEADLINE,), suite=suite, progress=progress)
                    out["alternatives"].append(res)
                    flat.update(flat_figures(res, prefix=f"mlp_robust_{key}_"))
            # Non-adaptive: ART's attacks (as in the standard-model table) on the robust system's model and file.
            nonadaptive = evaluate(robust.session, robust.torch_model, robust.detector_file, x_eval, y_eval,
                                   quick=quick, adaptive=False, measure_cost=False, progress=progress)
            out["nonadaptive"] = nonadaptive
            report(progress, "AutoAttack, reference parameters", 0, 1, note="robust MLP, all test digits")
            aa = autoattack_accuracy(robust.torch_model, split.x_test, split.y_test, norm="Linf", eps=2 / 16,
                                     seed=0, iterations=None if quick else REFERENCE_ITERATIONS)
            report(progress, "AutoAttack, reference parameters", 1, 1)
            cost = measure_cost_ratios(robust.session, robust.detector_file, None, x_eval[:64], quick=quick,
                                       names=(*SYSTEM_DETECTORS, "ensemble", "fisher"),
                                       smoothing=[SmoothingConfig(sigma=SMOOTHING_SIGMA, n0=n0, n=n)
                                                  for n0, n in ((10, 100), (100, 1000))],
                                       progress=progress)
            out["cost"] = cost
        labels, radii = SmoothedClassifier(robust.robust.clf, SmoothingConfig(sigma=SMOOTHING_SIGMA)).certify(
            split.x_test)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from edgeshield.evaluation._autoattack import clopper_pearson_interval

    def put(name: str, k: int, n: int) -> None:
        low, high = clopper_pearson_interval(k, n)
        flat.update({name: k / n, f"{name}_ci_low": low, f"{name}_ci_high": high})

    hb = HEADLINE.key
    put("robust_clean_accuracy", int((robust.robust.clf.predict(split.x_test) == split.y_test).sum()),
        len(split.x_test))
    put("certified_accuracy_r0_25", int(((labels == split.y_test) & (radii >= 0.25)).sum()), len(split.x_test))
    flat.update({"autoattack_robust_accuracy_eps2": aa.robust_accuracy,
                 "autoattack_robust_accuracy_eps2_ci_low": aa.ci_low,
                 "autoattack_robust_accuracy_eps2_ci_high": aa.ci_high, "autoattack_variant": aa.variant})
    for src, dst in ((f"mlp_robust_system_robust_accuracy_{hb}", "system_robust_accuracy_eps2"),
                     (f"mlp_robust_adaptive_end_to_end_success_{hb}", "adaptive_end_to_end_success_eps2"),
                     (f"cnn_robust_adaptive_end_to_end_success_{hb}", "cnn_adaptive_end_to_end_success_eps2")):
        for suffix in ("", "_ci_low", "_ci_high"):
            if src + suffix in flat:
                flat[dst + suffix] = flat[src + suffix]
    # detection or robustness against the non-adaptive attacks (detector layer only: validation would stop
    # every off-grid ART example on its own), pooled over the attacks' (attack, input) pairs for the interval
    n_att = nonadaptive["protocol"]["n_correct"]  # every ART attack runs on the correctly classified inputs
    kept = sum(round((1 - b["end_to_end_success_detector"]) * n_att) for b in nonadaptive["attacks"].values())
    total = n_att * len(nonadaptive["attacks"])
    rates = [1 - b["end_to_end_success_detector"] for b in nonadaptive["attacks"].values()]
    low, high = clopper_pearson_interval(kept, total)
    flat.update({"detection_or_robust_nonadaptive_avg": float(np.mean(rates)),
                 "detection_or_robust_nonadaptive_avg_ci_low": low,
                 "detection_or_robust_nonadaptive_avg_ci_high": high})
    for name, b in nonadaptive["attacks"].items():
        flat[f"detection_or_robust_{name}"] = 1 - b["end_to_end_success_detector"]
        flat[f"robust_attack_success_{name}"] = b["success_rate"]
        flat[f"robust_mean_linf_{name}"], flat[f"robust_mean_l2_{name}"] = b["mean_linf"], b["mean_l2"]
    diff, d_low, d_high = fisher_minus_max(nonadaptive, robust.detector_file)
    flat.update({"robust_fisher_minus_max_detection_avg": diff, "robust_fisher_minus_max_detection_avg_ci_low": d_low,
                 "robust_fisher_minus_max_detection_avg_ci_high": d_high})
    for label, c in cost.items():
        flat[f"system_latency_ratio_{label}"] = c["latency_ratio"]
        flat[f"system_throughput_ratio_{label}"] = c["throughput_ratio"]
        flat[f"system_latency_plain_us_{label}"], flat[f"system_latency_us_{label}"] = (c["latency_plain_us"],
                                                                                      c["latency_robust_us"])
    out["targets"] = {
        "end_to_end_success_eps2": (flat.get("adaptive_end_to_end_success_eps2"), TARGET_E2E, "<="),
        "robust_clean_accuracy": (flat["robust_clean_accuracy"], TARGET_CLEAN, ">="),
        "system_fpr": (flat.get("mlp_robust_system_fpr"), TARGET_FPR, "<="),
        "detection_or_robust_nonadaptive_avg": (flat["detection_or_robust_nonadaptive_avg"],
                                                TARGET_DETECT_OR_ROBUST, ">="),
    }
    return out


def print_system(console: Any, out: dict[str, Any]) -> None:
    from rich.table import Table

    from edgeshield.evaluation._system import report_table

    console.print(report_table(out["systems"]))
    if out.get("alternatives"):
        console.print(report_table(out["alternatives"], title="Design alternatives around the robust MLP system "
                                                              "(same suite, same evaluation inputs)"))
    t = Table(title="Per attack at each budget: end-to-end success of that attack alone (robust MLP system)")
    for col in ("budget", "attack", "end-to-end success [95% CI]", "strongest / variant", "seconds"):
        t.add_column(col, justify="left" if col in ("budget", "attack", "strongest / variant") else "right")
    for b in out["systems"][0].budgets:
        for attack, r in b.per_attack.items():
            what = r.get("strongest") or {}
            note = (f"λ {what.get('lambda')} / {what.get('loss')} / {what.get('penalty')}" if attack == "adaptive"
                    else ("on the grid" if r.get("projected_to_grid") else "continuous"))
            t.add_row(b.budget.label, attack, f"{r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                      if r["rate"] is not None else "-", note, f"{r['seconds']:.1f}")
    console.print(t)
    non = out["nonadaptive"]
    t = Table(title="Non-adaptive ART attacks on the robust MLP system: detected (decision detector) or robust")
    for col in ("attack", "budget", "bare-model success", "detection rate", "detection or robust"):
        t.add_column(col, justify="left" if col in ("attack", "budget") else "right")
    for name, b in non["attacks"].items():
        det = b["detectors"][non["protocol"]["decision"]]["detection_rate"]
        t.add_row(name, b["budget"], f"{b['success_rate']:.3f}", "-" if det is None else f"{det:.3f}",
                  f"{1 - b['end_to_end_success_detector']:.3f}")
    console.print(t)
    cost = out["cost"]
    t = Table(title="Cost of each runtime option on the robust MLP: RobustModel.decide ÷ plain session.run")
    for col in ("option", "batch 1 (µs)", "ratio", f"batch {next(iter(cost.values()))['batch']} (/s)", "ratio"):
        t.add_column(col, justify="left" if col == "option" else "right")
    for label, c in cost.items():
        t.add_row(label, f"{c['latency_robust_us']:.0f}", f"{c['latency_ratio']:.1f}x",
                  f"{c['throughput_robust_per_s']:.0f}", f"{c['throughput_ratio']:.1f}x")
    console.print(t)
    t = Table(title="Targets")
    for col in ("figure", "measured", "target", "met"):
        t.add_column(col)
    for name, (value, target, op) in out["targets"].items():
        met = value is not None and (value <= target if op == "<=" else value >= target)
        t.add_row(name, "-" if value is None else f"{value:.3f}", f"{op} {target}", "yes" if met else "NO")
    console.print(t)


def fisher_minus_max(result: dict[str, Any], file: Any, resamples: int = 2000) -> tuple[float, float, float]:
    """Fisher's detection rate minus the max-ensemble's, averaged over the attacks, with a paired bootstrap 95 %
    interval (the successful examples of each attack resampled together for both combiners)."""
    rng = np.random.default_rng(0)
    pairs = []
    for b in result["attacks"].values():
        dets = b["detectors"]
        if b["n_success"] == 0:
            continue
        thr_f, thr_m = file.get("fisher").reject_threshold, file.get("ensemble").reject_threshold
        pairs.append((dets["fisher"]["scores"] > thr_f, dets["ensemble"]["scores"] > thr_m))
    point = float(np.mean([f.mean() - m.mean() for f, m in pairs]))
    boots = np.empty(resamples)
    for r in range(resamples):
        vals = []
        for f, m in pairs:
            idx = rng.integers(0, len(f), len(f))
            vals.append(f[idx].mean() - m[idx].mean())
        boots[r] = np.mean(vals)
    return point, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


# --- the detectors inside the runtime: composed graph vs numpy path vs plain ORT, side by side -------------------
COMPOSED_DETECTORS = ("squeeze", "noise", "reconstruction", "ensemble")
LARGE_DETECTORS = ("squeeze", "noise")
COMPOSED_TARGET = 2.0  # robust inference ÷ plain ORT, squeeze, batch 1 (issue 15)


def large_cnn(seed: int = 0) -> bytes:
    """A CNN on 1×32×32 images built with onnx.helper (He-initialised, untrained: only its cost matters here):
    conv 3×3 32 → relu → conv 3×3 64 → relu → maxpool 2 → conv 3×3 64 → relu → maxpool 2 → gemm 10."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
        return rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)

    inits = {"w1": he(32, 1, 3, 3), "b1": np.zeros(32, np.float32), "w2": he(64, 32, 3, 3),
             "b2": np.zeros(64, np.float32), "w3": he(64, 64, 3, 3), "b3": np.zeros(64, np.float32),
             "w4": he(64 * 8 * 8, 10), "b4": np.zeros(10, np.float32)}
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **conv), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], **conv), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p2"], **pool),
             helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], **conv), helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("MaxPool", ["r3"], ["p3"], **pool), helper.make_node("Flatten", ["p3"], ["f"]),
             helper.make_node("Gemm", ["f", "w4", "b4"], ["logits"])]
    graph = helper.make_graph(nodes, "large_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["N", 1, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _interleaved_us(calls: dict[str, Any], n_inputs: int, reps: int) -> dict[str, float]:
    """Median µs per call of each callable (given the input's index), all run back to back on the same input each
    round, so drift of the machine hits all alike."""
    times: dict[str, list[int]] = {k: [] for k in calls}
    for i in range(reps):
        for k, fn in calls.items():
            t0 = time.perf_counter_ns()
            fn(i % n_inputs)
            times[k].append(time.perf_counter_ns() - t0)
    return {k: float(np.median(v)) / 1e3 for k, v in times.items()}


def _copies(file: Any, name: str) -> int:
    """How many rows per input the detector runs through the model (the input and its copies)."""
    p = file.get(name).params
    if name == "squeeze":
        return 1 + (p.get("bits") is not None) + (p.get("median") is not None)
    if name == "noise":
        return 1 + int(p["samples"])
    if name in ("ensemble", "fisher"):
        return 1 + sum(_copies(file, m) - 1 for m in p["members"])
    return 1


def _options(options: Any = None) -> Any:
    """Session options for every session timed here: ONNX Runtime's worker threads do not spin-wait after a run.

    Calls alternate between sessions (plain, numpy path, composed), and one session's threads spinning for
    milliseconds after its run steal both cores from the next session's run: an artefact of interleaving that a
    server, which runs only the composed session on the robust path, does not have. ``options`` (an alternative's)
    is updated in place."""
    from edgeshield.bundles._ort import onnxruntime as ort

    opts = options or ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _composed_rows(model_bytes: bytes, file: Any, names: tuple[str, ...], x: np.ndarray, reps1: int, repsb: int,
                   options: Any = None, spec_check: bool = True) -> dict[str, dict[str, float]]:
    """Per detector: plain session.run, RobustModel.decide on the numpy path and on the composed graph, at batch 1
    (rows of ``x`` in turn) and batch len(x), interleaved; plus plain session.run on the input and its copies
    stacked (what the model must compute anyway: the practical limit), and the composed graph's equality with
    numpy."""
    from edgeshield.adversarial import RobustModel
    from edgeshield.adversarial._compose import compose_graph, composed_session
    from edgeshield.adversarial._composed import ComposedDetectors
    from edgeshield.adversarial._detectors import EnsembleDetector

    options = _options(options)
    session = composed_session(model_bytes, options)
    name_in = session.get_inputs()[0].name
    out: dict[str, dict[str, float]] = {}
    for name in names:
        numpy_rm = RobustModel(session, file, detector=name)
        members = [m.name for m in numpy_rm.detector.members] if isinstance(numpy_rm.detector, EnsembleDetector) \
            else [name]
        graph = compose_graph(model_bytes, [(m, file.get(m).params) for m in members], file.input_spec, softmax=True,
                              spec_check=spec_check)
        composed = ComposedDetectors(composed_session(graph, options), members)
        comp_rm = RobustModel(session, file, detector=name, composed=composed)
        a, b = numpy_rm.decide(x), comp_rm.decide(x)
        row: dict[str, float] = {"max_abs_score_diff": float(np.abs(a.scores - b.scores).max()),
                                 "predictions_equal": float(np.array_equal(a.predictions, b.predictions)),
                                 "rows_per_input": float(_copies(file, name))}
        for label, inputs, reps in (("batch1", [x[i : i + 1] for i in range(len(x))], reps1),
                                    (f"batch{len(x)}", [x], repsb)):
            stacked = [np.concatenate([xi] * _copies(file, name)) for xi in inputs]
            calls = {"plain": lambda i, inp=inputs: session.run(None, {name_in: inp[i]}),
                     "numpy": lambda i, inp=inputs, rm=numpy_rm: rm.decide(inp[i]),
                     "composed": lambda i, inp=inputs, rm=comp_rm: rm.decide(inp[i]),
                     "floor": lambda i, st=stacked: session.run(None, {name_in: st[i]})}
            for fn in calls.values():
                fn(0)  # warm-up
            us = _interleaved_us(calls, len(inputs), reps)
            row |= {f"plain_us_{label}": us["plain"], f"numpy_us_{label}": us["numpy"],
                    f"composed_us_{label}": us["composed"], f"floor_us_{label}": us["floor"],
                    f"numpy_ratio_{label}": us["numpy"] / us["plain"],
                    f"composed_ratio_{label}": us["composed"] / us["plain"],
                    f"composed_over_floor_{label}": us["composed"] / us["floor"]}
        out[name] = row
    return out


def run_composed(quick: bool, console: Any) -> dict[str, Any]:
    """The runtime detectors inside the ONNX graph vs the numpy path vs plain ORT: digits (batch 1 and 64) and a
    larger CNN made here; design alternatives (one ORT thread; basic graph optimisation) on digits squeeze."""
    from rich.table import Table

    from edgeshield.adversarial import InputSpec, calibrate
    from edgeshield.adversarial._compose import composed_session
    from edgeshield.bundles._ort import onnxruntime as ort
    from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

    started = time.perf_counter()
    split = load_digits_split()
    spec = dataclasses.replace(digits_input_spec(), quantum=QUANTUM)
    digits = digits_model_path().read_bytes()
    reps1, repsb = (200, 30) if quick else (3000, 400)
    file = calibrate(composed_session(digits), split.x_test[:N_CAL], model_sha256="00" * 32, input_spec=spec,
                     target_fpr=TARGET_FPR, detectors=("squeeze", "noise", "reconstruction"),
                     reference=split.x_train, noise={"seed": NOISE_SEED})
    x64 = split.x_test[N_CAL : N_CAL + 64]
    rows = {"digits": _composed_rows(digits, file, COMPOSED_DETECTORS, x64, reps1, repsb)}
    one = ort.SessionOptions()
    one.intra_op_num_threads = 1
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    alt = {"one_thread": _composed_rows(digits, file, ("squeeze",), x64, reps1, repsb, one)["squeeze"],
           "basic_optimisation": _composed_rows(digits, file, ("squeeze",), x64, reps1, repsb, basic)["squeeze"],
           "spec_check_in_numpy": _composed_rows(digits, file, ("squeeze",), x64, reps1, repsb,
                                                 spec_check=False)["squeeze"]}
    cnn = large_cnn()
    cnn_spec = InputSpec(shape=(None, 1, 32, 32), min=0.0, max=1.0, image_shape=(1, 32, 32))
    rng = np.random.default_rng(0)
    x_cnn = (rng.integers(0, 17, (50 if quick else 200, 1, 32, 32)) / 16).astype(np.float32)
    cnn_file = calibrate(composed_session(cnn), x_cnn, model_sha256="11" * 32, input_spec=cnn_spec,
                         target_fpr=TARGET_FPR, detectors=LARGE_DETECTORS, noise={"seed": NOISE_SEED},
                         decision="squeeze")
    cnn_batch = 16 if quick else 64
    rows["large_cnn"] = _composed_rows(cnn, cnn_file, LARGE_DETECTORS, x_cnn[:cnn_batch],
                                       10 if quick else 200, 2 if quick else 10)
    flat: dict[str, Any] = {}
    for name, r in rows["digits"].items():
        flat |= {f"{name}_latency_ratio_batch1": r["composed_ratio_batch1"],
                 f"{name}_latency_ratio_batch64": r["composed_ratio_batch64"],
                 f"{name}_numpy_latency_ratio_batch1": r["numpy_ratio_batch1"],
                 f"{name}_numpy_latency_ratio_batch64": r["numpy_ratio_batch64"],
                 f"{name}_composed_max_abs_score_diff": r["max_abs_score_diff"],
                 f"{name}_composed_predictions_equal": bool(r["predictions_equal"])}
        flat |= {f"{name}_latency_over_floor_batch1": r["composed_over_floor_batch1"],
                 f"{name}_latency_over_floor_batch64": r["composed_over_floor_batch64"]}
    for name, r in rows["large_cnn"].items():
        flat |= {f"{name}_latency_ratio_large_model": r["composed_ratio_batch1"],
                 f"{name}_latency_ratio_large_model_batch64": r[f"composed_ratio_batch{cnn_batch}"],
                 f"{name}_numpy_latency_ratio_large_model": r["numpy_ratio_batch1"],
                 f"{name}_numpy_latency_ratio_large_model_batch64": r[f"numpy_ratio_batch{cnn_batch}"],
                 f"{name}_latency_over_floor_large_model": r["composed_over_floor_batch1"],
                 f"{name}_latency_over_floor_large_model_batch64": r[f"composed_over_floor_batch{cnn_batch}"],
                 f"{name}_rows_per_input_large_model": r["rows_per_input"]}
    flat |= {"large_model_plain_us_batch1": rows["large_cnn"]["squeeze"]["plain_us_batch1"],
             "large_model_plain_us_batch64": rows["large_cnn"]["squeeze"][f"plain_us_batch{cnn_batch}"],
             "large_model_batch": cnn_batch,
             "digits_plain_us_batch1": rows["digits"]["squeeze"]["plain_us_batch1"],
             "squeeze_latency_ratio_batch1_one_thread": alt["one_thread"]["composed_ratio_batch1"],
             "squeeze_latency_ratio_batch1_basic_optimisation": alt["basic_optimisation"]["composed_ratio_batch1"],
             "squeeze_latency_ratio_batch1_spec_check_in_numpy": alt["spec_check_in_numpy"]["composed_ratio_batch1"],
             "squeeze_composed_target": COMPOSED_TARGET,
             "squeeze_composed_target_met": rows["digits"]["squeeze"]["composed_ratio_batch1"] <= COMPOSED_TARGET,
             "composed_reps": {"digits_batch1": reps1, "digits_batch64": repsb},
             "composed_scale": "quick: digits 200/30 repetitions; CNN 50 calibration inputs, batch 16 (its "
                               "_batch64 keys), 10/2 repetitions" if quick
             else "full: digits 3000/400 repetitions; CNN 200 calibration inputs, batch 64, 200/10 repetitions",
             "composed_wall_s": time.perf_counter() - started}
    t = Table(title="Robust inference ÷ plain ORT: numpy detectors vs the composed graph (one session.run)")
    for col in ("model", "detector", "rows/input", "plain b1 (µs)", "numpy b1", "composed b1", "÷ floor b1",
                "batch", "plain (µs)", "numpy", "composed", "÷ floor", "max |Δscore|"):
        t.add_column(col, justify="left" if col in ("model", "detector") else "right")
    listed = [(m, n, r) for m, rs in rows.items() for n, r in rs.items()]
    listed += [("digits", f"squeeze ({label.replace('_', ' ')})", r) for label, r in alt.items()]
    for model, name, r in listed:
        big = next(k.removeprefix("plain_us_") for k in r if k.startswith("plain_us_batch") and k != "plain_us_batch1")
        t.add_row(model, name, f"{r['rows_per_input']:.0f}", f"{r['plain_us_batch1']:.0f}",
                  f"{r['numpy_ratio_batch1']:.2f}x", f"{r['composed_ratio_batch1']:.2f}x",
                  f"{r['composed_over_floor_batch1']:.2f}x", big.removeprefix("batch"), f"{r['plain_us_' + big]:.0f}",
                  f"{r['numpy_ratio_' + big]:.2f}x", f"{r['composed_ratio_' + big]:.2f}x",
                  f"{r['composed_over_floor_' + big]:.2f}x", f"{r['max_abs_score_diff']:.1e}")
    console.print("floor: plain session.run on the input and its copies stacked (rows/input rows each), what the "
                  "model must compute for the detector anyway.")
    console.print(t)
    return {"flat": flat, "rows": rows, "alternatives": alt}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="100 evaluation inputs, fewer iterations, no HopSkipJump (< 1 minute)")
    ap.add_argument("--json", metavar="PATH", help="write one flat JSON object, and the ROC plots next to it")
    ap.add_argument("--composed-only", action="store_true",
                    help="only the composed-graph cost section (section 7); with --json, its keys are merged into "
                         "the existing file, with composed_date and composed_machine")
    args = ap.parse_args(argv)

    import torch
    from rich.table import Table

    # One torch thread: on two cores, torch's second thread fights ONNX Runtime's and every attack slows by 10-30x.
    torch.set_num_threads(1)
    started = time.perf_counter()
    info = machine_info()
    console = open_report(150, info)
    target = Path(args.json) if args.json else None
    load_start = os.getloadavg()[0]

    if args.composed_only:
        return _composed_only(args, info, console, started)
    from edgeshield.evaluation._adversarial import report_tables

    result = run(args.quick, target.parent if target else None, console)
    console.print(f"[bold]Protocol:[/bold] {result['protocol_text']}")
    for t in report_tables(result):
        console.print(t)
    flat = dict(result["flat"])
    sup = result["supplements"]
    if sup:
        t = Table(title="Supplementary adaptive budgets (strongest configuration of the same sweep each)")
        for col in ("budget", "λ / loss / penalty", "success", "ensemble detection", "e2e (ensemble only)",
                    "e2e (validation + ensemble)"):
            t.add_column(col, justify="left" if col in ("budget", "λ / loss / penalty") else "right")
        for key, b in sup.items():
            best = b["best"]
            det_rate = b["detectors"]["ensemble"]["detection_rate"]
            t.add_row(b["budget"], f"{best['lambda']:g} / {best['loss']} / {best['penalty']}",
                      f"{b['success_rate']:.3f}", "-" if det_rate is None else f"{det_rate:.3f}",
                      f"{b['end_to_end_success_detector']:.3f}", f"{b['end_to_end_success']:.3f}")
            flat.update({f"adaptive_{key}_success": b["success_rate"],
                         f"adaptive_{key}_detection_rate": b["detectors"]["ensemble"]["detection_rate"],
                         f"adaptive_{key}_detection_rate_ensemble_runtime":
                             b["detectors"]["ensemble_runtime"]["detection_rate"],
                         f"adaptive_{key}_end_to_end_success_detector": b["end_to_end_success_detector"],
                         f"adaptive_{key}_end_to_end_success": b["end_to_end_success"],
                         f"adaptive_{key}_budget": b["budget"], f"adaptive_{key}_lambda": best["lambda"],
                         f"adaptive_{key}_loss": best["loss"], f"adaptive_{key}_penalty": best["penalty"]})
        console.print(t)
        console.print("nogrid: the attack ignores the 1/16 grid, so validation rejects its examples; its "
                      "'ensemble only' column is what the detectors alone achieve against an adaptive attacker.")
    sysout = run_system(args.quick, console)
    print_system(console, sysout)
    flat.update(sysout["flat"])
    flat.update(run_composed(args.quick, console)["flat"])
    diff, d_low, d_high = fisher_minus_max(result, result["detector_file"])
    flat.update({"fisher_minus_max_detection_avg": diff, "fisher_minus_max_detection_avg_ci_low": d_low,
                 "fisher_minus_max_detection_avg_ci_high": d_high})
    console.print(f"Fisher combiner minus the max ensemble, detection rate at {TARGET_FPR:.0%} FPR averaged over "
                  f"the ART attacks: standard MLP {diff:+.3f} [{d_low:+.3f}, {d_high:+.3f}]; robust MLP "
                  f"{flat['robust_fisher_minus_max_detection_avg']:+.3f} "
                  f"[{flat['robust_fisher_minus_max_detection_avg_ci_low']:+.3f}, "
                  f"{flat['robust_fisher_minus_max_detection_avg_ci_high']:+.3f}]")
    flat.update(
        quick=args.quick, machine=info["machine"], date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        protocol=result["protocol_text"], calibration_accuracy=result["calibration_accuracy"],
        model_source="digits.onnx protected into a temporary bundle (fresh keys), opened with open_bundle",
        detection_rate_avg_detector="ensemble (decision detector: squeeze+noise+reconstruction+gradient)",
        auroc_min_detector="ensemble", wall_s=time.perf_counter() - started,
        loadavg_1min_start=load_start, loadavg_1min_end=os.getloadavg()[0],
    )
    console.print(f"{'quick' if args.quick else 'full'} run, {flat['wall_s']:.1f} s; 1-min load average "
                  f"{load_start:.2f} at start, {flat['loadavg_1min_end']:.2f} at end.")
    if target:
        write_report(console, args.json, flat,
                     also=f" and {', '.join(sorted(Path(p).name for p in result['roc_png'].values()))}")
    return 0


def _composed_only(args: Any, info: dict[str, str], console: Any, started: float) -> int:
    import json

    load_start = os.getloadavg()[0]
    flat = run_composed(args.quick, console)["flat"]
    flat |= {"composed_date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
             "composed_machine": info["machine"], "composed_quick": args.quick,
             "composed_loadavg_1min_start": load_start, "composed_loadavg_1min_end": os.getloadavg()[0]}
    console.print(f"composed section, {time.perf_counter() - started:.1f} s; 1-min load average {load_start:.2f} "
                  f"at start, {flat['composed_loadavg_1min_end']:.2f} at end.")
    if args.json:
        target = Path(args.json)
        merged = json.loads(target.read_text()) if target.exists() else {}
        write_report(console, args.json, merged | flat, also=" (composed-graph keys merged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
