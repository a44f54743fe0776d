"""`edgeshield demo` runs end to end and its summary carries the figures it claims."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_json_summary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "edgeshield", "demo", "--json", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    acc = summary["accuracy"]
    assert acc["bundle"] == acc["plain"] and acc["bundle"] > 0.95 and acc["test_examples"] == 450
    rejected = " ".join(summary["tamper_rejected"])
    for err in ("SignatureError", "PayloadDigestError", "NotARecipientError"):
        assert err in rejected
    assert summary["verified"] is True
    assert [s["stage"] for s in summary["stages"]][0] == "Create owner and device keys"
    assert "[5/5]" in proc.stderr  # progress goes to stderr when --json keeps stdout machine-readable
