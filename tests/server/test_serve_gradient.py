"""`serve --detector` with a file that decides by the gradient detector: the server builds the PyTorch twin of the
bundled model ([eval] installed) instead of stopping at start-up with an install hint that could never help."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeshield import audit, bundles, keys, transport
from edgeshield.adversarial import calibrate
from edgeshield.models import digits_input_spec, load_digits_split
from edgeshield.server import ServeConfig, build_state

from _serving import protected_digits

pytest.importorskip("torch")


def test_serve_runs_a_gradient_decision_detector(tmp_path: Path) -> None:
    from edgeshield.adversarial._torch import onnx_to_torch

    bundle, k = protected_digits(tmp_path)
    owner, device = keys.load_owner_public_key(k / "owner.pub"), keys.load_device_private_key(k / "device.key")
    opened = bundles.open_bundle(bundle, owner, device)
    torch_model = onnx_to_torch(bundles.decrypt_model(bundle, owner, device))
    clean = load_digits_split().x_test[:200]
    file = calibrate(opened.session, clean, model_sha256=opened.manifest.model_sha256,
                     input_spec=digits_input_spec(), detectors=["gradient"], torch_model=torch_model)
    assert "gradient" in file.decision_detectors()
    file.save(tmp_path / "detector.json")
    ca = tmp_path / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    audit.generate_signing_key(tmp_path / "audit.key")
    state = build_state(ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                                    cert=server.cert_path, key=server.key_path, audit_db=tmp_path / "audit.db",
                                    audit_key=tmp_path / "audit.key", detector=tmp_path / "detector.json"))
    assert state.robust is not None
    decisions = state.robust.predict(clean[:20])
    assert sum(d.decision == "accept" for d in decisions) >= 15
    noise = np.random.default_rng(0).random((5, 64)).astype(np.float32)
    assert len(state.robust.predict(noise)) == 5
