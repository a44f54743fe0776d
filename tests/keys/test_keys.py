"""Key directories: permissions, passphrases, ids and refusals."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edgeshield import keys
from edgeshield.errors import (
    InvalidArgumentError,
    KeyFileError,
    NotAFileError,
    OutputExistsError,
    PassphraseError,
    PathNotFoundError,
)


def test_init_creates_pairs_with_private_keys_0600(tmp_path: Path) -> None:
    infos = keys.init_keys(tmp_path / "k")
    assert [(i.name, i.kind) for i in infos] == [("owner", "owner-signing"), ("device", "device-agreement")]
    for name in ("owner", "device"):
        assert stat.S_IMODE((tmp_path / "k" / f"{name}.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "k" / f"{name}.pub").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    owner = keys.load_owner_private_key(tmp_path / "k" / "owner.key")
    assert owner.curve.name == "secp256r1"
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "k" / "owner.key").read_bytes()


def test_key_id_is_sha256_of_the_spki(tmp_path: Path) -> None:
    keys.init_keys(tmp_path)
    pub = keys.load_owner_public_key(tmp_path / "owner.pub")
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert keys.key_id(pub) == hashlib.sha256(der).hexdigest()[:16]
    listed = {k.name: k.key_id for k in keys.list_keys(tmp_path)}
    assert listed["owner"] == keys.key_id(pub)


def test_passphrase_protected_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ES_PASS", "correct horse")
    keys.init_keys(tmp_path, passphrase=keys.passphrase_from_env("ES_PASS"))
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "owner.key").read_bytes()
    assert all(k.encrypted for k in keys.list_keys(tmp_path))
    keys.load_owner_private_key(tmp_path / "owner.key", b"correct horse")
    with pytest.raises(PassphraseError, match="encrypted"):
        keys.load_owner_private_key(tmp_path / "owner.key")
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        keys.load_device_private_key(tmp_path / "device.key", b"wrong")
    with pytest.raises(PassphraseError):
        keys.passphrase_from_env("ES_UNSET_VARIABLE")


def test_devices_are_added_and_listed(tmp_path: Path) -> None:
    keys.init_keys(tmp_path)
    keys.add_device(tmp_path, "gateway-7")
    names = [k.name for k in keys.list_keys(tmp_path)]
    assert names == ["owner", "device", "gateway-7"]
    for bad in ("owner", "../escape", "", "a b"):
        with pytest.raises(InvalidArgumentError):
            keys.add_device(tmp_path, bad)
    with pytest.raises(OutputExistsError):
        keys.add_device(tmp_path, "gateway-7")


def test_existing_keys_are_never_overwritten(tmp_path: Path) -> None:
    keys.init_keys(tmp_path)
    before = (tmp_path / "owner.key").read_bytes()
    with pytest.raises(OutputExistsError):
        keys.init_keys(tmp_path)
    assert (tmp_path / "owner.key").read_bytes() == before


def test_wrong_key_types_and_bad_files(tmp_path: Path) -> None:
    keys.init_keys(tmp_path)
    with pytest.raises(KeyFileError):
        keys.load_owner_private_key(tmp_path / "device.key")
    with pytest.raises(KeyFileError):
        keys.load_device_public_key(tmp_path / "owner.pub")
    (tmp_path / "junk.pub").write_bytes(b"not a key")
    with pytest.raises(KeyFileError):
        keys.load_owner_public_key(tmp_path / "junk.pub")
    with pytest.raises(PathNotFoundError):
        keys.load_owner_public_key(tmp_path / "missing.pub")
    with pytest.raises(NotAFileError):
        keys.load_owner_public_key(tmp_path)
    with pytest.raises(PathNotFoundError):
        keys.list_keys(tmp_path / "nope")
