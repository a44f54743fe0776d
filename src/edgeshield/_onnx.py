"""Parsing an ONNX model from bytes with typed errors (owner-side tools: protect, expose-hidden).

``onnx`` is imported here, on first use, never at import time: the runtime path does not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeshield.errors import MissingDependencyError, UnsupportedModelError

if TYPE_CHECKING:
    import onnx


def first_line(exc: BaseException) -> str:
    """An exception's first message line (onnx and protobuf errors can run to pages), else its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_onnx(model_bytes: bytes, purpose: str) -> onnx.ModelProto:
    """The model in ``model_bytes``; ``purpose`` finishes "... needs the onnx package" when onnx is missing.

    Bytes that do not parse are an :class:`UnsupportedModelError` naming the parser's first line.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise MissingDependencyError(f"{purpose} needs the onnx package: pip install 'edgeshield[owner]'") from None
    try:
        return onnx.load_model_from_string(model_bytes)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise UnsupportedModelError(f"not a valid ONNX model: {first_line(exc)}") from None
