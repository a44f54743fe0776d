"""The operator status page on the real mutual-TLS server, in a real browser (Debian's chromium driven by Playwright).

The browser presents the admin's (or the auditor's, or a client's) certificate through Playwright's
``client_certificates``. Playwright relays those connections through a local proxy that terminates the browser's
TLS and opens its own to the server with the certificate; that upstream connection verifies the server against the
test CA (``NODE_EXTRA_CA_CERTS``), so nothing here ignores certificate errors. A context without a certificate talks
to the server directly, and the launch pins exactly the server's key (``--ignore-certificate-errors-spki-list``), so
its handshake fails for the one reason under test: no client certificate.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html.parser
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield import audit, transport
from edgeshield.server import ServeConfig, build_state
from edgeshield.server._status import CSP, _verify, render

from _serving import mtls_client, protected_digits, serving

CHROMIUM = "/usr/bin/chromium"
SECTIONS = ("overall", "alerts", "responses", "revocations", "events", "audit", "compliance", "server")
ROLES = {"adm": "admin", "aud": "auditor", "alice": "client"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("status")
    bundle, k = protected_digits(root)
    ca, other = root / "ca", root / "other-ca"
    transport.init_ca(ca)
    transport.init_ca(other)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    certs = {name: transport.issue(ca, name=name, role=role) for name, role in ROLES.items()}
    audit.generate_signing_key(root / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=root / "audit.db",
                      audit_key=root / "audit.key", port=0, log_level="warning")
    state = build_state(cfg)  # the server's own monitor: the default rule pack
    with serving(cfg, state) as (_srv, _watcher, port):
        yield {"root": root, "ca": ca, "other_ca": other, "certs": certs, "server_cert": server.cert_path,
               "url": f"https://127.0.0.1:{port}", "port": port, "state": state}


def audit_entries(world: dict[str, Any]) -> list[audit.Entry]:
    return list(audit.AuditLog(world["root"] / "audit.db", readonly=True).entries())


# --- over plain HTTPS ---------------------------------------------------------------------------------------------
def test_headers_json_twin_and_roles(world: dict[str, Any]) -> None:
    for name in ("adm", "aud"):
        with mtls_client(world, name) as c:
            r = c.get("/status")
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert r.headers["cache-control"] == "no-store"
            for section in SECTIONS:
                assert f'id="{section}"' in r.text
            j = c.get("/status.json")
            assert j.status_code == 200 and j.headers["cache-control"] == "no-store"
            data = j.json()
            assert data["viewer"] == {"name": name, "role": ROLES[name]}
            assert data["server"]["bundle_id"] == world["state"].manifest.bundle_id
            assert data["audit"]["enabled"] and data["audit"]["verification"]["verifies"] is True
            assert data["audit"]["entries"] >= 3
            assert data["overall"]["level"] in ("ok", "warning", "critical")
            assert set(data) >= {"monitor", "compliance", "generated", "refresh_s"}
    with mtls_client(world, "alice") as c:
        assert c.get("/status").status_code == 403
        assert c.get("/status.json").status_code == 403
    forbidden = [e for e in audit_entries(world) if e.kind == "auth.forbidden" and e.actor == "alice"]
    assert {e.data["path"] for e in forbidden} >= {"/status", "/status.json"}


def test_audit_verification_is_throttled(world: dict[str, Any]) -> None:
    """Refreshing cannot make the server re-verify its whole log on every request."""
    with mtls_client(world, "adm") as c:
        first = c.get("/status.json").json()["audit"]["verification"]
        for _ in range(5):
            again = c.get("/status.json").json()["audit"]["verification"]
            assert again["checked_at"] == first["checked_at"]  # the cached result, with its age
        assert again["age_s"] >= 0


def test_a_tampered_log_is_shown_as_not_verifying(tmp_path: Path) -> None:
    log = audit.AuditLog(tmp_path / "a.db", signing_key=audit.generate_signing_key(tmp_path / "k"))
    for i in range(5):
        log.append("inference.predict", "alice", {"batch": i})
    log.checkpoint()
    assert _verify(log)["verifies"] is True
    with contextlib.closing(sqlite3.connect(tmp_path / "a.db")) as conn:  # an attacker with the file rewrites an entry
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            conn.execute(f'DROP TRIGGER "{name}"')
        conn.execute("UPDATE entries SET actor = 'mallory' WHERE seq = 2")
        conn.commit()
    check = _verify(log)
    assert check["verifies"] is False and "entry" in check["problem"]
    page = render({"generated": time.time(), "audit": {"enabled": True, "entries": 6, "verification": check},
                   "monitor": {"enabled": False}, "server": {}, "compliance": {}})
    assert "does NOT verify" in page and 'class="banner critical"' in page


# --- escaping -----------------------------------------------------------------------------------------------------
_ALLOWED_TAGS = {"html", "head", "meta", "link", "title", "style", "body", "header", "h1", "h2", "p", "main",
                 "section", "div", "table", "thead", "tbody", "tr", "th", "td", "span", "code", "dl", "dt", "dd"}
_ALLOWED_ATTRS = {"lang", "charset", "http-equiv", "content", "name", "rel", "href", "class", "id", "role"}


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _hostile_data(s: str, n: float) -> dict[str, Any]:
    row = {"ts": n, "rule": s, "severity": s, "key": f"identity:{s}", "count": s, "output": s, "tags": [s, s]}
    return {
        "generated": 1.7e9, "refresh_s": 10, "viewer": {"name": s, "role": s},
        "server": {"bundle_id": s, "model_version": s, "model_sha256": s, "created": s, "started": n, "uptime_s": n},
        "monitor": {"enabled": True, "alerts": [row], "counters": {"events": s, "alerts": s},
                    "responses": [{"action": s, "target": s, "rule": s, "since": n, "until": n, "reason": s}],
                    "pending_revocations": [{"serial": s, "identity": s, "rule": s, "since": s}],
                    "recent_events": [{"ts": s, "kind": s, "actor": s, "address": s, "summary": s}]},
        "audit": {"enabled": True, "entries": s, "latest_checkpoint": {"tree_size": s, "ts": s},
                  "verification": {"verifies": False, "checked_at": n, "problem": s, "entries_checked": s}},
        "compliance": {"available": True, "summary": {"regulations": {s: {"pass": s, "fail": 1}}, "generated": s}},
    }


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>', "</style><style>*{}", "&amp;<!--",
     "' onmouseover='x", "javascript:alert(1)", "<meta http-equiv=refresh content=0;url=//evil>"]),
    st.floats(allow_nan=True, allow_infinity=True) | st.floats(min_value=1e9, max_value=2e9))
def test_every_value_is_escaped(s: str, n: float) -> None:
    """Whatever a client or a rule file puts in an event, the page stays our markup: no new tag, no new attribute."""
    page = render(_hostile_data(s, n))
    parser = _Tags()
    parser.feed(page)
    assert {t for t, _ in parser.tags} <= _ALLOWED_TAGS
    for tag, attrs in parser.tags:
        assert {a for a, _ in attrs} <= _ALLOWED_ATTRS, (tag, attrs)
        if tag == "meta":
            assert dict(attrs).get("content") in (None, "10", "width=device-width, initial-scale=1", "noindex")
        if tag == "link":
            assert dict(attrs).get("href") == "data:,"
    assert sum(t == "style" for t, _ in parser.tags) == 1 and page.count("<style>") == 1
    if s.strip():
        assert s.strip() in "".join(parser.text)  # shown, as text


# --- in a real browser --------------------------------------------------------------------------------------------
def _spki_sha256(cert_path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _need_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium (make test does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is missing: pip install -e '.[dev]' (make test does)")


@pytest.fixture(scope="module")
def browser(world: dict[str, Any]) -> Iterator[Any]:
    _need_browser()
    from playwright.sync_api import sync_playwright

    before = os.environ.get("NODE_EXTRA_CA_CERTS")
    os.environ["NODE_EXTRA_CA_CERTS"] = str(world["ca"] / "ca.crt")  # read once, when the driver starts
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", f"--ignore-certificate-errors-spki-list={_spki_sha256(world['server_cert'])}"])
            yield b
            b.close()
    finally:
        if before is None:
            os.environ.pop("NODE_EXTRA_CA_CERTS", None)
        else:
            os.environ["NODE_EXTRA_CA_CERTS"] = before


@contextlib.contextmanager
def page_as(browser: Any, world: dict[str, Any], name: str | None) -> Iterator[tuple[Any, dict[str, list[Any]]]]:
    """A fresh context presenting ``name``'s certificate (none for None), its page, and what the page did."""
    certs = [] if name is None else [{"origin": world["url"], "certPath": str(world["certs"][name].cert_path),
                                      "keyPath": str(world["certs"][name].key_path)}]
    context = browser.new_context(client_certificates=certs, viewport={"width": 1280, "height": 900})
    seen: dict[str, list[Any]] = {"console": [], "requests": [], "errors": []}
    try:
        page = context.new_page()
        page.on("console", lambda m: seen["console"].append((m.type, m.text)))
        page.on("pageerror", lambda e: seen["errors"].append(str(e)))
        page.on("request", lambda r: seen["requests"].append(r.url))
        yield page, seen
    finally:
        context.close()


def test_admin_sees_the_page_in_a_browser(browser: Any, world: dict[str, Any], tmp_path: Path) -> None:
    with page_as(browser, world, "adm") as (page, seen):
        response = page.goto(world["url"] + "/status")
        assert response is not None and response.status == 200
        assert response.headers["content-security-policy"] == CSP
        for section in SECTIONS:
            assert page.locator(f"#{section}").is_visible()
        assert "Audit log" in page.locator("#audit").inner_text()
        assert "verifies" in page.locator("#audit").inner_text()
        assert "edgeshield comply report" in page.locator("#compliance").inner_text()
        # the stylesheet applied (allowed by its hash): the banner has its coloured background, not the default
        assert page.locator("#overall").evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
        page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)
        assert not seen["console"] and not seen["errors"]  # a CSP violation is reported on the console
        origin = world["url"] + "/"
        assert seen["requests"] and all(u.startswith(origin) for u in seen["requests"]), seen["requests"]
        # control: the listener does see a violation; an inline style the CSP has no hash for is refused
        page.evaluate("document.head.insertAdjacentHTML('beforeend', '<style>body{color:red}</style>')")
        page.wait_for_timeout(200)
        assert any("Content Security Policy" in text for _t, text in seen["console"]), seen["console"]
    assert (tmp_path / "status-page.png").stat().st_size > 10_000


def test_auditor_sees_it_and_a_client_is_forbidden(browser: Any, world: dict[str, Any]) -> None:
    with page_as(browser, world, "aud") as (page, seen):
        response = page.goto(world["url"] + "/status")
        assert response is not None and response.status == 200
        assert "aud (auditor)" in page.locator("#server").inner_text()
        assert not seen["console"]
    with page_as(browser, world, "alice") as (page, _seen):
        response = page.goto(world["url"] + "/status")
        assert response is not None and response.status == 403
        assert "may not GET /status" in page.content()


def test_without_a_certificate_the_handshake_fails(browser: Any, world: dict[str, Any]) -> None:
    from playwright.sync_api import Error

    with page_as(browser, world, None) as (page, _seen), pytest.raises(Error, match=r"net::ERR_"):
        page.goto(world["url"] + "/status")
    deadline = time.monotonic() + 5  # failed handshakes are written as one aggregated entry a second
    reasons: dict[str, int] = {}
    while time.monotonic() < deadline and "PEER_DID_NOT_RETURN_A_CERTIFICATE" not in reasons:
        time.sleep(0.2)
        for e in audit_entries(world):
            if e.kind == "auth.failure" and e.data.get("stage") == "tls-handshake":
                reasons.update(e.data.get("reasons", {}))
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons


def test_the_browser_path_verifies_the_server(world: dict[str, Any]) -> None:
    """Trusting another CA, the same admin context gets no page: the server's certificate really is checked."""
    _need_browser()
    script = f"""
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    b = p.chromium.launch(executable_path={CHROMIUM!r}, headless=True, args=["--no-sandbox"])
    c = b.new_context(client_certificates=[{{"origin": {world["url"]!r},
        "certPath": {str(world["certs"]["adm"].cert_path)!r}, "keyPath": {str(world["certs"]["adm"].key_path)!r}}}])
    page = c.new_page()
    r = page.goto({world["url"] + "/status"!r})
    print(r.status, page.content()[:300])
    b.close()
"""
    env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(world["other_ca"] / "ca.crt")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("503") and "client-certificate error" in out.stdout, out.stdout


def test_a_block_shows_up_and_goes_away(browser: Any, world: dict[str, Any], tmp_path: Path) -> None:
    """alice keeps calling what her role may not (the default rbac_denials rule): blocked, shown, then lifted."""
    with mtls_client(world, "alice") as c:
        for _ in range(20):
            assert c.get("/status.json").status_code == 403
    mon = world["state"].security_monitor
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not mon.snapshot()["responses"]:
        time.sleep(0.05)
    with page_as(browser, world, "adm") as (page, seen):
        assert page.goto(world["url"] + "/status").status == 200
        responses = page.locator("#responses").inner_text()
        assert "Blocked" in responses and "client alice" in responses and "rbac_denials" in responses
        assert "rbac_denials" in page.locator("#alerts").inner_text()
        assert "auth.forbidden" in page.locator("#events").inner_text()
        assert "active response" in page.locator("#overall").inner_text()
        page.screenshot(path=str(tmp_path / "status-page-blocked.png"), full_page=True)
        assert not seen["console"]
        with mtls_client(world, "adm") as c:
            lifted = c.post("/v1/admin/monitor/lift", json={"action": "block", "target": "identity:alice"})
            assert lifted.status_code == 200 and lifted.json() == {"lifted": True}
        page.reload()
        assert "client alice" not in page.locator("#responses").inner_text()
