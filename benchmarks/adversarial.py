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
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="100 evaluation inputs, fewer iterations, no HopSkipJump (< 1 minute)")
    ap.add_argument("--json", metavar="PATH", help="write one flat JSON object, and the ROC plots next to it")
    args = ap.parse_args(argv)

    from rich.table import Table

    started = time.perf_counter()
    info = machine_info()
    console = open_report(150, info)
    target = Path(args.json) if args.json else None
    load_start = os.getloadavg()[0]

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


if __name__ == "__main__":
    sys.exit(main())
