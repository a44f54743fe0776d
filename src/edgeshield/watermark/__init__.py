"""Ownership watermarks: a keyed spread-spectrum mark in a model's weights, and its statistical verification.

    marked, report = embed(model_bytes, key)
    result = verify(suspect_bytes, key)   # result.present, result.statistic, result.p_value

See ``_spread`` for the scheme, its null distribution and what it does not cover (copies with renamed weights).
"""

from __future__ import annotations

from edgeshield.watermark._spread import (
    DEFAULT_P_THRESHOLD,
    DEFAULT_POSITIONS,
    DEFAULT_STRENGTH,
    KEY_SIZE,
    SCHEME,
    EmbedReport,
    VerifyResult,
    embed,
    embed_file,
    generate_key,
    load_key,
    verify,
)

__all__ = [
    "DEFAULT_P_THRESHOLD",
    "DEFAULT_POSITIONS",
    "DEFAULT_STRENGTH",
    "KEY_SIZE",
    "SCHEME",
    "EmbedReport",
    "VerifyResult",
    "embed",
    "embed_file",
    "generate_key",
    "load_key",
    "verify",
]
