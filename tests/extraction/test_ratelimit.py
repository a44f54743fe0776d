from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.errors import InvalidArgumentError
from edgeshield.extraction import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.0, 50.0),
    burst=st.floats(0.5, 20.0),
    steps=st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 5.0)), min_size=1, max_size=60),
)
def test_never_more_than_burst_plus_rate_times_window(rate, burst, steps):
    clock = FakeClock()
    limiter = RateLimiter({"user": (rate, burst)}, clock=clock)
    events = []
    for dt, cost in steps:
        clock.now += dt
        if limiter.allow("c", "user", cost):
            events.append((clock.now, cost))
    for i in range(len(events)):
        spent = 0.0
        for j in range(i, len(events)):
            spent += events[j][1]
            assert spent <= burst + rate * (events[j][0] - events[i][0]) + 1e-9


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(0.1, 50.0), burst=st.floats(1.0, 20.0), cost=st.floats(0.0, 1.0), spend=st.integers(0, 30))
def test_retry_after_is_exact(rate, burst, cost, spend):
    clock = FakeClock()
    limiter = RateLimiter({"user": (rate, burst)}, clock=clock)
    for _ in range(spend):
        limiter.allow("c", "user", 1)
    wait = limiter.retry_after("c", "user", cost)
    assert wait >= 0
    clock.now += wait + 1e-6
    assert limiter.allow("c", "user", cost)


def test_roles_and_clients_have_separate_buckets():
    clock = FakeClock()
    limiter = RateLimiter({"user": (1.0, 2.0), "admin": (10.0, 10.0)}, clock=clock)
    assert [limiter.allow("a", "user") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b", "user")
    assert all(limiter.allow("a", "admin") for _ in range(10))
    assert limiter.retry_after("a", "user") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.allow("a", "user")
    assert limiter.retry_after("a", "user", cost=5) == math.inf  # above burst: never
    limiter.forget("a")
    assert limiter.allow("a", "user") and limiter.allow("a", "user")


def test_zero_rate_never_refills():
    clock = FakeClock()
    limiter = RateLimiter({"blocked": (0.0, 1.0)}, clock=clock)
    assert limiter.allow("a", "blocked")
    clock.now += 1e6
    assert not limiter.allow("a", "blocked")
    assert limiter.retry_after("a", "blocked") == math.inf


def test_bad_configuration():
    with pytest.raises(InvalidArgumentError):
        RateLimiter({"user": (-1.0, 1.0)})
    with pytest.raises(InvalidArgumentError):
        RateLimiter({"user": (1.0, 0.0)})
    limiter = RateLimiter({"user": (1.0, 1.0)})
    with pytest.raises(InvalidArgumentError):
        limiter.allow("a", "guest")
    with pytest.raises(InvalidArgumentError):
        limiter.allow("a", "user", cost=-1)
