"""Publish the audit log's checkpoints to a witness off the device, in the background, while the server runs.

Whoever holds the device's checkpoint key can re-sign a rewritten log, and whoever holds the file can cut it back to
an older checkpoint; only a witness that cosigned a later checkpoint shows either (``docs/server.md``). So with
``serve --witness URL`` a thread submits the newest checkpoint every ``every_s`` seconds when it has grown (and once
more after the shutdown checkpoint), with a consistency proof from the size the witness last cosigned, and keeps the
cosigned note beside the log, atomically replaced (``audit verify --against`` takes it). A witness that holds a tree
this log does not extend is an integrity alarm: logged as an error and audited (``witness.inconsistent``). A witness
that cannot be reached is logged (at most once a minute) and audited once per outage (``witness.unreachable``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeshield.errors import EdgeShieldError, WitnessInconsistentError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgeshield.audit import AuditLog, Vkey, WitnessEndpoint
    from edgeshield.monitor import SecurityEvent

log = logging.getLogger("edgeshield.server")


class WitnessPublisher(threading.Thread):
    def __init__(self, audit_log: AuditLog, witness: WitnessEndpoint, public_key: Ed25519PublicKey, *,
                 witness_keys: Sequence[Vkey] = (), every_s: float = 60.0, note_path: Path | None = None) -> None:
        super().__init__(name="edgeshield-witness-publisher", daemon=True)
        self.audit_log, self.witness, self.public_key = audit_log, witness, public_key
        self.witness_keys, self.every_s, self.note_path = tuple(witness_keys), every_s, note_path
        self.published = 0  # tree size the witness last cosigned for us (0: not yet known)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._outage = False
        self._last_warning = -float("inf")
        # where its events go: the server's event stream once there is one (then the audit subscriber writes them)
        self.emit: Callable[[SecurityEvent], None] | None = None

    def publish_now(self, *, final: bool = False) -> dict[str, Any] | None:
        """Submit the newest checkpoint if it is newer than what the witness cosigned; what happened, or None."""
        from edgeshield import audit
        from edgeshield._io import atomic_write_bytes

        with self._lock:
            cp = self.audit_log.latest_checkpoint()
            if cp is None or cp.tree_size <= self.published:
                return None
            try:
                result = audit.publish(self.audit_log, self.witness, public_key=self.public_key,
                                       witness_keys=self.witness_keys, old_size=self.published)
            except WitnessInconsistentError as exc:
                log.error("the witness holds a checkpoint this audit log does not extend: %s", exc)
                return self._record("witness.inconsistent", {"reason": str(exc)[:200],
                                                             "tree_size": cp.tree_size}, final=final)
            except EdgeShieldError as exc:
                now = time.monotonic()
                if now - self._last_warning >= 60:
                    self._last_warning = now
                    log.warning("cannot publish the audit checkpoint to the witness: %s", exc)
                if self._outage:
                    return None
                self._outage = True
                return self._record("witness.unreachable", {"reason": str(exc)[:200], "tree_size": cp.tree_size},
                                    final=final)
            self._outage, self.published = False, result.checkpoint.tree_size
            if self.note_path is not None:
                atomic_write_bytes(self.note_path, result.note.encode())
            data = {"tree_size": result.checkpoint.tree_size, "witness_size_before": result.witness_size,
                    "cosigned_by": [s.name for s in result.cosignatures],
                    "cosignatures_verified": list(result.verified_witnesses)}
            if final:  # after the shutdown checkpoint an entry would end the log uncovered: the note is the record
                log.info("audit checkpoint %d cosigned by the witness", result.checkpoint.tree_size)
                return data
            return self._record("witness.cosigned", data, final=False)

    def _record(self, kind: str, data: dict[str, Any], *, final: bool) -> dict[str, Any]:
        from edgeshield.monitor import SecurityEvent

        if self.emit is not None:
            self.emit(SecurityEvent(kind, "server", data))
        else:
            self.audit_log.append(kind, "server", data)
        if final:
            self.audit_log.checkpoint()  # the log still ends covered
        return data

    def run(self) -> None:
        while True:  # a first round at once: the start-up (or recovery) checkpoint
            try:
                self.publish_now()
            except Exception:  # never let the publisher die silently: the next round tries again
                log.exception("witness publisher round failed")
            if self.stop_event.wait(self.every_s):
                return

    def finish(self) -> None:
        """Stop the thread and publish the shutdown checkpoint once more."""
        self.stop_event.set()
        try:
            self.publish_now(final=True)
        except Exception:
            log.exception("the final witness publication failed")
