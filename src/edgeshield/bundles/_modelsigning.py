"""Interop with the OpenSSF model-signing standard (PyPI ``model-signing``), local EC keys only.

``sign_model`` writes the same Sigstore bundle (DSSE envelope, in-toto statement, ``publicKey.hint`` = SHA-256 of
the SPKI PEM, no transparency-log entries) that ``model_signing sign key`` writes, so anyone can check it with::

    model_signing verify key MODEL_PATH --signature MODEL.sig --public_key owner.pub

Facts about model-signing 1.1.1 this module relies on (read from its source):

* ``model_signing.signing.Config().use_elliptic_key_signer(private_key=PATH, password=...)`` only takes a key *path*;
  it reads the PEM and decrypts it in memory with cryptography's ``load_pem_private_key``. ``password`` is annotated
  ``str`` but must be ``bytes`` (a ``str`` raises ``TypeError``; this is why ``model_signing sign key --password``
  cannot use an encrypted key). We validate the key ourselves first, then hand the library the *original* PEM
  (still encrypted if it was) through an anonymous pipe named ``/dev/fd/N``: no key material is ever written to disk.
* ``Config.sign`` writes the signature with a plain ``write_text``; we let it write into a private temp directory
  and then publish the bytes with :func:`edgeshield._io.atomic_write_bytes`.
* A single-file model is serialised as one resource named ``"."`` (its SHA-256) plus an informative subject name
  (the file name at signing time) that verification ignores. So the signature binds the *content* only: a model
  signed as ``/a/model.onnx`` still verifies as ``/b/renamed.bin``. Bind the name elsewhere if it matters.
* Verification (``model_signing.verifying.Config().use_elliptic_key_verifier(public_key=PATH).verify(...)``)
  reports every failure as an exception: ``ValueError`` (key-hint mismatch, ``Signature mismatch: ...`` for altered
  content, malformed JSON/bundle via ``JSONDecodeError``/pydantic ``ValidationError``), ``InvalidSignature``,
  ``KeyError``/``IndexError``/``TypeError`` for structurally broken bundles. All become ``ModelSignatureError``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from edgeshield._io import check_readable_file
from edgeshield.errors import (
    EdgeShieldError,
    InvalidArgumentError,
    KeyFileError,
    MissingDependencyError,
    ModelSignatureError,
    NotAFileError,
    PassphraseError,
    PathNotFoundError,
)

_INSTALL_HINT = "model-signing interop needs: pip install 'edgeshield[owner]'"
# The curves model-signing accepts (see model_signing._signing.sign_ec_key._check_supported_ec_key).
_SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
# A PEM EC key (even P-521, encrypted) is well under 2 KiB; anything bigger is not one, and staying far below the
# smallest pipe buffer (4 KiB on some systems) lets us write the whole key before the library reads it.
_MAX_KEY_PEM = 4096


def _import_model_signing() -> ModuleType:
    try:
        import model_signing
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise MissingDependencyError(_INSTALL_HINT) from exc
    return model_signing


def _one_line(exc: BaseException, default: str) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return text or default


# --- keys ---------------------------------------------------------------------------------------------------------
def _read_private_key_pem(private_key: bytes | str | os.PathLike[str]) -> tuple[bytes, Path | None]:
    """Return the PEM bytes of the owner key and, if it came from a file, that file's path."""
    if isinstance(private_key, (bytes, bytearray, memoryview)):
        return bytes(private_key), None
    if isinstance(private_key, str) and private_key.lstrip().startswith("-----BEGIN"):
        # Never echo key material in a "file not found" message.
        raise InvalidArgumentError("pass PEM key material as bytes, not str (a str is taken as a file path)")
    path = check_readable_file(private_key, what="owner private key", allow_empty=True)
    try:
        return path.read_bytes(), path
    except OSError as exc:
        raise KeyFileError(f"cannot read owner private key {path}: {exc.strerror or exc}") from exc


def _password_bytes(password: bytes | str | None) -> bytes | None:
    if password is None:
        return None
    if isinstance(password, str):
        password = password.encode("utf-8")
    if not password:
        raise PassphraseError("empty passphrase for owner private key")
    return bytes(password)


def _check_private_key(pem: bytes, password: bytes | None) -> None:
    """Load the key the way model-signing will, turning every failure into a typed EdgeShield error."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not pem.strip():
        raise KeyFileError("owner private key is empty")
    if len(pem) > _MAX_KEY_PEM or b"-----BEGIN" not in pem:
        raise KeyFileError("owner private key is not a PEM EC private key")
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem or b"Proc-Type: 4,ENCRYPTED" in pem
    if encrypted and password is None:
        raise PassphraseError("owner private key is encrypted: a passphrase is needed")
    if not encrypted and password is not None:
        raise PassphraseError("owner private key is not encrypted, but a passphrase was given")
    try:
        key = serialization.load_pem_private_key(pem, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if encrypted:
            raise PassphraseError("wrong passphrase for owner private key (or the key file is corrupt)") from exc
        raise KeyFileError(f"cannot parse owner private key: {_one_line(exc, 'invalid PEM')}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError("owner private key is not an elliptic-curve key (model-signing needs EC P-256/384/521)")
    if key.curve.name not in _SUPPORTED_CURVES:
        raise KeyFileError(f"owner private key uses unsupported curve {key.curve.name}")


def _check_public_key(path: Path) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read owner public key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"owner public key is not a PEM SubjectPublicKeyInfo key: {path}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _SUPPORTED_CURVES:
        raise KeyFileError(f"owner public key is not an EC P-256/384/521 key: {path}")


@contextlib.contextmanager
def _key_path_for_library(pem: bytes, source: Path | None) -> Iterator[str]:
    """Yield a path model-signing can ``read_bytes()`` the PEM from, without putting key material on disk.

    Preferred: an anonymous pipe opened as ``/dev/fd/N`` (kernel memory only). Where ``/dev/fd`` does not exist,
    fall back to the caller's own key file (it is read as-is; the library decrypts in memory), or refuse.
    """
    if os.path.isdir("/dev/fd"):
        read_fd, write_fd = os.pipe()
        try:
            try:
                view = memoryview(pem)
                while view:  # pem is < _MAX_KEY_PEM, so this never blocks on a full pipe
                    view = view[os.write(write_fd, view) :]
            finally:
                os.close(write_fd)
            yield f"/dev/fd/{read_fd}"
        finally:
            os.close(read_fd)
    elif source is not None:
        yield str(source)
    else:
        raise InvalidArgumentError("on this platform pass the owner private key as a file path, not bytes")


# --- public API -----------------------------------------------------------------------------------------------------
def sign_model(
    model_path: str | os.PathLike[str],
    private_key_pem: bytes | str | os.PathLike[str],
    signature_path: str | os.PathLike[str],
    *,
    password: bytes | str | None = None,
) -> None:
    """Write an OpenSSF model-signing signature (Sigstore bundle JSON) of the plaintext model file.

    ``private_key_pem`` is the owner's EC private key as PEM bytes or a path to a PEM file (PKCS#8, optionally
    encrypted; then ``password`` is required). The signature appears at ``signature_path`` atomically, or not at all.
    """
    ms = _import_model_signing()
    from edgeshield._io import atomic_write_bytes

    model = check_readable_file(model_path, what="model")
    target = Path(signature_path)
    # Cheap output checks before hashing a possibly large model (atomic_write_bytes checks again).
    if target.is_dir():
        raise NotAFileError(f"output path is a directory: {target}")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise PathNotFoundError(f"output directory not found: {parent}")

    pem, source = _read_private_key_pem(private_key_pem)
    pw = _password_bytes(password)
    _check_private_key(pem, pw)

    try:
        with _key_path_for_library(pem, source) as key_path:
            config = ms.signing.Config().use_elliptic_key_signer(private_key=key_path, password=pw)
    except (ValueError, TypeError, OSError) as exc:
        raise KeyFileError(f"model-signing cannot load the owner private key: {_one_line(exc, 'error')}") from exc
    config.set_hashing_config(ms.hashing.Config())  # files, SHA-256: what `model_signing verify key` expects

    with tempfile.TemporaryDirectory(prefix="edgeshield-modelsig-") as tmp:
        tmp_sig = Path(tmp) / "model.sig"
        try:
            # Resolve symlinks: model-signing refuses a symlinked model, and the name is not signed anyway.
            config.sign(model.resolve(), tmp_sig)
            data = tmp_sig.read_bytes()
        except (ValueError, OSError) as exc:
            raise EdgeShieldError(f"model-signing failed to sign {model}: {_one_line(exc, 'error')}") from exc
    atomic_write_bytes(target, data)


def verify_model(
    model_path: str | os.PathLike[str],
    signature_path: str | os.PathLike[str],
    public_key_path: str | os.PathLike[str],
) -> None:
    """Check an OpenSSF model-signing signature of a single model file against the owner's EC public key.

    Returns ``None`` if it verifies; raises ``ModelSignatureError`` (one line) if it does not.
    """
    ms = _import_model_signing()
    from cryptography.exceptions import InvalidSignature

    # An empty model or signature is a tampered one, not a usage error: let verification reject it.
    model = check_readable_file(model_path, what="model", allow_empty=True)
    signature = check_readable_file(signature_path, what="model signature", allow_empty=True)
    public_key = check_readable_file(public_key_path, what="owner public key", allow_empty=True)
    _check_public_key(public_key)

    try:
        config = ms.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    except (ValueError, TypeError, OSError) as exc:
        raise KeyFileError(f"model-signing cannot load the owner public key: {_one_line(exc, 'error')}") from exc
    # Same hashing settings as `model_signing verify key` (files, SHA-256), not guessed from the signature.
    config.set_hashing_config(ms.hashing.Config())
    try:
        config.verify(model.resolve(), signature)
    except InvalidSignature as exc:
        raise ModelSignatureError(
            f"model signature does not verify: bad signature (altered signature or wrong key): {signature}"
        ) from exc
    except (ValueError, TypeError, LookupError, AttributeError) as exc:
        raise ModelSignatureError(f"model signature does not verify: {_one_line(exc, type(exc).__name__)}") from exc
    except OSError as exc:
        raise ModelSignatureError(f"model signature cannot be checked: {_one_line(exc, 'I/O error')}") from exc
    _require_single_file_signature(signature)


def _require_single_file_signature(signature: Path) -> None:
    """After a successful check, insist the signed statement covers exactly one file (resource ``"."``).

    model-signing honours ``ignore_paths`` taken from the (signed) statement; a statement that ignores ``"."``
    would "verify" any content. Our signer never produces one, so refuse it rather than trust it.
    """
    try:
        bundle = json.loads(signature.read_text(encoding="utf-8"))
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        names = [r["name"] for r in statement["predicate"]["resources"]]
    except (ValueError, TypeError, LookupError, OSError) as exc:
        raise ModelSignatureError("model signature changed while it was being checked") from exc
    if names != ["."]:
        raise ModelSignatureError("model signature does not cover exactly one model file")
