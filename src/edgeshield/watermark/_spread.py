"""A keyed spread-spectrum watermark in an ONNX model's weights.

The owner's secret key picks ``positions`` weights across the float initializers of rank >= 2 and a ±1 signature
for them; embedding adds ``strength * std(layer) * sign`` to each. Verification standardises each layer of the
suspect model (mean removed, divided by its std), then computes the self-normalised correlation

    z = sum_i s_i x_i / sqrt(sum_i x_i^2)

over the key's positions. Under H0 (the weights carry no watermark for this key) the signs are independent of the
weights, so conditional on the weights z has mean 0 and variance 1 exactly and is close to N(0, 1); Hoeffding's
inequality bounds its tail by exp(-z^2/2) whatever the weights' distribution. ``present`` is decided on that
distribution-free bound, so a claim never rests on the normal approximation. The statistic ignores a per-layer
rescaling and zeroed (pruned) weights only dilute it.

Everything secret is derived from the 32-byte key with HKDF-SHA256; per-tensor ChaCha20 keystreams give a keyed
random score and sign for every weight, and the ``positions`` lowest scores across all eligible tensors are used.
Verification finds the same positions when the suspect keeps the initializer names and shapes (fine-tuned,
pruned, float16 or int8-quantised copies: ``*_quantized`` weights are dequantised with their ``*_scale`` and
``*_zero_point`` and mapped back to the original name, un-transposing ``*_Transposed`` ones). A copy whose names
or shapes differ (for instance a model stolen by extraction, trained from scratch) cannot be checked this way.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.errors import InvalidArgumentError, KeyFileError, MissingDependencyError, UnsupportedModelError

if TYPE_CHECKING:
    import onnx

SCHEME = "spread-spectrum-v1"  # recorded in bundle metadata when protect embeds the mark
KEY_SIZE = 32
DEFAULT_STRENGTH = 0.25
DEFAULT_POSITIONS = 2000
DEFAULT_P_THRESHOLD = 1e-6
_INFO = b"edgeshield/watermark/spread-spectrum/v1"
_QUANT_SUFFIX = "_quantized"
_TRANSPOSED = "_Transposed"


@dataclass(frozen=True)
class EmbedReport:
    """What ``embed`` changed: the positions used, the strength, the tensors touched and the largest change."""

    positions: int
    strength: float
    tensors: dict[str, int]  # tensor name -> number of watermarked positions in it
    max_abs_change: float
    expected_statistic: float  # z a verifier sees on the unmodified watermarked model (about strength*sqrt(n))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyResult:
    """The detection statistic, its one-sided p-values under H0 and the decision."""

    statistic: float  # z, ~N(0, 1) without the watermark
    p_value: float  # one-sided normal tail P(Z >= z)
    p_bound: float  # distribution-free Hoeffding bound exp(-z^2/2) for z > 0 (1.0 otherwise); decides `present`
    positions_used: int
    threshold: float
    present: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- keys ----------------------------------------------------------------------------------------------------------
def generate_key(path: str | os.PathLike[str] | None = None, *, overwrite: bool = False) -> bytes:
    """Return a fresh 32-byte watermark key; with ``path``, also write it there (0600, atomically)."""
    key = os.urandom(KEY_SIZE)
    if path is not None:
        atomic_write_bytes(path, key, mode=0o600, overwrite=overwrite)
    return key


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a watermark key written by ``generate_key``."""
    p = check_readable_file(path, what="watermark key")
    data = p.read_bytes()
    if len(data) != KEY_SIZE:
        raise KeyFileError(f"a watermark key is {KEY_SIZE} raw bytes, {p} holds {len(data)}")
    return data


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise KeyFileError(f"a watermark key must be {KEY_SIZE} bytes")
    return bytes(key)


# --- keyed selection -----------------------------------------------------------------------------------------------
def _tensor_words(key: bytes, name: str, size: int) -> np.ndarray:
    """One keyed pseudo-random uint32 per element of tensor ``name`` (HKDF -> ChaCha20 keystream)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    stream_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                      info=_INFO + b"/tensor/" + name.encode("utf-8")).derive(key)
    enc = Cipher(algorithms.ChaCha20(stream_key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (4 * size)), dtype="<u4")


def _select(key: bytes, shapes: dict[str, tuple[int, ...]], positions: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tensor name -> (flat indices, ±1 signs): the ``positions`` lowest keyed scores across all tensors."""
    names = sorted(shapes)
    words = [_tensor_words(key, n, int(np.prod(shapes[n]))) for n in names]
    total = sum(len(w) for w in words)
    if total == 0:
        raise UnsupportedModelError("the model has no float weight tensors of rank >= 2 to watermark")
    n = min(positions, total)
    scores = np.concatenate([w >> np.uint32(1) for w in words])
    chosen = np.sort(np.argsort(scores, kind="stable")[:n])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    start = 0
    for name, w in zip(names, words, strict=True):
        mine = chosen[(chosen >= start) & (chosen < start + len(w))] - start
        if len(mine):
            out[name] = (mine, np.where(w[mine] & np.uint32(1), 1.0, -1.0))
        start += len(w)
    return out


# --- model access --------------------------------------------------------------------------------------------------
def _load(model_bytes: bytes) -> onnx.ModelProto:
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise MissingDependencyError("weight watermarks need onnx: pip install 'edgeshield[owner]'") from None

    if not isinstance(model_bytes, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"expected the model's bytes, not {type(model_bytes).__name__}")
    try:
        model = onnx.load_model_from_string(bytes(model_bytes))
    except (DecodeError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"not a valid ONNX model: {type(exc).__name__}") from None
    if not model.graph.node:
        raise UnsupportedModelError("not a valid ONNX model: the graph has no nodes")
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise UnsupportedModelError(f"initializer {t.name!r} uses external data; give a self-contained model")
    return model


def _float_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim >= 2 and a.dtype in (np.float16, np.float32, np.float64) and a.size:
            out[t.name] = a
    return out


def _dequantised_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float views of ``*_quantized`` int8/uint8 weights, under the name (and layout) they had before quantising."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for name, t in inits.items():
        if not name.endswith(_QUANT_SUFFIX):
            continue
        base = name[: -len(_QUANT_SUFFIX)]
        if f"{base}_scale" not in inits:
            continue
        q = numpy_helper.to_array(t)
        if q.ndim < 2 or q.dtype not in (np.int8, np.uint8):
            continue
        scale = numpy_helper.to_array(inits[f"{base}_scale"]).astype(np.float64)
        zp_t = inits.get(f"{base}_zero_point")
        zp = numpy_helper.to_array(zp_t).astype(np.float64) if zp_t is not None else np.zeros_like(scale)
        w = (q.astype(np.float64) - _broadcast(zp, q.shape)) * _broadcast(scale, q.shape)
        if base.endswith(_TRANSPOSED):
            base, w = base[: -len(_TRANSPOSED)], w.T
        out[base] = w
    return out


def _broadcast(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A scalar or a per-channel vector, shaped to broadcast against a weight of ``shape``."""
    if v.size == 1:
        return v.reshape(())
    axes = [i for i, d in enumerate(shape) if d == v.size]
    if v.ndim != 1 or not axes:
        raise UnsupportedModelError(f"cannot dequantise: scale/zero point of shape {v.shape} for weight {shape}")
    axis = axes[-1] if len(axes) > 1 else axes[0]  # MatMul weights are quantised per output column (the last axis)
    return v.reshape([v.size if i == axis else 1 for i in range(len(shape))])


def _standardised(w: np.ndarray) -> np.ndarray:
    w = w.astype(np.float64).ravel()
    sd = w.std()
    return (w - w.mean()) / sd if sd > 0 else np.zeros_like(w)


# --- embed / verify ------------------------------------------------------------------------------------------------
def embed(model_bytes: bytes, key: bytes, *, strength: float = DEFAULT_STRENGTH,
          positions: int = DEFAULT_POSITIONS) -> tuple[bytes, EmbedReport]:
    """Return the model with the key's watermark added to its weights, and a report of what changed."""
    from onnx import numpy_helper

    key = _check_key(key)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise InvalidArgumentError(f"strength must be in (0, 1], not {strength!r}")
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 16:
        raise InvalidArgumentError(f"positions must be an integer of at least 16, not {positions!r}")
    model = _load(model_bytes)
    weights = _float_weights(model)
    chosen = _select(key, {n: w.shape for n, w in weights.items()}, positions)
    max_change = 0.0
    for t in model.graph.initializer:
        if t.name not in chosen:
            continue
        idx, signs = chosen[t.name]
        w = weights[t.name]
        flat = w.astype(np.float64).ravel()
        delta = float(strength) * float(flat.std()) * signs
        flat[idx] += delta
        new = flat.reshape(w.shape).astype(w.dtype)
        max_change = max(max_change, float(np.abs(new.astype(np.float64) - w).max()))
        t.CopyFrom(numpy_helper.from_array(new, t.name))
    used = sum(len(i) for i, _ in chosen.values())
    report = EmbedReport(positions=used, strength=float(strength),
                         tensors={n: len(i) for n, (i, _) in sorted(chosen.items())},
                         max_abs_change=max_change,
                         expected_statistic=float(strength) * math.sqrt(used))
    return model.SerializeToString(), report


def verify(model_bytes: bytes, key: bytes, *, positions: int = DEFAULT_POSITIONS,
           threshold: float = DEFAULT_P_THRESHOLD) -> VerifyResult:
    """Test the model's weights for the key's watermark (``positions`` must match the value used to embed)."""
    key = _check_key(key)
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 16:
        raise InvalidArgumentError(f"positions must be an integer of at least 16, not {positions!r}")
    if not 0 < threshold < 1:
        raise InvalidArgumentError(f"threshold must be in (0, 1), not {threshold!r}")
    model = _load(model_bytes)
    weights = {**_float_weights(model), **_dequantised_weights(model)}
    chosen = _select(key, {n: w.shape for n, w in weights.items()}, positions)
    num = den = 0.0
    used = 0
    for name, (idx, signs) in chosen.items():
        x = _standardised(weights[name])[idx]
        num += float(signs @ x)
        den += float(x @ x)
        used += len(idx)
    z = num / math.sqrt(den) if den > 0 else 0.0
    p_value = 0.5 * math.erfc(z / math.sqrt(2.0))
    p_bound = math.exp(-z * z / 2.0) if z > 0 else 1.0
    return VerifyResult(statistic=z, p_value=p_value, p_bound=p_bound, positions_used=used,
                        threshold=float(threshold), present=p_bound < threshold)


def embed_file(model: str | os.PathLike[str], key: bytes, out: str | os.PathLike[str], *,
               strength: float = DEFAULT_STRENGTH, positions: int = DEFAULT_POSITIONS,
               overwrite: bool = True) -> EmbedReport:
    """``embed`` from one ONNX file to another (written atomically)."""
    data = check_readable_file(model, what="model").read_bytes()
    marked, report = embed(data, key, strength=strength, positions=positions)
    atomic_write_bytes(Path(out), marked, overwrite=overwrite)
    return report
