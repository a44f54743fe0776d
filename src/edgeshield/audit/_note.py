"""C2SP signed notes, verifier keys, checkpoints and cosignatures: pure functions over text and bytes.

Written from the specifications (c2sp.org/signed-note, tlog-checkpoint, tlog-cosignature), Ed25519 only:

- a *note* is UTF-8 text ending in a newline, a blank line, then lines ``— <key name> base64(key ID || sig)``;
- a *key ID* is ``SHA-256(name || 0x0A || type || public key)[:4]``, type 0x01 for Ed25519 note signatures and
  0x04 for timestamped Ed25519 cosignatures (``cosignature/v1``);
- a *vkey* is ``<name>+<hex key ID>+base64(type || public key)``;
- a *checkpoint* is a note whose text is origin, tree size and base64 root hash, one per line (then optional
  extension lines);
- a v1 *cosignature* signs ``cosignature/v1\\ntime <T>\\n`` followed by the checkpoint text, and its signature bytes
  are the 8-byte big-endian timestamp T followed by the 64-byte Ed25519 signature.

Parsing is strict (canonical base64, no control characters, no leading zeros), so one note has one reading.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeshield.errors import MalformedNoteError, NoteSignatureError

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
_SUPPORTED = (SIG_ED25519, SIG_COSIGNATURE_V1)
EM_DASH = "\u2014"
MAX_SIGNATURES = 32  # the spec asks verifiers to accept at least 16
MAX_NOTE_BYTES = 16 * 1024
HASH_SIZE = 32
_MAX_TIMESTAMP = 2**63 - 1


# --- small helpers ------------------------------------------------------------------------------------------------
def b64decode_strict(text: str, what: str) -> bytes:
    """Standard base64 (RFC 4648 §4) that must re-encode to exactly ``text``: one encoding per value."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise MalformedNoteError(f"{what} is not valid base64") from exc
    if base64.b64encode(raw).decode() != text:
        raise MalformedNoteError(f"{what} is not canonical base64")
    return raw


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_key_name(name: str) -> str:
    """Key names are non-empty and contain no Unicode spaces, no '+' and no control characters."""
    if (not isinstance(name, str) or not name or "+" in name or any(c.isspace() for c in name)
            or not name.isprintable()):
        raise MalformedNoteError(f"invalid key name {name!r}: it must be non-empty, without spaces or '+'")
    return name


def key_id(name: str, sig_type: int, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte key ID: SHA-256(name || 0x0A || signature type || public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + _raw_public(public_key)).digest()[:4]


# --- verifier keys ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vkey:
    """A verifier key: who (``name``), which algorithm (``sig_type``), and the Ed25519 public key."""

    name: str
    sig_type: int
    public_key: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.sig_type, self.public_key)

    def __str__(self) -> str:
        return f"{self.name}+{self.key_id.hex()}+{b64(bytes([self.sig_type]) + _raw_public(self.public_key))}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vkey) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def make_vkey(name: str, public_key: Ed25519PublicKey, sig_type: int = SIG_ED25519) -> Vkey:
    if sig_type not in _SUPPORTED:
        raise MalformedNoteError(f"unsupported signature type 0x{sig_type:02x}")
    return Vkey(check_key_name(name), sig_type, public_key)


def parse_vkey(text: str) -> Vkey:
    """Parse ``<name>+<hex key ID>+base64(type || key)``; the key ID must match the key."""
    if not isinstance(text, str):
        raise MalformedNoteError("a verifier key must be text")
    parts = text.strip().split("+", 2)  # names and key IDs hold no '+'; base64 key material may
    if len(parts) != 3:
        raise MalformedNoteError("a verifier key has three parts joined by '+': name, key ID, key")
    name, hex_id, material = parts
    check_key_name(name)
    if len(hex_id) != 8 or hex_id != hex_id.lower() or any(c not in "0123456789abcdef" for c in hex_id):
        raise MalformedNoteError(f"verifier key ID {hex_id!r} is not 8 lowercase hex digits")
    raw = b64decode_strict(material, "verifier key material")
    if not raw or raw[0] not in _SUPPORTED:
        kind = f"0x{raw[0]:02x}" if raw else "none"
        raise MalformedNoteError(f"verifier key type {kind} is not supported (Ed25519 0x01, cosignature/v1 0x04)")
    if len(raw) != 33:
        raise MalformedNoteError("an Ed25519 verifier key holds 32 key bytes")
    vkey = Vkey(name, raw[0], Ed25519PublicKey.from_public_bytes(raw[1:]))
    if vkey.key_id.hex() != hex_id:
        raise MalformedNoteError(f"verifier key ID {hex_id} does not match its key (expected {vkey.key_id.hex()})")
    return vkey


# --- notes --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_id: bytes
    signature: bytes  # the bytes after the key ID

    def line(self) -> str:
        return f"{EM_DASH} {self.name} {b64(self.key_id + self.signature)}\n"


@dataclass(frozen=True)
class Note:
    text: str  # ends with a newline
    signatures: tuple[NoteSignature, ...]

    def __str__(self) -> str:
        return format_note(self.text, self.signatures)


def format_note(text: str, signatures: Iterable[NoteSignature]) -> str:
    return text + "\n" + "".join(s.line() for s in signatures)


def _check_text_chars(text: str) -> None:
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise MalformedNoteError("a note must not contain control characters other than newline")


def parse_signature_line(line: str) -> NoteSignature:
    """One ``— <name> <base64>`` line without its newline."""
    if not line.startswith(EM_DASH + " "):
        raise MalformedNoteError("a signature line starts with an em dash and a space")
    rest = line[2:]
    name, sep, sig64 = rest.partition(" ")
    if not sep or " " in sig64:
        raise MalformedNoteError("a signature line is '— <key name> <base64 signature>'")
    check_key_name(name)
    blob = b64decode_strict(sig64, "a note signature")
    if len(blob) < 5:
        raise MalformedNoteError("a note signature holds a 4-byte key ID and the signature")
    return NoteSignature(name, blob[:4], blob[4:])


def parse_signature_lines(data: str) -> tuple[NoteSignature, ...]:
    """Newline-terminated signature lines (a witness's answer to add-checkpoint)."""
    if not data.endswith("\n"):
        raise MalformedNoteError("signature lines end with a newline")
    lines = data[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNoteError(f"more than {MAX_SIGNATURES} signatures")
    return tuple(parse_signature_line(x) for x in lines)


def decode_bounded(data: bytes, limit: int, what: str) -> str:
    """``data`` as UTF-8 text, refused (``MalformedNoteError``) when over ``limit`` bytes or not UTF-8."""
    if len(data) > limit:
        raise MalformedNoteError(f"{what} over {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedNoteError(f"{what} is not UTF-8") from exc


def parse_note(data: bytes | str) -> Note:
    """Split a signed note into its text and signatures (nothing is verified here)."""
    if isinstance(data, bytes):
        data = decode_bounded(data, MAX_NOTE_BYTES, "a note")
    if len(data.encode()) > MAX_NOTE_BYTES:
        raise MalformedNoteError(f"a note over {MAX_NOTE_BYTES} bytes")
    _check_text_chars(data)
    split = data.rfind("\n\n")
    if split < 0 or not data.endswith("\n"):
        raise MalformedNoteError("a signed note is text, a blank line and signature lines, each ending in newline")
    text, sigs = data[: split + 1], data[split + 2:]
    if not sigs:
        raise MalformedNoteError("a signed note has at least one signature")
    return Note(text, parse_signature_lines(sigs))


def sign_note(text: str, name: str, private_key: Ed25519PrivateKey) -> NoteSignature:
    """An Ed25519 note signature (type 0x01) over ``text``."""
    _check_text_chars(text)
    if not text.endswith("\n"):
        raise MalformedNoteError("note text ends with a newline")
    return NoteSignature(check_key_name(name), key_id(name, SIG_ED25519, private_key.public_key()),
                         private_key.sign(text.encode()))


def cosignature_message(text: str, timestamp: int) -> bytes:
    """What a cosignature/v1 signs: the header line, the time line, then the checkpoint text."""
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


def cosign(text: str, name: str, private_key: Ed25519PrivateKey, timestamp: int) -> NoteSignature:
    """A timestamped Ed25519 cosignature (type 0x04) over checkpoint ``text``."""
    if not 0 < timestamp <= _MAX_TIMESTAMP:
        raise MalformedNoteError(f"cosignature timestamp {timestamp} is out of range")
    sig = private_key.sign(cosignature_message(text, timestamp))
    return NoteSignature(check_key_name(name), key_id(name, SIG_COSIGNATURE_V1, private_key.public_key()),
                         timestamp.to_bytes(8, "big") + sig)


@dataclass(frozen=True)
class VerifiedSignature:
    vkey: Vkey
    signature: NoteSignature
    timestamp: int | None  # cosignatures only


def _verify_one(vkey: Vkey, sig: NoteSignature, text: str) -> VerifiedSignature:
    try:
        if vkey.sig_type == SIG_ED25519:
            vkey.public_key.verify(sig.signature, text.encode())
            return VerifiedSignature(vkey, sig, None)
        if len(sig.signature) != 72:
            raise InvalidSignature
        ts = int.from_bytes(sig.signature[:8], "big")
        if ts > _MAX_TIMESTAMP:
            raise InvalidSignature
        vkey.public_key.verify(sig.signature[8:], cosignature_message(text, ts))
        return VerifiedSignature(vkey, sig, ts)
    except InvalidSignature:
        raise NoteSignatureError(f"the signature by {vkey.name} ({vkey.key_id.hex()}) does not verify") from None


def verify_note(note: Note, verifiers: Sequence[Vkey]) -> list[VerifiedSignature]:
    """Check ``note`` against the trusted ``verifiers`` as signed-note says: signatures from unknown keys are
    ignored, one from a known key that fails rejects the note, and at least one known signature must verify."""
    known = {(v.name, v.key_id): v for v in verifiers}
    verified = [_verify_one(known[(s.name, s.key_id)], s, note.text) for s in note.signatures
                if (s.name, s.key_id) in known]
    if not verified:
        names = ", ".join(sorted({v.name for v in verifiers})) or "none"
        raise NoteSignatureError(f"the note has no signature from a trusted key (trusted: {names})")
    return verified


# --- checkpoints --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointBody:
    """The text of a tlog-checkpoint: origin, tree size, root hash, extension lines."""

    origin: str
    tree_size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        return "".join(x + "\n" for x in (self.origin, str(self.tree_size), b64(self.root), *self.extensions))


def parse_checkpoint(text: str) -> CheckpointBody:
    if not text.endswith("\n"):
        raise MalformedNoteError("checkpoint text ends with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or any(not line for line in lines):
        raise MalformedNoteError("a checkpoint has at least three non-empty lines: origin, tree size, root hash")
    origin, size_text, root64, *ext = lines
    if not size_text.isascii() or not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise MalformedNoteError(f"checkpoint tree size {size_text!r} is not a decimal without leading zeros")
    size = int(size_text)
    if size > _MAX_TIMESTAMP:
        raise MalformedNoteError("checkpoint tree size is too large")
    root = b64decode_strict(root64, "the checkpoint root hash")
    if len(root) != HASH_SIZE:
        raise MalformedNoteError("the checkpoint root hash is not 32 bytes")
    return CheckpointBody(origin, size, root, tuple(ext))
