"""Schemathesis against the live mutual-TLS server: every operation in the served OpenAPI document, fuzzed from the
schema (valid and invalid bodies), with all of Schemathesis's default checks — zero failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeshield import audit, transport
from edgeshield.server import ServeConfig

from _serving import protected_digits, serving

# 413 is a rejection too: a schema cannot say how many bytes a batch of `maxItems` inputs takes as JSON.
CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
"""


@pytest.mark.parametrize("with_spec", [True, False], ids=["bundle-spec", "derived-spec"])
def test_schemathesis_finds_nothing(tmp_path: Path, with_spec: bool) -> None:
    bundle, k = protected_digits(tmp_path)
    if not with_spec:  # the README's first example: protected without --input-spec
        from edgeshield import bundles, keys
        from edgeshield.models import digits_model_path

        bundle = tmp_path / "plain.esb"
        bundles.protect(digits_model_path(), bundle, signing_key=keys.load_owner_private_key(k / "owner.key"),
                        recipients=[keys.load_device_public_key(k / "device.pub")])
    ca = tmp_path / "ca"
    transport.init_ca(ca)
    server = transport.issue(ca, name="edge-1", role="server", server=True, sans=["127.0.0.1"])
    admin = transport.issue(ca, name="adm", role="admin")  # may call every operation, so none is only a 403
    audit.generate_signing_key(tmp_path / "audit.key")
    cfg = ServeConfig(bundle=bundle, owner_key=k / "owner.pub", device_key=k / "device.key", ca=ca,
                      cert=server.cert_path, key=server.key_path, audit_db=tmp_path / "audit.db",
                      audit_key=tmp_path / "audit.key", port=0, log_level="warning",
                      monitor_rules=_alert_only_rules(tmp_path / "rules.yaml"))
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    with serving(cfg) as (_srv, _watcher, port):
        result = _schemathesis(tmp_path, port, admin, ca)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "8 selected / 8 total" in result.stdout  # predict, model, healthz, metrics and the four admin routes


def _alert_only_rules(path: Path) -> Path:
    """The default pack with every rule that refuses requests disabled: this fuzzes the parser and the schemas (the
    admin API's included, with live alerts and events), not the monitor's responses, which a burst of invalid bodies
    would trip (tests/server/test_monitor_rules.py tests those)."""
    import yaml

    from edgeshield.monitor._rules import default_rules_path

    rules = yaml.safe_load(default_rules_path().read_text())
    for rule in rules:
        actions = {r if isinstance(r, str) else r["action"] for r in rule.get("responses", ["alert"])}
        if actions - {"alert"}:
            rule["enabled"] = False
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def _schemathesis(cwd: Path, port: int, cert: Any, ca: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    return subprocess.run(
        [str(exe), "--config-file", str(cwd / "schemathesis.toml"), "run", f"https://127.0.0.1:{port}/openapi.json",
         "--request-cert", str(cert.cert_path), "--request-cert-key", str(cert.key_path),
         "--tls-verify", str(ca / "ca.crt"),
         "--max-examples", "40", "--seed", "20261201", "--no-color"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )
