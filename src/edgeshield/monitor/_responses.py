"""What the monitor's responses do: the enforcement state requests are checked against, and the alert webhook.

:class:`Enforcement` holds the blocks, throttles, certificate denials and quarantines in force, in memory, behind
one lock; the server asks it about every connection and request (:meth:`Enforcement.refusal`), so a response takes
effect the moment the rule fires, before anything is written anywhere. :class:`WebhookSender` posts alerts as JSON
from its own thread, with a timeout, retries with backoff and a bounded queue (overflow is dropped and counted:
a flood of alerts never slows a request).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeshield.errors import InvalidArgumentError
from edgeshield.monitor._store import ActiveResponse

log = logging.getLogger("edgeshield.monitor")

LIFTABLE = ("block", "throttle", "deny_cert", "quarantine")
TARGET_KINDS = ("identity", "address", "serial", "file")
FILE_ROLES = ("bundle", "detector", "policy", "config", "rules")
MONITOR_MESSAGE = "refused by the security monitor"


@dataclass(frozen=True, slots=True)
class Refusal:
    """How to refuse a request a response applies to: the status, the client-facing error, and for the audit the
    action and rule behind it (``target`` is the matched target, e.g. ``identity:alice``)."""

    status: int
    error: str
    action: str
    rule: str
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    target: str = ""


def normalize_address(address: str) -> str:
    """The unit an address block applies to, as the server's connection gate counts addresses: the IPv4 address
    (IPv4-mapped IPv6 included), or the /64 an IPv6 host can freely pick addresses from; anything else unchanged."""
    text = address.split("%", 1)[0]
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            if isinstance(net, ipaddress.IPv6Network) and net.prefixlen > 64:
                net = net.supernet(new_prefix=64)
            return str(net)
        ip = ipaddress.ip_address(text)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def check_target(action: str, target: str) -> str:
    """``target`` in canonical form if it is a well-formed target for ``action``; else InvalidArgumentError."""
    if action not in LIFTABLE:
        raise InvalidArgumentError(f"action must be one of {', '.join(LIFTABLE)}, not {action[:40]!r}")
    kind, sep, value = target.partition(":")
    if not sep or not value or len(target) > 300:
        raise InvalidArgumentError(f"target must be KIND:VALUE (identity:NAME, address:IP, serial:HEX, file:ROLE), "
                                   f"not {target[:60]!r}")
    allowed = {"block": ("identity", "address"), "throttle": ("identity", "address"), "deny_cert": ("serial",),
               "quarantine": ("file",)}[action]
    if kind not in allowed:
        raise InvalidArgumentError(f"a {action} target is {' or '.join(k + ':…' for k in allowed)}, not {kind!r}")
    if kind == "address":
        canonical = normalize_address(value)
        if canonical == value and not _is_ip(value):
            raise InvalidArgumentError(f"not an IP address or IPv6 /64: {value[:60]!r}")
        return f"address:{canonical}"
    if kind == "serial":
        text = value.lower().removeprefix("0x")
        if not text or text.strip("0123456789abcdef"):  # int() would also take a sign, "_", spaces, a 2nd "0x"
            raise InvalidArgumentError(f"a serial is hexadecimal, not {value[:60]!r}")
        return f"serial:{int(text, 16):x}"
    if kind == "file" and value not in FILE_ROLES:
        raise InvalidArgumentError(f"a file role is one of {', '.join(FILE_ROLES)}, not {value[:40]!r}")
    return target


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; :meth:`take` returns 0 when allowed, else the seconds to wait."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Enforcement:
    """The responses in force, checked on every connection and request; thread-safe, O(1) per check."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._blocks: dict[str, ActiveResponse] = {}  # target -> block
        self._throttles: dict[str, tuple[ActiveResponse, TokenBucket]] = {}
        self._denied: dict[int, ActiveResponse] = {}
        self._denied_set: frozenset[int] = frozenset()
        self._quarantines: dict[str, ActiveResponse] = {}  # file role -> quarantine
        self._any = False  # read without the lock on the fast path (an attribute read is atomic)

    def _changed(self) -> None:
        self._denied_set = frozenset(self._denied)
        self._any = bool(self._blocks or self._throttles or self._denied or self._quarantines)

    def apply(self, r: ActiveResponse) -> None:
        with self._lock:
            if r.action == "block":
                self._blocks[r.target] = r
            elif r.action == "throttle":
                rate, burst = float(r.params.get("rate", 1.0)), float(r.params.get("burst", 1.0))
                self._throttles[r.target] = (r, TokenBucket(rate, burst, self._clock()))
            elif r.action == "deny_cert":
                self._denied[int(r.target.removeprefix("serial:"), 16)] = r
            elif r.action == "quarantine":
                self._quarantines[r.target.removeprefix("file:")] = r
            else:
                raise ValueError(f"not an enforced action: {r.action}")
            self._changed()

    def lift(self, action: str, target: str) -> ActiveResponse | None:
        with self._lock:
            r: ActiveResponse | None
            if action == "block":
                r = self._blocks.pop(target, None)
            elif action == "throttle":
                entry = self._throttles.pop(target, None)
                r = entry[0] if entry is not None else None
            elif action == "deny_cert":
                r = self._denied.pop(int(target.removeprefix("serial:"), 16), None)
            else:
                r = self._quarantines.pop(target.removeprefix("file:"), None)
            self._changed()
            return r

    def expire(self) -> list[ActiveResponse]:
        """Remove and return the responses whose time is up."""
        now = self._clock()
        gone: list[ActiveResponse] = []
        with self._lock:
            if not self._any:
                return gone
            for table in (self._blocks, self._denied, self._quarantines):
                for k, r in list(table.items()):
                    if r.until is not None and r.until <= now:
                        gone.append(table.pop(k))  # type: ignore[call-overload]  # each table's own key type
            for k, (r, _b) in list(self._throttles.items()):
                if r.until is not None and r.until <= now:
                    gone.append(r)
                    del self._throttles[k]
            if gone:
                self._changed()
        return gone

    def active(self) -> list[ActiveResponse]:
        now = self._clock()
        with self._lock:
            rs = [*self._blocks.values(), *(r for r, _b in self._throttles.values()), *self._denied.values(),
                  *self._quarantines.values()]
        return sorted((r for r in rs if r.until is None or r.until > now), key=lambda r: r.since)

    def count(self, action: str) -> int:
        if action == "block":
            return len(self._blocks)
        if action == "throttle":
            return len(self._throttles)
        return len(self._denied) if action == "deny_cert" else len(self._quarantines)

    def denied_serials(self) -> frozenset[int]:
        return self._denied_set

    def refusal(self, identity: str | None, serial: int | None, address: str | None) -> Refusal | None:
        if not self._any:
            return None
        now = self._clock()
        addr = f"address:{normalize_address(address)}" if address else None
        who = f"identity:{identity}" if identity else None
        with self._lock:
            if serial is not None:
                d = self._denied.get(serial)
                if d is not None and _live(d, now):
                    return Refusal(401, "not authenticated: certificate denied by the security monitor",
                                   "deny_cert", d.rule, {"connection": "close"}, True, d.target)
            for target in (who, addr):
                b = self._blocks.get(target) if target is not None else None
                if b is not None and _live(b, now):
                    headers = {"retry-after": str(max(1, math.ceil(b.until - now)))} if b.until is not None else {}
                    return Refusal(403, MONITOR_MESSAGE, "block", b.rule, headers, False, b.target)
            for target in (who, addr):
                t = self._throttles.get(target) if target is not None else None
                if t is not None and _live(t[0], now):
                    wait = t[1].take(now)
                    if wait > 0:
                        return Refusal(429, "rate limited by the security monitor", "throttle", t[0].rule,
                                       {"retry-after": str(max(1, math.ceil(wait)))}, False, t[0].target)
        return None

    def address_refused(self, address: str) -> str | None:
        if not self._any or not self._blocks:
            return None
        b = self._blocks.get(f"address:{normalize_address(address)}")
        return f"address blocked by the security monitor ({b.rule})" if b is not None and _live(b, self._clock()) \
            else None

    def quarantined(self) -> str | None:
        if not self._quarantines:
            return None
        with self._lock:
            roles = sorted(self._quarantines)
        return f"quarantined by the security monitor: the {' and '.join(roles)} changed outside a sanctioned update"


def _live(r: ActiveResponse, now: float) -> bool:
    return r.until is None or r.until > now


# --- the alert webhook ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WebhookConfig:
    """Where alerts are POSTed as JSON. https, or http to a loopback address only (a local relay, tests); the
    optional bearer ``token`` is sent in the Authorization header and never logged or shown in a repr."""

    url: str
    token: str | None = field(default=None, repr=False)
    timeout_s: float = 5.0
    retries: int = 3
    backoff_s: float = 0.5
    queue_size: int = 1000
    ca: Path | None = None  # CA bundle the webhook's certificate chains to (default: the system's)

    def __post_init__(self) -> None:
        u = urllib.parse.urlsplit(self.url)
        if u.scheme not in ("https", "http") or not u.hostname:
            raise InvalidArgumentError("the webhook URL must be https://HOST/... (http only to a loopback address)")
        if u.username or u.password:
            raise InvalidArgumentError("put webhook credentials in a token environment variable, not in the URL")
        if u.scheme == "http" and not _loopback(u.hostname):
            raise InvalidArgumentError("a webhook over plain http is allowed only to a loopback address; use https")
        if not 0 < self.timeout_s <= 120 or not 0 <= self.retries <= 10 or not 0 <= self.backoff_s <= 60:
            raise InvalidArgumentError("webhook timeout_s must be in (0, 120], retries in 0..10, backoff_s in 0..60")
        if not 1 <= self.queue_size <= 100_000:
            raise InvalidArgumentError("webhook queue_size must be in 1..100000")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise InvalidArgumentError("the webhook token must be one non-empty line")

    @classmethod
    def from_env(cls, url: str, token_env: str | None = None, **kw: Any) -> WebhookConfig:
        """The config with its bearer token read from the environment variable ``token_env`` (if given)."""
        token = None
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                raise InvalidArgumentError(f"environment variable {token_env} (the webhook token) is not set")
        return cls(url, token, **kw)

    @property
    def redacted_url(self) -> str:
        u = urllib.parse.urlsplit(self.url)
        return f"{u.scheme}://{u.hostname}{':' + str(u.port) if u.port else ''}{u.path}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Outcome = Callable[[Mapping[str, Any], bool, str | None], None]


class WebhookSender:
    """Posts payloads from one thread; ``submit`` never blocks (a full queue drops the payload and counts it)."""

    def __init__(self, config: WebhookConfig, on_result: Outcome) -> None:
        self.config = config
        self._on_result = on_result
        self._queue: queue.Queue[Mapping[str, Any] | None] = queue.Queue(maxsize=config.queue_size)
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.sent = 0
        self.failed = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgeshield-monitor-webhook", daemon=True)
            self._thread.start()

    def submit(self, payload: Mapping[str, Any]) -> bool:
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Send what is queued for up to ``timeout_s``, then give up on the rest."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        thread.join(timeout_s)
        if thread.is_alive():
            self._abort.set()
            thread.join(self.config.timeout_s + 1)

    def _client(self) -> Any:
        import httpx

        verify: Any = True
        if self.config.ca is not None:
            import ssl

            verify = ssl.create_default_context(cafile=str(self.config.ca))
        headers = {"content-type": "application/json", "user-agent": "edgeshield-monitor"}
        if self.config.token:
            headers["authorization"] = f"Bearer {self.config.token}"
        return httpx.Client(timeout=self.config.timeout_s, verify=verify, headers=headers, follow_redirects=False)

    def _run(self) -> None:
        with self._client() as client:
            while True:
                payload = self._queue.get()
                if payload is None:
                    return
                if self._abort.is_set():
                    self.dropped += 1
                    continue
                ok, error = self._post(client, payload)
                if ok:
                    self.sent += 1
                else:
                    self.failed += 1
                try:
                    self._on_result(payload, ok, error)
                except Exception:  # the result hook is ours; a bug there must not stop the sender
                    log.exception("webhook result hook failed")

    def _post(self, client: Any, payload: Mapping[str, Any]) -> tuple[bool, str | None]:
        import httpx

        body = json.dumps(payload, default=str).encode()
        error = "not sent"
        for attempt in range(self.config.retries + 1):
            if attempt and self._abort.wait(self.config.backoff_s * 2 ** (attempt - 1)):
                return False, "abandoned at shutdown"
            try:
                r = client.post(self.config.url, content=body)
            except httpx.HTTPError as exc:
                error = type(exc).__name__  # never the exception text: it may echo headers or the URL's query
                continue
            if 200 <= r.status_code < 300:
                return True, None
            error = f"HTTP {r.status_code}"
            if r.status_code < 500 and r.status_code != 429:
                break  # the receiver refused it: retrying will not help
        log.warning("alert webhook to %s failed: %s", self.config.redacted_url, error)
        return False, error
