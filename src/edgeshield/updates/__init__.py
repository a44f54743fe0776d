"""Rollback-proof, atomic model updates: a TUF repository on the owner's side, A/B slots and a floor on the device.

    # owner
    init_repository("repo", "repo-keys")
    publish("repo", "repo-keys", "model-v7.esb", owner_key=owner_pub, model="digits", detector="det.json")
    resign_timestamp("repo", "repo-keys")                      # on a schedule
    # device
    init_device("dev", root=repository_root("repo"), owner_key_pem=owner_pub_pem, model="digits", url=URL)
    with DeviceUpdater("dev", device_key=device_key) as u:
        u.pull(); u.install(); u.commit()                      # or u.rollback() before commit

Importable without the ``update`` extra: python-tuf is imported only by the repository functions and ``pull``.
docs/updates.md says what each attack does and why it fails, and what an offline attacker can still do.
"""

from edgeshield.updates._device import DeviceConfig, DeviceUpdater, FloorConfig, init_device
from edgeshield.updates._errors import (
    EndlessDataError,
    FloorKeyError,
    FloorStateError,
    FloorViolationError,
    HealthCheckError,
    MalformedUpdateError,
    MetadataExpiredError,
    MetadataMismatchError,
    MetadataRollbackError,
    MetadataSignatureError,
    NothingToDoError,
    SlotIntegrityError,
    TruncatedDownloadError,
    UpdateConfigError,
    UpdateDownloadError,
    UpdateError,
    UpdateInProgressError,
    UpdateMismatchError,
    UpdatePendingError,
    UpdateRefusedError,
)
from edgeshield.updates._floor import Floor, SignedFileFloor
from edgeshield.updates._index import UpdateIndex
from edgeshield.updates._repo import (
    PublishResult,
    init_repository,
    publish,
    published,
    repository_root,
    resign_timestamp,
)
from edgeshield.updates._slots import SlotRecord

__all__ = [
    "DeviceConfig", "DeviceUpdater", "EndlessDataError", "Floor", "FloorConfig", "FloorKeyError", "FloorStateError",
    "FloorViolationError", "HealthCheckError", "MalformedUpdateError", "MetadataExpiredError", "MetadataMismatchError",
    "MetadataRollbackError", "MetadataSignatureError", "NothingToDoError", "PublishResult", "SignedFileFloor",
    "SlotIntegrityError", "SlotRecord", "TruncatedDownloadError", "UpdateConfigError", "UpdateDownloadError",
    "UpdateError", "UpdateInProgressError", "UpdateIndex", "UpdateMismatchError", "UpdatePendingError",
    "UpdateRefusedError", "init_device", "init_repository", "publish", "published", "repository_root",
    "resign_timestamp",
]
