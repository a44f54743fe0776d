"""Update validation: every malformed client update is an UpdateRejected with its reason, valid ones round-trip."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeshield.errors import EdgeShieldError, InputError, InvalidArgumentError
from edgeshield.fl._updates import REASONS, UpdateRejected, flatten, template_of, unflatten, validate_update

TEMPLATE = [((3, 2), "float32"), ((4,), "float32"), ((), "float64")]


def _good() -> list[np.ndarray]:
    return [np.ones((3, 2), np.float32), np.arange(4, dtype=np.float32), np.array(0.5)]


def _reason(arrays: object, **kw: object) -> str:
    args: dict[str, object] = {"round": 3, "expected_round": 3, "max_norm": 100.0, **kw}
    with pytest.raises(UpdateRejected) as info:
        validate_update(arrays, TEMPLATE, **args)  # type: ignore[arg-type]
    assert info.value.reason in REASONS
    assert isinstance(info.value, InputError)
    return info.value.reason


def test_valid_update_is_the_flat_vector() -> None:
    v = validate_update(_good(), TEMPLATE, round=3, expected_round=3, max_norm=100.0)
    assert v.dtype == np.float64
    assert v.tolist() == [1.0] * 6 + [0.0, 1.0, 2.0, 3.0, 0.5]
    back = unflatten(v, TEMPLATE)
    assert [a.dtype.name for a in back] == ["float32", "float32", "float64"]
    assert all(np.array_equal(a, b) for a, b in zip(back, _good(), strict=True))


@pytest.mark.parametrize(
    ("arrays", "kw", "reason"),
    [
        (_good(), {"round": 2}, "round"),  # replayed from an earlier round
        (_good(), {"round": 4}, "round"),  # reordered / from the future
        (_good(), {"round": True, "expected_round": 1}, "round"),
        (_good(), {"round": "3"}, "round"),
        ("not arrays", {}, "type"),
        (None, {}, "type"),
        ({"a": 1}, {}, "type"),
        (_good()[:2], {}, "count"),
        ([*_good(), np.zeros(1, np.float32)], {}, "count"),
        ([[1.0] * 6, *_good()[1:]], {}, "type"),
        ([np.ones((3, 2), np.float64), *_good()[1:]], {}, "dtype"),
        ([np.ones((3, 2), np.int32), *_good()[1:]], {}, "dtype"),
        ([np.full((3, 2), "x"), *_good()[1:]], {}, "dtype"),
        ([np.ones((3, 2), object), *_good()[1:]], {}, "dtype"),
        ([np.ones((3, 2), np.complex64), *_good()[1:]], {}, "dtype"),
        ([np.ones((2, 3), np.float32), *_good()[1:]], {}, "shape"),
        ([np.ones(6, np.float32), *_good()[1:]], {}, "shape"),
        ([np.full((3, 2), np.nan, np.float32), *_good()[1:]], {}, "nonfinite"),
        ([*_good()[:2], np.array(np.inf)], {}, "nonfinite"),
        ([np.full((3, 2), 1e3, np.float32), *_good()[1:]], {}, "norm"),
    ],
)
def test_each_bad_update_is_rejected_with_its_reason(arrays: object, kw: dict[str, object], reason: str) -> None:
    assert _reason(arrays, **kw) == reason


def test_large_finite_values_do_not_overflow_the_norm() -> None:
    big = [np.full((3, 2), 1e200), np.zeros(4), np.array(0.0)]
    template = template_of(big)
    v = validate_update(big, template, round=0, expected_round=0, max_norm=None)
    assert v.max() == 1e200
    with pytest.raises(UpdateRejected, match="exceeds"):
        validate_update(big, template, round=0, expected_round=0, max_norm=1e200)
    huge = [np.full((3, 2), 1.5e308), np.zeros(4), np.array(0.0)]  # every value finite, the norm is not
    with pytest.raises(UpdateRejected, match="overflows") as info:
        validate_update(huge, template, round=0, expected_round=0, max_norm=None)
    assert info.value.reason == "norm"


def test_the_servers_own_mistakes_are_argument_errors_not_rejections() -> None:
    for kw in ({"max_norm": 0.0}, {"max_norm": float("nan")}, {"expected_round": "1"}):
        args: dict[str, object] = {"round": 1, "expected_round": 1, "max_norm": None, **kw}
        with pytest.raises(InvalidArgumentError) as info:
            validate_update(_good(), TEMPLATE, **args)  # type: ignore[arg-type]
        assert not isinstance(info.value, UpdateRejected)
    with pytest.raises(InvalidArgumentError):
        validate_update(_good(), [((3, 2), "object")], round=1, expected_round=1, max_norm=None)
    with pytest.raises(InvalidArgumentError):
        unflatten(np.zeros(5), TEMPLATE)


def test_flatten_of_nothing_and_integer_unflatten() -> None:
    assert flatten([]).shape == (0,)
    back = unflatten(np.array([1.4, 2.6]), [((2,), "int64")])
    assert back[0].dtype == np.int64 and back[0].tolist() == [1, 3]


# --- properties: anything a client can send ends in a vector or in UpdateRejected -------------------------------
_dtypes = st.sampled_from(["float32", "float64", "float16", "int32", "int64", "uint8", "bool", "complex64"])
_arrays = _dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
_anything = st.one_of(
    _arrays,
    st.none(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.floats(), max_size=4),
    st.builds(lambda: np.array(["a", "b"])),
    st.builds(lambda: np.zeros(2, dtype=[("x", "f4")])),
    st.builds(lambda: np.array([None, 1.0], dtype=object)),
)
_templates = st.lists(
    st.tuples(
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        st.sampled_from(["float32", "float64", "int64"]),
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays=st.one_of(st.lists(_anything, max_size=5), st.tuples(_anything, _anything), _anything),
    template=_templates,
    rnd=st.one_of(st.integers(-3, 3), st.floats(), st.booleans(), st.none(), st.text(max_size=2)),
    max_norm=st.one_of(st.none(), st.floats(min_value=1e-6, max_value=1e6)),
)
def test_arbitrary_input_raises_only_update_rejected(
    arrays: object, template: list[tuple[tuple[int, ...], str]], rnd: object, max_norm: float | None
) -> None:
    try:
        v: np.ndarray | UpdateRejected = validate_update(
            arrays,
            template,
            round=rnd,  # type: ignore[arg-type]
            expected_round=1,
            max_norm=max_norm,
        )
    except UpdateRejected as exc:  # anything else propagates and fails the test
        v = exc
    if isinstance(v, UpdateRejected):
        assert v.reason in REASONS
    else:
        assert v.dtype == np.float64 and v.ndim == 1 and np.all(np.isfinite(v))
        assert max_norm is None or float(np.linalg.norm(v)) <= max_norm * (1 + 1e-12)


_finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def _valid_updates(draw: st.DrawFn) -> list[np.ndarray]:
    template = draw(_templates)
    out = []
    for shape, dtype in template:
        elements = st.floats(width=32, **_finite) if dtype == "float32" else None
        if dtype == "float64":
            elements = st.floats(min_value=-1e100, max_value=1e100)
        if dtype == "int64":  # float64 holds integers exactly up to 2**53 (the documented limit of flatten)
            elements = st.integers(-(2**53), 2**53)
        out.append(draw(hnp.arrays(dtype, shape, elements=elements)))
    return out


@settings(max_examples=200, deadline=None)
@given(arrays=_valid_updates(), rnd=st.integers(0, 10**6))
def test_valid_updates_round_trip(arrays: list[np.ndarray], rnd: int) -> None:
    template = template_of(arrays)
    v = validate_update(arrays, template, round=rnd, expected_round=rnd, max_norm=None)
    assert v.size == sum(a.size for a in arrays)
    back = unflatten(v, template)
    for a, b in zip(arrays, back, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)


def test_rejection_is_an_edgeshield_error() -> None:
    assert issubclass(UpdateRejected, EdgeShieldError)
