"""How audit entries and checkpoints are encoded and hashed: pure functions over values and bytes.

An entry's *leaf* (its Merkle tree leaf, RFC 9162) is the canonical JSON of
``{"actor", "data", "kind", "seq", "ts", "v": 1}`` (sorted keys, no spaces, ASCII-only, no NaN/Infinity), and its
chain hash is ``SHA-256("edgeshield/audit/entry/v1" || 0x00 || prev_hash || leaf)`` with 32 zero bytes before the
first entry. A checkpoint's text is a C2SP tlog-checkpoint note body (origin, tree size, base64 root, one per line);
its signature is Ed25519 over exactly that text, as in a C2SP signed note.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeshield.errors import InvalidArgumentError

GENESIS_HASH = bytes(32)
ENTRY_DOMAIN = b"edgeshield/audit/entry/v1\x00"
ORIGIN_PREFIX = "edgeshield/audit/"
UNSIGNED_ORIGIN = ORIGIN_PREFIX + "unsigned"
CHECKPOINT_KIND = "audit.checkpoint"  # the chained copy of every checkpoint
MIGRATED_KIND = "audit.migrated"  # a schema 1 log was upgraded here
RESERVED_PREFIX = "audit."  # kinds only the log itself writes
LOG_ACTOR = "audit"
MAX_DATA_BYTES = 16 * 1024
MAX_DEPTH = 16
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*(?:[.-][a-z0-9_]+)*$")
_MAX_KIND, _MAX_ACTOR = 64, 128


def utc_now() -> str:
    """The entry timestamp: UTC, ISO 8601, microseconds, ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps(..., ensure_ascii=True) uses for a str


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, ASCII escapes, no NaN: one text per value (an encoder built once, not per call)."""
    return _CANONICAL.encode(value)


# --- validation of what callers log -------------------------------------------------------------------------------
def check_kind(kind: object) -> str:
    """Event kinds are short dotted lowercase names such as ``inference.request`` or ``bundle.load``."""
    if not isinstance(kind, str) or len(kind) > _MAX_KIND or not _KIND_RE.match(kind):
        raise InvalidArgumentError(
            f"invalid audit kind {kind!r}: use up to {_MAX_KIND} lowercase letters, digits and '_', "
            "in parts joined by '.' or '-' (e.g. 'inference.request')"
        )
    return kind


def check_caller_kind(kind: object) -> str:
    """A kind a caller may append: valid, and not one of the ``audit.*`` kinds the log writes itself."""
    checked = check_kind(kind)
    if checked.startswith(RESERVED_PREFIX):
        raise InvalidArgumentError(f"audit kind {checked!r} is reserved: kinds starting with {RESERVED_PREFIX!r} "
                                   "are written by the log itself")
    return checked


def check_actor(actor: object) -> str:
    """Actors are who caused the event (a client id, a user, ``system``): printable, no surrounding spaces."""
    if (
        not isinstance(actor, str)
        or not actor
        or len(actor) > _MAX_ACTOR
        or not actor.isprintable()
        or actor.strip() != actor
    ):
        raise InvalidArgumentError(
            f"invalid audit actor {actor!r}: use 1-{_MAX_ACTOR} printable characters without surrounding spaces"
        )
    return actor


def _check_json(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidArgumentError(f"audit data nested deeper than {MAX_DEPTH} levels at {where}")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"audit data {where} is {value}: only finite numbers are JSON")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(f"audit data {where} has a non-string key {key!r}")
            _check_json(item, f"{where}[{key!r}]", depth + 1)
        return
    raise InvalidArgumentError(
        f"audit data {where} is a {type(value).__name__}, which is not JSON: log a digest or a summary, "
        "never raw model inputs"
    )


_SCALARS = (str, int, bool, type(None))


def _flat(data: dict[Any, Any]) -> bool:
    """A dict of string keys to plain scalars (the server's entries): valid JSON as it is, and ``dict(data)`` is
    exactly what its canonical text decodes to, so neither the recursive check nor a re-parse is needed."""
    for key, value in data.items():
        t = type(value)
        if type(key) is not str or (t not in _SCALARS and not (t is float and math.isfinite(value))):
            return False
    return True


def canonical_data(data: object) -> tuple[str, dict[str, Any]]:
    """Validate ``data`` and return its canonical JSON text and the value that text decodes to."""
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"audit data must be a JSON object (a dict), got {type(data).__name__}")
    flat = type(data) is dict and _flat(data)
    if not flat:
        _check_json(data, "data", 0)
    text = canonical_json(data)
    if len(text) > MAX_DATA_BYTES:
        raise InvalidArgumentError(
            f"audit data is {len(text)} bytes as JSON, over the {MAX_DATA_BYTES}-byte limit: log digests, not payloads"
        )
    return text, dict(data) if flat else json.loads(text)


# --- hashing ------------------------------------------------------------------------------------------------------
def entry_leaf(seq: int, ts: str, kind: str, actor: str, data: Any) -> bytes:
    """The canonical entry encoding: the Merkle leaf and the chained content."""
    return canonical_json({"actor": actor, "data": data, "kind": kind, "seq": seq, "ts": ts, "v": 1}).encode()


def entry_leaf_text(seq: int, ts: str, kind: str, actor: str, data_text: str) -> bytes:
    """:func:`entry_leaf` from the data's canonical JSON text, without decoding and re-encoding it: the same bytes
    (the keys in sorted order, the same separators and ASCII escapes), at a fraction of the cost."""
    return (f'{{"actor":{_encode_str(actor)},"data":{data_text},"kind":{_encode_str(kind)},"seq":{int(seq)},'
            f'"ts":{_encode_str(ts)},"v":1}}').encode()


def chain_hash(prev_hash: bytes, leaf: bytes) -> bytes:
    return hashlib.sha256(ENTRY_DOMAIN + prev_hash + leaf).digest()


@dataclass(frozen=True)
class Entry:
    """One committed audit entry."""

    seq: int
    ts: str
    kind: str
    actor: str
    data: dict[str, Any]
    prev_hash: bytes
    entry_hash: bytes

    def leaf(self) -> bytes:
        return entry_leaf(self.seq, self.ts, self.kind, self.actor, self.data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "actor": self.actor,
            "data": self.data,
            "prev_hash": self.prev_hash.hex(),
            "entry_hash": self.entry_hash.hex(),
        }


# --- checkpoints --------------------------------------------------------------------------------------------------
def key_id(public_key: Ed25519PublicKey) -> str:
    """The key id EdgeShield uses everywhere: SHA-256 of the DER SubjectPublicKeyInfo, first 16 hex digits."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def origin_for(key_id_: str | None) -> str:
    """The checkpoint origin line: one log identity per device signing key."""
    return ORIGIN_PREFIX + key_id_ if key_id_ else UNSIGNED_ORIGIN


def checkpoint_text(origin: str, tree_size: int, root: bytes) -> str:
    """The C2SP tlog-checkpoint note text: origin, tree size, base64 root hash, each ending in a newline."""
    return f"{origin}\n{tree_size}\n{base64.b64encode(root).decode()}\n"


def note_key_hash(name: str, public_key: Ed25519PublicKey) -> bytes:
    """C2SP signed-note key ID: SHA-256(name || 0x0A || 0x01 || 32-byte Ed25519 key)[:4]."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n\x01" + raw).digest()[:4]


def checkpoint_entry_data(tree_size: int, root: bytes, key_id_: str | None, signature: bytes | None) -> dict[str, Any]:
    """The data of a checkpoint's chained ``audit.checkpoint`` entry: the checkpoint itself, base64 as in its note."""
    return {"key_id": key_id_, "root": base64.b64encode(root).decode(), "tree_size": tree_size,
            "signature": base64.b64encode(signature).decode() if signature is not None else None}


@dataclass(frozen=True)
class Checkpoint:
    """A commitment to the first ``tree_size`` entries; ``signature`` is Ed25519 over :meth:`text`.

    ``ts`` is when the checkpoint was made, kept for people; it is not signed (the root already commits to every
    covered entry's own timestamp).
    """

    tree_size: int
    root: bytes
    ts: str
    key_id: str | None
    signature: bytes | None

    @property
    def origin(self) -> str:
        return origin_for(self.key_id)

    def text(self) -> str:
        return checkpoint_text(self.origin, self.tree_size, self.root)

    def signed_note(self, public_key: Ed25519PublicKey) -> str:
        """The checkpoint as a C2SP signed note, checkable by any tlog-checkpoint client that trusts the key."""
        if self.signature is None:
            raise InvalidArgumentError(f"checkpoint at tree size {self.tree_size} is unsigned")
        sig = base64.b64encode(note_key_hash(self.origin, public_key) + self.signature).decode()
        return f"{self.text()}\n\u2014 {self.origin} {sig}\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "ts": self.ts,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode() if self.signature is not None else None,
            "text": self.text(),
        }
