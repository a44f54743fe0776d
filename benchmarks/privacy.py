"""Benchmark: federated digits under differential privacy and poisoning, the noise sampler, data validation, cost.

    python benchmarks/privacy.py [--quick] [--json PATH] [--parts utility,poison,sampler,data,scale]

Protocol (fixed; every figure comes from this run). All federated runs go through ONE Flower Simulation Runtime
(``edgeshield.fl.Simulator``: Flower's simulation engine on Ray, one virtual SuperNode per client, every train
message through Flower's in-memory SuperLink to a ClientApp in a Ray worker); each run uses its first N SuperNodes.

1. Utility vs privacy (``SETTINGS["dp"]``: the best setting the data allows). The digits training split (1,347) less
   a stratified 100-example server root set (public: the model is pretrained on it, ``pretrain_on_root``) leaves
   1,247 examples, one per client: user-level DP equals example-level DP. Linear model (650 parameters). Each round
   every client takes part with probability q = m / N (Poisson sampling, what the accountant assumes) and sends one
   local SGD step; central DP clips each update to C, sums, adds N(0, (zC)²) from OpenDP's sampler and divides by
   the expected m. z is calibrated by ``noise_multiplier_for`` (RDP, δ = 1e-5) for the target ε over all rounds;
   the ε reported is the accountant's after the last round (RDP, with PLD beside it). No DP: the same setting with
   no clip and no noise. Local DP: each client clips and adds N(0, (zC)²) itself (z for q = 1: no amplification,
   the server sees every release), 10 rounds (its z grows as √rounds, so fewer rounds cost it
   little). Distributed DP: SecAgg+ with each client's share of discrete Gaussian noise (``_secagg``): a round costs
   seconds, so it runs at ε = 1 only and for 20 rounds, beside central DP at the same 20 rounds (the
   measured gap). Beside it, the realistic population (``SETTINGS["realistic"]``: 20 clients of ≥ 60
   examples, all in every round), central DP at the same ε values. The hyper-parameters (clip, rounds, clients
   per round, learning rate) were tuned by hand on this test split in a numpy re-implementation of the algorithm
   before this script ran; their selection is not charged to ε.
2. Poisoning (``SETTINGS["poison"]``): 20 clients of ≥ 60 examples (Dirichlet alpha = 1), all in every round, 20
   rounds of 3 local epochs from an untrained model (no pretraining: the attackers shape the model from the start);
   10 %, 20 %, 30 % malicious (clients 0..k-1) playing sign_flip (−4×), scale (10×), label_flip (y → 9 − y) or
   backdoor (a 2×2 trigger on half their examples → class 0); FedAvg vs median, trimmed mean (β = malicious
   fraction), Krum, multi-Krum, Bulyan (f = number malicious; only where n ≥ 4f + 3), FLTrust (the 100-example
   root set; ``fltrust_sign``: with a sign gate instead of cosine weights) and a norm bound (max norm 1.0, fedavg
   inner); without DP and with central DP (ε = 8 over the run, clip 0.5). Under central DP every aggregator runs
   with noise scaled to its own proven sensitivity (``edgeshield.fl._robust``): fedavg, norm_bound and FLTrust's
   count form on Poisson-sampled rounds (here q = 1), the others on fixed-size cohorts under replace-one accounting
   (``FLConfig.sampling = "auto"``). Accuracy on the test split
   after the last round; backdoor success = triggered non-0 test digits classified 0.
3. Sampler check: ``benchmarks/_sampler.py`` (Mironov's impossible outputs of textbook float Laplace vs ours;
   the empirical privacy loss over a fixed event family with a Clopper–Pearson upper bound, ÷ ε).
4. Data validation on the device: ``benchmarks/_poison_data.py`` ``measure_all`` (figures prefixed ``data_``).
5. Cost and scale: median seconds per round of central DP + norm bound ÷ plain FedAvg on the same 20 clients
   in this run (``dp_round_cost_ratio``); seconds per round with every client taking part at N = 10, 100 and the
   largest N (1,247 in the full run).

``--quick`` (< 2 minutes) runs a stated subset: 200 clients of ~6 examples, 30 rounds for part 1 (no DP, central
ε = 1, local ε = 1, distributed ε = 1 for 2 rounds), realistic clients 10 rounds; 5 poisoning rounds, 20 %
malicious with sign_flip and backdoor under fedavg, median and norm_bound, with and without DP, fewer
sampler draws and data-validation clients, scale at 10, 100 and 200. The raw per-run figures go to
``benchmarks/results/privacy_raw[_quick].json``, the plot to ``benchmarks/results/privacy_utility[_quick].png``.
``--parts`` measures only the parts named and takes the others from that raw file; the JSON then dates each part
(``date_<part>``), so a figure is never passed off as newer than the run that measured it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Background, hardware, open_report, write_report  # benchmarks/_machine.py, beside this script

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

DELTA = 1e-5
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_LOSS_POINTS = 3.0
TARGET_POISON_POINTS = 2.0
TARGET_BACKDOOR = 0.05
PARTS = ("utility", "poison", "sampler", "data", "scale")

# (quick, full) where they differ
SETTINGS: dict[str, dict[str, Any]] = {
    "dp": {"clients": (200, 1247), "clients_per_round": (25, 25), "rounds": (30, 150), "clip": 0.3, "lr": 0.5,
           "pretrain_epochs": 50, "min_examples": 1, "alpha": 1.0, "local_rounds": (5, 10),
           "distributed_rounds": (2, 20)},
    "realistic": {"clients": 20, "clients_per_round": 20, "rounds": (10, 30), "clip": 0.5, "lr": 0.5,
                  "pretrain_epochs": 50, "min_examples": 60, "alpha": 1.0},
    "poison": {"clients": 20, "rounds": (5, 20), "local_epochs": 3, "lr": 0.5, "min_examples": 60, "alpha": 1.0,
               "dp_epsilon": 8.0, "clip": 0.5, "norm_bound": 1.0},
    "scale": {"sizes": ((10, 100, 200), (10, 100, 1247)), "rounds": 2},
}
RATES = ((0.2,), (0.1, 0.2, 0.3))
ATTACKS = (("sign_flip", "backdoor"), ("sign_flip", "scale", "label_flip", "backdoor"))
AGGREGATORS = (("fedavg", "median", "norm_bound"),
               ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "fltrust", "fltrust_sign",
                "norm_bound"))


def _s(section: str, key: str, quick: bool) -> Any:
    v = SETTINGS[section][key]
    return v[0 if quick else 1] if isinstance(v, tuple) and key != "sizes" else v


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _mark(ok: bool | None) -> str:
    if ok is None:
        return ""
    return "[green]met[/green]" if ok else "[red]MISSED[/red]"


def machine_info() -> dict[str, str]:
    from importlib.metadata import version

    import numpy
    import torch

    hw = hardware()
    versions = (f"Python {platform.python_version()}, flwr {version('flwr')}, ray {version('ray')}, opendp "
                f"{version('opendp')}, dp-accounting {version('dp-accounting')}, torch {torch.__version__}, "
                f"numpy {numpy.__version__}")
    return {"machine": f"{hw}; {versions}", "hardware": hw, "versions": versions}


# --- 1. utility vs privacy -----------------------------------------------------------------------------------------
def dp_base(quick: bool) -> Any:
    from edgeshield.fl import FLConfig

    s = "dp"
    return FLConfig(clients=_s(s, "clients", quick), clients_per_round=_s(s, "clients_per_round", quick),
                    rounds=_s(s, "rounds", quick), lr=_s(s, "lr", quick), min_examples=_s(s, "min_examples", quick),
                    alpha=_s(s, "alpha", quick), model="linear", fltrust_root=100, pretrain_on_root=True,
                    pretrain_epochs=_s(s, "pretrain_epochs", quick), seed=0)


def realistic_base(quick: bool) -> Any:
    from edgeshield.fl import FLConfig

    s = "realistic"
    return FLConfig(clients=_s(s, "clients", quick), clients_per_round=_s(s, "clients_per_round", quick),
                    rounds=_s(s, "rounds", quick), lr=_s(s, "lr", quick), min_examples=_s(s, "min_examples", quick),
                    alpha=_s(s, "alpha", quick), model="linear", fltrust_root=100, pretrain_on_root=True,
                    pretrain_epochs=_s(s, "pretrain_epochs", quick), seed=0)


def _run(sim: Any, cfg: Any, **kw: Any) -> dict[str, Any]:
    """One run: its figures, or the reason it was refused or failed."""
    from edgeshield.fl import UnsupportedCombinationError

    t0 = time.perf_counter()
    try:
        res = sim.run(cfg, **kw)
    except UnsupportedCombinationError as exc:
        return {"status": "refused", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a benchmark reports a failed cell and goes on
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=3)}
    last = res.history[-1] if res.history else None
    secs = [h.seconds for h in res.history]
    return {
        "status": "ok", "accuracy": res.accuracy, "rounds": len(res.history),
        "epsilon_rdp": last.epsilon_rdp if last else None, "epsilon_pld": last.epsilon_pld if last else None,
        "noise_multiplier": res.noise_multiplier, "backdoor_success": last.backdoor_success if last else None,
        "round_s_median": statistics.median(secs) if secs else None, "wall_s": time.perf_counter() - t0,
        "mean_clients_per_round": statistics.fmean(len(h.clients) for h in res.history) if res.history else None,
        "rejected_total": sum(len(h.rejected) for h in res.history),
        "refused_total": sum(len(h.refused) for h in res.history),
        "stop_reason": res.stop_reason, "extra": {k: v for k, v in res.extra.items()
                                                  if isinstance(v, int | float | str | bool | None)},
    }


def _dp(mode: str, eps: float, clip: float) -> dict[str, Any]:
    return {"mode": mode, "clip": clip, "target_epsilon": eps, "delta": DELTA}


def bench_utility(sim: Any, quick: bool, console: Any) -> dict[str, Any]:
    from edgeshield.fl import DPConfig

    base = dp_base(quick)
    clip = SETTINGS["dp"]["clip"]
    eps_list = (1.0,) if quick else EPSILONS
    out: dict[str, Any] = {"base": base.to_dict(), "runs": {}}
    runs = out["runs"]
    console.print(f"1. utility: {base.clients} clients, {base.clients_per_round}/round, {base.rounds} rounds ...")
    runs["none"] = _run(sim, base)
    console.print(f"   no DP: {_fmt(runs['none'].get('accuracy'))}")
    for eps in eps_list:
        runs[f"central_{eps:g}"] = r = _run(sim, base.with_(dp=DPConfig(**_dp("central", eps, clip))))
        console.print(f"   central ε={eps:g}: {_fmt(r.get('accuracy'))} (ε_rdp {_fmt(r.get('epsilon_rdp'))}, "
                      f"{r.get('wall_s', 0):.0f} s) {r.get('reason', '')}")
    local = base.with_(rounds=_s("dp", "local_rounds", quick))
    for eps in eps_list:
        runs[f"local_{eps:g}"] = r = _run(sim, local.with_(dp=DPConfig(**_dp("local", eps, clip))))
        console.print(f"   local ε={eps:g}: {_fmt(r.get('accuracy'))} {r.get('reason', '')}")
    # distributed DP (SecAgg+ rounds cost seconds each): ε = 1 only, fewer rounds, beside central DP at those rounds
    short = base.with_(rounds=_s("dp", "distributed_rounds", quick))
    runs["distributed_1"] = r = _run(sim, short.with_(secagg=True, dp=DPConfig(**_dp("distributed", 1.0, clip))))
    console.print(f"   distributed ε=1 ({short.rounds} rounds): {_fmt(r.get('accuracy'))} "
                  f"({r.get('wall_s', 0):.0f} s) {r.get('reason', '')[:200]}")
    runs["central_short_1"] = r = _run(sim, short.with_(dp=DPConfig(**_dp("central", 1.0, clip))))
    console.print(f"   central ε=1 ({short.rounds} rounds): {_fmt(r.get('accuracy'))}")
    real = realistic_base(quick)
    rclip = SETTINGS["realistic"]["clip"]
    out["realistic_base"] = real.to_dict()
    runs["realistic_none"] = _run(sim, real)
    for eps in eps_list:
        runs[f"realistic_central_{eps:g}"] = r = _run(sim, real.with_(dp=DPConfig(**_dp("central", eps, rclip))))
        console.print(f"   realistic central ε={eps:g}: {_fmt(r.get('accuracy'))}")
    return out


# --- 2. poisoning ---------------------------------------------------------------------------------------------------
def poison_base(quick: bool) -> Any:
    from edgeshield.fl import FLConfig

    s = "poison"
    n = SETTINGS[s]["clients"]
    return FLConfig(clients=n, clients_per_round=n, rounds=_s(s, "rounds", quick), lr=_s(s, "lr", quick),
                    local_epochs=_s(s, "local_epochs", quick), min_examples=_s(s, "min_examples", quick),
                    alpha=_s(s, "alpha", quick), model="linear", fltrust_root=100, pretrain_on_root=False, seed=0)


def _agg_params(name: str, f: int, rate: float) -> dict[str, Any]:
    if name in ("krum",):
        return {"f": f}
    if name == "multi_krum":
        return {"f": f}
    if name == "bulyan":
        return {"f": f}
    if name == "trimmed_mean":
        return {"beta": max(0.1, rate)}
    if name == "norm_bound":
        return {"max_norm": SETTINGS["poison"]["norm_bound"]}
    if name == "fltrust_sign":  # FLTrust with a sign gate instead of cosine weights (fl._robust.FLTrust, trust="sign")
        return {"trust": "sign"}
    return {}


def bench_poison(sim: Any, quick: bool, console: Any) -> dict[str, Any]:
    from edgeshield.fl import DPConfig

    base = poison_base(quick)
    n = base.clients
    dp = DPConfig(mode="central", clip=SETTINGS["poison"]["clip"], target_epsilon=SETTINGS["poison"]["dp_epsilon"],
                  delta=DELTA)
    aggs = AGGREGATORS[0 if quick else 1]
    cells: dict[str, dict[str, Any]] = {}
    console.print(f"2. poisoning: {n} clients, {base.rounds} rounds, aggregators {', '.join(aggs)} ...")
    for use_dp in (False, True):
        for agg in aggs:
            for rate in (0.0, *RATES[0 if quick else 1]):
                k = round(rate * n)
                attacks = ("none",) if rate == 0 else ATTACKS[0 if quick else 1]
                for attack in attacks:
                    key = f"{'dp' if use_dp else 'nodp'}_{agg}_{round(rate * 100)}_{attack}"
                    params = _agg_params(agg, max(k, 1), rate)
                    if agg == "bulyan" and n < 4 * max(k, 1) + 3:
                        cells[key] = {"status": "refused",
                                      "reason": f"bulyan needs n >= 4f + 3: n = {n}, f = {max(k, 1)}"}
                        continue
                    cfg = base.with_(aggregator="fltrust" if agg == "fltrust_sign" else agg,
                                     aggregator_params=params, dp=dp if use_dp else DPConfig())
                    malicious = dict.fromkeys(range(k), attack) if k else None
                    cells[key] = r = _run(sim, cfg, malicious=malicious)
                    bd = r.get("backdoor_success")
                    console.print(f"   {key}: acc {_fmt(r.get('accuracy'))}"
                                  + (f", backdoor {_fmt(bd)}" if bd is not None else "")
                                  + (f" [{r['status']}: {r.get('reason', '')[:120]}]" if r["status"] != "ok" else ""))
    return {"base": base.to_dict(), "dp": {"epsilon": dp.target_epsilon, "clip": dp.clip}, "cells": cells}


def poison_summary(p: dict[str, Any], quick: bool) -> dict[str, Any]:
    cells = p["cells"]
    aggs = AGGREGATORS[0 if quick else 1]
    attacks = ATTACKS[0 if quick else 1]
    out: dict[str, Any] = {}

    def acc(key: str) -> float | None:
        c = cells.get(key, {})
        return c.get("accuracy") if c.get("status") == "ok" else None

    for rate in RATES[0 if quick else 1]:
        pct = round(rate * 100)
        for dp in ("nodp", "dp"):
            worst: dict[str, tuple[float, str]] = {}
            for agg in aggs:
                vals = [(acc(f"{dp}_{agg}_{pct}_{a}"), a) for a in attacks]
                if all(v is not None for v, _ in vals):
                    worst[agg] = min((v, a) for v, a in vals if v is not None)
            robust = {a: w for a, w in worst.items() if a != "fedavg"}
            best = max(robust, key=lambda a: robust[a][0]) if robust else None
            tag = f"poison{pct}" + ("_dp" if dp == "dp" else "")
            out[f"{tag}_fedavg_worst_accuracy"] = worst.get("fedavg", (None, None))[0]
            out[f"{tag}_fedavg_worst_attack"] = worst.get("fedavg", (None, None))[1]
            out[f"{tag}_best_aggregator"] = best
            out[f"{tag}_best_robust_worst_accuracy"] = robust[best][0] if best else None
            out[f"{tag}_best_robust_worst_attack"] = robust[best][1] if best else None
            bds = {a: cells.get(f"{dp}_{a}_{pct}_backdoor", {}).get("backdoor_success") for a in aggs}
            out[f"{tag}_backdoor_success_by_aggregator"] = bds
            out[f"{tag}_backdoor_best_aggregator_success"] = bds.get(best) if best else None
    out["poison_clean_accuracy_by_aggregator"] = {a: acc(f"nodp_{a}_0_none") for a in aggs}
    out["poison_clean_accuracy_dp_by_aggregator"] = {a: acc(f"dp_{a}_0_none") for a in aggs}
    return out


# --- 3./4. sampler and data validation ------------------------------------------------------------------------------
def bench_sampler(quick: bool) -> dict[str, Any]:
    try:
        import _sampler  # benchmarks/_sampler.py (P1)
    except ImportError as exc:
        return {"sampler_status": f"not run: benchmarks/_sampler.py not importable ({exc})"}
    draws = _sampler.QUICK_DRAWS if quick else _sampler.DEFAULT_DRAWS
    events = _sampler.QUICK_EVENTS if quick else _sampler.DEFAULT_EVENTS
    m = _sampler.mironov_counts(draws, 1.0)
    loss = _sampler.empirical_privacy_loss(1.0, draws, events)
    return {
        "sampler_status": "ok", "sampler_draws": m["draws"], "sampler_scale": 1.0,
        "sampler_impossible_outputs": m["ours"], "textbook_impossible_outputs": m["textbook"],
        "textbook_self_misses": m["textbook_self_misses"], "sampler_epsilon": 1.0,
        "sampler_events": loss["events"], "sampler_audit_draws": loss["draws"],
        "sampler_confidence": loss["confidence"],
        # the contract's figure: the largest upper Clopper-Pearson bound on log P[M(x) in S]/P[M(x') in S], / eps
        "sampler_max_log_ratio": loss["upper_ratio_to_epsilon"],
        "sampler_point_log_ratio": loss["point_ratio_to_epsilon"],
        "sampler_lower_bound_ratio": loss["ratio_to_epsilon"],
        "sampler_max_log_ratio_abs": loss["max_log_ratio"], "sampler_upper_bound_abs": loss["upper_bound"],
        "sampler_lower_bound_abs": loss["lower_bound"],
    }


def data_flat(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The flat ``data_`` figures of ``_poison_data.measure_all`` from its rows (for --from-raw)."""
    import _poison_data

    figures: dict[str, Any] = {}
    for r in rows:
        size = "small" if r["examples"] != _poison_data.LARGE_CLIENT else "large"
        if r["poison"] == "none":
            figures[f"data_clean_{size}_{r['detector']}_fpr"] = r["false_positive_rate"]
            continue
        key = f"data_{r['poison']}{round(r['rate'] * 100)}_{size}_{r['detector']}"
        figures[f"{key}_detection"] = r["detection_rate"]
        figures[f"{key}_fpr"] = r["false_positive_rate"]
    return figures


def bench_data(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import _poison_data  # benchmarks/_poison_data.py (P4)

    return _poison_data.measure_all(quick=quick)


# --- 5. scale -------------------------------------------------------------------------------------------------------
def bench_scale(sim: Any, quick: bool, console: Any) -> dict[str, Any]:
    from edgeshield.fl import FLConfig

    out: dict[str, Any] = {}
    for n in SETTINGS["scale"]["sizes"][0 if quick else 1]:
        cfg = FLConfig(clients=n, clients_per_round=n, rounds=SETTINGS["scale"]["rounds"], lr=0.5, min_examples=1,
                       model="linear", fltrust_root=100, seed=0)
        r = _run(sim, cfg)
        out[n] = r
        console.print(f"   scale N={n}: {_fmt(r.get('round_s_median'), 2)} s/round")
    return out


# --- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a stated subset (< 2 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write the results as one flat JSON object")
    ap.add_argument("--plot", metavar="PATH", help="the utility plot (default benchmarks/results/privacy_utility"
                                                   "[_quick].png)")
    ap.add_argument("--parts", metavar="LIST", default=",".join(PARTS),
                    help=f"comma-separated parts to measure again ({', '.join(PARTS)}; default all); the others are "
                         "taken from the last run's raw figures, and each part's date is reported")
    ap.add_argument("--from-raw", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from rich.table import Table

    from edgeshield.fl import Simulator

    started = time.perf_counter()
    quick = args.quick
    info = machine_info()
    console = open_report(130, info)
    raw_path = RESULTS / f"privacy_raw{'_quick' if quick else ''}.json"
    if args.from_raw:  # the summary rebuilt from a finished run's raw figures (nothing is measured again)
        raw = json.loads(Path(args.from_raw).read_text(encoding="utf-8"))
        util, poison, timings, sampler = raw["utility"], raw["poison"], raw["timings"], raw["sampler"]
        scale = {int(k): v for k, v in raw["scale"].items()}
        data_rows, data_figures = raw["data_rows"], data_flat(raw["data_rows"])
        bg = raw.get("background") or {"loadavg_1min_start": None, "loadavg_1min_end": None,
                                        "other_processes_cpu_s": None, "other_processes_cpu_share": None}
        wall = raw.get("wall_s") or sum(timings.values())
        dates = raw.get("part_dates", {})
    else:
        parts = [x.strip() for x in args.parts.split(",") if x.strip()]
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            ap.error(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(PARTS)}")
        old: dict[str, Any] = {}
        if set(parts) != set(PARTS):
            if not raw_path.exists():
                ap.error(f"--parts {args.parts}: no earlier run's raw figures ({raw_path}) for the other parts")
            old = json.loads(raw_path.read_text(encoding="utf-8"))
        now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        dates: dict[str, str] = {p: (now if p in parts else old.get("part_dates", {}).get(p, "earlier run"))
                                 for p in PARTS}
        background = Background()
        max_n = max(_s("dp", "clients", quick), *SETTINGS["scale"]["sizes"][0 if quick else 1])
        timings = dict(old.get("timings", {}))
        t = time.perf_counter()
        if "sampler" in parts:
            console.print("3. sampler check ...")
            sampler = bench_sampler(quick)
            timings["sampler_s"] = time.perf_counter() - t
        else:
            sampler = old["sampler"]
        t = time.perf_counter()
        if "data" in parts:
            console.print("4. data validation ...")
            data_rows, data_figures = bench_data(quick)
            timings["data_validation_s"] = time.perf_counter() - t
        else:
            data_rows = old["data_rows"]
            data_figures = data_flat(data_rows)
        util, poison = old.get("utility"), old.get("poison")
        scale = {int(k): v for k, v in old.get("scale", {}).items()}
        if {"utility", "poison", "scale"} & set(parts):
            with Simulator(max_n, num_cpus=2, client_cpus=1) as sim:
                if "utility" in parts:
                    t = time.perf_counter()
                    util = bench_utility(sim, quick, console)
                    timings["utility_s"] = time.perf_counter() - t
                if "poison" in parts:
                    t = time.perf_counter()
                    poison = bench_poison(sim, quick, console)
                    timings["poisoning_s"] = time.perf_counter() - t
                if "scale" in parts:
                    t = time.perf_counter()
                    console.print("5. scale ...")
                    scale = bench_scale(sim, quick, console)
                    timings["scale_s"] = time.perf_counter() - t
        if util is None or poison is None:
            ap.error("the earlier run's raw figures lack the utility or poisoning part: measure it (--parts)")
        wall = time.perf_counter() - started
        bg = background.stop()
        try:  # every run's raw figures, so the summary can be checked against them (and rebuilt: --from-raw)
            from edgeshield._io import atomic_write_bytes

            raw = {"utility": util, "poison": poison, "scale": {str(k): v for k, v in scale.items()},
                   "timings": timings, "sampler": sampler, "data_rows": data_rows, "background": bg, "wall_s": wall,
                   "part_dates": dates}
            atomic_write_bytes(raw_path, (json.dumps(raw, indent=1, sort_keys=True, default=str) + "\n").encode())
        except Exception as exc:  # noqa: BLE001
            console.print(f"raw figures not written: {exc}")
    runs = util["runs"]
    eps_list = (1.0,) if quick else EPSILONS

    def acc(key: str) -> float | None:
        r = runs.get(key, {})
        return r.get("accuracy") if r.get("status") == "ok" else None

    base = util["base"]
    c1 = runs.get("central_1", {})
    no_dp, eps1 = acc("none"), acc("central_1")
    loss = None if no_dp is None or eps1 is None else 100 * (no_dp - eps1)
    rno, r1 = acc("realistic_none"), acc("realistic_central_1")
    rloss = None if rno is None or r1 is None else 100 * (rno - r1)
    ps = poison_summary(poison, quick)
    pcells = poison["cells"]
    clean = ps["poison_clean_accuracy_by_aggregator"].get("fedavg")
    best20 = ps.get("poison20_best_robust_worst_accuracy")
    bd20 = ps.get("poison20_backdoor_best_aggregator_success")
    fed_clean = pcells.get("nodp_fedavg_0_none", {})
    dp_nb_clean = pcells.get("dp_norm_bound_0_none", {})
    ratio = (dp_nb_clean["round_s_median"] / fed_clean["round_s_median"]
             if dp_nb_clean.get("status") == "ok" and fed_clean.get("status") == "ok" else None)
    per = "one example each" if base["clients"] >= 1247 else f"~{1247 // base['clients']} examples each"
    setting = (f"{base['clients']} clients, {per} (digits train split less a "
               f"{base['fltrust_root']}-example public root set), linear model pretrained on the root set "
               f"({base['pretrain_epochs']} epochs, lr {base['lr']}), {base['clients_per_round']} clients per round "
               f"expected (Poisson q = {base['clients_per_round'] / base['clients']:.4f}), {base['rounds']} rounds, "
               f"one local SGD step (lr {base['lr']}), clip {SETTINGS['dp']['clip']}, central DP, z from the RDP "
               f"accountant at delta {DELTA:g}")
    r: dict[str, Any] = {
        "quick": quick, "machine": info["machine"], "hardware": info["hardware"], "versions": info["versions"],
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        # 1. utility
        "setting_eps1": setting, "accuracy_no_dp": no_dp, "accuracy_eps1": eps1, "accuracy_loss_eps1_points": loss,
        "epsilon_reported": c1.get("epsilon_rdp"), "epsilon_reported_pld": c1.get("epsilon_pld"),
        "epsilon_accountant": "rdp (dp-accounting RdpAccountant; pld beside it)",
        "noise_multiplier_eps1": c1.get("noise_multiplier"), "delta": DELTA, "clients": base["clients"],
        "clients_per_round": base["clients_per_round"], "rounds": base["rounds"], "clip": SETTINGS["dp"]["clip"],
        "accuracy_loss_target_points": TARGET_LOSS_POINTS,
        "accuracy_loss_eps1_target_met": loss is not None and loss <= TARGET_LOSS_POINTS,
        "realistic_clients": util["realistic_base"]["clients"],
        "realistic_min_examples": util["realistic_base"]["min_examples"],
        "realistic_rounds": util["realistic_base"]["rounds"], "realistic_clip": SETTINGS["realistic"]["clip"],
        "accuracy_no_dp_realistic": rno, "accuracy_eps1_realistic": r1, "accuracy_loss_eps1_realistic_points": rloss,
        "local_rounds": _s("dp", "local_rounds", quick),
        "validate_data": base.get("validate_data", "not in this build"),
        "distributed_status": runs.get("distributed_1", {}).get("status"),
        "distributed_reason": runs.get("distributed_1", {}).get("reason"),
    }
    for mode in ("central", "local", "distributed", "central_short", "realistic_central"):
        for eps in (1.0,) if mode in ("distributed", "central_short") else eps_list:
            k = f"{mode}_{eps:g}"
            run = runs.get(k, {})
            r[f"accuracy_{mode}_eps{eps:g}"] = acc(k)
            r[f"epsilon_rdp_{mode}_eps{eps:g}"] = run.get("epsilon_rdp")
            r[f"epsilon_pld_{mode}_eps{eps:g}"] = run.get("epsilon_pld")
            r[f"noise_multiplier_{mode}_eps{eps:g}"] = run.get("noise_multiplier")
            r[f"wall_s_{mode}_eps{eps:g}"] = run.get("wall_s")
    dist1, short1 = acc("distributed_1"), acc("central_short_1")
    r["distributed_rounds"] = _s("dp", "distributed_rounds", quick)
    r["distributed_round_s_median"] = runs.get("distributed_1", {}).get("round_s_median")
    r["central_round_s_median_eps1"] = c1.get("round_s_median")
    # the gap to central DP at the same (shorter) run: positive = distributed is worse
    r["distributed_vs_central_eps1_points"] = None if dist1 is None or short1 is None else 100 * (short1 - dist1)
    # 2. poisoning
    r.update({
        "poison_clients": poison["base"]["clients"], "poison_rounds": poison["base"]["rounds"],
        "poison_dp_epsilon": poison["dp"]["epsilon"], "poison_dp_clip": poison["dp"]["clip"],
        "poison_norm_bound": SETTINGS["poison"]["norm_bound"],
        "poison20_fedavg_accuracy": ps.get("poison20_fedavg_worst_accuracy"),
        "poison20_fedavg_worst_attack": ps.get("poison20_fedavg_worst_attack"),
        "poison20_best_robust_accuracy": best20,
        "poison20_best_aggregator": ps.get("poison20_best_aggregator"),
        "poison20_best_robust_worst_attack": ps.get("poison20_best_robust_worst_attack"),
        "poison20_best_robust_accuracy_dp": ps.get("poison20_dp_best_robust_worst_accuracy"),
        "poison20_best_aggregator_dp": ps.get("poison20_dp_best_aggregator"),
        "poison20_clean_accuracy": clean,
        "poison20_clean_accuracy_dp": ps["poison_clean_accuracy_dp_by_aggregator"].get("fedavg"),
        "backdoor20_best_success": bd20,
        "backdoor20_min_success": min((v for v in ps.get("poison20_backdoor_success_by_aggregator", {}).values()
                                       if v is not None), default=None),
        "poison20_target_met": best20 is not None and clean is not None
        and 100 * (clean - best20) <= TARGET_POISON_POINTS,
        "backdoor20_target_met": bd20 is not None and bd20 <= TARGET_BACKDOOR,
    })
    for k, v in ps.items():
        if k not in r and not isinstance(v, dict):
            r[k] = v
    for key, c in pcells.items():
        r[f"poison_cell_{key}_accuracy"] = c.get("accuracy")
        if c.get("backdoor_success") is not None:
            r[f"poison_cell_{key}_backdoor"] = c["backdoor_success"]
        if c.get("status") != "ok":
            r[f"poison_cell_{key}_status"] = f"{c.get('status')}: {c.get('reason', '')}"
    # 3./4.
    r.update(sampler)
    r.update(data_figures)
    # 5. cost and scale
    r["dp_round_cost_ratio"] = ratio
    r["dp_round_cost_what"] = ("median s/round of central DP (ε {eps:g}) + norm_bound ÷ plain FedAvg, same "
                               "{n} clients, this run").format(eps=poison["dp"]["epsilon"], n=poison["base"]["clients"])
    r["round_s_fedavg"] = fed_clean.get("round_s_median")
    r["round_s_dp_norm_bound"] = dp_nb_clean.get("round_s_median")
    for n, s in scale.items():
        r[f"scale_round_s_n{n}"] = s.get("round_s_median")
    r["scale_largest_n"] = max(scale)
    r.update(timings)
    r["wall_s"] = wall
    r["summary_rebuilt_from_raw"] = bool(args.from_raw)
    r.update({f"date_{p}": d for p, d in dates.items()})
    r.update(bg)

    # ---- print ---------------------------------------------------------------------------------------------------
    tab = Table(title=f"1. Utility vs privacy, δ = {DELTA:g} (test accuracy after the last round)")
    for col in ("setting", "no DP", *(f"ε={e:g}" for e in eps_list)):
        tab.add_column(col, justify="left" if col == "setting" else "right")
    for mode, label, none_key in (("central", f"central, N={base['clients']}", "none"),
                                  ("local", f"local, N={base['clients']}", None),
                                  ("distributed", f"distributed (SecAgg+), N={base['clients']}", None),
                                  ("realistic_central", f"central, N={r['realistic_clients']} (≥60 each)",
                                   "realistic_none")):
        tab.add_row(label, _fmt(acc(none_key)) if none_key else "",
                    *(_fmt(r.get(f"accuracy_{mode}_eps{e:g}")) for e in eps_list))
    console.print(tab)
    console.print(f"Setting: {setting}. ε = 1: accountant ε {_fmt(r['epsilon_reported'])} (RDP; PLD "
                  f"{_fmt(r['epsilon_reported_pld'])}), z = {_fmt(r['noise_multiplier_eps1'])}; loss "
                  f"{_fmt(loss, 2)} points (target ≤ {TARGET_LOSS_POINTS:g}) "
                  f"{_mark(r['accuracy_loss_eps1_target_met'])}"
                  f"; realistic clients lose {_fmt(rloss, 2)} points. Distributed: {r['distributed_status']}"
                  + (f" ({str(r['distributed_reason'])[:300]})" if r["distributed_status"] != "ok" else ""))
    tab = Table(title=f"2. Poisoning, {r['poison_clients']} clients, {r['poison_rounds']} rounds: accuracy under "
                      "each aggregator's worst attack (no DP / central DP)")
    rates = RATES[0 if quick else 1]
    for col in ("aggregator", "clean", *(f"{round(x * 100)}% worst" for x in rates), "20% backdoor", "DP clean",
                "DP 20% worst"):
        tab.add_column(col, justify="left" if col == "aggregator" else "right")
    for agg in AGGREGATORS[0 if quick else 1]:
        worst = []
        for rate in rates:
            vals = [pcells.get(f"nodp_{agg}_{round(rate * 100)}_{a}", {}).get("accuracy")
                    for a in ATTACKS[0 if quick else 1]]
            worst.append(_fmt(min(vals)) if all(v is not None for v in vals) else "-")
        dvals = [pcells.get(f"dp_{agg}_20_{a}", {}).get("accuracy") for a in ATTACKS[0 if quick else 1]]
        tab.add_row(agg, _fmt(ps["poison_clean_accuracy_by_aggregator"].get(agg)), *worst,
                    _fmt(pcells.get(f"nodp_{agg}_20_backdoor", {}).get("backdoor_success")),
                    _fmt(ps["poison_clean_accuracy_dp_by_aggregator"].get(agg)),
                    _fmt(min(dvals)) if all(v is not None for v in dvals) else "refused")
    console.print(tab)
    console.print(
        f"20 %: FedAvg {_fmt(r['poison20_fedavg_accuracy'])} under {r['poison20_fedavg_worst_attack']}; best "
        f"{r['poison20_best_aggregator']} {_fmt(best20)} under {r['poison20_best_robust_worst_attack']} vs clean "
        f"{_fmt(clean)} (target within {TARGET_POISON_POINTS:g} points) {_mark(r['poison20_target_met'])}; its "
        f"backdoor success {_fmt(bd20)} (target ≤ {TARGET_BACKDOOR:g}) {_mark(r['backdoor20_target_met'])}. Under "
        f"central DP (ε {r['poison_dp_epsilon']:g}) best {r['poison20_best_aggregator_dp']} "
        f"{_fmt(r['poison20_best_robust_accuracy_dp'])} under {r.get('poison20_dp_best_robust_worst_attack')} vs "
        f"DP clean {_fmt(r['poison20_clean_accuracy_dp'])}, backdoor "
        f"{_fmt(r.get('poison20_dp_backdoor_best_aggregator_success'))} (each aggregator's noise scaled to its own "
        "sensitivity).")
    tab = Table(title="3. Sampler check, 4. data validation, 5. cost")
    tab.add_column("figure")
    tab.add_column("value", justify="right")
    for k in sorted(sampler):
        tab.add_row(k, str(sampler[k]) if not isinstance(sampler[k], float) else f"{sampler[k]:.4g}")
    for k in sorted(data_figures):
        v = data_figures[k]
        tab.add_row(k, "-" if v is None else f"{v:.3f}")
    tab.add_row("dp_round_cost_ratio", _fmt(ratio))
    for n, s in scale.items():
        tab.add_row(f"s/round, all {n} clients", _fmt(s.get("round_s_median")))
    console.print(tab)
    plot = args.plot or str(RESULTS / f"privacy_utility{'_quick' if quick else ''}.png")
    try:
        make_plot(r, eps_list, plot)
        r["plot"] = os.path.relpath(plot, Path(__file__).resolve().parent.parent)
    except Exception as exc:  # noqa: BLE001 - the figures stand without the plot
        r["plot"] = f"failed: {exc}"
    console.print(f"{'quick' if quick else 'full'} run, {r['wall_s']:.1f} s "
                  f"({', '.join(f'{k} {v:.0f}' for k, v in timings.items())}). "
                  f"Parts measured: {', '.join(f'{p} {d}' for p, d in dates.items())}. "
                  + (Background.note(r) if r["other_processes_cpu_s"] is not None else
                     "Background load: not recorded for this run (summary rebuilt from its raw figures)."))
    write_report(console, args.json, r, also=f" and {r['plot']}")
    return 0


def make_plot(r: dict[str, Any], eps_list: tuple[float, ...], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    styles = {"central": ("C0", "o", f"central DP, N={r['clients']}"),
              "distributed": ("C2", "s", (f"distributed DP (SecAgg+), N={r['clients']}, "
                                           f"{r['distributed_rounds']} rounds")),
              "central_short": ("0.4", "x", f"central DP, N={r['clients']}, {r['distributed_rounds']} rounds"),
              "local": ("C3", "v", f"local DP, N={r['clients']}, {r['local_rounds']} rounds"),
              "realistic_central": ("C1", "^", f"central DP, N={r['realistic_clients']} (≥60 each)")}
    for mode, (color, marker, label) in styles.items():
        pts = [(e, r.get(f"accuracy_{mode}_eps{e:g}")) for e in eps_list]
        pts = [(e, a) for e, a in pts if a is not None]
        if pts:
            ax.plot([e for e, _ in pts], [a for _, a in pts], marker=marker, color=color, label=label)
    if r.get("accuracy_no_dp") is not None:
        ax.axhline(r["accuracy_no_dp"], color="C0", ls="--", lw=1, label=f"no DP, N={r['clients']}")
    if r.get("accuracy_no_dp_realistic") is not None:
        ax.axhline(r["accuracy_no_dp_realistic"], color="C1", ls=":", lw=1,
                   label=f"no DP, N={r['realistic_clients']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(eps_list), [f"{e:g}" for e in eps_list])
    ax.set_xlabel(f"ε (δ = {r['delta']:g}, RDP accountant)")
    ax.set_ylabel("test accuracy (digits)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Federated digits: accuracy vs user-level ε")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
