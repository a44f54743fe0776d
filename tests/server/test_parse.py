"""Request bodies to arrays: every limit holds before anything is allocated, and nothing but a 4xx ever escapes."""

from __future__ import annotations

import io
import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshield.adversarial import InputSpec
from edgeshield.server._parse import MAX_NUMBER_CHARS, BodyRejected, parse_inputs

SPEC = InputSpec(shape=(None, 64), dtype="float32")  # what the server derives from the digits model alone
JSON, NPY = "application/json", "application/x-npy"


def rejected(body: bytes, content_type: str = JSON, spec: InputSpec = SPEC) -> BodyRejected:
    with pytest.raises(BodyRejected) as info:
        parse_inputs(body, content_type, spec, max_batch=1024)
    assert 400 <= info.value.status < 500 and str(info.value)
    return info.value


def npy(x: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("body", [b'{"inputs": [[0,1,2]]}', b"[]", b"[[]]", b"[1,2,3]", b'{"inputs": [[1e400]]}',
                                  b'{"inputs": [[[null, null]]]}', b'{"inputs": []}', b'{"inputs": [[]]}',
                                  b'{"inputs": [[NaN]]}', b'{"inputs": 5}', b'{"inputs": [[0.5]], "x": 1}'])
def test_the_reported_500s_are_422s(body: bytes) -> None:
    assert rejected(body).status == 422


def test_a_400_digit_integer_is_refused_by_length() -> None:
    err = rejected(b'{"inputs": [[' + b"1" * 400 + b"]]}")
    assert err.status == 422 and f"at most {MAX_NUMBER_CHARS}" in str(err)


def test_json_nested_100000_deep_never_reaches_the_parser() -> None:
    err = rejected(b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert err.field == "shape" and "100001" in str(err)


def test_brackets_hidden_in_the_key_do_not_lower_the_depth_count() -> None:
    body = b'{"]]]]]]]]]]": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert rejected(body).field == "shape"


def test_a_huge_npy_header_is_refused_without_allocating() -> None:
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 64), np.float32))
    for shape in [(400_000_000, 64), (1000, 64), (1, 64)]:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {**header, "shape": shape})
        body = buf.getvalue() + b"\0" * 512  # far fewer bytes than any of those shapes but (2, 64) holds
        tracemalloc.start()
        try:
            rejected(body, NPY)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, (shape, peak)


def test_npy_must_match_the_spec_before_decoding() -> None:
    x = np.zeros((2, 64), np.float32)
    assert np.array_equal(parse_inputs(npy(x), NPY, SPEC, max_batch=8), x)
    assert rejected(npy(x.astype(np.float64)), NPY).field == "dtype"
    assert rejected(npy(x.astype(">f4")), NPY).field == "dtype"
    assert rejected(npy(x[:, :63]), NPY).field == "shape[1]"
    assert rejected(npy(x[0]), NPY).field == "shape"
    assert rejected(npy(x)[:-4], NPY).field == "body"  # cut short
    assert rejected(npy(x) + b"\0", NPY).field == "body"  # trailing bytes
    pickled = npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert rejected(pickled, NPY).status == 422  # pickles are never read
    with pytest.raises(BodyRejected) as info:
        parse_inputs(npy(np.zeros((9, 64), np.float32)), NPY, SPEC, max_batch=8)
    assert info.value.field == "batch"
    fortran = np.asfortranarray(np.arange(128, dtype=np.float32).reshape(2, 64))
    assert np.array_equal(parse_inputs(npy(fortran), NPY, SPEC, max_batch=8), fortran)


def test_content_types() -> None:
    body = json.dumps({"inputs": [[0.5] * 64]}).encode()
    assert parse_inputs(body, "application/json; charset=utf-8", SPEC, max_batch=8).shape == (1, 64)
    assert rejected(body, "text/plain").status == 415
    assert rejected(body, "").status == 415


def test_integer_specs_refuse_fractions_instead_of_truncating() -> None:
    spec = InputSpec(shape=(None, 2), dtype="int64")
    assert parse_inputs(b'{"inputs": [[1, 2e0]]}', JSON, spec, max_batch=8).tolist() == [[1, 2]]
    assert rejected(b'{"inputs": [[1.5, 2]]}', spec=spec).field == "dtype"
    assert rejected(b'{"inputs": [[1e30, 2]]}', spec=spec).field == "dtype"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=80,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_values, wrap=st.booleans(), content_type=st.sampled_from([JSON, NPY]))
def test_arbitrary_json_is_an_array_or_a_4xx(doc: object, wrap: bool, content_type: str) -> None:
    body = json.dumps({"inputs": doc} if wrap else doc).encode()
    try:
        x = parse_inputs(body, content_type, SPEC, max_batch=16)
    except BodyRejected as exc:  # either outcome is fine, so no pytest.raises
        assert 400 <= exc.status < 500  # noqa: PT017
    else:
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 64 and 1 <= len(x) <= 16


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=2048), content_type=st.sampled_from([JSON, NPY, "text/plain"]))
def test_arbitrary_bytes_are_an_array_or_a_4xx(body: bytes, content_type: str) -> None:
    try:
        parse_inputs(body, content_type, SPEC, max_batch=16)
    except BodyRejected as exc:  # either outcome is fine, so no pytest.raises
        assert 400 <= exc.status < 500  # noqa: PT017


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=64,
                                                               max_size=64), min_size=n, max_size=n)))
def test_valid_batches_round_trip_in_both_encodings(rows: list[list[float]]) -> None:
    x = np.asarray(rows, dtype=np.float32)
    assert np.array_equal(parse_inputs(json.dumps({"inputs": rows}).encode(), JSON, SPEC, max_batch=8), x)
    assert np.array_equal(parse_inputs(npy(x), NPY, SPEC, max_batch=8), x)
