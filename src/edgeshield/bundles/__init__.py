"""Signed, encrypted model bundles, decrypted only in memory into ONNX Runtime.

    from edgeshield import bundles, keys
    bundles.protect("model.onnx", "model.esb", signing_key=keys.load_owner_private_key("owner.key"),
                    recipients=[keys.load_device_public_key("device.pub")])
    bundles.verify("model.esb", keys.load_owner_public_key("owner.pub"))          # no device key needed
    session = bundles.open_session("model.esb", keys.load_owner_public_key("owner.pub"),
                                   keys.load_device_private_key("device.key"))     # onnxruntime.InferenceSession

The format is specified in docs/bundle-format.md.
"""

from edgeshield.bundles._api import (
    Manifest,
    OpenBundle,
    decrypt_model,
    inspect,
    model_io,
    open_bundle,
    open_session,
    protect,
    verify,
)
from edgeshield.bundles._modelio import ModelIO, TensorInfo

__all__ = ["Manifest", "ModelIO", "OpenBundle", "TensorInfo", "decrypt_model", "inspect", "model_io", "open_bundle",
           "open_session", "protect", "verify"]
