"""Robust training on the owner's side (``edgeshield[train]``): PGD adversarial training and TRADES, ONNX export.

    from edgeshield.training import RobustTrainingConfig, digits_mlp, export_onnx, train_robust

    model = digits_mlp()
    report = train_robust(model, x_train, y_train, RobustTrainingConfig(method="trades", eps=2 / 16),
                          x_val=x_test, y_val=y_test)
    export_onnx(model, "robust.onnx")   # then `edgeshield protect robust.onnx ...`

Importing this package needs numpy only; each function imports torch when called and raises
``MissingDependencyError`` naming ``edgeshield[train]`` without it. The device never imports this package.
"""

from edgeshield.training._models import digits_cnn, digits_mlp
from edgeshield.training._robust import (
    RobustTrainingConfig,
    TrainingReport,
    digits_robust_config,
    export_onnx,
    train_robust,
    train_standard,
)

__all__ = ["RobustTrainingConfig", "TrainingReport", "digits_cnn", "digits_mlp", "digits_robust_config", "export_onnx",
           "train_robust", "train_standard"]
