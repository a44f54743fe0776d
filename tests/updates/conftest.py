"""Fixtures for the updater: real bundles of the digits model, a real TUF repository served over a real socket,
and a provisioned device directory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _repo_http import Server, serve_directory

from edgeshield import bundles, keys, updates
from edgeshield.models import digits_input_spec, digits_model_path

MODEL = "digits"


@dataclass(frozen=True)
class Keys:
    dir: Path
    owner_priv: keys.OwnerPrivateKey
    owner_pub: keys.OwnerPublicKey
    device_priv: keys.DevicePrivateKey
    device_pub: keys.DevicePublicKey
    other_device_priv: keys.DevicePrivateKey
    other_device_pub: keys.DevicePublicKey


@pytest.fixture(scope="session")
def ukeys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("ukeys")
    keys.init_keys(d)
    keys.add_device(d, "other")
    return Keys(d, keys.load_owner_private_key(d / "owner.key"), keys.load_owner_public_key(d / "owner.pub"),
                keys.load_device_private_key(d / "device.key"), keys.load_device_public_key(d / "device.pub"),
                keys.load_device_private_key(d / "other.key"), keys.load_device_public_key(d / "other.pub"))


@dataclass(frozen=True)
class Bundles:
    dir: Path
    spec: Path
    other_owner_pub: keys.OwnerPublicKey

    def v(self, version: int) -> Path:
        return self.dir / f"digits-v{version}.esb"


@pytest.fixture(scope="session")
def ubundles(ukeys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """digits bundles at versions 1..3 for the device (and v9 for another device, v8 signed by another owner)."""
    d = tmp_path_factory.mktemp("ubundles")
    for version in (1, 2, 3):
        bundles.protect(digits_model_path(), d / f"digits-v{version}.esb", signing_key=ukeys.owner_priv,
                        recipients=[ukeys.device_pub], model_version=version)
    bundles.protect(digits_model_path(), d / "digits-v9.esb", signing_key=ukeys.owner_priv,
                    recipients=[ukeys.other_device_pub], model_version=9)
    from cryptography.hazmat.primitives.asymmetric import ec

    other_owner = ec.generate_private_key(ec.SECP256R1())
    bundles.protect(digits_model_path(), d / "digits-v8.esb", signing_key=other_owner,
                    recipients=[ukeys.device_pub], model_version=8)
    spec = d / "input-spec.json"
    spec.write_text(digits_input_spec().to_json())
    return Bundles(d, spec, other_owner.public_key())


@dataclass(frozen=True)
class Fleet:
    """An owner's repository (with its keys) served over HTTP, and one provisioned device."""

    repo: Path
    repo_keys: Path
    device_dir: Path
    server: Server
    keys: Keys
    bundles: Bundles

    def publish(self, version: int, **kwargs: object) -> updates.PublishResult:
        kwargs.setdefault("owner_key", self.keys.owner_pub)
        kwargs.setdefault("input_spec", self.bundles.spec)
        bundle = kwargs.pop("bundle", self.bundles.v(version))
        return updates.publish(self.repo, self.repo_keys, bundle, model=MODEL, **kwargs)  # type: ignore[arg-type]

    def updater(self, **kwargs: object) -> updates.DeviceUpdater:
        return updates.DeviceUpdater(self.device_dir, device_key=self.keys.device_priv, **kwargs)  # type: ignore[arg-type]

    def snapshot_repo(self, name: str) -> Path:
        copy = self.repo.parent / name
        shutil.copytree(self.repo, copy)
        return copy


@pytest.fixture
def fleet(tmp_path: Path, ukeys: Keys, ubundles: Bundles) -> Iterator[Fleet]:
    repo, repo_keys = tmp_path / "repo", tmp_path / "repo-keys"
    updates.init_repository(repo, repo_keys)
    with serve_directory(repo) as server:
        device = tmp_path / "device"
        updates.init_device(device, root=updates.repository_root(repo),
                            owner_key_pem=(ukeys.dir / "owner.pub").read_bytes(), model=MODEL, url=server.url)
        yield Fleet(repo, repo_keys, device, server, ukeys, ubundles)
