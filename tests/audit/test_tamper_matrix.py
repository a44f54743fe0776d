"""The tamper matrix of benchmarks/_audit_tamper.py, run as a test: every case is caught where it should be, and
the cases nothing on the device catches are exactly the ones docs/server.md names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from _auditlogs import tamper_module

tamper = tamper_module()

UNDETECTABLE_ON_DEVICE = {"cut_back_to_a_checkpoint", "restore_an_older_copy", "device_key_rewrite",
                          "edit_uncovered_entry", "drop_uncovered_entries"}
UNDETECTABLE_WITH_WITNESS = {"edit_uncovered_entry", "drop_uncovered_entries"}
EXPECTED_ERRORS = {  # a few cases pinned to the check that should catch them
    "delete_every_checkpoint_row": "AuditCheckpointLinkError",
    "delete_newest_checkpoint_row": "AuditCheckpointLinkError",
    "reorder_checkpoint_entries": "AuditCheckpointLinkError",
    "edit_and_delete_every_checkpoint": "AuditUncoveredError",
    "truncate_entries": "AuditTruncatedError",
    "another_key": "AuditWrongKeyError",
    "cut_back_to_a_checkpoint": "AuditNotExtendedError",
    "device_key_rewrite": "AuditNotExtendedError",
    "file_cut_to_zero": "AuditIntegrityError",
}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in tamper.run_cases(tmp_path_factory.mktemp("tamper"))}


def test_every_case_ran(records: dict[str, dict[str, Any]]) -> None:
    assert set(records) == {c.name for c in tamper.CASES} and len(records) >= 30


@pytest.mark.parametrize("name", [c.name for c in tamper.CASES])
def test_case(records: dict[str, dict[str, Any]], name: str) -> None:
    r = records[name]
    assert r["documented_undetectable_on_device"] == (name in UNDETECTABLE_ON_DEVICE)
    assert r["documented_undetectable_with_witness"] == (name in UNDETECTABLE_WITH_WITNESS)
    assert r["detected_device"] == (name not in UNDETECTABLE_ON_DEVICE), r
    assert r["detected_with_witness"] == (name not in UNDETECTABLE_WITH_WITNESS), r
    if name in EXPECTED_ERRORS:
        assert r["error"].startswith(EXPECTED_ERRORS[name] + ":"), r["error"]


def test_summary_has_nothing_undetected(records: dict[str, dict[str, Any]]) -> None:
    s = tamper.summary(list(records.values()))
    assert s["audit_tamper_cases"] == len(tamper.CASES) and s["audit_tamper_undetected"] == 0


def test_documented_cases_are_in_the_docs() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "server.md").read_text(encoding="utf-8")
    for case in tamper.CASES:
        if case.undetectable_on_device:
            assert f"`{case.name}`" in docs, case.name
