"""The app under bad input, as a client can send it: always a 4xx with a reason (or a 200), never a 5xx; every
refusal audited; a bug contained as an audited, logged JSON 500; routing before RBAC; a truthful OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_app_robust import with_identity

from edgeshield.adversarial import InputSpec
from edgeshield.audit import AuditLog
from edgeshield.errors import InvalidArgumentError
from edgeshield.models import digits_model_path
from edgeshield.server import Rbac, ServerState, create_app
from edgeshield.server._limits import InFlight, Limits
from edgeshield.server._serve import JsonFormatter
from edgeshield.transport import Identity

ADMIN = Identity(name="adm", role="admin", serial=1, fingerprint_sha256="00" * 32)
ALICE = Identity(name="alice", role="client", serial=2, fingerprint_sha256="00" * 32)


class _Manifest:
    bundle_id, model_sha256, model_version, created, metadata = "b" * 32, "ab" * 32, 1, "2026-11-25T00:00:00Z", {}


def _session() -> Any:
    from edgeshield.bundles._ort import onnxruntime as ort

    return ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])


def _state(root: Path, **kw: Any) -> ServerState:
    """A bundle protected without --input-spec: the server must derive the spec from the model itself."""
    return ServerState(session=_session(), manifest=_Manifest(), rbac=Rbac(), audit=AuditLog(root / "audit.db"),
                       **kw)


def _client(state: ServerState, who: Identity | None = ADMIN) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=with_identity(create_app(state), who)),
                             base_url="https://edge")


def _kinds(state: ServerState) -> list[str]:
    return [e.kind for e in state.audit.entries()]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> ServerState:
    return _state(tmp_path_factory.mktemp("hardening"))


@pytest.mark.anyio
@pytest.mark.parametrize("body", [b'{"inputs": [[0,1,2]]}', b"[]", b"[[]]", b"[1,2,3]", b'{"inputs": [[1e400]]}',
                                  b'{"inputs": [[[null, null]]]}', b'{"inputs": [[' + b"7" * 400 + b"]]}",
                                  b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
async def test_no_spec_bundle_refuses_what_used_to_be_a_500(shared: ServerState, body: bytes) -> None:
    before = len(_kinds(shared))
    async with _client(shared) as c:
        r = await c.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] and "\n" not in r.json()["error"]
    assert _kinds(shared)[before:] == ["input.rejected"]


@pytest.mark.anyio
async def test_derived_spec_refuses_nan_and_inf_by_default(shared: ServerState) -> None:
    assert shared.spec is not None and shared.spec.shape == (None, 64) and not shared.spec.allow_nan
    import io

    for value in (np.nan, np.inf):
        buf = io.BytesIO()
        np.save(buf, np.full((1, 64), value, np.float32))
        async with _client(shared) as c:
            r = await c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
        assert r.status_code == 422 and r.json()["field"] in ("nan", "inf")


@pytest.mark.anyio
async def test_413_is_audited_declared_or_streamed(tmp_path: Path) -> None:
    state = _state(tmp_path, max_body_bytes=64 * 1024)

    async def chunks() -> Any:
        for _ in range(80):
            yield b"x" * 1024

    async with _client(state) as c:
        declared = await c.post("/v1/predict", content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
        streamed = await c.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert declared.status_code == streamed.status_code == 413
    assert _kinds(state)[-2:] == ["request.too_large", "request.too_large"]


@pytest.mark.anyio
async def test_routing_runs_before_rbac_and_after_authentication(shared: ServerState) -> None:
    async with _client(shared, ALICE) as c:
        assert (await c.get("/no/such/path")).status_code == 404
        r = await c.delete("/v1/predict")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert (await c.get("/metrics")).status_code == 403  # a real route this role may not use
    async with _client(shared, None) as c:
        assert (await c.get("/no/such/path")).status_code == 401  # nobody learns the routes unauthenticated
    assert {"request.not_found", "request.method_not_allowed", "auth.forbidden"} <= set(_kinds(shared))
    async with _client(shared) as c:
        text = (await c.get("/metrics")).text
    assert "/no/such/path" not in text and 'path="unmatched"' in text  # no label per path a client invents


@pytest.mark.anyio
async def test_an_unexpected_error_is_logged_audited_and_a_clean_json_500(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    state = _state(tmp_path)

    class Broken:
        def __init__(self, real: Any) -> None:
            self.real = real

        def get_inputs(self) -> Any:
            return self.real.get_inputs()

        def get_outputs(self) -> Any:
            return self.real.get_outputs()

        def run(self, *_args: Any) -> Any:
            raise KeyError("a bug in the server, not the client's fault")

    state.session = Broken(state.session)
    with caplog.at_level(logging.ERROR, logger="edgeshield.server"):
        async with _client(state) as c:
            r = await c.post("/v1/predict", json={"inputs": [[0.5] * 64]})
    assert r.status_code == 500 and r.json() == {"error": "internal server error"}
    entry = [e for e in state.audit.entries() if e.kind == "server.error"]  # type: ignore[union-attr]
    assert len(entry) == 1 and entry[0].data == {"path": "/v1/predict", "method": "POST", "error": "KeyError"}
    record = next(r for r in caplog.records if r.name == "edgeshield.server")
    line = json.loads(JsonFormatter().format(record))  # one JSON object, traceback included
    assert line["exc_type"] == "KeyError" and "Traceback" in line["traceback"] and "def run" not in line["msg"]


def test_a_spec_that_does_not_fit_the_model_is_refused_at_start(tmp_path: Path) -> None:
    for spec in (InputSpec(shape=(None, 63)), InputSpec(shape=(None, 64), dtype="float64"), InputSpec(shape=(None,))):
        with pytest.raises(InvalidArgumentError):
            create_app(_state(tmp_path, spec=spec))


def test_in_flight_is_shared_so_one_identity_cannot_take_all_of_it() -> None:
    slots = InFlight(total=4, per_key=2)
    assert slots.acquire("mallory") and slots.acquire("mallory") and not slots.acquire("mallory")
    assert slots.acquire("alice") and slots.acquire("bob") and not slots.acquire("carol")
    slots.release("mallory")
    assert slots.acquire("carol") and slots.count == 4


@pytest.mark.anyio
async def test_over_the_in_flight_share_is_a_503_with_retry_after(tmp_path: Path) -> None:
    state = _state(tmp_path, limits=Limits(max_in_flight=2, max_in_flight_per_identity=1))
    real_run = state.session.run

    def slow(*args: Any) -> Any:
        import time

        time.sleep(0.5)
        return real_run(*args)

    class Slow:
        get_inputs, get_outputs, run = state.session.get_inputs, state.session.get_outputs, staticmethod(slow)

    state.session = Slow()
    x = {"inputs": [[0.5] * 64]}
    async with _client(state) as c:
        first, second = await asyncio.gather(c.post("/v1/predict", json=x), c.post("/v1/predict", json=x))
    codes = sorted([first.status_code, second.status_code])
    busy = first if first.status_code == 503 else second
    assert codes == [200, 503] and busy.headers["retry-after"] == "1"
    assert "server.busy" in _kinds(state)


@pytest.mark.anyio
async def test_openapi_documents_bodies_and_answers(shared: ServerState) -> None:
    async with _client(shared) as c:
        doc = (await c.get("/openapi.json")).json()
    predict = doc["paths"]["/v1/predict"]["post"]
    content = predict["requestBody"]["content"]
    assert set(content) == {"application/json", "application/x-npy"}
    rows = content["application/json"]["schema"]["properties"]["inputs"]
    assert rows["maxItems"] == shared.max_batch and rows["items"]["minItems"] == rows["items"]["maxItems"] == 64
    assert {"401", "403", "408", "413", "415", "422", "429", "503", "504"} <= set(predict["responses"])
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert doc["components"]["securitySchemes"]["deviceCertificate"]["type"] == "mutualTLS"


json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(["inputs", "x", ""]), inner,
                                                                max_size=3),
    max_leaves=70,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=st.one_of(json_docs.map(lambda d: json.dumps(d).encode()), st.binary(max_size=1024)),
       content_type=st.sampled_from(["application/json", "application/x-npy", "text/plain", ""]),
       path=st.sampled_from(["/v1/predict", "/v1/model", "/healthz", "/metrics", "/v1/predict/", "/x"]),
       method=st.sampled_from(["POST", "GET", "PUT"]))
def test_fuzz_the_app_never_answers_5xx(shared: ServerState, body: bytes, content_type: str, path: str,
                                       method: str) -> None:
    async def go() -> int:
        async with _client(shared) as c:
            r = await c.request(method, path, content=body, headers={"content-type": content_type})
            return r.status_code

    assert asyncio.run(go()) < 500
