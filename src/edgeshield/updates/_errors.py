"""The updater's failures, each a type a caller can catch (exit codes from ``edgeshield.errors``)."""

from __future__ import annotations

from edgeshield.errors import EdgeShieldError, InputError, IntegrityError, KeyMaterialError


class UpdateError(EdgeShieldError):
    """An update could not be made for a reason that is neither bad input nor an attack (exit 1)."""


class UpdateDownloadError(UpdateError):
    """The repository could not be reached or a download failed (network, HTTP status, timeout)."""


class UpdateInProgressError(UpdateError):
    """Another updater holds the device directory's lock."""


class UpdatePendingError(UpdateError):
    """An installed update is not committed yet: commit it or roll it back before installing another."""


class NothingToDoError(UpdateError):
    """There is no staged update to install, nothing to commit, or no previous slot to roll back to."""


class HealthCheckError(UpdateError):
    """The model in a slot opened but failed its health check (it did not answer one inference)."""


class UpdateConfigError(InputError):
    """A repository or device directory is missing, not initialised, or already initialised (exit 2)."""


# --- 3: integrity: the update was refused as forged, stale, mixed up or lower than the floor -------------------
class UpdateRefusedError(IntegrityError):
    """An update was refused; ``reason`` is a short machine-readable code (audited as ``update.refused``)."""

    reason = "refused"


class MetadataSignatureError(UpdateRefusedError):
    """Repository metadata is not signed by the keys the trusted root names (a forged or re-keyed repository)."""

    reason = "metadata-signature"


class MetadataRollbackError(UpdateRefusedError):
    """The repository served metadata older than what the device already trusts (a rollback attack)."""

    reason = "metadata-rollback"


class MetadataExpiredError(UpdateRefusedError):
    """The repository's metadata has expired (a freeze attack, or a repository whose timestamp is not re-signed)."""

    reason = "metadata-expired"


class MetadataMismatchError(UpdateRefusedError):
    """Metadata or a target does not match the hash or length that signed metadata pins (mix-and-match,
    a tampered or a truncated download)."""

    reason = "hash-mismatch"


class EndlessDataError(UpdateRefusedError):
    """The repository sent more bytes than signed metadata (or the metadata size limit) allows."""

    reason = "endless-data"


class TruncatedDownloadError(MetadataMismatchError):
    """A download ended before the length the server announced (and signed metadata pins)."""

    reason = "truncated"


class MalformedUpdateError(UpdateRefusedError):
    """An update index, a detector file or an input spec inside a signed update cannot be parsed."""

    reason = "malformed"


class UpdateMismatchError(UpdateRefusedError):
    """The parts of an update do not belong together (model version, bundle or model digest disagree)."""

    reason = "mix-and-match"


class FloorViolationError(UpdateRefusedError):
    """The model version is below the device's floor (an old, genuinely signed bundle: a rollback)."""

    reason = "below-floor"


class FloorStateError(IntegrityError):
    """The device's floor state is missing, forged, or signed by another key: nothing is installed until it is
    repaired (a deleted state file must never read as floor 0)."""


class SlotIntegrityError(IntegrityError):
    """A slot's files do not match what its slot record says they are."""


class FloorKeyError(KeyMaterialError):
    """The floor's signing key is missing or unreadable."""
