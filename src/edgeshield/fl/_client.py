"""The Flower ClientApp: local training on the device's own shard, local DP when configured, attacks for evaluation.

A train message carries the global model (``arrays``) and a ConfigRecord (``config``) with the round, the client
id the server knows this node by, the job (the FLConfig as JSON, from which the client derives its own shard), the
clip and noise multiplier in force, and in simulation the attack this client plays and where its ledger lives.
The reply carries the update (``arrays``: trained − global), ``metrics`` (``num-examples``, ``train-loss``) and
``meta`` (``round``, ``client``, ``status`` = ``ok`` | ``refused``, ``reason``).

Under local DP the client clips its update to the clip (Flower's ``clip_inputs_inplace``), adds
N(0, (z·clip)²) from :func:`edgeshield.privacy.gaussian_noise`, and its own :class:`~edgeshield.privacy.PrivacyLedger`
is checked BEFORE anything is trained or sent: a client over its budget replies ``refused`` with no update.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield.errors import InvalidArgumentError
from edgeshield.fl._attacks import parse_attack
from edgeshield.fl._config import FLConfig
from edgeshield.fl._data import federated_data
from edgeshield.fl._model import local_update

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

__all__ = ["client_id", "make_client_app", "train_reply"]


def client_id(cid: int) -> str:
    return f"client-{cid}"


def clip_vector(vector: np.ndarray, clip: float) -> tuple[np.ndarray, bool]:
    """``vector`` scaled down to L2 norm ``clip`` (Flower's FlatClip, ``clip_inputs_inplace``); whether it was cut."""
    from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

    out = np.array(vector, dtype=np.float64, copy=True)
    norm = get_norm([out])
    if norm == 0.0:  # Flower's helper divides by the norm
        return out, False
    clip_inputs_inplace([out], clip)
    return out, norm > clip


def job_config(config: Any) -> FLConfig:
    return FLConfig.from_dict(json.loads(str(config["job"])))


def _num(config: Any, key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"train message: {key!r} is not a number")
    return float(value)


def _local_dp(
    update: list[np.ndarray], cfg: FLConfig, cid: int, server_round: int, z: float, clip: float, ledger_dir: str
) -> list[np.ndarray] | str:
    """The clipped, noised update, or the reason the client's own ledger refuses the release."""
    from edgeshield.fl._updates import flatten, template_of, unflatten
    from edgeshield.privacy import BudgetExceededError, GaussianMechanism, PrivacyLedger, epsilon_for

    budget = cfg.dp.client_budget
    if budget is None:  # what the run is configured to spend: every round, no amplification (the server sees it)
        budget = epsilon_for(z, 1.0, cfg.rounds, cfg.dp.delta).rdp * (1 + 1e-9)
    Path(ledger_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    ledger = PrivacyLedger(Path(ledger_dir) / f"{client_id(cid)}.sqlite", epsilon_budget=budget, delta=cfg.dp.delta)
    try:
        try:
            ledger.check(client_id(cid), z, 1.0)
        except BudgetExceededError as exc:
            return str(exc)
        template = template_of(update)
        clipped, _ = clip_vector(flatten(update), clip)
        noised = np.asarray(GaussianMechanism(clip, z * clip).release(clipped))  # exact, Mironov-safe release
        ledger.spend(client_id(cid), server_round, z, 1.0)
        return unflatten(noised, template)
    finally:
        close = getattr(ledger, "close", None)
        if callable(close):
            close()


def _checked(x: np.ndarray, y: np.ndarray, reference: tuple[np.ndarray, np.ndarray] | None,
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """The device's data check before it trains (schema, then label consistency against the root set): the rows
    kept, and how many were held back."""
    from edgeshield.fl._validate import check_local_data
    from edgeshield.models import digits_input_spec

    report = check_local_data(x, y, digits_input_spec(), num_classes=10, reference=reference)
    return x[report.kept], y[report.kept], len(y) - len(report.kept)


def train_reply(msg: Message) -> Message:
    """Handle one train message (the body of the ClientApp's ``train``)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    config = msg.content.config_records["config"]
    cfg = job_config(config)
    cid, server_round = int(_num(config, "cid")), int(_num(config, "server-round"))
    attack = parse_attack(str(config["attack"])) if str(config.get("attack", "")) else None
    reference: tuple[np.ndarray, np.ndarray] | None = None
    if "data" in msg.content.array_records:  # a custom data set (simulation only): this client's shard travels
        shard = msg.content.array_records["data"].to_numpy_ndarrays()
        x, y = shard[0], shard[1]
    else:
        fed = federated_data(cfg)
        x, y = fed.clients[cid]
        reference = fed.root  # the server's clean root set: what the device's labels are checked against
    meta: dict[str, Any] = {"round": server_round, "client": client_id(cid), "status": "ok", "reason": ""}
    held_back = 0
    if attack is not None and attack.poisons_data:
        x, y = attack.poison_data(x, y, seed=cfg.seed + cid)  # a malicious device skips the check below
    elif cfg.validate_data:
        x, y, held_back = _checked(x, y, reference)
        if len(y) == 0:
            meta.update(status="refused", reason="no local example passed the data check")
            content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "held-back": held_back}),
                                  "meta": ConfigRecord(meta)})
            return Message(content, reply_to=msg)
    params = msg.content.array_records["arrays"].to_numpy_ndarrays()
    update, loss = local_update(
        cfg.model, params, x, y, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        seed=cfg.seed * 100_003 + server_round * 1_009 + cid,
    )
    if cfg.dp.mode == "local" and (attack is None or attack.poisons_data):
        released = _local_dp(
            update, cfg, cid, server_round, _num(config, "noise-multiplier"), _num(config, "clip"),
            str(config["ledger-dir"]),
        )
        if isinstance(released, str):
            meta.update(status="refused", reason=released)
            content = RecordDict({"metrics": MetricRecord({"num-examples": len(y)}), "meta": ConfigRecord(meta)})
            return Message(content, reply_to=msg)
        update = released
    if attack is not None:
        update = attack.poison_update(update)
        meta["round"] = attack.round_sent(server_round)
    content = RecordDict(
        {
            "arrays": ArrayRecord([np.asarray(u) for u in update]),
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss, "held-back": held_back}),
            "meta": ConfigRecord(meta),
        }
    )
    return Message(content, reply_to=msg)


def make_client_app() -> ClientApp:
    """The ClientApp every simulated or deployed SuperNode runs."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from edgeshield.fl._secagg import is_secagg_message, secagg_client_reply

        if is_secagg_message(msg):  # a SecAgg+ stage (secagg = true): Flower's secaggplus_mod, see _secagg
            return secagg_client_reply(msg, context)
        return train_reply(msg)

    return app
