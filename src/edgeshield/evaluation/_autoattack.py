"""The standard AutoAttack (Croce & Hein 2020) as ``torchattacks`` 3.5.1 implements it, and its examples.

``autoattack_examples`` runs APGD-CE, APGD-T, FAB-T and Square one after the other, each on the inputs the previous
ones left correctly classified, and returns the (continuous) adversarial examples; ``autoattack_accuracy`` counts
an input as robust only if all four fail. Two variants:

* ``iterations=None``: ``torchattacks.AutoAttack(version="standard")`` with torchattacks' own defaults, which
  differ from the reference implementation (fra31/auto-attack) in one respect that matters: the three gradient
  attacks run 10 iterations, not 100 (``VARIANT`` names every parameter).
* ``iterations=REFERENCE_ITERATIONS`` (100): the same four torchattacks classes built with the reference
  AutoAttack's ``version='standard'`` parameters (``REFERENCE_VARIANT`` names them and where it still differs:
  torchattacks' ports of the attacks rather than fra31's code, chaining per batch, none of the reference's
  diagnostic checks besides ours).

Either figure is an upper bound on robust accuracy like any attack's. torchattacks is installed with ``--no-deps``
(a plain install pulls torchvision and another torch); torch and torchattacks are imported inside the functions.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgeshield.adversarial._smoothing import clopper_pearson_lower
from edgeshield.errors import EdgeShieldError, InvalidArgumentError, MissingDependencyError

if TYPE_CHECKING:
    import torch

TORCHATTACKS_VERSION = "3.5.1"
INSTALL_LINE = f"pip install --no-deps torchattacks=={TORCHATTACKS_VERSION}"
# What torchattacks 3.5.1's AutoAttack(version="standard") builds (torchattacks/attacks/autoattack.py and each
# attack's defaults), read from its source. Reference AutoAttack: 100 iterations for APGD-CE, APGD-T and FAB-T.
VARIANT = (f"torchattacks {TORCHATTACKS_VERSION} AutoAttack(version='standard'): APGD-CE (10 steps, 1 restart, "
           "rho 0.75) -> APGD-T (DLR-targeted, 9 target classes, 10 steps, 1 restart) -> FAB-T (9 target classes, "
           "10 steps, 1 restart, alpha_max 0.1, eta 1.05, beta 0.9) -> Square (5000 queries, p_init 0.8, margin "
           "loss), each on the inputs the previous left correct; seed {seed}, eval mode; differs from the reference "
           "AutoAttack's standard version in running 10 iterations instead of 100 for APGD-CE, APGD-T and FAB-T")
# The reference's standard version (fra31/auto-attack autoattack.py: the APGDAttack, APGDAttack_targeted,
# FABAttack_PT and SquareAttack constructors, then set_version('standard') for Linf/L2), built from torchattacks'
# classes: APGD's and APGDT's steps = n_iter, FAB's steps = n_iter, Square's resc_schedule=False (torchattacks'
# AutoAttack leaves it at True, which rescales Square's p schedule to 5000 queries; the reference does not).
REFERENCE_ITERATIONS = 100
SQUARE_QUERIES = 5000
REFERENCE_TARGETS = 9  # the reference's n_target_classes for APGD-T and FAB-T (Linf and L2)
REFERENCE_VARIANT = (
    f"torchattacks {TORCHATTACKS_VERSION} APGD, APGDT, FAB, Square with the reference AutoAttack's (fra31/auto-attack)"
    " version='standard' parameters: APGD-CE (CE loss, {iterations} steps, 1 restart, rho 0.75, eot_iter 1, "
    "step 2 eps, checkpoints 0.22/0.06/0.03) -> APGD-T (targeted DLR, {targets} target classes, {iterations} steps, "
    "1 restart, rho 0.75, eot_iter 1) -> FAB-T (multi-targeted, {targets} target classes, {iterations} steps, "
    f"1 restart, alpha_max 0.1, eta 1.05, beta 0.9) -> Square ({SQUARE_QUERIES} queries, 1 restart, p_init 0.8, "
    "margin loss, resc_schedule False), each on the inputs the previous left correct; seed {seed} for every "
    "attack, eval mode, CPU float32{short}; differs from the reference in running torchattacks' ports of the four "
    "attacks rather than fra31's code (APGD's update, momentum, step halving and projections checked to match; "
    "FAB and Square by their parameters only), chaining the four per batch of {batch} inputs (the reference runs "
    "each attack over all inputs still robust: the same per-input outcome up to random draws), and running our "
    "checks (deterministic clean predictions, budget, [0, 1]) in place of the reference's check_randomized, "
    "check_dynamic, check_range_output, check_zero_gradients and check_square_sr diagnostics")

Norm = Literal["Linf", "L2"]


class AutoAttackCheckError(EdgeShieldError):
    """The AutoAttack run disagrees with its own preconditions (clean predictions, budget, value range)."""


@dataclass(frozen=True)
class AutoAttackRun:
    """AutoAttack's adversarial examples for a batch, before any projection (continuous, float32 [N, features]).

    An input that no attack broke is returned unchanged; ``adv_pred`` is the model's label for each example.
    """

    x_adv: np.ndarray
    seconds: float
    variant: str
    clean_pred: np.ndarray  # int64 [N]: the model's labels for the clean inputs
    adv_pred: np.ndarray  # int64 [N]: the model's labels for x_adv
    norm: str = "Linf"
    eps: float = 0.0
    iterations: int | None = None


@dataclass(frozen=True)
class AutoAttackResult:
    """Robust accuracy under the standard AutoAttack, with a 95 % Clopper–Pearson interval."""

    norm: str
    eps: float
    robust_accuracy: float  # share of the n inputs classified correctly after the attack (clean errors count)
    robust_count: int
    n: int
    ci_low: float
    ci_high: float
    clean_accuracy: float
    seconds: float
    variant: str

    def to_dict(self) -> dict[str, object]:
        return {"norm": self.norm, "eps": self.eps, "robust_accuracy": self.robust_accuracy,
                "robust_count": self.robust_count, "n": self.n, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "clean_accuracy": self.clean_accuracy, "seconds": self.seconds, "variant": self.variant}


def clopper_pearson_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided (1 - alpha) Clopper–Pearson interval for k successes in n trials."""
    return clopper_pearson_lower(k, n, alpha / 2), 1.0 - clopper_pearson_lower(n - k, n, alpha / 2)


def _import_torchattacks() -> ModuleType:
    try:  # import_module: torchattacks ships no type information (tests/test_layering.py still sees it)
        torchattacks = importlib.import_module("torchattacks")
    except ImportError:
        raise MissingDependencyError(f"AutoAttack needs torchattacks; install it without its dependencies (it "
                                     f"would pull torchvision and another torch): {INSTALL_LINE}") from None
    if torchattacks.__version__ != TORCHATTACKS_VERSION:
        raise MissingDependencyError(f"AutoAttack's figures are pinned to torchattacks {TORCHATTACKS_VERSION}, "
                                     f"found {torchattacks.__version__}: {INSTALL_LINE}")
    return torchattacks


def _check_arguments(x: np.ndarray, y: np.ndarray, norm: str, eps: float, batch_size: int,
                     iterations: int | None) -> None:
    if norm not in ("Linf", "L2"):
        raise InvalidArgumentError(f"norm must be 'Linf' or 'L2', not {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not np.isfinite(eps) or eps <= 0:
        raise InvalidArgumentError(f"eps must be a positive finite number, not {eps!r}")
    if norm == "Linf" and eps >= 1.0:
        raise InvalidArgumentError(f"an L-inf eps of {eps} covers the whole [0, 1] value range")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, not {batch_size!r}")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int)
                                   or iterations < 1):
        raise InvalidArgumentError(f"iterations must be None (torchattacks' AutoAttack) or a positive integer "
                                   f"(e.g. REFERENCE_ITERATIONS = {REFERENCE_ITERATIONS}), not {iterations!r}")
    if not isinstance(x, np.ndarray) or x.ndim != 2 or len(x) == 0:
        raise InvalidArgumentError(f"x must be a non-empty [N, features] array, not shape {np.shape(x)}")
    if not isinstance(y, np.ndarray) or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgumentError(f"y must be {len(x)} integer labels, not {getattr(y, 'dtype', type(y))} "
                                   f"of shape {np.shape(y)}")
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise InvalidArgumentError("x must be finite and inside [0, 1], the range AutoAttack clips to")


def _reference_suite(torchattacks: ModuleType, model: torch.nn.Module, *, norm: str, eps: float, n_classes: int,
                     seed: int, iterations: int) -> Any:
    """The reference AutoAttack's standard suite from torchattacks' classes (see ``REFERENCE_VARIANT``)."""
    # torchattacks derives the target count from n_classes (n_classes - 1); the reference fixes it at 9.
    targets_from = min(n_classes, REFERENCE_TARGETS + 1)
    common: dict[str, Any] = {"norm": norm, "eps": eps, "seed": seed, "verbose": False}
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, steps=iterations, n_restarts=1, loss="ce", eot_iter=1, rho=0.75, **common),
        torchattacks.APGDT(model, steps=iterations, n_restarts=1, eot_iter=1, rho=0.75, n_classes=targets_from,
                           **common),
        torchattacks.FAB(model, steps=iterations, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                         multi_targeted=True, n_classes=targets_from, **common),
        torchattacks.Square(model, n_queries=SQUARE_QUERIES, n_restarts=1, p_init=0.8, loss="margin",
                            resc_schedule=False, **common),
    ])


def _variant(iterations: int | None, *, seed: int, n_classes: int, batch: int) -> str:
    if iterations is None:
        return VARIANT.format(seed=seed)
    short = "" if iterations == REFERENCE_ITERATIONS else \
        f" ({iterations} iterations where the reference runs {REFERENCE_ITERATIONS})"
    return REFERENCE_VARIANT.format(iterations=iterations, targets=min(n_classes - 1, REFERENCE_TARGETS), seed=seed,
                                    short=short, batch=batch)


def autoattack_examples(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, norm: Norm, eps: float,
                        seed: int = 0, batch_size: int = 500, iterations: int | None = None) -> AutoAttackRun:
    """The standard AutoAttack's adversarial examples for ``x`` ([N, features] in [0, 1], true labels ``y``).

    ``iterations=None`` runs torchattacks' ``AutoAttack(version="standard")``; an integer runs the reference's
    standard suite with that many iterations for the three gradient attacks (``REFERENCE_ITERATIONS`` = the
    reference's). Runs on CPU, ``batch_size`` inputs per call, with torch's global generator seeded per attack by
    torchattacks and restored afterwards; the model is put in eval mode and given back in its mode. Checks that
    torchattacks sees the model's clean predictions and that every example is in [0, 1] and within the budget.
    """
    _check_arguments(x, y, norm, eps, batch_size, iterations)
    import torch

    torchattacks = _import_torchattacks()
    features = x.shape[1]
    side = round(features ** 0.5)
    # torchattacks' attacks broadcast over [N, C, H, W] images: give them [N, 1, H, W] (or [N, 1, 1, F]) and let
    # the wrapper flatten back to what the model takes. The norms over an input are unchanged by the reshape.
    image_shape = (1, side, side) if side * side == features else (1, 1, features)

    class _Flatten(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.inner(images.reshape(images.shape[0], -1))  # type: ignore[no-any-return]

    was_training = model.training
    wrapped = _Flatten(model).eval()
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y_t = torch.from_numpy(y.astype(np.int64))
    began = time.perf_counter()
    try:
        with torch.no_grad():
            logits = model.eval()(x_t)
        if logits.ndim != 2 or logits.shape[0] != len(x):
            raise InvalidArgumentError(f"the model must return [N, classes] logits, not shape {tuple(logits.shape)}")
        n_classes = int(logits.shape[1])
        if n_classes < 2 or int(y.min()) < 0 or int(y.max()) >= n_classes:
            raise InvalidArgumentError(f"labels must lie in [0, {n_classes}) for a model with {n_classes} outputs")
        clean_pred = logits.argmax(1)
        if iterations is None:
            attack = torchattacks.AutoAttack(wrapped, norm=norm, eps=float(eps), version="standard",
                                             n_classes=n_classes, seed=seed)
        else:
            attack = _reference_suite(torchattacks, wrapped, norm=norm, eps=float(eps), n_classes=n_classes,
                                      seed=seed, iterations=iterations)
        images = x_t.reshape(len(x), *image_shape)
        # The clean predictions the attack starts from (torchattacks' eval-mode, no-grad path) must be ours.
        theirs = attack.get_output_with_eval_nograd(images).argmax(1)
        if not torch.equal(theirs, clean_pred):
            raise AutoAttackCheckError(f"torchattacks' clean predictions differ from the model's on "
                                       f"{int((theirs != clean_pred).sum())} of {len(x)} inputs")
        adv_parts = []
        with torch.random.fork_rng(devices=[]):  # torchattacks reseeds the global generator per attack
            for start in range(0, len(x), batch_size):
                adv_parts.append(attack(images[start:start + batch_size], y_t[start:start + batch_size]).detach())
        adv = torch.cat(adv_parts).reshape(len(x), features)
        with torch.no_grad():
            adv_pred = model.eval()(adv).argmax(1)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - began
    _check_adversarial(x_t, adv, norm, float(eps))
    return AutoAttackRun(x_adv=adv.numpy().astype(np.float32), seconds=seconds,
                         variant=_variant(iterations, seed=seed, n_classes=n_classes, batch=min(batch_size, len(x))),
                         clean_pred=clean_pred.numpy().astype(np.int64), adv_pred=adv_pred.numpy().astype(np.int64),
                         norm=norm, eps=float(eps), iterations=iterations)


def autoattack_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, norm: Norm, eps: float,
                        seed: int = 0, batch_size: int = 500, iterations: int | None = None) -> AutoAttackResult:
    """Robust accuracy of ``model`` (logits for ``x`` of shape [N, features] in [0, 1]) under the standard AutoAttack.

    The examples come from :func:`autoattack_examples` (same arguments); an input counts as robust when the model
    still labels its example correctly, so clean errors count against it.
    """
    run = autoattack_examples(model, x, y, norm=norm, eps=eps, seed=seed, batch_size=batch_size,
                              iterations=iterations)
    clean_correct = run.clean_pred == y
    robust_correct = run.adv_pred == y
    if (robust_correct & ~clean_correct).any():  # an attack leaves a misclassified input untouched
        raise AutoAttackCheckError("AutoAttack made a misclassified input correct: its clean predictions are "
                                   "not the model's")
    k, n = int(robust_correct.sum()), len(x)
    low, high = clopper_pearson_interval(k, n)
    return AutoAttackResult(norm=norm, eps=float(eps), robust_accuracy=k / n, robust_count=k, n=n, ci_low=low,
                            ci_high=high, clean_accuracy=float(clean_correct.mean()), seconds=run.seconds,
                            variant=run.variant)


def _check_adversarial(x: torch.Tensor, adv: torch.Tensor, norm: str, eps: float) -> None:
    """The examples stay in [0, 1] and inside the budget (float32 slack), or the figure means nothing."""
    import torch

    if not bool(torch.isfinite(adv).all()) or float(adv.min()) < 0.0 or float(adv.max()) > 1.0:
        raise AutoAttackCheckError("AutoAttack returned examples outside [0, 1]")
    delta = (adv - x).double()
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    worst = float(size.max())
    if worst > eps * (1 + 1e-5) + 1e-6:
        raise AutoAttackCheckError(f"AutoAttack returned an example at {norm} distance {worst:.6g} > eps {eps:.6g}")
