"""The owner's side: a TUF repository of model updates, as plain files any HTTP server can serve.

    init_repository("repo", "repo-keys")                       # root, targets, snapshot, timestamp; keys 0600
    publish("repo", "repo-keys", "model-v7.esb", owner_key=owner_pub, model="digits",
            detector="detector.json", input_spec="spec.json")  # one update: three targets bound together
    resign_timestamp("repo", "repo-keys")                      # on a schedule (the timestamp expires in a day)

Layout: ``REPO/metadata/`` holds ``N.root.json``, ``N.targets.json``, ``N.snapshot.json`` and ``timestamp.json``
(consistent snapshots, so a device reading while the owner publishes still sees one consistent set: the new
files appear first and ``timestamp.json`` is replaced last, atomically); ``REPO/targets/`` holds the parts under
hash-prefixed names. The role keys live in a separate directory that is never served. Needs ``tuf``
(``pip install 'edgeshield[update]'``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeshield._io import atomic_write_bytes, atomic_writer, check_readable_file
from edgeshield.errors import InvalidArgumentError, KeyFileError, MissingDependencyError, OutputExistsError
from edgeshield.keys import OwnerPublicKey, load_private_key
from edgeshield.updates._errors import UpdateConfigError
from edgeshield.updates._index import UpdateIndex, check_model_name, index_path, part_path

if TYPE_CHECKING:
    from edgeshield.updates._tuf import CryptoSigner, Metadata, MetaFile, Signed, TargetFile

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY = {"root": _dt.timedelta(days=365), "targets": _dt.timedelta(days=365),
                  "snapshot": _dt.timedelta(days=30), "timestamp": _dt.timedelta(days=1)}
SNAPSHOT_RENEW_WITHIN = _dt.timedelta(days=7)


def _tuf() -> None:
    try:
        found = importlib.util.find_spec("tuf") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependencyError("TUF repositories need python-tuf: pip install 'edgeshield[update]'")


@dataclass(frozen=True)
class PublishResult:
    model: str
    model_version: int
    bundle_id: str
    targets: dict[str, str]
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    timestamp_expires: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_version": self.model_version, "bundle_id": self.bundle_id,
                "targets": dict(self.targets), "targets_version": self.targets_version,
                "snapshot_version": self.snapshot_version, "timestamp_version": self.timestamp_version,
                "timestamp_expires": self.timestamp_expires}


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


def _iso(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- keys ------------------------------------------------------------------------------------------------------
def _key_path(keys_dir: Path, role: str) -> Path:
    return keys_dir / f"{role}.key"


def _signer(keys_dir: Path, role: str, passphrase: bytes | None) -> CryptoSigner:
    from edgeshield.updates._tuf import CryptoSigner

    path = _key_path(keys_dir, role)
    if not path.is_file():
        raise KeyFileError(f"the repository's {role} key is missing: {path}")
    key = load_private_key(path, passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path} is not an ECDSA P-256 private key")
    return CryptoSigner(key)


# --- metadata files ----------------------------------------------------------------------------------------------
def _meta_dir(repo: Path) -> Path:
    return repo / "metadata"


def _serialize(md: Metadata[Any]) -> bytes:
    from edgeshield.updates._tuf import JSONSerializer

    return md.to_bytes(JSONSerializer(compact=False))


def _sign(md: Metadata[Any], signer: CryptoSigner) -> bytes:
    md.signatures.clear()
    md.sign(signer, append=True)
    return _serialize(md)


def _load(repo: Path, name: str) -> Metadata[Any]:
    from edgeshield.updates._tuf import Metadata

    path = _meta_dir(repo) / name
    if not path.is_file():
        raise UpdateConfigError(f"not an EdgeShield update repository (no metadata/{name}): {repo}")
    try:
        return Metadata.from_bytes(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - tuf raises several untyped deserialisation errors
        raise UpdateConfigError(f"repository metadata {path} is unreadable: {exc}") from None


def _write_meta(repo: Path, name: str, data: bytes) -> None:
    atomic_write_bytes(_meta_dir(repo) / name, data)


def init_repository(repo: str | os.PathLike[str], keys_dir: str | os.PathLike[str], *,
                    passphrase: bytes | None = None) -> dict[str, str]:
    """Create the role keys (ECDSA P-256, 0600) in ``keys_dir`` and version 1 of every role in ``repo``.

    Returns each role's key id. Refuses an existing repository or existing keys.
    """
    _tuf()
    from edgeshield.updates._tuf import CryptoSigner, Metadata, Root, Snapshot, Targets, Timestamp

    repo_p, keys_p = Path(repo), Path(keys_dir)
    if _meta_dir(repo_p).exists():
        raise OutputExistsError(f"an update repository already exists: {repo_p}")
    for role in ROLES:
        if _key_path(keys_p, role).exists():
            raise OutputExistsError(f"refusing to overwrite the repository key {_key_path(keys_p, role)}")
    if keys_p.resolve() == repo_p.resolve() or keys_p.resolve().is_relative_to(repo_p.resolve()):
        raise InvalidArgumentError("the role keys must not live inside the repository (it is served as it is)")
    keys_p.mkdir(parents=True, exist_ok=True, mode=0o700)
    (repo_p / "targets").mkdir(parents=True, exist_ok=True)
    _meta_dir(repo_p).mkdir(parents=True, exist_ok=True)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    signers: dict[str, CryptoSigner] = {}
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        atomic_write_bytes(_key_path(keys_p, role), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption), mode=0o600, overwrite=False)
        signers[role] = CryptoSigner(key)
    now = _now()
    root = Root(expires=now + DEFAULT_EXPIRY["root"], consistent_snapshot=True)
    for role in ROLES:
        root.add_key(signers[role].public_key, role)
    targets_md = Metadata(Targets(expires=now + DEFAULT_EXPIRY["targets"]))
    targets_raw = _sign(targets_md, signers["targets"])
    snapshot = Snapshot(expires=now + DEFAULT_EXPIRY["snapshot"])
    snapshot.meta["targets.json"] = _metafile(1, targets_raw)
    snapshot_raw = _sign(Metadata(snapshot), signers["snapshot"])
    timestamp = Timestamp(expires=now + DEFAULT_EXPIRY["timestamp"], snapshot_meta=_metafile(1, snapshot_raw))
    root_raw = _sign(Metadata(root), signers["root"])
    _write_meta(repo_p, "1.targets.json", targets_raw)
    _write_meta(repo_p, "1.snapshot.json", snapshot_raw)
    _write_meta(repo_p, "1.root.json", root_raw)
    _write_meta(repo_p, "root.json", root_raw)  # what devices are provisioned with (never fetched by them)
    _write_meta(repo_p, "timestamp.json", _sign(Metadata(timestamp), signers["timestamp"]))
    return {role: signers[role].public_key.keyid for role in ROLES}


def _metafile(version: int, raw: bytes) -> MetaFile:
    from edgeshield.updates._tuf import MetaFile

    return MetaFile(version=version, length=len(raw), hashes={"sha256": hashlib.sha256(raw).hexdigest()})


def _current(repo: Path) -> tuple[Metadata[Any], Metadata[Any], Metadata[Any]]:
    """The repository's current timestamp, snapshot and targets, following the chain the devices follow."""
    timestamp = _load(repo, "timestamp.json")
    snapshot = _load(repo, f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
    targets = _load(repo, f"{snapshot.signed.meta['targets.json'].version}.targets.json")
    return timestamp, snapshot, targets


def _bump(signed: Signed, expiry: _dt.timedelta) -> None:
    signed.version += 1
    signed.expires = _now() + expiry


def _publish_chain(repo: Path, keys_dir: Path, passphrase: bytes | None, snapshot: Metadata[Any],
                   targets_raw: bytes | None, targets_version: int, *,
                   timestamp_expiry: _dt.timedelta) -> tuple[int, int, str]:
    """Write a new snapshot (if targets changed or it is due) and a new timestamp, in the order devices need."""
    timestamp, _, _ = _current(repo)
    snap = snapshot.signed
    if targets_raw is not None:
        snap.meta["targets.json"] = _metafile(targets_version, targets_raw)
    new_snapshot = targets_raw is not None or snap.expires - _now() < SNAPSHOT_RENEW_WITHIN
    if new_snapshot:
        _bump(snap, DEFAULT_EXPIRY["snapshot"])
        snapshot_raw = _sign(snapshot, _signer(keys_dir, "snapshot", passphrase))
        _write_meta(repo, f"{snap.version}.snapshot.json", snapshot_raw)
        timestamp.signed.snapshot_meta = _metafile(snap.version, snapshot_raw)
    _bump(timestamp.signed, timestamp_expiry)
    _write_meta(repo, "timestamp.json", _sign(timestamp, _signer(keys_dir, "timestamp", passphrase)))
    return snap.version, timestamp.signed.version, _iso(timestamp.signed.expires)


def resign_timestamp(repo: str | os.PathLike[str], keys_dir: str | os.PathLike[str], *,
                     passphrase: bytes | None = None,
                     expiry: _dt.timedelta = DEFAULT_EXPIRY["timestamp"]) -> tuple[int, str]:
    """Re-sign the timestamp (and the snapshot when it expires within a week); returns its version and expiry.

    Run it on a schedule shorter than ``expiry``: a device refuses a repository whose timestamp expired (that is
    what stops a freeze attack), so a repository nobody re-signs freezes every device on purpose."""
    _tuf()
    repo_p = Path(repo)
    _, snapshot, _ = _current(repo_p)
    _, ts_version, ts_expires = _publish_chain(repo_p, Path(keys_dir), passphrase, snapshot, None, 0,
                                               timestamp_expiry=_positive(expiry))
    return ts_version, ts_expires


def _positive(expiry: _dt.timedelta) -> _dt.timedelta:
    if expiry <= _dt.timedelta(0):
        raise InvalidArgumentError("an expiry must be positive")
    return expiry


def _copy_target(repo: Path, path: str, source: Path) -> TargetFile:
    """Copy ``source`` to its hash-prefixed name (never over an existing file: content-addressed)."""
    from edgeshield.updates._tuf import TargetFile

    info = TargetFile.from_file(path, str(source), ["sha256"])
    directory, _, name = path.rpartition("/")
    dest = repo / "targets" / directory / f"{info.hashes['sha256']}.{name}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        with atomic_writer(dest) as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    return info


def published(repo: str | os.PathLike[str], model: str) -> UpdateIndex | None:
    """The update the repository currently offers for ``model`` (read from the owner's own files)."""
    _tuf()
    repo_p = Path(repo)
    _, _, targets = _current(repo_p)
    info = targets.signed.targets.get(index_path(check_model_name(model)))
    if info is None:
        return None
    directory, _, name = info.path.rpartition("/")
    raw = (repo_p / "targets" / directory / f"{info.hashes['sha256']}.{name}").read_bytes()
    return UpdateIndex.decode(raw)


def publish(
    repo: str | os.PathLike[str],
    keys_dir: str | os.PathLike[str],
    bundle: str | os.PathLike[str],
    *,
    owner_key: OwnerPublicKey,
    model: str,
    detector: str | os.PathLike[str] | None = None,
    input_spec: str | os.PathLike[str] | None = None,
    passphrase: bytes | None = None,
    timestamp_expiry: _dt.timedelta = DEFAULT_EXPIRY["timestamp"],
    allow_lower_version: bool = False,
) -> PublishResult:
    """Publish ``bundle`` (checked against ``owner_key``) with its detector file and input spec as one update.

    The model version is the bundle's signed ``model_version`` (``protect --model-version``); a version not above
    the one published for ``model`` is refused unless ``allow_lower_version`` (which only simulates a repository
    under an attacker's control in tests: devices refuse it anyway, below their floor).
    """
    _tuf()
    from edgeshield import bundles

    repo_p, keys_p = Path(repo), Path(keys_dir)
    check_model_name(model)
    manifest = bundles.verify(bundle, owner_key)
    files: dict[str, Path] = {"bundle": check_readable_file(bundle, what="bundle")}
    det = None
    if detector is not None:
        from edgeshield.adversarial import DetectorFile

        det = DetectorFile.load(detector)
        det.check_model(manifest.model_sha256)
        files["detector"] = Path(detector)
    if input_spec is not None:
        from edgeshield.adversarial import InputSpec

        spec = InputSpec.load(input_spec)
        if det is not None and det.input_spec != spec:
            raise InvalidArgumentError("the input spec differs from the one the detector file was calibrated with")
        files["input_spec"] = Path(input_spec)
    version = manifest.model_version
    current = published(repo_p, model)
    if current is not None and version <= current.model_version and not allow_lower_version:
        raise InvalidArgumentError(f"{model} version {current.model_version} is already published; the bundle's "
                                   f"model_version ({version}) must be higher (protect --model-version)")
    index = UpdateIndex(model, version, manifest.bundle_id, manifest.model_sha256,
                        {part: part_path(model, version, part) for part in files})
    _, snapshot, targets = _current(repo_p)
    for part, source in files.items():
        info = _copy_target(repo_p, index.targets[part], source)
        info.unrecognized_fields["custom"] = index.custom(part)
        targets.signed.targets[info.path] = info
    index_file = repo_p / "targets" / f".{model}.update.json.tmp"
    atomic_write_bytes(index_file, index.encode())
    try:
        targets.signed.targets[index_path(model)] = _copy_target(repo_p, index_path(model), index_file)
    finally:
        index_file.unlink(missing_ok=True)
    _bump(targets.signed, DEFAULT_EXPIRY["targets"])
    targets_raw = _sign(targets, _signer(keys_p, "targets", passphrase))
    _write_meta(repo_p, f"{targets.signed.version}.targets.json", targets_raw)
    snap_v, ts_v, ts_expires = _publish_chain(repo_p, keys_p, passphrase, snapshot, targets_raw,
                                              targets.signed.version, timestamp_expiry=_positive(timestamp_expiry))
    return PublishResult(model, version, manifest.bundle_id, dict(index.targets), targets.signed.version, snap_v,
                         ts_v, ts_expires)


def repository_root(repo: str | os.PathLike[str]) -> bytes:
    """The newest root metadata: the trust anchor a device is provisioned with (``update init --root``)."""
    path = _meta_dir(Path(repo)) / "root.json"
    try:
        raw = path.read_bytes()
        json.loads(raw)
    except (OSError, ValueError):
        raise UpdateConfigError(f"not an EdgeShield update repository (no metadata/root.json): {repo}") from None
    return raw

