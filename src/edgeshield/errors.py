"""One exception tree for every user-facing failure.

Each class carries the CLI exit code it maps to, so a caller can catch precisely what it cares about and the CLI
can turn any of them into one line on stderr and a documented exit status:

    1  general failure            (EdgeShieldError)
    2  usage or bad input         (InputError)
    3  integrity / authenticity   (IntegrityError)
    4  key error: wrong/missing   (KeyMaterialError)
"""

from __future__ import annotations

EXIT_GENERAL = 1
EXIT_INPUT = 2
EXIT_INTEGRITY = 3
EXIT_KEY = 4


class EdgeShieldError(Exception):
    """Base of every error EdgeShield raises on purpose."""

    exit_code = EXIT_GENERAL


# --- 2: usage and bad input -------------------------------------------------------------------------------------
class InputError(EdgeShieldError):
    """The caller gave something we cannot use (a path, an argument, a file of the wrong kind)."""

    exit_code = EXIT_INPUT


class PathNotFoundError(InputError):
    """A path that must exist does not."""


class NotAFileError(InputError):
    """A path names a directory or something else that is not a regular file."""


class EmptyFileError(InputError):
    """A file that must have content is empty."""


class InvalidArgumentError(InputError):
    """An argument or option value is out of range or malformed."""


class UnsupportedModelError(InputError):
    """The model is not a loadable ONNX model (or uses a feature bundles do not support)."""


class ExternalDataError(UnsupportedModelError):
    """An ONNX model's external data is missing, too short, or outside the model's directory."""


class UnsupportedFormatVersionError(InputError):
    """A bundle declares a format version this build cannot read."""


class NotABundleError(InputError):
    """The file does not start with the EdgeShield bundle magic bytes."""


class InputValidationError(InputError):
    """A model input violates its declared input spec; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"input rejected: {field}: {message}")
        self.field = field


class InputShapeError(InputValidationError):
    """Wrong rank or a wrong fixed dimension."""


class InputDtypeError(InputValidationError):
    """Wrong element type."""


class InputRangeError(InputValidationError):
    """A value lies outside the declared range."""


class InputNonFiniteError(InputValidationError):
    """NaN or infinity where the spec does not allow it."""


class InputQuantizationError(InputValidationError):
    """Values off the declared grid (e.g. not whole 8-bit sensor levels)."""


class EmptyBatchError(InputValidationError):
    """A batch with no examples."""


class DetectorMismatchError(InputError):
    """A detector file was calibrated for a different model than the one given."""


class CertificateError(InvalidArgumentError):
    """A certificate, CRL or peer certificate cannot be parsed or lacks what EdgeShield needs from it."""


class UnknownSerialError(InvalidArgumentError):
    """No certificate with that serial was issued by this CA."""


class UnknownCertificateError(InvalidArgumentError):
    """No valid certificate has that name (or several do: the name is ambiguous)."""


class AlreadyRevokedError(InvalidArgumentError):
    """The certificate is already revoked."""


class MissingDependencyError(EdgeShieldError):
    """An optional extra (e.g. ``edgeshield[train]``) is needed for this command."""


class OutputExistsError(InputError):
    """Refusing to overwrite an existing file without ``--force``."""


# --- 3: integrity and authenticity ------------------------------------------------------------------------------
class IntegrityError(EdgeShieldError):
    """Something was altered, truncated or forged."""

    exit_code = EXIT_INTEGRITY


class MalformedBundleError(IntegrityError):
    """The bundle's structure is broken (bad lengths, undecodable or non-canonical manifest)."""


class TruncatedBundleError(IntegrityError):
    """The bundle ends before its declared payload does."""


class TrailingDataError(IntegrityError):
    """The bundle has bytes after its declared payload (an extended file)."""


class SignatureError(IntegrityError):
    """The manifest signature does not verify under the given owner key."""


class WrongOwnerKeyError(SignatureError):
    """The bundle names a different signer than the owner key given."""


class PayloadDigestError(IntegrityError):
    """The encrypted payload does not match the digest the signed manifest commits to."""


class ChunkAuthenticationError(IntegrityError):
    """A payload chunk failed AEAD authentication (altered, reordered, dropped or duplicated)."""


class KeyCommitmentError(IntegrityError):
    """The unwrapped data key is not the one the signed manifest commits to (a forged or mixed-up key wrap)."""


class CrlError(IntegrityError):
    """A CRL is forged, expired, not yet valid, or older than the one already loaded."""


class CertificateRevokedError(IntegrityError):
    """The peer's certificate is revoked by the current CRL."""


class CaIndexError(IntegrityError):
    """The CA's index of issued certificates is corrupt."""


class ModelSignatureError(IntegrityError):
    """An OpenSSF model-signing signature does not verify for the model."""


class ComposedGraphError(IntegrityError):
    """A detector file's composed detector graph is not bound to this model and these detectors."""


class ServerRefusedError(EdgeShieldError):
    """The inference server answered with an error status (the exit code follows the status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server refused the request ({status}): {message}")
        self.status = status
        self.exit_code = EXIT_KEY if status in (401, 403) else EXIT_INPUT if 400 <= status < 500 else EXIT_GENERAL


class ConnectionFailedError(EdgeShieldError):
    """No TLS connection to the server could be made (refused, handshake failed, certificate rejected)."""


class CertificateRefusedError(ConnectionFailedError):
    """The server refused our client certificate during the TLS handshake (revoked, expired or another CA's)."""

    exit_code = EXIT_KEY


# --- audit log ---------------------------------------------------------------------------------------------------
class AuditIntegrityError(IntegrityError):
    """The audit log was altered. ``seq`` is the first bad entry (None when the fault is a checkpoint's alone),
    ``tree_size`` the checkpoint involved (if any), ``reason`` a short machine-readable code."""

    def __init__(self, message: str, *, reason: str, seq: int | None = None, tree_size: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.seq = seq
        self.tree_size = tree_size

    def to_dict(self) -> dict[str, object]:
        return {"error": str(self), "reason": self.reason, "seq": self.seq, "tree_size": self.tree_size}


class AuditChainError(AuditIntegrityError):
    """An entry was edited, deleted, reordered, inserted or mangled: the hash chain breaks at ``seq``."""


class AuditTruncatedError(AuditIntegrityError):
    """Entries a checkpoint commits to are gone; ``seq`` is the first missing one."""


class AuditCheckpointError(AuditIntegrityError):
    """A checkpoint's root does not match the entries it covers (rewritten entries or a forged root)."""


class AuditSignatureError(AuditCheckpointError):
    """A checkpoint's signature is missing or does not verify under the device key."""


class AuditWrongKeyError(AuditSignatureError):
    """A checkpoint names a different signing key than the device key given."""


class AuditCheckpointLinkError(AuditCheckpointError):
    """A checkpoint and its chained ``audit.checkpoint`` entry disagree, or one of the two is missing (a checkpoint
    row removed, reordered or forged beside the chain)."""


class AuditUncoveredError(AuditIntegrityError):
    """Entries no checkpoint covers, where the caller required every entry to be covered (``--require-checkpoint``);
    ``seq`` is the first uncovered entry."""


class AuditNotExtendedError(AuditIntegrityError):
    """The log does not extend a checkpoint a witness saw: it was cut back below it (``reason`` ``cut-back``) or
    rewritten (``rewritten``); ``tree_size`` is the witnessed size."""


class NotAnAuditLogError(InputError):
    """The file is not an EdgeShield audit log database."""


class MalformedNoteError(InputError):
    """A signed note, checkpoint, verifier key or witness request does not follow its C2SP format."""


class NoteSignatureError(IntegrityError):
    """A signed note carries no valid signature from a trusted key, or a trusted key's signature fails to verify."""


class WitnessRefusedError(EdgeShieldError):
    """A witness refused a request (``status`` is its HTTP status: 403 untrusted signature, 404 unknown log, ...);
    the exit code follows the status (403: key, other 4xx: input, else general)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"witness refused the request ({status}): {message}")
        self.status = status
        self.exit_code = EXIT_KEY if status == 403 else EXIT_INPUT if 400 <= status < 500 else EXIT_GENERAL


class WitnessInconsistentError(AuditIntegrityError):
    """A witness holds a checkpoint this log does not extend (it answered 422, or holds a larger tree than the
    log's newest checkpoint): the log was rewritten or cut back after the witness saw it."""


class AuditCompactRangeError(AuditIntegrityError):
    """The compact range stored for a witnessed checkpoint is missing, malformed or does not fold to the checkpoint's
    signed root, so incremental verification cannot start there (``tree_size`` is the checkpoint's)."""


class AuditCommitError(EdgeShieldError):
    """A group commit of audit entries failed (disk full, I/O error, the log closed): no entry of the group was
    written and every caller in it gets this error; the log is as it was before the group."""


# --- served-watermark evidence ----------------------------------------------------------------------------------
class EvidenceIntegrityError(IntegrityError):
    """A stored served-watermark evidence row was altered: its data no longer matches its digest. ``seq`` names it."""

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class NotAnEvidenceStoreError(InputError):
    """The file is not an EdgeShield served-watermark evidence database."""


class NotAnExtractionStateError(InputError):
    """The file is not an EdgeShield extraction-monitor state database (``serve --extraction-state``)."""


class ExtractionStateError(IntegrityError):
    """Stored extraction-monitor state (a client's budget, PRADA sets, a sketch, a key registry) is malformed."""


# --- 4: keys ------------------------------------------------------------------------------------------------------
class KeyMaterialError(EdgeShieldError):
    """A key is missing, wrong, unreadable or of the wrong type."""

    exit_code = EXIT_KEY


class KeyFileError(KeyMaterialError):
    """A key file cannot be parsed or holds the wrong kind of key."""


class PassphraseError(KeyMaterialError):
    """An encrypted private key needs a passphrase, or the one given is wrong."""


class NotARecipientError(KeyMaterialError):
    """The device key is not one of the bundle's recipients."""


class KeyUnwrapError(KeyMaterialError):
    """The data key could not be unwrapped with the device key."""


class AuditKeyMismatchError(KeyMaterialError):
    """A log was opened for writing with a different signing key (or none) than its checkpoints were signed with."""
