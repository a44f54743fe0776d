"""`edgeshield fl ...`: federated learning on Flower with EdgeShield's DP and robust aggregation.

``fl simulate`` runs a config on Flower's simulation engine, prints accuracy and ε per round, and with ``--out``
protects the final model as a bundle whose signed metadata records ε, δ, the clip and the mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json, requires
from edgeshield.errors import InvalidArgumentError, OutputExistsError

if TYPE_CHECKING:
    from edgeshield.fl import RoundRecord

app = typer.Typer(help="Federated learning on Flower: DP-FedAvg, robust aggregation, protected federated models.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Federated learning on Flower: DP-FedAvg, robust aggregation, protected federated models."""


def _parse_malicious(items: list[str] | None) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in items or []:
        cid, sep, attack = item.partition("=")
        if not sep or not cid.strip().isdigit():
            raise InvalidArgumentError(f"--malicious {item!r}: expected CLIENT=ATTACK, e.g. 3=sign_flip")
        out[int(cid)] = attack.strip()
    return out


def _round_line(r: RoundRecord) -> str:
    pld = "no PLD (fixed-size sampling)" if r.epsilon_pld is None else f"{r.epsilon_pld:.3f} (PLD)"
    eps = "—" if r.epsilon_rdp is None else f"ε {r.epsilon_rdp:.3f} (RDP) / {pld}"
    flagged = f", rejected {', '.join(sorted(r.rejected))}" if r.rejected else ""
    refused = f", refused {', '.join(sorted(r.refused))}" if r.refused else ""
    return (f"round {r.round}: accuracy {r.accuracy:.4f}, {eps}, {len(r.clients)} clients"
            f"{flagged}{refused} ({r.seconds:.1f} s)")


@app.command("simulate")
@requires("fl")
def simulate(
    config: Annotated[Path, typer.Option("--config", help="FL config (TOML): clients, rounds, [dp], aggregator...")],
    out: Annotated[Path | None, typer.Option("--out", help="Protect the final model as this bundle.")] = None,
    signing_key: Annotated[
        Path | None, typer.Option("--signing-key", help="The owner's private signing key (with --out).")
    ] = None,
    recipient: Annotated[
        list[Path] | None, typer.Option("--recipient", help="A device public key for the bundle (repeatable).")
    ] = None,
    malicious: Annotated[
        list[str] | None,
        typer.Option("--malicious", help="CLIENT=ATTACK (sign_flip, scale, label_flip, backdoor; repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bundle.")] = False,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run federated training in Flower's simulation engine and report accuracy and ε per round."""
    from edgeshield import keys
    from edgeshield.fl import FLConfig, check_combination, protect_result, run_simulation

    cfg = FLConfig.from_toml(config)
    check_combination(cfg)
    attackers = _parse_malicious(malicious)
    owner: Any = None
    devices: list[Any] = []
    if out is not None:
        if signing_key is None or not recipient:
            raise InvalidArgumentError("--out needs --signing-key and at least one --recipient")
        if out.exists() and not force:
            raise OutputExistsError(f"{out} exists; use --force to overwrite it")
        owner = keys.load_owner_private_key(signing_key, keys.passphrase_from_env(passphrase_env))
        devices = [keys.load_device_public_key(p) for p in recipient]

    def progress(r: RoundRecord) -> None:
        if not as_json:
            console.print(_round_line(r), markup=False, highlight=False)

    result = run_simulation(cfg, malicious=attackers, progress=progress)
    manifest = protect_result(result, out, owner, devices) if out is not None else None
    if as_json:
        summary = result.to_dict()
        summary["bundle"] = str(out) if out is not None else None
        emit_json(summary)
        return
    if result.stop_reason:
        console.print(f"stopped: {result.stop_reason}", markup=False, highlight=False)
    console.print(f"final accuracy {result.accuracy:.4f} after {len(result.history)} rounds "
                  f"({result.seconds:.1f} s)", markup=False, highlight=False)
    if manifest is not None:
        console.print(f"protected: {out}", markup=False, highlight=False)


# --- deployment: `fl server` / `fl client` (real SuperLink and SuperNodes over TLS) are added below -------------
from edgeshield.cli import _fl_deploy  # noqa: E402 - the deployment commands live in their own module

app.command("server")(_fl_deploy.server)
app.command("client")(_fl_deploy.client)
