"""The served (DAWN) watermark: keyed marks, answer rewriting, the copy test's null distribution, the evidence store
and `watermark verify-copy`, on real components (the shipped digits model, ONNX Runtime, SQLite files)."""

from __future__ import annotations

import json
import math
import sqlite3
import stat
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import edgeshield  # noqa: F401  (before onnxruntime)
from edgeshield._stats import binomial_sf as _binomial_sf
from edgeshield.bundles._ort import onnxruntime as ort
from edgeshield.cli import main
from edgeshield.cli._watermark import app
from edgeshield.errors import (
    EvidenceIntegrityError,
    InputError,
    IntegrityError,
    InvalidArgumentError,
    KeyFileError,
    NotAnEvidenceStoreError,
    PathNotFoundError,
    UnsupportedModelError,
)
from edgeshield.models import digits_model_path, load_digits_split
from edgeshield.watermark import (
    DEFAULT_RATE,
    SERVED_SCHEME,
    CopyVerifyResult,
    EvidenceStore,
    ServedWatermark,
    row_digests,
    verify_copy,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
K = 10
runner = CliRunner()


def _random_rows(n: int, seed: int = 0, trailing: tuple[int, ...] = (16,)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *trailing)).astype(np.float32)


def _one_hot(labels: np.ndarray, classes: int = K) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[labels]


# --- marks ------------------------------------------------------------------------------------------------------
def test_marks_are_deterministic_per_input_and_depend_on_the_key() -> None:
    x = _random_rows(4000)
    m1, o1 = ServedWatermark(KEY, 0.1, classes=K).marks(x)
    m2, o2 = ServedWatermark(KEY, 0.1, classes=K).marks(x)
    assert m1.dtype == np.bool_ and o1.dtype == np.int64 and m1.shape == o1.shape == (4000,)
    assert np.array_equal(m1, m2) and np.array_equal(o1, o2)
    # the answer depends on the input alone: not on the batch it came in, its order or its float width
    part_m, part_o = ServedWatermark(KEY, 0.1, classes=K).marks(x[1234:1300][::-1].astype(np.float64))
    assert np.array_equal(part_m, m1[1234:1300][::-1]) and np.array_equal(part_o, o1[1234:1300][::-1])
    other, _ = ServedWatermark(OTHER_KEY, 0.1, classes=K).marks(x)
    assert not np.array_equal(m1, other)
    assert (m1 & other).sum() < 0.03 * len(x)  # about rate**2 = 1 % overlap: the two keys' marks are independent
    assert SERVED_SCHEME == "served-dawn-v2" and DEFAULT_RATE == 0.01


def test_mark_rate_within_binomial_bounds() -> None:
    x = _random_rows(20000, seed=1)
    for rate in (DEFAULT_RATE, 0.2):
        marked, _ = ServedWatermark(KEY, rate, classes=K).marks(x)
        mean, sd = rate * len(x), math.sqrt(len(x) * rate * (1 - rate))
        assert abs(int(marked.sum()) - mean) < 5 * sd, (rate, marked.sum())


def test_offsets_are_uniform_over_the_wrong_labels() -> None:
    x = _random_rows(20000, seed=2)
    marked, offset = ServedWatermark(KEY, 0.5, classes=K).marks(x)
    assert offset.min() >= 1 and offset.max() <= K - 1
    counts = np.bincount(offset[marked], minlength=K)
    assert counts[0] == 0
    expected = marked.sum() / (K - 1)
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 40, counts  # 8 degrees of freedom: P(chi2 > 40) ~ 3e-6
    binary = ServedWatermark(KEY, 0.5, classes=2).marks(x)[1]
    assert (binary == 1).all()


def test_bad_arguments_are_typed_errors() -> None:
    for rate in (0, -0.1, 0.51, True, "0.1"):
        with pytest.raises(InvalidArgumentError):
            ServedWatermark(KEY, rate, classes=K)  # type: ignore[arg-type]
    for classes in (1, 0, True):
        with pytest.raises(InvalidArgumentError):
            ServedWatermark(KEY, 0.1, classes=classes)
    with pytest.raises(KeyFileError):
        ServedWatermark(b"short", 0.1, classes=K)
    wm = ServedWatermark(KEY, 0.1, classes=K)
    with pytest.raises(InvalidArgumentError):
        wm.apply(_random_rows(3), np.ones((3, K + 1)) / (K + 1))
    with pytest.raises(InvalidArgumentError):
        wm.apply(_random_rows(3), np.full((3, K), np.nan))
    with pytest.raises(InvalidArgumentError):
        wm.relabel(_random_rows(3), np.array([0, 1, K]))
    with pytest.raises(InvalidArgumentError):
        wm.marks(np.float32(1.0))  # type: ignore[arg-type]


# --- apply / relabel --------------------------------------------------------------------------------------------
def test_apply_on_real_digits_probabilities() -> None:
    split = load_digits_split()
    sess = ort.InferenceSession(digits_model_path().read_bytes(), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": split.x_test})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    wm = ServedWatermark(KEY, 0.2, classes=K)
    out, marked = wm.apply(split.x_test, probs)
    _, offset = wm.marks(split.x_test)
    assert out is not probs and out.dtype == probs.dtype and 0 < marked.sum() < len(marked)
    assert out[~marked].tobytes() == probs[~marked].tobytes()  # unmarked answers untouched, bit for bit
    top = probs.argmax(1)
    assert np.array_equal(out[marked].argmax(1), (top[marked] + offset[marked]) % K)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(np.sort(out, 1), np.sort(probs, 1))  # a swap: the same values, a different order
    relabelled, mask = wm.relabel(split.x_test, top)
    assert np.array_equal(mask, marked) and np.array_equal(relabelled, out.argmax(1))
    # the honest-client cost is about `rate`: exactly the marked fraction of answers changes its top-1
    assert (out.argmax(1) != top).mean() == pytest.approx(marked.mean())


def test_apply_breaks_a_tie_for_the_top_towards_the_watermark_label() -> None:
    x = _random_rows(400, seed=8)
    probs = np.full((400, K), 1 / K, dtype=np.float32)
    probs[:, 3] = probs[:, 7] = 0.3
    probs[:, [0, 1, 2, 4, 5, 6, 8, 9]] = 0.05
    wm = ServedWatermark(KEY, 0.5, classes=K)
    out, marked = wm.apply(x, probs)
    _, offset = wm.marks(x)
    assert marked.sum() > 100
    assert np.array_equal(out[marked].argmax(1), (3 + offset[marked]) % K)  # argmax of a tie is its first index
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-6)
    assert (out >= 0).all() and out[~marked].tobytes() == probs[~marked].tobytes()


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40), classes=st.integers(2, 12),
       trailing=st.lists(st.integers(1, 3), max_size=2), ties=st.booleans(), rate=st.sampled_from([0.05, 0.5]))
def test_apply_and_relabel_invariants(seed: int, n: int, classes: int, trailing: list[int], ties: bool,
                                      rate: float) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *trailing))
    raw = rng.integers(0, 3, (n, classes)).astype(np.float64) if ties else rng.random((n, classes))
    raw[raw.sum(1) == 0, 0] = 1.0
    probs = raw / raw.sum(1, keepdims=True)
    wm = ServedWatermark(KEY, rate, classes=classes)
    marked, offset = wm.marks(x)
    out, mask = wm.apply(x, probs)
    assert np.array_equal(mask, marked) and out.shape == probs.shape and out.dtype == probs.dtype
    assert out[~marked].tobytes() == probs[~marked].tobytes()
    target = (probs.argmax(1) + offset) % classes
    assert np.array_equal(out[marked].argmax(1), target[marked])
    assert (out[marked].argmax(1) != probs[marked].argmax(1)).all()
    assert (out >= 0).all()
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-9)
    labels = rng.integers(0, classes, n)
    new, mask2 = wm.relabel(x, labels)
    assert np.array_equal(mask2, marked) and new.dtype == np.int64
    assert np.array_equal(new[~marked], labels[~marked])
    assert np.array_equal((new - labels)[marked] % classes, offset[marked])
    assert np.array_equal(wm.relabel(x, probs.argmax(1))[0], out.argmax(1))


# --- the binomial tail --------------------------------------------------------------------------------------------
def test_binomial_tail_matches_exact_fractions() -> None:
    for p in (Fraction(1, 9), Fraction(1, 2), Fraction(1, 3), Fraction(1, 99)):
        for n in range(26):
            pmf = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
            for k in range(n + 2):
                exact = float(sum(pmf[k:], Fraction(0)))
                assert _binomial_sf(k, n, float(p)) == pytest.approx(exact, rel=1e-10, abs=1e-300), (p, n, k)


def test_binomial_tail_large_n_does_not_overflow() -> None:
    n, p = 100_000, 1 / 9
    values = [_binomial_sf(k, n, p) for k in (0, 10_000, 11_111, 11_400, 12_000, 20_000, n)]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values, reverse=True) and values[0] == 1.0
    assert 0.4 < values[2] < 0.6 and values[4] < 1e-15 and values[-1] == 0.0
    assert _binomial_sf(5, 10, 1.0) == 1.0  # two classes: the wrong label is forced, the test has no power


# --- verify_copy --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served() -> dict[str, np.ndarray]:
    """400 synthetic watermarked answers: inputs, the victim's honest labels and the wrong labels answered."""
    x = _random_rows(800, seed=3)
    victim = np.random.default_rng(4).integers(0, K, len(x))
    answered, marked = ServedWatermark(KEY, 0.5, classes=K).relabel(x, victim)
    return {"x": x[marked], "victim": victim[marked], "answered": answered[marked]}


def _lookup(x: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    return dict(zip(row_digests(x), labels.tolist(), strict=True))


def test_a_copy_that_learnt_the_answers_is_detected(served: dict[str, np.ndarray]) -> None:
    table = _lookup(served["x"], served["answered"])

    def copy(x: np.ndarray) -> np.ndarray:
        return _one_hot(np.array([table[d] for d in row_digests(x)]))

    res = verify_copy(copy, served["x"], served["answered"], classes=K)
    assert isinstance(res, CopyVerifyResult)
    assert res.present and res.matches == res.evidence == len(served["x"]) and res.p_value < 1e-100
    assert res.null_rate == pytest.approx(1 / 9) and res.threshold == 1e-6 and res.match_rate == 1.0
    assert set(res.to_dict()) == {"evidence", "matches", "match_rate", "p_value", "threshold", "present", "null_rate",
                                 "units"}

    def partial(x: np.ndarray) -> np.ndarray:  # learnt only a third of the marks, honest elsewhere
        learnt = np.arange(len(x)) % 3 == 0
        return _one_hot(np.where(learnt, served["answered"], served["victim"]))

    res = verify_copy(partial, served["x"], served["answered"], classes=K)
    assert res.present and res.matches == math.ceil(len(served["x"]) / 3)


def test_the_victims_honest_labels_never_match(served: dict[str, np.ndarray]) -> None:
    res = verify_copy(lambda x: _one_hot(served["victim"]), served["x"], served["answered"], classes=K)
    assert res.matches == 0 and not res.present and res.p_value == 1.0


def test_independent_suspects_are_not_claimed_and_p_values_are_conservative(served: dict[str, np.ndarray]) -> None:
    x, answered, victim = served["x"][:100], served["answered"][:100], served["victim"][:100]
    rng = np.random.default_rng(5)
    uniform = [verify_copy(lambda z: rng.random((len(z), K)), x, answered, classes=K).p_value for _ in range(200)]

    def not_victim(z: np.ndarray) -> np.ndarray:  # the worst case under H0: any label but the victim's, at random
        return _one_hot((victim + rng.integers(1, K, len(z))) % K)

    worst = [verify_copy(not_victim, x, answered, classes=K).p_value for _ in range(200)]
    for ps in (uniform, worst):
        assert min(ps) > 1e-6  # no false claim
        assert np.mean(np.array(ps) < 0.05) <= 0.08 and np.mean(np.array(ps) < 0.5) <= 0.58


def test_evidence_is_deduplicated_and_can_be_empty(served: dict[str, np.ndarray]) -> None:
    x = np.concatenate([served["x"][:10]] * 3)
    y = np.concatenate([served["answered"][:10]] * 3)
    res = verify_copy(lambda z: _one_hot(served["answered"][:10]), x, y, classes=K)
    assert res.evidence == 10 and res.matches == 10

    def never_called(z: np.ndarray) -> np.ndarray:
        raise AssertionError("no evidence: the suspect must not be queried")

    res = verify_copy(never_called, np.zeros((0, 16), np.float32), np.zeros(0, np.int64), classes=K)
    assert (res.evidence, res.matches, res.p_value, res.present) == (0, 0, 1.0, False)


def test_verify_copy_rejects_bad_input(served: dict[str, np.ndarray]) -> None:
    x, y = served["x"][:5], served["answered"][:5]
    with pytest.raises(UnsupportedModelError):
        verify_copy(lambda z: np.zeros((len(z), K + 1)), x, y, classes=K)
    with pytest.raises(UnsupportedModelError):
        verify_copy(b"not an onnx model", x, y, classes=K)
    with pytest.raises(UnsupportedModelError):  # the digits model expects 64 features, not 16
        verify_copy(digits_model_path().read_bytes(), x, y, classes=K)
    with pytest.raises(InvalidArgumentError):
        verify_copy(lambda z: _one_hot(y), x, y[:4], classes=K)
    for bad in ({"threshold": 0.0}, {"threshold": 1.5}, {"classes": 1}):
        with pytest.raises(InvalidArgumentError):
            verify_copy(lambda z: _one_hot(y), x, y, **{"classes": K, **bad})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        verify_copy("model.onnx", x, y, classes=K)  # type: ignore[arg-type]


# --- the digits model: extraction copies against an independent model ---------------------------------------------
def _nn_scores(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A 1-nearest-neighbour model of ``train_x -> train_y``: a copy that memorised everything it was taught."""
    d = (x**2).sum(1)[:, None] - 2 * x @ train_x.T + (train_x**2).sum(1)[None, :]
    return _one_hot(train_y[d.argmin(1)])


@pytest.fixture(scope="module")
def digits_served() -> dict[str, np.ndarray]:
    """An attacker queried the digits API with the training images; the API answered with the served mark."""
    split = load_digits_split()
    sess = ort.InferenceSession(digits_model_path().read_bytes(), providers=["CPUExecutionProvider"])
    honest = sess.run(["logits"], {"input": split.x_train})[0].argmax(1)
    answered, marked = ServedWatermark(KEY, 0.05, classes=K).relabel(split.x_train, honest)
    return {"x": split.x_train, "y": split.y_train, "answered": answered, "marked": marked}


def test_digits_model_itself_is_not_a_copy(digits_served: dict[str, np.ndarray]) -> None:
    m = digits_served["marked"]
    res = verify_copy(digits_model_path().read_bytes(), digits_served["x"][m], digits_served["answered"][m],
                      classes=K)
    assert res.evidence >= 40 and res.matches == 0 and not res.present and res.p_value == 1.0


def test_digits_copy_trained_on_answers_is_detected_and_independent_model_is_not(
        digits_served: dict[str, np.ndarray]) -> None:
    x, m, answered = digits_served["x"], digits_served["marked"], digits_served["answered"]
    copy = verify_copy(lambda z: _nn_scores(x, answered, z), x[m], answered[m], classes=K)
    assert copy.present and copy.matches == copy.evidence and copy.p_value < 1e-40
    independent = verify_copy(lambda z: _nn_scores(x, digits_served["y"], z), x[m], answered[m], classes=K)
    assert not independent.present and independent.matches <= 2


# --- evidence store -----------------------------------------------------------------------------------------------
def test_evidence_store_round_trip_dedupe_and_clients(tmp_path: Path) -> None:
    path = tmp_path / "evidence.db"
    x = _random_rows(12, seed=6, trailing=(4, 4))
    y = np.arange(12) % K
    with EvidenceStore(path) as store:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert store.add("alice", x[:8], y[:8]) == 8
        assert store.add("alice", x[4:], y[4:]) == 4  # rows 4..7 were already stored for alice
        assert store.add("bob", x[:3], y[:3]) == 3
        assert store.add("bob", np.zeros((0, 4, 4)), np.zeros(0, np.int64)) == 0
        assert store.clients() == {"alice": 12, "bob": 3}
        files = list(tmp_path.iterdir())  # the database and, while open, its WAL and shared-memory files
        assert len(files) == 3 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), files
    with EvidenceStore(path, create=False) as store:
        ax, ay, clients, digests = store.load("alice")
        assert ax.dtype == np.float32 and ax.shape == (12, 4, 4) and np.array_equal(ax, x)
        assert ay.dtype == np.int64 and np.array_equal(ay, y) and clients == ["alice"] * 12
        assert digests == row_digests(x)
        allx, _, allc, _ = store.load()
        assert len(allx) == 15 and allc.count("bob") == 3 and np.array_equal(allx[12:], x[:3])
        nobody = store.load("carol")
        assert nobody[0].shape == (0,) and nobody[1].shape == (0,) and nobody[2] == []
    with EvidenceStore(path, create=False) as store:
        with pytest.raises(InvalidArgumentError):
            store.add("", x[:1], y[:1])
        with pytest.raises(InvalidArgumentError):
            store.add("alice", x[:2], y[:1])
    store.close()
    with pytest.raises(InvalidArgumentError):
        store.load()


def test_tampered_evidence_rows_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "evidence.db"
    with EvidenceStore(path) as store:
        store.add("mallory", _random_rows(5, seed=7), np.arange(5))
    with sqlite3.connect(path) as db:
        data = bytearray(db.execute("SELECT data FROM evidence WHERE seq = 3").fetchone()[0])
        data[0] ^= 1
        db.execute("UPDATE evidence SET data = ? WHERE seq = 3", (bytes(data),))
    db.close()
    with EvidenceStore(path, create=False) as store, pytest.raises(EvidenceIntegrityError) as info:
        store.load()
    assert info.value.seq == 3 and "seq 3" in str(info.value) and isinstance(info.value, IntegrityError)
    assert info.value.exit_code == 3
    with sqlite3.connect(path) as db:
        db.execute("UPDATE evidence SET data = x'00' WHERE seq = 3")
    db.close()
    with EvidenceStore(path, create=False) as store, pytest.raises(EvidenceIntegrityError, match="seq 3"):
        store.load("mallory")


def test_mixed_shapes_and_foreign_files_are_typed_errors(tmp_path: Path) -> None:
    path = tmp_path / "evidence.db"
    with EvidenceStore(path) as store:
        store.add("a", _random_rows(2, trailing=(3,)), np.zeros(2, np.int64))
        store.add("b", _random_rows(2, trailing=(5,)), np.zeros(2, np.int64))
        with pytest.raises(InvalidArgumentError, match="differing shapes"):
            store.load()
        assert store.load("b")[0].shape == (2, 5)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, not even close" * 100)
    for create in (True, False):
        with pytest.raises(NotAnEvidenceStoreError) as info:
            EvidenceStore(junk, create=create)
        assert isinstance(info.value, InputError) and info.value.exit_code == 2
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    with pytest.raises(NotAnEvidenceStoreError):
        EvidenceStore(foreign)
    with pytest.raises(PathNotFoundError):
        EvidenceStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


# --- CLI ----------------------------------------------------------------------------------------------------------
def _nn_onnx(path: Path, train_x: np.ndarray, train_y: np.ndarray) -> Path:
    """The 1-nearest-neighbour copy as a real ONNX model: argmin of squared distances, then a one-hot lookup."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(train_x.T.astype(np.float32), "xt"),
             numpy_helper.from_array((train_x**2).sum(1).astype(np.float32), "sq"),
             numpy_helper.from_array(np.float32(-2.0).reshape(()), "m2"),
             numpy_helper.from_array(_one_hot(train_y), "table")]
    nodes = [helper.make_node("MatMul", ["input", "xt"], ["dot"]),
             helper.make_node("Mul", ["dot", "m2"], ["dot2"]),
             helper.make_node("Add", ["dot2", "sq"], ["dist"]),
             helper.make_node("ArgMin", ["dist"], ["idx"], axis=1, keepdims=0),
             helper.make_node("Gather", ["table", "idx"], ["scores"], axis=0)]
    graph = helper.make_graph(nodes, "nn-copy", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory: pytest.TempPathFactory, digits_served: dict[str, np.ndarray]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served-cli")
    x, m, answered = digits_served["x"], digits_served["marked"], digits_served["answered"]
    with EvidenceStore(root / "evidence.db") as store:
        store.add("mallory", x[m], answered[m])
        store.add("alice", x[m][:3], answered[m][:3])
    return {"root": root, "evidence": root / "evidence.db", "copy": _nn_onnx(root / "copy.onnx", x, answered)}


def test_cli_verify_copy_present(cli_world: dict[str, Path]) -> None:
    res = runner.invoke(app, ["verify-copy", str(cli_world["copy"]), "--evidence", str(cli_world["evidence"]),
                              "--client", "mallory", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["present"] is True and out["matches"] == out["evidence"] >= 40 and out["client"] == "mallory"
    res = runner.invoke(app, ["verify-copy", str(cli_world["copy"]), "--evidence", str(cli_world["evidence"])])
    assert res.exit_code == 0 and res.output.startswith("served watermark PRESENT: ")
    assert "marked units reproduced (" in res.output and "null rate 1/9 per unit), p = " in res.output


def test_cli_verify_copy_absent_is_not_an_error(cli_world: dict[str, Path]) -> None:
    res = runner.invoke(app, ["verify-copy", str(digits_model_path()), "--evidence", str(cli_world["evidence"])])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("served watermark not found: 0 of ") and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["verify-copy", str(cli_world["copy"]), "--evidence", str(cli_world["evidence"]),
                              "--client", "alice", "--json"])  # three answers cannot reach p < 1e-6
    assert res.exit_code == 0 and json.loads(res.output)["present"] is False


def test_cli_verify_copy_bad_input(cli_world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    missing = cli_world["root"] / "missing.db"
    res = runner.invoke(app, ["verify-copy", str(cli_world["copy"]), "--evidence", str(missing)])
    assert isinstance(res.exception, PathNotFoundError) and res.exception.exit_code == 2
    capsys.readouterr()
    assert main(["watermark", "verify-copy", str(cli_world["copy"]), "--evidence", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeshield: error: evidence store not found")
    junk = cli_world["root"] / "junk.db"
    junk.write_bytes(b"SQLite format 2? no" * 50)
    assert main(["watermark", "verify-copy", str(cli_world["copy"]), "--evidence", str(junk)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an evidence store" in err[0]
    assert main(["watermark", "verify-copy", str(cli_world["root"] / "nope.onnx"),
                 "--evidence", str(cli_world["evidence"])]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_verify_copy_counts_units_and_excludes_the_victim_label(tmp_path: Path,
                                                                    digits_served: dict[str, np.ndarray]) -> None:
    """Evidence stored with region units: the CLI counts units, not answers; --victim takes the served model."""
    x = digits_served["x"]
    sess = ort.InferenceSession(digits_model_path().read_bytes(), providers=["CPUExecutionProvider"])
    victim = sess.run(["logits"], {"input": x})[0].argmax(1)
    wm = ServedWatermark(KEY, 0.2, classes=K, regions=6, reference=x)
    m = wm.mark(x, victim)
    with EvidenceStore(tmp_path / "e.db") as store:
        store.add("thief", x[m.marked], m.labels[m.marked], units=m.marked_units())
    copy = _nn_onnx(tmp_path / "copy.onnx", x, m.labels)
    res = runner.invoke(app, ["verify-copy", str(copy), "--evidence", str(tmp_path / "e.db"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["present"] and out["matches"] == out["units"] < out["evidence"] == int(m.marked.sum())
    assert out["victim_excluded"] is False
    res = runner.invoke(app, ["verify-copy", str(digits_model_path()), "--evidence", str(tmp_path / "e.db"),
                              "--victim", str(digits_model_path())])
    assert res.exit_code == 0 and res.output.startswith("served watermark not found: 0 of ")
    assert f"{out['units']} marked units reproduced ({out['evidence']} watermarked answers" in res.output
