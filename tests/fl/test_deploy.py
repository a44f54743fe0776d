"""The real deployment path: a Flower SuperLink and two SuperNodes as processes on 127.0.0.1, TLS with
certificates from EdgeShield's PKI, SuperNode authentication with the keys of the nodes' PKI certificates.

One federation serves the whole module (starting Flower costs seconds): it trains two rounds, then turns away a
SuperNode that does not trust the SuperLink's certificate and one whose key was never registered, and finally
leaves no process behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
from edgeshield.errors import CertificateError, CertificateRevokedError
from edgeshield.fl._deploy import (
    NODE_ROLE,
    SERVER_ROLE,
    LocalFederation,
    NodeSpec,
    RunOutcome,
    SuperNode,
    node_public_key,
    write_node_auth_key,
)
from edgeshield.transport import init_ca, issue, revoke

# Flower's FAB builder uses pathspec's deprecated 'gitwildmatch' patterns (not ours to fix)
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca", name="EdgeShield FL Test CA")
    init_ca(d / "other", name="Some Other CA")
    server = issue(d / "ca", name="superlink", role=SERVER_ROLE, server=True, sans=["127.0.0.1", "localhost"])
    nodes = [issue(d / "ca", name=f"node-{i}", role=NODE_ROLE) for i in range(2)]
    rogue = issue(d / "ca", name="rogue", role=NODE_ROLE)  # a genuine certificate, never registered
    return {"dir": d, "ca": d / "ca" / "ca.crt", "crl": d / "ca" / "crl.pem", "other_ca": d / "other" / "ca.crt",
            "server": server, "nodes": nodes, "rogue": rogue}


@pytest.fixture(scope="module")
def federation(pki: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("fl-deploy")
    specs = [NodeSpec(c.info.name, c.cert_path, c.key_path) for c in pki["nodes"]]
    seen: list[Any] = []
    with LocalFederation(work, ca_cert=pki["ca"], server_cert=pki["server"].cert_path,
                         server_key=pki["server"].key_path, nodes=specs, crl=pki["crl"]) as fed:
        outcome = fed.train(rounds=2, timeout=90.0)
        seen = fed.processes()
        yield {"fed": fed, "outcome": outcome, "work": work, "seen": seen}
        seen.extend(fed.processes())
    # after the block: nothing left running, by pid and start time (psutil)
    leftovers = [p for p in seen if _running(p)]
    assert not leftovers, f"processes left behind: {[p.pid for p in leftovers]}"


def _running(p: Any) -> bool:
    import psutil

    try:
        return bool(p.is_running()) and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_two_rounds_over_tls_train_the_model(federation: dict[str, Any]) -> None:
    outcome: RunOutcome = federation["outcome"]
    fed: LocalFederation = federation["fed"]
    assert outcome.completed
    result = outcome.result
    assert result is not None and result["rounds"] == 2
    # trained on exactly the two registered nodes
    assert sorted(result["nodes"]) == sorted(fed.node_ids) and len(set(fed.node_ids)) == 2
    history = result["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert result["initial"]["accuracy"] < 0.2  # all-zero start: chance
    assert history[0]["loss"] < result["initial"]["loss"]
    assert history[1]["train_loss"] < history[0]["train_loss"]  # clients' reported loss goes down
    assert history[-1]["accuracy"] > 0.8 and result["final_accuracy"] == history[-1]["accuracy"]
    assert outcome.params_path is not None
    with np.load(outcome.params_path) as params:
        shapes = [params[k].shape for k in sorted(params.files)]
    assert shapes == [(64, 10), (10,)]
    # it really was TLS with node auth: the SuperLink log says so, and the nodes activated with signed requests
    assert fed.link is not None and fed.link.process is not None
    log = fed.link.process.log_text()
    assert "Uvicorn running on https://127.0.0.1:" in log
    assert "SuperNode authentication is disabled" not in log
    assert log.count("Activated node_id=") == 2
    # nothing under ~/.flwr: Flower's home is the federation's private directory
    assert (federation["work"] / "superlink" / "flwr-home" / "config.toml").is_file()
    assert json.dumps(result)  # the result is plain JSON


def test_nodes_without_the_right_ca_or_with_an_unregistered_key_are_refused(
        federation: dict[str, Any], pki: dict[str, Any]) -> None:
    fed: LocalFederation = federation["fed"]
    assert fed.link is not None
    work = federation["work"]
    # a registered key but the wrong CA: the node does not trust the SuperLink, TLS fails before authentication
    wrong_ca = SuperNode(work / "wrong-ca", fed.link.address, pki["other_ca"], pki["nodes"][0].key_path,
                         max_wait=5.0, max_retries=1)
    # a genuine certificate of the CA whose key the SuperLink never registered
    rogue = SuperNode(work / "rogue", fed.link.address, pki["ca"], pki["rogue"].key_path, max_wait=5.0,
                      max_retries=1)
    with wrong_ca, rogue:  # both at once: each takes seconds to start and give up
        for sn in (wrong_ca, rogue):
            federation["seen"].extend(sn.process.processes() if sn.process else [])
        codes = [wrong_ca.wait_exit(30.0), rogue.wait_exit(30.0)]
        refusals = [wrong_ca.refusal(), rogue.refusal()]
        auth_key = rogue.workdir / "node-auth.key"
        assert auth_key.stat().st_mode & 0o777 == 0o600
        online = {int(n["node-id"]) for n in fed.link.nodes() if n.get("status") == "online"}
    assert not auth_key.exists()  # the clear OpenSSH copy of the key is removed when the node stops
    assert all(c not in (None, 0) for c in codes), codes
    assert refusals[0] is not None and refusals[0].reason == "tls", refusals[0]
    assert refusals[1] is not None and refusals[1].reason == "auth", refusals[1]
    assert online == set(fed.node_ids)  # neither got in; the federation's own nodes are still there


def test_cli_refuses_bad_credentials_before_starting_flower(pki: dict[str, Any], tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from edgeshield.cli._fl_deploy import client, server
    from edgeshield.errors import InvalidArgumentError, KeyFileError

    app = typer.Typer()
    app.command("server")(server)
    app.command("client")(client)
    enc = issue(pki["dir"] / "ca", name="enc-link", role=SERVER_ROLE, server=True, sans=["127.0.0.1"],
                key_passphrase=b"secret")
    r = CliRunner().invoke(app, ["server", "--ca-cert", str(pki["ca"]), "--cert", str(enc.cert_path),
                                 "--key", str(enc.key_path), "--node-cert", str(pki["nodes"][0].cert_path),
                                 "--out", str(tmp_path / "out")])
    assert isinstance(r.exception, InvalidArgumentError) and "encrypted" in str(r.exception)
    r = CliRunner().invoke(app, ["client", "--superlink", "127.0.0.1:1", "--ca-cert", str(pki["ca"]),
                                 "--cert", str(pki["nodes"][0].cert_path), "--key", str(pki["nodes"][1].key_path)])
    assert isinstance(r.exception, KeyFileError) and "does not belong" in str(r.exception)


# --- the PKI binding, without processes ----------------------------------------------------------------------------
def test_only_valid_node_certificates_of_the_ca_are_registered(pki: dict[str, Any], tmp_path: Path) -> None:
    ca, crl = pki["ca"], pki["crl"]
    key = node_public_key(pki["nodes"][0].cert_path, ca, crl_path=crl)
    assert key.startswith(b"ecdsa-sha2-nistp256 ")
    # another CA's certificate
    init_ca(tmp_path / "ca2")
    foreign = issue(tmp_path / "ca2", name="node-0", role=NODE_ROLE)
    with pytest.raises(CertificateError, match=r"not issued by|valid signature"):
        node_public_key(foreign.cert_path, ca)
    # a server certificate, or the wrong role
    with pytest.raises(CertificateError, match="not a client certificate"):
        node_public_key(pki["server"].cert_path, ca, role=None)
    op = issue(pki["dir"] / "ca", name="operator-1", role="operator")
    with pytest.raises(CertificateError, match="role 'operator'"):
        node_public_key(op.cert_path, ca)
    # expired
    past = datetime.now(UTC) - timedelta(days=3)
    old = issue(pki["dir"] / "ca", name="old-node", role=NODE_ROLE, not_before=past,
                not_after=past + timedelta(days=1))
    with pytest.raises(CertificateError, match="not valid now"):
        node_public_key(old.cert_path, ca)
    # revoked, seen through the CRL
    gone = issue(pki["dir"] / "ca", name="gone-node", role=NODE_ROLE)
    revoke(pki["dir"] / "ca", name="gone-node", reason="key-compromise")
    with pytest.raises(CertificateRevokedError):
        node_public_key(gone.cert_path, ca, crl_path=crl)


def test_node_auth_key_is_the_pki_key_in_openssh_form(pki: dict[str, Any], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    node = pki["nodes"][1]
    out = write_node_auth_key(node.key_path, tmp_path / "k")
    assert out.stat().st_mode & 0o777 == 0o600
    ssh = serialization.load_ssh_private_key(out.read_bytes(), None)
    pub = ssh.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert pub == node_public_key(node.cert_path, pki["ca"])
