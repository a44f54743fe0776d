"""The ASGI app with a detector file: robust inference through the same security middleware (no sockets)."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import numpy as np
import pytest

from edgeshield.adversarial import RobustModel, calibrate
from edgeshield.audit import AuditLog
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split
from edgeshield.server import Rbac, ServerState, create_app
from edgeshield.transport import Identity


def with_identity(app: Any, identity: Identity | None) -> Any:
    """What the TLS protocol layer does for a verified connection: the identity in the ASGI tls extension."""

    async def wrapped(scope: dict, receive: Any, send: Any) -> None:  # type: ignore[type-arg]
        if scope["type"] == "http":
            scope = {**scope, "extensions": {"tls": {"edgeshield.identity": identity,
                                                     "client_cert_error": None if identity else "none"}}}
        await app(scope, receive, send)

    return wrapped


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> ServerState:
    from edgeshield.bundles._ort import onnxruntime as ort

    session = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    split = load_digits_split()
    file = calibrate(session, split.x_test[:225], model_sha256="ab" * 32, input_spec=digits_input_spec(),
                     reference=split.x_train)

    class Manifest:
        bundle_id, model_sha256, model_version, created, metadata = "b" * 32, "ab" * 32, 1, "2026-11-25T00:00:00Z", {}

    log = AuditLog(tmp_path_factory.mktemp("audit") / "audit.db")
    return ServerState(session=session, manifest=Manifest(), rbac=Rbac(), audit=log, spec=file.input_spec,
                       robust=RobustModel(session, file))


def _client(state: ServerState, identity: Identity | None) -> httpx.AsyncClient:
    app = with_identity(create_app(state), identity)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://edge")


ALICE = Identity(name="alice", role="client", serial=7, fingerprint_sha256="00" * 32)


@pytest.mark.anyio
async def test_robust_predictions_and_audited_flags(state: ServerState) -> None:
    x = load_digits_split().x_test[225:245]
    noise = np.random.default_rng(0).random((5, 64)).astype(np.float32)
    async with _client(state, ALICE) as c:
        clean = (await c.post("/v1/predict", json={"inputs": x.tolist()})).json()
        assert sum(clean["counts"].values()) == 20 and clean["counts"]["accept"] >= 17
        attacked = (await c.post("/v1/predict", json={"inputs": noise.tolist()})).json()
        assert attacked["counts"]["reject"] == 5
        assert all(d["prediction"] is None for d in attacked["decisions"])
        metrics = (await c.get("/metrics")).status_code
        assert metrics == 403  # clients may not read metrics
    kinds = [e.kind for e in state.audit.entries()]  # type: ignore[union-attr]
    assert kinds.count("inference.predict") == 2 and "input.flagged" in kinds and "auth.forbidden" in kinds


@pytest.mark.anyio
async def test_no_identity_is_401_and_audited(state: ServerState) -> None:
    async with _client(state, None) as c:
        r = await c.get("/healthz")
    assert r.status_code == 401
    assert [e.kind for e in state.audit.entries()][-1] == "auth.failure"  # type: ignore[union-attr]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_serve_loads_the_signed_composed_graph(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A detector file carrying a composed graph: serve's loader verifies it and robust inference runs on it."""
    from edgeshield import bundles, keys
    from edgeshield.adversarial import DetectorFile
    from edgeshield.adversarial._compose import compose
    from edgeshield.server._model import ModelLoader
    from edgeshield.server._serve import ServeConfig

    d = tmp_path_factory.mktemp("composed-serve")
    keys.init_keys(d / "k")
    owner = keys.load_owner_private_key(d / "k" / "owner.key")
    device = keys.load_device_private_key(d / "k" / "device.key")
    bundles.protect(digits_model_path(), d / "m.esb", signing_key=owner, recipients=[device.public_key()])
    opened = bundles.open_bundle(d / "m.esb", owner.public_key(), device)
    split = load_digits_split()
    plain = calibrate(opened.session, split.x_test[:225], model_sha256=opened.manifest.model_sha256,
                      input_spec=digits_input_spec(), detectors=("squeeze", "noise"))
    compose(plain, bundles.decrypt_model(d / "m.esb", owner.public_key(), device), split.x_test[:225],
            signing_key=owner, recipients=[device.public_key()]).save(d / "detector.json")
    unused = d / "unused"
    cfg = ServeConfig(bundle=d / "m.esb", owner_key=d / "k" / "owner.pub", device_key=d / "k" / "device.key",
                      detector=d / "detector.json", ca=unused, cert=unused, key=unused, audit_db=unused,
                      audit_key=unused)
    served = ModelLoader(cfg).load()
    assert served.robust is not None and served.robust.composed is not None
    x = split.x_test[225:245]
    numpy_path = RobustModel(opened.session, DetectorFile.load(d / "detector.json")).decide(x)
    ours = served.robust.decide(x)
    np.testing.assert_allclose(ours.scores, numpy_path.scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours.verdicts, numpy_path.verdicts)
    keys.init_keys(d / "other")  # the same file trusted under another owner key: refused, typed
    from edgeshield.errors import IntegrityError

    with pytest.raises(IntegrityError):
        ModelLoader(dataclasses.replace(cfg, owner_key=d / "other" / "owner.pub")).load()
