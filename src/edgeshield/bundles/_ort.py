"""Import ONNX Runtime only after its telemetry has been switched off.

onnxruntime 1.32 writes a device id and an events queue (``~/.cache/Microsoft/DeveloperTools/.onnxruntime``) and
``$TMPDIR/.ses`` on import unless ``ORT_DISABLE_TELEMETRY=1`` is already set. Every EdgeShield import of
onnxruntime goes through this module.
"""

import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import onnxruntime

__all__ = ["onnxruntime"]
