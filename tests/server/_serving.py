"""What the real-server tests share: the protected digits bundle, a server running in a thread, mTLS clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from edgeshield import bundles, keys, transport
from edgeshield.adversarial import METADATA_KEY
from edgeshield.models import digits_input_spec, digits_model_path
from edgeshield.server import running as serving  # noqa: F401  (the tests' name for it)


def protected_digits(root: Path) -> tuple[Path, Path]:
    """Owner and device keys in root/keys and the digits model protected for that device, with its input spec."""
    k = root / "keys"
    keys.init_keys(k)
    bundle = root / "digits.esb"
    bundles.protect(digits_model_path(), bundle, signing_key=keys.load_owner_private_key(k / "owner.key"),
                    recipients=[keys.load_device_public_key(k / "device.pub")],
                    metadata={METADATA_KEY: digits_input_spec().to_json()})
    return bundle, k


def mtls_client(world: dict[str, Any], name: str, **kw: Any) -> httpx.Client:
    """An httpx client presenting ``world["certs"][name]`` and trusting the world's CA."""
    cert = world["certs"][name]
    ctx = transport.client_context(world["ca"] / "ca.crt", cert.cert_path, cert.key_path)
    return httpx.Client(base_url=world["url"], verify=ctx, timeout=10, **kw)
