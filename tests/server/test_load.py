"""A small bounded load test on the real server (127.0.0.1, in-process): a few client threads, ~20 % malformed.

Nothing may answer 5xx, every malformed request gets the 4xx it deserves, the server still answers afterwards, and
the audit log still verifies, holding exactly one entry per prediction, rejected input and forbidden request that
the clients saw.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgeshield import audit, transport
from edgeshield.models import load_digits_split
from edgeshield.server import ServeConfig

from _serving import mtls_client, protected_digits, serving

MAX_BODY = 64 * 1024
N_REQUESTS = 240
THREADS = 3
DEADLINE_S = 20.0
MALFORMED = ("bad_json", "wrong_shape", "nan_npy", "out_of_range", "oversize", "wrong_role")
EXPECTED = {"valid": 200, "bad_json": 422, "wrong_shape": 422, "nan_npy": 422, "out_of_range": 422,
            "oversize": 413, "wrong_role": 403}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("load")
    bundle, k = protected_digits(root)
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {"alice": transport.issue(ca, name="alice", role="client"),
             "aud": transport.issue(ca, name="aud", role="auditor")}
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", host="127.0.0.1", port=0, max_body_bytes=MAX_BODY)
    with serving(cfg) as (_srv, _watcher, port):
        yield {"root": root, "ca": ca, "certs": certs, "url": f"https://127.0.0.1:{port}"}


_client = mtls_client


def _requests() -> list[tuple[str, bytes, dict[str, str]]]:
    """The fixed schedule: every fifth request malformed, cycling through the malformed kinds."""
    as_json = {"content-type": "application/json"}
    as_npy = {"content-type": "application/x-npy"}
    nan = io.BytesIO()
    np.save(nan, np.full((1, 64), np.nan, np.float32))
    bad = {
        "bad_json": (b"{not json", as_json),
        "wrong_shape": (json.dumps({"inputs": [[0.5] * 63]}).encode(), as_json),
        "nan_npy": (nan.getvalue(), as_npy),
        "out_of_range": (json.dumps({"inputs": [[2.0] * 64]}).encode(), as_json),
        "oversize": (b"x" * (2 * MAX_BODY), as_npy),
    }
    x = load_digits_split().x_test
    out = []
    for i in range(N_REQUESTS):
        if i % 5 == 4:
            kind = MALFORMED[(i // 5) % len(MALFORMED)]
            body, headers = bad.get(kind) or (json.dumps({"inputs": [x[i % len(x)].tolist()]}).encode(), as_json)
        else:
            kind, body, headers = "valid", json.dumps({"inputs": [x[i % len(x)].tolist()]}).encode(), as_json
        out.append((kind, body, headers))
    return out


def test_bounded_load_no_5xx_malformed_4xx_audit_verifies(world: dict[str, Any]) -> None:
    plan = _requests()
    seen: Counter[tuple[str, int | str]] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE_S

    def work(k: int) -> None:
        with _client(world, "alice") as alice, _client(world, "aud") as aud:
            for kind, body, headers in plan[k::THREADS]:
                if time.monotonic() > deadline:
                    return
                try:
                    code: int | str = (aud if kind == "wrong_role" else alice).post(
                        "/v1/predict", content=body, headers=headers).status_code
                except httpx.HTTPError as exc:  # counted, and fails the test below
                    code = type(exc).__name__
                with lock:
                    seen[(kind, code)] += 1

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE_S + 10)
    assert not any(t.is_alive() for t in threads)
    assert sum(seen.values()) == N_REQUESTS, f"only {sum(seen.values())} of {N_REQUESTS} within {DEADLINE_S} s"

    codes = Counter()
    for (_, code), n in seen.items():
        codes[code] += n
    assert not [c for c in codes if not isinstance(c, int)], f"transport errors: {dict(seen)}"
    assert not [c for c in codes if c >= 500], f"5xx under load: {dict(seen)}"
    malformed = {key: n for key, n in seen.items() if key[0] != "valid"}
    assert sum(malformed.values()) == N_REQUESTS // 5
    assert all(400 <= code < 500 for (_, code) in malformed), dict(seen)
    assert all(code == EXPECTED[kind] for (kind, code) in seen), dict(seen)

    with _client(world, "alice") as c:  # still alive and serving
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}).status_code == 200

    log = audit.AuditLog(Path(world["root"]) / "audit.db", readonly=True)
    report = log.verify(public_key=audit.load_verify_key(Path(world["root"]) / "audit.pub"))
    assert report.signatures_checked and report.checkpoints >= 1
    kinds = Counter(e.kind for e in log.entries())
    assert kinds["inference.predict"] == seen[("valid", 200)] + 1  # + the liveness prediction above
    assert kinds["input.rejected"] == codes[422]
    assert kinds["auth.forbidden"] == codes[403]
    assert report.entries == sum(kinds.values())
