"""Ownership watermarks: a keyed spread-spectrum mark in a model's weights, and a served (DAWN) mark in a model's
answers that survives extraction, each with its statistical verification.

    marked, report = embed(model_bytes, key)
    result = verify(suspect_bytes, key)   # result.present, result.statistic, result.p_value

    wm = ServedWatermark(key, rate=0.01, classes=10)             # on the server
    answer, marked = wm.apply(x, probs)                          # a keyed 1 % of inputs get a wrong top-1
    evidence.add(client, x[marked], answer[marked].argmax(1))    # an EvidenceStore keeps what was served
    x_w, y_w, _, _ = evidence.load(client)                       # later, against a suspected copy:
    result = verify_copy(suspect_bytes, x_w, y_w, classes=10)    # result.present, result.matches, result.p_value

See ``_spread`` for the weight scheme, its null distribution and what it does not cover (copies with renamed
weights, copies trained from scratch); ``_served`` for the served scheme, its null distribution and its limits.
"""

from __future__ import annotations

from edgeshield._arrays import row_digests
from edgeshield.watermark._served import (
    DEFAULT_RATE,
    SERVED_SCHEME,
    CopyVerifyResult,
    EvidenceStore,
    ServedWatermark,
    verify_copy,
)
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
    "DEFAULT_POSITIONS",
    "DEFAULT_P_THRESHOLD",
    "DEFAULT_RATE",
    "DEFAULT_STRENGTH",
    "KEY_SIZE",
    "SCHEME",
    "SERVED_SCHEME",
    "CopyVerifyResult",
    "EmbedReport",
    "EvidenceStore",
    "ServedWatermark",
    "VerifyResult",
    "embed",
    "embed_file",
    "generate_key",
    "load_key",
    "row_digests",
    "verify",
    "verify_copy",
]
