"""Data-key wrapping for recipient devices with HPKE (RFC 9180), Base mode, single-shot.

Suite: DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, from ``cryptography.hazmat.primitives.hpke``.
The wrapped key is ``enc (32 bytes) || AES-256-GCM(data key) (48 bytes)``; ``info`` binds it to one bundle.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from edgeshield.errors import KeyUnwrapError

SUITE_NAME = "HPKE-Base/DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
WRAPPED_KEY_SIZE = 32 + 32 + 16
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_INFO_PREFIX = b"EdgeShield bundle v1 data key\x00"


def info_for(bundle_id: bytes) -> bytes:
    return _INFO_PREFIX + bundle_id


def wrap_key(data_key: bytes, recipient: x25519.X25519PublicKey, bundle_id: bytes) -> bytes:
    return _SUITE.encrypt(data_key, recipient, info=info_for(bundle_id))


def unwrap_key(wrapped: bytes, device_key: x25519.X25519PrivateKey, bundle_id: bytes) -> bytes:
    try:
        return _SUITE.decrypt(wrapped, device_key, info=info_for(bundle_id))
    except (InvalidTag, ValueError):
        raise KeyUnwrapError("the device key cannot unwrap this bundle's data key") from None
