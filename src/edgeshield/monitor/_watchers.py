"""The monitor's own event sources: watched file digests, resource pressure, and per-client request-rate anomalies.

Each source emits :class:`~edgeshield.monitor.SecurityEvent` objects through an ``emit`` callable it is given. The
two pollers (:class:`FileWatcher`, :class:`ResourceWatcher`) run on their own daemon thread and call ``emit`` there,
so ``emit`` may block (``EventStream.publish`` writes the audit entry synchronously). :class:`RateAnomaly` is an
immediate subscriber called on the server's event loop: it calls its ``emit`` inline, so that one must hand the event
off without blocking.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import math
import os
import resource
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeshield._io import sha256_file
from edgeshield.errors import InvalidArgumentError, NotAFileError, PathNotFoundError
from edgeshield.monitor._events import SecurityEvent

log = logging.getLogger("edgeshield.monitor")

Emit = Callable[[SecurityEvent], None]
ROLES = ("bundle", "detector", "policy", "config", "rules")
MISSING = "missing"  # the "digest" of a watched file that is gone
_CHUNK = 1 << 20


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _safe_emit(emit: Emit, event: SecurityEvent) -> None:
    try:
        emit(event)
    except Exception:  # a failing subscriber must not kill the poller: the next change must still be seen
        log.exception("emitting %s failed", event.kind)


class _Poller:
    """A daemon thread calling ``self._poll()`` every ``interval_s`` until :meth:`stop`."""

    interval_s: float
    _name = "edgeshield-poller"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._poll()
            except Exception:  # keep watching whatever one poll hit (a racing rename, a psutil hiccup)
                log.exception("%s poll failed", self._name)


# --- file integrity ---------------------------------------------------------------------------------------------
def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    # ctime is in the key because ``touch -d`` can put mtime back but not ctime: a same-size rewrite with its mtime
    # restored still changes the key. The periodic re-hash covers what even ctime misses (raw block-device writes,
    # a clock set back).
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Watched:
    role: str
    path: Path
    expected: str  # the sanctioned digest
    observed: str  # what the last look saw (emits happen when this changes)
    key: tuple[int, ...] | None
    hashed_at: float
    # the background re-hash, spread over polls: a hash object, its file, and the stat key it started from
    rehash: Any = None
    rehash_fh: Any = None
    rehash_key: tuple[int, ...] | None = None


class FileWatcher(_Poller):
    """Watches the bundle, detector, policy, config and rule files for changes made outside a sanctioned update.

    Digests are taken when the watcher is made (or given as ``expected``: the digests of what the server actually
    loaded, which closes the gap between loading and watching). Each poll stats every file and hashes it only when
    its (device, inode, size, mtime, ctime) changed, so polling is cheap; independently, every file is re-hashed in
    full at least every ``rehash_every_s``, in slices of ``rehash_bytes_per_poll`` so one poll never reads a large
    bundle at once. ``integrity.changed`` is emitted once per change (``actual_sha256`` ``"missing"`` when the file
    is gone) and again only when the file changes again; a file put back to its sanctioned digest emits nothing.
    :meth:`accept` re-baselines after a sanctioned update and emits ``integrity.accepted``.
    """

    _name = "edgeshield-file-watcher"

    def __init__(self, files: Mapping[str, str | os.PathLike[str]], emit: Emit, interval_s: float = 2.0, *,
                 expected: Mapping[str, str] | None = None, rehash_every_s: float = 30.0,
                 rehash_bytes_per_poll: int = 64 << 20, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        unknown = sorted(set(files) - set(ROLES))
        if unknown:
            raise InvalidArgumentError(f"unknown watched-file role(s) {', '.join(unknown)}: use {', '.join(ROLES)}")
        if expected and set(expected) - set(files):
            raise InvalidArgumentError("expected digests given for roles that are not watched: "
                                       f"{', '.join(sorted(set(expected) - set(files)))}")
        if rehash_bytes_per_poll < _CHUNK:
            raise InvalidArgumentError(f"rehash_bytes_per_poll must be at least {_CHUNK} bytes")
        self.interval_s = _positive("interval_s", interval_s)
        self.rehash_every_s = _positive("rehash_every_s", rehash_every_s)
        self.rehash_bytes_per_poll = int(rehash_bytes_per_poll)
        self._emit = emit
        self._clock = clock
        self._lock = threading.RLock()
        self._files: dict[str, _Watched] = {}
        self.hashed_bytes = 0  # total bytes hashed (tests and metrics: polling an unchanged file reads nothing)
        for role, raw in files.items():
            path = Path(raw)
            st = self._stat_regular(path, role)
            digest = self._hash(path)
            self._files[role] = _Watched(role, path, (expected or {}).get(role, digest), digest, _stat_key(st),
                                         clock())
        # A file that already differs from what the server loaded is reported on the first check, not accepted.
        for w in self._files.values():
            if w.observed != w.expected:
                w.observed = "unknown"

    @staticmethod
    def _stat_regular(path: Path, role: str) -> os.stat_result:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise PathNotFoundError(f"watched {role} file not found: {path}") from None
        if not path.is_file():
            raise NotAFileError(f"watched {role} file is not a regular file: {path}")
        return st

    def _hash(self, path: Path) -> str:
        digest = sha256_file(path)
        with contextlib.suppress(OSError):
            self.hashed_bytes += path.stat().st_size
        return digest

    # -- public --
    def digests(self) -> dict[str, str]:
        """The sanctioned digest of each role."""
        with self._lock:
            return {r: w.expected for r, w in self._files.items()}

    def paths(self) -> dict[str, Path]:
        return {r: w.path for r, w in self._files.items()}

    def status(self) -> dict[str, dict[str, Any]]:
        """Per role: path, sanctioned and last observed digest, and whether they differ (for the status page)."""
        with self._lock:
            return {r: {"path": str(w.path), "expected_sha256": w.expected, "actual_sha256": w.observed,
                        "changed": w.observed != w.expected} for r, w in self._files.items()}

    def check_now(self, *, full: bool = False) -> list[SecurityEvent]:
        """One poll now (``full``: re-hash every file whatever its stat says); returns the events it emitted."""
        with self._lock:
            events = [ev for w in self._files.values() if (ev := self._check(w, full)) is not None]
        for ev in events:
            _safe_emit(self._emit, ev)
        return events

    def accept(self, role: str | None = None, by: str = "admin") -> dict[str, str]:
        """Re-baseline ``role`` (every role when None) to the file's digest now: a sanctioned update. Emits one
        ``integrity.accepted`` per role and returns the new digests. A missing file cannot be accepted."""
        if role is not None and role not in self._files:
            raise InvalidArgumentError(f"no watched file has role {role!r} (watched: {', '.join(self._files)})")
        roles = [role] if role is not None else list(self._files)
        with self._lock:
            fresh: dict[str, tuple[str, tuple[int, ...]]] = {}
            for r in roles:  # every file first: a missing one refuses the whole acceptance
                w = self._files[r]
                st = self._stat_regular(w.path, r)
                fresh[r] = (self._hash(w.path), _stat_key(st))
            events = []
            for r, (digest, key) in fresh.items():
                w = self._files[r]
                self._cancel_rehash(w)
                w.expected = w.observed = digest
                w.key, w.hashed_at = key, self._clock()
                events.append(SecurityEvent("integrity.accepted", by, {"role": r, "path": str(w.path),
                                                                       "sha256": digest}, source="watcher"))
        for ev in events:
            _safe_emit(self._emit, ev)
        return {r: d for r, (d, _k) in fresh.items()}

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        with self._lock:
            for w in self._files.values():
                self._cancel_rehash(w)

    # -- polling --
    def _poll(self) -> None:
        self.check_now()

    def _check(self, w: _Watched, full: bool) -> SecurityEvent | None:
        try:
            st = os.stat(w.path)
            key: tuple[int, ...] | None = _stat_key(st)
        except FileNotFoundError:
            key = None
        if key is None:
            self._cancel_rehash(w)
            w.key = None
            return self._observe(w, MISSING)
        if full or key != w.key or w.observed == "unknown":
            self._cancel_rehash(w)
            try:
                digest = self._hash(w.path)
            except FileNotFoundError:  # removed between stat and open
                w.key = None
                return self._observe(w, MISSING)
            w.key, w.hashed_at = key, self._clock()
            return self._observe(w, digest)
        if w.rehash is None and self._clock() - w.hashed_at >= self.rehash_every_s:
            try:
                w.rehash_fh = w.path.open("rb")
            except FileNotFoundError:  # removed since the stat: the next poll sees it missing
                return None
            w.rehash, w.rehash_key = hashlib.sha256(), key
        if w.rehash is not None:
            return self._continue_rehash(w, key)
        return None

    def _continue_rehash(self, w: _Watched, key: tuple[int, ...]) -> SecurityEvent | None:
        if key != w.rehash_key:  # changed under the slow re-hash: the stat path above handles it next poll
            self._cancel_rehash(w)
            return None
        budget = self.rehash_bytes_per_poll
        while budget > 0:
            chunk = w.rehash_fh.read(min(_CHUNK, budget))
            if not chunk:
                digest = w.rehash.hexdigest()
                self._cancel_rehash(w)
                w.hashed_at = self._clock()
                return self._observe(w, digest)
            w.rehash.update(chunk)
            self.hashed_bytes += len(chunk)
            budget -= len(chunk)
        return None

    @staticmethod
    def _cancel_rehash(w: _Watched) -> None:
        if w.rehash_fh is not None:
            w.rehash_fh.close()
        w.rehash = w.rehash_fh = w.rehash_key = None

    def _observe(self, w: _Watched, digest: str) -> SecurityEvent | None:
        if digest == w.observed:
            return None
        w.observed = digest
        if digest == w.expected:
            log.info("watched %s file %s is back to its sanctioned digest", w.role, w.path)
            return None
        log.warning("watched %s file %s changed: %s -> %s", w.role, w.path, w.expected, digest)
        return SecurityEvent("integrity.changed", "server", {
            "role": w.role, "path": str(w.path), "expected_sha256": w.expected, "actual_sha256": digest},
            source="watcher")


# --- resources --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ResourceThresholds:
    """When ``resource.pressure`` fires: percentages for CPU, memory and disk; a fraction of RLIMIT_NOFILE."""

    cpu_percent: float = 95.0
    memory_percent: float = 90.0
    disk_percent: float = 95.0
    open_files_fraction: float = 0.9

    def __post_init__(self) -> None:
        for name in ("cpu_percent", "memory_percent", "disk_percent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 100:
                raise InvalidArgumentError(f"resource threshold {name} must be 0..100, got {v!r}")
        v = self.open_files_fraction
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise InvalidArgumentError(f"resource threshold open_files_fraction must be 0..1, got {v!r}")


Sampler = Callable[[], Mapping[str, float | int | None]]


class PsutilSampler:
    """One reading of this process and its machine: system and process CPU, memory, the disk holding ``disk_path``
    (the audit log's filesystem), and this process's open file descriptors against its RLIMIT_NOFILE soft limit."""

    def __init__(self, disk_path: str | os.PathLike[str]) -> None:
        # A core dependency, imported here so `import edgeshield.monitor` stays light; psutil ships no type
        # information (types-psutil is not pinned), so it is used as Any.
        psutil: Any = importlib.import_module("psutil")
        self._psutil = psutil
        self.disk_path = Path(disk_path)
        self._proc = psutil.Process()
        psutil.cpu_percent(None)  # the first reading of each is meaningless (no interval yet): prime them
        self._proc.cpu_percent(None)

    def __call__(self) -> dict[str, float | int | None]:
        ps = self._psutil
        with self._proc.oneshot():
            proc_cpu = self._proc.cpu_percent(None)
            rss = self._proc.memory_info().rss
            fds = self._proc.num_fds() if hasattr(self._proc, "num_fds") else None
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        disk = ps.disk_usage(str(self.disk_path))
        return {
            "cpu_percent": ps.cpu_percent(None),
            "process_cpu_percent": proc_cpu,  # may exceed 100 on several cores
            "memory_percent": ps.virtual_memory().percent,
            "process_rss_bytes": rss,
            "disk_percent": disk.percent,
            "disk_free_bytes": disk.free,
            "open_files": fds,
            "open_files_limit": None if soft == resource.RLIM_INFINITY else soft,
        }


class ResourceWatcher(_Poller):
    """Samples resources every ``interval_s``: emits ``resource.sample`` (watch-only: metrics and rules see it, the
    audit log does not) each time, and ``resource.pressure`` when a reading crosses its threshold. Pressure is
    edge-triggered with hysteresis: a resource fires again only after it dropped below threshold − ``hysteresis``
    points (0.05 for the open-files fraction) and crossed again."""

    _name = "edgeshield-resource-watcher"
    _RESOURCES = (("cpu", "cpu_percent", "percent"), ("memory", "memory_percent", "percent"),
                  ("disk", "disk_percent", "percent"), ("open_files", "open_files_fraction", "fraction"))

    def __init__(self, emit: Emit, *, disk_path: str | os.PathLike[str], interval_s: float = 5.0,
                 thresholds: ResourceThresholds | None = None, hysteresis: float = 5.0,
                 sampler: Sampler | None = None) -> None:
        super().__init__()
        self.interval_s = _positive("interval_s", interval_s)
        self.thresholds = thresholds or ResourceThresholds()
        if isinstance(hysteresis, bool) or not isinstance(hysteresis, int | float) or not 0 <= hysteresis <= 100:
            raise InvalidArgumentError(f"hysteresis must be 0..100 points, got {hysteresis!r}")
        self.hysteresis = float(hysteresis)
        self._emit = emit
        self._sampler: Sampler = sampler or PsutilSampler(disk_path)
        self._armed = {name: True for name, _t, _u in self._RESOURCES}
        self._latest: dict[str, Any] = {}
        self._lock = threading.Lock()

    def latest(self) -> dict[str, Any]:
        """The last sample (empty before the first), with ``ts``: what the metrics export."""
        with self._lock:
            return dict(self._latest)

    def pressured(self) -> list[str]:
        """Resources currently over their threshold (fired and not yet re-armed)."""
        with self._lock:
            return [r for r, armed in self._armed.items() if not armed]

    def sample_now(self) -> list[SecurityEvent]:
        """Take one sample, emit its events, return them."""
        raw = dict(self._sampler())
        opened, limit = raw.get("open_files"), raw.get("open_files_limit")
        raw["open_files_fraction"] = (round(opened / limit, 4) if isinstance(opened, int | float)
                                      and isinstance(limit, int | float) and limit > 0 else None)
        events = [SecurityEvent("resource.sample", "server", raw, source="watcher")]
        with self._lock:
            self._latest = {**raw, "ts": time.time()}
            for name, key, unit in self._RESOURCES:
                value = raw.get(key)
                if not isinstance(value, int | float):
                    continue
                threshold = float(getattr(self.thresholds, key))
                rearm = threshold - (self.hysteresis / 100 if unit == "fraction" else self.hysteresis)
                if self._armed[name] and value >= threshold:
                    self._armed[name] = False
                    events.append(SecurityEvent("resource.pressure", "server", {
                        "resource": name, "value": value, "threshold": threshold, "unit": unit}, source="watcher"))
                elif not self._armed[name] and value < rearm:
                    self._armed[name] = True
        for ev in events:
            _safe_emit(self._emit, ev)
        return events

    def _poll(self) -> None:
        self.sample_now()


# --- request-rate anomalies -------------------------------------------------------------------------------------
_BUCKETS = 10  # the window is kept as this many sub-buckets: a sliding window, O(1) per event


@dataclass(slots=True)
class _Actor:
    first_seen: float
    bucket_start: float  # start time of the current (newest) bucket
    buckets: list[int]
    head: int = 0  # index of the current bucket
    ewma: float = 0.0  # EWMA of the actor's request rate (requests/s), started at 0 ...
    weight: float = 0.0  # ... so divided by the weight the EWMA has accumulated (bias correction, as in Adam)
    last_alert: float = -math.inf


class RateAnomaly:
    """Flags a client whose request rate jumps far above its own recent baseline (an immediate subscriber).

    Per actor, ``inference.predict`` events are counted over a sliding ``window_s`` (kept as ten buckets); every
    closed bucket feeds an exponentially weighted moving average with time constant ``baseline_s`` (after the
    warm-up, clipped to ``factor`` × baseline, so a burst does not lift its own baseline). When the
    window's rate exceeds ``factor`` × baseline and ``min_rate`` requests/s, once the actor has been seen for
    ``warmup_s``, ``client.rate_anomaly`` is emitted (then not again for that actor for ``cooldown_s``). At most
    ``max_actors`` actors are tracked (least recently seen forgotten first).

    ``handle`` runs on the server's event loop and calls ``emit`` inline: ``emit`` must not block (the server's is a
    hand-off to a worker thread), never ``EventStream.publish`` of an audited kind. It does no I/O itself.
    What it cannot see: a client new within ``warmup_s`` (no baseline yet), a rate ramped up slowly enough that the
    baseline keeps pace, and one spread over several identities — absolute rate limits cover those.
    """

    durable = False

    def __init__(self, emit: Emit, *, window_s: float = 10.0, factor: float = 5.0, min_rate: float = 20.0,
                 warmup_s: float = 60.0, baseline_s: float = 300.0, cooldown_s: float = 60.0,
                 max_actors: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = _positive("window_s", window_s)
        self.baseline_s = _positive("baseline_s", baseline_s)
        if not factor > 1 or not math.isfinite(factor):
            raise InvalidArgumentError(f"factor must be a number above 1, got {factor!r}")
        if not min_rate >= 0 or not math.isfinite(min_rate):
            raise InvalidArgumentError(f"min_rate must be a number >= 0, got {min_rate!r}")
        if not warmup_s >= 0 or not cooldown_s >= 0:
            raise InvalidArgumentError("warmup_s and cooldown_s must be >= 0")
        if isinstance(max_actors, bool) or not isinstance(max_actors, int) or max_actors < 1:
            raise InvalidArgumentError(f"max_actors must be a whole number >= 1, got {max_actors!r}")
        self.factor, self.min_rate = float(factor), float(min_rate)
        self.warmup_s, self.cooldown_s, self.max_actors = float(warmup_s), float(cooldown_s), max_actors
        self._bucket_s = self.window_s / _BUCKETS
        self._alpha = 1.0 - math.exp(-self._bucket_s / self.baseline_s)  # EWMA weight of one closed bucket
        self._emit = emit
        self._clock = clock
        self._actors: OrderedDict[str, _Actor] = OrderedDict()
        self._lock = threading.Lock()
        self.alerts = 0

    def handle(self, event: SecurityEvent) -> None:
        if event.kind != "inference.predict":
            return
        now = self._clock()
        with self._lock:
            st = self._actors.get(event.actor)
            if st is None:
                st = _Actor(now, now, [0] * _BUCKETS)
                self._actors[event.actor] = st
                if len(self._actors) > self.max_actors:
                    self._actors.popitem(last=False)
            else:
                self._actors.move_to_end(event.actor)
                self._advance(st, now)
            st.buckets[st.head] += 1
            # The window: its full buckets plus the elapsed part of the current one (a burst is seen at once).
            span = self.window_s - self._bucket_s + max(now - st.bucket_start, self._bucket_s / 10)
            rate = sum(st.buckets) / min(span, self.window_s)
            baseline = st.ewma / st.weight if st.weight > 0 else 0.0
            if (now - st.first_seen < self.warmup_s or rate <= self.min_rate or rate <= self.factor * baseline
                    or now - st.last_alert < self.cooldown_s):
                return
            st.last_alert = now
            self.alerts += 1
        ratio = round(rate / baseline, 2) if baseline > 0 else None
        self._emit(SecurityEvent("client.rate_anomaly", event.actor, {
            "rate": round(rate, 2), "baseline": round(baseline, 4), "factor": ratio, "threshold_factor": self.factor,
            "window_s": self.window_s}, address=event.address, serial=event.serial, source="watcher"))

    def _advance(self, st: _Actor, now: float) -> None:
        """Close every bucket that ended before ``now``, feeding each into the baseline."""
        steps = int((now - st.bucket_start) // self._bucket_s)
        if steps <= 0:
            return
        warm = now - st.first_seen >= self.warmup_s
        for _ in range(min(steps, _BUCKETS)):
            rate = st.buckets[st.head] / self._bucket_s
            if warm and st.weight > 0:  # a burst must not lift its own baseline: feed it clipped
                rate = min(rate, max(self.factor * st.ewma / st.weight, self.min_rate))
            st.ewma += self._alpha * (rate - st.ewma)
            st.weight += self._alpha * (1.0 - st.weight)
            st.head = (st.head + 1) % _BUCKETS
            st.buckets[st.head] = 0
        if steps > _BUCKETS:  # idle longer than the window: the empty buckets, fed in closed form
            decay = (1.0 - self._alpha) ** (steps - _BUCKETS)
            st.ewma *= decay
            st.weight = 1.0 - (1.0 - st.weight) * decay
        st.bucket_start += steps * self._bucket_s

    def baseline(self, actor: str) -> float | None:
        """The actor's baseline rate (requests/s), None when not tracked."""
        with self._lock:
            st = self._actors.get(actor)
            if st is None:
                return None
            return st.ewma / st.weight if st.weight > 0 else 0.0

    def tracked(self) -> int:
        with self._lock:
            return len(self._actors)
