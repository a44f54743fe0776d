"""Owner signing keys (ECDSA P-256) and device key-agreement keys (X25519), stored as PEM files.

A key directory holds ``owner.key``/``owner.pub`` (the model owner's signing pair) and one ``NAME.key``/``NAME.pub``
pair per device (``device`` for the first). Private keys are PKCS#8 PEM, created 0600, optionally encrypted with a
passphrase. Every public key has a short key id: the first 16 hex digits of SHA-256 over its DER
SubjectPublicKeyInfo, the same id bundles record for their signer and recipients.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.errors import (
    InvalidArgumentError,
    KeyFileError,
    NotAFileError,
    OutputExistsError,
    PassphraseError,
    PathNotFoundError,
)

__all__ = [
    "KeyInfo",
    "add_device",
    "init_keys",
    "key_id",
    "list_keys",
    "load_device_private_key",
    "load_device_public_key",
    "load_owner_private_key",
    "load_owner_public_key",
    "load_private_key",
    "load_public_key",
    "passphrase_from_env",
]

OWNER = "owner"
FIRST_DEVICE = "device"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KeyKind = Literal["owner-signing", "device-agreement"]

OwnerPrivateKey = ec.EllipticCurvePrivateKey
OwnerPublicKey = ec.EllipticCurvePublicKey
DevicePrivateKey = x25519.X25519PrivateKey
DevicePublicKey = x25519.X25519PublicKey


@dataclass(frozen=True)
class KeyInfo:
    """A public key found in a key directory."""

    name: str
    kind: KeyKind
    key_id: str
    public_path: Path
    private_path: Path | None
    encrypted: bool | None  # None when there is no private key beside the public one

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "key_id": self.key_id,
            "public_key": str(self.public_path),
            "private_key": str(self.private_path) if self.private_path else None,
            "encrypted": self.encrypted,
        }


def key_id(public_key: PublicKeyTypes) -> str:
    """Short, stable id of a public key: SHA-256 of its DER SubjectPublicKeyInfo, first 16 hex digits."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def passphrase_from_env(var: str | None) -> bytes | None:
    """Read a passphrase from environment variable ``var`` (never from the command line, where ps can see it)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if value is None:
        raise PassphraseError(f"environment variable {var} is not set")
    if not value:
        raise PassphraseError(f"environment variable {var} is empty")
    return value.encode()


# --- creating keys ---------------------------------------------------------------------------------------------
def init_keys(directory: str | os.PathLike[str], *, passphrase: bytes | None = None) -> list[KeyInfo]:
    """Create ``owner.key``/``owner.pub`` and ``device.key``/``device.pub`` in ``directory`` (created if needed).

    Refuses to overwrite existing keys: losing an owner key means every bundle it signed becomes unverifiable.
    """
    d = _key_dir(directory, create=True)
    for name in (OWNER, FIRST_DEVICE):
        _refuse_existing(d, name)
    owner = _write_pair(d, OWNER, ec.generate_private_key(ec.SECP256R1()), passphrase)
    device = _write_pair(d, FIRST_DEVICE, x25519.X25519PrivateKey.generate(), passphrase)
    return [owner, device]


def add_device(directory: str | os.PathLike[str], name: str, *, passphrase: bytes | None = None) -> KeyInfo:
    """Add a device key-agreement pair ``NAME.key``/``NAME.pub`` to an existing key directory."""
    if not _NAME_RE.match(name) or name == OWNER:
        raise InvalidArgumentError(
            f"invalid device name {name!r}: use 1-64 letters, digits, '.', '_' or '-', not 'owner'"
        )
    d = _key_dir(directory, create=False)
    _refuse_existing(d, name)
    return _write_pair(d, name, x25519.X25519PrivateKey.generate(), passphrase)


def list_keys(directory: str | os.PathLike[str]) -> list[KeyInfo]:
    """Every public key in ``directory``, owner first, then devices by name."""
    d = _key_dir(directory, create=False)
    infos = []
    for pub_path in sorted(d.glob("*.pub")):
        public = load_public_key(pub_path)
        kind: KeyKind = "owner-signing" if isinstance(public, ec.EllipticCurvePublicKey) else "device-agreement"
        priv_path = pub_path.with_suffix(".key")
        encrypted = _is_encrypted_pem(priv_path) if priv_path.is_file() else None
        infos.append(
            KeyInfo(
                name=pub_path.stem,
                kind=kind,
                key_id=key_id(public),
                public_path=pub_path,
                private_path=priv_path if priv_path.is_file() else None,
                encrypted=encrypted,
            )
        )
    infos.sort(key=lambda k: (k.kind != "owner-signing", k.name))
    return infos


# --- loading keys ----------------------------------------------------------------------------------------------
def load_owner_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> OwnerPrivateKey:
    key = load_private_key(path, passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path} is not an ECDSA P-256 owner signing key")
    return key


def load_owner_public_key(path: str | os.PathLike[str]) -> OwnerPublicKey:
    key = load_public_key(path)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path} is not an ECDSA P-256 owner public key")
    return key


def load_device_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> DevicePrivateKey:
    key = load_private_key(path, passphrase)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise KeyFileError(f"{path} is not an X25519 device private key")
    return key


def load_device_public_key(path: str | os.PathLike[str]) -> DevicePublicKey:
    key = load_public_key(path)
    if not isinstance(key, x25519.X25519PublicKey):
        raise KeyFileError(f"{path} is not an X25519 device public key")
    return key


# --- private helpers -------------------------------------------------------------------------------------------
def _key_dir(directory: str | os.PathLike[str], *, create: bool) -> Path:
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise NotAFileError(f"key directory is not a directory: {d}")
    if not d.exists():
        if not create:
            raise PathNotFoundError(f"key directory not found: {d}")
        d.mkdir(parents=True, mode=0o700)
    return d


def _refuse_existing(d: Path, name: str) -> None:
    for suffix in (".key", ".pub"):
        if (d / f"{name}{suffix}").exists():
            raise OutputExistsError(f"key already exists, refusing to overwrite: {d / (name + suffix)}")


def _write_pair(d: Path, name: str, private: OwnerPrivateKey | DevicePrivateKey, passphrase: bytes | None) -> KeyInfo:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    priv_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public = private.public_key()
    pub_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    priv_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    atomic_write_bytes(priv_path, priv_pem, mode=0o600, overwrite=False)
    atomic_write_bytes(pub_path, pub_pem, mode=0o644, overwrite=False)
    kind: KeyKind = "owner-signing" if isinstance(public, ec.EllipticCurvePublicKey) else "device-agreement"
    return KeyInfo(name, kind, key_id(public), pub_path, priv_path, bool(passphrase))


def _read_key_file(path: str | os.PathLike[str]) -> bytes:
    p = check_readable_file(path, what="key file")
    if p.stat().st_size > 64 * 1024:
        raise KeyFileError(f"{p} is too large to be a key file")
    return p.read_bytes()


def _is_encrypted_pem(path: Path) -> bool:
    return b"ENCRYPTED PRIVATE KEY" in path.read_bytes()[:64]


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> PrivateKeyTypes:
    """Any PEM private key; typed errors for a missing or wrong passphrase and for what is not a key."""
    data = _read_key_file(path)
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    if encrypted and passphrase is None:
        raise PassphraseError(f"{path} is encrypted: give its passphrase (--passphrase-env VAR)")
    try:
        return serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise PassphraseError(f"cannot decrypt {path}: wrong passphrase") from exc
        raise KeyFileError(f"{path} is not a PEM private key") from exc
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} holds an unsupported private key") from exc


def load_public_key(path: str | os.PathLike[str]) -> PublicKeyTypes:
    """Any PEM SubjectPublicKeyInfo public key."""
    data = _read_key_file(path)
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not a PEM public key") from exc

