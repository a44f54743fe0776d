"""The real deployment path: a Flower SuperLink and three SuperNodes as processes on 127.0.0.1, TLS with
certificates from EdgeShield's PKI, SuperNode authentication with the keys of the nodes' PKI certificates, and the
simulation's strategy and ClientApp on them.

One federation serves the whole module (starting Flower costs seconds): it runs two rounds of central-DP FedAvg
with one compromised node sending absurd updates, then turns away a SuperNode that does not trust the SuperLink's
certificate and one whose key was never registered, and finally leaves no process behind.
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
from edgeshield.fl import DPConfig, FLConfig
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


# Central DP (z = 0.5: a large ε, but noise the accountant really charges for) on a model pretrained on the server's
# root set, so that three nodes can still learn something under it.
CONFIG = FLConfig(clients=3, clients_per_round=3, rounds=2, local_epochs=2, lr=0.5, pretrain_on_root=True,
                  dp=DPConfig(mode="central", noise_multiplier=0.5, clip=0.5, delta=1e-5))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca", name="EdgeShield FL Test CA")
    init_ca(d / "other", name="Some Other CA")
    server = issue(d / "ca", name="superlink", role=SERVER_ROLE, server=True, sans=["127.0.0.1", "localhost"])
    nodes = [issue(d / "ca", name=f"node-{i}", role=NODE_ROLE) for i in range(3)]
    rogue = issue(d / "ca", name="rogue", role=NODE_ROLE)  # a genuine certificate, never registered
    return {"dir": d, "ca": d / "ca" / "ca.crt", "crl": d / "ca" / "crl.pem", "other_ca": d / "other" / "ca.crt",
            "server": server, "nodes": nodes, "rogue": rogue}


@pytest.fixture(scope="module")
def federation(pki: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("fl-deploy")
    # node-2 is a compromised device (its own node config makes it send 10^6 x its update); the server cannot ask for it
    specs = [NodeSpec(c.info.name, c.cert_path, c.key_path, attack="scale:1000000" if i == 2 else None)
             for i, c in enumerate(pki["nodes"])]
    seen: list[Any] = []
    with LocalFederation(work, ca_cert=pki["ca"], server_cert=pki["server"].cert_path,
                         server_key=pki["server"].key_path, nodes=specs, crl=pki["crl"]) as fed:
        outcome = fed.train(CONFIG, timeout=90.0, ledger=work / "server-ledger.sqlite", epsilon_budget=100.0)
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


def test_two_rounds_over_tls_run_edgeshields_strategy(federation: dict[str, Any]) -> None:
    from edgeshield.privacy import PrivacyLedger, epsilon_for

    outcome: RunOutcome = federation["outcome"]
    fed: LocalFederation = federation["fed"]
    assert outcome.completed
    result = outcome.result
    assert result is not None and result["rounds"] == 2 and result["stop_reason"] is None
    # trained on exactly the three registered nodes
    assert sorted(result["nodes"]) == sorted(fed.node_ids) and len(set(fed.node_ids)) == 3
    assert sorted(result["clients"].values()) == sorted(fed.node_ids)
    attacker = next(c for c, node in result["clients"].items() if node == fed.node_ids[2])
    history = result["history"]
    assert [h["round"] for h in history] == [1, 2]
    for rnd, h in enumerate(history, start=1):
        # ε after every round from the accountant, for the run's sampling rate (3 of 3)
        want = epsilon_for(0.5, 1.0, rnd, 1e-5)
        assert h["epsilon_rdp"] == pytest.approx(want.rdp) and h["epsilon_pld"] == pytest.approx(want.pld)
        assert h["clip"] == 0.5 and sorted(h["clients"]) == sorted(result["clients"])
        # the compromised node's absurd update is rejected at the door and reported, every round
        assert list(h["rejected"]) == [attacker] and h["rejected"][attacker].startswith("norm:"), h["rejected"]
        assert not h["refused"]
    rejections = [e for e in result["events"] if e["kind"] == "fl.update_rejected"]
    assert [(e["data"]["round"], e["data"]["client"]) for e in rejections] == [(1, attacker), (2, attacker)]
    assert result["privacy"] == {"mode": "central", "aggregator": "fedavg", "sampling": "poisson",
                                 "epsilon_rdp": history[-1]["epsilon_rdp"], "epsilon_pld": history[-1]["epsilon_pld"],
                                 "delta": 1e-5, "clip": 0.5, "noise_multiplier": 0.5}
    assert result["metadata"]["fl.mode"] == "central" and result["metadata"]["fl.clients"] == "3"
    # two honest nodes under that noise still end with a working model (0.89 when measured)
    assert result["final_accuracy"] > 0.7 and result["final_accuracy"] == history[-1]["accuracy"]
    # the server's ledger was charged every client's participation, every round, before each release
    with PrivacyLedger(federation["work"] / "server-ledger.sqlite", epsilon_budget=100.0, delta=1e-5) as ledger:
        assert sorted(ledger.clients()) == sorted(result["clients"])
        assert ledger.epsilon(attacker) == pytest.approx(history[-1]["epsilon_rdp"], rel=1e-6)
    assert outcome.params_path is not None
    with np.load(outcome.params_path) as params:
        shapes = [params[f"arr_{i}"].shape for i in range(len(params.files))]
    assert shapes == [(10, 64), (10,)]  # the PyTorch linear model's state_dict
    # it really was TLS with node auth: the SuperLink log says so, and the nodes activated with signed requests
    assert fed.link is not None and fed.link.process is not None
    log = fed.link.process.log_text()
    assert "Uvicorn running on https://127.0.0.1:" in log
    assert "SuperNode authentication is disabled" not in log
    assert log.count("Activated node_id=") == 3
    # nothing under ~/.flwr: Flower's home is the federation's private directory
    assert (federation["work"] / "superlink" / "flwr-home" / "config.toml").is_file()
    assert json.dumps(result)  # the result is plain JSON


def test_the_federated_model_ships_as_a_bundle(federation: dict[str, Any], keyset: Any, tmp_path: Path) -> None:
    """The deployment's result exports exactly like a simulation's: ONNX, protected, fl.* metadata signed."""
    from edgeshield.bundles import open_bundle
    from edgeshield.fl import protect_result
    from edgeshield.fl._deploy_app import load_dataset

    outcome: RunOutcome = federation["outcome"]
    result = outcome.fl_result()
    assert result.config == CONFIG and result.noise_multiplier == 0.5
    protect_result(result, tmp_path / "fl.esb", keyset.owner_priv, [keyset.device_pub])
    opened = open_bundle(tmp_path / "fl.esb", keyset.owner_pub, keyset.device_priv, check_digest=True)
    meta = opened.manifest.metadata
    assert outcome.result is not None
    eps = outcome.result["history"][-1]["epsilon_rdp"]
    assert meta["fl.epsilon"] == f"{eps:.6g}" and meta["fl.delta"] == "1e-05" and meta["fl.clip"] == "0.5"
    assert meta["fl.mode"] == "central" and meta["fl.aggregator"] == "fedavg" and meta["fl.rounds"] == "2"
    x, y = load_dataset(federation["fed"].eval_data)
    (logits,) = opened.session.run(None, {"input": x})
    assert abs(float(np.mean(np.argmax(logits, axis=1) == y)) - result.accuracy) < 0.01


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


# --- the node-local guard around the shared ClientApp, in process ---------------------------------------------------
def _train_message(cfg: FLConfig, *, attack: str, ledger_dir: Path) -> Any:
    import time

    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, RecordDict

    from edgeshield.fl._model import initial_params

    config = ConfigRecord({"server-round": 1, "cid": 0, "job": json.dumps(cfg.to_dict()), "attack": attack,
                           "clip": cfg.dp.clip, "noise-multiplier": 1.0, "ledger-dir": str(ledger_dir)})
    # as the SuperNode hands it over: addressed to this node, with an id the reply points back to
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": ArrayRecord(initial_params(cfg.model, cfg.seed)), "config": config}),
                   metadata=meta)


def test_a_node_trains_on_its_own_data_its_own_ledger_and_no_attack_the_server_asks_for(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from edgeshield.fl._deploy_app import build_client_app, partition, save_dataset
    from edgeshield.privacy import PrivacyLedger, epsilon_for

    cfg = FLConfig(clients=2, clients_per_round=2, rounds=1, dp=DPConfig(mode="local", noise_multiplier=1.0))
    data = save_dataset(tmp_path / "node.npz", *partition(0, 4))
    app = build_client_app()

    def node(**extra: Any) -> Context:
        return Context(run_id=1, node_id=1, node_config={"data": str(data), **extra}, state=RecordDict(),
                       run_config={})

    # the server asks for a NaN "attack" (which would also skip local DP) and names its own ledger directory
    server_dir = tmp_path / "server-chosen"
    reply = app(_train_message(cfg, attack="nan", ledger_dir=server_dir),
                node(**{"ledger-dir": str(tmp_path / "a"), "epsilon-budget": 100.0}))
    assert reply.content.config_records["meta"]["status"] == "ok"
    update = reply.content.array_records["arrays"].to_numpy_ndarrays()
    assert all(np.isfinite(u).all() for u in update)  # honest, and noised: the node's own ledger was charged
    assert "data" not in reply.content.array_records  # the node's data never leaves it
    assert not server_dir.exists()
    with PrivacyLedger(tmp_path / "a" / "client-0.sqlite", epsilon_budget=100.0, delta=cfg.dp.delta) as ledger:
        assert ledger.epsilon("client-0") == pytest.approx(epsilon_for(1.0, 1.0, 1, cfg.dp.delta).rdp, rel=1e-6)
    # what this node agreed to spend is its budget, not the run's: one round at z = 1 costs more than ε = 1
    reply = app(_train_message(cfg, attack="", ledger_dir=server_dir),
                node(**{"ledger-dir": str(tmp_path / "b"), "epsilon-budget": 1.0}))
    meta = reply.content.config_records["meta"]
    assert meta["status"] == "refused" and "budget" in str(meta["reason"]), meta
    assert "arrays" not in reply.content.array_records
