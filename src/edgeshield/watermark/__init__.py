"""Ownership watermarks: a keyed spread-spectrum mark in a model's weights, and a served (DAWN) mark in a model's
answers that survives extraction, each with its statistical verification.

    marked, report = embed(model_bytes, key)
    result = verify(suspect_bytes, key)   # result.present, result.statistic, result.p_value

    wm = ServedWatermark(key, rate=0.01, classes=10)             # on the server (regions=bits: region units)
    m = wm.mark(x, labels, keys=canonical_keys)                  # a keyed 1 % of units get a wrong label
    answer = wm.swap_top(probs, m)                               # (or m.labels, labels only)
    evidence.add(client, x[m.marked], m.labels[m.marked], units=m.marked_units())
    ev = evidence.evidence(client)                               # later, against a suspected copy:
    result = verify_copy(suspect_bytes, ev.x, ev.labels, classes=10, units=ev.units, victim=model_bytes)

See ``_spread`` for the weight scheme, its null distribution and what it does not cover (copies with renamed
weights, copies trained from scratch); ``_served`` for the served scheme, its null distribution and its limits.
"""

from __future__ import annotations

from edgeshield._arrays import row_digests
from edgeshield.watermark._served import (
    DEFAULT_RATE,
    DEFAULT_REGIONS,
    SERVED_SCHEME,
    UNIT_SIZE,
    CopyVerifyResult,
    Evidence,
    EvidenceStore,
    Marks,
    ServedWatermark,
    digest_units,
    marks_needed,
    provable_session,
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
    "DEFAULT_REGIONS",
    "DEFAULT_STRENGTH",
    "KEY_SIZE",
    "SCHEME",
    "SERVED_SCHEME",
    "UNIT_SIZE",
    "CopyVerifyResult",
    "EmbedReport",
    "Evidence",
    "EvidenceStore",
    "Marks",
    "ServedWatermark",
    "VerifyResult",
    "digest_units",
    "embed",
    "embed_file",
    "generate_key",
    "load_key",
    "marks_needed",
    "provable_session",
    "row_digests",
    "verify",
    "verify_copy",
]
