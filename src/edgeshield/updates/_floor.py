"""The device's version floor: the lowest model version it will ever run again, raised only on commit.

``Floor`` is the protocol; :class:`SignedFileFloor` keeps the floor in a local state file signed with a
device-local Ed25519 key (created 0600); ``edgeshield.hardware.TpmCounterFloor`` keeps it in a TPM NV counter.
What each can and cannot stop is in docs/updates.md ("The floor").
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeshield._io import atomic_write_bytes
from edgeshield.errors import EdgeShieldError, OutputExistsError
from edgeshield.keys import key_id, load_private_key
from edgeshield.updates._errors import FloorKeyError, FloorStateError, FloorViolationError

FORMAT = "edgeshield.update-floor"
FORMAT_VERSION = 1
MAX_VERSION = 2**63 - 1
_MAX_STATE_BYTES = 4096


@runtime_checkable
class Floor(Protocol):
    """A monotonic version floor. ``read`` raises :class:`FloorStateError` when the state cannot be trusted;
    ``raise_to`` never lowers it (a lower version is a :class:`FloorViolationError`)."""

    def read(self) -> int: ...

    def raise_to(self, version: int) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class FloorState:
    """The signed content of the state file; ``counter`` counts writes, so two states never sign the same bytes."""

    floor: int
    counter: int
    key_id: str
    updated: str

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "floor": self.floor, "counter": self.counter,
                "key_id": self.key_id, "updated": self.updated}

    @classmethod
    def from_dict(cls, d: object) -> FloorState:
        if not isinstance(d, dict) or set(d) != {"format", "version", "floor", "counter", "key_id", "updated"}:
            raise FloorStateError("floor state has the wrong fields")
        if d["format"] != FORMAT or d["version"] != FORMAT_VERSION:
            raise FloorStateError("floor state is not an EdgeShield floor state (version 1)")
        for name in ("floor", "counter"):
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_VERSION:
                raise FloorStateError(f"floor state {name} is not a whole number in range")
        if not isinstance(d["key_id"], str) or not isinstance(d["updated"], str):
            raise FloorStateError("floor state key_id and updated must be strings")
        return cls(d["floor"], d["counter"], d["key_id"], d["updated"])


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SignedFileFloor:
    """The floor in ``state_path``, signed by the Ed25519 key at ``key_path``.

    A missing state file is an error, never floor 0 (``create`` makes the first one): deleting it must not reset
    the floor. Editing it breaks the signature; a state signed by another device's key is refused.
    """

    def __init__(self, state_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> None:
        self.state_path = Path(state_path)
        self.key_path = Path(key_path)
        self._key: Ed25519PrivateKey | None = None

    @classmethod
    def create(cls, state_path: str | os.PathLike[str], key_path: str | os.PathLike[str],
               *, floor: int = 0) -> SignedFileFloor:
        """Make a new key (0600) and a state at ``floor``; refuses to replace either."""
        self = cls(state_path, key_path)
        for p in (self.state_path, self.key_path):
            if p.exists():
                raise OutputExistsError(f"refusing to overwrite the floor's {p.name}: {p}")
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        atomic_write_bytes(self.key_path, pem, mode=0o600, overwrite=False)
        self._key = key
        self._write(FloorState(_check_version(floor), 0, key_id(key.public_key()), _now()))
        return self

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            if not self.key_path.is_file():
                raise FloorKeyError(f"the floor's signing key is missing: {self.key_path}")
            try:
                key = load_private_key(self.key_path)
            except EdgeShieldError as exc:
                raise FloorKeyError(f"the floor's signing key is unreadable: {exc}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise FloorKeyError(f"the floor's signing key is not an Ed25519 key: {self.key_path}")
            self._key = key
        return self._key

    def state(self) -> FloorState:
        """The verified state; :class:`FloorStateError` if it is missing, altered or another key's."""
        key = self._signing_key()
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            raise FloorStateError(f"the floor state is missing ({self.state_path}): it is never recreated at 0; "
                                  "re-provision the device") from None
        if len(raw) > _MAX_STATE_BYTES:
            raise FloorStateError("the floor state file is too large")
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or set(doc) != {"state", "signature"}:
                raise ValueError("fields")
            signed, sig = doc["state"], base64.b64decode(doc["signature"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise FloorStateError(f"the floor state is not valid JSON with a signature: {self.state_path}") from None
        state = FloorState.from_dict(signed)
        if state.key_id != key_id(key.public_key()):
            raise FloorStateError("the floor state was signed by another device's floor key")
        try:
            key.public_key().verify(sig, canonical(state.to_dict()))
        except InvalidSignature:
            raise FloorStateError("the floor state's signature does not verify: it was edited") from None
        return state

    def read(self) -> int:
        return self.state().floor

    def raise_to(self, version: int) -> None:
        current = self.state()
        version = _check_version(version)
        if version < current.floor:
            raise FloorViolationError(f"refusing to lower the floor from {current.floor} to {version}")
        if version == current.floor:
            return
        self._write(FloorState(version, current.counter + 1, current.key_id, _now()))

    def _write(self, state: FloorState) -> None:
        sig = self._signing_key().sign(canonical(state.to_dict()))
        doc = {"state": state.to_dict(), "signature": base64.b64encode(sig).decode()}
        atomic_write_bytes(self.state_path, canonical(doc) + b"\n", mode=0o600)

    def describe(self) -> dict[str, Any]:
        state = self.state()
        return {"kind": "signed-file", "floor": state.floor, "writes": state.counter, "key_id": state.key_id,
                "updated": state.updated, "state_file": str(self.state_path)}


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise FloorViolationError(f"a model version must be a whole number in 0..2**63-1, got {version!r}")
    return version
