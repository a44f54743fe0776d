"""The device's Ed25519 checkpoint-signing key, stored as PEM files.

The device keys in :mod:`edgeshield.keys` are X25519 (key agreement) and cannot sign, so the audit log has its own
pair: a PKCS#8 private key created 0600 (optionally passphrase-encrypted) and a SubjectPublicKeyInfo public key that
auditors pass to ``edgeshield audit verify --checkpoint-key``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.errors import InvalidArgumentError, KeyFileError, OutputExistsError, PassphraseError

_MAX_KEY_FILE = 64 * 1024


def generate_signing_key(
    path: str | os.PathLike[str],
    *,
    public_path: str | os.PathLike[str] | None = None,
    passphrase: bytes | None = None,
    overwrite: bool = False,
) -> Ed25519PrivateKey:
    """Create an Ed25519 signing key at ``path`` (0600) and its public key beside it (``.pub`` unless given).

    Refuses to overwrite either file unless ``overwrite``: losing the key makes old checkpoints unverifiable
    against a new one.
    """
    priv_path = Path(path)
    pub_path = Path(public_path) if public_path is not None else priv_path.with_suffix(".pub")
    if pub_path.resolve() == priv_path.resolve():
        raise InvalidArgumentError(f"the public key path must differ from the private key path: {priv_path}")
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise OutputExistsError(f"key already exists, refusing to overwrite: {p}")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(priv_path, priv_pem, mode=0o600, overwrite=overwrite)
    atomic_write_bytes(pub_path, pub_pem, mode=0o644, overwrite=overwrite)
    return key


def load_signing_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PKCS#8 PEM file (encrypted ones need ``passphrase``)."""
    data = _read(path)
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    if encrypted and passphrase is None:
        raise PassphraseError(f"{path} is encrypted: give its passphrase (--passphrase-env VAR)")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise PassphraseError(f"cannot decrypt {path}: wrong passphrase") from exc
        raise KeyFileError(f"{path} is not a PEM private key") from exc
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} holds an unsupported private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return key


def load_verify_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM SubjectPublicKeyInfo file."""
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def _read(path: str | os.PathLike[str]) -> bytes:
    p = check_readable_file(path, what="key file")
    if p.stat().st_size > _MAX_KEY_FILE:
        raise KeyFileError(f"{p} is too large to be a key file")
    return p.read_bytes()
