"""The two digits architectures robust training and the evaluation compare: the shipped MLP and a small CNN.

Both take the flat ``[N, 64]`` input the shipped model takes (8x8 pixels scaled to [0, 1]) and return logits
``[N, 10]``, so either exports to an ONNX file with the same signature and input spec as ``digits.onnx``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeshield.errors import MissingDependencyError

if TYPE_CHECKING:
    from torch.nn import Module

__all__ = ["DIGITS_CNN_CHANNELS", "DIGITS_MLP_HIDDEN", "digits_cnn", "digits_mlp", "import_torch"]

DIGITS_MLP_HIDDEN = (128, 64)  # the shipped model's hidden widths (scripts/train_digits.py)
DIGITS_CNN_CHANNELS = (16, 32)  # two 3x3 convolutions, then one 2x2 max-pool and a 64-wide dense layer
_FEATURES, _SIDE, _CLASSES = 64, 8, 10


def import_torch() -> Any:
    """torch (typed Any: annotate with torch's own names), or one line naming the extra that installs it."""
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("robust training needs PyTorch: pip install 'edgeshield[train]'") from None
    return torch


def digits_mlp() -> Module:
    """The shipped digits classifier: 64 -> 128 -> 64 -> 10, ReLU between layers (initialised from torch's RNG)."""
    torch = import_torch()
    nn = torch.nn
    layers: list[Module] = []
    width = _FEATURES
    for hidden in DIGITS_MLP_HIDDEN:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, _CLASSES))
    module: Module = nn.Sequential(*layers)
    return module


def digits_cnn() -> Module:
    """A small CNN on the 8x8 image behind the 64-vector: [N, 64] -> [N, 1, 8, 8] -> conv 16 -> conv 32 -> pool ->
    dense 64 -> 10 logits (ReLU after each hidden layer). About 38 k parameters against the MLP's 17 k."""
    torch = import_torch()
    nn = torch.nn
    c1, c2 = DIGITS_CNN_CHANNELS
    module: Module = nn.Sequential(
        nn.Unflatten(1, (1, _SIDE, _SIDE)),
        nn.Conv2d(1, c1, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (_SIDE // 2) ** 2, 64), nn.ReLU(),
        nn.Linear(64, _CLASSES),
    )
    return module
