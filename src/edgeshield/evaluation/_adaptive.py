"""An adaptive, white-box attack on the defence: it knows the model, the detectors and the input spec's grid.

The attack is PGD (L∞ or L2) that maximises ``loss(model(x), y) − λ·penalty(x)``, the penalty built from
differentiable surrogates of the decision detector's members, each divided by its reject threshold:

* ``reconstruction`` — the PCA residual, computed exactly in torch;
* ``squeeze`` — bit-depth reduction through BPDA (straight-through rounding); median smoothing, if configured,
  as a differentiable median over the same windows;
* ``noise`` — EOT: the mean over a few fixed Gaussian draws (the attacker's own by default; ``noise="file"``
  uses the detector file's own seeded patterns, which a reader of the file knows);
* ``gradient`` — its score is itself an input-gradient norm, so it is differentiated by double backprop;
* ``mahalanobis`` — exact: the smallest (f − μ_c)ᵀP(f − μ_c) over classes of each hidden layer's pooled activation,
  standardised and summed (the converted model's ``forward_with`` gives the activations);
* ``lid`` — exact: the MLE LID against the stored clean sample over the k nearest distances (``topk``), whose
  gradient flows through the selected distances;
* ``fisher`` — the combined statistic with each member's empirical p-value replaced by a smooth one,
  ``(1 + Σ sigmoid((c − s)/T)) / (n + 1)`` over the member's clean scores c, T a small fraction of their spread.

Three penalty shapes: ``sum`` (Σ score ÷ threshold over the members), ``hinge`` (Σ relu(score ÷ threshold − 0.9),
which stops pushing a member once it is safely below its threshold) and ``combined`` (the decision statistic itself
÷ its threshold: the smooth Fisher statistic, the ensemble's max, or the single detector's score); two losses:
cross-entropy and the logit margin capped at 2. With ``smoothing`` the loss is taken on the mean softmax of
Gaussian copies (EOT, SmoothAdv). When the input spec has a ``quantum`` every forward pass sees the iterate
projected onto that grid inside the budget (:func:`project_to_grid`, straight-through), so the examples pass
validation. After each step the judge (by default: the real model, detector and spec in numpy/ONNX Runtime) is
consulted: an input keeps the first iterate that is misclassified, valid and not rejected, else the last one.
Every configuration of the sweep is reported; the strongest (highest end-to-end success) is the headline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgeshield._progress import ProgressCallback, report
from edgeshield.adversarial._calibrate import COMBINED_DETECTORS, DetectorFile
from edgeshield.adversarial._detectors import Detector, OnnxClassifier
from edgeshield.adversarial._features import decode_array
from edgeshield.adversarial._smoothing import ABSTAIN, SmoothedClassifier, SmoothingConfig
from edgeshield.adversarial._spec import InputSpec
from edgeshield.errors import InputValidationError, InvalidArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from edgeshield.bundles._ort import onnxruntime

# Judging a batch of iterates: (misclassified, valid, rejected), one bool per example.
Judge = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
Norm = Literal["Linf", "L2"]

HINGE_AT = 0.9
MARGIN_CAP = 2.0
FISHER_TEMPERATURE = 0.05  # T as a fraction of a member's clean-score standard deviation
PENALTIES = ("sum", "hinge", "combined")
_GRID_TOL = 1e-4  # in grid steps: float32 grid values (k/255 near 1) sit this close to their grid point


def valid_mask(spec: InputSpec, x: np.ndarray) -> np.ndarray:
    """Per-example result of the real ``InputSpec.validate`` (which judges a whole batch at once)."""
    ok = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        try:
            spec.validate(x[i : i + 1])
        except InputValidationError:
            ok[i] = False
    return ok


# --- the grid ------------------------------------------------------------------------------------------------------
def project_to_grid(x0: np.ndarray, x: np.ndarray, *, norm: Norm, eps: float, quantum: float,
                    lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """The nearest point on the ``quantum`` grid inside the budget around ``x0`` and inside [lo, hi] (float32).

    L∞: round, then clip to the grid points inside the box. L2: round, then truncate coordinates towards ``x0``
    (one grid step short of the rounding, never past ``x0``), those whose rounding added most to the norm first,
    until ``‖x − x0‖₂ <= eps``; if that is not enough (``x`` outside the ball), coordinates are set to ``x0``'s
    own grid point, largest offset first. The budget holds up to ``1e-4 * quantum`` (float32 grid values are not
    exact multiples). A budget that holds no grid point is an :class:`InvalidArgumentError` (it cannot happen when
    ``x0`` lies on the grid).
    """
    if not quantum > 0 or not eps >= 0:
        raise InvalidArgumentError("project_to_grid needs quantum > 0 and eps >= 0")
    if norm not in ("Linf", "L2"):
        raise InvalidArgumentError(f"norm must be Linf or L2, not {norm!r}")
    a0 = np.asarray(x0, dtype=np.float64)
    a = np.asarray(x, dtype=np.float64)
    if a.shape != a0.shape or a.ndim < 1:
        raise InvalidArgumentError(f"x {a.shape} and x0 {a0.shape} must have the same shape")
    q = float(quantum)
    g_lo = -math.inf if lo is None else math.ceil(lo / q - _GRID_TOL)
    g_hi = math.inf if hi is None else math.floor(hi / q + _GRID_TOL)
    if g_lo > g_hi:
        raise InvalidArgumentError(f"no multiple of {q:g} lies in [{lo}, {hi}]")
    k0 = np.clip(np.round(a0 / q), g_lo, g_hi)  # x0's own grid point, in steps
    if norm == "Linf":
        k_lo = np.maximum(np.ceil((a0 - eps) / q - _GRID_TOL), g_lo)
        k_hi = np.minimum(np.floor((a0 + eps) / q + _GRID_TOL), g_hi)
        if (k_lo > k_hi).any():
            raise InvalidArgumentError(f"an L∞ budget of {eps:g} around x0 holds no multiple of {q:g}")
        out = np.clip(np.round(a / q), k_lo, k_hi) * q
    else:
        out = _project_l2(a0, a, k0, eps, q, g_lo, g_hi)
    if lo is not None or hi is not None:
        out = np.clip(out, lo, hi)
    return out.astype(np.float32)


def _project_l2(a0: np.ndarray, a: np.ndarray, k0: np.ndarray, eps: float, q: float, g_lo: float,
                g_hi: float) -> np.ndarray:
    shape = a.shape
    a0, a, k0 = (v.reshape(len(v), -1) if v.ndim > 1 else v.reshape(1, -1) for v in (a0, a, k0))
    budget = (eps + _GRID_TOL * q) ** 2
    k = np.clip(np.round(a / q), g_lo, g_hi)
    # Stage 1: truncation towards x0's grid point instead of rounding (|offset| shrinks by at most one step).
    steps = np.clip(a / q, g_lo, g_hi) - k0
    k_trunc = k0 + np.trunc(steps)
    added = (k * q - a0) ** 2 - (a - a0) ** 2
    k = _replace_until(a0, k, k_trunc, -added, q, budget)
    # Stage 2 (x outside the ball): x0's own grid point, largest offsets first.
    k = _replace_until(a0, k, k0, -((k * q - a0) ** 2), q, budget)
    if (((k * q - a0) ** 2).sum(axis=1) > budget).any():
        raise InvalidArgumentError(f"an L2 budget of {eps:g} around x0 holds no point of the {q:g} grid")
    return (k * q).reshape(shape)


def _replace_until(a0: np.ndarray, k: np.ndarray, target: np.ndarray, key: np.ndarray, q: float,
                   budget: float) -> np.ndarray:
    """Per row, replace ``k`` by ``target`` in the order of ``key`` (ascending) until the squared offset from
    ``a0`` fits ``budget``: the fewest replacements in that order."""
    d2 = (k * q - a0) ** 2
    need = d2.sum(axis=1) - budget
    rows = need > 0
    if not rows.any():
        return k
    gain = d2 - (target * q - a0) ** 2
    order = np.argsort(key, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(gain, order, axis=1), axis=1)
    count = np.where(rows, (cum < need[:, None]).sum(axis=1) + 1, 0)
    chosen = np.zeros_like(k, dtype=bool)
    np.put_along_axis(chosen, order, np.arange(k.shape[1])[None, :] < count[:, None], axis=1)
    return np.where(chosen, target, k)


# --- surrogates --------------------------------------------------------------------------------------------------
def decision_members(file: DetectorFile, decision: str | None = None) -> list[tuple[str, float]]:
    """(member name, its reject threshold) of the decision detector (default: the file's)."""
    cd = file.get(decision or file.decision)
    if cd.name in COMBINED_DETECTORS:
        return [(m, file.get(m).reject_threshold) for m in cd.params["members"]]
    return [(cd.name, cd.reject_threshold)]


@dataclass
class _Pass:
    """One forward pass the member surrogates share: the input, its logits, softmax and hidden activations."""

    x: Tensor
    z: Tensor
    p: Tensor
    hidden: dict[str, Tensor]
    copies: Tensor  # softmax of the squeeze/noise copies [copies, N, classes], from one extra forward pass


def _pool(t: Tensor) -> Tensor:
    """Torch twin of ``_features.pooled``: [N, D] as float64; spatial axes averaged."""
    t = t.double()
    if t.dim() == 1:
        return t[:, None]
    return t.reshape(t.shape[0], t.shape[1], -1).mean(dim=2) if t.dim() > 2 else t


class Surrogate:
    """Differentiable torch versions of a detector file's detectors, for one batch shape.

    ``names`` are the members to score; ``decision`` (default: the file's) is the detector whose combined
    statistic :meth:`combined` computes. Each member becomes a small closure built once from its parameters.
    """

    def __init__(self, torch_model: torch.nn.Module, file: DetectorFile, names: Sequence[str],
                 shape: tuple[int, ...], *, noise_draws: int = 4, seed: int = 1234,
                 noise: Literal["own", "file"] = "own", decision: str | None = None,
                 fisher_temperature: float = FISHER_TEMPERATURE) -> None:
        import torch

        self.torch: ModuleType = torch
        self.model, self.names = torch_model, list(names)
        self.params = {n: file.get(n).params for n in self.names}
        self.layers = list(dict.fromkeys(layer for n in self.names if n in ("mahalanobis", "lid")
                                         for layer in self.params[n]["layers"]))
        self._forward_with: Callable[..., tuple[Tensor, dict[str, Tensor]]] | None = getattr(
            torch_model, "forward_with", None)
        if self.layers and self._forward_with is None:
            raise UnsupportedModelError("the mahalanobis and lid surrogates need the model's hidden activations: "
                                        "pass the module onnx_to_torch made of the model with hidden outputs")
        self._copy_makers: list[tuple[str, Callable[[Tensor], Tensor]]] = []
        self._scorers: dict[str, Callable[[_Pass], Tensor]] = {}
        for name in self.names:
            builder = _BUILDERS.get(name)
            if builder is None:
                raise InvalidArgumentError(f"no differentiable surrogate for detector {name!r}")
            builder(self, self.params[name], shape=shape, noise_draws=noise_draws, seed=seed, noise=noise)
        self.decision = file.get(decision or file.decision)
        self._combine = _combiner(torch, file, self.decision, fisher_temperature)

    # -- the pass
    def scores(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and per-member surrogate scores; ``x`` must require grad (for the gradient member)."""
        torch = self.torch
        F = torch.nn.functional
        if self.layers and self._forward_with is not None:
            z, hidden = self._forward_with(x, self.layers)
        else:
            z, hidden = self.model(x), {}
        p = F.softmax(z, dim=1)
        copies = p[:0]
        if self._copy_makers:  # every squeeze and noise copy in one forward pass
            made = [make(x) for _, make in self._copy_makers]
            copies = F.softmax(self.model(torch.cat(made)), dim=1).reshape(len(made), *p.shape)
        pas = _Pass(x, z, p, hidden, copies)
        return z, {name: fn(pas) for name, fn in self._scorers.items()}

    def combined(self, scores: Mapping[str, Tensor]) -> Tensor:
        """The decision detector's statistic from its members' surrogate scores, ÷ its reject threshold."""
        out: Tensor = self._combine(scores) / max(self.decision.reject_threshold, 1e-12)
        return out

    def _add_copies(self, name: str, makers: Sequence[Callable[[Tensor], Tensor]]) -> slice:
        start = len(self._copy_makers)
        self._copy_makers += [(name, m) for m in makers]
        return slice(start, len(self._copy_makers))


def _squeeze(sur: Surrogate, prm: dict[str, Any], **_: Any) -> None:
    torch = sur.torch
    lo, hi = prm["value_range"]
    makers: list[Callable[[Tensor], Tensor]] = []
    if prm.get("bits") is not None:
        levels = 2 ** int(prm["bits"]) - 1

        def bits(x: Tensor) -> Tensor:
            q = torch.round(((x - lo) / (hi - lo)).clamp(0.0, 1.0) * levels) / levels * (hi - lo) + lo
            return x + (q - x).detach()  # BPDA: rounding forward, identity backward
        makers.append(bits)
    if prm.get("median") is not None:
        size, image_shape = int(prm["median"]), prm["image_shape"]
        makers.append(lambda x: _median_smooth(torch, x, size, image_shape))
    rows = sur._add_copies("squeeze", makers)

    def score(ps: _Pass) -> Tensor:
        return (ps.p[None] - ps.copies[rows]).abs().sum(2).amax(0)
    sur._scorers["squeeze"] = score


def _noise(sur: Surrogate, prm: dict[str, Any], *, shape: tuple[int, ...], noise_draws: int, seed: int,
           noise: str, **_: Any) -> None:
    torch = sur.torch
    if noise == "file" and prm.get("seed") is not None:  # the detector's own patterns, as NoiseDetector draws them
        pattern = np.random.default_rng(int(prm["seed"])).normal(0.0, float(prm["sigma"]),
                                                                  size=(int(prm["samples"]), 1, *shape[1:]))
        draws = torch.from_numpy(pattern.astype(np.float32))
    elif noise in ("own", "file"):
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randn((noise_draws, 1, *shape[1:]), generator=gen) * float(prm["sigma"])
    else:
        raise InvalidArgumentError(f"noise must be 'own' or 'file', not {noise!r}")
    vr = prm.get("value_range")

    def maker(d: Tensor) -> Callable[[Tensor], Tensor]:
        def noisy(x: Tensor) -> Tensor:
            xn = x + d
            return xn.clamp(vr[0], vr[1]) if vr else xn
        return noisy
    rows = sur._add_copies("noise", [maker(d) for d in draws])
    sur._scorers["noise"] = lambda ps: (ps.p[None] - ps.copies[rows]).abs().sum(2).mean(0)


def _reconstruction(sur: Surrogate, prm: dict[str, Any], **_: Any) -> None:
    torch = sur.torch
    mean = torch.tensor(prm["mean"], dtype=torch.float64)
    comps = torch.tensor(prm["components"], dtype=torch.float64)
    l1 = prm["norm"] == "l1"

    def score(ps: _Pass) -> Tensor:
        c = ps.x.reshape(len(ps.x), -1).double() - mean
        r = c - (c @ comps.T) @ comps
        return r.abs().sum(1) if l1 else r.norm(dim=1)
    sur._scorers["reconstruction"] = score


def _gradient(sur: Surrogate, prm: dict[str, Any], **_: Any) -> None:
    torch = sur.torch
    F = torch.nn.functional
    norm = prm.get("norm", "l2")

    def score(ps: _Pass) -> Tensor:
        ce = F.cross_entropy(ps.z, ps.z.detach().argmax(1), reduction="sum")
        (g,) = torch.autograd.grad(ce, ps.x, create_graph=True)  # double backprop
        g = g.reshape(len(ps.x), -1)
        return g.abs().sum(1) if norm == "l1" else g.norm(dim=1) if norm == "l2" else g.abs().amax(1)
    sur._scorers["gradient"] = score


def _standardised(torch: ModuleType, prm: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return (torch.tensor(prm["centre"], dtype=torch.float64), torch.tensor(prm["scale"], dtype=torch.float64))


def _mahalanobis(sur: Surrogate, prm: dict[str, Any], **_: Any) -> None:
    torch = sur.torch
    layers = [str(n) for n in prm["layers"]]
    means = [torch.from_numpy(decode_array(m, "mahalanobis means")) for m in prm["means"]]
    precs = [torch.from_numpy(decode_array(p, "mahalanobis precisions")) for p in prm["precisions"]]
    centre, scale = _standardised(torch, prm)

    mean_terms = [torch.einsum("cd,de,ce->c", m, p, m) for m, p in zip(means, precs, strict=True)]

    def score(ps: _Pass) -> Tensor:
        per = []
        for name, mu, prec, mterm in zip(layers, means, precs, mean_terms, strict=True):
            f = _pool(ps.hidden[name])
            fp = f @ prec  # (f - mu_c)' P (f - mu_c) for every class at once, as MahalanobisDetector expands it
            d2 = (fp * f).sum(1)[:, None] - 2.0 * fp @ mu.T + mterm[None, :]
            per.append(d2.amin(1).clamp(min=0.0))
        return ((torch.stack(per, 1) - centre) / scale).sum(1)
    sur._scorers["mahalanobis"] = score


def _lid(sur: Surrogate, prm: dict[str, Any], **_: Any) -> None:
    torch = sur.torch
    layers = [str(n) for n in prm["layers"]]
    samples = [torch.from_numpy(decode_array(s, "lid samples")) for s in prm["samples"]]
    k = int(prm["k"])
    centre, scale = _standardised(torch, prm)

    def layer_lid(q: Tensor, s: Tensor) -> Tensor:
        with torch.no_grad():  # which k + 1 sample rows are nearest, by lid_mle's own arithmetic
            qq, ss = (q * q).sum(1)[:, None], (s * s).sum(1)[None, :]
            d2 = (qq + ss - 2.0 * q @ s.T).clamp(min=0.0)
            d2 = torch.where(d2 <= 1e-12 * (qq + ss), torch.zeros_like(d2), d2)  # round-off around exact matches
            near2, idx = torch.topk(d2, k + 1, dim=1, largest=False)  # ascending
            self_hit = near2[:, :1] == 0.0  # the query itself: skipped, as lid_mle does
        # The selected distances again, differentiably (the gradient flows through the k nearest only).
        sel = ((q[:, None, :] - s[idx]) ** 2).sum(2)
        sel = torch.where(self_hit, sel[:, 1:], sel[:, :k])
        near = sel.clamp(min=1e-30).sqrt()
        neg_log = -(near / near[:, -1:]).log().sum(1)  # >= 0
        return (k / neg_log.clamp(min=k / 1e12)).clamp(max=1e12)

    def score(ps: _Pass) -> Tensor:
        per = [layer_lid(_pool(ps.hidden[n]), s) for n, s in zip(layers, samples, strict=True)]
        return ((torch.stack(per, 1) - centre) / scale).sum(1)
    sur._scorers["lid"] = score


_BUILDERS: dict[str, Callable[..., None]] = {
    "squeeze": _squeeze, "noise": _noise, "reconstruction": _reconstruction, "gradient": _gradient,
    "mahalanobis": _mahalanobis, "lid": _lid,
}


def _combiner(torch: ModuleType, file: DetectorFile, decision: Any,
              temperature: float) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """The decision detector's statistic over its members' surrogate scores (unscaled)."""
    if decision.name not in COMBINED_DETECTORS:
        return lambda scores: scores[decision.name]
    members = list(decision.params["members"])
    if decision.params.get("combine", "max") == "max":
        scales = [max(float(s), 1e-12) for s in decision.params["scales"]]
        return lambda scores: torch.stack([scores[m] / s for m, s in zip(members, scales, strict=True)]).amax(0)
    clean = [torch.tensor(np.asarray(c, dtype=np.float64)) for c in decision.params["clean_scores"]]
    temps = [max(temperature * float(c.std()), 1e-12) for c in clean]

    def fisher(scores: Mapping[str, Tensor]) -> Tensor:
        logs = []
        for m, c, t in zip(members, clean, temps, strict=True):
            s = scores[m].double()
            p = (1.0 + torch.sigmoid((c[None, :] - s[:, None]) / t).sum(1)) / (len(c) + 1.0)
            logs.append(p.log())
        return -2.0 * torch.stack(logs).sum(0)
    return fisher


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


# --- the attack ----------------------------------------------------------------------------------------------------
@dataclass
class AdaptiveResult:
    x_adv: np.ndarray  # the strongest configuration's examples
    best: dict[str, Any]  # the strongest configuration and its figures
    sweep: list[dict[str, Any]] = field(default_factory=list)
    examples: list[np.ndarray] = field(default_factory=list)  # one per sweep row, same order
    broken: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # any row's example got through


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
    penalties: Sequence[str] | None = None,
    noise_draws: int = 4,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    norm: Norm = "Linf",
    decision: str | None = None,
    smoothing: SmoothingConfig | None = None,
    eot_draws: int = 8,
    judge: Judge | None = None,
    noise: Literal["own", "file"] = "own",
    fisher_temperature: float = FISHER_TEMPERATURE,
) -> AdaptiveResult:
    """Run the adaptive attack over a λ × loss × penalty sweep on correctly classified ``x`` (labels ``y``).

    ``eps``/``step`` are in ``norm`` units (L∞: signed-gradient steps; L2: steps along g/‖g‖₂, projection onto
    the ball ∩ [min, max]). ``quantum`` defaults to the input spec's; ``spec`` (default: the file's) is what
    validation means. ``decision`` names the file's decision detector (default ``file.decision``); its members
    get surrogates and ``decision_detector`` (the real one) judges it. ``penalties`` defaults to sum and hinge,
    plus combined for a fisher decision. ``smoothing``: the loss is on the mean softmax of ``eot_draws`` fresh
    Gaussian copies per step (sigma = smoothing.sigma), and the default judge answers by smoothing's PREDICT
    (an abstention counts as rejected). ``judge`` replaces the default judge: called on float32 numpy iterates
    once per iteration and once more on each configuration's kept examples, it answers (misclassified, valid,
    rejected). The headline is the configuration with the highest end-to-end success (misclassified ∧ valid ∧
    not rejected); ``broken`` marks the inputs some configuration's kept example got through with.
    """
    import torch

    if not eps > 0 or not step > 0 or iters < 1:
        raise InvalidArgumentError("the adaptive attack needs eps > 0, step > 0 and at least one iteration")
    if norm not in ("Linf", "L2"):
        raise InvalidArgumentError(f"norm must be Linf or L2, not {norm!r}")
    if eot_draws < 1:
        raise InvalidArgumentError("eot_draws must be at least 1")
    decision = decision or detector_file.decision
    calibrated = detector_file.get(decision)
    penalties = tuple(penalties) if penalties is not None else (
        ("sum", "hinge", "combined") if calibrated.params.get("combine") == "fisher" else ("sum", "hinge"))
    unknown = [p for p in penalties if p not in PENALTIES] + [loss for loss in losses if loss not in ("ce", "margin")]
    if unknown:
        raise InvalidArgumentError(f"unknown penalty or loss {unknown[0]!r}; penalties: {', '.join(PENALTIES)}; "
                                   "losses: ce, margin")
    spec = spec or detector_file.input_spec
    quantum = spec.quantum if quantum is None else quantum
    clf = session_or_clf if isinstance(session_or_clf, OnnxClassifier) else OnnxClassifier(session_or_clf)
    members = decision_members(detector_file, decision)
    x = np.ascontiguousarray(x, dtype=np.float32)
    sur = Surrogate(torch_model, detector_file, [m for m, _ in members], x.shape, noise_draws=noise_draws,
                    seed=1234 + seed, noise=noise, decision=decision, fisher_temperature=fisher_temperature)
    box = (spec.min, spec.max)
    grid: _Grid | None = None
    if quantum:
        def grid(x0: np.ndarray, v: np.ndarray) -> np.ndarray:
            return project_to_grid(x0, v, norm=norm, eps=eps, quantum=float(quantum), lo=box[0], hi=box[1])
        grid(x, x)  # a budget without a grid point fails here, typed, before any work

    y = np.asarray(y)
    rows_judge = (_default_judge(clf, spec, decision_detector, calibrated.reject_threshold, y, smoothing)
                  if judge is None else _UserJudge(judge, len(x)))
    attack = _Attack(torch, sur, x, y, dict(members), norm, eps, step, iters, box, grid, rows_judge,
                     None if smoothing is None else smoothing.sigma, eot_draws, seed)

    was_training = torch_model.training
    torch_model.eval()
    sweep: list[dict[str, Any]] = []
    examples: list[np.ndarray] = []
    broken = np.zeros(len(x), dtype=bool)
    best_at = -1
    configs = [(loss_kind, pen_kind, lam) for loss_kind in losses for pen_kind in penalties for lam in lambdas
               if not (lam == 0 and pen_kind != penalties[0])]  # λ = 0 has no penalty: one run per loss is enough
    try:
        for step_no, (loss_kind, pen_kind, lam) in enumerate(configs):
            report(progress, "adaptive attack sweep", step_no, len(configs),
                   note=f"{loss_kind} loss, {pen_kind} penalty, λ={lam:g}")
            t0 = time.perf_counter()
            x_adv = attack.run(float(lam), loss_kind, pen_kind)
            mis, ok, rej = rows_judge(x_adv, np.arange(len(x)))
            through = mis & ok & ~rej
            broken |= through
            row: dict[str, Any] = {"lambda": float(lam), "loss": loss_kind, "penalty": pen_kind,
                   "success": float(mis.mean()),
                   "detection_rate": float(rej[mis].mean()) if mis.any() else None,
                   "validation_reject_rate": float((~ok)[mis].mean()) if mis.any() else None,
                   "end_to_end_success": float(through.mean()),
                   "seconds": time.perf_counter() - t0}
            sweep.append(row)
            examples.append(x_adv)
            if best_at < 0 or row["end_to_end_success"] > sweep[best_at]["end_to_end_success"]:
                best_at = len(sweep) - 1
        report(progress, "adaptive attack sweep", len(configs), len(configs))
    finally:
        torch_model.train(was_training)
    if best_at < 0:  # no configuration ran
        raise InvalidArgumentError("the adaptive attack needs at least one loss, one penalty and one λ")
    best = dict(sweep[best_at]) | {"eps": eps, "step": step, "iters": iters, "quantum": quantum, "norm": norm,
                                   "noise_draws": noise_draws, "members": [m for m, _ in members],
                                   "decision": decision, "smoothing_sigma": None if smoothing is None
                                   else smoothing.sigma, "eot_draws": eot_draws if smoothing else None}
    return AdaptiveResult(examples[best_at], best, sweep, examples, broken)


# Judging some rows of the batch: (iterates of those rows, their indices) -> (misclassified, valid, rejected).
_RowsJudge = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
_Grid = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x0 rows, iterates) -> their grid points


def _default_judge(clf: OnnxClassifier, spec: InputSpec, detector: Detector, threshold: float, y: np.ndarray,
                   smoothing: SmoothingConfig | None) -> _RowsJudge:
    """The real model (or smoothing's PREDICT), the real decision detector and the real spec, per example."""
    smoothed = None if smoothing is None else SmoothedClassifier(clf, smoothing)

    def judge(xn: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ok = valid_mask(spec, xn)
        rej = detector.scores(xn) > threshold
        if smoothed is None:
            return clf.predict(xn) != y[rows], ok, rej
        pred = smoothed.predict(xn)
        return (pred != y[rows]) & (pred != ABSTAIN), ok, rej | (pred == ABSTAIN)
    return judge


class _UserJudge:
    """A caller's judge sees the whole batch every time: rows not being judged hold their last iterate."""

    def __init__(self, judge: Judge, n: int) -> None:
        self.judge, self.n = judge, n
        self.current: np.ndarray | None = None

    def __call__(self, xn: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(rows) == self.n or self.current is None:  # the attack judges the whole batch first
            full = xn
        else:
            full = self.current.copy()
            full[rows] = xn
        self.current = full
        out = tuple(np.asarray(v, dtype=bool).reshape(-1) for v in self.judge(np.ascontiguousarray(full,
                                                                                                  np.float32)))
        if len(out) != 3 or any(len(v) != self.n for v in out):
            raise InvalidArgumentError("a judge must answer (misclassified, valid, rejected), one bool per input")
        return out[0][rows], out[1][rows], out[2][rows]


class _Attack:
    """One batch under attack: the budget, the projection and the judge, run once per configuration.

    Inputs whose example already got through drop out of the batch: later steps neither move nor re-judge them.
    """

    def __init__(self, torch: ModuleType, sur: Surrogate, x: np.ndarray, y: np.ndarray, taus: dict[str, float],
                 norm: Norm, eps: float, step: float, iters: int, box: tuple[float | None, float | None],
                 grid: _Grid | None, judge: _RowsJudge, sigma: float | None, eot_draws: int, seed: int) -> None:
        self.torch, self.sur, self.judge = torch, sur, judge
        self.x0_np = x
        self.x0 = torch.from_numpy(x)
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.taus, self.norm, self.eps, self.step, self.iters = taus, norm, eps, step, iters
        self.lo_v = -math.inf if box[0] is None else float(box[0])
        self.hi_v = math.inf if box[1] is None else float(box[1])
        self.grid, self.sigma, self.eot_draws = grid, sigma, eot_draws
        self.gen = torch.Generator().manual_seed(4321 + seed)  # the attacker's EOT noise, fresh draws every step

    def project(self, v: Tensor, x0: Tensor) -> Tensor:
        """Into the budget around x0 and [min, max] (continuous)."""
        torch = self.torch
        d = v - x0
        if self.norm == "Linf":
            d = d.clamp(-self.eps, self.eps)
        else:
            n = d.reshape(len(d), -1).norm(dim=1).clamp(min=1e-12)
            d = d * (self.eps / n).clamp(max=1.0).reshape(-1, *([1] * (d.dim() - 1)))
        return torch.clamp(x0 + d, self.lo_v, self.hi_v)  # clipping towards x0 (inside) stays in the ball

    def loss(self, z: Tensor, xin: Tensor, y: Tensor, loss_kind: str) -> Tensor:
        torch = self.torch
        F = torch.nn.functional
        if self.sigma is not None:  # EOT over the smoothing noise: log of the mean softmax of noisy copies
            noise = torch.randn((self.eot_draws, *xin.shape), generator=self.gen) * self.sigma
            copies = (xin[None] + noise).reshape(-1, *xin.shape[1:])
            probs = F.softmax(self.sur.model(copies), dim=1).reshape(self.eot_draws, len(xin), -1).mean(0)
            z = probs.clamp(min=1e-12).log()
        if loss_kind == "ce":
            return F.cross_entropy(z, y, reduction="none")
        zy = z.gather(1, y[:, None])[:, 0]
        other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -1e9).amax(1)
        return (other - zy).clamp(max=MARGIN_CAP)

    def penalty(self, scores: dict[str, Tensor], pen_kind: str) -> Tensor:
        torch = self.torch
        if pen_kind == "combined":
            return self.sur.combined(scores)
        ratios = [scores[n].double() / max(self.taus[n], 1e-12) for n in scores]
        if pen_kind == "sum":
            return torch.stack(ratios).sum(0)
        return torch.stack([torch.nn.functional.relu(r - HINGE_AT) for r in ratios]).sum(0)

    def gradient(self, x: Tensor, y: Tensor, lam: float, loss_kind: str, pen_kind: str) -> Tensor:
        torch = self.torch
        x = x.requires_grad_(True)
        with torch.enable_grad():
            if lam:
                z, scores = self.sur.scores(x)
                objective = self.loss(z, x, y, loss_kind).double() - lam * self.penalty(scores, pen_kind)
            else:  # no penalty: the surrogates' extra passes are not needed
                objective = self.loss(self.sur.model(x), x, y, loss_kind).double()
            (grad,) = torch.autograd.grad(objective.sum(), x)
        return grad

    def run(self, lam: float, loss_kind: str, pen_kind: str) -> np.ndarray:
        torch = self.torch
        x = self.x0.clone()
        kept = self.x0_np.copy() if self.grid is None else self.grid(self.x0_np, self.x0_np)
        done = np.zeros(len(x), dtype=bool)
        for it in range(self.iters + 1):
            act = np.flatnonzero(~done)
            xa, x0a = x[act], self.x0[act]
            xn = xa.numpy().astype(np.float32) if self.grid is None else self.grid(self.x0_np[act], xa.numpy())
            mis, ok, rej = self.judge(xn, act)
            win = mis & ok & ~rej
            kept[act] = xn  # the latest iterate, or the one that got through
            done[act[win]] = True
            if it == self.iters or done.all():
                break
            go = ~win
            act, xa, x0a, xq = act[go], xa[go], x0a[go], torch.from_numpy(xn[go])
            xin = xa + (xq - xa).detach()  # forward at the grid point, straight-through
            grad = self.gradient(xin, self.y[act], lam, loss_kind, pen_kind)
            if self.norm == "Linf":
                move = grad.sign()
            else:
                g = grad.reshape(len(grad), -1)
                move = (g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)).reshape(grad.shape)
            x[act] = self.project(xa + self.step * move.to(xa.dtype), x0a).detach()
        return kept
