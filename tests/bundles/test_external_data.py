"""ONNX models with external data (how models over 2 GB are stored) are protected; their data files are read only
from the model's own directory, and the device opens the bundle like any other, with identical outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgeshield import bundles
from edgeshield.bundles._ort import onnxruntime as ort
from edgeshield.errors import ExternalDataError, InvalidArgumentError, UnsupportedModelError

from conftest import KeySet, make_matmul_model


def _save_external(src: Path, dst: Path, *, one_file: bool, location: str = "weights.bin") -> Path:
    import onnx

    proto = onnx.load(str(src))
    onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location=location if one_file else None, size_threshold=0)
    return dst


def _relocate(model: Path, location: str, *, tensor: str | None = None) -> None:
    """Point the external data of ``tensor`` (default: every tensor) at ``location``, in place."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    for t in proto.graph.initializer:
        if tensor in (None, t.name):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
    model.write_bytes(proto.SerializeToString())


def _protect(model: Path, out: Path, keyset: KeySet, **kw) -> bundles.Manifest:  # type: ignore[no-untyped-def]
    return bundles.protect(model, out, signing_key=keyset.owner_priv, recipients=[keyset.device_pub], **kw)


def _outputs(session, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return session.run(None, {"x": x})[0]


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return make_matmul_model(tmp_path / "plain.onnx", d=64, blocks=3, seed=5)


@pytest.mark.parametrize("one_file", [True, False], ids=["one-file", "file-per-tensor"])
def test_external_data_model_opens_on_the_device_with_identical_outputs(
    tmp_path: Path, keyset: KeySet, plain: Path, one_file: bool
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model = _save_external(plain, model_dir / "model.onnx", one_file=one_file)
    assert model.stat().st_size < 1024  # the graph only: every weight is in the data files
    assert len(os.listdir(model_dir)) == (2 if one_file else 5)
    manifest = _protect(model, tmp_path / "m.esb", keyset)
    assert manifest.image.weights_size >= 3 * 64 * 64 * 4
    assert manifest.model_size == model.stat().st_size
    session = bundles.open_session(tmp_path / "m.esb", keyset.owner_pub, keyset.device_priv)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    want = _outputs(ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]), x)
    np.testing.assert_array_equal(_outputs(session, x), want)
    # the same bundle as from the self-contained model: the weights section holds the same bytes
    ref = _protect(plain, tmp_path / "ref.esb", keyset)
    assert bundles.model_io(manifest) == bundles.model_io(ref)


def test_protect_from_another_working_directory(tmp_path: Path, keyset: KeySet, plain: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").mkdir()
    model = _save_external(plain, tmp_path / "model" / "model.onnx", one_file=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # data files are found beside the model, not in the working directory
    _protect(model, tmp_path / "m.esb", keyset)
    assert bundles.open_session(tmp_path / "m.esb", keyset.owner_pub, keyset.device_priv)


def test_attribute_tensors_with_external_data_are_read_back_into_the_graph(tmp_path: Path, keyset: KeySet) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(64 * 4, dtype=np.float32).reshape(64, 4) / 100
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w_value"))
    graph = helper.make_graph([const, helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    (tmp_path / "m").mkdir()
    onnx.save_model(proto, str(tmp_path / "m" / "c.onnx"), save_as_external_data=True, location="c.bin",
                    size_threshold=0, convert_attribute=True)
    graph = onnx.load(str(tmp_path / "m" / "c.onnx"), load_external_data=False).graph
    assert graph.node[0].attribute[0].t.external_data
    _protect(tmp_path / "m" / "c.onnx", tmp_path / "c.esb", keyset)
    session = bundles.open_session(tmp_path / "c.esb", keyset.owner_pub, keyset.device_priv)
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(_outputs(session, x), x @ w, rtol=1e-6)


def _bad_model(tmp_path: Path, plain: Path) -> Path:
    (tmp_path / "model").mkdir()
    return _save_external(plain, tmp_path / "model" / "model.onnx", one_file=True)


def _refused(model: Path, out: Path, keyset: KeySet, match: str) -> None:
    with pytest.raises(ExternalDataError, match=match) as info:
        _protect(model, out, keyset)
    assert info.value.exit_code == 2 and isinstance(info.value, UnsupportedModelError)
    assert not out.exists() and not any(p.name.startswith(".m.esb") for p in out.parent.iterdir())


def test_a_location_outside_the_model_directory_is_refused(tmp_path: Path, keyset: KeySet, plain: Path) -> None:
    model = _bad_model(tmp_path, plain)
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "weights.bin")  # the data really is there
    _relocate(model, "../weights.bin")
    _refused(model, tmp_path / "m.esb", keyset, "leaves the model's directory")
    _relocate(model, "sub/../../weights.bin")
    _refused(model, tmp_path / "m.esb", keyset, "leaves the model's directory")
    _relocate(model, "../nowhere.bin")
    _refused(model, tmp_path / "m.esb", keyset, "leaves the model's directory")


def test_an_absolute_location_is_refused(tmp_path: Path, keyset: KeySet, plain: Path) -> None:
    model = _bad_model(tmp_path, plain)
    _relocate(model, str(tmp_path / "model" / "weights.bin"))  # even one that points inside
    _refused(model, tmp_path / "m.esb", keyset, "absolute path")


def test_symbolic_links_are_refused(tmp_path: Path, keyset: KeySet, plain: Path) -> None:
    model = _bad_model(tmp_path, plain)
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "secret.bin")
    (tmp_path / "model" / "weights.bin").symlink_to(tmp_path / "secret.bin")
    _refused(model, tmp_path / "m.esb", keyset, "leaves the model's directory .through '..' or a symbolic link")
    (tmp_path / "model" / "weights.bin").unlink()
    os.replace(tmp_path / "secret.bin", tmp_path / "model" / "real.bin")
    (tmp_path / "model" / "weights.bin").symlink_to("real.bin")  # inside: ONNX refuses it all the same
    _refused(model, tmp_path / "m.esb", keyset, "is a symbolic link")
    (tmp_path / "outside").mkdir()
    os.replace(tmp_path / "model" / "real.bin", tmp_path / "outside" / "weights.bin")
    (tmp_path / "model" / "weights.bin").unlink()
    (tmp_path / "model" / "sub").symlink_to(tmp_path / "outside")  # a directory link on the way out
    _relocate(model, "sub/weights.bin")
    _refused(model, tmp_path / "m.esb", keyset, "leaves the model's directory")


def test_a_symbolic_link_loop_is_refused_with_a_typed_error(tmp_path: Path, keyset: KeySet, plain: Path) -> None:
    # Path.resolve raises RuntimeError (not OSError) for a loop on Python 3.11; its message used to be built from
    # OSError.strerror, so protect crashed with AttributeError instead of refusing the model.
    model = _bad_model(tmp_path, plain)
    (tmp_path / "model" / "weights.bin").unlink()
    (tmp_path / "model" / "loop.bin").symlink_to("weights.bin")
    (tmp_path / "model" / "weights.bin").symlink_to("loop.bin")
    _refused(model, tmp_path / "m.esb", keyset, "cannot be opened")


def test_missing_short_and_mismatched_data_files_are_refused(tmp_path: Path, keyset: KeySet, plain: Path) -> None:
    model = _bad_model(tmp_path, plain)
    data = tmp_path / "model" / "weights.bin"
    full = data.read_bytes()
    data.write_bytes(full[:-10])
    _refused(model, tmp_path / "m.esb", keyset, "too short")
    data.unlink()
    _refused(model, tmp_path / "m.esb", keyset, "not found")
    data.mkdir()
    _refused(model, tmp_path / "m.esb", keyset, "not a regular file")
    data.rmdir()
    os.mkfifo(data)  # opening a FIFO would block: refused before any open
    _refused(model, tmp_path / "m.esb", keyset, "not a regular file")
    data.unlink()
    data.write_bytes(full)
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = str(int(entry.value) - 4)  # fits the file, not the tensor's shape
    model.write_bytes(proto.SerializeToString())
    _refused(model, tmp_path / "m.esb", keyset, "type and shape need")


def test_bytes_alone_cannot_carry_external_data(tmp_path: Path, plain: Path) -> None:
    from edgeshield.bundles._image import build_image

    model = _bad_model(tmp_path, plain)
    with pytest.raises(ExternalDataError, match="from its file"):
        build_image(model.read_bytes())


def test_the_weight_watermark_needs_a_self_contained_model(tmp_path: Path, keyset: KeySet, plain: Path) -> None:
    model = _bad_model(tmp_path, plain)
    with pytest.raises(InvalidArgumentError, match="self-contained"):
        _protect(model, tmp_path / "m.esb", keyset, watermark_key=b"k" * 32)
    assert not (tmp_path / "m.esb").exists()
