"""Federated runs on Flower's simulation engine (Ray backend), one run or many in one shared runtime.

:func:`run_simulation` starts Flower's Simulation Runtime (``flwr.simulation.run_simulation``: a ServerApp thread,
one virtual SuperNode per client, ClientApps in Ray actors), runs one configuration and stops it. A
:class:`Simulator` keeps ONE runtime up for many configurations: its ServerApp serves a queue of jobs, each on the
first ``cfg.clients`` SuperNodes, so a benchmark matrix pays Ray's start-up once. Both are the real engine: every
train message goes through Flower's in-memory SuperLink state to a ClientApp in a Ray worker.

The round loop is Flower's ``Strategy.start`` loop (configure_train → ``grid.send_and_receive`` → aggregate_train)
written out, so that each round can record accuracy, ε, rejections and the clip, and stop before a release the
server's ledger refuses.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield.errors import EdgeShieldError, InvalidArgumentError
from edgeshield.fl._attacks import backdoor_success, parse_attack
from edgeshield.fl._config import FLConfig, check_combination
from edgeshield.fl._data import FederatedData, federated_data, partition, split_root

if TYPE_CHECKING:
    from edgeshield.models import DigitsSplit
    from edgeshield.monitor import SecurityEvent

__all__ = ["FLResult", "RoundRecord", "SimulationError", "Simulator", "effective_noise_multiplier", "run_simulation"]

_NODE_WAIT_S = 120.0
_ROUND_TIMEOUT_S = 600.0


class SimulationError(EdgeShieldError):
    """Flower's simulation runtime failed or did not come up."""


@dataclass
class RoundRecord:
    """One round: test accuracy and loss after it, ε so far (RDP and PLD), who took part and who was refused."""

    round: int
    accuracy: float
    loss: float
    epsilon_rdp: float | None
    epsilon_pld: float | None
    clients: list[str]
    rejected: dict[str, str]
    refused: dict[str, str]
    clip: float | None
    scores: dict[str, float]
    outliers: list[str]
    backdoor_success: float | None
    seconds: float
    held_back: dict[str, int] = field(default_factory=dict)  # examples each client's own data check held back


@dataclass
class FLResult:
    """A finished run: per-round history, the final global parameters, and what the bundle will record."""

    config: FLConfig
    history: list[RoundRecord]
    params: list[np.ndarray]
    noise_multiplier: float | None
    stop_reason: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.history[-1].accuracy if self.history else float("nan")

    @property
    def epsilon(self) -> float | None:
        return self.history[-1].epsilon_rdp if self.history else None

    def onnx_bytes(self) -> bytes:
        from edgeshield.fl._export import to_onnx

        return to_onnx(self.config.model, self.params)

    def metadata(self) -> dict[str, str]:
        """The ``fl.*`` keys the protected bundle records in its signed metadata."""
        last = self.history[-1] if self.history else None
        eps = last.epsilon_rdp if last is not None else None
        scheme = self.config.sampling_scheme
        # fixed-size sampling has no PLD accountant (dp-accounting): "none", never the RDP figure nor "inf"
        pld = "none" if self.config.dp.enabled and scheme == "fixed" and self.config.dp.mode == "central" else (
            "inf" if last is None or last.epsilon_pld is None else f"{last.epsilon_pld:.6g}")
        return {
            "fl.epsilon": "inf" if eps is None else f"{eps:.6g}",
            "fl.epsilon_pld": pld,
            "fl.delta": f"{self.config.dp.delta:g}" if self.config.dp.enabled else "0",
            "fl.clip": "none" if last is None or last.clip is None else f"{last.clip:.6g}",
            "fl.noise_multiplier": "0" if self.noise_multiplier is None else f"{self.noise_multiplier:.6g}",
            "fl.mode": self.config.dp.mode,
            "fl.sampling": scheme,
            "fl.aggregator": self.config.aggregator,
            "fl.rounds": str(len(self.history)),
            "fl.clients": str(self.config.clients),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "history": [asdict(r) for r in self.history],
            "noise_multiplier": self.noise_multiplier, "stop_reason": self.stop_reason, "seconds": self.seconds,
            "accuracy": self.accuracy, "metadata": self.metadata(),
        }


def effective_noise_multiplier(cfg: FLConfig) -> float | None:
    """z as configured, or calibrated by the accountant for ``target_epsilon`` over the run (None without DP)."""
    if not cfg.dp.enabled:
        return None
    if cfg.dp.noise_multiplier is not None:
        return float(cfg.dp.noise_multiplier)
    from edgeshield.privacy import noise_multiplier_for

    if cfg.dp.target_epsilon is None:  # pragma: no cover - DPConfig guarantees one of the two
        raise InvalidArgumentError("fl config: dp needs noise_multiplier or target_epsilon")
    # local DP: the server sees each release, so no amplification by sampling (q = 1), every round in the worst case
    q = cfg.sampling_rate if cfg.dp.mode in ("central", "distributed") else 1.0  # distributed: the server sees a sum
    if cfg.dp.mode == "central" and cfg.sampling_scheme == "fixed":  # replace-one, without replacement: RDP only
        return float(noise_multiplier_for(cfg.dp.target_epsilon, cfg.dp.delta, q, cfg.rounds, "rdp",
                                          sampling="fixed"))
    return float(noise_multiplier_for(cfg.dp.target_epsilon, cfg.dp.delta, q, cfg.rounds))


@dataclass
class _Job:
    cfg: FLConfig
    malicious: dict[int, str]
    events: Callable[[SecurityEvent], None] | None
    ledger: Any
    progress: Callable[[RoundRecord], None] | None
    data: FederatedData
    custom: bool
    future: Future[FLResult] = field(default_factory=Future)


def _wait_for_nodes(grid: Any, count: int) -> list[int]:
    deadline = time.monotonic() + _NODE_WAIT_S
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise SimulationError(f"only {len(nodes)} of {count} simulated SuperNodes came up")
        time.sleep(0.1)


def _epsilon(cfg: FLConfig, z: float | None, rounds: int, participations: int) -> tuple[float | None, float | None]:
    if z is None:
        return None, None
    from edgeshield.privacy import epsilon_for

    if cfg.dp.mode == "central":  # the run's scheme: fixed-size has no PLD figure (None, never the RDP one)
        rep = epsilon_for(z, cfg.sampling_rate, rounds, cfg.dp.delta, sampling=cfg.sampling_scheme)
    else:  # local: the worst client's participations, no amplification
        if participations == 0:
            return 0.0, 0.0
        rep = epsilon_for(z, 1.0, participations, cfg.dp.delta)
    return float(rep.rdp), None if rep.pld is None else float(rep.pld)


def _backdoor(kind: str, params: list[np.ndarray], x_test: np.ndarray, y_test: np.ndarray) -> float:
    from edgeshield.fl._model import predict_logits

    return backdoor_success(lambda x: np.argmax(predict_logits(kind, params, x), axis=1), x_test, y_test)


class _SystemSampler:
    """Client sampling under DP: amplification by sampling assumes the server's coin flips are secret, so they come
    from the operating system's CSPRNG, not from a seeded generator anyone who knows the seed could replay."""

    _system = secrets.SystemRandom()

    def random(self) -> float:
        return secrets.randbits(53) / (1 << 53)

    def sample(self, population: range, k: int) -> list[int]:
        """k distinct members of ``population``, uniformly (fixed-size sampling without replacement)."""
        return self._system.sample(population, k)


def _sampler(cfg: FLConfig) -> Any:
    if cfg.dp.enabled:
        return _SystemSampler()
    return np.random.default_rng([cfg.seed, 4])  # not privacy noise: a reproducible run without DP


def _run_job(grid: Any, job: _Job) -> FLResult:
    """One federated run on ``grid`` (the body of the ServerApp)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from edgeshield.fl._model import accuracy_and_loss, initial_params, local_update
    from edgeshield.fl._strategy import build_aggregation, make_strategy
    from edgeshield.fl._updates import flatten, template_of

    if job.cfg.secagg:  # SecAgg+ rounds (legacy workflow) on the same runtime: see _secagg
        from edgeshield.fl._secagg import run_secagg_job

        return run_secagg_job(grid, job)
    t_start = time.perf_counter()
    cfg = job.cfg
    z = effective_noise_multiplier(cfg)
    nodes = _wait_for_nodes(grid, cfg.clients)
    x_root, y_root = job.data.root
    x_test, y_test = job.data.test
    params = initial_params(cfg.model, cfg.seed)
    if cfg.pretrain_on_root:
        delta, _ = local_update(cfg.model, params, x_root, y_root, epochs=cfg.pretrain_epochs,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        params = [p + d for p, d in zip(params, delta, strict=True)]
    template = template_of(params)

    def root_update(current: list[np.ndarray]) -> np.ndarray:
        delta, _ = local_update(cfg.model, current, x_root, y_root, epochs=cfg.local_epochs,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed + 7)
        return flatten(delta)

    ledger_dir = tempfile.mkdtemp(prefix="esfl-ledgers-")
    os.chmod(ledger_dir, 0o700)
    backdoor = any(parse_attack(a).kind == "backdoor" for a in job.malicious.values())
    job_json = json.dumps(cfg.to_dict())
    aggregation = build_aggregation(cfg, z)
    strategy = make_strategy(
        cfg, aggregation, template=template, nodes=nodes, job_json=job_json, noise_multiplier=z,
        attacks=job.malicious, ledger_dir=ledger_dir, root_update=root_update if cfg.aggregator == "fltrust" else None,
        events=job.events, rng=_sampler(cfg),
        custom_data=job.data.clients if job.custom else None,
    )
    history: list[RoundRecord] = []
    participations: dict[str, int] = {}
    stop: str | None = None
    population = [f"client-{c}" for c in range(cfg.clients)]
    try:
        for rnd in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            if job.ledger is not None and cfg.dp.mode == "central":
                from edgeshield.privacy import BudgetExceededError

                try:  # every client in the population is subject to this round's sampled release
                    for client in population:
                        job.ledger.check(client, z, cfg.sampling_rate)
                except BudgetExceededError as exc:
                    stop = f"privacy budget exhausted before round {rnd}: {exc}"
                    break
            messages = strategy.configure_train(rnd, ArrayRecord(params), ConfigRecord(), grid)
            replies = grid.send_and_receive(messages=messages, timeout=_ROUND_TIMEOUT_S)
            arrays, _ = strategy.aggregate_train(rnd, replies)
            params = arrays.to_numpy_ndarrays()
            if job.ledger is not None and cfg.dp.mode == "central":
                for client in population:
                    job.ledger.spend(client, rnd, z, cfg.sampling_rate)
            outcome = strategy.last
            for client in strategy.sampled:
                if client not in strategy.refused:
                    participations[client] = participations.get(client, 0) + 1
            eps_rdp, eps_pld = _epsilon(cfg, z, rnd, max(participations.values(), default=0))
            acc, loss = accuracy_and_loss(cfg.model, params, x_test, y_test)
            bd = _backdoor(cfg.model, params, x_test, y_test) if backdoor else None
            record = RoundRecord(
                round=rnd, accuracy=acc, loss=loss, epsilon_rdp=eps_rdp, epsilon_pld=eps_pld,
                clients=list(strategy.sampled), rejected=dict(outcome.rejected), refused=dict(strategy.refused),
                clip=outcome.clip if outcome.clip is not None else strategy.clip(), scores=dict(outcome.scores),
                outliers=list(outcome.outliers), backdoor_success=bd, seconds=time.perf_counter() - t0,
                held_back=dict(strategy.held_back),
            )
            history.append(record)
            if job.progress is not None:
                job.progress(record)
    finally:
        shutil.rmtree(ledger_dir, ignore_errors=True)
    return FLResult(cfg, history, params, z, stop, time.perf_counter() - t_start)


def _custom_data(cfg: FLConfig, data: DigitsSplit, poison: Mapping[int, tuple[np.ndarray, np.ndarray]] | None
                 ) -> FederatedData:
    x, y = data.x_train, data.y_train
    if cfg.fltrust_root:
        root, (x, y) = split_root(x, y, cfg.fltrust_root, cfg.seed)
    else:
        root = (x[:0], y[:0])
    clients = partition(x, y, cfg)
    for cid, shard in (poison or {}).items():
        clients[cid] = (np.asarray(shard[0], dtype=np.float32), np.asarray(shard[1], dtype=np.int64))
    return FederatedData(clients=clients, root=root, test=(data.x_test, data.y_test))


def _make_job(cfg: FLConfig, malicious: Mapping[int, str] | None, events: Any, ledger: Any, progress: Any,
              data: DigitsSplit | None, poison_data: Mapping[int, tuple[np.ndarray, np.ndarray]] | None) -> _Job:
    if not isinstance(cfg, FLConfig):
        raise InvalidArgumentError(f"cfg must be an FLConfig, not {type(cfg).__name__}")
    check_combination(cfg)
    if ledger is not None and cfg.dp.mode == "central":
        kept = getattr(ledger, "sampling", "poisson")
        if kept != cfg.sampling_scheme:
            raise InvalidArgumentError(
                f"ledger: it accounts sampling {kept!r} but this run samples {cfg.sampling_scheme!r}; create the "
                f"server's PrivacyLedger with sampling={cfg.sampling_scheme!r}"
            )
    from edgeshield.fl._strategy import build_aggregation

    build_aggregation(cfg, effective_noise_multiplier(cfg))  # the DP parameters checked before any runtime starts
    bad = dict(malicious or {})
    for cid, spec in bad.items():
        if not isinstance(cid, int) or not 0 <= cid < cfg.clients:
            raise InvalidArgumentError(f"malicious: client {cid!r} is not in 0..{cfg.clients - 1}")
        parse_attack(spec)
    for cid in poison_data or {}:
        if not isinstance(cid, int) or not 0 <= cid < cfg.clients:
            raise InvalidArgumentError(f"poison_data: client {cid!r} is not in 0..{cfg.clients - 1}")
    custom = data is not None or bool(poison_data)
    if custom:
        if data is None:
            from edgeshield.models import load_digits_split

            data = load_digits_split()
        fed = _custom_data(cfg, data, poison_data)
    else:
        fed = federated_data(cfg)
    return _Job(cfg, bad, events, ledger, progress, fed, custom)


@contextmanager
def _flower_environment() -> Iterator[str]:
    """Temp dirs for Ray and Flower's home, telemetry off, no run-time dependency installs."""
    base = tempfile.mkdtemp(prefix="esfl-")
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    os.environ.update({
        "RAY_TMPDIR": base, "FLWR_HOME": os.path.join(base, "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
    })
    try:
        yield base
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(base, ignore_errors=True)


_ENV_KEYS = ("RAY_TMPDIR", "FLWR_HOME", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
             "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "RAY_USAGE_STATS_ENABLED", "RAY_DEDUP_LOGS")


class Simulator:
    """One Flower Simulation Runtime serving many runs: ``with Simulator(max_clients=20) as sim: sim.run(cfg)``.

    ``num_cpus`` is Ray's CPU budget and ``client_cpus`` each ClientApp actor's share (so ``num_cpus /
    client_cpus`` actors train at once). Runs are served one at a time, in order.
    """

    def __init__(self, max_clients: int, *, num_cpus: float = 2, client_cpus: float = 1,
                 object_store_bytes: int = 200 * 1024**2) -> None:
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise InvalidArgumentError(f"max_clients must be a positive integer, not {max_clients!r}")
        if not (0 < client_cpus <= num_cpus):
            raise InvalidArgumentError("client_cpus must be positive and at most num_cpus")
        self.max_clients = max_clients
        self.num_cpus = num_cpus
        self.client_cpus = client_cpus
        self.object_store_bytes = object_store_bytes
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._env: Any = None
        self._alive = threading.Event()

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    _active: Simulator | None = None  # Ray is one runtime per process: a second one would wait forever for actors
    _active_lock = threading.Lock()

    def start(self) -> None:
        if self._thread is not None:
            return
        with Simulator._active_lock:
            if Simulator._active is not None:
                raise SimulationError("a Flower simulation runtime is already running in this process (Ray allows "
                                      "one): pass runs to that Simulator instead of starting another")
            Simulator._active = self
        self._env = _flower_environment()
        self._env.__enter__()
        self._thread = threading.Thread(target=self._serve, name="edgeshield-flower-sim", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            from flwr.serverapp import ServerApp
            from flwr.simulation import run_simulation as flwr_run_simulation

            from edgeshield.fl._client import make_client_app

            logging.getLogger("flwr").setLevel(logging.WARNING)
            server = ServerApp()

            @server.main()
            def main(grid: Any, context: Any) -> None:
                self._alive.set()
                while True:
                    job = self._jobs.get()
                    if job is None:
                        return
                    if not job.future.set_running_or_notify_cancel():
                        continue
                    try:
                        job.future.set_result(_run_job(grid, job))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller of run(), who re-raises it
                        job.future.set_exception(exc)

            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                flwr_run_simulation(
                    server_app=server, client_app=make_client_app(), num_supernodes=self.max_clients,
                    backend_config={
                        "client_resources": {"num_cpus": self.client_cpus, "num_gpus": 0.0},
                        "init_args": {"num_cpus": self.num_cpus, "logging_level": "error",
                                      "object_store_memory": self.object_store_bytes},
                    },
                )
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting caller
            self._error = exc
        finally:
            self._alive.set()
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.future.done():
                job.future.set_exception(SimulationError(f"Flower's simulation runtime stopped: {self._error}"))

    def run(
        self,
        cfg: FLConfig,
        *,
        data: DigitsSplit | None = None,
        malicious: Mapping[int, str] | None = None,
        events: Callable[[SecurityEvent], None] | None = None,
        ledger: Any = None,
        progress: Callable[[RoundRecord], None] | None = None,
        poison_data: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> FLResult:
        """Run ``cfg`` on this runtime's first ``cfg.clients`` SuperNodes and wait for the result."""
        if cfg.clients > self.max_clients:
            raise InvalidArgumentError(f"clients {cfg.clients} exceeds this simulator's max_clients "
                                       f"{self.max_clients}")
        job = _make_job(cfg, malicious, events, ledger, progress, data, poison_data)
        if self._thread is None:
            self.start()
        if self._error is not None or (self._thread is not None and not self._thread.is_alive()):
            raise SimulationError(f"Flower's simulation runtime is not running: {self._error}")
        self._jobs.put(job)
        while True:
            try:
                return job.future.result(timeout=1.0)
            except TimeoutError:
                if self._thread is not None and not self._thread.is_alive() and not job.future.done():
                    self._fail_pending()
                    raise SimulationError(f"Flower's simulation runtime stopped: {self._error}") from None

    def close(self) -> None:
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout=120)
        self._thread = None
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None
        with Simulator._active_lock:
            if Simulator._active is self:
                Simulator._active = None


def run_simulation(
    cfg: FLConfig,
    *,
    data: DigitsSplit | None = None,
    malicious: Mapping[int, str] | None = None,
    events: Callable[[SecurityEvent], None] | None = None,
    ledger: Any = None,
    progress: Callable[[RoundRecord], None] | None = None,
    poison_data: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
    num_cpus: float = 2,
    client_cpus: float = 1,
) -> FLResult:
    """One run of ``cfg`` on a fresh Flower Simulation Runtime (started and stopped here).

    ``malicious`` maps client index → attack (``_attacks``); ``events`` receives ``fl.update_rejected``
    SecurityEvents; ``ledger`` (a :class:`~edgeshield.privacy.PrivacyLedger`) is charged every client's
    participation under central DP and stops the run before a release over budget (``FLResult.stop_reason``);
    ``data`` replaces the digits split and ``poison_data`` replaces given clients' shards (both then travel in the
    train messages: simulation only).
    """
    if not isinstance(cfg, FLConfig):  # before cfg.clients sizes the runtime
        raise InvalidArgumentError(f"cfg must be an FLConfig, not {type(cfg).__name__}")
    sim = Simulator(cfg.clients, num_cpus=num_cpus, client_cpus=client_cpus)
    try:  # run() checks the job (config, attacks, DP calibration) before it starts the runtime: fail fast, once
        return sim.run(cfg, data=data, malicious=malicious, events=events, ledger=ledger, progress=progress,
                       poison_data=poison_data)
    finally:
        sim.close()


