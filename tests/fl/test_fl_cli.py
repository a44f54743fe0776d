"""`edgeshield fl simulate`: a fresh Flower runtime of its own, so it lives in a module without a shared one (Ray runs
one runtime per process)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")


def test_fl_simulate_cli_reports_epsilon_per_round_and_protects_the_model(tmp_path: Path, keyset: Any) -> None:
    """A fresh Flower runtime through `fl simulate`: central DP, ε per round = epsilon_for, bundle opens."""
    from typer.testing import CliRunner

    from edgeshield.bundles import open_session
    from edgeshield.cli import _fl
    from edgeshield.models import load_digits_split
    from edgeshield.privacy import epsilon_for

    (tmp_path / "fl.toml").write_text(
        "clients = 4\nclients_per_round = 3\nrounds = 2\nlr = 0.5\n"
        "[dp]\nmode = 'central'\nnoise_multiplier = 1.2\nclip = 1.0\ndelta = 1e-5\n", encoding="utf-8")
    out = tmp_path / "fl.esb"
    result = CliRunner().invoke(_fl.app, [
        "simulate", "--config", str(tmp_path / "fl.toml"), "--out", str(out),
        "--signing-key", str(keyset.dir / "owner.key"), "--recipient", str(keyset.dir / "device.pub"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for rnd, record in enumerate(summary["history"], start=1):
        want = epsilon_for(1.2, 0.75, rnd, 1e-5)
        assert record["epsilon_rdp"] == pytest.approx(want.rdp)
        assert record["epsilon_pld"] == pytest.approx(want.pld)
    meta = summary["metadata"]
    assert meta["fl.mode"] == "central" and meta["fl.clip"] == "1" and meta["fl.clients"] == "4"
    session = open_session(out, keyset.owner_pub, keyset.device_priv)
    x = load_digits_split().x_test[:5]
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (5, 10)


def test_bad_config_through_the_cli_is_an_input_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgeshield.cli import _fl
    from edgeshield.errors import InvalidArgumentError

    (tmp_path / "fl.toml").write_text("clients = 4\nwhat = 1\n", encoding="utf-8")
    result = CliRunner().invoke(_fl.app, ["simulate", "--config", str(tmp_path / "fl.toml")])
    assert isinstance(result.exception, InvalidArgumentError) and result.exception.exit_code == 2


@pytest.mark.parametrize(("toml", "extra", "match"), [
    ("rounds = 2\nwhat = 1\n", [], "what: unknown key"),
    ("clients = 5\n", [], "clients: 5, but the deployment trains on the 1 registered"),
    ("rounds = 0\n", [], "rounds: must be at least 1"),
    ("secagg = true\n[dp]\nmode = 'distributed'\nnoise_multiplier = 1.0\n", [], "SecAgg\\+ in simulation only"),
    ("rounds = 1\n", ["--ledger", "ledger.sqlite", "--epsilon-budget", "1"], "--ledger needs central DP"),
    ("rounds = 1\n", ["--bundle", "fl.esb"], "--bundle needs --signing-key"),
])
def test_fl_server_refuses_a_bad_config_before_starting_flower(tmp_path: Path, toml: str, extra: list[str],
                                                               match: str) -> None:
    """`fl server --config`: the same FLConfig as `fl simulate`, checked (one line, exit 2) before any process."""
    from typer.testing import CliRunner

    from edgeshield.cli import _fl
    from edgeshield.errors import InvalidArgumentError

    (tmp_path / "fl.toml").write_text(toml, encoding="utf-8")
    files = {n: tmp_path / n for n in ("ca.crt", "link.crt", "link.key", "node.crt")}
    result = CliRunner().invoke(_fl.app, [
        "server", "--ca-cert", str(files["ca.crt"]), "--cert", str(files["link.crt"]), "--key", str(files["link.key"]),
        "--node-cert", str(files["node.crt"]), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "fl.toml"),
        "--workdir", str(tmp_path / "work"), *extra])
    assert isinstance(result.exception, InvalidArgumentError), result.output
    assert result.exception.exit_code == 2 and re.search(match, str(result.exception)), str(result.exception)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()  # nothing was started


def test_deploy_config_without_a_file_maps_the_deployment_defaults() -> None:
    from edgeshield.fl import FLConfig
    from edgeshield.fl._deploy import DEFAULT_LOCAL_EPOCHS, DEFAULT_LR, DEFAULT_ROUNDS, deploy_config

    cfg = deploy_config(nodes=3)
    assert cfg == FLConfig(clients=3, clients_per_round=3, rounds=DEFAULT_ROUNDS, local_epochs=DEFAULT_LOCAL_EPOCHS,
                           lr=DEFAULT_LR)
    assert deploy_config(nodes=3, rounds=5, lr=0.1).rounds == 5
