"""Shared fixtures: key directories and small real ONNX models (never fakes of the parts under test)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

from hypothesis import settings

# CI must not depend on luck: property tests there use a fixed, per-test derandomised search (locally they explore).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from edgeshield import keys  # noqa: E402


@dataclass(frozen=True)
class KeySet:
    dir: Path
    owner_priv: keys.OwnerPrivateKey
    owner_pub: keys.OwnerPublicKey
    device_priv: keys.DevicePrivateKey
    device_pub: keys.DevicePublicKey


def _keyset(d: Path) -> KeySet:
    keys.init_keys(d)
    return KeySet(
        d,
        keys.load_owner_private_key(d / "owner.key"),
        keys.load_owner_public_key(d / "owner.pub"),
        keys.load_device_private_key(d / "device.key"),
        keys.load_device_public_key(d / "device.pub"),
    )


@pytest.fixture
def keyset(tmp_path: Path) -> KeySet:
    return _keyset(tmp_path / "keys")


@pytest.fixture
def other_keyset(tmp_path: Path) -> KeySet:
    return _keyset(tmp_path / "other-keys")


def make_matmul_model(path: Path, d: int = 16, blocks: int = 1, seed: int = 0) -> Path:
    """A real ONNX model: x[N,d] -> (x @ W_0 @ ... @ W_k) + b, float32 weights (d*d*4 bytes each)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(blocks):
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) * 0.1).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), "b"))
    nodes.append(helper.make_node("Add", [prev, "b"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A ~1.2 KB model whose 16x16 weight matrix (1024 bytes) lands in the weights section."""
    return make_matmul_model(tmp_path / "tiny.onnx")


@pytest.fixture
def digits_model() -> Path:
    from edgeshield.models import digits_model_path

    return digits_model_path()
