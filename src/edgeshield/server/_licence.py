"""The licence of a model served from a released key: checked at start, in the background, and per request.

``LicenceGuard`` (``hardware._release``) holds the rules: the wall clock against ``not_after`` and the TPM clock
against the anchor the release service bound into the key's label. :class:`LicenceState` keeps one model's verdict
(once expired, expired for good), :class:`LicenceWatcher` runs the full check every ``watch_interval_s`` (it reads
the TPM clock, so not on the event loop), and the pipeline's ``Licence`` stage makes the cheap wall-clock test on
every request. The first to see the expiry audits ``licence.expired``; predictions then answer 451.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeshield.monitor import SecurityEvent

if TYPE_CHECKING:
    from edgeshield.server._app import ServerState

log = logging.getLogger("edgeshield.server")


@dataclass
class LicenceState:
    """The licence of a model opened from a released key, and whether it has expired (decided once, then kept).

    ``check`` asks the ``LicenceGuard`` (wall time and the TPM clock, on a TPM connection of its own each time, so
    no connection is held between checks or shared between threads); ``expired_now`` is the cheap per-request test
    against the cached ``not_after``. Whichever first sees the expiry records the reason; ``claim_report`` is true
    exactly once, for whoever audits it. While the TPM cannot be read the licence is ``unverified`` and predictions
    are refused too (fail closed: otherwise making the TPM unreachable would leave only the settable wall clock).
    """

    guard: Any  # hardware._release.LicenceGuard
    tcti: str | None = None
    bundle_id: str | None = None  # the bundle the licence is for: what a refusal names
    expired: str | None = None
    unverified: str | None = None  # why the last full check could not read the TPM clock, until one can
    _reported: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _check_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def describe(self) -> dict[str, Any]:
        info = dict(self.guard.describe())
        info["expired"] = self.expired is not None
        if self.expired is not None:
            info["reason"] = self.expired
        if self.unverified is not None:
            info["unverified"] = self.unverified
        return info

    def refusal(self) -> str | None:
        """Why predictions must be refused now (expired, or the TPM clock unreadable), else None; cheap."""
        if self.expired_now():
            return f"the licence for bundle {self.bundle_id} has expired: {self.expired}"
        if self.unverified is not None:
            return f"the licence for bundle {self.bundle_id} cannot be checked: {self.unverified}"
        return None

    def expired_now(self) -> bool:
        if self.expired is not None:
            return True
        not_after = self.guard.not_after
        if not_after is not None and time.time() > not_after.timestamp():
            self._mark("the licence's not_after has passed")
        return self.expired is not None

    def check(self) -> bool:
        """The full check (reads the TPM clock: call it from a worker thread); True once expired."""
        from edgeshield.errors import EdgeShieldError
        from edgeshield.hardware import _attest as at
        from edgeshield.hardware._release import LicenceExpiredError

        if self.expired is not None:
            return True
        with self._check_lock:
            try:
                with at.DeviceTpm(self.tcti) as tpm:
                    self.guard.tpm = tpm
                    self.guard.check()
                self.unverified = None
            except LicenceExpiredError as exc:
                self._mark(str(exc))
            except EdgeShieldError as exc:  # TpmUnavailableError and kin: refuse until the clock can be read
                if self.unverified is None:
                    log.error("the licence's TPM clock cannot be read (%s): predictions answer 451 until it can", exc)
                self.unverified = " ".join(str(exc).split())[:300]
        return self.expired is not None

    def _mark(self, reason: str) -> None:
        with self._lock:
            if self.expired is None:
                self.expired = reason[:300]

    def claim_report(self) -> bool:
        with self._lock:
            if self.expired is None or self._reported:
                return False
            self._reported = True
            return True


def expiry_event(licence: LicenceState) -> SecurityEvent:
    return SecurityEvent("licence.expired", "server", {"bundle_id": licence.bundle_id, "reason": licence.expired,
                                                       "licence": licence.describe()})


class LicenceWatcher(threading.Thread):
    """Every ``interval_s``: the full licence check of the served model (wall clock and TPM clock); on expiry,
    ``licence.expired`` is published once. A reload to a model with a new licence is picked up on the next round."""

    def __init__(self, state: ServerState, interval_s: float) -> None:
        super().__init__(name="edgeshield-licence", daemon=True)
        self.state, self.interval_s = state, interval_s
        self.stop_event = threading.Event()

    def check_now(self) -> bool:
        licence = self.state.model.licence
        if licence is None or not licence.check():
            return False
        if licence.claim_report():
            log.error("the licence for bundle %s has expired: %s; predictions now answer 451", licence.bundle_id,
                      licence.expired)
            self.state.events.publish(expiry_event(licence))
        return True

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                self.check_now()
            except Exception:  # a TPM hiccup: the next round tries again; the per-request check still runs
                log.exception("the licence check failed")

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=10)
