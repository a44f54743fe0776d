"""The server's own TCP listener: admission before the TLS handshake, TLS with a deadline, then HTTP.

uvicorn only sees a connection once asyncio has finished its TLS handshake, which costs the server about 2.7 ms of
CPU for a mutual-TLS client and by default may take 60 s. So EdgeShield accepts connections itself
(:class:`Listener`): each one is first admitted by the :class:`ConnectionGate` (per-address connection cap and
handshake rate, a global cap), then wrapped in TLS under ``handshake_timeout_s`` (``loop.connect_accepted_socket``,
so uvloop's native TLS stays in use), and only then handed to uvicorn's HTTP protocol
(``_tls_scope.TlsHttpToolsProtocol``), which enforces the request-head timeout and the per-identity connection cap.
Refusals before TLS can only be a closed connection; each is an event on the server's stream at once (the monitor
sees it), and the audit log counts them and writes them at most once a second (:class:`ConnectionEvents`), so a
flood cannot stall the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from edgeshield.monitor import SecurityEvent
from edgeshield.server._limits import Limits, address_key, count_down

if TYPE_CHECKING:
    from edgeshield.server._app import ServerState
    from edgeshield.server._tls_scope import TlsHttpToolsProtocol

log = logging.getLogger("edgeshield.server")
_MAX_BUCKETS = 4096


class ConnectionEvents:
    """Puts failed handshakes and refused connections onto the server's event stream, one event each, the moment
    they happen (so the monitor can block a flooding address at once).

    Both happen on the event loop before any request; an fsync'd audit entry for each would let unauthenticated
    peers stall every connection and grow the log without bound. Their kinds are ``aggregate`` ones: the audit
    subscriber only counts them (by reason) and writes one ``auth.failure`` (stage ``tls-handshake``) and one
    ``connection.refused`` entry per second with the counts.
    """

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def handshake_failed(self, reason: str, address: str | None = None) -> None:
        self.state.events.publish(SecurityEvent("tls.handshake_failed", "anonymous", {"reason": reason[:100]},
                                                address=address))

    def refused(self, reason: str, address: str | None = None) -> None:
        metrics = self.state.metrics
        if metrics is not None:
            metrics.connections_refused.labels(reason).inc()
        self.state.events.publish(SecurityEvent("connection.rejected", "anonymous", {"reason": reason[:100]},
                                                address=address))


class _Bucket:
    """Token bucket of full handshakes for one address."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens, self.stamp = burst, now


class ConnectionGate:
    """Who holds which connections; every method runs on the event loop thread."""

    def __init__(self, limits: Limits, ssl_context: ssl.SSLContext, events: ConnectionEvents) -> None:
        self.limits, self.ssl_context, self.events = limits, ssl_context, events
        self.total = 0
        self._by_address: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._by_identity: dict[str, set[TlsHttpToolsProtocol]] = {}  # identity name -> its HTTP protocols
        self._handshakes: set[asyncio.Task[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        # why an address is refused before TLS (the security monitor blocked it), or None; set by make_server
        self.address_check: Callable[[str], str | None] | None = None

    # -- before TLS --
    def admit(self, address: str) -> str | None:
        """Take a connection slot for ``address``, or say why not."""
        lim = self.limits
        if self.address_check is not None:
            blocked = self.address_check(address)
            if blocked is not None:
                return blocked
        if self.total >= lim.max_connections:
            return "server connection cap"
        if self._by_address.get(address, 0) >= lim.max_connections_per_address:
            return "per-address connection cap"
        now = time.monotonic()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[address] = _Bucket(lim.handshake_burst_per_address, now)
        bucket.tokens = min(lim.handshake_burst_per_address,
                            bucket.tokens + (now - bucket.stamp) * lim.handshakes_per_second_per_address)
        bucket.stamp = now
        if bucket.tokens < 1:
            return "per-address handshake rate"
        bucket.tokens -= 1
        self.total += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return None

    def _prune(self, now: float) -> None:
        """Forget addresses whose bucket has refilled: they would start full anyway."""
        lim = self.limits
        rate, burst = lim.handshakes_per_second_per_address, lim.handshake_burst_per_address
        full = [a for a, b in self._buckets.items() if b.tokens + (now - b.stamp) * rate >= burst]
        for a in full:
            del self._buckets[a]

    def release(self, address: str) -> None:
        self.total -= 1
        count_down(self._by_address, address)

    def busiest_address(self) -> int:
        """Connections held by the address holding the most (a metric: who is close to the per-address cap)."""
        return max(self._by_address.values(), default=0)

    # -- after TLS --
    def bind(self, name: str, protocol: TlsHttpToolsProtocol) -> bool:
        """Count ``protocol`` against identity ``name``; False (and not counted) when the identity is at its cap."""
        held = self._by_identity.setdefault(name, set())
        if len(held) >= self.limits.max_connections_per_identity:
            if not held:
                del self._by_identity[name]
            return False
        held.add(protocol)
        return True

    def unbind(self, name: str, protocol: TlsHttpToolsProtocol) -> None:
        held = self._by_identity.get(name)
        if held is not None:
            held.discard(protocol)
            if not held:
                del self._by_identity[name]

    def close_revoked(self, serials: Iterable[int]) -> int:
        """Close every live connection whose certificate serial is in ``serials``; how many were closed."""
        revoked = frozenset(serials)
        closed = 0
        for protocols in list(self._by_identity.values()):
            for protocol in list(protocols):
                if protocol.identity is not None and protocol.identity.serial in revoked:
                    protocol.transport.close()
                    closed += 1
        if closed:
            for _ in range(closed):
                self.events.refused("certificate revoked: live connection closed")
        return closed

    def close_revoked_threadsafe(self, serials: Iterable[int]) -> None:
        """From another thread (the CRL watcher): schedule :meth:`close_revoked` on the event loop."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.close_revoked, frozenset(serials))

    # -- handshakes in progress --
    def track(self, task: asyncio.Task[None]) -> None:
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def abort_handshakes(self) -> None:
        for task in list(self._handshakes):
            task.cancel()


class Listener:
    """The listening socket and its accept loop: each accepted connection is admitted by the gate, then wrapped in
    TLS with a deadline (``connect_accepted_socket``) and given to the HTTP protocol ``make_http`` builds.

    Accepting ourselves is what lets the gate see the peer's address before a single byte of TLS is processed. It
    has what uvicorn expects of ``server.servers``: ``sockets``, ``close()`` and ``wait_closed()``.
    """

    def __init__(self, sock: socket.socket, gate: ConnectionGate,
                 make_http: Callable[[str], asyncio.Protocol]) -> None:
        sock.setblocking(False)
        self.sockets = [sock]
        self.gate, self.make_http = gate, make_http
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept(), name="edgeshield-accept")

    async def _accept(self) -> None:
        loop, listening = asyncio.get_running_loop(), self.sockets[0]
        while True:
            try:
                conn, peer = await loop.sock_accept(listening)
            except OSError as exc:  # e.g. out of file descriptors: keep the server up, try again shortly
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            address = address_key(peer)
            refusal = self.gate.admit(address)
            if refusal is not None:
                self.gate.events.refused(refusal, address)
                conn.close()
                continue
            self.gate.track(loop.create_task(self._handshake(conn, address)))

    async def _handshake(self, conn: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: self.make_http(address), conn, ssl=self.gate.ssl_context,
                                               ssl_handshake_timeout=self.gate.limits.handshake_timeout_s)
        except BaseException as exc:  # refused, timed out, the peer gone, or cancelled at shutdown
            self.gate.release(address)
            conn.close()
            if isinstance(exc, ssl.SSLError):
                self.gate.events.handshake_failed(exc.reason or type(exc).__name__, address)
            elif isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionAbortedError)
                                                 and "longer than" in str(exc)):
                self.gate.events.refused("TLS handshake timeout", address)
            if not isinstance(exc, Exception):
                raise

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sockets[0].close()

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket for ``host``:``port`` (IPv4 or IPv6, whichever the host name is)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=backlog)
