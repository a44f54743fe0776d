"""The local event endpoint: how other processes on the device (the FL server, a key-release service, the updater)
report security events to the server's monitor.

A Unix domain socket, mode 0600, accepting connections only from processes of the server's own uid or root (checked
with ``SO_PEERCRED``: the kernel's word, not the client's). Newline-delimited JSON, one event a line::

    {"kind": "fl.update_rejected", "actor": "client-7", "data": {"round": 3, "reason": "norm"}, "source": "fl"}

answered line by line with ``{"ok": true}`` or ``{"ok": false, "error": "..."}`` (plus ``"closed": true`` when the
endpoint then hangs up). Only kinds declared in :data:`~edgeshield.monitor.KINDS` for another process may be sent:
the kinds this server emits itself (:data:`LOCAL_SOURCES`: requests, watchers, the monitor's decisions, compliance
operations) are refused, so a local process cannot forge ``inference.predict``, ``integrity.changed`` or
``monitor.lifted``. The endpoint authenticates the *process* (by uid), not each message: a replayed line is simply
the same fact reported twice, and any process of the server's uid can say anything an external kind allows.
Protocol reference: docs/events.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from edgeshield.audit._format import MAX_DATA_BYTES
from edgeshield.errors import EdgeShieldError, InvalidArgumentError, PathNotFoundError
from edgeshield.monitor._events import KINDS, SecurityEvent

log = logging.getLogger("edgeshield.monitor")

__all__ = [
    "LOCAL_SOURCES", "MAX_LINE", "EndpointError", "EndpointInUseError", "EventEndpoint", "default_socket_path",
    "emit_command", "parse_event", "send_events",
]

# Kinds with these sources are this server's own: no other process may report them.
LOCAL_SOURCES = frozenset({"server", "monitor", "watcher", "compliance"})
MAX_LINE = 64 * 1024  # bytes of one line, newline excluded
MAX_DEPTH = 4  # nesting of ``data`` (``{"a": 1}`` is depth 1)
MAX_KEYS = 64  # keys in ``data``, all levels together
MAX_FUTURE_S = 300.0  # a ``ts`` may run ahead of this clock by this much
_FIELDS = frozenset({"kind", "actor", "data", "source", "ts"})
_SOURCE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, one for the terminating NUL
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class EndpointError(EdgeShieldError):
    """The event endpoint cannot be reached, bound, or answered badly."""


class EndpointInUseError(EndpointError):
    """Another endpoint is already listening on that socket path."""


def default_socket_path(audit_db: str | os.PathLike[str]) -> Path:
    """The socket beside the audit log: ``<dir>/edgeshield-events.sock``."""
    return Path(audit_db).parent / "edgeshield-events.sock"


# --- the message format ------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_data(value: Any, depth: int, keys: list[int]) -> None:
    if isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            raise InvalidArgumentError(f"data is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            keys[0] += len(value)
            if keys[0] > MAX_KEYS:
                raise InvalidArgumentError(f"data has more than {MAX_KEYS} keys")
        for item in value.values() if isinstance(value, dict) else value:
            _check_data(item, depth + 1, keys)


def parse_event(line: bytes | str, *, address: str | None = None, now: float | None = None) -> SecurityEvent:
    """One protocol line to a :class:`SecurityEvent`, or :class:`InvalidArgumentError` saying what is wrong."""
    raw = line.encode() if isinstance(line, str) else bytes(line)
    if len(raw.rstrip(b"\r\n")) > MAX_LINE:
        raise InvalidArgumentError(f"line longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        raise InvalidArgumentError(f"not JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise InvalidArgumentError("an event is a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise InvalidArgumentError(f"unknown field(s) {', '.join(map(repr, unknown))[:200]}: use "
                                   f"{', '.join(sorted(_FIELDS))}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidArgumentError(f"undeclared event kind {str(kind)[:80]!r}")
    declared = KINDS[kind].source
    if declared in LOCAL_SOURCES:
        raise InvalidArgumentError(f"kind {kind!r} is emitted by the server itself ({declared}); another process "
                                   "may not report it")
    actor = obj.get("actor")
    if not isinstance(actor, str) or not 0 < len(actor) <= 128 or not actor.isprintable() or actor.strip() != actor:
        raise InvalidArgumentError("actor must be 1-128 printable characters without surrounding spaces")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise InvalidArgumentError("data must be a JSON object")
    _check_data(data, 0, [0])
    size = len(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True))
    if size > MAX_DATA_BYTES:
        raise InvalidArgumentError(f"data is {size} bytes as JSON, over the {MAX_DATA_BYTES}-byte limit")
    source = obj.get("source", declared)
    if not isinstance(source, str) or not _SOURCE_RE.match(source):
        raise InvalidArgumentError("source must be a short lowercase name (a-z, 0-9, '_', '.', '-')")
    if declared != "external" and source != declared:
        raise InvalidArgumentError(f"kind {kind!r} is declared for source {declared!r}, not {source!r}")
    now = time.time() if now is None else now
    ts = obj.get("ts", now)
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or not (
            0 < ts <= now + MAX_FUTURE_S):
        raise InvalidArgumentError("ts must be a Unix time in seconds, not in the future")
    return SecurityEvent(kind, actor, data, address=address, ts=float(ts), source=source)


def _reply(ok: bool, error: str | None = None, *, closed: bool = False) -> bytes:
    body: dict[str, Any] = {"ok": ok}
    if error is not None:
        body["error"] = error
    if closed:
        body["closed"] = True
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


# --- the socket --------------------------------------------------------------------------------------------------
def _check_length(path: str) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise InvalidArgumentError(f"socket path is longer than {_SUN_PATH_MAX} bytes (a Unix socket limit): {path}")


def _bind(path: Path, backlog: int) -> socket.socket:
    """A listening socket at ``path``, mode 0600 from the moment it is reachable there.

    Bound inside a fresh 0700 directory, chmod-ed, then renamed into place: no umask juggling (umask is process-wide,
    and other threads create files) and no moment where the socket sits at ``path`` with a wider mode.
    """
    _check_length(str(path))
    parent = path.parent
    if not parent.is_dir():
        raise PathNotFoundError(f"socket directory not found: {parent}")
    mode = parent.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise InvalidArgumentError(f"refusing a socket in {parent}: it is world-writable without the sticky bit, "
                                   "so anyone could replace the socket")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise InvalidArgumentError(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:  # nobody listening: a stale socket from a crashed run
            pass
        else:
            raise EndpointInUseError(f"an event endpoint is already listening on {path}")
        finally:
            probe.close()
    tmpdir = tempfile.mkdtemp(prefix=".esev-", dir=parent)
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _check_length(tmp)
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    return sock


def _peercred(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer process, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return int(pid), int(uid), int(gid)


class _Pace:
    """A token bucket that answers how long to wait: excess events are slowed down, not dropped."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.at = float(burst), time.monotonic()

    def delay(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class EventEndpoint:
    """The asyncio server behind the socket. Accepted events go to ``emit`` in a worker thread (``emit`` may block:
    the server's writes the audit entry), one at a time per connection; the reply follows once ``emit`` returned.

    Run it on an existing loop (``await start()`` / ``await stop()``) or on its own thread (``run_in_thread()`` /
    ``close()``). ``counters`` says what it accepted and refused.
    """

    def __init__(self, path: str | os.PathLike[str], emit: Callable[[SecurityEvent], None], *,
                 max_connections: int = 16, idle_timeout_s: float = 30.0, rate_per_s: float = 200.0,
                 burst: int = 200, allowed_uids: Iterable[int] | None = None) -> None:
        if not hasattr(socket, "SO_PEERCRED") or not hasattr(socket, "AF_UNIX"):
            raise EndpointError("the event endpoint needs Unix sockets with SO_PEERCRED (Linux)")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise InvalidArgumentError(f"max_connections must be a whole number >= 1, got {max_connections!r}")
        for name, value in (("idle_timeout_s", idle_timeout_s), ("rate_per_s", rate_per_s), ("burst", burst)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(f"{name} must be a positive number, got {value!r}")
        self.path = Path(path)
        self._emit = emit
        self.max_connections = max_connections
        self.idle_timeout_s = float(idle_timeout_s)
        self.rate_per_s, self.burst = float(rate_per_s), int(burst)
        self.allowed_uids = frozenset(allowed_uids) if allowed_uids is not None else frozenset({os.getuid(), 0})
        self.counters: dict[str, int] = dict.fromkeys(
            ("connections", "accepted", "rejected", "refused_peer", "refused_busy", "timeouts", "too_long",
             "emit_failed"), 0)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- on a loop --
    async def start(self) -> None:
        if self._server is not None:
            return
        sock = _bind(self.path, backlog=max(self.max_connections, 16))
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        log.info("event endpoint listening on %s", self.path)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await asyncio.sleep(0)  # connections accepted just now: let their handlers start, and see they must stop
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        with contextlib.suppress(OSError):  # remove the socket only if it is still ours
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._server is not None:  # not stopping
                await self._connection(reader, writer)
        except (ConnectionError, TimeoutError):  # the client went away or stopped reading
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):  # closing a broken transport: nothing left to do
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(self.idle_timeout_s):
            await writer.drain()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters["connections"] += 1
        try:
            pid, uid, _gid = _peercred(writer.get_extra_info("socket"))
        except OSError:
            pid, uid = 0, -1
        if uid not in self.allowed_uids:
            self.counters["refused_peer"] += 1
            log.warning("event endpoint refused a process of uid %d (pid %d)", uid, pid)
            await self._send(writer, _reply(False, f"uid {uid} may not report events", closed=True))
            return
        if self._active >= self.max_connections:
            self.counters["refused_busy"] += 1
            await self._send(writer, _reply(False, f"too many connections (limit {self.max_connections})",
                                            closed=True))
            return
        self._active += 1
        try:
            await self._lines(reader, writer, f"unix:{pid}")
        finally:
            self._active -= 1

    async def _lines(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str) -> None:
        pace = _Pace(self.rate_per_s, self.burst)
        while True:
            last = False
            try:
                async with asyncio.timeout(self.idle_timeout_s):  # (no inner task, unlike wait_for)
                    line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # end of stream: a last line without its newline counts
                line, last = exc.partial, True
            except asyncio.LimitOverrunError:
                self.counters["too_long"] += 1
                await self._send(writer, _reply(False, f"line longer than {MAX_LINE} bytes", closed=True))
                return
            except TimeoutError:
                self.counters["timeouts"] += 1
                await self._send(writer, _reply(False, f"idle for {self.idle_timeout_s:g} s", closed=True))
                return
            if line.strip():
                wait = pace.delay()
                if wait:
                    await asyncio.sleep(wait)
                await self._send(writer, await self._handle(line, address))
            if last:
                return

    async def _handle(self, line: bytes, address: str) -> bytes:
        try:
            event = parse_event(line, address=address)
        except InvalidArgumentError as exc:
            self.counters["rejected"] += 1
            return _reply(False, str(exc))
        try:
            await asyncio.to_thread(self._emit, event)
        except Exception:  # the audit write failed, or a subscriber raised: tell the sender it was not recorded
            self.counters["emit_failed"] += 1
            log.exception("event endpoint could not record %s", event.kind)
            return _reply(False, "the event could not be recorded")
        self.counters["accepted"] += 1
        return _reply(True)

    # -- on its own thread --
    def run_in_thread(self, timeout_s: float = 10.0) -> None:
        """Start the endpoint on a private event loop in a daemon thread; returns once it listens."""
        if self._thread is not None:
            return
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            with asyncio.Runner() as runner:  # closing it cancels what is left and shuts the executor down
                self._loop = runner.get_loop()
                try:
                    runner.run(self.start())
                except Exception as exc:  # noqa: BLE001 - handed to the starting thread, which raises it
                    failure.append(exc)
                    ready.set()
                    return
                ready.set()
                try:
                    self._loop.run_forever()
                finally:
                    runner.run(self.stop())

        self._thread = threading.Thread(target=main, name="edgeshield-event-endpoint", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise EndpointError(f"the event endpoint did not start within {timeout_s:g} s")
        if failure:
            self._thread.join(timeout_s)
            self._thread = None
            raise failure[0]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop an endpoint started with :meth:`run_in_thread`."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = self._loop = None


# --- the client --------------------------------------------------------------------------------------------------
def send_events(path: str | os.PathLike[str], events: Iterable[Mapping[str, Any]],
                timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Send events to the endpoint at ``path``, one line each, and return its replies in order. Stops early (fewer
    replies than events) when the endpoint hangs up after a reply with ``"closed": true``."""
    lines = []
    for ev in events:
        try:
            lines.append(json.dumps(dict(ev), separators=(",", ":"), allow_nan=False).encode() + b"\n")
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"event is not JSON: {exc}") from None
    replies: list[dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            raise EndpointError(f"no event endpoint at {path}") from None
        except PermissionError:
            raise EndpointError(f"not allowed to connect to the event endpoint at {path}") from None
        except OSError as exc:
            raise EndpointError(f"cannot connect to the event endpoint at {path}: {exc.strerror or exc}") from None
        with sock.makefile("rb") as fh:
            for line in lines:
                try:
                    sock.sendall(line)
                except (BrokenPipeError, ConnectionResetError):  # hung up; its last reply may still be readable
                    pass
                except TimeoutError:
                    raise EndpointError(f"the event endpoint at {path} did not take the event within "
                                        f"{timeout_s:g} s") from None
                try:
                    raw = fh.readline(MAX_LINE)
                except TimeoutError:
                    raise EndpointError(f"the event endpoint at {path} did not answer within {timeout_s:g} s") from None
                except ConnectionResetError:
                    raw = b""
                if not raw:
                    raise EndpointError(f"the event endpoint at {path} closed the connection without answering")
                try:
                    reply = json.loads(raw)
                except ValueError:
                    raise EndpointError(f"the event endpoint at {path} answered something that is not JSON") from None
                if not isinstance(reply, dict):
                    raise EndpointError(f"the event endpoint at {path} answered something that is not an object")
                replies.append(reply)
                if reply.get("closed"):
                    break
    return replies


def emit_command(socket_path: str | os.PathLike[str], kind: str, actor: str, data_json: str = "{}",
                 source: str | None = None, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """``edgeshield monitor emit``: send one event (``data_json`` a JSON object) and return the endpoint's reply."""
    try:
        data = json.loads(data_json or "{}")
    except ValueError as exc:
        raise InvalidArgumentError(f"--data is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError("--data must be a JSON object")
    event: dict[str, Any] = {"kind": kind, "actor": actor, "data": data}
    if source is not None:
        event["source"] = source
    replies = send_events(socket_path, [event], timeout_s=timeout_s)
    if not replies:
        raise EndpointError(f"the event endpoint at {socket_path} did not answer")
    return replies[0]
