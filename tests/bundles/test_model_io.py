"""protect records the model's inputs and outputs in the signed metadata (edgeshield.model_io); inspect shows them
without a device key; bundles without the key (older ones) still inspect fine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgeshield import bundles
from edgeshield.bundles import _format
from edgeshield.bundles._modelio import METADATA_KEY, ModelIO, TensorInfo, from_metadata
from edgeshield.cli import app
from edgeshield.errors import InvalidArgumentError, MalformedBundleError

from conftest import KeySet


def _protect(model: Path, out: Path, keyset: KeySet, **kw) -> bundles.Manifest:  # type: ignore[no-untyped-def]
    return bundles.protect(model, out, signing_key=keyset.owner_priv, recipients=[keyset.device_pub], **kw)


def test_digits_inputs_and_outputs_are_recorded_and_signed(tmp_path: Path, keyset: KeySet, digits_model: Path) -> None:
    manifest = _protect(digits_model, tmp_path / "d.esb", keyset)
    want = ModelIO((TensorInfo("input", "float32", ("batch", 64)),), (TensorInfo("logits", "float32", ("batch", 10)),))
    assert bundles.model_io(manifest) == want
    # what a gateway (no device key) and an unverified inspect both see
    assert bundles.model_io(bundles.verify(tmp_path / "d.esb", keyset.owner_pub)) == want
    assert bundles.model_io(bundles.inspect(tmp_path / "d.esb")[0]) == want
    assert json.loads(manifest.metadata[METADATA_KEY]) == want.to_dict()


def _many_io_model(path: Path, n: int) -> Path:
    import onnx
    from onnx import TensorProto, helper

    names = [f"past_key_values.{i}.key_cache_for_layer_{i:03d}" for i in range(n)]
    nodes = [helper.make_node("Identity", [nm], [f"present.{i}"]) for i, nm in enumerate(names)]
    graph = helper.make_graph(
        nodes, "many",
        [helper.make_tensor_value_info(nm, TensorProto.FLOAT16, ["batch", 8, "past_seq", 128]) for nm in names],
        [helper.make_tensor_value_info(f"present.{i}", TensorProto.FLOAT16, ["batch", 8, None, 128])
         for i in range(n)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_a_long_description_is_split_over_several_entries(tmp_path: Path, keyset: KeySet) -> None:
    model = _many_io_model(tmp_path / "many.onnx", 40)
    manifest = _protect(model, tmp_path / "m.esb", keyset, metadata={"team": "llm"})
    pieces = sorted(k for k in manifest.metadata if k.startswith(METADATA_KEY))
    assert len(pieces) > 3 and all(len(manifest.metadata[k]) <= 1024 for k in pieces)
    io = bundles.model_io(manifest)
    assert io is not None and len(io.inputs) == 40 and io.outputs[0].shape == ("batch", 8, None, 128)
    assert io.inputs[3] == TensorInfo("past_key_values.3.key_cache_for_layer_003", "float16",
                                      ("batch", 8, "past_seq", 128))


def test_no_room_in_the_metadata_leaves_it_out_and_inspect_still_works(
    tmp_path: Path, keyset: KeySet, digits_model: Path
) -> None:
    full = {f"k{i}": "v" for i in range(_format.MAX_METADATA_ENTRIES)}  # as many labels as a manifest holds
    manifest = _protect(digits_model, tmp_path / "old.esb", keyset, metadata=full)
    assert bundles.model_io(manifest) is None  # what every bundle made before this key existed looks like
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "old.esb"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["model_io"] is None
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "old.esb")])
    assert r.exit_code == 0 and "not recorded" in r.stdout


def test_inspect_shows_them_in_the_table_and_in_json(tmp_path: Path, keyset: KeySet, digits_model: Path) -> None:
    _protect(digits_model, tmp_path / "d.esb", keyset)
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "d.esb"), "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["model_io"] == {
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 64]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]}
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "d.esb")])
    assert "[batch, 64]" in r.stdout and "logits" in r.stdout
    assert METADATA_KEY not in r.stdout  # shown as a table, not as raw JSON among the labels


def test_the_key_is_reserved(tmp_path: Path, keyset: KeySet, digits_model: Path) -> None:
    for key in (METADATA_KEY, METADATA_KEY + ".1"):
        with pytest.raises(InvalidArgumentError, match="reserved"):
            _protect(digits_model, tmp_path / "d.esb", keyset, metadata={key: "{}"})
    assert not (tmp_path / "d.esb").exists()


_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
_dims = st.lists(st.one_of(st.none(), st.integers(0, 2**40), _names), max_size=5)
_tensor = st.builds(TensorInfo, _names, st.sampled_from(["float32", "int64", "bool", "bfloat16", "sequence"]),
                    st.one_of(st.none(), _dims.map(tuple)))


@settings(max_examples=60, deadline=None)
@given(st.lists(_tensor, max_size=30), st.lists(_tensor, max_size=30))
def test_any_description_round_trips_through_valid_metadata(inputs: list[TensorInfo],
                                                            outputs: list[TensorInfo]) -> None:
    io = ModelIO(tuple(inputs), tuple(outputs))
    entries = io.to_metadata()
    _format.validate_metadata(entries)  # every piece is a valid metadata value
    assert from_metadata({"team": "x", **entries}) == io


@pytest.mark.parametrize("value", ["not json", "[]", '{"inputs": []}', '{"inputs": [{"name": 1}], "outputs": []}',
                                   '{"inputs": [{"name": "x", "dtype": "f", "shape": [-1]}], "outputs": []}'])
def test_a_malformed_description_is_an_integrity_error(value: str) -> None:
    with pytest.raises(MalformedBundleError):
        from_metadata({METADATA_KEY: value})
