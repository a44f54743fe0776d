"""Demo stage for transport round two: one prediction end to end through a relay with Oblivious HTTP (RFC 9458),
showing what the relay saw, the relay's replay of it refused, and one prediction over HTTP/3 (mutual TLS 1.3 over
QUIC) from the same server."""

from __future__ import annotations

import json
import socket

import httpx

from edgeshield import audit, transport
from edgeshield.demo import DemoContext, DemoFailure, Stage


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _transport(ctx: DemoContext) -> str:
    from rich.table import Table

    from edgeshield.models import load_digits_split
    from edgeshield.server import ServeConfig, running
    from edgeshield.transport._h3client import h3_request
    from edgeshield.transport._relay import RelayConfig, running_relay

    work, kdir = ctx.workdir / "transport", ctx.state["kdir"]
    ca = work / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-gateway", role="server", server=True, sans=["127.0.0.1"])
    relay_tls = transport.issue(ca, name="relay-tls", role="relay", server=True, sans=["127.0.0.1"])
    relay_id = transport.issue(ca, name="relay-1", role="relay")
    alice = transport.issue(ca, name="alice", role="client")
    audit.generate_signing_key(work / "audit.key")
    h3_port = _free_udp_port()
    cfg = ServeConfig(bundle=ctx.state["bundle"], owner_key=kdir / "owner.pub", device_key=kdir / "device.key",
                      ca=ca, cert=server.cert_path, key=server.key_path, audit_db=work / "audit.db",
                      audit_key=work / "audit.key", port=0, log_level="warning", ohttp=True, http3_port=h3_port)
    x = load_digits_split().x_test[:4].tolist()
    secret = json.dumps({"inputs": x}).encode()
    table = Table(title="end-to-end encrypted prediction through a relay (OHTTP), and one over HTTP/3")
    for col in ("path", "what happened", "what the middle saw"):
        table.add_column(col)
    with running(cfg) as (_server, _watcher, port):
        direct_ctx = transport.client_context(ca / "ca.crt", alice.cert_path, alice.key_path)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=direct_ctx, timeout=10) as c:
            direct = c.post("/v1/predict", json={"inputs": x}).json()["predictions"]
        ctx.step(1, 4, "OHTTP through the relay")
        rcfg = RelayConfig(gateway_url=f"https://127.0.0.1:{port}", ca=ca, cert=relay_tls.cert_path,
                           key=relay_tls.key_path, client_cert=relay_id.cert_path, client_key=relay_id.key_path,
                           port=0)
        with running_relay(rcfg) as (relay, relay_port):
            relay_url = f"https://127.0.0.1:{relay_port}"
            answer, seen = transport.predict_through(relay, relay_url, x, ca=ca, cert=alice.cert_path,
                                                     key=alice.key_path, gateway_name="edge-gateway")
            if answer["predictions"] != direct:
                raise DemoFailure("the OHTTP prediction differs from the direct one")
            request = next(s for s in seen if s.direction == "request")
            leaked = [w for w, needle in (("the inputs", secret[:40]), ("the client's name", b"alice"),
                                          ("the path", b"/v1/predict"),
                                          ("the answer", json.dumps(direct).encode()))
                      if any(needle in s.data for s in seen)]
            if leaked:
                raise DemoFailure(f"the relay saw {', '.join(leaked)} in the clear")
            sizes = " / ".join(f"{s.direction} {len(s.data):,} B" for s in seen)
            table.add_row("alice → relay → device (OHTTP)", f"predictions {answer['predictions']} (= direct)",
                          f"{sizes}, ciphertext only; starts {request.data[:12].hex()}…; no inputs, name, path or "
                          "answer in it")
            ctx.step(2, 4, "the relay replays what it forwarded")
            relay_ctx = transport.client_context(ca / "ca.crt", relay_id.cert_path, relay_id.key_path)
            with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=relay_ctx, timeout=10) as c:
                replay = c.post("/v1/predict", content=request.data,
                                headers={"content-type": "message/ohttp-req"}).status_code
            if replay < 400 or replay >= 500:
                raise DemoFailure(f"a replayed encapsulated request was answered {replay}")
            table.add_row("the relay replays that request to the device", f"refused {replay}", "-")
        ctx.step(3, 4, "HTTP/3")
        h3 = h3_request(f"https://127.0.0.1:{h3_port}/v1/predict", "POST", secret, ca=ca / "ca.crt",
                        cert=alice.cert_path, key=alice.key_path, headers={"content-type": "application/json"})
        if h3.status != 200 or h3.json()["predictions"] != direct:
            raise DemoFailure(f"the HTTP/3 prediction failed or differs: {h3.status}")
        table.add_row("alice → device over HTTP/3 (QUIC, UDP)", f"predictions {h3.json()['predictions']} (= direct)",
                      "mutual TLS 1.3 inside QUIC, client certificate required")
    ctx.tables.append(table)
    ctx.summary["transport"] = {"ohttp_bytes": {s.direction: len(s.data) for s in seen}, "relay_replay": replay,
                                "http3_status": h3.status, "leaked_to_relay": leaked}
    return (f"OHTTP through a relay: same predictions, the relay saw {len(request.data):,} B of ciphertext and its "
            f"replay was refused ({replay}); HTTP/3 with mutual TLS: same predictions")


STAGES = [Stage("Encrypt a prediction end to end through a relay (OHTTP), and serve HTTP/3", _transport)]
