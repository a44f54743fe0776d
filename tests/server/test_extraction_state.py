"""The extraction defence's state in the served app: canonical keys through the pipeline (jittered copies are one
input to the budget; a grid spec refuses jitter and serves snapped values), the monitor's state persisted in
--extraction-state (a block survives a restart, periodic and shutdown flushes), typed start-up errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_app_robust import with_identity

from edgeshield.adversarial import InputSpec
from edgeshield.audit import AuditLog
from edgeshield.errors import ExtractionStateError, InvalidArgumentError, NotAnExtractionStateError
from edgeshield.extraction import (
    BenignTransforms,
    DecayingBudget,
    MonitorStore,
    QueryMonitor,
    ResponsePolicy,
    SignalState,
)
from edgeshield.extraction._keys import digest_keys
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split
from edgeshield.server import Rbac, ServerState, create_app
from edgeshield.transport import Identity

DAY = 86400.0


class _Manifest:
    bundle_id, model_sha256, model_version, created, metadata = "b" * 32, "ab" * 32, 1, "2026-11-25T00:00:00Z", {}


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """A detector keeping what the monitor was given: the exact values the model was served, and the keys."""

    name = "recorder"

    def __init__(self) -> None:
        self.x: list[np.ndarray] = []
        self.keys: list[bytes] = []

    def observe(self, client_id: str, x: np.ndarray, predicted: np.ndarray, keys: Any = None) -> SignalState:
        self.x.append(np.array(x))
        self.keys += list(keys or [])
        return SignalState(self.name, False, {})

    def reset(self, client_id: str) -> None:
        pass


def _state(tmp_path: Path, **kw: Any) -> ServerState:
    from edgeshield.bundles._ort import onnxruntime as ort

    session = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    kw.setdefault("spec", digits_input_spec())
    return ServerState(session=session, manifest=_Manifest(), rbac=Rbac(), audit=AuditLog(tmp_path / "a.db"), **kw)


def _client(app: Any, name: str) -> httpx.AsyncClient:
    who = Identity(name=name, role="client", serial=abs(hash(name)) % 10**6 + 1, fingerprint_sha256="00" * 32)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=with_identity(app, who)), base_url="https://edge")


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan (startup, then shutdown when the block ends), as uvicorn does."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get,
                                   outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        message = await outbox.get()
        await task
        assert message["type"] == "lifespan.shutdown.complete", message


def _post(x: np.ndarray) -> dict[str, Any]:
    return {"json": {"inputs": np.asarray(x, dtype=np.float32).tolist()}}


def _jitter(x: np.ndarray, size: float = 1e-6) -> np.ndarray:
    """One pixel of every row moved by ``size`` (inwards, so that it stays in [0, 1])."""
    out = np.array(x, dtype=np.float32)
    out[:, 10] = np.where(out[:, 10] < 0.5, out[:, 10] + size, out[:, 10] - size)
    return out


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _monitored(path: Path, clock: Clock) -> tuple[QueryMonitor, MonitorStore]:
    store = MonitorStore(path)
    monitor = QueryMonitor([DecayingBudget(30, 10, clock=clock)], ResponsePolicy(default="block"), store=store,
                           clock=clock)
    return monitor, store


@pytest.mark.anyio
async def test_a_blocked_client_stays_blocked_after_a_restart(tmp_path: Path) -> None:
    clock, x = Clock(), load_digits_split().x_test
    path = tmp_path / "state.db"
    monitor, store = _monitored(path, clock)
    state = _state(tmp_path, monitor=monitor, extraction_store=store, flush_every_s=3600, clock=clock)
    state.on_shutdown.append(store.close)  # as build_state does: after the lifespan's last flush
    app = create_app(state)
    async with lifespan(app):
        async with _client(app, "mallory") as c:
            assert (await c.post("/v1/predict", **_post(x[:20]))).status_code == 200
            assert (await c.post("/v1/predict", **_post(x[20:40]))).status_code == 403  # 40 new inputs > 30
        async with _client(app, "alice") as c:
            assert (await c.post("/v1/predict", **_post(x[100:120]))).status_code == 200
        leaders = len(state.input_keys)  # type: ignore[arg-type]
    assert leaders >= 40
    # a new server process on the same file: the block, alice's spent budget and the key registry are back
    monitor, store = _monitored(path, clock)
    state = _state(tmp_path / "..", monitor=monitor, extraction_store=store, clock=clock)
    app = create_app(state)
    assert len(state.input_keys) == leaders  # type: ignore[arg-type]
    async with _client(app, "mallory") as c:
        assert (await c.post("/v1/predict", **_post(x[:1]))).status_code == 403
    async with _client(app, "alice") as c:
        assert (await c.post("/v1/predict", **_post(_jitter(x[100:120])))).status_code == 200  # old inputs: free
        assert (await c.post("/v1/predict", **_post(x[120:131]))).status_code == 403  # 20 + 11 > 30
    store.close()


@pytest.mark.anyio
async def test_the_periodic_flush_writes_while_serving(tmp_path: Path) -> None:
    clock, x = Clock(), load_digits_split().x_test
    monitor, store = _monitored(tmp_path / "state.db", clock)
    state = _state(tmp_path, monitor=monitor, extraction_store=store, flush_every_s=0.05, clock=clock)
    app = create_app(state)
    async with lifespan(app):
        async with _client(app, "carol") as c:
            assert (await c.post("/v1/predict", **_post(x[:5]))).status_code == 200
        def written() -> bool:  # the budget row, then the key registry (one flush writes both, in that order)
            return store.get("decaying_budget", "carol") is not None and store.get("keys", "registry") is not None

        for _ in range(500):
            if written():
                break
            await asyncio.sleep(0.02)
        assert written()
    store.close()


@pytest.mark.anyio
async def test_the_budget_counts_jittered_copies_once(tmp_path: Path) -> None:
    x = load_digits_split().x_test[:20]
    budget = DecayingBudget(30, 1, clock=Clock())
    state = _state(tmp_path, monitor=QueryMonitor([budget], ResponsePolicy(default="block")))
    app = create_app(state)
    assert state.input_keys is not None and state.input_keys.name == "leader"  # the digits spec has no quantum
    async with _client(app, "mallory") as c:
        assert (await c.post("/v1/predict", **_post(x))).status_code == 200
        for size in (1e-6, 1e-5, 5e-5):  # the jitter: three more copies of each input
            assert (await c.post("/v1/predict", **_post(_jitter(x, size)))).status_code == 200
    assert budget.state("mallory").stats["distinct"] == 20

    class ExactBytes:  # the old behaviour, for contrast: every jittered copy is a new input
        name = "digest"

        def keys(self, x: np.ndarray) -> list[bytes]:
            return digest_keys(x)

    (tmp_path / "old").mkdir()
    old = _state(tmp_path / "old", monitor=QueryMonitor([DecayingBudget(30, 1, clock=Clock())],
                                                         ResponsePolicy(default="block")),
                 input_keys=ExactBytes())  # type: ignore[arg-type]
    app = create_app(old)
    async with _client(app, "mallory") as c:
        assert (await c.post("/v1/predict", **_post(x))).status_code == 200
        assert (await c.post("/v1/predict", **_post(_jitter(x)))).status_code == 403


@pytest.mark.anyio
async def test_a_grid_spec_refuses_jitter_and_serves_snapped_values(tmp_path: Path) -> None:
    spec = InputSpec(shape=(None, 64), dtype="float32", min=0.0, max=1.0, image_shape=(8, 8), quantum=1 / 16)
    recorder = Recorder()
    state = _state(tmp_path, spec=spec, monitor=QueryMonitor([recorder]))
    app = create_app(state)
    assert state.input_keys is not None and state.input_keys.name == "grid"
    grid = (np.round(load_digits_split().x_test[:4] * 16) / 16).astype(np.float32)
    async with _client(app, "dave") as c:
        r = await c.post("/v1/predict", **_post(_jitter(grid)))
        assert r.status_code == 422 and r.json()["field"] == "quantum"
        near = grid.copy()
        near[:, 3] = np.nextafter(np.float32(3 / 16), np.float32(1))  # one ulp off k/16: within the tolerance
        assert (await c.post("/v1/predict", **_post(near))).status_code == 200
        assert (await c.post("/v1/predict", **_post(grid))).status_code == 200
    served = recorder.x[0]
    assert (served[:, 3] == np.float32(3 / 16)).all()  # the model saw the exact grid value
    assert np.array_equal(served * 16, np.round(served * 16))
    assert recorder.keys[4:] != recorder.keys[:4] and recorder.keys[:4] == state.input_keys.keys(near)


def test_a_corrupt_state_file_is_one_typed_line_at_start_up(tmp_path: Path) -> None:
    from edgeshield.server._serve import ServeConfig, open_extraction_state

    p = tmp_path
    base = {"bundle": p, "owner_key": p, "device_key": p, "ca": p, "cert": p, "key": p, "audit_db": p, "audit_key": p}
    junk = tmp_path / "state.db"
    junk.write_bytes(b"\x00garbage, not SQLite" * 200)
    with pytest.raises(NotAnExtractionStateError) as info:
        open_extraction_state(ServeConfig(**base, extraction_state=junk, extraction_action="block"))
    assert "\n" not in str(info.value) and str(junk) in str(info.value)
    with pytest.raises(InvalidArgumentError):  # nothing to keep
        open_extraction_state(ServeConfig(**base, extraction_state=tmp_path / "new.db"))
    # a readable file whose key registry is malformed: the start-up (create_app) stops, naming the row
    store = MonitorStore(tmp_path / "keys.db")
    store.put("keys", "registry", b"junk")
    state = _state(tmp_path, monitor=QueryMonitor([Recorder()]), extraction_store=store)
    with pytest.raises(ExtractionStateError, match="component 'keys' id 'registry'"):
        create_app(state)
    store.close()


def test_serve_configuration_of_the_long_horizon_defence(tmp_path: Path) -> None:
    from edgeshield.cli._serve import _parse_decaying_budget
    from edgeshield.server._serve import ServeConfig, _extraction_defence

    p = tmp_path
    base = {"bundle": p, "owner_key": p, "device_key": p, "ca": p, "cert": p, "key": p, "audit_db": p, "audit_key": p}
    split = load_digits_split()
    ref = tmp_path / "ref.npz"
    np.savez(ref, x=split.x_train[:600])
    clock = Clock()
    store = MonitorStore(tmp_path / "s.db")
    cfg = ServeConfig(**base, extraction_action="block", decaying_budget=_parse_decaying_budget("300:100"),
                      fleet_budget=1800, max_monitored_clients=50, ood_reference=ref,
                      ood_transforms=json.dumps({"shifts": 1, "image_shape": [8, 8]}))
    _, monitor, _ = _extraction_defence(cfg, store=store, clock=clock)
    assert monitor is not None and [d.name for d in monitor.detectors] == ["prada", "decaying_budget",
                                                                             "fleet_budget", "ood_rate"]
    assert monitor.store is store and monitor.max_clients == 50
    assert monitor.response.decide(["fleet_budget"]) == "flag" and monitor.response.decide(["ood_rate"]) == "block"
    budget = monitor.detectors[1]
    assert isinstance(budget, DecayingBudget) and (budget.burst, budget.per_day) == (300, 100.0)
    store.close()
    # --ood-reference alone calibrates with the default benign transforms; "none" on clean data only
    for given, expected in ((None, BenignTransforms()), ("none", None)):
        ood_only = _extraction_defence(ServeConfig(**base, extraction_action="flag", ood_reference=ref,
                                                   ood_transforms=given))[1]
        assert ood_only is not None and getattr(ood_only.detectors[-1], "transforms", "?") == expected
    for flag in ({"decaying_budget": (10, 1.0)}, {"fleet_budget": 10}, {"ood_reference": ref}):
        with pytest.raises(InvalidArgumentError):  # a signal with nothing to do on alarm
            _extraction_defence(ServeConfig(**base, **flag))  # type: ignore[arg-type]
    for bad in ("300", "0:1", "10:-1", "x:1", "10:inf"):
        with pytest.raises(InvalidArgumentError):
            _parse_decaying_budget(bad)
    for bad_cfg in ({"fleet_group": "batch"}, {"ood_transforms": "{}"}, {"max_monitored_clients": 0}):
        with pytest.raises(InvalidArgumentError):
            ServeConfig(**base, **bad_cfg)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        _extraction_defence(ServeConfig(**base, extraction_action="flag", ood_reference=ref, ood_transforms="{no"))


def test_the_serve_flags_reach_the_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from edgeshield.cli import main

    seen: list[Any] = []
    monkeypatch.setattr("edgeshield.server.serve", seen.append)
    for name in list(os.environ):
        if name.startswith("EDGESHIELD_"):
            monkeypatch.delenv(name)
    required = ["model.esb", "--owner-key", "o.pub", "--device-key", "d.key", "--ca", "pki", "--cert", "c.crt",
                "--key", "c.key", "--audit-db", "a.db", "--audit-key", "a.key", "--extraction-monitor", "block"]
    assert main(["serve", *required, "--extraction-state", str(tmp_path / "s.db"), "--decaying-budget", "300:100",
                 "--fleet-budget", "1800", "--fleet-group", "role", "--max-monitored-clients", "500",
                 "--ood-reference", "ref.npz", "--ood-transforms", '{"shifts": 1}', "--prada-dup-distance", "0.2"]) == 0
    cfg = seen[0]
    assert (cfg.extraction_state, cfg.decaying_budget, cfg.fleet_budget, cfg.fleet_group) == (
        tmp_path / "s.db", (300, 100.0), 1800, "role")
    assert (cfg.max_monitored_clients, cfg.ood_reference, cfg.ood_transforms) == (500, Path("ref.npz"),
                                                                                  '{"shifts": 1}')
    import dataclasses

    from edgeshield.server._serve import _extraction_defence

    assert cfg.prada_dup_distance == 0.2
    monitor = _extraction_defence(dataclasses.replace(cfg, ood_reference=None, ood_transforms=None))[1]
    assert monitor is not None and monitor.detectors[0].dup_distance == 0.2  # type: ignore[attr-defined]
    assert main(["serve", *required, "--decaying-budget", "300"]) == 2  # one line, exit 2 (checked by main)
    assert main(["serve", *required, "--prada-dup-distance", "0"]) == 2
