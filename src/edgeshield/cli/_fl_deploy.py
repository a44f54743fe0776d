"""`edgeshield fl server` / `edgeshield fl client`: a real Flower deployment over TLS from the EdgeShield PKI.

The server reads the FL config (``--config``, the TOML ``fl simulate`` takes; the population is the registered nodes),
checks it, starts a Flower SuperLink with SuperNode authentication, registers the keys of the node certificates it
is given (checked against the CA and the CRL), waits for those nodes, runs EdgeShield's strategy on them (the same
job as simulation: validation, robust aggregation, central DP with ε per round), writes the result, stops, and with
``--bundle`` exports and protects the final model. A client starts a Flower SuperNode that verifies the SuperLink
against the CA, authenticates with its certificate's key and trains on its own data file.
Registered as commands of the `fl` group (``app.command("server")(server)``, ``app.command("client")(client)``).
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json, requires
from edgeshield.cli._tables import table
from edgeshield.errors import InvalidArgumentError, OutputExistsError

CaCertOpt = Annotated[Path, typer.Option("--ca-cert", help="The EdgeShield CA certificate (ca.crt).")]
WorkdirOpt = Annotated[Path | None, typer.Option(
    "--workdir", help="Keep Flower's home, logs and the app here (0700) instead of a temporary directory.")]


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every Flower process this command started is stopped on the way out."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="edgeshield-fl-") as d:
        yield Path(d)


def _plain_key(path: Path) -> None:
    """Flower's SuperLink (uvicorn) reads its TLS key unencrypted: say so up front instead of failing in Flower."""
    head = path.read_bytes()[:64] if path.is_file() else b""
    if b"ENCRYPTED" in head:
        raise InvalidArgumentError(f"{path} is encrypted: Flower's SuperLink reads its TLS key without a passphrase; "
                                   "issue the server certificate without --key-passphrase-env")


@requires("fl", "flwr")
def server(
    ca_cert: CaCertOpt,
    cert: Annotated[Path, typer.Option("--cert", help="The SuperLink's server certificate (pki issue --server).")],
    key: Annotated[Path, typer.Option("--key", help="Its private key (unencrypted: Flower reads it as is).")],
    node_cert: Annotated[list[Path], typer.Option(
        "--node-cert", help="A SuperNode's client certificate; its key is registered for node auth. Repeat.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for result.json and params.npz.")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="FL config (TOML, as for fl simulate): rounds, [dp], aggregator... clients = the nodes.")]
    = None,
    crl: Annotated[Path | None, typer.Option("--crl", help="The CA's crl.pem: refuse revoked node certificates.")]
    = None,
    node_role: Annotated[str, typer.Option("--node-role", help="The role node certificates must carry.")]
    = "fl-client",
    host: Annotated[str, typer.Option("--host", help="Address the SuperLink listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Its HTTPS port (Fleet, Control, Runtime).")]
    = 9092,
    rounds: Annotated[int | None, typer.Option("--rounds", min=1, help="Federated rounds (overrides the config).")]
    = None,
    local_epochs: Annotated[int | None, typer.Option(
        "--local-epochs", min=1, help="Local epochs per round (overrides the config).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Local learning rate (overrides the config).")]
    = None,
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", help="The server's test set (.npz with x, y); default: the digits test split.")] = None,
    root_data: Annotated[Path | None, typer.Option(
        "--root-data", help="The server's root set for FLTrust / pretraining (.npz); default: digits examples.")]
    = None,
    ledger: Annotated[Path | None, typer.Option(
        "--ledger", help="The server's privacy ledger (SQLite) under central DP; needs --epsilon-budget.")] = None,
    epsilon_budget: Annotated[float | None, typer.Option(
        "--epsilon-budget", min=0.0, help="Each client's ε budget in the server's ledger.")] = None,
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", help="Export the final model and protect it as this bundle (fl.* metadata: ε, δ, clip, mode).")]
    = None,
    signing_key: Annotated[Path | None, typer.Option(
        "--signing-key", help="The owner's private signing key (with --bundle).")] = None,
    recipient: Annotated[list[Path] | None, typer.Option(
        "--recipient", help="A device public key for the bundle (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bundle.")] = False,
    passphrase_env: PassphraseEnvOpt = None,
    online_timeout: Annotated[float, typer.Option(
        "--online-timeout", min=1.0, help="Seconds to wait for every node to come online.")] = 300.0,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds the run (and each round) may take.")]
    = 600.0,
    workdir: WorkdirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a Flower SuperLink over TLS with node auth, run EdgeShield's strategy on the given nodes, stop."""
    from edgeshield.fl._deploy import DeploymentError, SuperLink, deploy_config, run_config, write_app
    from edgeshield.fl._deploy_app import load_result

    _plain_key(key)
    if not node_cert:
        raise InvalidArgumentError("give at least one --node-cert")
    # everything that can be refused is refused before Flower starts: the config, the ledger, the bundle's keys
    cfg = deploy_config(config, nodes=len(node_cert), rounds=rounds, local_epochs=local_epochs, lr=lr)
    if ledger is not None and (epsilon_budget is None or epsilon_budget <= 0 or cfg.dp.mode != "central"):
        raise InvalidArgumentError("--ledger needs central DP (dp.mode = 'central') and --epsilon-budget > 0")
    owner, devices = _bundle_keys(bundle, signing_key, recipient, force, passphrase_env)
    with _sigterm_unwinds(), _workdir(workdir) as work, \
            SuperLink(work / "superlink", ca_cert, cert, key, host=host, port=port) as link:
        ids = [link.register_certificate(c, name=c.stem, crl=crl, role=node_role) for c in node_cert]
        if not as_json:
            console.print(f"SuperLink on https://{link.address}: waiting for {len(ids)} node(s) "
                          f"({', '.join(str(i) for i in ids)})")
        deadline = time.monotonic() + online_timeout
        while True:
            online = {int(n["node-id"]) for n in link.nodes() if n.get("status") == "online"}
            if set(ids) <= online:
                break
            if time.monotonic() > deadline:
                raise DeploymentError(f"{len(set(ids) - online)} node(s) did not come online within "
                                      f"{online_timeout:.0f} s")
            time.sleep(1.0)
        run_id = link.submit(write_app(work / "app"), run_config(
            cfg, ids, out, eval_data=eval_data, root_data=root_data, round_timeout=timeout, ledger=ledger,
            epsilon_budget=epsilon_budget))
        outcome = link.wait_run(run_id, out, timeout)
    if not outcome.completed or outcome.result is None or "error" in outcome.result:
        why = (outcome.result or {}).get("error", "")
        raise DeploymentError(f"run {run_id} ended {outcome.status}" + (f": {why}" if why else ""))
    manifest = None
    if bundle is not None:
        from edgeshield.fl import protect_result

        manifest = protect_result(load_result(out), bundle, owner, devices)
    _report(outcome.result, outcome.seconds, out, bundle if manifest is not None else None, as_json)


def _bundle_keys(bundle: Path | None, signing_key: Path | None, recipient: list[Path] | None, force: bool,
                 passphrase_env: str | None) -> tuple[Any, list[Any]]:
    """The owner's signing key and the devices' public keys for ``--bundle``, loaded before anything starts."""
    if bundle is None:
        if signing_key is not None or recipient:
            raise InvalidArgumentError("--signing-key and --recipient go with --bundle")
        return None, []
    from edgeshield import keys

    if signing_key is None or not recipient:
        raise InvalidArgumentError("--bundle needs --signing-key and at least one --recipient")
    if bundle.exists() and not force:
        raise OutputExistsError(f"{bundle} exists; use --force to overwrite it")
    owner = keys.load_owner_private_key(signing_key, keys.passphrase_from_env(passphrase_env))
    return owner, [keys.load_device_public_key(p) for p in recipient]


def _report(result: dict[str, Any], seconds: float, out: Path, bundle: Path | None, as_json: bool) -> None:
    if as_json:
        emit_json({**result, "seconds": round(seconds, 2), "out": str(out),
                   "bundle": str(bundle) if bundle is not None else None})
        return
    privacy = result.get("privacy", {})
    t = table(f"Federated run {result['run_id']} ({len(result['nodes'])} nodes, {privacy.get('aggregator')}, "
              f"DP {privacy.get('mode')}, {seconds:.1f} s)",
              ("round", "test accuracy", "test loss", "ε (RDP / PLD)", "rejected"))
    for h in result["history"]:
        eps = "—" if h["epsilon_rdp"] is None else (
            f"{h['epsilon_rdp']:.3f} / " + ("—" if h["epsilon_pld"] is None else f"{h['epsilon_pld']:.3f}"))
        rejected = ", ".join(f"{c} ({r})" for c, r in sorted(h["rejected"].items())) or "—"
        t.add_row(str(h["round"]), f"{h['accuracy']:.4f}", f"{h['loss']:.4f}", eps, rejected)
    console.print(t)
    if result.get("stop_reason"):
        console.print(f"stopped: {result['stop_reason']}", markup=False, highlight=False)
    console.print(f"result and final parameters in {out}" + (f"; protected model: {bundle}" if bundle else ""),
                  markup=False, highlight=False)


@requires("fl", "flwr")
def client(
    superlink: Annotated[str, typer.Option("--superlink", help="The SuperLink's host:port.")],
    ca_cert: CaCertOpt,
    cert: Annotated[Path, typer.Option("--cert", help="This node's client certificate (pki issue).")],
    key: Annotated[Path, typer.Option("--key", help="Its private key: signs the node's requests (node auth).")],
    data: Annotated[Path | None, typer.Option(
        "--data", help="This node's local training set (.npz with x, y); default: a digits partition.")] = None,
    partition: Annotated[int, typer.Option("--partition", min=0, help="Digits partition (without --data).")] = 0,
    partitions: Annotated[int, typer.Option("--partitions", min=1, help="Number of digits partitions.")] = 1,
    ledger_dir: Annotated[Path | None, typer.Option(
        "--ledger-dir", help="This node's own privacy ledger under local DP (default: in the work directory).")]
    = None,
    epsilon_budget: Annotated[float | None, typer.Option(
        "--epsilon-budget", min=0.0, help="The ε this node agrees to spend under local DP (default: the run's).")]
    = None,
    run_for: Annotated[float | None, typer.Option(
        "--run-for", min=1.0, help="Stop after this many seconds (default: until stopped).")] = None,
    passphrase_env: PassphraseEnvOpt = None,
    workdir: WorkdirOpt = None,
) -> None:
    """Start a Flower SuperNode that verifies the SuperLink against the CA, authenticates with its PKI key and trains
    on its own data (EdgeShield's ClientApp: PyTorch, local DP with its own ledger, the data check)."""
    from edgeshield.fl._deploy import SuperNode
    from edgeshield.fl._deploy_app import load_dataset
    from edgeshield.keys import passphrase_from_env
    from edgeshield.transport._pki import check_key_pair, load_certificate, load_private_key

    if data is None and partition >= partitions:
        raise InvalidArgumentError(f"--partition {partition} is not below --partitions {partitions}")
    if data is not None:
        load_dataset(data)  # a malformed data file is refused here, not in every round
    passphrase = passphrase_from_env(passphrase_env)
    check_key_pair(load_certificate(cert), load_private_key(key, passphrase), cert, key)
    node_config: dict[str, str | int | float] = (
        {"data": str(data.resolve())} if data is not None else {"partition-id": partition, "num-partitions": partitions}
    )
    if ledger_dir is not None:
        ledger_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        node_config["ledger-dir"] = str(ledger_dir.resolve())
    if epsilon_budget is not None:
        if epsilon_budget <= 0:
            raise InvalidArgumentError("--epsilon-budget must be > 0")
        node_config["epsilon-budget"] = float(epsilon_budget)
    with _sigterm_unwinds(), _workdir(workdir) as work, \
            SuperNode(work / "supernode", superlink, ca_cert, key, node_config=node_config,
                      passphrase=passphrase, max_wait=60.0) as node:
        console.print(f"SuperNode {cert.stem} connecting to {superlink}")
        end = None if run_for is None else time.monotonic() + run_for
        while end is None or time.monotonic() < end:
            if node.wait_exit(1.0) is not None:
                refusal = node.refusal()
                if refusal is not None:
                    raise refusal
                return
        console.print(f"stopping after {run_for:.0f} s")
