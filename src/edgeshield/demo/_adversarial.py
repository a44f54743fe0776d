"""Demo stages for the adversarial-input defence, on the robust (TRADES) digits model.

The robust model is protected into its own bundle with the demo's keys; it and the standard model (the bundle the
earlier stages made) are calibrated the same way on the same calibration half. The robust model then meets real ART
attacks through robust inference, and both models meet the same adaptive white-box attack on the 1/16 grid, with
randomized smoothing's certified radii beside them. The other stages keep the standard model.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield import bundles, keys
from edgeshield.demo import DemoContext, DemoFailure, Stage

if TYPE_CHECKING:
    from edgeshield._progress import ProgressCallback, Step
    from edgeshield.adversarial import Decision, DetectorFile
    from edgeshield.bundles._ort import onnxruntime

TARGET_FPR = 0.02
MAX_CLEAN_REJECTS = 0.10  # more clean digits rejected than this and the stage fails
QUANTUM = 1 / 16  # the digits' 17 grey levels: the calibrated spec accepts only these values
# The adaptive attack (evaluation/_adaptive.py): L∞ 2/16 on the grid, a small λ × loss × penalty sweep.
ATTACK: dict[str, Any] = {"eps": 2 / 16, "step": 1 / 32, "iters": 40, "lambdas": (0.0, 0.1, 1.0),
                          "losses": ("ce", "margin"), "penalties": ("sum", "hinge")}
SMOOTHING_SIGMA, CERTIFIED_RADIUS = 0.25, 0.25
CERTIFIED_KEY = "certified_accuracy_r0_25"
MODELS = ("standard", "robust")


@dataclasses.dataclass
class _Calibrated:
    bundle: Path
    session: onnxruntime.InferenceSession
    file: DetectorFile


def _key_paths(ctx: DemoContext) -> tuple[Path, Path]:
    kdir = ctx.state["kdir"]
    return kdir / "owner.pub", kdir / "device.key"


def _protect_robust(ctx: DemoContext) -> Path:
    from edgeshield.adversarial import METADATA_KEY
    from edgeshield.models import digits_robust_model_path

    out = ctx.workdir / "digits_robust.esb"
    manifest = bundles.protect(
        digits_robust_model_path(), out,
        signing_key=keys.load_owner_private_key(ctx.state["kdir"] / "owner.key"),
        recipients=[keys.load_device_public_key(ctx.state["kdir"] / "device.pub")],
        model_version=1,
        metadata={"model": "digits-mlp-robust", "demo": "true", METADATA_KEY: _grid_spec().to_json()},
    )
    ctx.summary["robust_bundle"] = {"bytes": out.stat().st_size, "model_sha256": manifest.model_sha256}
    return out


def _grid_spec() -> Any:
    from edgeshield.models import digits_input_spec

    return dataclasses.replace(digits_input_spec(), quantum=QUANTUM)


def _calibrate(ctx: DemoContext) -> str:
    from edgeshield.adversarial import calibrate
    from edgeshield.models import load_digits_split

    split = load_digits_split()
    half = len(split.x_test) // 2  # calibrate on one half of the held-out digits, attack the other
    owner_pub, device_key = _key_paths(ctx)
    models: dict[str, _Calibrated] = {}
    for name, bundle in (("standard", ctx.state["bundle"]), ("robust", _protect_robust(ctx))):
        opened = bundles.open_bundle(bundle, keys.load_owner_public_key(owner_pub),
                                     keys.load_device_private_key(device_key))
        file = calibrate(opened.session, split.x_test[:half], model_sha256=opened.manifest.model_sha256,
                         input_spec=_grid_spec(), target_fpr=TARGET_FPR, reference=split.x_train)
        models[name] = _Calibrated(bundle, opened.session, file)
    ctx.state.update(adversarial_models=models, split=split, half=half)
    robust = models["robust"].file
    ctx.summary["detector"] = {d.name: {"reject_threshold": d.reject_threshold,
                                        "fpr_calibration": d.calibration["fpr_reject"]} for d in robust.detectors}
    ctx.summary["detector_standard"] = {d.name: {"reject_threshold": d.reject_threshold,
                                                 "fpr_calibration": d.calibration["fpr_reject"]}
                                        for d in models["standard"].file.detectors}
    fprs = ", ".join(f"{m} {models[m].file.get('ensemble').calibration['fpr_reject']:.1%}" for m in MODELS)
    return (f"robust model protected into {models['robust'].bundle.name}; squeeze + noise + reconstruction → "
            f"ensemble for both models, thresholds for ≤ {TARGET_FPR:.0%} FPR on the same {half} clean digits, "
            f"1/16 grid in the spec (calibration FPR {fprs})")


def _attack_and_defend(ctx: DemoContext) -> str:
    from edgeshield.adversarial import RobustModel
    from edgeshield.adversarial._torch import onnx_to_torch
    from edgeshield.evaluation._adversarial import art_classifier

    split, half = ctx.state["split"], ctx.state["half"]
    robust_model: _Calibrated = ctx.state["adversarial_models"]["robust"]
    x, y = split.x_test[half:], split.y_test[half:]
    ctx.step(0, 4, "FGSM")
    owner_pub, device_key = _key_paths(ctx)
    model = bundles.decrypt_model(robust_model.bundle, keys.load_owner_public_key(owner_pub),
                                  keys.load_device_private_key(device_key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

        classifier = art_classifier(onnx_to_torch(model), input_shape=(64,), nb_classes=10)
        attacked = {"FGSM ε=0.1": FastGradientMethod(classifier, eps=0.1).generate(x)}
        ctx.step(1, 4, "PGD, 40 iterations")
        attacked["PGD ε=0.1"] = ProjectedGradientDescent(classifier, eps=0.1, eps_step=0.01, max_iter=40,
                                                         verbose=False).generate(x)
    ctx.step(2, 4, "robust inference on clean digits")
    # ART's examples are continuous, off the 1/16 grid: this table measures the detectors alone, so the same
    # calibrated thresholds are used with the grid check off (the adaptive stage keeps it on).
    file = robust_model.file
    off_grid = dataclasses.replace(file, input_spec=dataclasses.replace(file.input_spec, quantum=None))
    robust = RobustModel(robust_model.session, off_grid)
    rows: dict[str, dict[str, Any]] = {}
    clean = robust.predict(x)
    rows["clean"] = _count(clean, np.ones(len(x), bool))
    ctx.step(3, 4, "robust inference on the attacks")
    for name, generated in attacked.items():
        xa = generated.astype(np.float32)
        fooled = robust.clf.predict(xa) != y
        decisions = robust.predict(xa)
        rows[name] = _count(decisions, fooled) | {"fooled_undefended": float(fooled.mean())}
    ctx.summary["robust_inference"] = rows
    if rows["clean"]["reject"] / len(x) > MAX_CLEAN_REJECTS:
        raise DemoFailure(f"the calibrated detector rejected more than {MAX_CLEAN_REJECTS:.0%} of clean digits")
    _print_table(ctx, rows, len(x))
    pgd = rows["PGD ε=0.1"]
    return (f"robust model, clean: {rows['clean']['reject']}/{len(x)} rejected; PGD fooled the bare model on "
            f"{pgd['fooled_undefended']:.0%}, the detector rejected {pgd['reject_of_fooled']}/{pgd['fooled']} of those")


def _count(decisions: list[Decision], fooled: np.ndarray) -> dict[str, int]:
    verdicts = np.array([d.decision for d in decisions])
    return {"accept": int((verdicts == "accept").sum()), "flag": int((verdicts == "flag").sum()),
            "reject": int((verdicts == "reject").sum()), "fooled": int(fooled.sum()),
            "reject_of_fooled": int(((verdicts == "reject") & fooled).sum())}


def _print_table(ctx: DemoContext, rows: dict[str, dict[str, Any]], n: int) -> None:
    from rich.table import Table

    table = Table(title=f"robust model: robust inference on {n} held-out digits (ensemble detector, target FPR "
                        f"{TARGET_FPR:.0%}; grid check off for ART's continuous examples)")
    for col in ("inputs", "accepted", "flagged", "rejected", "model fooled", "fooled & rejected"):
        table.add_column(col)
    for name, r in rows.items():
        fooled = "-" if name == "clean" else f"{r['fooled']}"
        caught = "-" if name == "clean" else f"{r['reject_of_fooled']}/{r['fooled']}"
        table.add_row(name, str(r["accept"]), str(r["flag"]), str(r["reject"]), fooled, caught)
    ctx.tables.append(table)


# --- standard vs robust under the adaptive attack -----------------------------------------------------------------
def _compare(ctx: DemoContext) -> str:
    from edgeshield.adversarial import OnnxClassifier, RobustModel, SmoothingConfig
    from edgeshield.adversarial._robust import ABSTAIN, REJECT
    from edgeshield.evaluation._adaptive import adaptive_attack
    from edgeshield.evaluation._adversarial import torch_model_for_bundle

    split, half = ctx.state["split"], ctx.state["half"]
    models: dict[str, _Calibrated] = ctx.state["adversarial_models"]
    x_eval, y_eval = split.x_test[half:], split.y_test[half:]
    owner_pub, device_key = _key_paths(ctx)
    smoothing = SmoothingConfig(sigma=SMOOTHING_SIGMA)
    correct = {m: OnnxClassifier(models[m].session).predict(x_eval) == y_eval for m in MODELS}
    both = correct["standard"] & correct["robust"]  # the same inputs for both models
    x, y = x_eval[both], y_eval[both]
    rows: dict[str, dict[str, Any]] = {}
    configs = 0
    for i, name in enumerate(MODELS):
        m = models[name]
        guarded = RobustModel(m.session, m.file)
        clean = guarded.decide(x_eval)
        ctx.step(0, None, f"{name} model: adaptive attack")
        res = adaptive_attack(torch_model_for_bundle(m.bundle, owner_pub, device_key), m.session, m.file,
                              guarded.detector, x, y, progress=_forward(ctx, name), seed=i, **ATTACK)
        configs = len(res.sweep)
        broken = np.zeros(len(x), dtype=bool)  # per input, the worst case over every configuration of the sweep
        for examples in res.examples:
            _check_examples(name, examples, x, m.file)
            attacked = guarded.decide(examples)  # judged again through the product's own robust inference
            broken |= (attacked.verdicts != REJECT) & (attacked.predictions != y)
        ctx.step(0, None, f"{name} model: certifying {len(x_eval)} digits (sigma {SMOOTHING_SIGMA}, n={smoothing.n})")
        cert = RobustModel(m.session, m.file, smoothing=smoothing).decide(x_eval)
        if cert.radii is None:  # pragma: no cover - smoothing always reports radii
            raise DemoFailure("robust inference with smoothing returned no certified radii")
        right = cert.predictions == y_eval
        rows[name] = {
            "clean_accuracy": float(correct[name].mean()),
            "clean_rejects": int((clean.verdicts == REJECT).sum()),
            "fpr_measured": float((clean.verdicts == REJECT).mean()),
            "bare_model_success": max(r["success"] for r in res.sweep if r["lambda"] == 0),
            "end_to_end_success": float(broken.mean()), "end_to_end_broken": int(broken.sum()),
            "strongest": {k: res.best[k] for k in ("loss", "penalty", "lambda")},
            "attack_seconds": round(sum(r["seconds"] for r in res.sweep), 2),
            CERTIFIED_KEY: float((right & (cert.radii >= CERTIFIED_RADIUS)).mean()),
            "median_radius_correct": float(np.median(cert.radii[right])) if right.any() else 0.0,
            "abstained": int((cert.verdicts == ABSTAIN).sum()),
        }
    ctx.summary["adaptive_comparison"] = {
        "attack": {"norm": "Linf", "quantum": QUANTUM, "inputs": len(x), "configurations": configs,
                   **{k: list(v) if isinstance(v, tuple) else v for k, v in ATTACK.items()}},
        "smoothing": {"sigma": smoothing.sigma, "n0": smoothing.n0, "n": smoothing.n, "alpha": smoothing.alpha},
        "evaluation_inputs": len(x_eval), **rows}
    _check_comparison(rows, len(x_eval))
    _print_comparison(ctx, rows, len(x), len(x_eval), configs)
    s, r = rows["standard"], rows["robust"]
    return (f"adaptive L∞ 2/16: end-to-end success {s['end_to_end_success']:.1%} (standard) → "
            f"{r['end_to_end_success']:.1%} (robust) on {len(x)} digits; certified accuracy at L2 "
            f"{CERTIFIED_RADIUS:g}: {s[CERTIFIED_KEY]:.1%} → {r[CERTIFIED_KEY]:.1%}")


def _forward(ctx: DemoContext, name: str) -> ProgressCallback:
    """The attack's sweep progress, shown as the stage's, with the model's name in front."""
    def show(step: Step) -> None:
        ctx.step(step.done, step.total, f"{name} model: {step.note or 'adaptive attack'}")
    return show


def _check_examples(name: str, x_adv: np.ndarray, x: np.ndarray, file: DetectorFile) -> None:
    """The attack's examples stay in the L∞ budget and pass the spec (the grid), so the figures mean what they say."""
    from edgeshield.evaluation._adaptive import valid_mask

    over = float(np.abs(x_adv - x).max(initial=0.0))
    if over > ATTACK["eps"] + 1e-6:
        raise DemoFailure(f"the adaptive attack on the {name} model left its L∞ budget ({over:.4f})")
    off = np.abs(x_adv / QUANTUM - np.round(x_adv / QUANTUM)).max(initial=0.0)
    if off > 1e-3 or file.input_spec.quantum != QUANTUM or not valid_mask(file.input_spec, x_adv).all():
        raise DemoFailure(f"the adaptive attack on the {name} model returned inputs off the 1/16 grid or invalid")


def _check_comparison(rows: Mapping[str, Mapping[str, Any]], n_eval: int) -> None:
    """The robust model must beat the standard one end to end, and neither may reject many clean digits."""
    for name in MODELS:
        if rows[name]["clean_rejects"] > MAX_CLEAN_REJECTS * n_eval:
            raise DemoFailure(f"the {name} model's detector rejected {rows[name]['clean_rejects']}/{n_eval} clean "
                              f"digits (more than {MAX_CLEAN_REJECTS:.0%})")
    std, rob = rows["standard"]["end_to_end_success"], rows["robust"]["end_to_end_success"]
    if not rob < std:
        raise DemoFailure(f"the robust model is not better end to end than the standard one under the adaptive "
                          f"attack ({rob:.1%} vs {std:.1%})")


def _print_comparison(ctx: DemoContext, rows: dict[str, dict[str, Any]], n: int, n_eval: int, configs: int) -> None:
    from rich.table import Table

    table = Table(title="standard vs robust model: same detectors, calibration and attack")
    for col in ("", "standard", "robust (TRADES)"):
        table.add_column(col)
    std, rob = rows["standard"], rows["robust"]

    def add(label: str, fmt: Callable[[dict[str, Any]], str]) -> None:
        table.add_row(label, fmt(std), fmt(rob))

    add(f"clean accuracy ({n_eval} digits)", lambda r: f"{r['clean_accuracy']:.1%}")
    add("clean rejected (measured FPR)", lambda r: f"{r['clean_rejects']}/{n_eval} ({r['fpr_measured']:.1%})")
    add("adaptive L∞ 2/16: bare model fooled", lambda r: f"{r['bare_model_success']:.1%}")
    add("adaptive L∞ 2/16: end to end", lambda r: f"{r['end_to_end_success']:.1%} ({r['end_to_end_broken']}/{n})")
    add(f"certified accuracy, L2 r = {CERTIFIED_RADIUS:g}", lambda r: f"{r[CERTIFIED_KEY]:.1%}")
    add("median radius, correct answers", lambda r: f"{r['median_radius_correct']:.3f}")
    table.caption = (f"Adaptive attack on the 1/16 grid: {configs} configurations (λ × loss × penalty) × "
                     f"{ATTACK['iters']} iterations on the {n} digits both models classify correctly, "
                     "differentiable surrogates of the ensemble's members, BPDA through the grid. Bare model "
                     "fooled: the λ = 0 runs (no detector term); end to end: digits some configuration's "
                     "example got through misclassified, valid and not rejected (per-input worst case). "
                     f"Certified: randomized smoothing (sigma {SMOOTHING_SIGMA}, n 1000, failure rate "
                     f"0.001) on all {n_eval} digits: the smoothed answer is correct and provably cannot change "
                     "within that L2 radius; it says nothing about larger radii or about L∞.")
    ctx.tables.append(table)


STAGES = [
    Stage("Calibrate adversarial-input detectors (standard and robust model)", _calibrate),
    Stage("Defend the robust model against ART attacks (robust inference)", _attack_and_defend),
    Stage("Standard vs robust model: adaptive attack and certified radii", _compare),
]
