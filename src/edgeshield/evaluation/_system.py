"""The system evaluation: the whole defence (input spec, calibrated detectors, optional smoothing, the model) under a
suite of attacks, per input, with confidence intervals.

A *system* is what a device runs: an ONNX Runtime session (with the hidden outputs its feature detectors read), the
detector file calibrated for it, the decision detector (by default the file's) and optionally randomized smoothing.
Each evaluation input meets a suite of attacks at one budget:

* the standard AutoAttack (``_autoattack.autoattack_examples``) on the bare model, its continuous examples then
  projected onto the input spec's grid inside the budget (``_adaptive.project_to_grid``): an attacker who knows
  only the model and the input format;
* the adaptive white-box attack (``_adaptive.adaptive_attack``) that knows every layer — BPDA through squeezing and
  the grid, EOT over the noise detector and over smoothing, the decision detector's surrogate in the loss — over its
  whole sweep (every configuration, not only the strongest, counts);
* the unperturbed input itself (a clean error the system accepts is broken at no cost).

An input is **broken** when any example of any attack is valid, neither rejected nor abstained on, and answered
with a wrong label. Reported per budget: **system robust accuracy**, the share of all evaluation inputs that are
not broken (answered correctly or refused, whatever the attacker did), and **end-to-end attack success**, the
share of the inputs the system answers correctly when clean that the suite breaks. Clean accuracy (the model's and
the system's: accepted and correct) and the measured FPR (clean evaluation inputs refused: invalid, rejected or
abstained) sit beside them. Every rate carries a 95 % Clopper–Pearson interval.

The verdicts always come from the real runtime: ``RobustModel.decide`` (numpy + ONNX Runtime, smoothing with fresh
OS-seeded noise) and ``InputSpec.validate``; the surrogates only steer the attack.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgeshield._progress import ProgressCallback, report
from edgeshield.adversarial._calibrate import DetectorFile
from edgeshield.adversarial._robust import ABSTAIN, REJECT, RobustModel
from edgeshield.adversarial._smoothing import SmoothingConfig
from edgeshield.errors import InvalidArgumentError
from edgeshield.evaluation._adaptive import adaptive_attack, project_to_grid, valid_mask
from edgeshield.evaluation._autoattack import autoattack_examples, clopper_pearson_interval

if TYPE_CHECKING:
    import torch

    from edgeshield.bundles._ort import onnxruntime

Norm = Literal["Linf", "L2"]


@dataclass(frozen=True)
class Budget:
    """One threat model: a norm and a radius in input units (inputs in [0, 1])."""

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in ("Linf", "L2"):
            raise InvalidArgumentError(f"a budget's norm is Linf or L2, not {self.norm!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, int | float) or not np.isfinite(self.eps) \
                or self.eps <= 0:
            raise InvalidArgumentError(f"a budget's eps must be a positive finite number, not {self.eps!r}")
        if self.norm == "Linf" and self.eps >= 1:
            raise InvalidArgumentError(f"an Linf budget of {self.eps} covers the whole [0, 1] value range")

    @property
    def _eps_text(self) -> str:
        """L∞ in grey levels (k/16) where it is one, else a small fraction; L2 as a decimal."""
        if self.norm == "L2":
            return f"{self.eps:g}"
        levels = self.eps * 16
        if abs(levels - round(levels)) < 1e-9:
            return f"{round(levels)}/16"
        frac = Fraction(self.eps).limit_denominator(64)
        return f"{frac.numerator}/{frac.denominator}" if abs(float(frac) - self.eps) < 1e-9 else f"{self.eps:g}"

    @property
    def key(self) -> str:
        """``linf_2_16`` / ``l2_1``: for flat figure names."""
        return f"{self.norm.lower()}_{self._eps_text.replace('/', '_').replace('.', '_')}"

    @property
    def label(self) -> str:
        return f"{'L∞' if self.norm == 'Linf' else 'L2'} {self._eps_text}"

    @classmethod
    def parse(cls, text: str) -> Budget:
        """The CLI form ``linf:2/16`` or ``l2:1.0`` (a fraction or a decimal)."""
        m = re.fullmatch(r"\s*(linf|l2)\s*:\s*([0-9]+(?:\.[0-9]*)?)(?:\s*/\s*([0-9]+))?\s*", text, re.IGNORECASE)
        if not m:
            raise InvalidArgumentError(f"a budget is norm:eps such as linf:2/16 or l2:1.0, not {text!r}")
        if m.group(3) is not None and int(m.group(3)) == 0:
            raise InvalidArgumentError(f"budget {text!r} divides by zero")
        eps = float(m.group(2)) / (int(m.group(3)) if m.group(3) else 1)
        return cls("Linf" if m.group(1).lower() == "linf" else "L2", eps)


BUDGETS = (Budget("Linf", 1 / 16), Budget("Linf", 2 / 16), Budget("Linf", 3 / 16), Budget("L2", 1.0))
HEADLINE = Budget("Linf", 2 / 16)


@dataclass
class DefendedSystem:
    """What a device runs, plus the torch twin of its model for the white-box attacks."""

    name: str
    session: onnxruntime.InferenceSession
    torch_model: torch.nn.Module
    detector_file: DetectorFile
    decision: str | None = None  # default: the file's decision detector
    smoothing: SmoothingConfig | None = None

    def __post_init__(self) -> None:
        self.decision = self.decision or self.detector_file.decision
        self.robust = RobustModel(self.session, self.detector_file, torch_model=self.torch_model,
                                  detector=self.decision, smoothing=self.smoothing)
        self.spec = self.detector_file.input_spec

    def judge(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(misclassified, valid, refused) per input, from the real runtime.

        Refused = rejected by the decision detector or, with smoothing, abstained on. ``misclassified`` is the
        system's answer where it answers and the bare model's where it refuses (so that an attack's raw success
        stays visible); invalid inputs are never scored (validation stops them first).
        """
        x = np.asarray(x, dtype=np.float32)
        ok = valid_mask(self.spec, x)
        mis = np.zeros(len(x), dtype=bool)
        refused = np.zeros(len(x), dtype=bool)
        if ok.any():
            d = self.robust.decide(x[ok])
            refused[ok] = (d.verdicts == REJECT) | (d.verdicts == ABSTAIN)
            answered = ~refused[ok]
            idx = np.flatnonzero(ok)[answered]
            mis[idx] = d.predictions[answered] != y[idx]
        unanswered = ~ok | refused  # the bare model only where the system gives no answer of its own
        if unanswered.any():
            mis[unanswered] = self.robust.clf.predict(x[unanswered]) != y[unanswered]
        return mis, ok, refused

    def broken(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        mis, ok, refused = self.judge(x, y)
        return np.asarray(mis & ok & ~refused)


@dataclass(frozen=True)
class SuiteConfig:
    """The attack suite's effort: the adaptive sweep is λ × loss × penalty (λ = 0 once per loss), 40 iterations.

    Two penalty shapes: ``combined`` (the decision detector's own statistic, smoothed, ÷ its threshold) and
    ``hinge`` (per member, score ÷ its threshold past 0.9), which keeps pushing where the smooth Fisher statistic
    saturates; ``sum`` can be added at proportional cost. ``quick``: 20 iterations, three λ, cross-entropy, the
    combined penalty only.
    """

    iters: int = 40
    step_fraction: float = 0.125  # PGD step as a fraction of eps (Linf per coordinate, L2 in norm)
    lambdas: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0)
    losses: tuple[str, ...] = ("ce", "margin")
    penalties: tuple[str, ...] = ("combined", "hinge")
    eot_draws: int = 8
    noise: Literal["own", "file"] = "file"  # the noise detector's own seeded draws: the attacker read the file
    autoattack: bool = True
    autoattack_iterations: int | None = None  # None: torchattacks' AutoAttack (10 steps); 100: the reference's
    seed: int = 0

    @classmethod
    def quick(cls) -> SuiteConfig:
        return cls(iters=20, lambdas=(0.0, 0.3, 1.0), losses=("ce",), penalties=("combined",), eot_draws=4)


def _rate(k: int, n: int) -> dict[str, float | int | None]:
    if n == 0:
        return {"rate": None, "ci_low": None, "ci_high": None, "k": 0, "n": 0}
    low, high = clopper_pearson_interval(k, n)
    return {"rate": k / n, "ci_low": low, "ci_high": high, "k": k, "n": n}


@dataclass
class BudgetResult:
    budget: Budget
    system_robust_accuracy: dict[str, Any]  # over all n inputs
    end_to_end_success: dict[str, Any]  # over the inputs answered correctly when clean
    model_robust_accuracy: dict[str, Any] | None  # AutoAttack on the bare model, continuous (no grid, no detectors)
    per_attack: dict[str, dict[str, Any]]  # attack -> end-to-end success alone, and what it found
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget.label, "norm": self.budget.norm, "eps": self.budget.eps,
                "system_robust_accuracy": self.system_robust_accuracy,
                "end_to_end_success": self.end_to_end_success, "model_robust_accuracy": self.model_robust_accuracy,
                "per_attack": self.per_attack, "seconds": self.seconds}


@dataclass
class SystemResult:
    name: str
    decision: str
    smoothing: str | None
    n: int
    model_clean_accuracy: dict[str, Any]
    system_clean_accuracy: dict[str, Any]  # answered and correct
    fpr: dict[str, Any]  # clean inputs refused (invalid, rejected or abstained)
    budgets: list[BudgetResult] = field(default_factory=list)
    suite: dict[str, Any] = field(default_factory=dict)

    def budget(self, budget: Budget) -> BudgetResult:
        for b in self.budgets:
            if b.budget == budget:
                return b
        raise KeyError(budget.label)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "decision": self.decision, "smoothing": self.smoothing, "n": self.n,
                "model_clean_accuracy": self.model_clean_accuracy,
                "system_clean_accuracy": self.system_clean_accuracy, "fpr": self.fpr,
                "budgets": [b.to_dict() for b in self.budgets], "suite": self.suite}


def evaluate_system(system: DefendedSystem, x: np.ndarray, y: np.ndarray, budgets: Sequence[Budget] = BUDGETS, *,
                    suite: SuiteConfig | None = None,
                    progress: ProgressCallback | None = None) -> SystemResult:
    """Attack ``system`` on held-out ``x``/``y`` (not its calibration data) at each budget; see the module doc."""
    suite = suite or SuiteConfig()
    spec = system.spec
    x = spec.validate(np.asarray(x))
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgumentError("labels must be a 1-D integer array with one label per evaluation input")
    if not budgets:
        raise InvalidArgumentError("the system evaluation needs at least one budget")
    x = x.astype(np.float32)
    y = y.astype(np.int64)
    n = len(x)
    model_correct = system.robust.clf.predict(x) == y
    mis0, ok0, refused0 = system.judge(x, y)
    answered_correct = ok0 & ~refused0 & ~mis0
    broken0 = mis0 & ok0 & ~refused0
    result = SystemResult(
        name=system.name, decision=str(system.decision),
        smoothing=system.smoothing.to_text() if system.smoothing else None, n=n,
        model_clean_accuracy=_rate(int(model_correct.sum()), n),
        system_clean_accuracy=_rate(int(answered_correct.sum()), n),
        fpr=_rate(int((~ok0 | refused0).sum()), n),
        suite=dataclasses.asdict(suite))
    lo = spec.min if spec.min is not None else 0.0
    hi = spec.max if spec.max is not None else 1.0
    steps = len(budgets) * (2 if suite.autoattack else 1)
    done = 0
    for budget in budgets:
        began = time.perf_counter()
        broken = broken0.copy()
        per_attack: dict[str, dict[str, Any]] = {}
        model_robust = None
        if suite.autoattack:
            report(progress, f"attack {system.name}", done, steps, note=f"AutoAttack, {budget.label}")
            run = autoattack_examples(system.torch_model, x, y, norm=budget.norm, eps=budget.eps, seed=suite.seed,
                                      iterations=suite.autoattack_iterations)
            model_robust = _rate(int((run.clean_pred == y).sum() - _flipped(system, run.x_adv, y, run.clean_pred)),
                                 n)
            xa = run.x_adv
            if spec.quantum:
                xa = project_to_grid(x, xa, norm=budget.norm, eps=budget.eps, quantum=spec.quantum, lo=lo, hi=hi)
            hit = system.broken(xa, y)
            per_attack["autoattack"] = {**_rate(int((hit & answered_correct).sum()), int(answered_correct.sum())),
                                        "seconds": run.seconds, "variant": run.variant,
                                        "projected_to_grid": bool(spec.quantum)}
            broken |= hit
            done += 1
        report(progress, f"attack {system.name}", done, steps, note=f"adaptive sweep, {budget.label}")
        adaptive = adaptive_attack(
            system.torch_model, system.robust.clf, system.detector_file, system.robust.detector, x, y,
            eps=budget.eps, step=budget.eps * suite.step_fraction, iters=suite.iters, norm=budget.norm,
            decision=system.decision, smoothing=system.smoothing, eot_draws=suite.eot_draws,
            lambdas=suite.lambdas, losses=suite.losses, penalties=suite.penalties, seed=suite.seed, noise=suite.noise,
            judge=lambda xn: system.judge(xn, y))
        hits = [system.broken(e, y) for e in adaptive.examples]  # re-judged: smoothing draws afresh
        hit = np.any(hits, axis=0) if hits else np.zeros(n, dtype=bool)
        best = int(np.argmax([int((h & answered_correct).sum()) for h in hits])) if hits else 0
        per_attack["adaptive"] = {**_rate(int((hit & answered_correct).sum()), int(answered_correct.sum())),
                                  "configurations": len(adaptive.sweep),
                                  "strongest": {k: v for k, v in adaptive.sweep[best].items()
                                                if k in ("lambda", "loss", "penalty")} if hits else None,
                                  "seconds": sum(r["seconds"] for r in adaptive.sweep)}
        broken |= hit
        done += 1
        result.budgets.append(BudgetResult(
            budget=budget,
            system_robust_accuracy=_rate(int((~broken).sum()), n),
            end_to_end_success=_rate(int((broken & answered_correct).sum()), int(answered_correct.sum())),
            model_robust_accuracy=model_robust, per_attack=per_attack, seconds=time.perf_counter() - began))
    report(progress, f"attack {system.name}", steps, steps)
    return result


def _flipped(system: DefendedSystem, x_adv: np.ndarray, y: np.ndarray, clean_pred: np.ndarray) -> int:
    """Inputs the bare model got right that AutoAttack's continuous examples turn wrong (ONNX Runtime's view)."""
    return int(((clean_pred == y) & (system.robust.clf.predict(x_adv.astype(np.float32)) != y)).sum())


def flat_figures(result: SystemResult, prefix: str = "") -> dict[str, Any]:
    """``{prefix}system_robust_accuracy_{budget}`` and friends, each rate with ``_ci_low``/``_ci_high``."""
    out: dict[str, Any] = {}

    def put(name: str, r: dict[str, Any] | None) -> None:
        if r is None:
            return
        out[f"{prefix}{name}"] = r["rate"]
        out[f"{prefix}{name}_ci_low"], out[f"{prefix}{name}_ci_high"] = r["ci_low"], r["ci_high"]

    put("model_clean_accuracy", result.model_clean_accuracy)
    put("system_clean_accuracy", result.system_clean_accuracy)
    put("system_fpr", result.fpr)
    for b in result.budgets:
        k = b.budget.key
        put(f"system_robust_accuracy_{k}", b.system_robust_accuracy)
        put(f"adaptive_end_to_end_success_{k}", b.end_to_end_success)
        put(f"model_autoattack_robust_accuracy_{k}", b.model_robust_accuracy)
        for attack, r in b.per_attack.items():
            put(f"{attack}_alone_end_to_end_success_{k}", r)
    return out


def report_table(results: Sequence[SystemResult], title: str | None = None) -> Any:
    """One rich table: a row per system and budget."""
    from rich.table import Table

    def ci(r: dict[str, Any] | None) -> str:
        if r is None or r["rate"] is None:
            return "-"
        return f"{r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"

    t = Table(title=title or "System evaluation: per-input worst case over AutoAttack (on the grid) and the adaptive "
                             "sweep")
    for col in ("system", "clean acc (model / system)", "FPR", "budget", "model AA robust acc",
                "system robust acc [95% CI]", "end-to-end success [95% CI]"):
        t.add_column(col, justify="left" if col in ("system", "budget") else "right")
    for r in results:
        for i, b in enumerate(r.budgets):
            first = i == 0
            t.add_row(r.name if first else "",
                      f"{r.model_clean_accuracy['rate']:.3f} / {r.system_clean_accuracy['rate']:.3f}" if first else "",
                      ci(r.fpr) if first else "", b.budget.label, ci(b.model_robust_accuracy),
                      ci(b.system_robust_accuracy), ci(b.end_to_end_success))
    return t
