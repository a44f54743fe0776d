"""The federated digits models (PyTorch, imported lazily) and the local SGD step every client runs.

Parameters travel as a list of float32 numpy arrays in ``state_dict`` order; an update is the list of differences
``trained − global``. ``linear`` is logistic regression (64 → 10, the model size that suits user-level DP);
``mlp`` is 64 → 32 → 10 with a ReLU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield.errors import InvalidArgumentError
from edgeshield.models import DIGITS_NUM_CLASSES, DIGITS_NUM_FEATURES

if TYPE_CHECKING:
    import torch

__all__ = ["accuracy_and_loss", "build_model", "initial_params", "load_params", "local_update", "model_params"]

_HIDDEN = 32


def build_model(kind: str) -> torch.nn.Module:
    import torch

    if kind == "linear":
        return torch.nn.Linear(DIGITS_NUM_FEATURES, DIGITS_NUM_CLASSES)
    if kind == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(DIGITS_NUM_FEATURES, _HIDDEN), torch.nn.ReLU(), torch.nn.Linear(_HIDDEN, DIGITS_NUM_CLASSES)
        )
    raise InvalidArgumentError(f"unknown model {kind!r}; known: linear, mlp")


def model_params(model: torch.nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().astype(np.float32, copy=True) for t in model.state_dict().values()]


def load_params(model: torch.nn.Module, params: list[np.ndarray]) -> None:
    import torch

    keys = list(model.state_dict())
    state = {k: torch.from_numpy(np.asarray(p, dtype=np.float32)) for k, p in zip(keys, params, strict=True)}
    model.load_state_dict(state)


def initial_params(kind: str, seed: int) -> list[np.ndarray]:
    """The global model before round 1 (PyTorch's default initialisation under ``seed``)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_params(build_model(kind))


def local_update(
    kind: str,
    params: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[list[np.ndarray], float]:
    """``epochs`` of minibatch SGD from ``params`` on ``(x, y)``: the update (trained − start) and the mean loss."""
    import torch

    torch.set_num_threads(1)
    model = build_model(kind)
    load_params(model, params)
    if len(y) == 0:
        return [np.zeros_like(p) for p in params], 0.0
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen)  # not privacy noise: minibatch order
        for start in range(0, len(yt), batch_size):
            b = order[start : start + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.item()))
    trained = model_params(model)
    return [t - p for t, p in zip(trained, params, strict=True)], float(np.mean(losses))


def accuracy_and_loss(kind: str, params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy of ``params`` on ``(x, y)``."""
    logits = predict_logits(kind, params, x)
    import torch

    t = torch.from_numpy(logits)
    loss = float(torch.nn.functional.cross_entropy(t, torch.from_numpy(np.asarray(y, dtype=np.int64))).item())
    return float(np.mean(np.argmax(logits, axis=1) == y)), loss


def predict_logits(kind: str, params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    import torch

    model = build_model(kind)
    load_params(model, params)
    model.eval()
    with torch.no_grad():
        out: Any = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return np.asarray(out.numpy(), dtype=np.float32)
