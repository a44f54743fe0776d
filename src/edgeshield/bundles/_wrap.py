"""Data-key wrapping for recipient devices with HPKE (RFC 9180), Base mode, single-shot.

Suite: DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, from ``cryptography.hazmat.primitives.hpke``.
What is wrapped is ``data key (32 bytes) || the recipient's payload MAC key (32 bytes)``; the wrapped secret is
``enc (32 bytes) || AES-256-GCM(secret) (80 bytes)``, and ``info`` binds it to one bundle.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from edgeshield.errors import KeyUnwrapError

SUITE_NAME = "HPKE-Base/DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
SECRET_SIZE = 64
WRAPPED_KEY_SIZE = 32 + SECRET_SIZE + 16
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_INFO_PREFIX = b"EdgeShield bundle v1 data key\x00"


def info_for(bundle_id: bytes) -> bytes:
    return _INFO_PREFIX + bundle_id


def wrap_key(secret: bytes, recipient: x25519.X25519PublicKey, bundle_id: bytes) -> bytes:
    """HPKE-seal ``secret`` (data key || MAC key) to one recipient."""
    if len(secret) != SECRET_SIZE:
        raise ValueError("the wrapped secret is the 32-byte data key followed by the 32-byte MAC key")
    return _SUITE.encrypt(secret, recipient, info=info_for(bundle_id))


def unwrap_key(wrapped: bytes, device_key: x25519.X25519PrivateKey, bundle_id: bytes) -> tuple[bytes, bytes]:
    """Return ``(data key, MAC key)``; raise ``KeyUnwrapError`` if this device key cannot open the wrap."""
    try:
        secret = _SUITE.decrypt(wrapped, device_key, info=info_for(bundle_id))
    except (InvalidTag, ValueError):
        raise KeyUnwrapError("the device key cannot unwrap this bundle's data key") from None
    if len(secret) != SECRET_SIZE:
        raise KeyUnwrapError("the wrapped secret has the wrong length")
    return secret[:32], secret[32:]
