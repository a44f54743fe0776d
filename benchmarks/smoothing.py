"""Benchmark: certified accuracy and cost of randomized smoothing on the shipped digits models.

    python benchmarks/smoothing.py [--quick] [--json PATH]

Protocol (fixed; printed with the results):

1. Models: the shipped ``digits.onnx`` (standard training) and ``digits_robust.onnx`` (TRADES, L∞ 2/16). Neither was
   trained on Gaussian noise, which is what Cohen et al. do for smoothing: the figures show what smoothing gives
   these models as they ship, not what a noise-trained model would.
2. ``SmoothedClassifier.certify`` (Cohen et al. 2019 CERTIFY: n0 = 100 selection samples, n = 1,000 estimation
   samples, alpha = 0.001; the noise seeded from the OS CSPRNG on every call) on all 450 test digits, at
   sigma 0.12, 0.25 and 0.50. Certified accuracy at radius r = the share of test digits whose certified label is the
   true label with a certified L2 radius >= r (an abstention counts as wrong); abstention rate beside it.
   ``certified_accuracy_r0_25`` is the shipped robust model at sigma 0.25, r = 0.25 (the issue's figure), with its
   95 % Clopper-Pearson interval.
3. Cost, in the same run: median wall time of ``certify`` on one input (1,100 noisy copies in one ONNX Runtime
   call) and per input on a batch of 64, each divided by plain ONNX Runtime on the same batch (the ratio is what to
   quote; the machine line is printed).

``--quick``: 100 digits, sigma 0.25 only, fewer timing repetitions (a few seconds).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

try:
    import edgeshield  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

from edgeshield.adversarial import SmoothedClassifier, SmoothingConfig, clopper_pearson_lower
from edgeshield.adversarial._detectors import OnnxClassifier
from edgeshield.bundles._ort import onnxruntime as ort
from edgeshield.models import digits_model_path, digits_robust_model_path, load_digits_split

from _machine import hardware, open_report, write_report  # benchmarks/_machine.py, beside this script

RADII = (0.0, 0.25, 0.5, 1.0)


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _median_s(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ci(k: int, n: int) -> tuple[float, float]:
    return clopper_pearson_lower(k, n, 0.025), 1 - clopper_pearson_lower(n - k, n, 0.025)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 digits, sigma 0.25 only, fewer timings")
    ap.add_argument("--json", metavar="PATH", help="write the results as one JSON object")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    info = {"hardware": hardware(), "versions": f"Python {sys.version.split()[0]}, onnxruntime {ort.__version__}, "
                                                f"numpy {np.__version__}"}
    console = open_report(120, info)
    split = load_digits_split()
    x, y = split.x_test, split.y_test
    if args.quick:
        x, y = x[:100], y[:100]
    sigmas = (0.25,) if args.quick else (0.12, 0.25, 0.50)
    reps = 5 if args.quick else 30
    out: dict[str, object] = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "quick": args.quick,
                              "machine": f"{info['hardware']}; {info['versions']}", "n_test": len(x),
                              "n0": 100, "n": 1000, "alpha": 0.001}
    from rich.table import Table

    table = Table(title=f"Certified accuracy at L2 radius r ({len(x)} test digits; n0 100, n 1000, alpha 0.001)")
    for col in ("model", "sigma", "abstain", *(f"r={r:g}" for r in RADII)):
        table.add_column(col)
    for name, path in (("standard", digits_model_path()), ("robust", digits_robust_model_path())):
        clf = OnnxClassifier(_session(path))
        plain = float((clf.predict(x) == y).mean())
        out[f"{name}_clean_accuracy"] = plain
        for sigma in sigmas:
            labels, radii = SmoothedClassifier(clf, SmoothingConfig(sigma=sigma)).certify(x)
            key = f"{name}_sigma_{str(sigma).replace('.', '_')}"
            out[f"{key}_abstain_rate"] = float((labels == -1).mean())
            row = [name, f"{sigma:g}", f"{(labels == -1).mean():.3f}"]
            for r in RADII:
                hits = int(((labels == y) & (radii >= r)).sum())
                out[f"{key}_certified_accuracy_r{str(r).replace('.', '_')}"] = hits / len(x)
                row.append(f"{hits / len(x):.3f}")
                if name == "robust" and sigma == 0.25 and r == 0.25:
                    low, high = _ci(hits, len(x))
                    out.update({"certified_accuracy_r0_25": hits / len(x), "certified_accuracy_r0_25_ci_low": low,
                                "certified_accuracy_r0_25_ci_high": high})
            table.add_row(*row)
    console.print(table)

    clf = OnnxClassifier(_session(digits_robust_model_path()))
    smoothed = SmoothedClassifier(clf, SmoothingConfig(sigma=0.25, batch=1100 * 64))
    one, batch = x[:1], x[:64]
    t_plain_1 = _median_s(lambda: clf.logits(one), reps * 10)
    t_smooth_1 = _median_s(lambda: smoothed.certify(one), reps)
    t_plain_64 = _median_s(lambda: clf.logits(batch), reps * 10)
    t_smooth_64 = _median_s(lambda: smoothed.certify(batch), max(3, reps // 5))
    out.update({"plain_ms_batch1": t_plain_1 * 1e3, "smoothing_ms_batch1": t_smooth_1 * 1e3,
                "smoothing_latency_ratio_batch1": t_smooth_1 / t_plain_1,
                "plain_ms_per_input_batch64": t_plain_64 * 1e3 / 64,
                "smoothing_ms_per_input_batch64": t_smooth_64 * 1e3 / 64,
                "smoothing_latency_ratio_batch64": t_smooth_64 / t_plain_64})
    cost = Table(title="Cost of certify (sigma 0.25, n0 + n = 1,100 copies per input) vs plain ONNX Runtime")
    for col in ("batch", "plain ORT", "certify", "ratio"):
        cost.add_column(col)
    cost.add_row("1", f"{t_plain_1 * 1e3:.3f} ms", f"{t_smooth_1 * 1e3:.1f} ms", f"{t_smooth_1 / t_plain_1:.0f}x")
    cost.add_row("64 (per input)", f"{t_plain_64 * 1e3 / 64:.4f} ms", f"{t_smooth_64 * 1e3 / 64:.2f} ms",
                 f"{t_smooth_64 / t_plain_64:.0f}x")
    console.print(cost)
    if "certified_accuracy_r0_25" in out:
        console.print(f"certified_accuracy_r0_25 (robust model, sigma 0.25): {out['certified_accuracy_r0_25']:.3f} "
                      f"[{out['certified_accuracy_r0_25_ci_low']:.3f}, {out['certified_accuracy_r0_25_ci_high']:.3f}]")
    out["seconds"] = time.perf_counter() - began
    console.print(f"wall time {out['seconds']:.0f} s")
    write_report(console, args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
