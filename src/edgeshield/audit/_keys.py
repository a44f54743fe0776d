"""The device's Ed25519 checkpoint-signing key, stored as PEM files.

The device keys in :mod:`edgeshield.keys` are X25519 (key agreement) and cannot sign, so the audit log has its own
pair: a PKCS#8 private key created 0600 (optionally passphrase-encrypted) and a SubjectPublicKeyInfo public key that
auditors pass to ``edgeshield audit verify --checkpoint-key``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeshield._io import atomic_write_bytes
from edgeshield.errors import InvalidArgumentError, KeyFileError, OutputExistsError
from edgeshield.keys import load_private_key, load_public_key


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
    key = load_private_key(path, passphrase)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return key


def load_verify_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM SubjectPublicKeyInfo file."""
    key = load_public_key(path)
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key
