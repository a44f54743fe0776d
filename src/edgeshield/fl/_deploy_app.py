"""The Flower app a deployment runs: ``ServerApp`` and ``ClientApp`` factories for the federated digits model.

The FAB that ``edgeshield.fl._deploy`` builds is a stub that calls these factories, so every SuperNode runs the
EdgeShield code installed on it, not code shipped in the bundle. The server trains only on the SuperNodes it was
told to trust (``allowed-nodes``, the node ids it registered from PKI certificates): a node someone else registered
through Flower's open Control API is never sent the model and never averaged in.

Run config (``[tool.flwr.app.config]``): ``num-server-rounds``, ``local-epochs``, ``lr``, ``round-timeout``
(seconds), ``allowed-nodes`` (space-separated node ids), ``out-dir`` (where ``result.json`` and ``params.npz``
go), ``eval-data`` (the server's .npz test set; empty: the digits test split). Node config: ``data`` (the node's
local .npz), else ``partition-id`` and ``num-partitions`` pick its share of the digits training set.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield._io import atomic_write_bytes

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord
    from flwr.serverapp import Grid

NUM_FEATURES, NUM_CLASSES = 64, 10
RESULT_FILE, PARAMS_FILE = "result.json", "params.npz"


# --- the model: softmax regression in numpy (small, fast, and what DP-sized heads look like) ---------------------
def initial_params() -> list[np.ndarray]:
    return [np.zeros((NUM_FEATURES, NUM_CLASSES)), np.zeros(NUM_CLASSES)]


def _probabilities(params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    z = x @ params[0] + params[1]
    z = z - z.max(axis=1, keepdims=True)
    p: np.ndarray = np.exp(z)
    out: np.ndarray = p / p.sum(axis=1, keepdims=True)
    return out


def loss_and_accuracy(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    p = _probabilities(params, x)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    return loss, float((p.argmax(axis=1) == y).mean())


def local_train(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, *, epochs: int,
                lr: float) -> tuple[list[np.ndarray], float]:
    """Full-batch gradient descent on the node's data; returns the new parameters and the loss before the last step."""
    w, b = (np.array(a, dtype=np.float64) for a in params)
    onehot = np.eye(NUM_CLASSES)[y]
    loss = 0.0
    for _ in range(epochs):
        p = _probabilities([w, b], x)
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
        g = (p - onehot) / len(y)
        w, b = w - lr * (x.T @ g), b - lr * g.sum(axis=0)
    return [w, b], loss


def partition(partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Node ``partition_id``'s share of the digits training set (every ``num_partitions``-th example)."""
    from edgeshield.models import load_digits_split

    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    split = load_digits_split()
    return split.x_train[partition_id::num_partitions], split.y_train[partition_id::num_partitions]


def save_dataset(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray) -> Path:
    """Write a local data set (``x`` float (N, 64) in [0, 1], ``y`` int labels) as the .npz a node trains on."""
    buf = io.BytesIO()
    np.savez(buf, x=np.asarray(x, dtype=np.float64), y=np.asarray(y, dtype=np.int64))
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue(), mode=0o600)
    return out


def load_dataset(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """A node's local data set from .npz (no pickles), checked for shape, range and labels."""
    with np.load(Path(path), allow_pickle=False) as data:
        if set(data.files) != {"x", "y"}:
            raise ValueError(f"{path}: expected arrays x and y, found {sorted(data.files)}")
        x, y = np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"])
    if x.ndim != 2 or x.shape[1] != NUM_FEATURES or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"{path}: x must be (N, {NUM_FEATURES}) and y (N,), N > 0; got {x.shape} and {y.shape}")
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"{path}: x must be finite and in [0, 1]")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= NUM_CLASSES:
        raise ValueError(f"{path}: y must be integer labels in [0, {NUM_CLASSES})")
    return x, y.astype(np.int64)


def write_digits_partitions(directory: str | os.PathLike[str], num_partitions: int) -> tuple[list[Path], Path]:
    """Split digits into ``num_partitions`` node data sets and a server evaluation set (one scikit-learn load)."""
    from edgeshield.models import load_digits_split

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    split = load_digits_split()
    nodes = [save_dataset(d / f"node-{i}.npz", split.x_train[i::num_partitions], split.y_train[i::num_partitions])
             for i in range(num_partitions)]
    return nodes, save_dataset(d / "eval.npz", split.x_test, split.y_test)


def _node_data(node: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if str(node.get("data", "")):
        return load_dataset(str(node["data"]))
    return partition(int(node["partition-id"]), int(node["num-partitions"]))


def _eval_data(cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if str(cfg.get("eval-data", "")):
        return load_dataset(str(cfg["eval-data"]))
    from edgeshield.models import load_digits_split

    split = load_digits_split()
    return split.x_test, split.y_test


# --- Flower apps --------------------------------------------------------------------------------------------------
def build_server_app() -> Any:
    """A ``flwr.serverapp.ServerApp`` running FedAvg on the allowed nodes and writing the result to ``out-dir``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _server_main(grid, context)

    return app


def build_client_app() -> Any:
    """A ``flwr.clientapp.ClientApp`` that trains the digits model on its node's partition."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _client_train(msg, context)

    return app


def parse_node_ids(text: str) -> list[int]:
    ids = [int(tok) for tok in text.split()]
    if not ids or any(i <= 0 for i in ids):
        raise ValueError("allowed-nodes must list at least one positive node id")
    return ids


def _allowlisted(grid: Grid, allowed: Iterable[int]) -> Grid:
    """``grid`` seen through an allow-list: ``get_node_ids`` reports only allowed nodes that are online, and
    messages to any other node are refused before they are sent."""
    from flwr.serverapp import Grid as GridBase

    allow = frozenset(allowed)

    class AllowListGrid(GridBase):
        def set_run(self, run: Any) -> None:
            grid.set_run(run)

        @property
        def run(self) -> Any:
            return grid.run

        def create_message(self, *args: Any, **kwargs: Any) -> Any:
            return grid.create_message(*args, **kwargs)

        def get_node_ids(self) -> Iterable[int]:
            return [n for n in grid.get_node_ids() if n in allow]

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            messages = list(messages)
            _check_destinations(messages, allow)
            return grid.push_messages(messages)

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            return grid.pull_messages(message_ids)

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            messages = list(messages)
            _check_destinations(messages, allow)
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            return [m for m in replies if m.metadata.src_node_id in allow]

    return AllowListGrid()


def _check_destinations(messages: list[Message], allow: frozenset[int]) -> None:
    for m in messages:
        if m.metadata.dst_node_id not in allow:
            raise PermissionError(f"refusing to send to node {m.metadata.dst_node_id}: not an allowed node")


def _server_main(grid: Grid, context: Context) -> None:
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    cfg = context.run_config
    rounds = int(cfg["num-server-rounds"])
    allowed = parse_node_ids(str(cfg["allowed-nodes"]))
    out_dir = Path(str(cfg["out-dir"]))
    x_test, y_test = _eval_data(cfg)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss, acc = loss_and_accuracy(arrays.to_numpy_ndarrays(), x_test, y_test)
        return MetricRecord({"loss": loss, "accuracy": acc})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(allowed),
                      min_available_nodes=len(allowed))
    result = strategy.start(
        grid=_allowlisted(grid, allowed),
        initial_arrays=ArrayRecord(initial_params()),
        num_rounds=rounds,
        timeout=float(cfg["round-timeout"]),
        train_config=_config_record(cfg),
        evaluate_fn=evaluate,
    )
    params = result.arrays.to_numpy_ndarrays()
    server = {int(k): {m: _scalar(x) for m, x in v.items()} for k, v in result.evaluate_metrics_serverapp.items()}
    train = {int(k): {m: _scalar(x) for m, x in v.items()} for k, v in result.train_metrics_clientapp.items()}
    history = [{"round": r, "train_loss": train.get(r, {}).get("train_loss", float("nan")),
                "loss": server[r]["loss"], "accuracy": server[r]["accuracy"]}
               for r in range(1, rounds + 1) if r in server]
    summary = {
        "format": "edgeshield-fl-deploy-result", "version": 1, "run_id": int(context.run_id),
        "rounds": rounds, "nodes": sorted(allowed), "initial": server.get(0, {}), "history": history,
        "final_accuracy": history[-1]["accuracy"] if history else None,
        "param_shapes": [list(p.shape) for p in params],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, *params)
    atomic_write_bytes(out_dir / PARAMS_FILE, buf.getvalue())
    atomic_write_bytes(out_dir / RESULT_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def _scalar(value: object) -> float:
    if not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _config_record(cfg: Mapping[str, Any]) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({"local-epochs": int(cfg["local-epochs"]), "lr": float(cfg["lr"])})


def _client_train(msg: Message, context: Context) -> Message:
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    x, y = _node_data(context.node_config)
    config, arrays = msg.content["config"], msg.content["arrays"]
    if not isinstance(arrays, ArrayRecord):
        raise TypeError("the train message carries no ArrayRecord 'arrays'")
    params, loss = local_train(arrays.to_numpy_ndarrays(), x, y, epochs=int(_scalar(config["local-epochs"])),
                               lr=_scalar(config["lr"]))
    content = RecordDict({"arrays": ArrayRecord(params),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)})})
    return Message(content, reply_to=msg)
