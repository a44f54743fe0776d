"""TPM 2.0 remote attestation: attestation keys bound to the endorsement key, quotes, and their verification.

Two halves. The *verifier* half is pure ``cryptography`` over bytes: it parses the TPM's wire structures
(``TPMT_PUBLIC``, ``TPMS_ATTEST``, ``TPMT_SIGNATURE``), checks an endorsement key against enrolled CAs or an
enrolment list, checks a quote's signature, nonce, PCR digest, the expected PCR values and the TPM's clock and
reset counters against the last quote seen from that attestation key (so a TPM state restored from a snapshot
shows). Only MakeCredential, the verifier's side of credential activation, borrows ``tpm2_pytss``'s KDFa.

The *device* half (:class:`DeviceTpm`) drives a real TPM through ``tpm2_pytss`` (imported lazily: extra
``edgeshield[tpm]``): it re-creates the EK from the TCG template, creates an attestation key (AK) as the EK's child,
so its quotes carry the clock and reset counters un-obfuscated, activates the verifier's credential (which proves
the AK lives in the TPM that holds that EK, as Keylime's registrar checks), quotes, and creates and certifies a
TPM-resident decryption key for key release.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.errors import (
    EdgeShieldError,
    InputError,
    IntegrityError,
    InvalidArgumentError,
    KeyMaterialError,
)
from edgeshield.hardware._tpm import TPMUnavailableError


# --- errors ------------------------------------------------------------------------------------------------------
class AttestationError(IntegrityError):
    """A quote, certification or credential does not prove what it must (exit 3)."""

    reason = "attestation"


class QuoteFormatError(AttestationError):
    """A TPM structure is truncated, extended or not the kind expected."""

    reason = "malformed"


class QuoteSignatureError(AttestationError):
    """The attestation structure is not signed by the attestation key given."""

    reason = "bad-signature"


class NonceMismatchError(AttestationError):
    """The quote answers another nonce than the one the verifier issued (a replayed or stale quote)."""

    reason = "nonce"


class PcrMismatchError(AttestationError):
    """The PCR values differ from the policy, or do not hash to the quoted digest."""

    reason = "pcr"


class TpmRollbackError(AttestationError):
    """The TPM's clock or reset counters went backwards since the last quote: a restored TPM state."""

    reason = "rollback"


class CredentialActivationError(AttestationError):
    """The device could not activate the credential: the AK is not in the TPM holding the EK."""

    reason = "activation"


class KeyAttributesError(AttestationError):
    """A key's TPM attributes do not make it the kind required (non-migratable, TPM-generated, ...)."""

    reason = "key-attributes"


class NvCertifyError(AttestationError):
    """An NV certification does not prove a monotonic counter's value: another index, not a counter, not the
    whole 8-byte value, or a public area that does not hash to the certified name."""

    reason = "nv-certify"


class UnknownTpmError(KeyMaterialError):
    """The TPM's endorsement key is neither certified by an enrolled CA nor in the enrolment list (exit 4)."""

    reason = "unknown-tpm"


class UnknownAttestationKeyError(KeyMaterialError):
    """No enrolled attestation key for this device (exit 4)."""

    reason = "unknown-ak"


class TpmUnavailableError(TPMUnavailableError):
    """The TPM cannot be reached or refused a command (the sealed-key module's error, with the audit reason)."""

    reason = "tpm"


# --- TPM constants (TPM 2.0 Library, Part 2) ---------------------------------------------------------------------
TPM_GENERATED = 0xFF544347
ST_ATTEST_NV = 0x8014  # TPM_ST_ATTEST_NV (0x8016 is TPM_ST_ATTEST_SESSION_AUDIT)
ST_ATTEST_CERTIFY = 0x8017
ST_ATTEST_QUOTE = 0x8018
ALG_RSA, ALG_SHA256, ALG_NULL, ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA, ALG_ECC = 0x01, 0x0B, 0x10, 0x14, 0x16, 0x18, 0x23
ALG_RSAES, ALG_OAEP = 0x15, 0x17
ECC_NIST_P256 = 0x0003
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {0x04: hashes.SHA1, ALG_SHA256: hashes.SHA256, 0x0C: hashes.SHA384,
                                                  0x0D: hashes.SHA512}
BANKS = {"sha1": 0x04, "sha256": ALG_SHA256, "sha384": 0x0C, "sha512": 0x0D}

# TPMA_OBJECT bits
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN, USER_WITH_AUTH = 1 << 1, 1 << 4, 1 << 5, 1 << 6
ADMIN_WITH_POLICY, NO_DA, RESTRICTED, DECRYPT, SIGN = 1 << 7, 1 << 10, 1 << 16, 1 << 17, 1 << 18
AK_ATTRIBUTES = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | RESTRICTED | SIGN
RELEASE_KEY_ATTRIBUTES = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | DECRYPT
MAX_PCR = 23

# TPMA_NV bits and the NV index types (TPM_NT) that matter here
NV_TYPE_SHIFT, NV_TYPE_MASK, NT_COUNTER = 4, 0xF0, 0x1
NV_OWNERWRITE, NV_AUTHWRITE, NV_OWNERREAD, NV_AUTHREAD = 1 << 1, 1 << 2, 1 << 17, 1 << 18
NV_NO_DA, NV_ORDERLY, NV_WRITTEN = 1 << 25, 1 << 26, 1 << 29
NV_HANDLE_TYPE = 0x01  # TPM_HT_NV_INDEX: the top byte of an NV index handle


# --- a small reader for TPM's big-endian structures --------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = bytes(data), 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise QuoteFormatError(f"{self.what} is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self.pos != len(self.data):
            raise QuoteFormatError(f"{self.what} has {len(self.data) - self.pos} unexpected trailing bytes")


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


# --- TPMT_PUBLIC ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TpmPublic:
    """A parsed ``TPMT_PUBLIC``: the key, its attributes, and the bytes its TPM name is computed over."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    scheme: int
    symmetric: int
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + _digest(self.name_alg, self.raw)

    def spki_sha256(self) -> str:
        """SHA-256 (hex) of the key's DER SubjectPublicKeyInfo: how an enrolment list names an EK."""
        der = self.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()

    def has(self, attrs: int) -> bool:
        return self.attributes & attrs == attrs


def _digest(alg: int, data: bytes) -> bytes:
    cls = _HASHES.get(alg)
    if cls is None:
        raise QuoteFormatError(f"unsupported TPM hash algorithm 0x{alg:04x}")
    h = hashes.Hash(cls())
    h.update(data)
    return h.finalize()


def parse_public(data: bytes) -> TpmPublic:
    """Parse a marshalled ``TPMT_PUBLIC`` (RSA or ECC P-256); raise :class:`QuoteFormatError` otherwise."""
    r = _Reader(data, "TPM public area")
    typ, name_alg, attributes = r.u16(), r.u16(), r.u32()
    auth_policy = r.tpm2b()
    symmetric = r.u16()
    if symmetric != ALG_NULL:
        r.u16(), r.u16()  # keyBits, mode
    scheme = r.u16()
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if typ == ALG_RSA:
        if scheme not in (ALG_NULL, ALG_RSAES):
            r.u16()  # the scheme's hash
        bits, exponent = r.u16(), r.u32()
        modulus = r.tpm2b()
        if bits not in (2048, 3072, 4096) or len(modulus) * 8 != bits:
            raise QuoteFormatError("RSA public area with an unsupported or inconsistent key size")
        try:
            key = rsa.RSAPublicNumbers(exponent or 65537, int.from_bytes(modulus, "big")).public_key()
        except ValueError as exc:
            raise QuoteFormatError(f"RSA public area does not hold a valid key: {exc}") from None
    elif typ == ALG_ECC:
        if scheme != ALG_NULL:
            r.u16()
        curve, kdf = r.u16(), r.u16()
        if kdf != ALG_NULL:
            r.u16()
        x, y = r.tpm2b(), r.tpm2b()
        if curve != ECC_NIST_P256 or len(x) != 32 or len(y) != 32:
            raise QuoteFormatError("only NIST P-256 ECC keys are supported")
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
        except ValueError:
            raise QuoteFormatError("ECC public area does not hold a point on P-256") from None
    else:
        raise QuoteFormatError(f"unsupported TPM key type 0x{typ:04x}")
    r.end()
    if name_alg not in _HASHES:
        raise QuoteFormatError(f"unsupported name algorithm 0x{name_alg:04x}")
    return TpmPublic(bytes(data), typ, name_alg, attributes, auth_policy, scheme, symmetric, key)


def check_attestation_key(ak: TpmPublic) -> None:
    """An AK must be a restricted signing key, generated in and never leaving its TPM."""
    if not ak.has(AK_ATTRIBUTES) or ak.attributes & DECRYPT:
        raise KeyAttributesError("the attestation key is not a fixedTPM, TPM-generated, restricted signing key")
    if ak.name_alg != ALG_SHA256:
        raise KeyAttributesError("the attestation key must use SHA-256 as its name algorithm")


def check_release_key(key: TpmPublic) -> None:
    """A release key must be an unrestricted RSA decryption key generated in its TPM that can never leave it."""
    if key.type != ALG_RSA or not key.has(RELEASE_KEY_ATTRIBUTES) or key.attributes & (SIGN | RESTRICTED):
        raise KeyAttributesError("the release key is not a fixedTPM, TPM-generated, unrestricted RSA decrypt key")


# --- TPMS_ATTEST and TPMT_SIGNATURE ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClockInfo:
    """The TPM's ``TPMS_CLOCK_INFO``: milliseconds the TPM has run, TPM resets, restarts, and whether it is safe."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool

    def to_dict(self) -> dict[str, object]:
        return {"clock": self.clock, "reset_count": self.reset_count, "restart_count": self.restart_count,
                "safe": self.safe}


@dataclass(frozen=True)
class Attest:
    """A parsed ``TPMS_ATTEST`` of type quote or certify."""

    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: ClockInfo
    firmware_version: int
    pcr_selection: tuple[tuple[int, tuple[int, ...]], ...] = ()
    pcr_digest: bytes = b""
    certified_name: bytes = b""
    nv_offset: int = 0
    nv_contents: bytes = b""


def parse_attest(data: bytes) -> Attest:
    """Parse a marshalled ``TPMS_ATTEST`` (quote, certify or NV certify); raise :class:`QuoteFormatError` on
    anything else. For NV certify, ``certified_name`` is the index's name."""
    r = _Reader(data, "TPM attestation structure")
    if r.u32() != TPM_GENERATED:
        raise QuoteFormatError("attestation structure lacks TPM_GENERATED_VALUE: not produced by a TPM")
    typ = r.u16()
    signer, extra = r.tpm2b(), r.tpm2b()
    clock = ClockInfo(r.u64(), r.u32(), r.u32(), r.u8() == 1)
    firmware = r.u64()
    if typ == ST_ATTEST_QUOTE:
        count = r.u32()
        if count > 16:
            raise QuoteFormatError("quote selects too many PCR banks")
        selection = []
        for _ in range(count):
            bank, size = r.u16(), r.u8()
            if size > 4:
                raise QuoteFormatError("PCR selection bitmap too long")
            bitmap = r.take(size)
            selection.append((bank, tuple(i for i in range(size * 8) if bitmap[i // 8] >> (i % 8) & 1)))
        digest = r.tpm2b()
        r.end()
        return Attest(typ, signer, extra, clock, firmware, tuple(selection), digest)
    if typ == ST_ATTEST_CERTIFY:
        name, _qualified = r.tpm2b(), r.tpm2b()
        r.end()
        return Attest(typ, signer, extra, clock, firmware, certified_name=name)
    if typ == ST_ATTEST_NV:
        name, offset, contents = r.tpm2b(), r.u16(), r.tpm2b()
        r.end()
        return Attest(typ, signer, extra, clock, firmware, certified_name=name, nv_offset=offset,
                      nv_contents=contents)
    raise QuoteFormatError(f"unsupported attestation type 0x{typ:04x}")


def verify_signature(key: TpmPublic, message: bytes, signature: bytes) -> None:
    """Check a ``TPMT_SIGNATURE`` (ECDSA, RSASSA or RSAPSS) over ``message`` with ``key``."""
    r = _Reader(signature, "TPM signature")
    alg, hash_alg = r.u16(), r.u16()
    cls = _HASHES.get(hash_alg)
    if cls is None or cls is hashes.SHA1:
        raise QuoteFormatError("signature uses an unsupported hash")
    try:
        if alg == ALG_ECDSA and isinstance(key.key, ec.EllipticCurvePublicKey):
            sig_r, sig_s = int.from_bytes(r.tpm2b(), "big"), int.from_bytes(r.tpm2b(), "big")
            r.end()
            key.key.verify(utils.encode_dss_signature(sig_r, sig_s), message, ec.ECDSA(cls()))
        elif alg in (ALG_RSASSA, ALG_RSAPSS) and isinstance(key.key, rsa.RSAPublicKey):
            sig = r.tpm2b()
            r.end()
            pad: padding.AsymmetricPadding = (padding.PKCS1v15() if alg == ALG_RSASSA else
                                              padding.PSS(padding.MGF1(cls()), padding.PSS.AUTO))
            key.key.verify(sig, message, pad, cls())
        else:
            raise QuoteSignatureError("the signature's algorithm does not match the attestation key")
    except InvalidSignature:
        raise QuoteSignatureError("the attestation structure is not signed by this attestation key") from None


# --- quotes --------------------------------------------------------------------------------------------------------
QUOTE_FORMAT = "edgeshield.tpm-quote"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise QuoteFormatError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise QuoteFormatError(f"{what} is not valid base64") from None


def _unhex(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise QuoteFormatError(f"{what} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise QuoteFormatError(f"{what} is not valid hex") from None


@dataclass(frozen=True)
class Quote:
    """What a device sends: the signed ``TPMS_ATTEST``, its ``TPMT_SIGNATURE`` and the SHA-256 PCR values."""

    attest: bytes
    signature: bytes
    pcrs: Mapping[int, bytes]

    def to_dict(self) -> dict[str, Any]:
        return {"format": QUOTE_FORMAT, "version": 1, "attest": _b64(self.attest), "signature": _b64(self.signature),
                "pcrs": {"sha256": {str(i): v.hex() for i, v in sorted(self.pcrs.items())}}}

    @classmethod
    def from_dict(cls, obj: object) -> Quote:
        if not isinstance(obj, dict) or obj.get("format") != QUOTE_FORMAT or obj.get("version") != 1:
            raise QuoteFormatError(f"not an {QUOTE_FORMAT} version 1 object")
        bank = obj.get("pcrs", {}).get("sha256") if isinstance(obj.get("pcrs"), dict) else None
        if not isinstance(bank, dict):
            raise QuoteFormatError("quote lacks its sha256 PCR values")
        pcrs = {}
        for k, v in bank.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) <= MAX_PCR):
                raise QuoteFormatError(f"bad PCR index {k!r}")
            value = _unhex(v, f"PCR {k}")
            if len(value) != 32:
                raise QuoteFormatError(f"PCR {k} is not a SHA-256 value")
            pcrs[int(k)] = value
        return cls(_unb64(obj.get("attest"), "attest"), _unb64(obj.get("signature"), "signature"), pcrs)


@dataclass(frozen=True)
class PcrPolicy:
    """The PCR values a verifier expects (SHA-256 bank): index -> 32-byte value."""

    pcrs: Mapping[int, bytes]

    @classmethod
    def from_dict(cls, obj: object) -> PcrPolicy:
        bank = obj.get("sha256") if isinstance(obj, dict) else None
        if not isinstance(bank, dict) or not bank:
            raise InvalidArgumentError('a PCR policy is {"sha256": {"INDEX": "HEX VALUE", ...}} with one PCR or more')
        try:
            quote = Quote.from_dict({"format": QUOTE_FORMAT, "version": 1, "attest": "", "signature": "",
                                     "pcrs": {"sha256": bank}})
        except QuoteFormatError as exc:
            raise InvalidArgumentError(f"bad PCR policy: {exc}") from None
        return cls(quote.pcrs)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PcrPolicy:
        return cls.from_dict(_load_json(path, "PCR policy"))

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": {str(i): v.hex() for i, v in sorted(self.pcrs.items())}}


def _load_json(path: str | os.PathLike[str], what: str) -> Any:
    p = check_readable_file(path, what=what)
    if p.stat().st_size > 1 << 20:
        raise InvalidArgumentError(f"{p} is too large for a {what}")
    try:
        return json.loads(p.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{p} is not a JSON {what}: {exc}") from None


def pcr_digest(pcrs: Mapping[int, bytes], indices: Sequence[int]) -> bytes:
    return hashlib.sha256(b"".join(pcrs[i] for i in indices)).digest()


def check_clock(new: ClockInfo, last: ClockInfo | None) -> None:
    """Refuse a TPM whose clock or reset counters went backwards since ``last`` (a restored TPM state).

    A TPM's clock only moves forward while it runs and is saved across reboots; its reset count rises with every
    TPM reset and its restart count with every resume. A state restored from an earlier snapshot brings all three
    back to older values: the reset count below the last seen, or the same counts with an earlier clock.
    """
    if last is None:
        return
    if new.reset_count < last.reset_count:
        raise TpmRollbackError(f"TPM reset count went back from {last.reset_count} to {new.reset_count}: "
                               "a restored TPM state")
    if new.reset_count == last.reset_count and new.restart_count < last.restart_count:
        raise TpmRollbackError("TPM restart count went back: a restored TPM state")
    if new.clock <= last.clock:
        raise TpmRollbackError(f"TPM clock went back from {last.clock} to {new.clock} ms: a restored TPM state "
                               "or a replayed quote")


@dataclass(frozen=True)
class VerifiedQuote:
    """A quote that verified: its clock (to store as the last seen) and its PCR values."""

    clock: ClockInfo
    pcrs: Mapping[int, bytes]
    firmware_version: int

    def to_dict(self) -> dict[str, Any]:
        return {"verified": True, "clock": self.clock.to_dict(), "firmware_version": self.firmware_version,
                "pcrs": {"sha256": {str(i): v.hex() for i, v in sorted(self.pcrs.items())}}}


def _signed_attest(attest: bytes, signature: bytes, ak: TpmPublic, nonce: bytes, kind: int, what: str) -> Attest:
    """The first four checks of every attestation: the AK's signature (nothing is trusted before it), parsing
    (TPM_GENERATED), the structure's type and ``extraData == nonce``."""
    verify_signature(ak, attest, signature)
    att = parse_attest(attest)
    if att.type != kind:
        raise QuoteFormatError(f"the attestation structure is not {what}")
    if not hmac.compare_digest(att.extra_data, nonce):
        raise NonceMismatchError(f"the {what.split(' ', 1)[1]} does not answer this nonce: replayed or stale")
    return att


def verify_quote(quote: Quote, ak: TpmPublic, nonce: bytes, policy: PcrPolicy | None = None,
                 last: ClockInfo | None = None) -> VerifiedQuote:
    """Check a quote: AK signature, TPM origin, the nonce, the PCR values against the digest, the policy, the clock.

    Checks run in that order, each failure its own :class:`AttestationError` subclass; nothing of the quote is
    trusted before the signature verifies.
    """
    att = _signed_attest(quote.attest, quote.signature, ak, nonce, ST_ATTEST_QUOTE, "a quote")
    if len(att.pcr_selection) != 1 or att.pcr_selection[0][0] != ALG_SHA256:
        raise PcrMismatchError("the quote must cover exactly one PCR bank, SHA-256")
    indices = att.pcr_selection[0][1]
    if set(indices) != set(quote.pcrs):
        raise PcrMismatchError("the PCR values sent are not the PCRs the quote covers")
    if not hmac.compare_digest(pcr_digest(quote.pcrs, indices), att.pcr_digest):
        raise PcrMismatchError("the PCR values sent do not hash to the quoted PCR digest")
    if policy is not None:
        missing = sorted(set(policy.pcrs) - set(indices))
        if missing:
            raise PcrMismatchError(f"the quote does not cover PCR {missing[0]}, which the policy requires")
        changed = sorted(i for i, v in policy.pcrs.items() if not hmac.compare_digest(quote.pcrs[i], v))
        if changed:
            raise PcrMismatchError(f"PCR {changed[0]} differs from the expected value")
    check_clock(att.clock, last)
    return VerifiedQuote(att.clock, dict(quote.pcrs), att.firmware_version)


def verify_certification(attest: bytes, signature: bytes, ak: TpmPublic, key: TpmPublic, nonce: bytes) -> Attest:
    """Check that the AK certified ``key`` (TPM2_Certify) with qualifying data ``nonce``: same TPM, this key."""
    att = _signed_attest(attest, signature, ak, nonce, ST_ATTEST_CERTIFY, "a key certification")
    if not hmac.compare_digest(att.certified_name, key.name):
        raise KeyAttributesError("the certification is for another key than the one sent")
    return att


# --- NV indices: the monotonic counter behind the device's version floor ------------------------------------------
@dataclass(frozen=True)
class NvPublic:
    """A parsed ``TPMS_NV_PUBLIC``: the index handle, its name algorithm, attributes, policy and size."""

    raw: bytes
    index: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    data_size: int

    @property
    def nv_type(self) -> int:
        return (self.attributes & NV_TYPE_MASK) >> NV_TYPE_SHIFT

    @property
    def name(self) -> bytes:
        """The index's TPM name: nameAlg || H_nameAlg(TPMS_NV_PUBLIC); it changes when the index is first written."""
        return struct.pack(">H", self.name_alg) + _digest(self.name_alg, self.raw)


def parse_nv_public(data: bytes) -> NvPublic:
    """Parse a marshalled ``TPMS_NV_PUBLIC`` (not the TPM2B around it); :class:`QuoteFormatError` otherwise."""
    r = _Reader(data, "TPM NV public area")
    index, name_alg, attributes = r.u32(), r.u16(), r.u32()
    policy, size = r.tpm2b(), r.u16()
    r.end()
    if index >> 24 != NV_HANDLE_TYPE:
        raise QuoteFormatError(f"0x{index:08x} is not an NV index handle")
    if name_alg not in _HASHES:
        raise QuoteFormatError(f"unsupported name algorithm 0x{name_alg:04x}")
    return NvPublic(bytes(data), index, name_alg, attributes, policy, size)


def nv_name(nv_public: bytes) -> bytes:
    """The TPM name of the NV index whose marshalled ``TPMS_NV_PUBLIC`` this is: nameAlg || H(nv_public)."""
    return parse_nv_public(nv_public).name


def verify_nv_counter(nv_public: bytes, attest: bytes, signature: bytes, ak: TpmPublic, nonce: bytes, *,
                      last: ClockInfo | None = None) -> int:
    """Check a TPM2_NV_Certify by the AK over a whole monotonic counter and return the counter's value.

    Checked in order: the AK's signature (nothing is trusted before it), TPM_GENERATED and the NV type (parsing),
    ``extraData == nonce``, the certified name equals the name computed from ``nv_public``, ``nv_public`` is a
    written ``TPM_NT_COUNTER`` of 8 bytes, and the certification covers offset 0 and all 8 bytes. A counter's
    value can only rise (see docs/updates.md, "The floor"). With ``last``, the TPM's clock must not have gone
    back since (a restored TPM state). Every failure is an :class:`AttestationError` subclass.
    """
    att = _signed_attest(attest, signature, ak, nonce, ST_ATTEST_NV, "an NV certification")
    try:
        pub = parse_nv_public(nv_public)
    except QuoteFormatError as exc:
        raise NvCertifyError(f"the NV public area sent is malformed: {exc}") from None
    if not hmac.compare_digest(att.certified_name, pub.name):
        raise NvCertifyError("the NV certification names another index than the public area sent")
    if pub.nv_type != NT_COUNTER:
        raise NvCertifyError(f"NV index 0x{pub.index:08x} is not a monotonic counter (type {pub.nv_type})")
    if pub.data_size != 8 or not pub.attributes & NV_WRITTEN:
        raise NvCertifyError(f"NV index 0x{pub.index:08x} is not a written 8-byte counter")
    if att.nv_offset != 0 or len(att.nv_contents) != 8:
        raise NvCertifyError("the NV certification does not cover the whole 8-byte counter")
    check_clock(att.clock, last)
    return int.from_bytes(att.nv_contents, "big")


# --- endorsement keys and credential activation --------------------------------------------------------------------
@dataclass(frozen=True)
class EkTrust:
    """Which TPMs are enrolled: EK certificates issued by one of ``ca_certs``, or EKs in ``ek_digests``."""

    ca_certs: tuple[x509.Certificate, ...] = ()
    ek_digests: frozenset[str] = frozenset()

    @classmethod
    def load(cls, ca_paths: Sequence[str | os.PathLike[str]] = (), ek_digests: Sequence[str] = ()) -> EkTrust:
        certs = []
        for p in ca_paths:
            data = check_readable_file(p, what="EK CA certificate").read_bytes()
            try:
                certs.extend(x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                             else [x509.load_der_x509_certificate(data)])
            except ValueError as exc:
                raise InvalidArgumentError(f"{p} is not an X.509 certificate: {exc}") from None
        digests = {d.lower() for d in ek_digests}
        if any(len(d) != 64 or not all(c in "0123456789abcdef" for c in d) for d in digests):
            raise InvalidArgumentError("an enrolled EK digest is 64 hex digits (SHA-256 of its SubjectPublicKeyInfo)")
        return cls(tuple(certs), frozenset(digests))


def check_endorsement_key(ek: TpmPublic, ek_cert: bytes | None, trust: EkTrust,
                          now: datetime | None = None) -> str:
    """Return how the EK is enrolled (``"list"`` or ``"certificate"``); raise :class:`UnknownTpmError` if it is not.

    A certificate must be issued directly by one of the enrolled CA certificates (enrol intermediates explicitly),
    be valid now, and certify exactly this EK.
    """
    if ek.spki_sha256() in trust.ek_digests:
        return "list"
    if ek_cert is None:
        raise UnknownTpmError("the TPM's endorsement key is not enrolled and it sent no EK certificate")
    try:
        cert = x509.load_der_x509_certificate(ek_cert)
    except ValueError:
        raise UnknownTpmError("the EK certificate cannot be parsed") from None
    if cert.public_key() != ek.key:
        raise UnknownTpmError("the EK certificate certifies another key than this TPM's endorsement key")
    moment = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise UnknownTpmError("the EK certificate is not valid now")
    for ca in trust.ca_certs:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if ca.not_valid_before_utc <= moment <= ca.not_valid_after_utc:
            return "certificate"
    raise UnknownTpmError("the EK certificate is not issued by an enrolled TPM CA")


def make_credential(ek: TpmPublic, ak: TpmPublic, secret: bytes) -> tuple[bytes, bytes]:
    """The verifier's side of credential activation: ``secret`` sealed to ``ek`` for ``ak``'s name only.

    Returns the marshalled ``TPM2B_ID_OBJECT`` and ``TPM2B_ENCRYPTED_SECRET``. KDFa and the seed encryption come
    from ``tpm2_pytss.utils.make_credential`` (extra ``edgeshield[tpm]``).
    """
    tpm = _pytss()
    from tpm2_pytss.utils import make_credential as _make  # type: ignore[import-untyped]

    pub, _ = tpm.TPMT_PUBLIC.unmarshal(ek.raw)
    blob, enc = _make(tpm.TPM2B_PUBLIC(publicArea=pub), secret, tpm.TPM2B_NAME(ak.name))
    return bytes(blob.marshal()), bytes(enc.marshal())


# --- the device side: a real TPM through tpm2-pytss --------------------------------------------------------------
def _pytss() -> Any:
    from edgeshield.hardware._tpm import _tss  # one loader: the same error hint and the same quiet tpm2-tss log

    return _tss()


def default_tcti() -> str:
    from edgeshield.hardware._tpm import DEFAULT_TCTI, TCTI_ENV

    return os.environ.get(TCTI_ENV) or DEFAULT_TCTI


RELEASE_LABEL_PREFIX = b"ESrel1 "


def release_label(bundle_id: str, nonce: bytes, extra: bytes = b"") -> bytes:
    """The RSA-OAEP label binding a released key to one bundle and one request (and, with ``extra``, to more: the
    release service binds the licence with it, so an edited licence makes the TPM refuse to decrypt).

    Printable and NUL-terminated, as the TPM requires, and at most 64 bytes (a TPM2B_DATA): the prefix, then 56 hex
    digits of SHA-256(bundle id || nonce), or with ``extra`` of SHA-256 over a v2 tag and the three, each
    length-prefixed (no two inputs share a digest input; without ``extra`` the label is the v1 one, unchanged).
    """
    if not extra:
        data = b"EdgeShield key release v1\x00" + bundle_id.encode() + b"\x00" + nonce
    else:
        bid = bundle_id.encode()
        data = (b"EdgeShield key release v2\x00" + struct.pack(">I", len(bid)) + bid + struct.pack(">I", len(nonce))
                + nonce + struct.pack(">I", len(extra)) + extra)
    digest = hashlib.sha256(data).hexdigest()
    return RELEASE_LABEL_PREFIX + digest[:56].encode() + b"\x00"


@dataclass
class DeviceKeys:
    """A device's TPM-wrapped key blobs (usable only inside its TPM, under its EK): the AK and the release key."""

    ak_public: bytes
    ak_private: bytes
    release_public: bytes = b""
    release_private: bytes = b""

    def save(self, path: str | os.PathLike[str]) -> None:
        obj = {"format": "edgeshield.tpm-keys", "version": 1, "ak_public": _b64(self.ak_public),
               "ak_private": _b64(self.ak_private), "release_public": _b64(self.release_public),
               "release_private": _b64(self.release_private)}
        atomic_write_bytes(path, json.dumps(obj, indent=1).encode(), mode=0o600, overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceKeys:
        obj = _load_json(path, "TPM key file")
        if not isinstance(obj, dict) or obj.get("format") != "edgeshield.tpm-keys":
            raise InputError(f"{path} is not an EdgeShield TPM key file")
        try:
            blobs = [_unb64(obj[k], k) for k in ("ak_public", "ak_private", "release_public", "release_private")]
        except (KeyError, QuoteFormatError) as exc:
            raise InputError(f"{path} is a damaged TPM key file: {exc}") from None
        return cls(*blobs)


class DeviceTpm:
    """The device's TPM for attestation: EK, AK (a child of the EK), quotes, and the release decryption key."""

    def __init__(self, tcti: str | None = None) -> None:
        self.tcti = tcti or default_tcti()
        self._t = _pytss()
        os.environ.setdefault("TSS2_LOG", "all+none")  # the TSS logs every TPM error on stderr by default
        try:
            self.ctx = self._t.ESAPI(self.tcti)
        except Exception as exc:  # noqa: BLE001 - the TSS raises its own untyped errors
            raise TpmUnavailableError(f"cannot open the TPM at {self.tcti}: {exc}") from None
        self._ek: Any = None
        self._ek_public = b""
        self._ek_cert: bytes | None = None

    def close(self) -> None:
        """Flush the EK (a transient object: the TPM has room for only a few) and close the connection."""
        try:
            if self._ek is not None:
                with self._tpm_call("flush the endorsement key"):
                    self.ctx.flush_context(self._ek)
                self._ek = None
        finally:
            self.ctx.close()

    def __enter__(self) -> DeviceTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tpm_call(self, what: str) -> Iterator[None]:
        try:
            yield
        except EdgeShieldError:
            raise
        except Exception as exc:  # noqa: BLE001 - TSS2_Exception and friends
            raise TpmUnavailableError(f"the TPM refused to {what}: {exc}") from None

    def _endorsement(self) -> Any:
        if self._ek is None:
            from tpm2_pytss.utils import NVReadEK, create_ek_template

            with self._tpm_call("create the endorsement key"):
                cert, template = create_ek_template("EK-RSA2048", NVReadEK(self.ctx))
                self._ek, pub, _, _, _ = self.ctx.create_primary(None, template, self._t.ESYS_TR.ENDORSEMENT)
            self._ek_public = bytes(pub.publicArea.marshal())
            self._ek_cert = bytes(cert) if cert else None
        return self._ek

    def endorsement(self) -> tuple[bytes, bytes | None]:
        """The EK's ``TPMT_PUBLIC`` and its certificate (DER) from the TPM's NV, if the TPM has one."""
        self._endorsement()
        return self._ek_public, self._ek_cert

    def _ek_session(self) -> Any:
        t = self._t
        s = self.ctx.start_auth_session(t.ESYS_TR.NONE, t.ESYS_TR.NONE, t.TPM2_SE.POLICY,
                                        t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL), t.TPM2_ALG.SHA256)
        self.ctx.policy_secret(t.ESYS_TR.ENDORSEMENT, s, b"", b"", b"", 0)
        self.ctx.trsess_set_attributes(s, 0, t.TPMA_SESSION.CONTINUESESSION)  # flushed after its one use
        return s

    def _create(self, template: str, attrs: int) -> tuple[bytes, bytes]:
        t = self._t
        ek = self._endorsement()
        with self._tpm_call("create a key under the endorsement key"):
            priv, pub, _, _, _ = self.ctx.create(ek, None, t.TPM2B_PUBLIC.parse(template, objectAttributes=attrs),
                                                 session1=self._ek_session())
        return bytes(pub.publicArea.marshal()), bytes(priv.marshal())

    def _load(self, public: bytes, private: bytes) -> Any:
        t = self._t
        ek = self._endorsement()
        with self._tpm_call("load a key (a key file from another TPM?)"):
            pub, _ = t.TPMT_PUBLIC.unmarshal(public)
            priv, _ = t.TPM2B_PRIVATE.unmarshal(private)
            return self.ctx.load(ek, priv, t.TPM2B_PUBLIC(publicArea=pub), session1=self._ek_session())

    def create_keys(self) -> DeviceKeys:
        """Create an ECDSA P-256 AK and an RSA-2048 release decryption key, both children of the EK."""
        ak = self._create("ecc256:ecdsa-sha256:null", AK_ATTRIBUTES)
        release = self._create("rsa2048:null:null", RELEASE_KEY_ATTRIBUTES)
        return DeviceKeys(*ak, *release)

    def activate_credential(self, keys: DeviceKeys, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """Recover the verifier's secret: possible only in the TPM that holds both the EK and this AK."""
        t = self._t
        ak = self._load(keys.ak_public, keys.ak_private)
        try:
            blob, _ = t.TPM2B_ID_OBJECT.unmarshal(credential_blob)
            enc, _ = t.TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
            try:
                return bytes(self.ctx.activate_credential(ak, self._endorsement(), blob, enc,
                                                          session1=t.ESYS_TR.PASSWORD, session2=self._ek_session()))
            except Exception:  # noqa: BLE001 - any TPM refusal means the credential is not for this TPM/AK
                raise CredentialActivationError(
                    "the TPM cannot activate this credential: not for this TPM and AK") from None
        finally:
            self.ctx.flush_context(ak)

    def pcr_values(self, indices: Sequence[int]) -> dict[int, bytes]:
        t = self._t
        out: dict[int, bytes] = {}
        todo = sorted(set(indices))
        with self._tpm_call("read PCRs"):
            while todo:
                sel = t.TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, todo)))
                _, got_sel, values = self.ctx.pcr_read(sel)
                got = [i for s in got_sel.pcrSelections[:got_sel.count] for i in range(24)
                       if s.pcrSelect[i // 8] >> (i % 8) & 1]
                if not got:
                    raise TpmUnavailableError("the TPM returned no PCR values (is its SHA-256 bank active?)")
                for i, v in zip(got, values.digests[:values.count], strict=True):
                    out[i] = bytes(v)
                todo = [i for i in todo if i not in out]
        return out

    def quote(self, keys: DeviceKeys, nonce: bytes, indices: Sequence[int]) -> Quote:
        """Quote the SHA-256 PCRs ``indices`` with the AK over the verifier's ``nonce``."""
        t = self._t
        if not indices or any(not 0 <= i <= MAX_PCR for i in indices):
            raise InvalidArgumentError(f"PCR indices must be 0..{MAX_PCR}")
        if not 1 <= len(nonce) <= 64:
            raise InvalidArgumentError("the nonce must be 1..64 bytes")
        ak = self._load(keys.ak_public, keys.ak_private)
        try:
            with self._tpm_call("quote"):
                sel = t.TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, sorted(set(indices)))))
                attest, sig = self.ctx.quote(ak, sel, nonce)
            # Read after quoting; the verifier checks the values against the signed digest, so a PCR extended in
            # between is caught there (the caller retries) rather than trusted.
            return Quote(bytes(attest), bytes(sig.marshal()), self.pcr_values(indices))
        finally:
            self.ctx.flush_context(ak)

    def certify_release_key(self, keys: DeviceKeys, nonce: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify: the AK signs the release key's name with ``nonce``, proving both live in this TPM."""
        t = self._t
        ak = self._load(keys.ak_public, keys.ak_private)
        key = self._load(keys.release_public, keys.release_private)
        try:
            with self._tpm_call("certify the release key"):
                attest, sig = self.ctx.certify(key, ak, nonce, t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL),
                                               session1=t.ESYS_TR.PASSWORD, session2=t.ESYS_TR.PASSWORD)
            return bytes(attest), bytes(sig.marshal())
        finally:
            self.ctx.flush_context(key)
            self.ctx.flush_context(ak)

    def read_clock(self) -> ClockInfo:
        """TPM2_ReadClock: the TPM's clock (ms it has run, saved across reboots) and its reset/restart counters."""
        with self._tpm_call("read its clock"):
            info = self.ctx.read_clock().clockInfo
        return ClockInfo(int(info.clock), int(info.resetCount), int(info.restartCount), bool(info.safe))

    def nv_public(self, index: int) -> bytes:
        """The marshalled ``TPMS_NV_PUBLIC`` of NV index ``index`` (what NV certification names)."""
        handle = self._nv_handle(index)
        try:
            with self._tpm_call(f"read NV index 0x{index:08x}'s public area"):
                pub, _ = self.ctx.nv_read_public(handle)
            return bytes(pub.nvPublic.marshal())
        finally:
            self.ctx.tr_close(handle)

    def _nv_handle(self, index: int) -> Any:
        if not isinstance(index, int) or isinstance(index, bool) or index >> 24 != NV_HANDLE_TYPE:
            raise InvalidArgumentError(f"{index!r} is not an NV index handle (0x01000000..0x01ffffff)")
        with self._tpm_call(f"find NV index 0x{index:08x} (is it defined?)"):
            return self.ctx.tr_from_tpmpublic(index)

    def certify_nv_counter(self, keys: DeviceKeys, nonce: bytes, index: int) -> tuple[bytes, bytes, bytes]:
        """TPM2_NV_Certify: the AK signs NV counter ``index``'s name and whole 8-byte value with ``nonce``.

        Returns ``(nv_public, attest, signature)`` for :func:`verify_nv_counter`. Reading needs the index's own
        (empty) auth value, as the floor's counter is defined (``TpmCounterFloor``).
        """
        t = self._t
        if not 1 <= len(nonce) <= 64:
            raise InvalidArgumentError("the nonce must be 1..64 bytes")
        handle = self._nv_handle(index)
        try:
            with self._tpm_call(f"read NV index 0x{index:08x}'s public area"):
                pub, _ = self.ctx.nv_read_public(handle)
            nv_public = bytes(pub.nvPublic.marshal())
            ak = self._load(keys.ak_public, keys.ak_private)
            try:
                with self._tpm_call(f"certify NV index 0x{index:08x} (a written 8-byte counter?)"):
                    attest, sig = self.ctx.nv_certify(ak, handle, nonce, t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL),
                                                      8, 0, session1=t.ESYS_TR.PASSWORD,
                                                      session2=t.ESYS_TR.PASSWORD)
            finally:
                self.ctx.flush_context(ak)
            return nv_public, bytes(attest), bytes(sig.marshal())
        finally:
            self.ctx.tr_close(handle)

    def decrypt_released(self, keys: DeviceKeys, ciphertext: bytes, label: bytes) -> bytes:
        """RSA-OAEP-SHA256 decryption inside the TPM with the release key."""
        t = self._t
        key = self._load(keys.release_public, keys.release_private)
        try:
            scheme = t.TPMT_RSA_DECRYPT(scheme=t.TPM2_ALG.OAEP,
                                        details=t.TPMU_ASYM_SCHEME(oaep=t.TPMS_SCHEME_HASH(hashAlg=t.TPM2_ALG.SHA256)))
            try:
                return bytes(self.ctx.rsa_decrypt(key, ciphertext, scheme, label))
            except Exception:  # noqa: BLE001
                raise CredentialActivationError("the TPM cannot decrypt the released key: not for this TPM") from None
        finally:
            self.ctx.flush_context(key)
