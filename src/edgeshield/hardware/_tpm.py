"""Device keys sealed in a TPM 2.0 under a PCR policy, optionally an owner-signed one (tpm2-pytss, extra ``[tpm]``).

The sealed object is a TPM keyed-hash data object under the owner hierarchy's storage key (an ECC P-256 primary
re-derived from the TPM's seed on every use, so nothing about it is stored). Its ``authPolicy`` is either

* ``PolicyPCR(selection, digest of the values)``: it unseals only while those PCRs hold those values; or
* ``PolicyAuthorize(owner key, POLICY_REF)``: it unseals while the PCRs hold any set of values the owner has signed
  an approval for (an approved ``PolicyPCR`` digest), so a new measured boot chain needs a new signature, not a
  re-seal. This is the signed-PCR-policy idea of systemd-cryptenroll and clevis, done with the owner's P-256 key.

Sealing and unsealing use a session salted to the storage key with parameter encryption, so the key does not
cross the TPM bus in the clear. ``tpm2_pytss`` is imported only inside functions that talk to a TPM; the policy
arithmetic and the approval files need only ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import importlib
import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgeshield._io import atomic_write_bytes, check_readable_file
from edgeshield.errors import (
    EdgeShieldError,
    IntegrityError,
    InvalidArgumentError,
    KeyMaterialError,
    MissingDependencyError,
)

# tpm2-pytss ships no type information: its ESAPI context and ESYS_TR handles are opaque here.
ESAPI = Any
ESYS_TR = Any

__all__ = [
    "DEFAULT_TCTI",
    "POLICY_REF",
    "TCTI_ENV",
    "PCRSelection",
    "PolicyApproval",
    "SealedObject",
    "TPMApprovalError",
    "TPMError",
    "TPMPolicyError",
    "TPMSealedObjectError",
    "TPMUnavailableError",
    "connect",
    "load_approvals",
    "load_device_key",
    "parse_device_key_spec",
    "pcr_extend",
    "pcr_read",
    "policy_authorize_digest",
    "policy_pcr_digest",
    "save_approvals",
    "seal",
    "seal_device_key",
    "sign_approval",
    "unseal",
    "unseal_device_key",
]  # fmt: skip

TCTI_ENV = "EDGESHIELD_TPM_TCTI"
DEFAULT_TCTI = "device:/dev/tpmrm0"
POLICY_REF = b"edgeshield/device-key/v1"  # binds owner approvals to this use: one signed for another purpose fails
SEALED_FORMAT = "edgeshield.tpm-sealed"
APPROVALS_FORMAT = "edgeshield.tpm-pcr-approvals"
FORMAT_VERSION = 1
TPM_PREFIX = "tpm:"
_PERSISTENT_MIN, _PERSISTENT_MAX = 0x81000000, 0x81FFFFFF
_NV_META_BASE = 0x01000000  # sealed-object metadata of persistent handle 0x81XXXXXX lives at NV index 0x01XXXXXX
_NV_META_MAX = 1024
_CC_POLICY_PCR = 0x0000017F
_CC_POLICY_AUTHORIZE = 0x0000016A
_BANKS = {"sha1": (0x0004, "sha1"), "sha256": (0x000B, "sha256"), "sha384": (0x000C, "sha384"),
          "sha512": (0x000D, "sha512")}  # fmt: skip
_DIGEST_SIZE = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


# --- errors -------------------------------------------------------------------------------------------------------
class TPMError(EdgeShieldError):
    """A TPM operation failed for a reason that is not an integrity or policy failure."""


class TPMUnavailableError(TPMError):
    """No TPM answers at the TCTI (no device node, swtpm not running, or tpm2-tss cannot load the TCTI)."""


class TPMPolicyError(IntegrityError):
    """The TPM refused to unseal: the PCRs do not hold the sealed (or an owner-approved) set of values."""


class TPMSealedObjectError(IntegrityError):
    """The sealed object is malformed, altered, or was sealed by another TPM."""


class TPMApprovalError(IntegrityError):
    """A signed PCR approval is malformed, not signed by the owner key the object was sealed to, or none matches."""


def _tss() -> Any:
    # tpm2-tss logs every TPM error code to stderr; our errors say what failed in one line (TSS2_LOG=all+ERROR
    # or more brings the library's log back).
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        return importlib.import_module("tpm2_pytss")  # untyped: kept opaque (Any) rather than half-typed
    except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
        raise MissingDependencyError("TPM support needs tpm2-pytss: pip install 'edgeshield[tpm]'") from exc


# --- PCR selections and policy digests (pure) ---------------------------------------------------------------------
@dataclass(frozen=True)
class PCRSelection:
    """One PCR bank and a sorted set of PCR indices, written ``sha256:0,7,16`` (ranges ``0-7`` allowed)."""

    bank: str
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.bank not in _BANKS:
            raise InvalidArgumentError(f"unknown PCR bank {self.bank!r}; use one of {', '.join(_BANKS)}")
        if not self.indices or any(not 0 <= i <= 23 for i in self.indices) or list(self.indices) != sorted(
            set(self.indices)
        ):
            raise InvalidArgumentError("PCR indices must be distinct, sorted and in 0..23")

    @classmethod
    def parse(cls, text: str) -> PCRSelection:
        m = re.fullmatch(r"\s*(\w+)\s*:\s*([0-9,\-\s]+)", text)
        if m is None:
            raise InvalidArgumentError(f"PCR selection {text!r} is not BANK:I,J,... (e.g. sha256:0,7)")
        indices: set[int] = set()
        for part in m.group(2).replace(" ", "").split(","):
            if not part:
                raise InvalidArgumentError(f"PCR selection {text!r} has an empty index")
            lo, _, hi = part.partition("-")
            try:
                a, b = int(lo), int(hi or lo)
            except ValueError as exc:
                raise InvalidArgumentError(f"PCR selection {text!r}: {part!r} is not an index or range") from exc
            if a > b:
                raise InvalidArgumentError(f"PCR selection {text!r}: empty range {part!r}")
            indices.update(range(a, b + 1))
        return cls(m.group(1).lower(), tuple(sorted(indices)))

    def __str__(self) -> str:
        return f"{self.bank}:{','.join(map(str, self.indices))}"

    @property
    def digest_size(self) -> int:
        return _DIGEST_SIZE[self.bank]

    def marshal(self) -> bytes:
        """TPML_PCR_SELECTION with this one bank (as it enters the PolicyPCR digest)."""
        bitmap = bytearray(3)
        for i in self.indices:
            bitmap[i // 8] |= 1 << (i % 8)
        return struct.pack(">IHB", 1, _BANKS[self.bank][0], 3) + bytes(bitmap)

    def check_values(self, values: dict[int, bytes]) -> None:
        if sorted(values) != list(self.indices):
            raise InvalidArgumentError(f"PCR values given for {sorted(values)}, the selection is {list(self.indices)}")
        for i, v in values.items():
            if len(v) != self.digest_size:
                raise InvalidArgumentError(f"PCR {i}: a {self.bank} value has {self.digest_size} bytes, not {len(v)}")


def policy_pcr_digest(selection: PCRSelection, values: dict[int, bytes], previous: bytes = bytes(32)) -> bytes:
    """The SHA-256 policy digest after ``TPM2_PolicyPCR(selection, H(values in selection order))``."""
    selection.check_values(values)
    pcr_digest = hashlib.sha256(b"".join(values[i] for i in selection.indices)).digest()
    return hashlib.sha256(previous + struct.pack(">I", _CC_POLICY_PCR) + selection.marshal() + pcr_digest).digest()


def policy_authorize_digest(signer_name: bytes, policy_ref: bytes = POLICY_REF) -> bytes:
    """The SHA-256 policy digest of ``TPM2_PolicyAuthorize(signer, policy_ref)`` from a fresh session."""
    d = hashlib.sha256(bytes(32) + struct.pack(">I", _CC_POLICY_AUTHORIZE) + signer_name).digest()
    return hashlib.sha256(d + policy_ref).digest()


# --- owner-signed PCR approvals (pure: the owner signs offline) -----------------------------------------------------
@dataclass(frozen=True)
class PolicyApproval:
    """The owner's signature over ``H(approved PolicyPCR digest || POLICY_REF)``: these PCR values may unseal."""

    selection: PCRSelection
    values: dict[int, bytes]
    signature: bytes  # DER ECDSA P-256 over the SHA-256 aHash (prehashed), as TPM2_VerifySignature checks it

    @property
    def approved_policy(self) -> bytes:
        return policy_pcr_digest(self.selection, self.values)

    def a_hash(self, policy_ref: bytes = POLICY_REF) -> bytes:
        return hashlib.sha256(self.approved_policy + policy_ref).digest()

    def verify(self, owner: ec.EllipticCurvePublicKey, policy_ref: bytes = POLICY_REF) -> None:
        try:
            owner.verify(self.signature, self.a_hash(policy_ref), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        except InvalidSignature as exc:
            raise TPMApprovalError(f"PCR approval for {self.selection} is not signed by the owner key") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "pcrs": str(self.selection),
            "values": {str(i): v.hex() for i, v in sorted(self.values.items())},
            "approved_policy": self.approved_policy.hex(),
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_dict(cls, d: Any) -> PolicyApproval:
        try:
            selection = PCRSelection.parse(d["pcrs"])
            values = {int(i): bytes.fromhex(v) for i, v in d["values"].items()}
            approval = cls(selection, values, base64.b64decode(d["signature"], validate=True))
            if approval.approved_policy.hex() != d["approved_policy"]:
                raise TPMApprovalError("PCR approval: its approved_policy is not the digest of its PCR values")
        except TPMApprovalError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error, InvalidArgumentError) as exc:
            raise TPMApprovalError(f"malformed PCR approval: {exc}") from exc
        return approval


def sign_approval(
    owner: ec.EllipticCurvePrivateKey, selection: PCRSelection, values: dict[int, bytes]
) -> PolicyApproval:
    """Approve ``values`` of ``selection``: a device whose PCRs hold them may unseal an owner-bound device key."""
    if not isinstance(owner, ec.EllipticCurvePrivateKey) or owner.curve.name != "secp256r1":
        raise KeyMaterialError("PCR approvals are signed with the owner's ECDSA P-256 key")
    selection.check_values(values)
    unsigned = PolicyApproval(selection, dict(values), b"")
    signature = owner.sign(unsigned.a_hash(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    return PolicyApproval(selection, dict(values), signature)


def save_approvals(path: str | os.PathLike[str], approvals: Sequence[PolicyApproval]) -> None:
    doc = {"format": APPROVALS_FORMAT, "version": FORMAT_VERSION, "approvals": [a.to_dict() for a in approvals]}
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())


def load_approvals(path: str | os.PathLike[str]) -> list[PolicyApproval]:
    p = check_readable_file(path, what="PCR approvals file")
    try:
        doc = json.loads(p.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TPMApprovalError(f"{p}: not a PCR approvals file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != APPROVALS_FORMAT:
        raise TPMApprovalError(f"{p}: not a PCR approvals file")
    if doc.get("version") != FORMAT_VERSION:
        raise TPMApprovalError(f"{p}: PCR approvals version {doc.get('version')!r} is not supported")
    items = doc.get("approvals")
    if not isinstance(items, list):
        raise TPMApprovalError(f"{p}: no approvals list")
    return [PolicyApproval.from_dict(a) for a in items]


# --- the sealed object ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SealedObject:
    """What is needed to load and unseal a sealed object; never the secret (``private`` is wrapped by the TPM)."""

    selection: PCRSelection
    auth_policy: bytes
    signer_pem: bytes | None  # owner public key for a signed policy; None for a plain PCR policy
    public: bytes  # marshalled TPM2B_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE (empty for the NV metadata of a persistent object)

    @property
    def signed(self) -> bool:
        return self.signer_pem is not None

    def to_json(self, *, with_blobs: bool = True) -> bytes:
        doc: dict[str, Any] = {
            "format": SEALED_FORMAT,
            "version": FORMAT_VERSION,
            "pcrs": str(self.selection),
            "policy": "signed" if self.signed else "pcr",
            "policy_ref": POLICY_REF.decode() if self.signed else None,
            "auth_policy": self.auth_policy.hex(),
            "signer": self.signer_pem.decode() if self.signer_pem else None,
            "parent": "owner-hierarchy ecc256 storage key",
        }
        if with_blobs:
            doc["public"] = base64.b64encode(self.public).decode()
            doc["private"] = base64.b64encode(self.private).decode()
        return json.dumps(doc, separators=(",", ":") if not with_blobs else (", ", ": ")).encode()

    @classmethod
    def from_json(cls, data: bytes, *, what: str = "sealed object", with_blobs: bool = True) -> SealedObject:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TPMSealedObjectError(f"{what}: not an EdgeShield sealed object ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != SEALED_FORMAT:
            raise TPMSealedObjectError(f"{what}: not an EdgeShield sealed object")
        if doc.get("version") != FORMAT_VERSION:
            raise TPMSealedObjectError(f"{what}: sealed-object version {doc.get('version')!r} is not supported")
        try:
            signer = doc["signer"].encode() if doc["policy"] == "signed" else None
            if doc["policy"] not in ("pcr", "signed"):
                raise ValueError(f"unknown policy kind {doc['policy']!r}")
            obj = cls(
                PCRSelection.parse(doc["pcrs"]),
                bytes.fromhex(doc["auth_policy"]),
                signer,
                base64.b64decode(doc["public"], validate=True) if with_blobs else b"",
                base64.b64decode(doc["private"], validate=True) if with_blobs else b"",
            )
            if signer is not None:
                _load_signer(signer)
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error, InvalidArgumentError) as exc:
            raise TPMSealedObjectError(f"{what}: malformed sealed object ({exc})") from exc
        if len(obj.auth_policy) != 32 or (with_blobs and not (obj.public and obj.private)):
            raise TPMSealedObjectError(f"{what}: malformed sealed object")
        return obj

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        atomic_write_bytes(path, self.to_json() + b"\n", mode=0o600, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SealedObject:
        p = check_readable_file(path, what="sealed object")
        return cls.from_json(p.read_bytes(), what=str(p))


def _load_signer(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the signer is not an ECDSA P-256 public key")
    return key


# --- talking to a TPM -----------------------------------------------------------------------------------------------
def _rc_error(exc: Any) -> int:
    return int(getattr(exc, "error", 0) or 0)


@contextlib.contextmanager
def connect(tcti: str | None = None) -> Iterator[ESAPI]:
    """An ESAPI context on ``tcti`` (default: ``$EDGESHIELD_TPM_TCTI``, else the kernel's resource manager
    ``device:/dev/tpmrm0``); closed on exit."""
    tss = _tss()
    conf = tcti or os.environ.get(TCTI_ENV) or DEFAULT_TCTI
    try:
        esys = tss.ESAPI(conf)
    except (tss.TSS2_Exception, RuntimeError, OSError) as exc:
        raise TPMUnavailableError(f"no TPM at {conf!r} ({exc}); set {TCTI_ENV} or --tcti") from exc
    try:
        yield esys
    finally:
        esys.close()


def _storage_key(esys: ESAPI) -> ESYS_TR:
    """The owner hierarchy's ECC P-256 storage primary, re-derived from the seed (same key every time)."""
    tss = _tss()
    attrs = (
        tss.TPMA_OBJECT.RESTRICTED | tss.TPMA_OBJECT.DECRYPT | tss.TPMA_OBJECT.FIXEDTPM | tss.TPMA_OBJECT.FIXEDPARENT
        | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN | tss.TPMA_OBJECT.USERWITHAUTH | tss.TPMA_OBJECT.NODA
    )  # fmt: skip
    template = tss.TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attrs)
    try:
        handle, *_ = esys.create_primary(None, template, tss.ESYS_TR.OWNER)
    except tss.TSS2_Exception as exc:
        raise TPMError(f"cannot create the storage key in the owner hierarchy: {exc}") from exc
    return handle


def _encrypted_session(esys: ESAPI, srk: ESYS_TR, kind: Any, *, decrypt: bool) -> ESYS_TR:
    """A session salted to the storage key whose parameters are AES-CFB encrypted (command or response)."""
    tss = _tss()
    sym = tss.TPMT_SYM_DEF(
        algorithm=tss.TPM2_ALG.AES, keyBits=tss.TPMU_SYM_KEY_BITS(aes=128), mode=tss.TPMU_SYM_MODE(aes=tss.TPM2_ALG.CFB)
    )
    session = esys.start_auth_session(srk, tss.ESYS_TR.NONE, kind, sym, tss.TPM2_ALG.SHA256)
    flag = tss.TPMA_SESSION.DECRYPT if decrypt else tss.TPMA_SESSION.ENCRYPT
    esys.trsess_set_attributes(session, flag | tss.TPMA_SESSION.CONTINUESESSION)
    return session


def pcr_read(selection: PCRSelection, *, esys: ESAPI) -> dict[int, bytes]:
    """The current values of ``selection``'s PCRs."""
    values: dict[int, bytes] = {}
    pending = list(selection.indices)
    while pending:  # the TPM answers at most 8 PCRs per call
        sel = PCRSelection(selection.bank, tuple(pending))
        _, got_sel, digests = esys.pcr_read(str(sel))
        got = [i for i in sel.indices if _selected(got_sel, i)]
        if not got:
            raise TPMError(f"the TPM has no active {selection.bank} bank")
        for i, d in zip(got, digests, strict=False):
            values[i] = bytes(d)
        pending = [i for i in pending if i not in values]
    return values


def _selected(sel: Any, index: int) -> bool:
    for s in sel.pcrSelections[: sel.count]:
        if index // 8 < s.sizeofSelect and s.pcrSelect[index // 8] & (1 << (index % 8)):
            return True
    return False


def pcr_extend(index: int, digest: bytes, *, bank: str = "sha256", esys: ESAPI) -> None:
    """Extend PCR ``index`` of ``bank`` with ``digest`` (a measurement: PCR := H(PCR || digest))."""
    tss = _tss()
    PCRSelection(bank, (index,))
    if len(digest) != _DIGEST_SIZE[bank]:
        raise InvalidArgumentError(f"a {bank} measurement has {_DIGEST_SIZE[bank]} bytes, not {len(digest)}")
    ha = tss.TPMT_HA(hashAlg=_BANKS[bank][0], digest=tss.TPMU_HA(**{bank: digest}))
    try:
        esys.pcr_extend(getattr(tss.ESYS_TR, f"PCR{index}"), tss.TPML_DIGEST_VALUES([ha]))
    except tss.TSS2_Exception as exc:
        raise TPMError(f"cannot extend PCR {index}: {exc}") from exc


def seal(
    secret: bytes,
    selection: PCRSelection,
    *,
    esys: ESAPI,
    values: dict[int, bytes] | None = None,
    signer: ec.EllipticCurvePublicKey | None = None,
) -> SealedObject:
    """Seal ``secret`` (at most 128 bytes) to this TPM: under ``PolicyPCR(selection, values)`` (default: the
    current values), or, with ``signer``, under ``PolicyAuthorize(signer)`` (any owner-approved PCR values)."""
    tss = _tss()
    if not 0 < len(secret) <= 128:
        raise InvalidArgumentError("a sealed secret has 1 to 128 bytes")
    signer_pem: bytes | None = None
    if signer is not None:
        if not isinstance(signer, ec.EllipticCurvePublicKey) or signer.curve.name != "secp256r1":
            raise KeyMaterialError("a signed PCR policy needs the owner's ECDSA P-256 public key")
        signer_pem = signer.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        auth_policy = policy_authorize_digest(_signer_name(signer_pem))
    else:
        if values is None:
            values = pcr_read(selection, esys=esys)
        auth_policy = policy_pcr_digest(selection, values)
    public = tss.TPM2B_PUBLIC(
        publicArea=tss.TPMT_PUBLIC(
            type=tss.TPM2_ALG.KEYEDHASH,
            nameAlg=tss.TPM2_ALG.SHA256,
            objectAttributes=tss.TPMA_OBJECT.FIXEDTPM | tss.TPMA_OBJECT.FIXEDPARENT,  # policy only, no password
            authPolicy=auth_policy,
            parameters=tss.TPMU_PUBLIC_PARMS(
                keyedHashDetail=tss.TPMS_KEYEDHASH_PARMS(scheme=tss.TPMT_KEYEDHASH_SCHEME(scheme=tss.TPM2_ALG.NULL))
            ),
        )
    )
    sensitive = tss.TPM2B_SENSITIVE_CREATE(tss.TPMS_SENSITIVE_CREATE(data=tss.TPM2B_SENSITIVE_DATA(secret)))
    srk = _storage_key(esys)
    try:
        session = _encrypted_session(esys, srk, tss.TPM2_SE.HMAC, decrypt=True)  # the secret goes in encrypted
        try:
            priv, pub, *_ = esys.create(srk, sensitive, public, session1=session)
        finally:
            esys.flush_context(session)
    except tss.TSS2_Exception as exc:
        raise TPMError(f"the TPM could not seal: {exc}") from exc
    finally:
        esys.flush_context(srk)
    return SealedObject(selection, auth_policy, signer_pem, pub.marshal(), priv.marshal())


def _signer_name(pem: bytes) -> bytes:
    return bytes(_signer_public(pem).get_name().marshal()[2:])  # strip the TPM2B size: the name itself


def _signer_public(pem: bytes) -> Any:
    tss = _tss()
    scheme = tss.TPMT_ASYM_SCHEME(scheme=tss.TPM2_ALG.ECDSA, details=tss.TPMU_ASYM_SCHEME(ecdsa=tss.TPMS_SCHEME_HASH(
        hashAlg=tss.TPM2_ALG.SHA256)))  # fmt: skip
    return tss.TPM2B_PUBLIC.from_pem(
        pem, objectAttributes=tss.TPMA_OBJECT.SIGN_ENCRYPT | tss.TPMA_OBJECT.USERWITHAUTH, scheme=scheme
    )


def unseal(sealed: SealedObject, *, esys: ESAPI, approvals: Sequence[PolicyApproval] = (),
           handle: int | None = None) -> bytes:  # fmt: skip
    """Unseal ``sealed`` (loaded from its blobs, or the persistent object at ``handle``) while the PCRs allow it.

    Raises ``TPMPolicyError`` when the PCRs do not match (or no approval matches them), ``TPMSealedObjectError``
    for a blob this TPM did not seal or that was altered, ``TPMApprovalError`` for a badly signed approval.
    """
    tss = _tss()
    approval = _matching_approval(sealed, approvals, esys) if sealed.signed else None
    srk = _storage_key(esys)
    obj = None
    session = None
    try:
        if handle is None:
            try:
                obj = esys.load(srk, tss.TPM2B_PRIVATE.unmarshal(sealed.private)[0],
                                tss.TPM2B_PUBLIC.unmarshal(sealed.public)[0])  # fmt: skip
            except tss.TSS2_Exception as exc:
                raise TPMSealedObjectError(
                    "this TPM cannot load the sealed object: it was sealed by another TPM or altered"
                ) from exc
            except (ValueError, TypeError, RuntimeError) as exc:
                raise TPMSealedObjectError(f"the sealed object's blobs do not parse: {exc}") from exc
            item = obj
        else:
            item = _persistent(esys, handle)
        pub, _, _ = esys.read_public(item)
        if bytes(pub.publicArea.authPolicy) != sealed.auth_policy:
            raise TPMSealedObjectError("the sealed object's policy is not the one its metadata names")
        session = _encrypted_session(esys, srk, tss.TPM2_SE.POLICY, decrypt=False)  # the secret comes out encrypted
        esys.policy_pcr(session, b"", str(sealed.selection))
        if approval is not None and sealed.signer_pem is not None:
            _policy_authorize(esys, session, approval, sealed.signer_pem)
        try:
            return bytes(esys.unseal(item, session1=session))
        except tss.TSS2_Exception as exc:
            if _rc_error(exc) in (tss.TPM2_RC.POLICY_FAIL, tss.TPM2_RC.VALUE):
                raise TPMPolicyError(
                    f"policy check failed: PCRs {sealed.selection} do not hold the sealed values"
                ) from exc
            raise TPMError(f"the TPM refused to unseal: {exc}") from exc
    finally:
        for h in (session, obj, srk):
            if h is not None:
                with contextlib.suppress(Exception):
                    esys.flush_context(h)


def _matching_approval(sealed: SealedObject, approvals: Sequence[PolicyApproval], esys: ESAPI) -> PolicyApproval:
    if not approvals:
        raise TPMApprovalError("this key is sealed to owner-approved PCR values: give the owner's approvals file")
    owner = _load_signer(sealed.signer_pem or b"")
    current = pcr_read(sealed.selection, esys=esys)
    same_selection = [a for a in approvals if a.selection == sealed.selection]
    for a in same_selection:
        if all(a.values[i] == current[i] for i in sealed.selection.indices):
            a.verify(owner)  # a forged approval for the current values is an integrity failure, not a miss
            return a
    raise TPMPolicyError(
        f"policy check failed: no owner approval for the current values of PCRs {sealed.selection} "
        f"({len(same_selection)} of {len(approvals)} approvals cover this selection)"
    )


def _policy_authorize(esys: ESAPI, session: ESYS_TR, approval: PolicyApproval, signer_pem: bytes) -> None:
    tss = _tss()
    r, s = utils.decode_dss_signature(approval.signature)
    signature = tss.TPMT_SIGNATURE(
        sigAlg=tss.TPM2_ALG.ECDSA,
        signature=tss.TPMU_SIGNATURE(ecdsa=tss.TPMS_SIGNATURE_ECC(
            hash=tss.TPM2_ALG.SHA256, signatureR=r.to_bytes(32, "big"), signatureS=s.to_bytes(32, "big"))),
    )  # fmt: skip
    # In the owner hierarchy: a key loaded in the NULL hierarchy gets a NULL ticket, which PolicyAuthorize refuses.
    key = esys.load_external(_signer_public(signer_pem), None, tss.ESYS_TR.OWNER)
    try:
        ticket = esys.verify_signature(key, approval.a_hash(), signature)
        name = bytes(esys.tr_get_name(key).marshal()[2:])
        esys.policy_authorize(session, approval.approved_policy, name, ticket, POLICY_REF)
    except tss.TSS2_Exception as exc:
        raise TPMApprovalError(f"the TPM did not accept the owner's PCR approval: {exc}") from exc
    finally:
        esys.flush_context(key)


# --- persistent handles -----------------------------------------------------------------------------------------
def _check_handle(handle: int) -> None:
    if not _PERSISTENT_MIN <= handle <= _PERSISTENT_MAX:
        raise InvalidArgumentError(f"{handle:#x} is not a persistent handle (0x81000000-0x81ffffff)")


def _persistent(esys: ESAPI, handle: int) -> ESYS_TR:
    tss = _tss()
    try:
        return esys.tr_from_tpmpublic(handle)
    except tss.TSS2_Exception as exc:
        raise TPMSealedObjectError(f"no sealed object at persistent handle {handle:#x} in this TPM") from exc


def persist(sealed: SealedObject, handle: int, *, esys: ESAPI, replace: bool = False) -> None:
    """Make ``sealed`` a persistent object at ``handle`` and store its (non-secret) metadata in NV index
    ``0x01XXXXXX`` beside it, so ``tpm:HANDLE`` needs no file. ``replace`` evicts what is there first."""
    tss = _tss()
    _check_handle(handle)
    meta = sealed.to_json(with_blobs=False)
    if len(meta) > _NV_META_MAX:
        raise InvalidArgumentError("sealed-object metadata too large for its NV index")
    nv_index = _NV_META_BASE | (handle & 0x00FFFFFF)
    existing = _existing(esys, handle)
    if existing is not None:
        if not replace:
            esys.tr_close(existing)
            raise InvalidArgumentError(f"persistent handle {handle:#x} is in use; pass --force to replace it")
        esys.evict_control(tss.ESYS_TR.OWNER, existing, handle)
    old_nv = _existing(esys, nv_index)
    if old_nv is not None:
        esys.nv_undefine_space(old_nv, tss.ESYS_TR.OWNER)
    srk = _storage_key(esys)
    try:
        private, public = tss.TPM2B_PRIVATE.unmarshal(sealed.private)[0], tss.TPM2B_PUBLIC.unmarshal(sealed.public)[0]
        obj = esys.load(srk, private, public)
        try:
            esys.evict_control(tss.ESYS_TR.OWNER, obj, handle)
        finally:
            esys.flush_context(obj)
        nv_public = tss.TPM2B_NV_PUBLIC(nvPublic=tss.TPMS_NV_PUBLIC(
            nvIndex=nv_index, nameAlg=tss.TPM2_ALG.SHA256, dataSize=len(meta),
            attributes=tss.TPMA_NV.OWNERWRITE | tss.TPMA_NV.OWNERREAD | tss.TPMA_NV.AUTHREAD | tss.TPMA_NV.NO_DA,
        ))  # fmt: skip
        nv = esys.nv_define_space(None, nv_public, tss.ESYS_TR.OWNER)
        for off in range(0, len(meta), 512):  # under the TPM's MAX_NV_BUFFER_SIZE
            esys.nv_write(nv, meta[off : off + 512], off, tss.ESYS_TR.OWNER)
    except tss.TSS2_Exception as exc:
        raise TPMError(f"cannot persist the sealed object at {handle:#x}: {exc}") from exc
    finally:
        esys.flush_context(srk)


def _existing(esys: ESAPI, handle: int) -> ESYS_TR | None:
    tss = _tss()
    try:
        return esys.tr_from_tpmpublic(handle)
    except tss.TSS2_Exception:
        return None


def load_persistent(handle: int, *, esys: ESAPI) -> SealedObject:
    """The metadata of the sealed object persisted at ``handle`` (from its NV index)."""
    tss = _tss()
    _check_handle(handle)
    nv_index = _NV_META_BASE | (handle & 0x00FFFFFF)
    nv = _existing(esys, nv_index)
    if nv is None:
        raise TPMSealedObjectError(f"no EdgeShield sealed-object metadata for {handle:#x} (NV index {nv_index:#x})")
    try:
        size = esys.nv_read_public(nv)[0].nvPublic.dataSize
        data = b"".join(bytes(esys.nv_read(nv, min(512, size - o), o, nv)) for o in range(0, size, 512))
    except tss.TSS2_Exception as exc:
        raise TPMSealedObjectError(f"cannot read the metadata NV index {nv_index:#x}: {exc}") from exc
    return SealedObject.from_json(data, what=f"NV index {nv_index:#x}", with_blobs=False)


# --- device keys ------------------------------------------------------------------------------------------------
def seal_device_key(
    key: X25519PrivateKey,
    selection: PCRSelection,
    *,
    esys: ESAPI,
    values: dict[int, bytes] | None = None,
    signer: ec.EllipticCurvePublicKey | None = None,
) -> SealedObject:
    """Seal an X25519 device private key (its raw 32 bytes) to this TPM."""
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return seal(raw, selection, esys=esys, values=values, signer=signer)


def unseal_device_key(
    sealed: SealedObject, *, esys: ESAPI, approvals: Sequence[PolicyApproval] = (), handle: int | None = None
) -> X25519PrivateKey:
    raw = unseal(sealed, esys=esys, approvals=approvals, handle=handle)
    if len(raw) != 32:
        raise TPMSealedObjectError("the sealed object does not hold an X25519 device key")
    return X25519PrivateKey.from_private_bytes(raw)


@dataclass(frozen=True)
class DeviceKeySpec:
    """A parsed ``tpm:HANDLE`` / ``tpm:FILE`` device-key reference, with an optional ``,policy=APPROVALS``."""

    handle: int | None
    file: Path | None
    approvals: Path | None


def parse_device_key_spec(spec: str) -> DeviceKeySpec:
    """``tpm:0x81000001``, ``tpm:sealed.json`` or either with ``,policy=approvals.json`` (signed PCR policy)."""
    if not spec.startswith(TPM_PREFIX):
        raise InvalidArgumentError(f"{spec!r} is not a tpm: device key")
    body = spec[len(TPM_PREFIX) :]
    approvals = None
    target, sep, rest = body.rpartition(",policy=")
    if sep:
        approvals = Path(rest)
        body = target
    if not body:
        raise InvalidArgumentError("tpm: needs a persistent handle (tpm:0x81000001) or a sealed-object file")
    if re.fullmatch(r"0[xX][0-9a-fA-F]{1,8}", body):
        handle = int(body, 16)
        _check_handle(handle)
        return DeviceKeySpec(handle, None, approvals)
    return DeviceKeySpec(None, Path(body), approvals)


def load_device_key(
    spec: str | os.PathLike[str], passphrase: bytes | None = None, *, tcti: str | None = None
) -> X25519PrivateKey:
    """The device private key named by ``spec``: a PEM file (as ``keys.load_device_private_key``), or a
    ``tpm:`` reference unsealed now from the TPM at ``tcti`` (default ``$EDGESHIELD_TPM_TCTI``, /dev/tpmrm0).

    An unsealed key lives only in this process's memory; nothing of it is written anywhere.
    """
    text = os.fspath(spec)
    if not text.startswith(TPM_PREFIX):
        from edgeshield import keys

        return keys.load_device_private_key(text, passphrase)
    ref = parse_device_key_spec(text)
    sealed_file = SealedObject.load(ref.file) if ref.file is not None else None
    approvals = load_approvals(ref.approvals) if ref.approvals is not None else []
    with connect(tcti) as esys:
        if ref.handle is not None:
            return unseal_device_key(load_persistent(ref.handle, esys=esys), esys=esys, approvals=approvals,
                                     handle=ref.handle)  # fmt: skip
        if sealed_file is None:  # pragma: no cover - parse_device_key_spec gives a handle or a file
            raise InvalidArgumentError(f"{text!r} names no sealed object")
        return unseal_device_key(sealed_file, esys=esys, approvals=approvals)
