"""BenignTransforms: declared honest variations (shift, noise, contrast) and their configuration."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.errors import InvalidArgumentError
from edgeshield.extraction import BenignTransforms


def _image(rows: int = 8, cols: int = 8) -> np.ndarray:
    return np.arange(1, rows * cols + 1, dtype=np.float32).reshape(1, rows * cols) / (rows * cols)


def test_shift_moves_pixels_and_fills_background() -> None:
    t = BenignTransforms(image_shape=(8, 8))
    x = _image()
    img = x.reshape(8, 8)
    down_right = t.shift(x, 1, 1).reshape(8, 8)
    assert (down_right[1:, 1:] == img[:-1, :-1]).all()
    assert (down_right[0] == 0).all() and (down_right[:, 0] == 0).all()
    up_left = t.shift(x, -1, -1).reshape(8, 8)
    assert (up_left[:-1, :-1] == img[1:, 1:]).all() and (up_left[-1] == 0).all() and (up_left[:, -1] == 0).all()
    assert (t.shift(x, 0, 0) == x).all()


@settings(max_examples=25, deadline=None)
@given(shifts=st.integers(0, 2), noise=st.floats(0.0, 0.2), lo=st.floats(0.3, 1.0), n=st.integers(1, 5),
       seed=st.integers(0, 2**31))
def test_expand_keeps_the_originals_and_the_value_range(shifts: int, noise: float, lo: float, n: int,
                                                        seed: int) -> None:
    t = BenignTransforms(shifts=shifts, noise=noise, contrast=(lo, 1.0))
    x = np.random.default_rng(seed).uniform(0, 1, (n, 64)).astype(np.float32)
    out = t.expand(x, np.random.default_rng(seed))
    assert out.dtype == np.float32 and out.shape[1:] == (64,) and len(out) % n == 0
    assert (out[:n] == x).all()  # the clean inputs come first, unchanged
    assert out.min() >= 0.0 and out.max() <= 1.0
    copies = (2 * shifts + 1) ** 2 - 1 + (noise > 0) + (lo != 1.0)
    copies += 1 if (shifts or noise > 0 or lo != 1.0) else 0
    assert len(out) == n * (1 + copies)


def test_contrast_fades_ink_towards_the_background() -> None:
    t = BenignTransforms(shifts=0, noise=0.0, contrast=(0.5, 0.5))
    x = _image()
    out = t.expand(x, np.random.default_rng(0))
    assert np.allclose(out[1], 0.5 * x[0]) and np.allclose(out[2], 0.5 * x[0])


def test_expand_is_reproducible_from_the_generator() -> None:
    t, x = BenignTransforms(), np.random.default_rng(0).uniform(0, 1, (4, 64))
    assert (t.expand(x, np.random.default_rng(3)) == t.expand(x, np.random.default_rng(3))).all()


def test_config_round_trip_and_validation() -> None:
    t = BenignTransforms(shifts=2, noise=0.03, contrast=(0.6, 1.1), image_shape=(8, 8))
    assert BenignTransforms.from_config(t.to_config()) == t
    assert BenignTransforms.from_config({}) == BenignTransforms()
    import json

    assert BenignTransforms.from_config(json.loads(json.dumps(t.to_config()))) == t
    bad: list[dict[str, object]] = [
        {"shifts": -1}, {"shifts": 1.5}, {"shifts": True}, {"noise": -0.1}, {"noise": "x"}, {"contrast": (0.0, 1.0)},
        {"contrast": (1.0, 0.5)}, {"contrast": 1.0}, {"contrast": (float("nan"), 1.0)}, {"image_shape": (0, 8)},
        {"image_shape": (8.5, 8)}, {"background": 2.0}, {"value_range": (1.0, 0.0)}, {"rotate": 10},
    ]
    for config in bad:
        with pytest.raises(InvalidArgumentError):
            BenignTransforms.from_config(config)
    with pytest.raises(InvalidArgumentError):
        BenignTransforms.from_config([("shifts", 1)])  # type: ignore[arg-type]


def test_shapes_that_do_not_fit_are_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        BenignTransforms().expand(np.zeros((2, 60)), np.random.default_rng(0))  # not a square image
    with pytest.raises(InvalidArgumentError):
        BenignTransforms(image_shape=(4, 4)).expand(np.zeros((2, 64)), np.random.default_rng(0))
    with pytest.raises(InvalidArgumentError):
        BenignTransforms().expand(np.zeros((0, 64)), np.random.default_rng(0))
    assert BenignTransforms(shifts=0).expand(np.zeros((2, 60)), np.random.default_rng(0)).shape[1] == 60
