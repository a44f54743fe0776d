"""Revocation while the server runs: CRL reloads without restart, live connections cut, expiry handled.

The CA key stays off the device, so the CA host re-signs ``crl.pem`` on a schedule (``edgeshield pki crl`` from a
timer) and copies it here. :class:`CrlWatcher` notices a changed file, loads it into the live ``SSLContext``
(every later full handshake is checked against it), closes the connections of newly revoked certificates, and
watches the loaded CRL's ``nextUpdate``: a warning in the log and the ``edgeshield_crl_seconds_to_next_update``
metric days before, and when it passes, one of two policies:

- ``fail-closed`` (the default): revocation can no longer be checked, so nobody is served — OpenSSL refuses full
  handshakes by itself and :meth:`CrlGuard.refusal` refuses requests on connections already open (401);
- ``keep-last``: keep revoking with the last CRL's serials (OpenSSL's own CRL check is switched off, the server's
  set lookup stays), logged as an error every ``loud_every_s`` seconds and audited.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeshield.server._app import ServerState
    from edgeshield.transport import Identity

log = logging.getLogger("edgeshield.server")
CRL_POLICIES = ("fail-closed", "keep-last")


class CrlGuard:
    """What the live context's CRL says about an identity now, and what an expired CRL means."""

    def __init__(self, ctx: ssl.SSLContext, policy: str = "fail-closed") -> None:
        from edgeshield.errors import InvalidArgumentError

        if policy not in CRL_POLICIES:
            raise InvalidArgumentError(f"an expired CRL must mean one of {', '.join(CRL_POLICIES)}, not {policy!r}")
        self.ctx, self.policy = ctx, policy

    def seconds_left(self) -> float | None:
        from edgeshield.transport import loaded_crl

        info = loaded_crl(self.ctx)
        return None if info is None else (info.next_update - datetime.now(UTC)).total_seconds()

    def refusal(self, identity: Identity) -> str | None:
        """Why ``identity`` must not be served now (revoked since its handshake, or no current CRL), or None."""
        from edgeshield.transport import loaded_crl

        info = loaded_crl(self.ctx)  # one look-up per request: the serials and the dates of the same CRL
        if info is None:
            return None
        if identity.serial in info.revoked:
            return f"certificate 0x{identity.serial:x} ({identity.name}) is revoked"
        if self.policy == "fail-closed" and info.next_update <= datetime.now(UTC):
            return "the server's CRL has expired, so revocation cannot be checked"
        return None

    def apply(self, expired: bool) -> None:
        """keep-last: OpenSSL refuses every full handshake under an expired CRL, so its check is switched off while
        the CRL is expired (the server's serial check stays) and back on once a current one is loaded."""
        if self.policy != "keep-last":
            return
        if expired:
            self.ctx.verify_flags &= ~ssl.VERIFY_CRL_CHECK_LEAF
        else:
            self.ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


class CrlWatcher(threading.Thread):
    """Reloads the CRL into the live context when the file changes (no restart), audits each reload, cuts the
    connections it revokes, and warns — log, metric, audit — as ``nextUpdate`` nears and passes."""

    def __init__(self, guard: CrlGuard, crl_path: Path, state: ServerState, poll_s: float, *,
                 warn_before_s: float = 2 * 86400.0, loud_every_s: float = 600.0,
                 on_reload: Callable[[frozenset[int]], None] | None = None) -> None:
        super().__init__(name="edgeshield-crl", daemon=True)
        self.guard, self.path, self.state, self.poll_s = guard, crl_path, state, poll_s
        self.warn_before_s, self.loud_every_s, self.on_reload = warn_before_s, loud_every_s, on_reload
        self.stop = threading.Event()
        self._mtime = crl_path.stat().st_mtime_ns
        self._phase = "current"  # current | expiring | expired: each change is audited once
        self._last_warning = -float("inf")

    def check(self) -> bool:
        """Load the CRL file if it changed; True when a new CRL took effect."""
        from edgeshield.errors import EdgeShieldError
        from edgeshield.transport import reload_crl

        mtime = self.path.stat().st_mtime_ns
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            info = reload_crl(self.guard.ctx, self.path, allow_expired=self.guard.policy == "keep-last")
        except EdgeShieldError as exc:
            self._audit("crl.reload_failed", {"reason": str(exc)[:200]})
            log.error("CRL reload failed: %s", exc)
            return False
        self._audit("crl.reload", {"crl_number": info.number, "revoked": len(info.revoked),
                                   "next_update": info.next_update.isoformat()})
        if self.on_reload is not None:
            self.on_reload(info.revoked)
        return True

    def check_expiry(self, now: float | None = None) -> str:
        """Update the metric, warn or fail as ``nextUpdate`` nears or passes; the current phase."""
        left = self.guard.seconds_left()
        if left is None:
            return self._phase
        if self.state.metrics is not None:
            self.state.metrics.crl_seconds_left.set(left)
        phase = "expired" if left <= 0 else "expiring" if left <= self.warn_before_s else "current"
        now = time.monotonic() if now is None else now
        if phase != self._phase:
            self.guard.apply(phase == "expired")
            if phase != "current":
                self._audit(f"crl.{phase}", {"seconds_left": round(left), "policy": self.guard.policy})
            self._phase, self._last_warning = phase, -float("inf")
        if phase != "current" and now - self._last_warning >= (self.loud_every_s if phase == "expired" else 3600.0):
            self._last_warning = now
            if phase == "expiring":
                log.warning("the CRL expires in %.1f hours: re-sign it on the CA host (edgeshield pki crl) and copy "
                            "crl.pem to %s", left / 3600, self.path)
            elif self.guard.policy == "fail-closed":
                log.error("the CRL expired %.1f hours ago: every client is refused until a current crl.pem is "
                          "copied to %s", -left / 3600, self.path)
            else:
                log.error("the CRL expired %.1f hours ago: still revoking with its serials (--crl-expired "
                          "keep-last); certificates revoked since are NOT refused", -left / 3600)
        return phase

    def _audit(self, kind: str, data: dict[str, Any]) -> None:
        from edgeshield.monitor import SecurityEvent

        self.state.events.publish(SecurityEvent(kind, "server", data))  # the stream's audit subscriber writes it

    def run(self) -> None:
        while not self.stop.wait(self.poll_s):
            try:
                self.check()
                self.check_expiry()
            except OSError:
                continue
