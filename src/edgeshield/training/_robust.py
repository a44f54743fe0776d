"""Adversarial training (PGD-AT, Madry et al. 2018; TRADES, Zhang et al. 2019) and ONNX export, owner side.

The inner maximisation is projected gradient ascent inside the L∞ or L2 ball of radius ``eps`` around each input,
clipped to the input's value range, from a random start. PGD-AT trains on the attacked inputs with cross-entropy;
TRADES keeps the clean cross-entropy and adds ``beta`` times the KL divergence between the model's clean and
attacked outputs, the attack maximising that KL. The robust accuracy a ``TrainingReport`` carries comes from this
same training-time attack (one random start): it is a progress figure, not an evaluation; an evaluation uses
stronger attacks (``benchmarks/robust_training.py``: ART's PGD with restarts).

torch is imported inside the functions (``edgeshield[train]``), so importing this module needs numpy only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgeshield._io import atomic_write_bytes
from edgeshield._progress import ProgressCallback, report
from edgeshield.errors import InvalidArgumentError, MissingDependencyError, UnsupportedModelError
from edgeshield.training._models import import_torch

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

    import torch
    from torch import Tensor
    from torch.nn import Module

__all__ = ["RobustTrainingConfig", "TrainingReport", "digits_robust_config", "export_onnx", "pgd_perturb",
           "train_robust", "train_standard"]

Method = Literal["pgd", "trades"]
Norm = Literal["linf", "l2"]
_TASK = "training"


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"robust training: {name} must be a finite number > 0, not {value!r}")


def _count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"robust training: {name} must be an integer >= {minimum}, not {value!r}")


@dataclass(frozen=True)
class RobustTrainingConfig:
    """The attack budget and the optimiser settings of one adversarial training run (validated here, once).

    ``eps`` is in input units (the digits model's pixels are in [0, 1], so one grey level is 1/16). ``step_size``
    defaults to Madry's 2.5 * eps / steps. For ``warmup_epochs`` epochs the budget ramps linearly from 0 (a clean
    first epoch) towards ``eps``; the remaining epochs train at the full budget.
    """

    method: Method = "trades"
    norm: Norm = "linf"
    eps: float = 2 / 16
    steps: int = 10
    step_size: float | None = None
    beta: float = 6.0
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    value_range: tuple[float, float] = (0.0, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("pgd", "trades"):
            raise InvalidArgumentError(f"robust training: method must be 'pgd' or 'trades', not {self.method!r}")
        if self.norm not in ("linf", "l2"):
            raise InvalidArgumentError(f"robust training: norm must be 'linf' or 'l2', not {self.norm!r}")
        try:
            lo, hi = (float(v) for v in self.value_range)
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"robust training: value_range must be (min, max), not {self.value_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InvalidArgumentError(f"robust training: value_range must be finite with min < max, "
                                       f"not {self.value_range!r}")
        object.__setattr__(self, "value_range", (lo, hi))
        _positive("eps", self.eps)
        if self.norm == "linf" and self.eps >= hi - lo:
            raise InvalidArgumentError(f"robust training: an L∞ eps of {self.eps:g} covers the whole value range "
                                       f"[{lo:g}, {hi:g}]: every input could become every other one")
        _count("steps", self.steps, 1)
        if self.step_size is not None:
            _positive("step_size", self.step_size)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) \
                or self.beta < 0:
            raise InvalidArgumentError(f"robust training: beta must be a finite number >= 0, not {self.beta!r}")
        _count("epochs", self.epochs, 1)
        _count("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise InvalidArgumentError(f"robust training: weight_decay must be >= 0, not {self.weight_decay!r}")
        _count("warmup_epochs", self.warmup_epochs, 0)
        if self.warmup_epochs >= self.epochs:
            raise InvalidArgumentError(f"robust training: warmup_epochs ({self.warmup_epochs}) must be fewer than "
                                       f"epochs ({self.epochs}), or no epoch trains at the full budget")
        _count("seed", self.seed, 0)

    @property
    def effective_step_size(self) -> float:
        """The attack's step size: ``step_size``, else 2.5 * eps / steps."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["value_range"] = list(self.value_range)
        return out


@dataclass(frozen=True)
class TrainingReport:
    """What a training run achieved.

    ``robust_accuracy`` is the accuracy under the training-time attack (PGD with ``config``'s norm, eps, steps and
    step size, one random start) on the validation set, or on the training set when none was given
    (``measured_on`` says which): a progress figure, not the evaluation. For ``train_standard``, ``config`` is
    only the budget that figure was measured at (``method`` is "standard").
    """

    clean_accuracy: float
    robust_accuracy: float
    epochs: int
    seconds: float
    config: RobustTrainingConfig
    method: Literal["standard", "pgd", "trades"] = "trades"
    measured_on: Literal["validation", "training"] = "validation"

    def to_dict(self) -> dict[str, Any]:
        return {"clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
                "robust_accuracy_attack": "training-time PGD (one random start)", "epochs": self.epochs,
                "seconds": self.seconds, "method": self.method, "measured_on": self.measured_on,
                "config": self.config.to_dict()}


def _cross_entropy(F: Any, y: Tensor) -> Callable[[Tensor], Tensor]:
    def objective(logits: Tensor) -> Tensor:
        out: Tensor = F.cross_entropy(logits, y, reduction="sum")
        return out
    return objective


def _kl_to(F: Any, p_clean: Tensor) -> Callable[[Tensor], Tensor]:
    def objective(logits: Tensor) -> Tensor:  # TRADES' inner loss: KL(clean output || attacked output)
        out: Tensor = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
        return out
    return objective


# --- the inner maximisation ----------------------------------------------------------------------------------------
def _flat_norm(t: Tensor) -> Tensor:
    out: Tensor = t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))
    return out


def _project(torch: Any, x_adv: Tensor, x: Tensor, norm: Norm, eps: float, lo: float, hi: float) -> Tensor:
    delta = x_adv - x
    delta = delta.clamp(-eps, eps) if norm == "linf" else delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    out: Tensor = torch.clamp(x + delta, lo, hi)
    return out


def pgd_perturb(model: Module, x: Tensor, objective: Callable[[Tensor], Tensor], *, norm: Norm,
                eps: float, steps: int, step_size: float, value_range: tuple[float, float],
                generator: torch.Generator, start: Literal["uniform", "small"] = "uniform") -> Tensor:
    """Projected gradient ascent on ``objective(model(x_adv))`` (a scalar) inside the ``norm`` ball of radius
    ``eps`` around ``x`` and the value range. ``start="uniform"``: a random point of the ball (Madry);
    ``"small"``: ``x`` plus 0.001 Gaussian noise (TRADES). Returns detached attacked inputs."""
    torch = import_torch()
    lo, hi = value_range
    if start == "small":
        x_adv = x + 0.001 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    elif norm == "linf":
        x_adv = x + (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        radius = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        x_adv = x + direction / _flat_norm(direction) * radius * eps
    x_adv = _project(torch, x_adv.detach(), x, norm, eps, lo, hi)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(model(x_adv)), x_adv)
        with torch.no_grad():
            step = grad.sign() if norm == "linf" else grad / _flat_norm(grad)
            x_adv = _project(torch, x_adv + step_size * step, x, norm, eps, lo, hi)
    return x_adv.detach()


# --- data ------------------------------------------------------------------------------------------------------------
def _as_data(x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    xs = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    ys = np.asarray(y)
    if xs.ndim < 2 or len(xs) == 0:
        raise InvalidArgumentError(f"{what}: x must be a non-empty batch [N, ...], not shape {xs.shape}")
    if ys.shape != (len(xs),) or not np.issubdtype(ys.dtype, np.integer):
        raise InvalidArgumentError(f"{what}: y must be {len(xs)} integer labels, not {ys.dtype} {ys.shape}")
    if not np.isfinite(xs).all():
        raise InvalidArgumentError(f"{what}: x holds NaN or infinite values")
    if (ys < 0).any():
        raise InvalidArgumentError(f"{what}: labels must be >= 0")
    return xs, np.ascontiguousarray(ys.astype(np.int64))


def _check_classes(torch: Any, model: Module, xs: np.ndarray, ys: np.ndarray, what: str) -> None:
    with torch.no_grad():
        out = model(torch.from_numpy(xs[:1]))
    if out.dim() != 2:
        raise UnsupportedModelError(f"{what}: the model must return logits [N, classes], not shape "
                                    f"{tuple(out.shape)}")
    if int(ys.max()) >= out.shape[1]:
        raise InvalidArgumentError(f"{what}: label {int(ys.max())} but the model has {out.shape[1]} outputs")


def _accuracies(torch: Any, model: Module, x: np.ndarray, y: np.ndarray,
                config: RobustTrainingConfig) -> tuple[float, float]:
    F = torch.nn.functional
    model.eval()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(config.seed + 1)
    clean = robust = 0
    for start in range(0, len(xt), 512):
        xb, yb = xt[start:start + 512], yt[start:start + 512]
        with torch.no_grad():
            clean += int((model(xb).argmax(1) == yb).sum())
        x_adv = pgd_perturb(model, xb, _cross_entropy(F, yb),
                            norm=config.norm, eps=config.eps, steps=config.steps,
                            step_size=config.effective_step_size, value_range=config.value_range, generator=gen)
        with torch.no_grad():
            robust += int((model(x_adv).argmax(1) == yb).sum())
    return clean / len(xt), robust / len(xt)


def _validation(x_val: Any, y_val: Any, x: np.ndarray, y: np.ndarray,
                what: str) -> tuple[np.ndarray, np.ndarray, Literal["validation", "training"]]:
    if (x_val is None) != (y_val is None):
        raise InvalidArgumentError(f"{what}: give both x_val and y_val, or neither")
    if x_val is None:
        return x, y, "training"
    xv, yv = _as_data(x_val, y_val, what)
    if xv.shape[1:] != x.shape[1:]:
        raise InvalidArgumentError(f"{what}: x_val rows are {xv.shape[1:]}, training rows {x.shape[1:]}")
    return xv, yv, "validation"


# --- training ------------------------------------------------------------------------------------------------------
def train_standard(model: Module, x: Any, y: Any, *, epochs: int = 60, seed: int = 0, batch_size: int = 64,
                   lr: float = 1e-3, weight_decay: float = 1e-4, x_val: Any = None, y_val: Any = None,
                   budget: RobustTrainingConfig | None = None,
                   progress: ProgressCallback | None = None) -> TrainingReport:
    """Plain cross-entropy training with Adam (how the shipped ``digits.onnx`` is trained), then the clean and
    training-time-PGD accuracy at ``budget`` (default: ``RobustTrainingConfig()``'s, L∞ 2/16) for comparison.

    The batch order comes from a generator seeded with ``seed``; the weights' initialisation is the caller's.
    """
    torch = import_torch()
    budget = budget if budget is not None else RobustTrainingConfig()
    _count("epochs", epochs, 1)
    _count("batch_size", batch_size, 1)
    _count("seed", seed, 0)
    _positive("lr", lr)
    xs, ys = _as_data(x, y, "train_standard")
    xv, yv, measured_on = _validation(x_val, y_val, xs, ys, "train_standard")
    _check_classes(torch, model, xs, ys, "train_standard")
    began = time.perf_counter()
    xt, yt = torch.from_numpy(xs), torch.from_numpy(ys)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        report(progress, _TASK, epoch + 1, epochs, note="standard")
    model.eval()
    seconds = time.perf_counter() - began
    clean, robust = _accuracies(torch, model, xv, yv, budget)
    return TrainingReport(clean, robust, epochs, seconds, budget, method="standard", measured_on=measured_on)


def train_robust(model: Module, x: Any, y: Any, config: RobustTrainingConfig, *, x_val: Any = None,
                 y_val: Any = None, progress: ProgressCallback | None = None) -> TrainingReport:
    """Adversarially train ``model`` (a logits-returning module) in place on ``(x, y)`` with PGD-AT or TRADES.

    Deterministic for a given config, model initialisation and thread count: the batch order and the attack's
    random starts come from generators seeded with ``config.seed``. Adam, constant learning rate.
    """
    torch = import_torch()
    if not isinstance(config, RobustTrainingConfig):
        raise InvalidArgumentError(f"train_robust takes a RobustTrainingConfig, not {type(config).__name__}")
    F = torch.nn.functional
    xs, ys = _as_data(x, y, "train_robust")
    lo, hi = config.value_range
    if xs.min() < lo or xs.max() > hi:
        raise InvalidArgumentError(f"train_robust: inputs span [{xs.min():g}, {xs.max():g}], outside the "
                                   f"config's value_range [{lo:g}, {hi:g}]")
    xv, yv, measured_on = _validation(x_val, y_val, xs, ys, "train_robust")
    _check_classes(torch, model, xs, ys, "train_robust")
    began = time.perf_counter()
    xt, yt = torch.from_numpy(xs), torch.from_numpy(ys)
    order_gen = torch.Generator().manual_seed(config.seed)
    attack_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for epoch in range(config.epochs):
        ramp = min(1.0, epoch / config.warmup_epochs) if config.warmup_epochs else 1.0
        eps = config.eps * ramp
        step_size = config.effective_step_size * ramp
        order = torch.randperm(len(xt), generator=order_gen)
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            xb, yb = xt[idx], yt[idx]
            if eps == 0:
                model.train()
                loss = F.cross_entropy(model(xb), yb)
            elif config.method == "pgd":
                model.eval()
                x_adv = pgd_perturb(model, xb, _cross_entropy(F, yb),
                                    norm=config.norm, eps=eps, steps=config.steps, step_size=step_size,
                                    value_range=config.value_range, generator=attack_gen)
                model.train()
                loss = F.cross_entropy(model(x_adv), yb)
            else:
                model.eval()
                with torch.no_grad():
                    p_clean = F.softmax(model(xb), dim=1)
                x_adv = pgd_perturb(
                    model, xb,
                    _kl_to(F, p_clean),
                    norm=config.norm, eps=eps, steps=config.steps, step_size=step_size,
                    value_range=config.value_range, generator=attack_gen, start="small")
                model.train()
                logits = model(xb)
                loss = F.cross_entropy(logits, yb) + config.beta * F.kl_div(
                    F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        report(progress, _TASK, epoch + 1, config.epochs, note=f"{config.method} eps {eps:.4g}")
    model.eval()
    seconds = time.perf_counter() - began
    clean, robust = _accuracies(torch, model, xv, yv, config)
    return TrainingReport(clean, robust, config.epochs, seconds, config, method=config.method,
                          measured_on=measured_on)


# --- export --------------------------------------------------------------------------------------------------------
def _sample_for(torch: Any, model: Module) -> np.ndarray:
    """A probe batch for a model whose input width its first layer states (Linear or Unflatten)."""
    first = next(iter(model.children()), model)
    if isinstance(first, torch.nn.Linear):
        width = int(first.in_features)
    elif isinstance(first, torch.nn.Unflatten):
        width = int(np.prod(first.unflattened_size))
    else:
        raise InvalidArgumentError("export_onnx: cannot tell this model's input width: pass sample= (a batch)")
    return np.random.default_rng(0).random((4, width), dtype=np.float32)


def onnx_bytes(model: Module, sample: np.ndarray, *, input_name: str = "input",
               output_name: str = "logits", doc_string: str = "") -> bytes:
    """Export with the dynamo exporter (dynamic batch) into one self-contained ONNX file, checked by onnx's
    full checker and against ONNX Runtime's logits on ``sample`` (rtol = atol = 1e-4). The exporter's per-node
    stack traces are dropped, so the bytes depend on the model, not on where the checkout lives."""
    torch = import_torch()
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("exporting ONNX needs onnx: pip install 'edgeshield[train]'") from None
    from edgeshield.bundles._ort import onnxruntime as ort

    base: Any = torch.nn.Module

    class _Wrapped(base):  # type: ignore[misc]  # names the forward argument for dynamic_shapes
        def __init__(self, inner: Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input: Tensor) -> Tensor:  # noqa: A002
            out: Tensor = self.inner(input)
            return out

    model.eval()
    sample = np.ascontiguousarray(np.asarray(sample, dtype=np.float32))
    example = torch.zeros(2, *sample.shape[1:], dtype=torch.float32)
    try:
        program = torch.onnx.export(
            _Wrapped(model).eval(), (example,), dynamo=True, input_names=[input_name], output_names=[output_name],
            dynamic_shapes={"input": {0: torch.export.Dim("batch")}}, external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many types; the user gets one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"export_onnx: torch.onnx.export failed: {first}") from exc
    proto = program.model_proto
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise UnsupportedModelError(f"export_onnx: initializer {tensor.name!r} stayed external data")
    proto.doc_string = doc_string
    for node in proto.graph.node:  # the exporter's stack traces name the build machine's paths and line numbers
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.checker.check_model(proto, full_check=True)
    data: bytes = proto.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    if names != ([input_name], [output_name]):
        raise UnsupportedModelError(f"export_onnx: exported signature {names}, expected "
                                    f"([{input_name!r}], [{output_name!r}])")
    got = sess.run([output_name], {input_name: sample})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(sample)).numpy()
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        raise UnsupportedModelError(f"export_onnx: ONNX Runtime's logits differ from torch's (max {diff:.3g})")
    return data


def export_onnx(model: Module, path: str | os.PathLike[str], *, input_name: str = "input",
                output_name: str = "logits", sample: np.ndarray | None = None, doc_string: str = "") -> None:
    """Export ``model`` (eval mode) to a self-contained ONNX file at ``path``, ready for ``edgeshield protect``.

    Checked before anything is written: onnx's full checker, the input/output names, and ONNX Runtime's logits
    against torch's on ``sample`` (default: a random batch, when the first layer states the input width).
    Written atomically.
    """
    torch = import_torch()
    probe = _sample_for(torch, model) if sample is None else sample
    atomic_write_bytes(Path(path), onnx_bytes(model, probe, input_name=input_name, output_name=output_name,
                                              doc_string=doc_string))


# --- the digits recipes --------------------------------------------------------------------------------------------
_DIGITS_EPOCHS = {"mlp": 150, "cnn": 30}  # the CNN learns faster per epoch and costs ~8x more per epoch


def digits_robust_config(*, arch: Literal["mlp", "cnn"] = "mlp", method: Method = "trades",
                         **overrides: Any) -> RobustTrainingConfig:
    """The recipe behind ``digits_robust.onnx`` (MLP, TRADES beta 6, L∞ eps 2/16, 150 epochs) and its siblings in
    ``benchmarks/robust_training.py``: the defaults with the epochs for ``arch``, then ``overrides``."""
    if arch not in _DIGITS_EPOCHS:
        raise InvalidArgumentError(f"arch must be one of {sorted(_DIGITS_EPOCHS)}, not {arch!r}")
    settings: dict[str, Any] = {"method": method, "epochs": _DIGITS_EPOCHS[arch], **overrides}
    return RobustTrainingConfig(**settings)
