"""The extraction monitor's memory with many client identities (issue 15, "Scale"), driven through the library.

    python benchmarks/_monitor_scale.py [--quick] [--json PATH]

``monitor_scale(quick)`` returns flat figures for ``benchmarks/server.py``. Each configuration runs in a fresh child
interpreter (``_machine.run_child``), which builds the deployed monitor of the evaluation (``build_monitor``:
PRADA with the calibrated near-duplicate distance, OOD rate with the declared benign transforms, the window budget,
the decaying budget, the fleet budget per role), wraps its detectors in a ``QueryMonitor`` with the configuration's
``max_clients`` and store, measures its resident set (after ``gc.collect``), then sends ``clients`` identities'
digits-like queries (digits of the data set with sensor noise sigma 0.02, one request of 20 each, in ``ROUNDS`` rounds)
and measures again. Two attackers are interleaved, one request every ``clients * rounds / 20`` honest requests (so
that between two of their requests more identities than a small cap pass, and their state is evicted each time):
a natural-data thief (distinct training digits: the window budget's case) and a Jacobian-style prober (10 training
seeds, each generation moved by +-0.1: PRADA's case). Configurations:

* ``uncapped``: ``max_clients`` above the number of clients, no store (what memory the states take);
* ``deployed``: the serve default ``max_monitored_clients`` with a ``MonitorStore`` (the ``--extraction-state``
  file) -- the figure ``monitor_rss_growth_mb_10k_clients``;
* ``cap``: ``max_clients`` = clients / 20 with the store (a total bounded well below the clients);
* ``cap_nostore``: the same cap without a store (what eviction loses: budgets and PRADA sets; blocks are kept).

``prada_full_client`` fills one PRADA client to its bounds (10 classes x ``max_history`` stored queries, every
distance and recent key) in a fresh child and measures it: the per-client worst case.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _machine import rss_bytes, run_child, vm_hwm_bytes  # benchmarks/_machine.py, beside this script

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

CLIENTS, QUICK_CLIENTS = 10_000, 1_000
BATCH, ROUNDS = 20, 1  # one request of 20 digits per honest identity (10k identities: 10k requests a configuration)
NOISE = 0.02
ATTACK_REQUESTS = 20
CONFIGS = ("uncapped", "deployed", "cap", "cap_nostore")
MB = 1e6


def _settled_rss() -> int:
    """The resident set after a full collection and ``malloc_trim`` (freed heap handed back to the system), so that
    what is measured is what is held, not the allocator's free lists left by temporaries."""
    import contextlib
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def _deployed_cap() -> int:
    from edgeshield.server._serve import ServeConfig

    return int(ServeConfig.__dataclass_fields__["max_monitored_clients"].default)


def _jacobian_style(seeds: np.ndarray, rng: np.random.Generator, step: float = 0.1) -> np.ndarray:
    """Papernot-style augmentation without a substitute: each generation re-queries every point so far moved by
    ``step`` times the sign of a random vector (the geometry PRADA keys on), 10 seeds, 6 generations (640 rows)."""
    pool, queries = seeds, [seeds]
    for _ in range(6):
        new = np.clip(pool + step * rng.choice([-1.0, 1.0], pool.shape), 0, 1)
        queries.append(new)
        pool = np.concatenate([pool, new])
    return np.concatenate(queries).astype(np.float32)


def _child_monitor(config: str, clients: int) -> dict[str, Any]:
    """One configuration in this (fresh) process: the monitor's RSS growth and the attackers' detection."""
    import edgeshield  # noqa: F401  # before onnxruntime
    from edgeshield.bundles._ort import onnxruntime as ort
    from edgeshield.evaluation._extraction import N_OOD_CAL, SimulatedClock, build_monitor
    from edgeshield.extraction import MonitorStore, QueryMonitor
    from edgeshield.models import digits_model_path, load_digits_split

    split = load_digits_split()
    sess = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    pool = np.concatenate([split.x_train, split.x_test]).astype(np.float32)
    x_cal = split.x_test[:N_OOD_CAL]
    clock = SimulatedClock()
    deployed = build_monitor(split.x_train, x_cal, kind="deployed", clock=clock, x_honest=x_cal)
    cap = {"uncapped": clients + 10, "deployed": _deployed_cap()}.get(config, max(1, clients // 20))
    tmp = tempfile.TemporaryDirectory(prefix="edgeshield-monitor-scale-")
    store = MonitorStore(Path(tmp.name) / "state.db") if config in ("deployed", "cap") else None
    monitor = QueryMonitor(deployed.detectors, response=deployed.response, store=store, max_clients=cap, clock=clock)

    rng = np.random.default_rng(11)
    thief_x = split.x_train[rng.permutation(len(split.x_train))[: ATTACK_REQUESTS * BATCH]]
    prober_x = _jacobian_style(split.x_train[:10], rng)[: ATTACK_REQUESTS * BATCH]
    attackers = {"thief": {"x": thief_x, "sent": 0, "answered": 0, "blocked": None},
                 "prober": {"x": prober_x, "sent": 0, "answered": 0, "blocked": None}}

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(None, {"input": x})[0]).argmax(axis=1)

    def attack() -> None:
        for name, a in attackers.items():
            if a["blocked"] is not None or a["sent"] >= ATTACK_REQUESTS:
                continue
            if monitor.action(name) == "block":  # the server's gate: a blocked client is refused, not observed
                a["blocked"] = {"answered": a["answered"], "reasons": a.get("reasons", [])}
                continue
            x = a["x"][a["sent"] * BATCH : (a["sent"] + 1) * BATCH]
            a["sent"] += 1
            verdict = monitor.observe(name, x, predict(x), group="client")
            if verdict.action == "block":
                a["blocked"] = {"answered": a["answered"], "reasons": list(verdict.reasons)}
            else:
                a["answered"] += len(x)

    base, hwm_base = _settled_rss(), vm_hwm_bytes()
    started = time.perf_counter()
    total = clients * ROUNDS
    gap = max(1, total // ATTACK_REQUESTS)
    honest_blocked, done = 0, 0
    honest_reasons: dict[str, int] = {}
    for r in range(ROUNDS):
        for i in range(clients):
            g = np.random.default_rng([7, i, r])
            x = np.clip(pool[g.integers(0, len(pool), BATCH)] + g.normal(0, NOISE, (BATCH, 64)), 0, 1)
            x = x.astype(np.float32)
            verdict = monitor.observe(f"device-{i}", x, predict(x), group="client")
            if verdict.action == "block" and r == ROUNDS - 1:
                honest_blocked += 1
                for reason in verdict.reasons:
                    honest_reasons[reason] = honest_reasons.get(reason, 0) + 1
            clock.advance(0.01)
            done += 1
            if done % gap == 0:
                attack()
    attack()
    elapsed = time.perf_counter() - started
    flushed = monitor.flush()
    growth, hwm = _settled_rss() - base, vm_hwm_bytes() - hwm_base
    in_memory = monitor.clients_in_memory
    store_bytes = 0
    if store is not None:
        store.close()
        store_bytes = sum(p.stat().st_size for p in Path(tmp.name).glob("state.db*"))
    tmp.cleanup()
    return {"config": config, "clients": clients, "max_clients": cap, "store": store is not None,
            "rss_growth_bytes": growth, "hwm_growth_bytes": hwm, "clients_in_memory": in_memory,
            "bytes_per_client_in_memory": growth / max(1, in_memory), "seconds": elapsed,
            "requests": total, "flushed": flushed, "store_bytes": store_bytes,
            "honest_blocked": honest_blocked, "honest_block_reasons": honest_reasons,
            "attackers": {n: {"answered": a["answered"], "blocked": a["blocked"]} for n, a in attackers.items()}}


def _child_prada_full() -> dict[str, Any]:
    """One PRADA client filled to its bounds: every class set full, every distance and recent key kept."""
    from edgeshield.extraction import PradaDetector

    detector = PradaDetector(dup_distance=0.5)  # the deployed kind: every class's set is compared
    classes, d = 10, 64
    n = classes * detector.max_history + detector.max_recent_keys
    base = _settled_rss()
    started = time.perf_counter()
    # queries whose nearest stored neighbour gets ever farther: each is admitted, so the sets fill
    for start in range(0, n, 500):
        k = np.arange(start, min(n, start + 500))
        x = np.zeros((len(k), d), dtype=np.float32)
        x[np.arange(len(k)), k % d] = (1.0 + k).astype(np.float32)
        detector.observe("full", x, k % classes)
    return {"stored_queries": detector.stored_queries("full"), "rss_growth_bytes": _settled_rss() - base,
            "bound_bytes": detector.max_client_bytes(d, classes) if hasattr(detector, "max_client_bytes") else None,
            "seconds": time.perf_counter() - started,
            "export_bytes": len(detector.export_state("full") or b"")}


def monitor_scale(quick: bool, parallel: int = 1, configs: tuple[str, ...] = CONFIGS,
                  clients: int | None = None) -> dict[str, Any]:
    """The monitor's RSS growth at 10k client identities (quick: 1k; ``clients`` overrides), with and without the
    cap; flat figures. ``parallel`` children at a time (each measures its own resident set, so only the speeds are
    affected); ``configs``: which of ``CONFIGS`` to run (``deployed`` is required: it gives the headline key)."""
    from concurrent.futures import ThreadPoolExecutor

    if "deployed" not in configs or not set(configs) <= set(CONFIGS):
        raise ValueError(f"configs must include 'deployed' and be among {CONFIGS}")
    clients = clients or (QUICK_CLIENTS if quick else CLIENTS)
    jobs = [["monitor", c, str(clients)] for c in configs] + [["prada_full"]]
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        results = list(pool.map(lambda a: run_child(__file__, a), jobs))
    runs, full = dict(zip(configs, results[:-1], strict=True)), results[-1]
    out: dict[str, Any] = {"monitor_scale": f"{clients} clients" + (" (quick)" if quick else ""),
                           "monitor_clients": clients, "monitor_queries_per_client": BATCH * ROUNDS,
                           "monitor_deployed_max_clients": runs["deployed"]["max_clients"],
                           "monitor_small_cap": max(1, clients // 20), "monitor_configs": list(configs)}
    out["monitor_rss_growth_mb_10k_clients"] = runs["deployed"]["rss_growth_bytes"] / MB
    for c, r in runs.items():
        out[f"monitor_{c}_rss_growth_mb"] = r["rss_growth_bytes"] / MB
        out[f"monitor_{c}_peak_growth_mb"] = r["hwm_growth_bytes"] / MB
        out[f"monitor_{c}_clients_in_memory"] = r["clients_in_memory"]
        out[f"monitor_{c}_bytes_per_client"] = r["bytes_per_client_in_memory"]
        out[f"monitor_{c}_requests_per_s"] = r["requests"] / r["seconds"]
        out[f"monitor_{c}_honest_blocked"] = r["honest_blocked"]
        out[f"monitor_{c}_honest_block_reasons"] = r["honest_block_reasons"]
        out[f"monitor_{c}_store_mb"] = r["store_bytes"] / MB
        for name, a in r["attackers"].items():
            blocked = a["blocked"]
            out[f"monitor_{c}_{name}_answered_before_block"] = None if blocked is None else blocked["answered"]
            out[f"monitor_{c}_{name}_block_reasons"] = None if blocked is None else blocked["reasons"]
    out["prada_full_client_mb"] = full["rss_growth_bytes"] / MB
    out["prada_full_client_bound_mb"] = None if full["bound_bytes"] is None else full["bound_bytes"] / MB
    out["prada_full_client_stored_queries"] = full["stored_queries"]
    out["prada_full_client_export_mb"] = full["export_bytes"] / MB
    return out


def _child(args: list[str]) -> None:
    from _machine import peak_rss_bytes

    result = _child_monitor(args[1], int(args[2])) if args[0] == "monitor" else _child_prada_full()
    print(json.dumps({**result, "peak": peak_rss_bytes(), "vm_hwm": vm_hwm_bytes()}))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        _child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 client identities instead of 10,000")
    parser.add_argument("--json", metavar="PATH", help="write the flat results as JSON")
    parser.add_argument("--parallel", type=int, default=1, help="configurations measured at once (1: one by one)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, among {', '.join(CONFIGS)}")
    args = parser.parse_args(argv)
    from _machine import hardware

    started = time.perf_counter()
    out = monitor_scale(args.quick, args.parallel, tuple(args.configs.split(",")))
    out["monitor_scale_wall_s"] = time.perf_counter() - started
    out["machine"] = hardware()
    text = json.dumps(out, indent=2, sort_keys=True)
    print(text)
    if args.json:
        from edgeshield._io import atomic_write_bytes

        atomic_write_bytes(Path(args.json), (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
