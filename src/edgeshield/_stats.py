"""Small exact statistics shared by the detectors and the watermarks (no scipy on the device path)."""

from __future__ import annotations

import math

from edgeshield.errors import InvalidArgumentError

__all__ = ["binomial_sf"]


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, summed in log space (lgamma + log-sum-exp): no overflow for any n."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise InvalidArgumentError("binomial_sf needs n >= 0 and 0 <= p <= 1")
    if k <= 0 or p == 1.0:
        return 1.0
    if k > n or p == 0.0:
        return 0.0
    lp, lq, ln = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    terms: list[float] = []
    top = -math.inf
    for i in range(k, n + 1):
        t = ln - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        terms.append(t)
        top = max(top, t)
        if i > n * p and t < top - 50:  # past the mode the terms fall geometrically: the rest is < e^-50 * sqrt(n)
            break
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))
