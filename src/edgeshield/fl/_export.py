"""The federated model out: ONNX (``torch.onnx.export``, dynamic batch) and a protected bundle with ``fl.*`` metadata.

The bundle's signed metadata records what the model's privacy claim rests on (ε from the accountant, δ, the clip,
the noise multiplier, the mode, the aggregator, rounds and clients) beside the digits input spec, so a device that
opens it knows what it is running.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield.models import DIGITS_INPUT_NAME, DIGITS_NUM_FEATURES, DIGITS_OUTPUT_NAME

if TYPE_CHECKING:
    from edgeshield.bundles import Manifest
    from edgeshield.fl._sim import FLResult

__all__ = ["protect_result", "to_onnx"]


def to_onnx(kind: str, params: list[np.ndarray]) -> bytes:
    """The model as ONNX bytes: input ``input`` float32 [N, 64], output ``logits`` float32 [N, 10]."""
    import torch

    from edgeshield.fl._model import build_model, load_params

    model = build_model(kind)
    load_params(model, params)
    model.eval()
    example = torch.zeros(2, DIGITS_NUM_FEATURES, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    exporter = logging.getLogger("torch.onnx")
    level = exporter.level
    exporter.setLevel(logging.ERROR)  # "torchvision is not installed" notes: nothing here uses torchvision ops
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation inside the exporter
            program: Any = torch.onnx.export(
                model, (example,), input_names=[DIGITS_INPUT_NAME], output_names=[DIGITS_OUTPUT_NAME],
                dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
            )
    finally:
        exporter.setLevel(level)
    return bytes(program.model_proto.SerializeToString())


def protect_result(
    result: FLResult,
    out_bundle: str | os.PathLike[str],
    signing_key: Any,
    recipients: Sequence[Any],
    *,
    model_version: int = 0,
) -> Manifest:
    """Export ``result``'s final model and protect it as a bundle (``bundles.protect``) with ``fl.*`` metadata."""
    from edgeshield.adversarial import METADATA_KEY
    from edgeshield.bundles import protect
    from edgeshield.models import digits_input_spec

    metadata = {"model": f"digits-fl-{result.config.model}", METADATA_KEY: digits_input_spec().to_json()}
    metadata.update(result.metadata())
    onnx_bytes = result.onnx_bytes()
    with tempfile.TemporaryDirectory(prefix="esfl-export-") as tmp:
        model_path = Path(tmp) / "model.onnx"
        model_path.write_bytes(onnx_bytes)
        return protect(model_path, out_bundle, signing_key=signing_key, recipients=recipients,
                       model_version=model_version, metadata=metadata)
