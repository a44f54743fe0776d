"""Reloading the served model while serving: SIGHUP and ``POST /v1/admin/reload``.

A reload re-resolves the model (the update directory's current slot, else the configured files), verifies and
opens it completely with :class:`~edgeshield.server._model.ModelLoader`, and only then replaces ``state.model``
with one assignment. Requests already running keep the model they started with (they hold it in their context);
connections are not touched. A failed reload changes nothing, is audited (``model.reload_failed``) and raised as
its typed error; a success is audited (``model.reload``) and the ``on_model_swap`` hooks run (the file watcher
re-baselines on the new files, so the monitor's ``bundle_changed`` rule does not quarantine a sanctioned reload).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from edgeshield.errors import EdgeShieldError, IntegrityError
from edgeshield.monitor import SecurityEvent

if TYPE_CHECKING:
    from edgeshield.adversarial import InputSpec
    from edgeshield.server._app import ServerState
    from edgeshield.server._model import ModelLoader, ServedModel

log = logging.getLogger("edgeshield.server")


class ModelReloadError(EdgeShieldError):
    """The model could not be reloaded for a reason that is not one of the loaders' own typed errors."""

    reason = "error"


class ModelDowngradeError(IntegrityError):
    """A reload from the configured files would serve an older model version than the one served now."""

    reason = "downgrade"


def reason_of(exc: BaseException) -> str:
    """A short machine-readable reason for a refused reload (the error's own ``reason``, else its type)."""
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) and reason else type(exc).__name__


class Reloader:
    """Swaps the served model for a freshly verified one; one reload at a time (others wait for it)."""

    def __init__(self, state: ServerState, loader: ModelLoader, *, lock_timeout_s: float = 120.0) -> None:
        self.state, self.loader, self.lock_timeout_s = state, loader, lock_timeout_s
        self._lock = threading.Lock()

    def reload(self, by: str) -> dict[str, Any]:
        """Blocking (opens a model): call it from a worker thread. Returns the old and new model's summary."""
        if not self._lock.acquire(timeout=self.lock_timeout_s):
            raise ModelReloadError("another reload is still running")
        try:
            return self._reload(by)
        finally:
            self._lock.release()

    def _reload(self, by: str) -> dict[str, Any]:
        from edgeshield.server._app import input_spec_for

        old = self.state.model
        try:
            new = self.loader.load()
            new = _with_spec(new, input_spec_for(new.session, new.spec))
            if self.loader.cfg.update_dir is None and new.manifest.model_version < old.manifest.model_version:
                raise ModelDowngradeError(f"the bundle on disk is version {new.manifest.model_version}, older than "
                                          f"the served version {old.manifest.model_version}: restart serve to go "
                                          "back (an update directory's rollback is the sanctioned way)")
        except Exception as exc:
            error = exc if isinstance(exc, EdgeShieldError) else ModelReloadError(
                f"the model could not be opened ({type(exc).__name__})")
            log.warning("model reload by %s refused: %s", by, error)
            self._publish("model.reload_failed", by, {"by": by, "reason": reason_of(error),
                                                      "error": " ".join(str(error).split())[:500],
                                                      "bundle_id": old.manifest.bundle_id})
            if error is exc:
                raise
            raise error from exc
        self.state.model = new  # one assignment: every request from now on is served by the new model
        for hook in self.state.on_model_swap:
            try:
                hook(old, new, by)
            except Exception:  # the watcher's re-baseline failing must not undo a verified swap
                log.exception("a model-swap hook failed after the reload to %s", new.manifest.bundle_id)
        info = {"by": by, "old": old.summary(), "new": new.summary()}
        self._publish("model.reload", by, info)
        log.info("model reloaded by %s: %s (version %d) -> %s (version %d)", by, old.manifest.bundle_id,
                 old.manifest.model_version, new.manifest.bundle_id, new.manifest.model_version)
        return info


    def _publish(self, kind: str, by: str, data: dict[str, Any]) -> None:
        self.state.events.publish(SecurityEvent(kind, by, data))


def _with_spec(model: ServedModel, spec: InputSpec) -> ServedModel:
    from dataclasses import replace

    return replace(model, spec=spec)
