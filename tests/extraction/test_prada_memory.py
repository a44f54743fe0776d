"""PRADA's per-client memory is bounded and compact (issue 15, "Scale"), and the compact storage and the
per-batch vectorised distances decide exactly as before."""

from __future__ import annotations

import gc
import io
import tracemalloc

import numpy as np

from edgeshield.extraction import PradaDetector


def _spreading(n: int, d: int = 64, start: int = 0) -> np.ndarray:
    """Queries whose nearest stored neighbour gets ever farther: each is admitted to its class set."""
    k = np.arange(start, start + n)
    x = np.zeros((n, d), dtype=np.float32)
    x[np.arange(n), k % d] = (1.0 + k).astype(np.float32)
    return x


def test_a_full_client_costs_what_the_bound_says():
    detector = PradaDetector(min_samples=30, max_history=30, max_distances=100, max_recent_keys=60,
                             dup_distance=0.5)
    classes, n = 10, 10 * 30 + 60
    x = _spreading(n)
    tracemalloc.start()
    try:
        for start in range(0, n, 60):
            detector.observe("full", x[start:start + 60], np.arange(start, start + 60) % classes)
        gc.collect()
        held = sum(st.size for st in tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*extraction/_prada.py")]).statistics("filename"))
    finally:
        tracemalloc.stop()
    assert detector.stored_queries("full") == classes * 30  # every class set full
    bound = detector.max_client_bytes(64, classes)
    assert bound == classes * 30 * (4 * 64 + 40) + 32 * 60 + 8 * 100
    # what the detector allocated and still holds: the arrays plus a few hundred bytes of objects per class (float64
    # rows and keys and distances as Python objects took about 2.5 times the bound)
    assert held < 1.1 * bound + classes * 2500, (held, bound)


def test_batched_distances_equal_one_query_at_a_time(digits):
    rng = np.random.default_rng(4)
    seeds = digits.x_train[:10]
    stream = np.concatenate([seeds, *(np.clip(seeds + 0.1 * rng.choice([-1.0, 1.0], (6, *seeds.shape))[i], 0, 1)
                                      for i in range(6)), digits.x_test[:60]]).astype(np.float32)
    stream = np.concatenate([stream, stream[:30]])  # exact repeats too
    labels = digits.predict(stream)
    for dup in (None, 0.3):
        batched, single = PradaDetector(dup_distance=dup), PradaDetector(dup_distance=dup, max_history=40)
        one = PradaDetector(dup_distance=dup)
        for start in range(0, len(stream), 50):
            batched.observe("c", stream[start:start + 50], labels[start:start + 50])
            single.observe("c", stream[start:start + 50], labels[start:start + 50])  # sets fill: compared live
        for i in range(len(stream)):
            one.observe("c", stream[i:i + 1], labels[i:i + 1])
        assert batched.export_state("c") == one.export_state("c")
        assert batched.state("c") == one.state("c")
        assert single.state("c").distances == one.state("c").distances


def test_keys_sharing_their_first_bytes_are_told_apart():
    detector = PradaDetector(min_samples=30)
    x = _spreading(3)
    first = bytes(8) + bytes(range(24))
    other = bytes(8) + bytes(range(1, 25))
    detector.observe("c", x[:1], np.zeros(1, dtype=int), keys=[first])
    assert detector.observe("c", x[1:2], np.zeros(1, dtype=int), keys=[other]).ignored == 0
    assert detector.observe("c", x[2:3], np.zeros(1, dtype=int), keys=[first]).ignored == 1  # a repeat


def test_state_written_with_float64_rows_still_reads(digits):
    detector = PradaDetector(min_samples=30)
    x = digits.x_test[:80]
    detector.observe("c", x, digits.predict(x))
    with np.load(io.BytesIO(detector.export_state("c"))) as blob:
        arrays = {k: blob[k] for k in blob.files}
    assert arrays["queries"].dtype == np.float32
    arrays["queries"] = arrays["queries"].astype(np.float64)  # what the detector wrote before
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    restored = PradaDetector(min_samples=30)
    restored.import_state("c", buf.getvalue())
    assert restored.export_state("c") == detector.export_state("c")
    assert restored.observe("c", digits.x_test[80:120], digits.predict(digits.x_test[80:120])) == \
        detector.observe("c", digits.x_test[80:120], digits.predict(digits.x_test[80:120]))
