"""python-tuf's names in one place, imported only by the functions that need the ``update`` extra.

``tuf.api.metadata`` and ``securesystemslib.signer`` re-export these without ``__all__``, which mypy's strict mode
does not follow, so they are taken from the modules that define them; the objects are the same.
"""

from securesystemslib.signer._crypto_signer import CryptoSigner
from tuf.api._payload import MetaFile, Root, Signed, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient.updater import Updater

__all__ = ["CryptoSigner", "JSONSerializer", "MetaFile", "Metadata", "Root", "Signed", "Snapshot", "TargetFile",
           "Targets", "Timestamp", "Updater"]
