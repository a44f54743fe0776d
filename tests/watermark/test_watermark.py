"""The spread-spectrum ownership watermark on the real digits model: cost, detection, false claims, survival."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import stat
from pathlib import Path

import numpy as np
import pytest

import edgeshield  # noqa: F401  (before onnxruntime)
from edgeshield.errors import InvalidArgumentError, KeyFileError, OutputExistsError, UnsupportedModelError
from edgeshield.models import digits_model_path, load_digits_split
from edgeshield.watermark import DEFAULT_STRENGTH, embed, generate_key, load_key, verify

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))


from edgeshield.evaluation._extraction import (  # noqa: E402  (the harness's copies: one way to make each)
    _train,
    _with_weights,
    magnitude_pruned,
    trained_weights,
)


def _accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return float((sess.run(["logits"], {"input": x})[0].argmax(axis=1) == y).mean())


def _train_script():  # type: ignore[no-untyped-def]
    path = Path(__file__).resolve().parents[2] / "scripts" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("_train_digits_for_watermark_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def split():  # type: ignore[no-untyped-def]
    return load_digits_split()


@pytest.fixture(scope="module")
def base() -> bytes:
    return digits_model_path().read_bytes()


@pytest.fixture(scope="module")
def marked(base: bytes) -> bytes:
    out, report = embed(base, KEY)
    assert report.positions == 2000 and report.strength == DEFAULT_STRENGTH
    assert set(report.tensors) == {"inner.0.weight", "inner.2.weight", "inner.4.weight"}
    return out


# --- cost and detection --------------------------------------------------------------------------------------------
def test_embedding_costs_at_most_half_a_point_of_accuracy(base: bytes, marked: bytes, split) -> None:  # type: ignore[no-untyped-def]
    before = _accuracy(base, split.x_test, split.y_test)
    after = _accuracy(marked, split.x_test, split.y_test)
    print(f"test accuracy {before:.4f} -> {after:.4f} (drop {100 * (before - after):.2f} points)")
    assert 100 * (before - after) <= 0.5


def test_only_the_keyed_weights_change(base: bytes, marked: bytes) -> None:
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load_model_from_string(base).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load_model_from_string(marked).graph.initializer}
    assert a.keys() == b.keys()
    changed = sum(int((a[n] != b[n]).sum()) for n in a)
    assert changed == 2000
    assert all(np.array_equal(a[n], b[n]) for n in a if a[n].ndim < 2)  # biases untouched


def test_embed_is_deterministic_for_a_key(base: bytes, marked: bytes) -> None:
    assert embed(base, KEY)[0] == marked
    assert embed(base, OTHER_KEY)[0] != marked


def test_watermark_is_present(marked: bytes) -> None:
    r = verify(marked, KEY)
    print(f"watermarked: z={r.statistic:.2f} p={r.p_value:.3g} bound={r.p_bound:.3g}")
    assert r.present and r.p_value < 1e-6 and r.p_bound < 1e-6 and r.positions_used == 2000
    assert r.statistic > 8


def test_other_key_finds_nothing(marked: bytes) -> None:
    r = verify(marked, OTHER_KEY)
    print(f"other key: z={r.statistic:.2f} p={r.p_value:.3g}")
    assert not r.present and r.p_value > 1e-3


def test_unmarked_model_is_not_claimed(base: bytes) -> None:
    r = verify(base, KEY)
    print(f"clean model: z={r.statistic:.2f} p={r.p_value:.3g}")
    assert not r.present and r.p_value > 1e-3


def test_null_distribution_is_standard_normal(base: bytes) -> None:
    """Over many random keys on an unmarked model the statistic behaves like N(0, 1): no false claims."""
    z = np.array([verify(base, hashlib.sha256(b"null key %d" % i).digest()).statistic for i in range(200)])
    print(f"null z over 200 keys: mean {z.mean():.3f}, std {z.std():.3f}, max {z.max():.2f}")
    assert abs(z.mean()) < 0.3 and 0.75 < z.std() < 1.25 and z.max() < 4.5


def test_independently_trained_models_are_not_claimed(base: bytes, split) -> None:  # type: ignore[no-untyped-def]
    script = _train_script()
    torch.set_num_threads(1)
    for seed in (11, 12, 13):
        torch.manual_seed(seed)
        mlp = script.build_mlp()
        script.train(mlp, split.x_train, split.y_train, epochs=8, seed=seed)
        weights = {f"inner.{k}": v.detach().numpy() for k, v in mlp.state_dict().items()}
        model = _with_weights(base, weights)
        assert _accuracy(model, split.x_test, split.y_test) > 0.9  # a real, working competitor
        for key in (KEY, OTHER_KEY):
            r = verify(model, key)
            print(f"independent seed {seed}: z={r.statistic:.2f} p={r.p_value:.3g}")
            assert not r.present and r.p_value > 1e-4


# --- survival ------------------------------------------------------------------------------------------------------
def test_survives_fine_tuning(marked: bytes, split) -> None:  # type: ignore[no-untyped-def]
    from edgeshield.adversarial._torch import onnx_to_torch

    torch.manual_seed(0)
    module = _train(onnx_to_torch(marked), split.x_train, split.y_train, 10, 0)
    tuned_weights = trained_weights(module)
    assert {"inner.0.weight", "inner.2.weight", "inner.4.weight"} <= tuned_weights.keys()
    tuned = _with_weights(marked, tuned_weights)
    assert tuned != marked and _accuracy(tuned, split.x_test, split.y_test) > 0.95
    r = verify(tuned, KEY)
    print(f"fine-tuned 10 epochs: z={r.statistic:.2f} p={r.p_value:.3g} bound={r.p_bound:.3g}")
    assert r.present and r.p_value < 1e-6
    assert not verify(tuned, OTHER_KEY).present


def test_survives_magnitude_pruning(marked: bytes, split) -> None:  # type: ignore[no-untyped-def]
    pruned = magnitude_pruned(marked, 0.3)
    assert _accuracy(pruned, split.x_test, split.y_test) > 0.95
    r = verify(pruned, KEY)
    print(f"pruned 30%: z={r.statistic:.2f} p={r.p_value:.3g} bound={r.p_bound:.3g}")
    assert r.present and r.p_value < 1e-6


@pytest.mark.parametrize("per_channel", [False, True])
def test_survives_int8_dynamic_quantisation(marked: bytes, split, tmp_path: Path, per_channel: bool) -> None:  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "marked.onnx", tmp_path / "int8.onnx"
    src.write_bytes(marked)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    q = dst.read_bytes()
    names = {t.name for t in onnx.load_model_from_string(q).graph.initializer}
    assert "inner.0.weight" not in names and any(n.endswith("_quantized") for n in names)
    assert _accuracy(q, split.x_test, split.y_test) > 0.95
    r = verify(q, KEY)
    print(f"int8 (per_channel={per_channel}): z={r.statistic:.2f} p={r.p_value:.3g} bound={r.p_bound:.3g}")
    assert r.present and r.p_value < 1e-6 and r.positions_used == 2000
    assert not verify(q, OTHER_KEY).present


def test_float16_copy_keeps_the_mark(marked: bytes) -> None:
    proto = onnx.load_model_from_string(marked)
    for t in proto.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    assert verify(proto.SerializeToString(), KEY).present  # weights read by name; the graph need not run


def test_renamed_copy_is_out_of_scope(marked: bytes) -> None:
    """Renaming every weight re-keys the positions: this scheme cannot see such a copy (documented limitation)."""
    proto = onnx.load_model_from_string(marked)
    for t in proto.graph.initializer:
        t.name = "renamed_" + t.name
    assert not verify(proto.SerializeToString(), KEY).present


# --- keys and bad input --------------------------------------------------------------------------------------------
def test_key_file_roundtrip_is_private(tmp_path: Path) -> None:
    path = tmp_path / "wm.key"
    key = generate_key(path)
    assert load_key(path) == key and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(OutputExistsError):
        generate_key(path)
    assert generate_key(path, overwrite=True) != key


def test_bad_keys_and_inputs(base: bytes, tmp_path: Path) -> None:
    (tmp_path / "short.key").write_bytes(b"x" * 16)
    with pytest.raises(KeyFileError):
        load_key(tmp_path / "short.key")
    with pytest.raises(KeyFileError):
        embed(base, b"short")
    with pytest.raises(InvalidArgumentError):
        embed(base, KEY, strength=0)
    with pytest.raises(InvalidArgumentError):
        embed(base, KEY, strength=math.nan)
    with pytest.raises(InvalidArgumentError):
        verify(base, KEY, positions=3)
    with pytest.raises(UnsupportedModelError):
        verify(b"not an onnx model", KEY)
