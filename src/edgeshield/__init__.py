"""EdgeShield: secure AI models on edge devices.

Importing the package switches ONNX Runtime's telemetry off before anything can import onnxruntime through us:
onnxruntime writes a device id and an events queue on import unless ``ORT_DISABLE_TELEMETRY=1`` is set first.
"""

import os as _os

_os.environ["ORT_DISABLE_TELEMETRY"] = "1"

from edgeshield.errors import EdgeShieldError

__version__ = "0.1.0"
__all__ = ["EdgeShieldError", "__version__"]
