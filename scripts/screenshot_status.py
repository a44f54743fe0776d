#!/usr/bin/env python3
"""Regenerate docs/img/status-page.png: a real server on 127.0.0.1, a small attack, the page in headless chromium.

Needs Debian's chromium (/usr/bin/chromium) and playwright (the dev extra). What it stages: a client that keeps
calling an endpoint its role may not use (the default rule pack blocks it), an input burst that is refused, and
connections without a client certificate; then the admin's browser opens /status and the page is captured.

    python scripts/screenshot_status.py [--out docs/img/status-page.png]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = "/usr/bin/chromium"


def _stage(root: Path) -> dict[str, Any]:
    from edgeshield import audit, bundles, keys, transport
    from edgeshield.adversarial import METADATA_KEY
    from edgeshield.models import digits_input_spec, digits_model_path
    from edgeshield.server import ServeConfig

    k = root / "keys"
    keys.init_keys(k)
    bundle = root / "digits.esb"
    bundles.protect(digits_model_path(), bundle, signing_key=keys.load_owner_private_key(k / "owner.key"),
                    recipients=[keys.load_device_public_key(k / "device.pub")],
                    metadata={METADATA_KEY: digits_input_spec().to_json()})
    ca = root / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {name: transport.issue(ca, name=name, role=role)
             for name, role in (("ops-admin", "admin"), ("camera-17", "client"), ("kiosk-3", "client"))}
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, log_level="warning")
    return {"cfg": cfg, "ca": ca, "certs": certs, "server_cert": server.cert_path}


def _client(world: dict[str, Any], name: str, url: str) -> httpx.Client:
    from edgeshield import transport

    cert = world["certs"][name]
    ctx = transport.client_context(world["ca"] / "ca.crt", cert.cert_path, cert.key_path)
    return httpx.Client(base_url=url, verify=ctx, timeout=10)


def _attack(world: dict[str, Any], url: str, port: int) -> None:
    with _client(world, "kiosk-3", url) as c:  # honest traffic
        for _ in range(3):
            c.post("/v1/predict", json={"inputs": [[0.0] * 64]})
    with _client(world, "camera-17", url) as c:
        for _ in range(4):
            c.post("/v1/predict", json={"inputs": [[5.0] * 64]})  # out of the spec's range: refused, audited
        for path in ("/metrics", "/openapi.json", "/status") * 7:  # what its role may not call: blocked
            c.get(path)
    no_cert = ssl.create_default_context(cafile=str(world["ca"] / "ca.crt"))
    for _ in range(3):  # a peer without a client certificate
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                no_cert.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.recv(1)
    time.sleep(1.5)  # the aggregated handshake failures are written once a second


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "img" / "status-page.png")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from edgeshield.server import running

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        world = _stage(root)
        _srv, _watcher, port = stack.enter_context(running(world["cfg"]))  # with the server's own monitor
        url = f"https://127.0.0.1:{port}"
        _attack(world, url, port)
        os.environ["NODE_EXTRA_CA_CERTS"] = str(world["ca"] / "ca.crt")  # Playwright's relay checks the server
        admin = world["certs"]["ops-admin"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1280, "height": 900}, client_certificates=[
                {"origin": url, "certPath": str(admin.cert_path), "keyPath": str(admin.key_path)}])
            page = context.new_page()
            response = page.goto(url + "/status")
            if response is None or response.status != 200:
                print(f"the page did not load: {response.status if response else 'no response'}", file=sys.stderr)
                return 1
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
