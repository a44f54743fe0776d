"""Reloading the served model on the real mutual-TLS server: a kept-alive connection sends predictions before,
during and after a reload from v1 to v2 and none fails; a reload to a corrupted, foreign, older or below-the-floor
bundle is refused (409, audited) and the old model keeps serving; the file watcher accepts the reloaded files but
still quarantines an edit made after; SIGHUP reloads a ``serve`` process."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgeshield import audit, bundles, keys, transport
from edgeshield.adversarial import METADATA_KEY
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split
from edgeshield.server import ServeConfig, ServerState, build_state
from edgeshield.updates import DeviceUpdater, init_device
from edgeshield.updates._slots import Slots

from _serving import mtls_client, serving

X = load_digits_split().x_test[:2].tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reload")
    k = root / "keys"
    keys.init_keys(k)
    keys.init_keys(root / "other")  # another owner, whose bundles this device must not serve
    device = keys.load_device_public_key(k / "device.pub")
    meta = {METADATA_KEY: digits_input_spec().to_json()}

    def protect(name: str, version: int, owner: Path = k) -> tuple[Path, bundles.Manifest]:
        out = root / name
        m = bundles.protect(digits_model_path(), out, signing_key=keys.load_owner_private_key(owner / "owner.key"),
                            recipients=[device], model_version=version, metadata=meta)
        return out, m

    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {n: transport.issue(ca, name=n, role=r) for n, r in (("adm", "admin"), ("alice", "client"))}
    audit.generate_signing_key(root / "audit.key")
    return {"root": root, "keys": k, "ca": ca, "server": server, "certs": certs,
            **{f"v{v}": protect(f"v{v}.esb", v) for v in (0, 1, 2)},
            "foreign": protect("foreign.esb", 3, root / "other")}


def _config(world: dict[str, Any], d: Path, **kw: Any) -> ServeConfig:
    k, server = world["keys"], world["server"]
    return ServeConfig(owner_key=k / "owner.pub", device_key=k / "device.key", ca=world["ca"],
                       cert=server.cert_path, key=server.key_path, audit_db=d / "audit.db",
                       audit_key=world["root"] / "audit.key", port=0, log_level="warning",
                       monitor_db=d / "monitor.db", **kw)


def _device(world: dict[str, Any], d: Path) -> Path:
    """An update directory with v1 installed in slot a and committed (the floor at 1)."""
    dev = d / "dev"
    init_device(dev, root=b"{}", owner_key_pem=(world["keys"] / "owner.pub").read_bytes(), model="digits")
    _install(world, dev, "a", "v1")
    return dev


def _install(world: dict[str, Any], dev: Path, slot: str, which: str, *, commit: bool = True) -> None:
    """What ``update install`` (+ ``commit``) leaves on disk: the slot written, checked, switched to; the floor."""
    bundle, m = world[which]
    slots = Slots(dev)
    record = slots.write(slot, model="digits", model_version=m.model_version, bundle_id=m.bundle_id,
                         sources={"bundle": bundle})
    slots.set_health(record, "passed")
    slots.switch(slot)
    if commit:
        with DeviceUpdater(dev, device_key=keys.load_device_private_key(world["keys"] / "device.key")) as u:
            u.floor.raise_to(m.model_version)


def _kinds(cfg: ServeConfig) -> list[audit.Entry]:
    return list(audit.AuditLog(cfg.audit_db, readonly=True).entries())


def _wait(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_a_reload_under_traffic_drops_nothing_and_switches_the_same_connection_to_v2(
        world: dict[str, Any], tmp_path: Path) -> None:
    dev = _device(world, tmp_path)
    cfg = _config(world, tmp_path, update_dir=dev, watch_interval_s=0.2)
    state = build_state(cfg)
    with serving(cfg, state) as (_srv, _crl, port), mtls_client(world, "alice", port=port) as c:
        answers: list[tuple[int, str | None, str | None]] = []
        streams: set[int] = set()
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                r = c.post("/v1/predict", json={"inputs": X})
                streams.add(id(r.extensions["network_stream"]))
                answers.append((r.status_code, r.headers.get("edgeshield-model-version"),
                                r.headers.get("edgeshield-bundle-id")))

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            _wait(lambda: len(answers) >= 5)
            _install(world, dev, "b", "v2")  # the other slot: the files being served are not touched
            time.sleep(0.6)  # the watcher polls meanwhile and sees nothing to quarantine
            with mtls_client(world, "adm", port=port) as admin:
                r = admin.post("/v1/admin/reload")
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["old"]["model_version"], body["new"]["model_version"]) == (1, 2)
            assert (body["new"]["slot"], body["by"]) == ("b", "adm")
            seen = len(answers)
            _wait(lambda: len(answers) >= seen + 5)
        finally:
            stop.set()
            sender.join(timeout=20)
        assert {code for code, _v, _b in answers} == {200}, answers
        versions = [v for _c, v, _b in answers]
        first_v2 = versions.index("2")
        assert set(versions[:first_v2]) == {"1"} and set(versions[first_v2:]) == {"2"}  # one switch, never back
        assert {b for _c, v, b in answers if v == "2"} == {world["v2"][1].bundle_id}
        assert len(streams) == 1  # one kept-alive connection throughout
        assert c.get("/v1/model").json()["model_version"] == 2
        assert state.model.slot == "b" and state.session is state.model.session

        # An edit after the reload is not sanctioned: the bundle_changed rule still quarantines.
        served = dev / "slots" / "b" / "model.esb"
        data = bytearray(served.read_bytes())
        data[-10] ^= 1
        served.write_bytes(bytes(data))
        _wait(lambda: c.post("/v1/predict", json={"inputs": X}).status_code == 503)
    entries = _kinds(cfg)
    reload = [e for e in entries if e.kind == "model.reload"]
    assert len(reload) == 1 and reload[0].actor == "adm"
    assert reload[0].data["old"]["bundle_id"] == world["v1"][1].bundle_id
    assert reload[0].data["new"] == {"bundle_id": world["v2"][1].bundle_id, "model_version": 2, "slot": "b",
                                     "model_sha256": world["v2"][1].model_sha256}
    accepted = [e for e in entries if e.kind == "integrity.accepted"]
    assert [(e.actor, e.data["role"], e.data["path"]) for e in accepted] == [("adm", "bundle", str(served))]
    changed = [e for e in entries if e.kind == "integrity.changed"]
    assert [e.data["path"] for e in changed] == [str(served)]  # the install before the reload went unnoticed
    assert changed[0].data["expected_sha256"] == accepted[0].data["sha256"]


def test_refused_reloads_keep_the_old_model_serving(world: dict[str, Any], tmp_path: Path) -> None:
    served = tmp_path / "served.esb"
    shutil.copy(world["v1"][0], served)
    cfg = _config(world, tmp_path, bundle=served, monitor=False)
    with serving(cfg) as (_srv, _crl, port), mtls_client(world, "adm", port=port) as admin, \
            mtls_client(world, "alice", port=port) as alice:
        assert alice.post("/v1/admin/reload").status_code == 403  # admins only
        corrupted = bytearray(world["v2"][0].read_bytes())
        corrupted[len(corrupted) // 2] ^= 0x40
        refusals = []
        for name, content in (("corrupted", bytes(corrupted)), ("foreign", world["foreign"][0].read_bytes()),
                              ("older", world["v0"][0].read_bytes()), ("garbage", b"not a bundle")):
            tmp = served.with_suffix(".tmp")
            tmp.write_bytes(content)
            tmp.replace(served)
            r = admin.post("/v1/admin/reload")
            assert r.status_code == 409, (name, r.text)
            refusals.append(r.json()["field"])
            p = alice.post("/v1/predict", json={"inputs": X})
            assert p.status_code == 200 and p.headers["edgeshield-model-version"] == "1", name
        assert refusals[2] == "downgrade"
        shutil.copy(world["v2"][0], served)
        r = admin.post("/v1/admin/reload")
        assert r.status_code == 200 and r.json()["new"]["model_version"] == 2
        assert alice.post("/v1/predict", json={"inputs": X}).headers["edgeshield-model-version"] == "2"
    failed = [e for e in _kinds(cfg) if e.kind == "model.reload_failed"]
    assert [e.data["reason"] for e in failed] == refusals
    assert all(e.data["bundle_id"] == world["v1"][1].bundle_id and e.actor == "adm" for e in failed)


def test_a_reload_below_the_floor_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    dev = _device(world, tmp_path)
    _install(world, dev, "b", "v2")
    cfg = _config(world, tmp_path, update_dir=dev, monitor=False)
    with serving(cfg) as (_srv, _crl, port), mtls_client(world, "adm", port=port) as admin:
        Slots(dev).switch("a")  # someone points `current` back at v1, below the committed floor of 2
        r = admin.post("/v1/admin/reload")
        assert r.status_code == 409 and "floor" in r.json()["error"], r.text
        assert admin.get("/v1/model").json()["model_version"] == 2
        Slots(dev).switch(None)
        r = admin.post("/v1/admin/reload")
        assert r.status_code == 409 and "no current slot" in r.json()["error"]


def test_the_state_holds_one_swappable_model() -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    state = ServerState(session=session, manifest=object(), rbac=None, audit=None)  # type: ignore[arg-type]
    first = state.model
    assert state.session is first.session and state.robust is None and state.spec is None
    state.spec = digits_input_spec()  # a part's write replaces the whole model, never edits it
    assert state.model is not first and first.spec is None and state.model.spec == digits_input_spec()
    with pytest.raises(TypeError):
        ServerState(manifest=object(), rbac=None, audit=None)  # type: ignore[call-arg, arg-type]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_request_in_flight_finishes_on_the_model_it_started_with(tmp_path: Path) -> None:
    import asyncio
    from dataclasses import replace

    import onnxruntime as ort
    from test_app_robust import with_identity

    from edgeshield.audit import AuditLog
    from edgeshield.server import Rbac, create_app
    from edgeshield.transport import Identity

    real = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    entered, release = threading.Event(), threading.Event()

    class Slow:
        get_inputs, get_outputs = real.get_inputs, real.get_outputs

        def run(self, *args: Any) -> Any:
            entered.set()
            release.wait(10)
            return real.run(*args)

    class V1:
        bundle_id, model_sha256, model_version, created, metadata = "1" * 32, "ab" * 32, 1, "2026-01-01", {}

    class V2(V1):
        bundle_id, model_version = "2" * 32, 2

    state = ServerState(session=Slow(), manifest=V1(), rbac=Rbac(), audit=AuditLog(tmp_path / "audit.db"))
    who = Identity(name="alice", role="client", serial=2, fingerprint_sha256="00" * 32)
    app = with_identity(create_app(state), who)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://edge") as c:
        slow = asyncio.create_task(c.post("/v1/predict", json={"inputs": X}))
        assert await asyncio.to_thread(entered.wait, 10)
        state.model = replace(state.model, session=real, manifest=V2())  # the one assignment a reload makes
        fresh = await c.post("/v1/predict", json={"inputs": X})
        release.set()
        old = await slow
    assert old.status_code == fresh.status_code == 200
    assert (old.headers["edgeshield-bundle-id"], old.headers["edgeshield-model-version"]) == ("1" * 32, "1")
    assert (fresh.headers["edgeshield-bundle-id"], fresh.headers["edgeshield-model-version"]) == ("2" * 32, "2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve_process(world: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    dev = _device(world, tmp_path)
    k, server, port = world["keys"], world["server"], _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeshield", "serve", "--update-dir", dev, "--owner-key", k / "owner.pub",
         "--device-key", k / "device.key", "--ca", world["ca"], "--cert", server.cert_path, "--key",
         server.key_path, "--audit-db", tmp_path / "audit.db", "--audit-key", world["root"] / "audit.key",
         "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(proc.communicate()[1]) from None
            time.sleep(0.1)
    yield {"dev": dev, "port": port, "proc": proc, "audit_db": tmp_path / "audit.db"}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sighup_reloads_a_serve_process(world: dict[str, Any], serve_process: dict[str, Any]) -> None:
    proc, port = serve_process["proc"], serve_process["port"]
    with mtls_client(world, "alice", port=port) as c:
        assert c.get("/v1/model").json()["model_version"] == 1
        _install(world, serve_process["dev"], "b", "v2")
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: c.get("/v1/model").json()["model_version"] == 2, timeout_s=20)
        r = c.post("/v1/predict", json={"inputs": X})
        assert r.status_code == 200 and r.headers["edgeshield-model-version"] == "2"
        assert np.asarray(r.json()["predictions"]).shape == (2,)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    entries = list(audit.AuditLog(serve_process["audit_db"], readonly=True).entries())
    reload = [e for e in entries if e.kind == "model.reload"]
    assert len(reload) == 1 and reload[0].actor == "SIGHUP" and reload[0].data["new"]["model_version"] == 2


def test_the_model_source_options_are_checked_where_they_enter(tmp_path: Path) -> None:
    from edgeshield.errors import InvalidArgumentError

    p = tmp_path
    base = {"owner_key": p, "ca": p, "cert": p, "key": p, "audit_db": p, "audit_key": p}
    for bad, words in (({"device_key": p}, "BUNDLE or --update-dir"),
                       ({"bundle": p, "update_dir": p, "device_key": p}, "BUNDLE or --update-dir"),
                       ({"bundle": p}, "--device-key or --released-key"),
                       ({"bundle": p, "device_key": p, "released_key": p, "tpm_keys": p}, "--device-key or"),
                       ({"bundle": p, "released_key": p}, "needs --tpm-keys"),
                       ({"update_dir": p, "device_key": p, "detector": p}, "--detector comes from"),
                       ({"bundle": p, "device_key": p, "tpm_keys": p}, "--tpm-keys is for")):
        with pytest.raises(InvalidArgumentError, match=words):
            ServeConfig(**base, **bad)  # type: ignore[arg-type]
    ServeConfig(**base, update_dir=p, device_key=p)  # type: ignore[arg-type]
    ServeConfig(**base, bundle=p, released_key=p, tpm_keys=p, tcti="swtpm:port=1")  # type: ignore[arg-type]
