"""Evaluating a calibrated defence against real attacks (ART), an adaptive attack, and its runtime cost.

``evaluate`` takes an ONNX Runtime session, the same model as a torch module (for gradients), a detector file and
a clean *evaluation* set that the file was not calibrated on, and reports:

* per attack (FGSM, PGD, Carlini–Wagner L2, DeepFool, HopSkipJump): success on the undefended model over the
  inputs it classifies correctly; per detector the detection rate at its calibrated reject threshold over the
  successful adversarial examples and the AUROC of clean evaluation inputs vs. those examples; the input spec's
  validation (e.g. its ``quantum`` grid) as a separate layer;
* the measured FPR of every detector on the clean evaluation inputs;
* the adaptive attack of ``_adaptive.py`` against the decision detector and the spec;
* the cost of robust inference (``RobustModel.decide``) ÷ plain ``session.run`` per runtime option: each
  detector and combiner the file has, and randomized smoothing at its sample counts.

torch, ART, scikit-learn and matplotlib are imported inside the functions that need them (``edgeshield[eval]``).
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield._progress import ProgressCallback, report
from edgeshield.adversarial._calibrate import DetectorFile, build_all
from edgeshield.adversarial._detectors import Detector, OnnxClassifier
from edgeshield.adversarial._smoothing import SmoothingConfig
from edgeshield.errors import InvalidArgumentError, MissingDependencyError
from edgeshield.evaluation._adaptive import adaptive_attack, valid_mask

if TYPE_CHECKING:
    import torch
    from art.estimators.classification import PyTorchClassifier
    from rich.table import Table

    from edgeshield.adversarial._robust import RobustModel
    from edgeshield.adversarial._spec import InputSpec
    from edgeshield.bundles._ort import onnxruntime

ATTACKS = ("fgsm", "pgd", "cw", "deepfool", "hopskipjump")
# Every runtime option robust inference offers, timed as its decision detector (those a file has).
COST_DETECTORS = ("squeeze", "noise", "reconstruction", "mahalanobis", "lid", "ensemble", "fisher")
SMOOTHING_REPS, SMOOTHING_REPS_QUICK = (40, 4), (10, 2)  # (batch-1, batch) repetitions for smoothing rows
DETECTION_TARGET, FPR_TARGET, SQUEEZE_COST_TARGET = 0.97, 0.02, 3.0


def attack_budgets(quick: bool = False) -> dict[str, dict[str, Any]]:
    """The ART attacks and their budgets (``--quick``: fewer iterations, no HopSkipJump)."""
    full: dict[str, dict[str, Any]] = {
        "fgsm": {"norm": "inf", "eps": 0.1},
        "pgd": {"norm": "inf", "eps": 0.1, "eps_step": 0.01, "max_iter": 40},
        "cw": {"confidence": 0.0, "max_iter": 20, "binary_search_steps": 5, "batch_size": 256},
        "deepfool": {"epsilon": 0.02, "max_iter": 50, "batch_size": 256},
        "hopskipjump": {"norm": 2, "max_iter": 20, "max_eval": 500, "init_eval": 50, "batch_size": 256},
    }
    if quick:
        full["pgd"]["max_iter"] = 10
        full["cw"].update(max_iter=5, binary_search_steps=2)
        full["deepfool"]["max_iter"] = 20
        del full["hopskipjump"]
    return full


def budget_text(name: str, b: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in b.items() if k != "batch_size")


# --- the model as torch -----------------------------------------------------------------------------------------
def torch_model_for_bundle(bundle: str | os.PathLike[str], owner_key_path: str | os.PathLike[str],
                           device_key_path: str | os.PathLike[str],
                           passphrase_env: str | None = None) -> torch.nn.Module:
    """Decrypt a bundle's model in memory and convert it to an eval-mode torch module returning logits."""
    from edgeshield import bundles, keys
    from edgeshield.adversarial._torch import onnx_to_torch
    from edgeshield.hardware._tpm import load_device_key

    device = load_device_key(device_key_path, keys.passphrase_from_env(passphrase_env))
    return onnx_to_torch(bundles.decrypt_model(bundle, keys.load_owner_public_key(owner_key_path), device))


def art_classifier(
    model: torch.nn.Module,
    *,
    input_shape: tuple[int, ...],
    nb_classes: int,
    clip_values: tuple[float, float] | None = (0.0, 1.0),
) -> PyTorchClassifier:
    """Wrap a logits-returning module as an ART ``PyTorchClassifier`` (cross-entropy loss, CPU) to run ART attacks.

    No optimizer is given, so the classifier can attack and predict but not ``fit``. Importing ART creates
    ``~/.art/config.json`` and ``~/.art/data`` (or under /tmp when the home directory is not writable); ART offers
    no way around that. ART calls ``model.train(mode=...)`` on each predict and gradient call; modules from
    ``onnx_to_torch`` compute the same thing in either mode.
    """
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise InvalidArgumentError(f"input_shape must be a tuple of positive integers, not {input_shape!r}")
    if isinstance(nb_classes, bool) or not isinstance(nb_classes, int) or nb_classes < 2:
        raise InvalidArgumentError(f"nb_classes must be an integer of at least 2, not {nb_classes!r}")
    clip = None
    if clip_values is not None:
        lo, hi = (float(v) for v in clip_values)
        if not lo < hi:
            raise InvalidArgumentError(f"clip_values must be (min, max) with min < max, not {clip_values!r}")
        clip = (lo, hi)
    from edgeshield.adversarial._torch import _INSTALL_HINT, _import_torch

    torch = _import_torch()
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        raise MissingDependencyError(
            f"running ART attacks needs adversarial-robustness-toolbox: {_INSTALL_HINT}"
        ) from None
    return PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=shape,
        nb_classes=nb_classes,
        clip_values=clip,
        device_type="cpu",
    )


# --- attacks ----------------------------------------------------------------------------------------------------
def run_attacks(torch_model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, nb_classes: int, quick: bool = False,
                attacks: Sequence[str] | None = None, clip_values: tuple[float, float] | None = (0.0, 1.0),
                seed: int = 0, progress: ProgressCallback | None = None) -> dict[str, dict[str, Any]]:
    """Generate untargeted adversarial examples for ``x`` (true labels ``y``): ``{name: {x_adv, seconds, budget}}``.

    ``progress`` hears "ART attacks" before each attack starts (its name as the note) and once all are done."""
    import torch


    budgets = attack_budgets(quick)
    names = list(attacks) if attacks is not None else list(budgets)
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise InvalidArgumentError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    names = [a for a in names if a in budgets]  # --quick drops HopSkipJump
    try:
        from art.attacks.evasion import (
            CarliniL2Method,
            DeepFool,
            FastGradientMethod,
            HopSkipJump,
            ProjectedGradientDescent,
        )
    except ImportError:
        raise MissingDependencyError(
            "the attacks need adversarial-robustness-toolbox: pip install 'edgeshield[eval]'"
        ) from None
    est = art_classifier(torch_model, input_shape=tuple(x.shape[1:]), nb_classes=nb_classes, clip_values=clip_values)
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        report(progress, "ART attacks", i, len(names), note=name)
        b = budgets[name]
        np.random.seed(seed)
        torch.manual_seed(seed)
        if name == "fgsm":
            atk, kw = FastGradientMethod(est, norm=np.inf, eps=b["eps"], batch_size=256), {"y": y}
        elif name == "pgd":
            atk = ProjectedGradientDescent(est, norm=np.inf, eps=b["eps"], eps_step=b["eps_step"],
                                           max_iter=b["max_iter"], batch_size=256, verbose=False)
            kw = {"y": y}
        elif name == "cw":
            atk = CarliniL2Method(est, confidence=b["confidence"], max_iter=b["max_iter"], verbose=False,
                                  binary_search_steps=b["binary_search_steps"], batch_size=b["batch_size"])
            kw = {"y": y}
        elif name == "deepfool":
            atk, kw = DeepFool(est, epsilon=b["epsilon"], max_iter=b["max_iter"], batch_size=b["batch_size"],
                               verbose=False), {}
        else:
            atk = HopSkipJump(est, norm=b["norm"], max_iter=b["max_iter"], max_eval=b["max_eval"],
                              init_eval=b["init_eval"], batch_size=b["batch_size"], verbose=False)
            kw = {"x_adv_init": _seeded_boundary_init(est, x, y, clip_values, seed)}
        t0 = time.perf_counter()
        x_adv = np.asarray(atk.generate(x=x, **kw), dtype=np.float32)
        out[name] = {"x_adv": x_adv, "seconds": time.perf_counter() - t0, "budget": budget_text(name, b)}
    report(progress, "ART attacks", len(names), len(names))
    return out


def _seeded_boundary_init(est: PyTorchClassifier, x: np.ndarray, y: np.ndarray, clip: tuple[float, float] | None,
                          seed: int, tries: int = 100) -> np.ndarray:
    """HopSkipJump's own initialisation (a uniform-random misclassified input, binary-searched towards the input
    on the segment between them to 0.001), but from a seeded generator: ART draws it from an unseeded
    ``np.random.RandomState()``, which makes the attack irreproducible."""
    rng = np.random.RandomState(seed)
    lo, hi = clip if clip is not None else (float(x.min()), float(x.max()))
    far = x.copy()
    todo = np.ones(len(x), dtype=bool)
    for _ in range(tries):
        if not todo.any():
            break
        cand = rng.uniform(lo, hi, size=x.shape).astype(x.dtype)
        adv = (est.predict(cand).argmax(1) != y) & todo
        far[adv], todo = cand[adv], todo & ~adv
    a_lo, a_hi = np.zeros(len(x)), np.ones(len(x))  # blend (1 - a)·x + a·far: clean at 0, adversarial at 1
    while (a_hi - a_lo).max() > 0.001:
        mid = (a_lo + a_hi) / 2
        shape = (-1,) + (1,) * (x.ndim - 1)
        adv = est.predict(((1 - mid.reshape(shape)) * x + mid.reshape(shape) * far).astype(x.dtype)).argmax(1) != y
        a_hi, a_lo = np.where(adv, mid, a_hi), np.where(adv, a_lo, mid)
    a_hi[todo] = 0.0  # none found: ART then tries its own (unseeded) initialisation for these inputs
    return ((1 - a_hi.reshape((-1,) + (1,) * (x.ndim - 1))) * x + a_hi.reshape((-1,) + (1,) * (x.ndim - 1)) * far
            ).astype(x.dtype)


# --- metrics ----------------------------------------------------------------------------------------------------
def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def _auroc(clean: np.ndarray, adv: np.ndarray) -> float | None:
    if not len(adv) or not len(clean):
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv]))


def detectors_with_thresholds(file: DetectorFile, clf: OnnxClassifier, torch_model: torch.nn.Module | None,
               extra: Mapping[str, DetectorFile] | None) -> dict[str, tuple[Detector, float]]:
    dets = {n: (d, file.get(n).reject_threshold) for n, d in build_all(file, clf, torch_model).items()}
    for label, f in (extra or {}).items():
        dets[label] = (build_all(f, clf, torch_model, [f.decision])[f.decision], f.get(f.decision).reject_threshold)
    return dets


def _score_block(name: str, dets: Mapping[str, tuple[Detector, float]], clean_scores: Mapping[str, np.ndarray],
                 x_adv: np.ndarray, success: np.ndarray, valid: np.ndarray, decision: str) -> dict[str, Any]:
    """Per-detector detection rates and AUROC for one attack, plus the validation layer and end-to-end figures.

    Every example is scored within the whole batch of attacked inputs, as the clean inputs are scored within the
    whole evaluation batch: the noise detector's draws depend on an example's position in its batch, so scoring
    only the successful examples would give them other draws than the adaptive attack saw.
    """
    per: dict[str, dict[str, Any]] = {}
    rejected_by_decision = np.zeros(int(success.sum()), dtype=bool)
    for det_name, (det, thr) in dets.items():
        s = det.scores(x_adv)[success]
        per[det_name] = {"detection_rate": _rate(s > thr), "auroc": _auroc(clean_scores[det_name], s),
                         "scores": s}
        if det_name == decision:
            rejected_by_decision = s > thr
    v = valid[success]
    return {
        "attack": name,
        "success_rate": float(success.mean()),
        "n_success": int(success.sum()),
        "detectors": per,
        "validation_reject_rate": _rate(~v),
        "end_to_end_success_detector": float((~rejected_by_decision).sum() / len(success)),
        "end_to_end_success": float((~rejected_by_decision & v).sum() / len(success)),
    }


# --- the whole evaluation ---------------------------------------------------------------------------------------
def evaluate(session: onnxruntime.InferenceSession, torch_model: torch.nn.Module, detector_file: DetectorFile,
             x_eval: np.ndarray, y_eval: np.ndarray, *,
             quick: bool = False, attacks: Sequence[str] | None = None, out_dir: str | os.PathLike[str] | None = None,
             extra: Mapping[str, DetectorFile] | None = None, adaptive: bool = True, measure_cost: bool = True,
             adaptive_eps: float = 0.1, seed: int = 0, progress: ProgressCallback | None = None,
             cost_smoothing: Sequence[SmoothingConfig] = ()) -> dict[str, Any]:
    """Attack, detect, attack adaptively and time; see the module docstring. ``x_eval`` must not be the data the
    detector file was calibrated on. ``extra`` maps a label to another detector file for the same model (e.g. an
    ensemble without the gradient detector) whose decision detector is evaluated and timed alongside;
    ``cost_smoothing`` adds one cost row per randomized-smoothing configuration (see ``measure_cost_ratios``).

    Returns ``{"flat": {...}, "attacks": {...}, "adaptive": {...}, "cost": {...}, "roc_png": {...}, ...}``; the
    ROC plots (one per attack, every detector a curve) are written to ``out_dir`` when given. ``progress`` (see
    ``edgeshield._progress``) hears each stage: clean scoring, each attack, scoring, each adaptive sweep step, cost.
    """
    spec = detector_file.input_spec
    x_eval = spec.validate(x_eval)
    y_eval = np.asarray(y_eval)
    if y_eval.ndim != 1 or len(y_eval) != len(x_eval) or not np.issubdtype(y_eval.dtype, np.integer):
        raise InvalidArgumentError("labels must be a 1-D integer array with one label per evaluation input")
    clf = OnnxClassifier(session)
    probs = clf.probs(x_eval)
    nb_classes = probs.shape[1]
    if y_eval.min() < 0 or y_eval.max() >= nb_classes:
        raise InvalidArgumentError(f"labels must lie in [0, {nb_classes - 1}] for this model")
    correct = probs.argmax(1) == y_eval
    if not correct.any():
        raise InvalidArgumentError("the model classifies none of the evaluation inputs correctly: nothing to attack")
    x, y = x_eval[correct], y_eval[correct]
    decision = detector_file.decision
    dets = detectors_with_thresholds(detector_file, clf, torch_model, extra)
    clean_scores = {}
    for i, (n, (d, _)) in enumerate(dets.items()):
        report(progress, "score clean inputs", i, len(dets), note=n)
        clean_scores[n] = d.scores(x_eval)
    report(progress, "score clean inputs", len(dets), len(dets))
    fpr = {n: float((clean_scores[n] > thr).mean()) for n, (_, thr) in dets.items()}
    clean_valid = valid_mask(spec, x_eval)

    clip = (spec.min if spec.min is not None else float(x_eval.min()),
            spec.max if spec.max is not None else float(x_eval.max()))
    runs = run_attacks(torch_model, x, y, nb_classes=nb_classes, quick=quick, attacks=attacks, clip_values=clip,
                       seed=seed, progress=progress)
    per_attack: dict[str, dict[str, Any]] = {}
    for i, (name, run) in enumerate(runs.items()):
        report(progress, "score adversarial examples", i, len(runs), note=name)
        xa = run["x_adv"]
        success = clf.predict(xa) != y
        block = _score_block(name, dets, clean_scores, xa, success, valid_mask(spec, xa), decision)
        delta = (xa - x)[success].reshape(int(success.sum()), int(np.prod(x.shape[1:])))
        block.update(budget=run["budget"], seconds=run["seconds"],
                     mean_linf=float(np.abs(delta).max(1).mean()) if len(delta) else None,
                     mean_l2=float(np.linalg.norm(delta, axis=1).mean()) if len(delta) else None)
        per_attack[name] = block
    report(progress, "score adversarial examples", len(runs), len(runs))

    adaptive_block = None
    if adaptive:
        adaptive_block = run_adaptive(torch_model, clf, detector_file, dets, clean_scores, x, y, quick=quick,
                                      eps=adaptive_eps, seed=seed, progress=progress)
    cost = None
    if measure_cost:
        cost = measure_cost_ratios(session, detector_file, torch_model, x_eval, extra=extra, quick=quick,
                                   smoothing=cost_smoothing, progress=progress)

    roc = {}
    if out_dir is not None:
        blocks = dict(per_attack) | ({"adaptive": adaptive_block} if adaptive_block else {})
        roc = write_roc_plots(out_dir, blocks, clean_scores, {n: t for n, (_, t) in dets.items()},
                              detector_file.target_fpr)
    result = {
        "protocol": {"n_eval": len(x_eval), "n_correct": int(correct.sum()), "target_fpr": detector_file.target_fpr,
                     "decision": decision, "detectors": list(dets), "quick": quick,
                     "quantum": spec.quantum, "model_sha256": detector_file.model_sha256,
                     "budgets": {n: r["budget"] for n, r in runs.items()}},
        "clean_accuracy": float(correct.mean()),
        "fpr_measured": fpr,
        "validation_fpr": float((~clean_valid).mean()),
        "attacks": per_attack,
        "adaptive": adaptive_block,
        "cost": cost,
        "roc_png": roc,
    }
    result["flat"] = flatten(result)
    return result


def run_adaptive(torch_model: torch.nn.Module, clf: OnnxClassifier, file: DetectorFile,
                 dets: Mapping[str, tuple[Detector, float]], clean_scores: Mapping[str, np.ndarray],
                 x: np.ndarray, y: np.ndarray, *, quick: bool = False, eps: float = 0.1, quantum: float | None = None,
                 spec: InputSpec | None = None, seed: int = 0,
                 progress: ProgressCallback | None = None) -> dict[str, Any]:
    """The adaptive attack's sweep and its strongest configuration, scored by every detector like the others.

    ``quantum``/``spec`` override what the attacker projects onto and aims to pass (default: the file's spec);
    validation in the reported figures is always the file's spec.
    """
    kw: dict[str, Any] = {"eps": eps, "step": 0.01, "iters": 40, "seed": seed}
    if quick:
        kw.update(iters=15, lambdas=(0.1, 1.0), losses=("ce",), penalties=("sum",))
    if quantum is not None:
        kw["quantum"] = quantum
    if spec is not None:
        kw["spec"] = spec
    res = adaptive_attack(torch_model, clf, file, dets[file.decision][0], x, y, progress=progress, **kw)
    success = clf.predict(res.x_adv) != y
    block = _score_block("adaptive", dets, clean_scores, res.x_adv, success, valid_mask(file.input_spec, res.x_adv),
                         file.decision)
    delta = np.abs(res.x_adv - x).reshape(len(x), -1)
    ds = delta[success]
    q = res.best["quantum"]
    on_grid = bool(np.all(np.abs(res.x_adv / q - np.round(res.x_adv / q)) < 1e-3)) if q else None
    block.update(budget=f"L∞ eps={eps}, step={kw['step']}, iters={kw['iters']}, grid={q or 'none'}", best=res.best,
                 sweep=res.sweep, max_linf=float(delta.max()), on_grid=on_grid, x_adv=res.x_adv,
                 seconds=sum(r["seconds"] for r in res.sweep),
                 mean_linf=float(ds.max(1).mean()) if len(ds) else None,
                 mean_l2=float(np.linalg.norm(ds, axis=1).mean()) if len(ds) else None)
    return block


# --- cost -------------------------------------------------------------------------------------------------------
def measure_cost_ratios(session: onnxruntime.InferenceSession, file: DetectorFile,
                        torch_model: torch.nn.Module | None, x: np.ndarray, *,
                        names: Sequence[str] = COST_DETECTORS, extra: Mapping[str, DetectorFile] | None = None,
                        smoothing: Sequence[SmoothingConfig] = (), quick: bool = False,
                        progress: ProgressCallback | None = None) -> dict[str, dict[str, float]]:
    """Median batch-of-1 latency and batch throughput of ``RobustModel.decide`` ÷ plain ``session.run``.

    One row per detector in ``names`` that the file has (each as robust inference's detector; a combiner runs its
    members too), one per ``extra`` file (its decision detector), and one per smoothing configuration, labelled
    ``smoothing_n{n}``: the file's decision detector plus CERTIFY with ``n0 + n`` noisy copies per input. Plain and
    robust calls alternate, so drift of the machine hits both alike. ``x`` must pass the spec; the batch is all of
    ``x``. Smoothing rows run fewer repetitions (``reps_single``/``reps_batch`` say how many), as each call costs
    hundreds of plain ones.
    """
    from edgeshield.adversarial._robust import RobustModel

    configs = list(smoothing)
    for cfg in configs:
        if not isinstance(cfg, SmoothingConfig):
            raise InvalidArgumentError(f"smoothing must be SmoothingConfig instances, not {type(cfg).__name__}")
    labels = [f"smoothing_n{cfg.n}" for cfg in configs]
    if len(set(labels)) != len(labels):
        raise InvalidArgumentError(f"two smoothing configurations share a sample count n ({labels}): their cost "
                                   "rows would share a label")
    x = file.input_spec.validate(x)
    name_in = session.get_inputs()[0].name
    reps = {False: (60, 8) if quick else (400, 40), True: SMOOTHING_REPS_QUICK if quick else SMOOTHING_REPS}
    models: dict[str, tuple[RobustModel, bool]] = {
        n: (RobustModel(session, file, torch_model=torch_model, detector=n), False) for n in names
        if n in {d.name for d in file.detectors}}
    for label, f in (extra or {}).items():
        models[label] = (RobustModel(session, f, torch_model=torch_model), False)
    for label, cfg in zip(labels, configs, strict=True):
        models[label] = (RobustModel(session, file, torch_model=torch_model, smoothing=cfg), True)
    out: dict[str, dict[str, float]] = {}
    for k, (label, (rm, smoothed)) in enumerate(models.items()):
        report(progress, "time robust inference", k, len(models), note=label)  # between timings, never inside
        single_reps, batch_reps = reps[smoothed]
        rows = [x[i : i + 1] for i in range(min(len(x), 64))]
        rm.decide(x)  # warm-up
        session.run(None, {name_in: x})
        p1, r1 = _median_ns(session, rm, (rows[i % len(rows)] for i in range(single_reps)))
        pb, rb = _median_ns(session, rm, (x for _ in range(batch_reps)))
        plain1, rob1 = p1 / 1e3, r1 / 1e3
        plainb, robb = pb / 1e9, rb / 1e9
        out[label] = {"latency_plain_us": plain1, "latency_robust_us": rob1, "latency_ratio": rob1 / plain1,
                      "throughput_plain_per_s": len(x) / plainb, "throughput_robust_per_s": len(x) / robb,
                      "throughput_ratio": robb / plainb, "batch": len(x), "reps_single": single_reps,
                      "reps_batch": batch_reps}
        if rm.smoothing is not None:
            out[label].update(samples_per_input=rm.smoothing.n0 + rm.smoothing.n, sigma=rm.smoothing.sigma)
    report(progress, "time robust inference", len(models), len(models))
    return out


def _median_ns(session: onnxruntime.InferenceSession, rm: RobustModel,
               inputs: Iterable[np.ndarray]) -> tuple[float, float]:
    """Median ns of plain ORT and of robust inference, each input run through both back to back."""
    name_in = session.get_inputs()[0].name
    plain, robust = [], []
    for xi in inputs:
        t0 = time.perf_counter_ns()
        session.run(None, {name_in: xi})
        t1 = time.perf_counter_ns()
        rm.decide(xi)
        t2 = time.perf_counter_ns()
        plain.append(t1 - t0)
        robust.append(t2 - t1)
    return statistics.median(plain), statistics.median(robust)


# --- ROC plots --------------------------------------------------------------------------------------------------
def write_roc_plots(out_dir: str | os.PathLike[str], blocks: Mapping[str, Mapping[str, Any]],
                    clean_scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float],
                    target_fpr: float) -> dict[str, str]:
    """One PNG per attack (``roc_<attack>.png``) with a ROC curve and the calibrated operating point per detector."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    from edgeshield._io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for attack, block in blocks.items():
        fig = Figure(figsize=(11, 4.8), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 2)
        for ax, xmax in zip(axes, (1.0, 0.1), strict=True):
            for i, (det, info) in enumerate(block["detectors"].items()):
                adv, clean = info["scores"], clean_scores[det]
                if not len(adv):
                    continue
                fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv])
                ax.plot(fpr, tpr, color=f"C{i}", label=f"{det} (AUROC {info['auroc']:.3f})")
                ax.plot([float((clean > thresholds[det]).mean())], [info["detection_rate"]], "o", color=f"C{i}",
                        markersize=5)
            ax.axvline(target_fpr, color="grey", linestyle=":", linewidth=1, label=f"target FPR {target_fpr:g}")
            ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
            ax.set(xlim=(0, xmax), ylim=(0, 1.01), xlabel="false-positive rate (clean evaluation inputs)",
                   ylabel="detection rate (successful adversarial examples)")
        axes[0].legend(loc="lower right", fontsize=8)
        axes[1].set_title("zoom: FPR ≤ 0.1", fontsize=9)
        n_clean = len(next(iter(clean_scores.values())))
        axes[0].set_title(f"{attack}: {block['n_success']} successful examples, {n_clean} clean; "
                          "dots = calibrated thresholds", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        path = out / f"roc_{attack}.png"
        atomic_write_bytes(path, buf.getvalue())
        written[attack] = str(path)
    return written


# --- flat figures and tables ------------------------------------------------------------------------------------
def flatten(result: Mapping[str, Any]) -> dict[str, Any]:
    """One flat dict of numbers and short strings (the JSON the benchmark writes)."""
    p = result["protocol"]
    decision = p["decision"]
    flat: dict[str, Any] = {"clean_accuracy": result["clean_accuracy"], "n_eval": p["n_eval"],
                            "n_correct": p["n_correct"], "target_fpr": p["target_fpr"], "decision_detector": decision,
                            "fpr_measured": result["fpr_measured"][decision], "quantum": p["quantum"],
                            "validation_fpr": result["validation_fpr"]}
    for det, v in result["fpr_measured"].items():
        flat[f"fpr_measured_{det}"] = v
    for name, b in result["attacks"].items():
        flat[f"attack_success_{name}"] = b["success_rate"]
        flat[f"n_success_{name}"] = b["n_success"]
        flat[f"budget_{name}"] = b["budget"]
        flat[f"attack_seconds_{name}"] = b["seconds"]
        flat[f"mean_linf_{name}"] = b["mean_linf"]
        flat[f"mean_l2_{name}"] = b["mean_l2"]
        flat[f"validation_reject_rate_{name}"] = b["validation_reject_rate"]
        flat[f"end_to_end_success_detector_{name}"] = b["end_to_end_success_detector"]
        flat[f"end_to_end_success_{name}"] = b["end_to_end_success"]
        for det, d in b["detectors"].items():
            flat[f"detection_rate_{name}_{det}"] = d["detection_rate"]
            flat[f"auroc_{name}_{det}"] = d["auroc"]
    names = list(result["attacks"])
    for det in result["fpr_measured"]:
        rates = [result["attacks"][a]["detectors"][det]["detection_rate"] for a in names]
        rates = [r for r in rates if r is not None]
        flat[f"detection_rate_avg_{det}"] = float(np.mean(rates)) if rates else None
    flat["detection_rate_avg"] = flat.get(f"detection_rate_avg_{decision}")
    aurocs = [result["attacks"][a]["detectors"][decision]["auroc"] for a in names]
    aurocs = [a for a in aurocs if a is not None]
    flat["auroc_min"] = min(aurocs) if aurocs else None
    vr = [result["attacks"][a]["validation_reject_rate"] for a in names]
    vr = [v for v in vr if v is not None]
    flat["validation_reject_rate_avg"] = float(np.mean(vr)) if vr else None
    avg = flat["detection_rate_avg"]
    flat["detection_target_met"] = avg is not None and avg >= DETECTION_TARGET and flat["fpr_measured"] <= FPR_TARGET
    a = result.get("adaptive")
    if a:
        flat.update(adaptive_success=a["success_rate"],
                    adaptive_detection_rate=a["detectors"][decision]["detection_rate"],
                    adaptive_end_to_end_success=a["end_to_end_success"],
                    adaptive_validation_reject_rate=a["validation_reject_rate"], adaptive_budget=a["budget"],
                    adaptive_lambda=a["best"]["lambda"], adaptive_loss=a["best"]["loss"],
                    adaptive_penalty=a["best"]["penalty"], adaptive_max_linf=a["max_linf"],
                    adaptive_on_grid=a["on_grid"], adaptive_configs_tried=len(a["sweep"]),
                    adaptive_seconds=a["seconds"])
        for det, d in a["detectors"].items():
            flat[f"detection_rate_adaptive_{det}"] = d["detection_rate"]
            flat[f"auroc_adaptive_{det}"] = d["auroc"]
    for det, c in (result.get("cost") or {}).items():
        for k in ("latency_plain_us", "latency_robust_us", "latency_ratio", "throughput_plain_per_s",
                  "throughput_robust_per_s", "throughput_ratio"):
            flat[f"{k}_{det}"] = c[k]
    if result.get("cost") and "squeeze" in result["cost"]:
        flat["squeeze_latency_ratio"] = result["cost"]["squeeze"]["latency_ratio"]
        flat["squeeze_throughput_ratio"] = result["cost"]["squeeze"]["throughput_ratio"]
        worst = max(flat["squeeze_latency_ratio"], flat["squeeze_throughput_ratio"])
        flat["squeeze_cost_target_met"] = worst <= SQUEEZE_COST_TARGET
    return flat


def jsonable(result: Mapping[str, Any]) -> dict[str, Any]:
    """The result without arrays (scores, adversarial examples), for ``--json``."""
    def clean(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return None
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items() if not isinstance(x, np.ndarray)}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v
    return clean(result)


def _f(v: float | None, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _mark(ok: bool) -> str:
    return "[green]met[/green]" if ok else "[red]MISSED[/red]"


def report_tables(result: Mapping[str, Any]) -> list[Table]:
    """Rich tables: attacks, detection (AUROC) per attack and detector, the adaptive sweep, cost, targets."""
    from rich.table import Table

    flat, p = result["flat"], result["protocol"]
    decision = p["decision"]
    dets = p["detectors"]
    tables = []
    t = Table(title=f"Attacks on the undefended model ({p['n_correct']} of {p['n_eval']} evaluation inputs "
                    "classified correctly); end-to-end = success ∧ not rejected")
    for col in ("attack", "budget", "success", "mean L∞", "mean L2", "s", "validation rejects",
                f"e2e ({decision} only)", "e2e (validation + detector)"):
        t.add_column(col, justify="left" if col in ("attack", "budget") else "right")
    blocks = dict(result["attacks"]) | ({"adaptive": result["adaptive"]} if result.get("adaptive") else {})
    for name, b in blocks.items():
        t.add_row(name, b["budget"], f"{b['success_rate']:.3f} ({b['n_success']})",
                  _f(b["mean_linf"]), _f(b.get("mean_l2")), f"{b['seconds']:.1f}",
                  _f(b["validation_reject_rate"]), _f(b["end_to_end_success_detector"]), _f(b["end_to_end_success"]))
    tables.append(t)

    t = Table(title=f"Detection rate at the calibrated threshold (target FPR {p['target_fpr']}) over successful "
                    "adversarial examples, (AUROC clean vs. adversarial)")
    t.add_column("attack")
    for d in dets:
        t.add_column(d + (" *" if d == decision else ""), justify="right")
    for name, b in blocks.items():
        cells = [b["detectors"][d] for d in dets]
        t.add_row(name, *[f"{_f(c['detection_rate'])} ({_f(c['auroc'])})" for c in cells])
    t.add_row("avg (non-adaptive)", *[_f(flat[f"detection_rate_avg_{d}"]) for d in dets])
    t.add_row("FPR measured, clean eval", *[_f(result["fpr_measured"][d]) for d in dets])
    tables.append(t)

    a = result.get("adaptive")
    if a:
        t = Table(title=f"Adaptive attack sweep ({a['budget']}); e2e = misclassified ∧ valid ∧ not rejected")
        for col in ("loss", "penalty", "λ", "success", f"{decision} detection", "e2e success", "s"):
            t.add_column(col, justify="right")
        for r in a["sweep"]:
            best = all(r[k] == a["best"][k] for k in ("lambda", "loss", "penalty"))
            t.add_row(r["loss"], r["penalty"], f"{r['lambda']:g}", _f(r["success"]), _f(r["detection_rate"]),
                      _f(r["end_to_end_success"]) + (" ← strongest" if best else ""), f"{r['seconds']:.1f}")
        tables.append(t)

    cost = result.get("cost")
    if cost:
        t = Table(title="Cost of robust inference (RobustModel.decide, vectorised) ÷ plain session.run, medians, "
                        "alternating; smoothing_n<n>: the decision detector and CERTIFY with n0 + n samples")
        batch = next(iter(cost.values()))["batch"]
        for col in ("option", "plain µs (batch 1)", "robust µs", "ratio", f"plain /s (batch {batch})",
                    "robust /s", "ratio", "target"):
            t.add_column(col, justify="right")
        for d, c in cost.items():
            met = max(c["latency_ratio"], c["throughput_ratio"]) <= SQUEEZE_COST_TARGET
            target = f"≤ {SQUEEZE_COST_TARGET:g}× " + _mark(met) if d == "squeeze" else ""
            t.add_row(d, f"{c['latency_plain_us']:.1f}", f"{c['latency_robust_us']:.1f}", f"{c['latency_ratio']:.2f}",
                      f"{c['throughput_plain_per_s']:,.0f}", f"{c['throughput_robust_per_s']:,.0f}",
                      f"{c['throughput_ratio']:.2f}", target)
        tables.append(t)

    t = Table(title="Targets")
    for col in ("figure", "value", "target", ""):
        t.add_column(col)
    avg = flat["detection_rate_avg"]
    t.add_row(f"detection_rate_avg ({decision}, non-adaptive attacks)", _f(avg), f"≥ {DETECTION_TARGET}",
              _mark(avg is not None and avg >= DETECTION_TARGET))
    t.add_row(f"fpr_measured ({decision}, clean evaluation split)", _f(flat["fpr_measured"]), f"≤ {FPR_TARGET}",
              _mark(flat["fpr_measured"] <= FPR_TARGET))
    t.add_row(f"auroc_min ({decision})", _f(flat["auroc_min"]), "-", "")
    if a:
        t.add_row("adaptive_detection_rate", _f(flat["adaptive_detection_rate"]), "-", "")
        t.add_row("adaptive_end_to_end_success", _f(flat["adaptive_end_to_end_success"]), "-", "")
    if "squeeze_latency_ratio" in flat:
        t.add_row("squeeze cost (max of latency, throughput ratio)",
                  _f(max(flat["squeeze_latency_ratio"], flat["squeeze_throughput_ratio"]), 2),
                  f"≤ {SQUEEZE_COST_TARGET:g}", _mark(flat["squeeze_cost_target_met"]))
    tables.append(t)
    return tables
