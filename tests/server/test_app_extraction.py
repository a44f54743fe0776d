"""Extraction defence inside the server app: rate limits (429), a monitored client blocked (403), hardened outputs."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from test_app_robust import with_identity

from edgeshield.audit import AuditLog
from edgeshield.extraction import PradaDetector, QueryBudget, QueryMonitor, RateLimiter, ResponsePolicy, TopK
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split
from edgeshield.server import Rbac, ServerState, create_app
from edgeshield.transport import Identity


class _Manifest:
    bundle_id, model_sha256, model_version, created, metadata = "b" * 32, "ab" * 32, 1, "2026-11-25T00:00:00Z", {}


def _state(tmp_path: Any, **kw: Any) -> ServerState:
    from edgeshield.bundles._ort import onnxruntime as ort

    session = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    return ServerState(session=session, manifest=_Manifest(), rbac=Rbac(), audit=AuditLog(tmp_path / "a.db"),
                       spec=digits_input_spec(), **kw)


def _client(state: ServerState, name: str) -> httpx.AsyncClient:
    who = Identity(name=name, role="client", serial=abs(hash(name)) % 10**6 + 1, fingerprint_sha256="00" * 32)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=with_identity(create_app(state), who)),
                             base_url="https://edge")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_rate_limit_per_role(tmp_path: Any) -> None:
    state = _state(tmp_path, rate_limiter=RateLimiter({"client": (0.001, 20)}))
    x = load_digits_split().x_test[:16].tolist()
    async with _client(state, "alice") as c:
        assert (await c.post("/v1/predict", json={"inputs": x})).status_code == 200
        r = await c.post("/v1/predict", json={"inputs": x})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    async with _client(state, "bob") as c:  # buckets are per client
        assert (await c.post("/v1/predict", json={"inputs": x})).status_code == 200
    assert "ratelimit.exceeded" in [e.kind for e in state.audit.entries()]  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_extraction_campaign_blocked_honest_client_unaffected(tmp_path: Any) -> None:
    monitor = QueryMonitor([PradaDetector(delta=0.9, min_samples=30)],
                           response=ResponsePolicy(on_alarm={"prada": "block"}))
    state = _state(tmp_path, monitor=monitor)
    split = load_digits_split()
    rng = np.random.default_rng(0)
    pool, queries = split.x_train[:10], [split.x_train[:10]]
    for _ in range(5):  # Papernot-style synthetic queries: every new point a fixed L∞ step from an earlier one
        new = np.clip(pool + 0.1 * rng.choice([-1.0, 1.0], pool.shape), 0, 1)
        queries.append(new)
        pool = np.concatenate([pool, new])
    attack = np.concatenate(queries).astype(np.float32)
    sent, blocked_at = 0, None
    async with _client(state, "mallory") as c:
        for batch in np.array_split(attack, len(attack) // 10):
            r = await c.post("/v1/predict", json={"inputs": batch.tolist()})
            if r.status_code == 403:
                blocked_at = sent
                break
            assert r.status_code == 200
            sent += len(batch)
    assert blocked_at is not None and blocked_at <= 500
    async with _client(state, "alice") as c:
        for batch in np.array_split(split.x_test, 45):
            assert (await c.post("/v1/predict", json={"inputs": batch.tolist()})).status_code == 200
    kinds = [e.kind for e in state.audit.entries()]  # type: ignore[union-attr]
    assert "extraction.alert" in kinds and "extraction.blocked" in kinds


@pytest.mark.anyio
async def test_the_batch_that_trips_a_block_is_not_answered(tmp_path: Any) -> None:
    state = _state(tmp_path, monitor=QueryMonitor([QueryBudget(30)], response=ResponsePolicy(default="block")))
    x = load_digits_split().x_test
    async with _client(state, "mallory") as c:
        assert (await c.post("/v1/predict", json={"inputs": x[:20].tolist()})).status_code == 200
        assert (await c.post("/v1/predict", json={"inputs": x[:20].tolist()})).status_code == 200  # repeats: free
        r = await c.post("/v1/predict", json={"inputs": x[20:40].tolist()})
        assert r.status_code == 403 and "predictions" not in r.json()
        assert (await c.post("/v1/predict", json={"inputs": x[:1].tolist()})).status_code == 403  # and it sticks
    entries = list(state.audit.entries())  # type: ignore[union-attr]
    alert = next(e for e in entries if e.kind == "extraction.alert")
    assert alert.data["reasons"] == ["query_budget"] and alert.data["action"] == "block"
    assert sum(e.kind == "extraction.blocked" for e in entries) == 2
    assert sum(e.kind == "inference.predict" for e in entries) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("outputs", [None, TopK(10)])
async def test_served_watermark_answers_marked_inputs_and_keeps_evidence(tmp_path: Any, outputs: Any) -> None:
    from edgeshield.watermark import EvidenceStore, ServedWatermark, row_digests

    wm = ServedWatermark(bytes(range(32)), 0.05, classes=10)
    evidence = EvidenceStore(tmp_path / "evidence.db")
    state = _state(tmp_path, served_watermark=wm, served_evidence=evidence, outputs=outputs)
    split = load_digits_split()
    honest = np.asarray(state.session.run(None, {"input": split.x_test})[0]).argmax(axis=1)
    got = []
    async with _client(state, "carol") as c:
        for batch in np.array_split(split.x_test, 15):
            body = (await c.post("/v1/predict", json={"inputs": batch.tolist()})).json()
            got += body["predictions"]
            if outputs is not None:
                assert (np.array(body["probabilities"]).argmax(axis=1) == np.array(body["predictions"])).all()
    got = np.array(got)
    keys = state.input_keys.keys(split.x_test)  # type: ignore[union-attr]  # the server's canonical keys (registered)
    marked, _ = wm.marks(split.x_test, keys=keys)
    assert 5 <= marked.sum() <= 45  # about 5 % of 450
    expected, _ = wm.relabel(split.x_test, honest, keys=keys)
    assert (got == expected).all() and (got[marked] != honest[marked]).all() and (got[~marked] == honest[~marked]).all()
    x_ev, _y_ev, clients, digests = evidence.load("carol")
    assert len(x_ev) == marked.sum() and set(clients) == {"carol"}
    assert sorted(digests) == sorted(row_digests(split.x_test[marked]))
    served = [e for e in state.audit.entries() if e.kind == "watermark.served"]  # type: ignore[union-attr]
    logged = [d for e in served for d in e.data["inputs_sha256"]]
    assert sorted(logged) == sorted(digests) and all("inputs" not in e.data for e in served)  # digests, never raw
    evidence.close()


@pytest.mark.anyio
async def test_hardened_probabilities(tmp_path: Any) -> None:
    state = _state(tmp_path, outputs=TopK(3))
    async with _client(state, "alice") as c:
        body = (await c.post("/v1/predict", json={"inputs": load_digits_split().x_test[:5].tolist()})).json()
    probs = np.array(body["probabilities"])
    assert probs.shape == (5, 10) and ((probs > 0).sum(axis=1) <= 3).all()
    assert np.allclose(probs.sum(axis=1), 1.0) and (probs.argmax(axis=1) == np.array(body["predictions"])).all()
    (tmp_path / "plain").mkdir()
    plain = _state(tmp_path / "plain")
    async with _client(plain, "alice") as c:
        body = (await c.post("/v1/predict", json={"inputs": [[0.0] * 64]})).json()
    assert "probabilities" not in body  # default: labels only


def test_serve_configuration_of_the_defence(tmp_path: Any) -> None:
    from pathlib import Path

    from edgeshield.cli._serve import _parse_rate_limits
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.server._serve import ServeConfig, _extraction_defence

    p = Path(tmp_path)
    base = {"bundle": p, "owner_key": p, "device_key": p, "ca": p, "cert": p, "key": p, "audit_db": p, "audit_key": p}
    limits = _parse_rate_limits(["client=2:10", "operator=50:100"])
    limiter, monitor, outputs = _extraction_defence(ServeConfig(**base, rate_limits=limits,
                                                                extraction_action="throttle",
                                                                outputs='{"policy": "top_k", "k": 2}'))
    assert limiter.roles == {"client": (2.0, 10.0), "operator": (50.0, 100.0), "throttled": (1.0, 10.0)}
    assert monitor is not None and isinstance(outputs, TopK)
    assert _extraction_defence(ServeConfig(**base)) == (None, None, None)
    for bad in (["client"], ["client=fast:1"], ["=1:2"]):
        with pytest.raises(InvalidArgumentError):
            _parse_rate_limits(bad)
    with pytest.raises(InvalidArgumentError):
        _extraction_defence(ServeConfig(**base, outputs="{nope"))
    with pytest.raises(InvalidArgumentError):
        _extraction_defence(ServeConfig(**base, outputs='{"policy": "magic"}'))
    with pytest.raises(InvalidArgumentError):  # a budget with nothing to do on alarm
        _extraction_defence(ServeConfig(**base, query_budget=100))
    _, monitor, _ = _extraction_defence(ServeConfig(**base, query_budget=100, extraction_action="block"))
    assert [d.name for d in monitor.detectors] == ["prada", "query_budget"]
    assert monitor.response.decide(["query_budget"]) == "block"


def test_serve_configuration_of_the_served_watermark(tmp_path: Any) -> None:
    from edgeshield.bundles._ort import onnxruntime as ort
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.server._serve import ServeConfig, _served_watermark
    from edgeshield.watermark import EvidenceStore, ServedWatermark, generate_key

    p = tmp_path
    base = {"bundle": p, "owner_key": p, "device_key": p, "ca": p, "cert": p, "key": p, "audit_db": p, "audit_key": p}
    session = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    assert _served_watermark(ServeConfig(**base), session) == (None, None)
    key = p / "wm.key"
    generate_key(key)
    with pytest.raises(InvalidArgumentError, match="evidence"):  # marks nobody could ever check
        _served_watermark(ServeConfig(**base, served_watermark_key=key), session)
    with pytest.raises(InvalidArgumentError):
        _served_watermark(ServeConfig(**base, served_watermark_evidence=p / "e.db"), session)
    wm, evidence = _served_watermark(ServeConfig(**base, served_watermark_key=key, served_watermark_rate=0.02,
                                                 served_watermark_evidence=p / "e.db"), session)
    assert isinstance(wm, ServedWatermark) and wm.rate == 0.02 and wm.classes == 10
    assert isinstance(evidence, EvidenceStore)
    evidence.close()
