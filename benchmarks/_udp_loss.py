"""A lossy link on loopback: a user-space UDP forwarder that drops a seeded, random share of datagrams each way.

    python benchmarks/_udp_loss.py --upstream 127.0.0.1:PORT --loss 0.05 [--seed 1] [--listen 127.0.0.1:0]

prints ``listening HOST PORT`` on its first line, forwards until SIGTERM/SIGINT, then prints one JSON line of
counters. ``benchmarks/transport.py`` runs it as a child process (so it never shares a GIL with the client it
measures) to show how HTTP/3 degrades at 1 % and 5 % datagram loss: this machine's kernel has no ``netem``, so the
loss is made here and only UDP can be measured (a TCP proxy in user space would hide the loss from TCP).

Each client address gets its own upstream socket, so the server sees one peer per client, as without the
forwarder. Drops are drawn from ``random.Random(seed)``, one generator per direction, so a run is reproducible for
the same datagram sequence (the sequence itself depends on the stacks' timers). Bounded: at most ``MAX_PEERS``
client addresses (the oldest is forgotten beyond that), datagrams up to 65,535 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

MAX_PEERS = 256
MAX_DATAGRAM = 65535
RCVBUF = 4 << 20  # asked for; the kernel caps it at net.core.rmem_max


@dataclass
class LossStats:
    """Datagrams seen and dropped in each direction."""

    up_seen: int = 0
    up_dropped: int = 0
    down_seen: int = 0
    down_dropped: int = 0

    @property
    def dropped_share(self) -> float:
        seen = self.up_seen + self.down_seen
        return (self.up_dropped + self.down_dropped) / seen if seen else 0.0


class LossyForwarder:
    """Forward UDP between clients on ``listen`` and ``upstream``, dropping each datagram with probability ``loss``
    (independently each way). Use as a context manager, or ``start``/``stop``; ``port`` is the listening port."""

    def __init__(self, upstream: tuple[str, int], loss: float, *, seed: int = 1,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), not {loss}")
        self.upstream, self.loss = upstream, loss
        self._rng_up, self._rng_down = random.Random(seed), random.Random(seed + 1)  # noqa: S311 - loss, not crypto
        self._front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._front.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # bursts must not be lost here
        self._front.bind(listen)
        self._front.setblocking(False)
        self.port: int = self._front.getsockname()[1]
        self.stats = LossStats()
        self._peers: dict[tuple[str, int], socket.socket] = {}  # client address -> its upstream socket
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._front, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _drop(self, rng: random.Random) -> bool:
        return self.loss > 0 and rng.random() < self.loss

    def _upstream_for(self, client: tuple[str, int]) -> socket.socket:
        sock = self._peers.get(client)
        if sock is None:
            if len(self._peers) >= MAX_PEERS:
                oldest = next(iter(self._peers))
                old = self._peers.pop(oldest)
                self._sel.unregister(old)
                old.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.connect(self.upstream)
            sock.setblocking(False)
            self._peers[client] = sock
            self._sel.register(sock, selectors.EVENT_READ, client)
        return sock

    def serve(self) -> None:
        """Forward until :meth:`stop` (runs in the calling thread)."""
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                for _ in range(64):  # drain a burst, bounded
                    try:
                        if key.data is None:
                            data, client = sock.recvfrom(MAX_DATAGRAM)
                        else:
                            data, client = sock.recv(MAX_DATAGRAM), key.data
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # ICMP port unreachable from a peer that went away
                        break
                    if key.data is None:
                        self.stats.up_seen += 1
                        if self._drop(self._rng_up):
                            self.stats.up_dropped += 1
                            continue
                        with contextlib.suppress(OSError):
                            self._upstream_for(client).send(data)
                    else:
                        self.stats.down_seen += 1
                        if self._drop(self._rng_down):
                            self.stats.down_dropped += 1
                            continue
                        with contextlib.suppress(OSError):
                            self._front.sendto(data, client)

    def start(self) -> LossyForwarder:
        self._thread = threading.Thread(target=self.serve, name="udp-loss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in self._peers.values():
            sock.close()
        self._front.close()
        self._sel.close()

    def __enter__(self) -> LossyForwarder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=_hostport, metavar="HOST:PORT")
    ap.add_argument("--loss", required=True, type=float, help="drop probability per datagram, each way")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), metavar="HOST:PORT")
    args = ap.parse_args(argv)
    fwd = LossyForwarder(args.upstream, args.loss, seed=args.seed, listen=args.listen)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"listening 127.0.0.1 {fwd.port}", flush=True)
    fwd.start()
    while not done.wait(0.2):
        pass
    fwd.stop()
    print(json.dumps({**asdict(fwd.stats), "dropped_share": fwd.stats.dropped_share, "ts": time.time()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
