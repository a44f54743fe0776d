"""An adaptive, white-box attack on the defence: it knows the model, the detectors and the input spec's grid.

The attack is PGD under an L∞ budget that maximises ``loss(model(x), y) − λ·penalty(x)``, where the penalty
is built from differentiable surrogates of the decision detector's members, each divided by its reject threshold:

* ``reconstruction`` — the PCA residual, computed exactly in torch;
* ``squeeze`` — bit-depth reduction through BPDA (straight-through rounding); median smoothing, if configured,
  as a differentiable median over the same windows;
* ``noise`` — EOT: the mean over a few fixed Gaussian draws (the attacker's own, not the detector's seed);
* ``gradient`` — its score is itself an input-gradient norm, so it is differentiated by double backprop
  (``torch.autograd.grad(..., create_graph=True)``).

Two penalty shapes are tried: ``sum`` (the plain sum of score ÷ threshold over the members) and ``hinge`` (the
sum of ``relu(score ÷ threshold − 0.9)``, which stops pushing a member once it is safely below its threshold);
two losses: cross-entropy and the logit margin capped at 2. When the input spec has a ``quantum``, every forward
pass sees the iterate projected onto that grid inside the ε box (straight-through), so the examples the attack
returns pass validation. After each step the real decision detector (numpy/ONNX Runtime) and the real spec are
consulted: an input keeps the first iterate that is misclassified, valid and not rejected, else the last iterate.
Every configuration of the sweep is reported; the strongest (highest end-to-end success) is the headline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield._progress import ProgressCallback, report
from edgeshield.adversarial._calibrate import DetectorFile
from edgeshield.adversarial._detectors import Detector, OnnxClassifier
from edgeshield.adversarial._spec import InputSpec
from edgeshield.errors import InputValidationError, InvalidArgumentError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from edgeshield.bundles._ort import onnxruntime

    # Judging a batch of iterates: (misclassified, valid, rejected), one bool per example.
    _Judge = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

HINGE_AT = 0.9
MARGIN_CAP = 2.0


def valid_mask(spec: InputSpec, x: np.ndarray) -> np.ndarray:
    """Per-example result of the real ``InputSpec.validate`` (which judges a whole batch at once)."""
    ok = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        try:
            spec.validate(x[i : i + 1])
        except InputValidationError:
            ok[i] = False
    return ok


def decision_members(file: DetectorFile) -> list[tuple[str, float]]:
    """(member name, its reject threshold) of the file's decision detector."""
    cd = file.get(file.decision)
    if cd.name == "ensemble":
        return [(m, file.get(m).reject_threshold) for m in cd.params["members"]]
    return [(cd.name, cd.reject_threshold)]


class Surrogate:
    """Differentiable torch versions of a detector file's detectors, for one batch shape."""

    def __init__(self, torch_model: torch.nn.Module, file: DetectorFile, names: Sequence[str],
                 shape: tuple[int, ...], *, noise_draws: int = 4, seed: int = 1234) -> None:
        import torch

        self.torch: ModuleType = torch
        self.model, self.names = torch_model, list(names)
        self.params = {n: file.get(n).params for n in self.names}
        self.draws = torch.empty((0, *shape))  # the noise member's draws (none without that member)
        if "noise" in self.params:
            gen = torch.Generator().manual_seed(seed)
            self.draws = torch.randn((noise_draws, *shape), generator=gen) * float(self.params["noise"]["sigma"])
        if "reconstruction" in self.params:
            p = self.params["reconstruction"]
            self.mean = torch.tensor(p["mean"], dtype=torch.float32)
            self.components = torch.tensor(p["components"], dtype=torch.float32)

    def scores(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and per-member surrogate scores; ``x`` must require grad (for the gradient member)."""
        torch = self.torch
        F = torch.nn.functional
        z = self.model(x)
        p = F.softmax(z, dim=1)
        out: dict[str, Tensor] = {}
        for name in self.names:
            prm = self.params[name]
            if name == "squeeze":
                lo, hi = prm["value_range"]
                copies = []
                if prm.get("bits") is not None:
                    levels = 2 ** int(prm["bits"]) - 1
                    scaled = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
                    q = torch.round(scaled * levels) / levels * (hi - lo) + lo
                    copies.append(x + (q - x).detach())  # BPDA: rounding forward, identity backward
                if prm.get("median") is not None:
                    copies.append(_median_smooth(torch, x, int(prm["median"]), prm["image_shape"]))
                out[name] = torch.stack([(p - F.softmax(self.model(c), 1)).abs().sum(1) for c in copies]).amax(0)
            elif name == "noise":
                vr = prm.get("value_range")
                terms = []
                for d in self.draws:
                    xn = x + d[: len(x)].reshape(x.shape)
                    xn = xn.clamp(vr[0], vr[1]) if vr else xn
                    terms.append((p - F.softmax(self.model(xn), 1)).abs().sum(1))
                out[name] = torch.stack(terms).mean(0)
            elif name == "reconstruction":
                c = x.reshape(len(x), -1) - self.mean
                r = c - (c @ self.components.T) @ self.components
                out[name] = r.abs().sum(1) if prm["norm"] == "l1" else r.norm(dim=1)
            elif name == "gradient":
                ce = F.cross_entropy(z, z.detach().argmax(1), reduction="sum")
                (g,) = torch.autograd.grad(ce, x, create_graph=True)  # double backprop
                g = g.reshape(len(x), -1)
                norm = prm.get("norm", "l2")
                out[name] = g.abs().sum(1) if norm == "l1" else g.norm(dim=1) if norm == "l2" else g.abs().amax(1)
            else:  # pragma: no cover - decision_members only yields known detectors
                raise InvalidArgumentError(f"no differentiable surrogate for detector {name!r}")
        return z, out


def _median_smooth(torch: ModuleType, x: Tensor, size: int, image_shape: Sequence[int]) -> Tensor:
    """Differentiable twin of ``median_smooth`` (reflect padding; even windows average the two middle values)."""
    F = torch.nn.functional
    h, w = image_shape[-2], image_shape[-1]
    imgs = x.reshape(-1, 1, h, w)
    before, after = (size - 1) // 2, size // 2
    padded = F.pad(imgs, (before, after, before, after), mode="reflect")
    win = F.unfold(padded, size).transpose(1, 2)  # (N, H*W, size*size)
    s = win.sort(dim=-1).values
    k = s.shape[-1]
    med = s[..., k // 2] if k % 2 else (s[..., k // 2 - 1] + s[..., k // 2]) / 2
    return med.reshape(x.shape)


@dataclass
class AdaptiveResult:
    x_adv: np.ndarray
    best: dict[str, Any]  # the strongest configuration and its figures
    sweep: list[dict[str, Any]] = field(default_factory=list)


def adaptive_attack(
    torch_model: torch.nn.Module,
    session_or_clf: onnxruntime.InferenceSession | OnnxClassifier,
    detector_file: DetectorFile,
    decision_detector: Detector,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float = 0.1,
    step: float = 0.01,
    iters: int = 40,
    quantum: float | None = None,
    spec: InputSpec | None = None,
    lambdas: Sequence[float] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0),
    losses: Sequence[str] = ("ce", "margin"),
    penalties: Sequence[str] = ("sum", "hinge"),
    noise_draws: int = 4,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> AdaptiveResult:
    """Run the adaptive attack over a λ × loss × penalty sweep on correctly classified ``x`` (labels ``y``).

    ``quantum`` defaults to the detector file's input spec's; ``spec`` (default: the file's) is what validation
    means for the end-to-end figure. Success counts are over ``x``; the headline is the configuration with the
    highest end-to-end success (misclassified ∧ valid ∧ not rejected by the decision detector). ``progress``
    hears "adaptive attack sweep" before each configuration and when the sweep is done.
    """
    import torch

    if not eps > 0 or not step > 0 or iters < 1:
        raise InvalidArgumentError("the adaptive attack needs eps > 0, step > 0 and at least one iteration")
    spec = spec or detector_file.input_spec
    quantum = spec.quantum if quantum is None else quantum
    clf = session_or_clf if isinstance(session_or_clf, OnnxClassifier) else OnnxClassifier(session_or_clf)
    threshold = detector_file.get(detector_file.decision).reject_threshold
    members = decision_members(detector_file)
    taus = dict(members)
    sur = Surrogate(torch_model, detector_file, [m for m, _ in members], x.shape, noise_draws=noise_draws,
                    seed=1234 + seed)
    lo_v = spec.min if spec.min is not None else -math.inf
    hi_v = spec.max if spec.max is not None else math.inf
    x0 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    lo, hi = (x0 - eps).clamp(lo_v, hi_v), (x0 + eps).clamp(lo_v, hi_v)
    if quantum:  # the grid points inside the box
        lo_g, hi_g = torch.ceil(lo / quantum - 1e-4) * quantum, torch.floor(hi / quantum + 1e-4) * quantum

    def project(v: Tensor) -> Tensor:
        if not quantum:
            return v
        return torch.minimum(torch.maximum(torch.round(v / quantum) * quantum, lo_g), hi_g)

    def judge(xn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mis = clf.predict(xn) != y
        ok = valid_mask(spec, xn)
        rej = decision_detector.scores(xn) > threshold
        return mis, ok, rej

    was_training = torch_model.training
    torch_model.eval()
    sweep: list[dict[str, Any]] = []
    best_run: tuple[dict[str, Any], np.ndarray] | None = None
    configs = [(loss_kind, pen_kind, lam) for loss_kind in losses for pen_kind in penalties for lam in lambdas
               if not (lam == 0 and pen_kind != penalties[0])]  # λ = 0 has no penalty: one run per loss is enough
    try:
        for step_no, (loss_kind, pen_kind, lam) in enumerate(configs):
            report(progress, "adaptive attack sweep", step_no, len(configs),
                   note=f"{loss_kind} loss, {pen_kind} penalty, λ={lam:g}")
            t0 = time.perf_counter()
            x_adv = _run(torch, sur, x0, y_t, lo, hi, project, judge, taus, float(lam), loss_kind,
                         pen_kind, step, iters)
            mis, ok, rej = judge(x_adv)
            row: dict[str, Any] = {"lambda": float(lam), "loss": loss_kind, "penalty": pen_kind,
                   "success": float(mis.mean()),
                   "detection_rate": float(rej[mis].mean()) if mis.any() else None,
                   "validation_reject_rate": float((~ok)[mis].mean()) if mis.any() else None,
                   "end_to_end_success": float((mis & ok & ~rej).mean()),
                   "seconds": time.perf_counter() - t0}
            sweep.append(row)
            if best_run is None or row["end_to_end_success"] > best_run[0]["end_to_end_success"]:
                best_run = (row, x_adv)
        report(progress, "adaptive attack sweep", len(configs), len(configs))
    finally:
        torch_model.train(was_training)
    if best_run is None:  # no configuration ran
        raise InvalidArgumentError("the adaptive attack needs at least one loss, one penalty and one λ")
    best = dict(best_run[0]) | {"eps": eps, "step": step, "iters": iters, "quantum": quantum,
                                "noise_draws": noise_draws, "members": [m for m, _ in members]}
    return AdaptiveResult(best_run[1], best, sweep)


def _run(torch: ModuleType, sur: Surrogate, x0: Tensor, y: Tensor, lo: Tensor, hi: Tensor,
         project: Callable[[Tensor], Tensor], judge: _Judge, taus: dict[str, float], lam: float, loss_kind: str,
         pen_kind: str, step: float, iters: int) -> np.ndarray:
    F = torch.nn.functional
    x = x0.clone()
    kept = project(x0).numpy().copy()
    done = np.zeros(len(x0), dtype=bool)
    xn = kept
    for it in range(iters + 1):
        xq = project(x)
        xin = (x + (xq - x).detach()).requires_grad_(True)  # forward at the grid point, straight-through
        xn = xq.detach().numpy().astype(np.float32)
        mis, ok, rej = judge(xn)
        win = mis & ok & ~rej & ~done
        kept[win], done = xn[win], done | win
        if it == iters or done.all():
            break
        with torch.enable_grad():
            z, scores = sur.scores(xin)
            if loss_kind == "ce":
                adv = F.cross_entropy(z, y, reduction="none")
            else:
                zy = z.gather(1, y[:, None])[:, 0]
                other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -1e9).amax(1)
                adv = (other - zy).clamp(max=MARGIN_CAP)
            ratios = [scores[n] / max(taus[n], 1e-12) for n in scores]
            if pen_kind == "sum":
                pen = torch.stack(ratios).sum(0)
            else:
                pen = torch.stack([F.relu(r - HINGE_AT) for r in ratios]).sum(0)
            (grad,) = torch.autograd.grad((adv - lam * pen).sum(), xin)
        x = torch.minimum(torch.maximum(x + step * grad.sign(), lo), hi).detach()
    kept[~done] = xn[~done]
    return kept
