"""How much of the server one peer may hold: connection, handshake, time and concurrency limits.

The limits are layered so that no single client can starve the others:

- before TLS (the listener, per source address): at most ``max_connections_per_address`` open connections and
  ``handshakes_per_second_per_address`` full handshakes (a token bucket), all within ``max_connections``; a
  handshake must finish within ``handshake_timeout_s``. A refused peer is disconnected: nothing can be said to it
  before TLS.
- after TLS (per verified identity): at most ``max_connections_per_identity`` connections; every request head must
  arrive within ``request_head_timeout_s`` of the connection becoming idle (slowloris, idle connections) and its
  body within ``body_timeout_s``; at most ``max_in_flight_per_identity`` of the ``max_in_flight`` requests being
  served at once. These refusals are HTTP 503 with ``Retry-After`` (408 for a late body), each audited.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, fields

from edgeshield.errors import InvalidArgumentError


@dataclass(frozen=True)
class Limits:
    """Connection and concurrency limits; the defaults suit one edge device serving a handful of clients."""

    handshake_timeout_s: float = 10.0
    max_connections: int = 512
    max_connections_per_address: int = 64
    handshakes_per_second_per_address: float = 20.0
    handshake_burst_per_address: int = 40
    max_connections_per_identity: int = 16
    request_head_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    body_timeout_s: float = 30.0
    max_in_flight: int = 64
    max_in_flight_per_identity: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(f"limit {f.name} must be a positive number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise InvalidArgumentError(f"limit {f.name} must be a whole number, got {value!r}")
        for part, whole in (("max_connections_per_address", "max_connections"),
                            ("max_connections_per_identity", "max_connections"),
                            ("max_in_flight_per_identity", "max_in_flight")):
            if getattr(self, part) > getattr(self, whole):
                raise InvalidArgumentError(f"limit {part} ({getattr(self, part)}) is larger than {whole} "
                                           f"({getattr(self, whole)}): one peer could take everything")


def address_key(peername: object) -> str:
    """The unit a per-address cap counts: the IPv4 address, or the /64 an IPv6 host can freely pick from."""
    host = peername[0] if isinstance(peername, tuple) and peername else str(peername)
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class InFlight:
    """Requests being served now, in total and per identity (event-loop thread only, so no lock)."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self.count = 0
        self._by_key: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        held = self._by_key.get(key, 0)
        if self.count >= self.total or held >= self.per_key:
            return False
        self.count += 1
        self._by_key[key] = held + 1
        return True

    def release(self, key: str) -> None:
        self.count -= 1
        count_down(self._by_key, key)


def count_down(counts: dict[str, int], key: str) -> None:
    """One fewer for ``key``; a key at zero is forgotten, so the map stays as small as what is held now."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
