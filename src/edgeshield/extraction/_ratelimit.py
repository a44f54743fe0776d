"""Per-client token buckets with per-role rates: ``rate`` tokens per second up to ``burst`` tokens."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edgeshield.errors import InvalidArgumentError

__all__ = ["RateLimiter", "TokenBucket"]


@dataclass
class TokenBucket:
    """A token bucket; ``tokens`` is the level at time ``stamp``."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        # A clock that steps backwards (should not happen with a monotonic clock) never mints tokens.
        self.tokens = min(self.burst, self.tokens + self.rate * max(0.0, now - self.stamp))
        self.stamp = max(self.stamp, now)

    def take(self, cost: float, now: float) -> bool:
        self.refill(now)
        if cost > self.tokens:
            return False
        self.tokens -= cost
        return True

    def wait_for(self, cost: float, now: float) -> float:
        self.refill(now)
        missing = cost - self.tokens
        return 0.0 if missing <= 0 else (missing / self.rate if self.rate > 0 else math.inf)


class RateLimiter:
    """Token bucket per (client, role); ``roles`` maps role → (rate per second, burst)."""

    def __init__(self, roles: Mapping[str, tuple[float, float]], clock: Callable[[], float] = time.monotonic) -> None:
        for role, (rate, burst) in roles.items():
            if rate < 0 or burst <= 0 or not math.isfinite(rate) or not math.isfinite(burst):
                raise InvalidArgumentError(f"rate limit for role {role!r} needs rate >= 0 and burst > 0")
        self.roles = {role: (float(rate), float(burst)) for role, (rate, burst) in roles.items()}
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def allow(self, client: str, role: str, cost: float = 1) -> bool:
        """Spend ``cost`` tokens if the client has them; a refused request spends nothing."""
        return self._bucket(client, role, cost).take(cost, self.clock())

    def retry_after(self, client: str, role: str, cost: float = 1) -> float:
        """Seconds until ``cost`` tokens are available (``inf`` if never: cost above burst or rate 0)."""
        bucket = self._bucket(client, role, cost)
        return math.inf if cost > bucket.burst else bucket.wait_for(cost, self.clock())

    def forget(self, client: str) -> None:
        for key in [k for k in self._buckets if k[0] == client]:
            del self._buckets[key]

    def _bucket(self, client: str, role: str, cost: float) -> TokenBucket:
        if role not in self.roles:
            raise InvalidArgumentError(f"no rate limit configured for role {role!r}")
        if cost < 0 or not math.isfinite(cost):
            raise InvalidArgumentError("rate-limit cost must be a finite number >= 0")
        key = (client, role)
        if key not in self._buckets:
            rate, burst = self.roles[role]
            self._buckets[key] = TokenBucket(rate, burst, burst, self.clock())
        return self._buckets[key]
