"""The local event endpoint over a real Unix socket, attacked the ways a local process could; and the catalogue doc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.errors import InvalidArgumentError
from edgeshield.monitor import KINDS, SecurityEvent
from edgeshield.monitor._endpoint import (
    LOCAL_SOURCES,
    MAX_LINE,
    EndpointError,
    EndpointInUseError,
    EventEndpoint,
    default_socket_path,
    emit_command,
    parse_event,
    send_events,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"
GOOD = {"kind": "fl.update_rejected", "actor": "client-7", "data": {"round": 3, "reason": "norm"}, "source": "fl"}


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[SecurityEvent] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, ev: SecurityEvent) -> None:
        if self.fail:
            raise OSError("disk full")
        with self.lock:
            self.events.append(ev)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short, and traversable by another uid (pytest's tmp_path is 0700 under root and can run near the 107-byte
    # limit on Unix socket paths).
    d = Path(tempfile.mkdtemp(prefix="esev", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103 - another uid must reach the socket's directory in one test
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _serve(sockdir: Path, sink: Callable[[SecurityEvent], None], **kw: object) -> EventEndpoint:
    ep = EventEndpoint(sockdir / "ev.sock", sink, **kw)  # type: ignore[arg-type]
    ep.run_in_thread()
    return ep


def _raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def _ask(s: socket.socket, line: bytes) -> dict[str, object]:
    s.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return json.loads(buf)  # type: ignore[no-any-return]


def test_accepts_an_external_event(sockdir: Path) -> None:
    sink = Sink()
    ep = _serve(sockdir, sink)
    try:
        assert stat.S_IMODE(os.stat(ep.path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(ep.path).st_mode)
        assert send_events(ep.path, [GOOD, {**GOOD, "ts": 1.7e9}]) == [{"ok": True}, {"ok": True}]
    finally:
        ep.close()
    assert not ep.path.exists()  # removed on close
    ev = sink.events[0]
    assert (ev.kind, ev.actor, dict(ev.data), ev.source) == ("fl.update_rejected", "client-7", GOOD["data"], "fl")
    assert ev.address == f"unix:{os.getpid()}"  # the kernel's pid of the sender, not anything it claimed
    assert sink.events[1].ts == 1.7e9
    assert ep.counters["accepted"] == 2


def test_bad_lines_are_answered_and_the_connection_goes_on(sockdir: Path) -> None:
    sink = Sink()
    ep = _serve(sockdir, sink)
    deep = {"a": {"b": {"c": {"d": {"e": 1}}}}}
    bad = [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"kind": "fl.update_rejected", "actor": "x", "data": {"v": NaN}}', "not JSON"),
        (json.dumps({**GOOD, "extra": 1}).encode(), "unknown field"),
        (json.dumps({**GOOD, "kind": "fl.nonsense"}).encode(), "undeclared"),
        (json.dumps({**GOOD, "data": deep}).encode(), "nested deeper"),
        (json.dumps({**GOOD, "data": {f"k{i}": i for i in range(65)}}).encode(), "more than 64 keys"),
        (json.dumps({**GOOD, "data": {"blob": "x" * 20000}}).encode(), "byte limit"),
        (json.dumps({**GOOD, "source": "updater"}).encode(), "declared for source"),
        (json.dumps({**GOOD, "actor": " padded"}).encode(), "actor"),
        (json.dumps({**GOOD, "ts": time.time() + 3600}).encode(), "future"),
        (b"\xff\xfe garbage", "not JSON"),
    ]
    try:
        with _raw(ep.path) as s:
            for line, why in bad:
                reply = _ask(s, line + b"\n")
                assert reply["ok"] is False and why in str(reply["error"]), (line[:60], reply)
                assert "closed" not in reply
            assert _ask(s, b"\n" + json.dumps(GOOD).encode() + b"\n") == {"ok": True}  # blank lines are skipped
    finally:
        ep.close()
    assert len(sink.events) == 1 and ep.counters["rejected"] == len(bad)


@pytest.mark.parametrize("kind", sorted(k for k, info in KINDS.items() if info.source in LOCAL_SOURCES))
def test_server_owned_kinds_cannot_be_forged(kind: str) -> None:
    with pytest.raises(InvalidArgumentError, match="emitted by the server itself"):
        parse_event(json.dumps({"kind": kind, "actor": "mallory"}))


def test_external_kinds_allowed() -> None:
    allowed = sorted(k for k, info in KINDS.items() if info.source not in LOCAL_SOURCES)
    assert {"fl.update_rejected", "privacy.budget_exhausted", "attestation.failed", "update.refused",
            "external.event"} <= set(allowed)
    for kind in allowed:
        assert parse_event(json.dumps({"kind": kind, "actor": "p"})).source == KINDS[kind].source
    # external.event names its reporter; every other kind is bound to its declared source
    assert parse_event(json.dumps({"kind": "external.event", "actor": "p", "source": "sensor"})).source == "sensor"


def test_enormous_line_closes_the_connection(sockdir: Path) -> None:
    sink = Sink()
    ep = _serve(sockdir, sink)
    try:
        line = json.dumps({**GOOD, "data": {"blob": "x" * (MAX_LINE + 10)}}).encode() + b"\n"
        [reply] = send_events(ep.path, [json.loads(line), GOOD])
        assert reply == {"ok": False, "error": f"line longer than {MAX_LINE} bytes", "closed": True}
        # exactly at the limit is still a line (refused for its data size, not its length)
        pad = MAX_LINE - len(json.dumps({**GOOD, "data": {"blob": ""}}, separators=(",", ":")))
        at_limit = {**GOOD, "data": {"blob": "x" * pad}}
        assert len(json.dumps(at_limit, separators=(",", ":"))) == MAX_LINE
        [reply] = send_events(ep.path, [at_limit])
        assert "byte limit" in str(reply["error"])
    finally:
        ep.close()
    assert ep.counters["too_long"] == 1 and sink.events == []


def test_idle_and_slow_clients_time_out(sockdir: Path) -> None:
    ep = _serve(sockdir, Sink(), idle_timeout_s=0.3)
    try:
        with _raw(ep.path) as s:
            t0 = time.monotonic()
            reply = json.loads(s.recv(4096))
            assert reply["closed"] is True and "idle" in reply["error"]
            assert time.monotonic() - t0 < 3
        with _raw(ep.path) as s:  # slow-loris: bytes keep coming, but a line must complete within the timeout
            with contextlib.suppress(BrokenPipeError):  # hung up on mid-line
                for ch in b'{"kind": "fl.update_rejected"':
                    s.sendall(bytes([ch]))
                    time.sleep(0.05)
            assert "idle" in json.loads(s.recv(4096))["error"]
    finally:
        ep.close()
    assert ep.counters["timeouts"] == 2


def test_connection_cap(sockdir: Path) -> None:
    ep = _serve(sockdir, Sink(), max_connections=2)
    try:
        held = [_raw(ep.path) for _ in range(2)]
        for s in held:
            assert _ask(s, json.dumps(GOOD).encode() + b"\n") == {"ok": True}  # both are being served
        [reply] = send_events(ep.path, [GOOD])
        assert reply["closed"] is True and "too many connections" in reply["error"]
        held.pop().close()
        deadline = time.monotonic() + 5
        while send_events(ep.path, [GOOD]) != [{"ok": True}]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for s in held:
            s.close()
    finally:
        ep.close()
    assert ep.counters["refused_busy"] >= 1


def test_pacing_slows_a_flood_without_dropping(sockdir: Path) -> None:
    sink = Sink()
    ep = _serve(sockdir, sink, rate_per_s=50, burst=5)
    try:
        t0 = time.monotonic()
        assert send_events(ep.path, [GOOD] * 30) == [{"ok": True}] * 30
        assert time.monotonic() - t0 >= 0.45  # (30 - 5) / 50 s
    finally:
        ep.close()
    assert len(sink.events) == 30


def test_replayed_line_is_the_same_fact_twice(sockdir: Path) -> None:
    # Documented: the endpoint authenticates the process (uid), not messages; a trusted process repeating itself
    # reports the same fact twice. Nothing here is a capability an attacker gains by replaying.
    sink = Sink()
    ep = _serve(sockdir, sink)
    try:
        line = json.dumps(GOOD).encode() + b"\n"
        with _raw(ep.path) as s:
            assert _ask(s, line) == _ask(s, line) == {"ok": True}
    finally:
        ep.close()
    assert len(sink.events) == 2


def test_emit_failure_is_reported(sockdir: Path) -> None:
    ep = _serve(sockdir, Sink(fail=True))
    try:
        [reply] = send_events(ep.path, [GOOD])
    finally:
        ep.close()
    assert reply == {"ok": False, "error": "the event could not be recorded"}
    assert ep.counters["emit_failed"] == 1


def _as_nobody(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child with uid/gid nobody; return what it returned (or its exception)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as text
            out = f"{type(exc).__name__}: {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch a child process to another uid")
def test_another_uid_is_refused(sockdir: Path) -> None:
    sink = Sink()
    ep = _serve(sockdir, sink)

    def attempt() -> str:
        try:
            return json.dumps(send_events(ep.path, [GOOD], timeout_s=5))
        except EndpointError as exc:
            return f"EndpointError: {exc}"

    try:
        assert "not allowed to connect" in _as_nobody(attempt)  # the socket's mode 0600 stops it first
        os.chmod(ep.path, 0o666)  # noqa: S103 - an operator loosens the mode: SO_PEERCRED still refuses
        [reply] = json.loads(_as_nobody(attempt))
        assert reply["ok"] is False and "uid 65534" in reply["error"] and reply["closed"] is True
    finally:
        ep.close()
    assert sink.events == [] and ep.counters["refused_peer"] == 1


def test_socket_placement_is_checked(sockdir: Path) -> None:
    loose = sockdir / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)  # noqa: S103 - the placement the endpoint must refuse
    with pytest.raises(InvalidArgumentError, match="world-writable"):
        EventEndpoint(loose / "ev.sock", Sink()).run_in_thread()
    os.chmod(loose, 0o1777)  # noqa: S103 - sticky, like /tmp: nobody else may replace our socket
    ep = EventEndpoint(loose / "ev.sock", Sink())
    ep.run_in_thread()
    ep.close()
    (sockdir / "file").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="not a socket"):
        EventEndpoint(sockdir / "file", Sink()).run_in_thread()
    assert (sockdir / "file").read_text() == "keep me"
    with pytest.raises(InvalidArgumentError, match="longer than"):
        EventEndpoint(sockdir / ("x" * 120), Sink()).run_in_thread()
    assert default_socket_path(sockdir / "audit.db") == sockdir / "edgeshield-events.sock"


def test_live_endpoint_not_replaced_stale_one_is(sockdir: Path) -> None:
    ep = _serve(sockdir, Sink())
    try:
        with pytest.raises(EndpointInUseError):
            EventEndpoint(ep.path, Sink()).run_in_thread()
    finally:
        ep.close()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(ep.path))  # a socket file nobody listens on, as a crash leaves it
    stale.close()
    ep2 = _serve(sockdir, Sink())
    try:
        assert send_events(ep2.path, [GOOD]) == [{"ok": True}]
    finally:
        ep2.close()


def test_on_an_existing_loop(sockdir: Path) -> None:
    sink = Sink()

    async def main() -> list[dict[str, object]]:
        ep = EventEndpoint(sockdir / "loop.sock", sink)
        await ep.start()
        try:
            return await asyncio.to_thread(send_events, ep.path, [GOOD])
        finally:
            await ep.stop()

    assert asyncio.run(main()) == [{"ok": True}]
    assert not (sockdir / "loop.sock").exists() and len(sink.events) == 1


def test_emit_command_and_client_errors(sockdir: Path) -> None:
    ep = _serve(sockdir, Sink())
    try:
        assert emit_command(ep.path, "attestation.failed", "device-3", '{"device": "d3", "reason": "pcr"}') == {
            "ok": True}
        reply = emit_command(ep.path, "monitor.lifted", "mallory", "{}")
        assert reply["ok"] is False
        with pytest.raises(InvalidArgumentError):
            emit_command(ep.path, "attestation.failed", "d", "[1]")
    finally:
        ep.close()
    with pytest.raises(EndpointError, match="no event endpoint"):
        send_events(sockdir / "absent.sock", [GOOD])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_event_fails_only_typed_on_bytes(raw: bytes) -> None:
    with contextlib.suppress(InvalidArgumentError):
        parse_event(raw)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["kind", "actor", "data", "source", "ts", "x"]),
                       _json | st.sampled_from(sorted(KINDS)), max_size=6))
def test_parse_event_on_json_objects(obj: dict[str, object]) -> None:
    try:
        ev = parse_event(json.dumps(obj))
    except InvalidArgumentError:
        return
    assert ev.info.source not in LOCAL_SOURCES and ev.kind == obj["kind"]


BEGIN, END = "<!-- kinds:begin (generated: python tests/monitor/test_endpoint.py) -->", "<!-- kinds:end -->"


def kinds_table() -> str:
    """The catalogue section of docs/events.md, from KINDS."""
    rows = ["| kind | source | audit | from the endpoint | data fields | meaning |", "|---|---|---|---|---|---|"]
    for k in KINDS.values():
        fields = ", ".join(f"`{f}`" for f in k.fields) or "–"
        external = "no" if k.source in LOCAL_SOURCES else "yes"
        rows.append(f"| `{k.name}` | {k.source} | {k.audit} | {external} | {fields} | {k.description} |")
    return "\n".join([BEGIN, *rows, END])


def _doc_section(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    return text[start:end + len(END)] if start >= 0 and end > start else ""


def test_docs_list_every_declared_kind() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [k for k in KINDS if f"`{k}`" not in _doc_section(text)]
    assert missing == [], f"docs/events.md does not list {missing}: run python tests/monitor/test_endpoint.py"
    stale = "docs/events.md's catalogue is stale: run python tests/monitor/test_endpoint.py"
    assert _doc_section(text) == kinds_table(), stale


if __name__ == "__main__":  # regenerate the catalogue section of docs/events.md
    doc = DOC.read_text(encoding="utf-8")
    old = _doc_section(doc)
    if not old:
        raise SystemExit(f"{DOC}: markers {BEGIN!r} .. {END!r} not found")
    DOC.write_text(doc.replace(old, kinds_table()), encoding="utf-8")
    print(f"{DOC}: {len(KINDS)} kinds")
