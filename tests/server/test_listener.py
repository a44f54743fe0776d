"""The connection gate's bookkeeping on its own: caps per address and in all, the per-address handshake rate, the
per-identity cap, and memory that stays bounded however many addresses knock."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from edgeshield.server._limits import Limits, address_key
from edgeshield.server._listener import ConnectionGate


class _Events:
    def __init__(self) -> None:
        self.refusals: list[str] = []

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)


def _gate(**limits: Any) -> ConnectionGate:
    return ConnectionGate(Limits(**limits), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), _Events())  # type: ignore[arg-type]


def test_per_address_and_total_caps() -> None:
    gate = _gate(max_connections=5, max_connections_per_address=3, max_connections_per_identity=2,
                 handshake_burst_per_address=100)
    assert [gate.admit("10.0.0.1") for _ in range(4)] == [None, None, None, "per-address connection cap"]
    assert gate.admit("10.0.0.2") is None and gate.admit("10.0.0.2") is None
    assert gate.admit("10.0.0.3") == "server connection cap"
    gate.release("10.0.0.1")
    assert gate.admit("10.0.0.3") is None and gate.busiest_address() == 2


def test_the_handshake_rate_refuses_a_burst_beyond_its_tokens() -> None:
    gate = _gate(handshakes_per_second_per_address=0.01, handshake_burst_per_address=5)
    outcomes = []
    for _ in range(8):
        outcomes.append(gate.admit("10.0.0.9"))
        if outcomes[-1] is None:
            gate.release("10.0.0.9")  # each connection closes at once: only the rate can refuse it
    assert outcomes == [None] * 5 + ["per-address handshake rate"] * 3
    assert gate.admit("10.0.0.10") is None  # another address has its own bucket


def test_per_identity_cap() -> None:
    gate = _gate(max_connections_per_identity=2)
    a, b, c = object(), object(), object()
    assert gate.bind("mallory", a) and gate.bind("mallory", b) and not gate.bind("mallory", c)
    assert gate.bind("alice", c)
    gate.unbind("mallory", a)
    assert gate.bind("mallory", c)


def test_knocking_from_many_addresses_keeps_the_buckets_bounded() -> None:
    gate = _gate(max_connections=10**6, max_connections_per_address=10, handshakes_per_second_per_address=1e9,
                 handshake_burst_per_address=10)
    for i in range(20_000):
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        assert gate.admit(address) is None
        gate.release(address)
    assert len(gate._buckets) <= 4096 + 1  # full buckets are forgotten: they would start full anyway


@pytest.mark.parametrize(("peer", "key"), [
    (("192.0.2.7", 5000), "192.0.2.7"),
    (("2001:db8:1:2:3:4:5:6", 5000, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:2:ffff::1", 5000, 0, 0), "2001:db8:1:2::/64"),  # the same /64: one address for the caps
    (("::ffff:192.0.2.7", 5000, 0, 0), "192.0.2.7"),
    (("fe80::1%eth0", 5000, 0, 2), "fe80::/64"),
])
def test_address_keys(peer: tuple[Any, ...], key: str) -> None:
    assert address_key(peer) == key
