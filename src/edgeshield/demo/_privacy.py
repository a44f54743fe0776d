"""Demo stage for privacy: a few rounds of differentially private federated learning on Flower's simulation engine,
ε from the accountant after every round, a poisoned client caught by robust aggregation, and the federated model
protected as a bundle like any other."""

from __future__ import annotations

from edgeshield.demo import DemoContext, DemoFailure, Stage

CLIENTS, ROUNDS, ATTACKER = 40, 3, 7


def _federated(ctx: DemoContext) -> str:
    from rich.table import Table

    from edgeshield import bundles, keys
    from edgeshield.fl import DPConfig, FLConfig, RoundRecord, protect_result, run_simulation

    cfg = FLConfig(clients=CLIENTS, clients_per_round=CLIENTS, rounds=ROUNDS, local_epochs=2, lr=0.1, alpha=1.0,
                   model="linear", seed=7, pretrain_on_root=True, max_update_norm=20.0,
                   dp=DPConfig(mode="central", clip=1.0, target_epsilon=8.0, delta=1e-5))
    events: list[object] = []

    def progress(record: RoundRecord) -> None:
        ctx.step(record.round, ROUNDS, f"round {record.round}: accuracy {record.accuracy:.3f}")

    result = run_simulation(cfg, malicious={ATTACKER: "scale:200"}, events=events.append, progress=progress,
                            num_cpus=2, client_cpus=0.5)
    table = Table(title=f"DP-FedAvg on Flower: {CLIENTS} clients (client {ATTACKER} sends updates boosted 200×), "
                        f"central DP, target ε = 8 at δ = 1e-5")
    for col in ("round", "accuracy", "ε (RDP)", "ε (PLD)", "updates refused", "outliers (reported only)"):
        table.add_column(col)
    for r in result.history:
        table.add_row(str(r.round), f"{r.accuracy:.3f}", f"{r.epsilon_rdp:.2f}" if r.epsilon_rdp else "–",
                      f"{r.epsilon_pld:.2f}" if r.epsilon_pld else "–",
                      "; ".join(f"{c}: {why}" for c, why in sorted(r.rejected.items())) or "–",
                      ", ".join(r.outliers) or "–")
    ctx.tables.append(table)
    flagged = {c for r in result.history for c in r.rejected}
    if flagged != {f"client-{ATTACKER}"}:
        raise DemoFailure(f"expected only the boosted client {ATTACKER} refused, got {sorted(flagged)}")
    if result.accuracy < 0.7:
        raise DemoFailure(f"the federated model reached only {result.accuracy:.3f} accuracy")
    kdir = ctx.state["kdir"]
    out = ctx.workdir / "federated.esb"
    manifest = protect_result(result, out, keys.load_owner_private_key(kdir / "owner.key"),
                              [keys.load_device_public_key(kdir / "device.pub")])
    checked = bundles.verify(out, keys.load_owner_public_key(kdir / "owner.pub"))
    if checked.metadata.get("fl.mode") != "central":
        raise DemoFailure("the federated bundle does not record its privacy guarantee")
    eps = result.history[-1].epsilon_rdp
    ctx.summary["federated"] = {"accuracy": round(result.accuracy, 4), "epsilon": eps, "delta": cfg.dp.delta,
                                "rounds": ROUNDS, "clients": CLIENTS, "refused": sorted(flagged),
                                "bundle": manifest.bundle_id, "seconds": round(result.seconds, 1)}
    return (f"{ROUNDS} rounds, accuracy {result.accuracy:.3f} at ε = {eps:.2f} (δ = 1e-5, RDP accountant); "
            f"boosted client {ATTACKER} refused every round (norm over the bound, fl.update_rejected); "
            "federated.esb records ε, δ, clip and mode in its signed metadata")


STAGES = [Stage("Train privately on Flower (DP-FedAvg), catch a poisoned client, protect the model", _federated)]
