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


def mtls_client(world: dict[str, Any], name: str, *, port: int | None = None, **kw: Any) -> httpx.Client:
    """An httpx client presenting ``world["certs"][name]`` and trusting the world's CA, to ``world["url"]`` or to
    the server on 127.0.0.1:``port``."""
    cert = world["certs"][name]
    ctx = transport.client_context(world["ca"] / "ca.crt", cert.cert_path, cert.key_path)
    url = world["url"] if port is None else f"https://127.0.0.1:{port}"
    return httpx.Client(base_url=url, verify=ctx, timeout=10, **kw)


def publish_crl(ca: Path, seconds: float) -> int:
    """Publish a CRL (same revocations, the next CRL number) whose nextUpdate is ``seconds`` from now, atomically
    replacing ``crl.pem`` as the CA host would; returns its number."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    current = x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())
    number = current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(seconds=1)).next_update(now + dt.timedelta(seconds=seconds))
               .add_extension(x509.CRLNumber(number), critical=False))
    for revoked in current:
        builder = builder.add_revoked_certificate(revoked)
    crl = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    tmp = ca / "crl.pem.tmp"
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.replace(ca / "crl.pem")
    return int(number)
