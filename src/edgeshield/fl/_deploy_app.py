"""The Flower app a deployment runs: the simulation's ServerApp round loop and ClientApp, on real SuperNodes.

The FAB that ``edgeshield.fl._deploy`` builds is a stub that calls these factories, so every process runs the
EdgeShield code installed beside it, not code shipped in the bundle.

ServerApp: the run config carries the :class:`~edgeshield.fl.FLConfig` as JSON (``fl-config``), and the ServerApp
runs exactly the simulation's job (``_sim._run_job``: ``build_aggregation`` + ``make_strategy``, so validation at
the door, robust aggregation, central DP with ε per round from the accountant, the server's ledger and
``fl.update_rejected`` events), on a grid that sees only the allowed nodes (``allowed-nodes``: the node ids the
server registered from PKI certificates), and evaluates on the server's own test set. It writes ``result.json``
(the :class:`~edgeshield.fl.FLResult` as simulation reports it, plus the nodes, the events and any error) and
``params.npz`` (the final global parameters) to ``out-dir``; the ``fl server`` process exports them
(``fl._export``), so no signing key ever reaches a Flower process.

ClientApp: :func:`edgeshield.fl._client.make_client_app` (PyTorch local training, local DP with the client's own
ledger, the data check before training), behind a guard that makes each train message node-local first: the node's
own data (node config ``data``, a .npz; else ``partition-id``/``num-partitions`` of the digits training set) is put
into the message where simulation puts a custom shard (it never leaves the node: the reply carries only the update),
the node's ledger directory (``ledger-dir``) and budget (``epsilon-budget``) replace whatever the server sent, and
the server cannot choose an attack (a server-chosen "attack" would skip local DP): only the node's own config can
(``attack``, for evaluation).

Run config (``[tool.flwr.app.config]``): ``fl-config``, ``allowed-nodes``, ``out-dir``, ``eval-data`` (the server's
.npz test set; empty: the digits test split), ``root-data`` (the server's root set for FLTrust or pretraining;
empty: ``fltrust_root`` examples of the digits training split), ``round-timeout`` (seconds), ``ledger`` and
``epsilon-budget`` (the server's privacy ledger under central DP; empty / 0: none).
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
from edgeshield.errors import EdgeShieldError, InvalidArgumentError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

    from edgeshield.fl._config import FLConfig
    from edgeshield.fl._sim import FLResult
    from edgeshield.monitor import SecurityEvent

NUM_FEATURES, NUM_CLASSES = 64, 10
RESULT_FILE, PARAMS_FILE = "result.json", "params.npz"
RESULT_FORMAT, RESULT_VERSION = "edgeshield-fl-deploy-result", 2


class DeploymentError(EdgeShieldError):
    """A Flower process failed to start or exited early, a run failed, or a wait timed out."""


class NodeDataError(InvalidArgumentError):
    """A node's local data set is missing or malformed (shape, range, labels)."""


# --- data on the node and on the server -------------------------------------------------------------------------
def partition(partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Node ``partition_id``'s share of the digits training set (every ``num_partitions``-th example)."""
    from edgeshield.models import load_digits_split

    if not 0 <= partition_id < num_partitions:
        raise NodeDataError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    split = load_digits_split()
    return split.x_train[partition_id::num_partitions], split.y_train[partition_id::num_partitions]


def save_dataset(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray) -> Path:
    """Write a local data set (``x`` float (N, 64) in [0, 1], ``y`` int labels) as the .npz a node trains on."""
    buf = io.BytesIO()
    np.savez(buf, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue(), mode=0o600)
    return out


def load_dataset(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """A local data set from .npz (no pickles), checked for shape, range and labels; x float32, y int64."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            if set(data.files) != {"x", "y"}:
                raise NodeDataError(f"{path}: expected arrays x and y, found {sorted(data.files)}")
            x, y = np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"])
    except (OSError, ValueError) as exc:
        raise NodeDataError(f"{path}: not a readable .npz data set: {exc}") from None
    if x.ndim != 2 or x.shape[1] != NUM_FEATURES or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise NodeDataError(f"{path}: x must be (N, {NUM_FEATURES}) and y (N,), N > 0; got {x.shape} and {y.shape}")
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise NodeDataError(f"{path}: x must be finite and in [0, 1]")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= NUM_CLASSES:
        raise NodeDataError(f"{path}: y must be integer labels in [0, {NUM_CLASSES})")
    return x.astype(np.float32), y.astype(np.int64)


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
    if "partition-id" not in node or "num-partitions" not in node:
        raise NodeDataError("the node config names no data (data = PATH, or partition-id and num-partitions)")
    return partition(int(node["partition-id"]), int(node["num-partitions"]))


def _eval_data(run: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if str(run.get("eval-data", "")):
        return load_dataset(str(run["eval-data"]))
    from edgeshield.models import load_digits_split

    split = load_digits_split()
    return split.x_test, split.y_test


def _root_data(run: Mapping[str, Any], cfg: FLConfig) -> tuple[np.ndarray, np.ndarray]:
    """The server's root set: a file, or the simulation's (``fltrust_root`` stratified digits training examples);
    empty when neither FLTrust nor pretraining needs one."""
    if str(run.get("root-data", "")):
        return load_dataset(str(run["root-data"]))
    if cfg.fltrust_root == 0 or not (cfg.aggregator == "fltrust" or cfg.pretrain_on_root
                                     or cfg.aggregator_params.get("inner") == "fltrust"):
        return np.zeros((0, NUM_FEATURES), np.float32), np.zeros(0, np.int64)
    from edgeshield.fl._data import split_root
    from edgeshield.models import load_digits_split

    split = load_digits_split()
    root, _ = split_root(split.x_train, split.y_train, cfg.fltrust_root, cfg.seed)
    return root


# --- Flower apps --------------------------------------------------------------------------------------------------
def build_server_app() -> Any:
    """A ``flwr.serverapp.ServerApp`` running the EdgeShield job on the allowed nodes, writing to ``out-dir``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _server_main(grid, context)

    return app


def build_client_app() -> Any:
    """``fl._client.make_client_app()`` behind the node-local guard (see the module doc)."""
    from flwr.clientapp import ClientApp

    from edgeshield.fl._client import make_client_app

    inner = make_client_app()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        _localise(msg, context.node_config)
        reply: Message = inner(msg, context)
        return reply

    return app


def _localise(msg: Message, node: Mapping[str, Any]) -> None:
    """Make a train message node-local before the shared ClientApp handles it (in place; nothing is sent)."""
    from flwr.app import ArrayRecord

    from edgeshield.fl._client import job_config
    from edgeshield.fl._secagg import is_secagg_message

    if is_secagg_message(msg):
        raise InvalidArgumentError("secure aggregation is not supported on a deployment (simulation only)")
    config = msg.content.config_records.get("config")
    if config is None or "job" not in config:
        raise InvalidArgumentError("train message without a job config")
    cfg = job_config(config)
    x, y = _node_data(node)
    msg.content["data"] = ArrayRecord([x, y])  # where simulation puts a custom shard: the node's own data
    config["attack"] = str(node.get("attack", ""))  # never the server's choice
    config["ledger-dir"] = str(node.get("ledger-dir", ""))
    if cfg.dp.mode == "local" and not config["ledger-dir"]:
        raise InvalidArgumentError("local DP needs the node's own ledger: set ledger-dir in the node config")
    budget = float(node.get("epsilon-budget", 0.0) or 0.0)
    if budget > 0:  # what this node has agreed to spend, not what the server says
        config["job"] = json.dumps(cfg.with_(dp={"client_budget": budget}).to_dict())


def parse_node_ids(text: str) -> list[int]:
    try:
        ids = [int(tok) for tok in text.split()]
    except ValueError:
        raise InvalidArgumentError(f"allowed-nodes must be node ids separated by spaces, not {text!r}") from None
    if not ids or any(i <= 0 for i in ids):
        raise InvalidArgumentError("allowed-nodes must list at least one positive node id")
    return ids


def _allowlisted(grid: Grid, allowed: Iterable[int], round_timeout: float | None = None) -> Grid:
    """``grid`` seen through an allow-list: ``get_node_ids`` reports only allowed nodes that are online, messages to
    any other node are refused before they are sent, and a round waits at most ``round_timeout`` seconds."""
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
            return [m for m in grid.pull_messages(message_ids) if m.metadata.src_node_id in allow]

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            messages = list(messages)
            _check_destinations(messages, allow)
            if round_timeout is not None:
                timeout = round_timeout if timeout is None else min(timeout, round_timeout)
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            return [m for m in replies if m.metadata.src_node_id in allow]

    return AllowListGrid()


def _check_destinations(messages: list[Message], allow: frozenset[int]) -> None:
    for m in messages:
        if m.metadata.dst_node_id not in allow:
            raise PermissionError(f"refusing to send to node {m.metadata.dst_node_id}: not an allowed node")


def deploy_fl_config(text: str, nodes: int) -> FLConfig:
    """The run's FLConfig from the run config's JSON (empty: the defaults), for a population of ``nodes``."""
    from edgeshield.fl._config import FLConfig

    if not text:
        return FLConfig(clients=nodes, clients_per_round=nodes)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"fl-config is not JSON: {exc}") from None
    cfg = FLConfig.from_dict(data)
    if cfg.clients != nodes:
        raise InvalidArgumentError(f"fl config: clients: {cfg.clients}, but {nodes} nodes are allowed in this run")
    return cfg


def _event_dict(event: SecurityEvent) -> dict[str, Any]:
    return {"kind": event.kind, "actor": event.actor, "data": dict(event.data), "ts": event.ts}


def _server_main(grid: Grid, context: Context) -> None:
    run = context.run_config
    out_dir = Path(str(run["out-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        summary, params = _run(grid, run, int(context.run_id))
    except Exception as exc:  # the operator reads why in result.json; re-raised: Flower marks the run failed
        err = {"format": RESULT_FORMAT, "version": RESULT_VERSION, "run_id": int(context.run_id),
               "error": f"{type(exc).__name__}: {exc}"}
        atomic_write_bytes(out_dir / RESULT_FILE, (json.dumps(err) + "\n").encode())
        raise
    buf = io.BytesIO()
    np.savez(buf, *params)
    atomic_write_bytes(out_dir / PARAMS_FILE, buf.getvalue())
    atomic_write_bytes(out_dir / RESULT_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def _run(grid: Grid, run: Mapping[str, Any], run_id: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    from edgeshield.fl._data import FederatedData
    from edgeshield.fl._sim import _Job, _run_job

    allowed = parse_node_ids(str(run["allowed-nodes"]))
    cfg = deploy_fl_config(str(run.get("fl-config", "")), len(allowed))
    if cfg.secagg or cfg.dp.mode == "distributed":
        raise InvalidArgumentError("secure aggregation / distributed DP is not supported on a deployment")
    events: list[dict[str, Any]] = []
    data = FederatedData(clients=[], root=_root_data(run, cfg), test=_eval_data(run))
    ledger = _server_ledger(run, cfg)
    timeout = float(run.get("round-timeout", 0) or 0) or None
    try:
        job = _Job(cfg=cfg, malicious={}, events=lambda e: events.append(_event_dict(e)), ledger=ledger,
                   progress=None, data=data, custom=False)
        result = _run_job(_allowlisted(grid, allowed, timeout), job)
    finally:
        if ledger is not None:
            ledger.close()
    summary = {"format": RESULT_FORMAT, "version": RESULT_VERSION, "run_id": run_id, "nodes": sorted(allowed),
               # _run_job's SuperNodes are the allowed ones in node-id order: client-i is the i-th smallest id
               "clients": {f"client-{i}": n for i, n in enumerate(sorted(allowed))},
               **result.to_dict(), "rounds": len(result.history), "final_accuracy": result.accuracy,
               "privacy": _privacy(result), "events": events,
               "param_shapes": [list(p.shape) for p in result.params]}
    return summary, result.params


def _server_ledger(run: Mapping[str, Any], cfg: FLConfig) -> Any:
    path = str(run.get("ledger", ""))
    if not path:
        return None
    budget = float(run.get("epsilon-budget", 0) or 0)
    if cfg.dp.mode != "central" or budget <= 0:
        raise InvalidArgumentError("a server ledger needs central DP and an epsilon budget > 0")
    from edgeshield.privacy import PrivacyLedger

    # accounted under the run's sampling scheme; reopening a ledger kept for another scheme is refused by the ledger
    return PrivacyLedger(path, epsilon_budget=budget, delta=cfg.dp.delta, sampling=cfg.sampling_scheme)


def _privacy(result: FLResult) -> dict[str, Any]:
    last = result.history[-1] if result.history else None
    cfg = result.config
    return {"mode": cfg.dp.mode, "aggregator": cfg.aggregator,
            "sampling": cfg.sampling_scheme,
            "epsilon_rdp": last.epsilon_rdp if last else None, "epsilon_pld": last.epsilon_pld if last else None,
            "delta": cfg.dp.delta if cfg.dp.enabled else 0.0, "clip": last.clip if last else None,
            "noise_multiplier": result.noise_multiplier}


def load_result(out_dir: str | os.PathLike[str]) -> FLResult:
    """The run's :class:`~edgeshield.fl.FLResult` from ``result.json`` and ``params.npz`` (what ``fl._export``
    takes, like a simulation result)."""
    from edgeshield.fl._config import FLConfig
    from edgeshield.fl._sim import FLResult, RoundRecord

    d = Path(out_dir)
    try:
        summary = json.loads((d / RESULT_FILE).read_text(encoding="utf-8"))
        with np.load(d / PARAMS_FILE, allow_pickle=False) as arrays:
            params = [np.asarray(arrays[f"arr_{i}"]) for i in range(len(arrays.files))]
    except (OSError, ValueError, KeyError) as exc:
        raise DeploymentError(f"{d}: no readable deployment result: {exc}") from None
    if summary.get("format") != RESULT_FORMAT or summary.get("version") != RESULT_VERSION:
        raise DeploymentError(f"{d / RESULT_FILE}: not a version-{RESULT_VERSION} deployment result")
    if "error" in summary:
        raise DeploymentError(f"the run failed: {summary['error']}")
    return FLResult(FLConfig.from_dict(summary["config"]), [RoundRecord(**r) for r in summary["history"]], params,
                    summary["noise_multiplier"], summary["stop_reason"], float(summary["seconds"]))
