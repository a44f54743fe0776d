"""The updater's parsers (update index, floor state, slot record) take any bytes and answer a value or a typed
refusal, never a crash; valid values round-trip."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield import updates
from edgeshield.errors import EdgeShieldError, IntegrityError
from edgeshield.updates._floor import FloorState
from edgeshield.updates._slots import SlotRecord

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6),
                    max_leaves=20)
VALID = {"format": "edgeshield.update", "version": 1, "model": "digits", "model_version": 7,
         "bundle_id": "ab" * 16, "model_sha256": "cd" * 32,
         "targets": {"bundle": "digits/7/model.esb", "detector": "digits/7/detector.json"}}


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_index_decode_any_bytes(raw: bytes) -> None:
    with pytest.raises(updates.MalformedUpdateError):
        updates.UpdateIndex.decode(raw)


@given(st.sampled_from(sorted(VALID)), JSON)
@settings(max_examples=300, deadline=None)
def test_index_decode_any_field_value(field: str, value: object) -> None:
    doc = {**VALID, field: value}
    try:
        index = updates.UpdateIndex.decode(json.dumps(doc).encode())
    except updates.MalformedUpdateError:
        return
    assert index.to_dict() == doc  # accepted only when it is exactly a valid index


def test_index_round_trip_and_paths_bound_to_the_version() -> None:
    index = updates.UpdateIndex.decode(json.dumps(VALID).encode())
    assert updates.UpdateIndex.decode(index.encode()) == index
    bad = {**VALID, "targets": {"bundle": "digits/6/model.esb"}}  # v6's bundle listed in v7's index
    with pytest.raises(updates.MalformedUpdateError, match=r"digits/7/model\.esb"):
        updates.UpdateIndex.decode(json.dumps(bad).encode())
    with pytest.raises(updates.MalformedUpdateError):
        updates.UpdateIndex.decode(json.dumps({**VALID, "model": "../etc"}).encode())


@given(JSON)
@settings(max_examples=200, deadline=None)
def test_floor_state_from_any_json(value: object) -> None:
    with contextlib.suppress(updates.FloorStateError):
        FloorState.from_dict(value)


@given(st.binary(max_size=300))
@settings(max_examples=100, deadline=None)
def test_floor_state_file_any_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    d = tmp_path_factory.mktemp("floor")
    floor = updates.SignedFileFloor.create(d / "floor.json", d / "floor.key")
    (d / "floor.json").write_bytes(raw)
    with pytest.raises(updates.FloorStateError):
        floor.read()


@given(JSON)
@settings(max_examples=200, deadline=None)
def test_slot_record_from_any_json(value: object) -> None:
    with contextlib.suppress(updates.SlotIntegrityError):
        SlotRecord.from_dict("a", value)


def test_errors_carry_their_exit_codes(tmp_path: Path) -> None:
    for cls in (updates.MetadataRollbackError, updates.MetadataExpiredError, updates.MetadataMismatchError,
                updates.EndlessDataError, updates.FloorViolationError, updates.UpdateMismatchError,
                updates.TruncatedDownloadError, updates.FloorStateError, updates.MetadataSignatureError):
        assert issubclass(cls, IntegrityError) and cls("x").exit_code == 3
    assert updates.FloorKeyError("x").exit_code == 4
    assert issubclass(updates.HealthCheckError, EdgeShieldError) and updates.HealthCheckError("x").exit_code == 1


def test_importable_without_tuf() -> None:
    """The device path imports python-tuf only to pull: install, commit, rollback and status run without it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['tuf'] = None; import edgeshield.updates, edgeshield.cli._update; "
            "from edgeshield.updates import _device, _health, _slots, _floor; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "ok", out.stderr
