"""The lossy link of benchmarks/_udp_loss.py that benchmarks/transport.py measures HTTP/3 through: it forwards every
datagram both ways at 0 % loss, drops about the asked share each way, reproducibly for a seed, and keeps one
upstream socket per client."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path

import pytest

_BENCH = str(Path(__file__).resolve().parents[2] / "benchmarks")
if _BENCH not in sys.path:  # benchmarks/_udp_loss.py is a helper beside the benchmark (not a package)
    sys.path.insert(0, _BENCH)
_udp_loss = importlib.import_module("_udp_loss")


def _echo_server() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5.0)
    return s


def _exchange(loss: float, seed: int, n: int) -> tuple[int, int, object]:
    """Send n datagrams through the forwarder to an echo socket and back: (reached the server, came back, stats)."""
    server = _echo_server()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5.0)
    reached = back = 0
    with _udp_loss.LossyForwarder(server.getsockname(), loss, seed=seed) as fwd:
        for i in range(n):
            client.sendto(f"{i}".encode(), ("127.0.0.1", fwd.port))
            try:
                data, addr = server.recvfrom(100)
            except TimeoutError:
                continue
            reached += 1
            server.sendto(data, addr)
            try:
                assert client.recv(100) == data
                back += 1
            except TimeoutError:
                pass
        stats = fwd.stats
    server.close()
    client.close()
    return reached, back, stats


def test_no_loss_forwards_everything_both_ways() -> None:
    reached, back, stats = _exchange(0.0, 1, 50)
    assert (reached, back) == (50, 50)
    assert (stats.up_seen, stats.up_dropped, stats.down_seen, stats.down_dropped) == (50, 0, 50, 0)


def _one_way(loss: float, seed: int, n: int) -> tuple[list[int], int]:
    """Send n datagrams client -> server through the forwarder (no replies, so no timing decides anything): the
    indices that reached the server, and the forwarder's drop count, once it has seen all n."""
    import time

    server = _echo_server()
    server.setblocking(False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client, \
            _udp_loss.LossyForwarder(server.getsockname(), loss, seed=seed) as fwd:
        got: list[int] = []

        def drain() -> None:
            while True:
                try:
                    got.append(int(server.recv(100)))
                except BlockingIOError:
                    return

        for i in range(n):  # in bursts of 20 the socket buffers hold, each waited for (no datagram lost unasked)
            client.sendto(f"{i}".encode(), ("127.0.0.1", fwd.port))
            deadline = time.monotonic() + 10
            while (i % 20 == 19 or i == n - 1) and fwd.stats.up_seen <= i and time.monotonic() < deadline:
                time.sleep(0.002)
            if i % 20 == 19:
                drain()
        assert fwd.stats.up_seen == n
        deadline = time.monotonic() + 10
        while len(got) < n - fwd.stats.up_dropped and time.monotonic() < deadline:
            time.sleep(0.005)
            drain()
        dropped = fwd.stats.up_dropped
    server.close()
    return got, dropped


def test_loss_is_near_the_share_asked_and_reproducible() -> None:
    got, dropped = _one_way(0.2, 7, 300)
    assert len(got) == 300 - dropped and 0.1 < dropped / 300 < 0.3
    assert _one_way(0.2, 7, 300) == (got, dropped)  # the same drops for the same seed and sequence
    assert _one_way(0.2, 8, 300)[0] != got


def test_one_upstream_socket_per_client_and_bad_loss_refused() -> None:
    server = _echo_server()
    with _udp_loss.LossyForwarder(server.getsockname(), 0.0) as fwd:
        ports = set()
        for _ in range(3):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.sendto(b"x", ("127.0.0.1", fwd.port))
                ports.add(server.recvfrom(10)[1][1])
        assert len(ports) == 3
    server.close()
    with pytest.raises(ValueError, match="loss"):
        _udp_loss.LossyForwarder(("127.0.0.1", 9), 1.0)
