"""`edgeshield fl server` / `edgeshield fl client`: a real Flower deployment over TLS from the EdgeShield PKI.

The server starts a Flower SuperLink with SuperNode authentication, registers the keys of the node certificates it
is given (checked against the CA and the CRL), waits for those nodes, trains, writes the result and stops. A client
starts a Flower SuperNode that verifies the SuperLink against the CA and authenticates with its certificate's key.
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
from edgeshield.errors import InvalidArgumentError

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
    crl: Annotated[Path | None, typer.Option("--crl", help="The CA's crl.pem: refuse revoked node certificates.")]
    = None,
    node_role: Annotated[str, typer.Option("--node-role", help="The role node certificates must carry.")]
    = "fl-client",
    host: Annotated[str, typer.Option("--host", help="Address the SuperLink listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Its HTTPS port (Fleet, Control, Runtime).")]
    = 9092,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")] = 2,
    local_epochs: Annotated[int, typer.Option("--local-epochs", min=1, help="Local steps per round.")] = 20,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Local learning rate.")] = 0.5,
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", help="The server's test set (.npz with x, y); default: the digits test split.")] = None,
    online_timeout: Annotated[float, typer.Option(
        "--online-timeout", min=1.0, help="Seconds to wait for every node to come online.")] = 300.0,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds the run may take.")] = 600.0,
    workdir: WorkdirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a Flower SuperLink over TLS with node auth, train on the given nodes, write the result, stop."""
    from edgeshield.fl._deploy import DeploymentError, SuperLink, write_app

    _plain_key(key)
    if not node_cert:
        raise InvalidArgumentError("give at least one --node-cert")
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
        run_config: dict[str, str | int | float] = {
            "num-server-rounds": rounds, "local-epochs": local_epochs, "lr": lr, "round-timeout": timeout,
            "allowed-nodes": " ".join(map(str, ids)), "out-dir": str(out.resolve()),
            "eval-data": str(eval_data.resolve()) if eval_data else "",
        }
        run_id = link.submit(write_app(work / "app"), run_config)
        outcome = link.wait_run(run_id, out, timeout)
    if not outcome.completed or outcome.result is None:
        raise DeploymentError(f"run {run_id} ended {outcome.status}")
    _report(outcome.result, outcome.seconds, out, as_json)


def _report(result: dict[str, Any], seconds: float, out: Path, as_json: bool) -> None:
    if as_json:
        emit_json({**result, "seconds": round(seconds, 2), "out": str(out)})
        return
    t = table(f"Federated run {result['run_id']} ({len(result['nodes'])} nodes, {seconds:.1f} s)",
              ("round", "clients' train loss", "test loss", "test accuracy"))
    for h in result["history"]:
        t.add_row(str(h["round"]), f"{h['train_loss']:.4f}", f"{h['loss']:.4f}", f"{h['accuracy']:.4f}")
    console.print(t)
    console.print(f"result and final parameters in {out}")


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
    run_for: Annotated[float | None, typer.Option(
        "--run-for", min=1.0, help="Stop after this many seconds (default: until stopped).")] = None,
    passphrase_env: PassphraseEnvOpt = None,
    workdir: WorkdirOpt = None,
) -> None:
    """Start a Flower SuperNode that verifies the SuperLink against the CA and authenticates with its PKI key."""
    from edgeshield.fl._deploy import SuperNode
    from edgeshield.keys import passphrase_from_env
    from edgeshield.transport._pki import check_key_pair, load_certificate, load_private_key

    if data is None and partition >= partitions:
        raise InvalidArgumentError(f"--partition {partition} is not below --partitions {partitions}")
    passphrase = passphrase_from_env(passphrase_env)
    check_key_pair(load_certificate(cert), load_private_key(key, passphrase), cert, key)
    node_config: dict[str, str | int | float] = (
        {"data": str(data.resolve())} if data is not None else {"partition-id": partition, "num-partitions": partitions}
    )
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
