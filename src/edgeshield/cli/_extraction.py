"""`edgeshield extraction …`: evaluate the model-extraction defence end to end on the bundled digits model.

`evaluate` serves the (watermarked) digits model through the real server app in-process, runs ART CopycatCNN,
KnockoffNets (random and adaptive) and a Jacobian-augmentation attack against it as monitored clients, streams benign
clients, and reports detection, stolen-model fidelity, false positives, output-hardening cost, watermark survival
and whether the served watermark proves each stolen copy. It answers a
question, so a missed target is not a failure: it exits 0 either way. Needs torch and
adversarial-robustness-toolbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeshield.cli._common import JsonOpt, console, emit_json, requires

app = typer.Typer(help="Model-extraction defence: end-to-end evaluation.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Model-extraction defence: end-to-end evaluation."""


@app.command("evaluate")
@requires("eval")
def evaluate(
    quick: Annotated[bool, typer.Option("--quick", help="Budgets 100 and 500, two output settings (< 1 minute).")]
    = False,
    budgets: Annotated[
        str | None, typer.Option("--budgets", help="Comma-separated query budgets (default 100,250,500,1000).")
    ] = None,
    no_watermark: Annotated[bool, typer.Option("--no-watermark", help="Skip the watermark checks.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the flat JSON figures to this file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Attack the digits model served by the real app and report what the extraction defence achieves."""
    import dataclasses
    import json

    from edgeshield._io import atomic_write_bytes
    from edgeshield.errors import InvalidArgumentError
    from edgeshield.evaluation._extraction import EvaluationConfig
    from edgeshield.evaluation._extraction import evaluate as run_evaluation

    cfg = EvaluationConfig.quick() if quick else EvaluationConfig()
    if budgets is not None:
        try:
            values = tuple(int(b) for b in budgets.split(",") if b.strip())
        except ValueError:
            raise InvalidArgumentError(f"--budgets must be comma-separated integers, not {budgets!r}") from None
        if not values or min(values) < 1:
            raise InvalidArgumentError("--budgets needs at least one positive budget")
        cfg = dataclasses.replace(cfg, budgets=values)
    if no_watermark:
        cfg = dataclasses.replace(cfg, watermark=False)
    from edgeshield.cli._progress import progress_bars

    with progress_bars() as progress:
        result = run_evaluation(cfg, progress=progress)
    flat = result["flat"]
    if out is not None:
        atomic_write_bytes(out, (json.dumps(flat, indent=2, sort_keys=True) + "\n").encode())
    if as_json:
        emit_json(flat)
        return
    console.print(f"protocol: {result['protocol_text']}", markup=False)
    for s in result["sessions"]:
        det = f"blocked after {s['queries_to_detect']} queries" if s["detected"] else "not detected"
        fid = "-" if s["fidelity_at_detection"] is None else f"{s['fidelity_at_detection']:.3f}"
        proof = (f"served watermark {s['served_wm_matches']}/{s['served_wm_evidence']} p={s['served_wm_p']:.2g}"
                 f"{' (proven)' if s['served_wm_proven'] else ''}")
        console.print(f"{s['attack']:17} {s['outputs']:10} budget {s['budget']:5}: {det}; fidelity at detection "
                      f"{fid}, at full budget undefended {s['fidelity_full']:.3f}; {proof}", markup=False)
    console.print(f"attack sessions detected: {flat['attack_sessions_detected']}/{flat['attack_sessions']} "
                  f"(max {flat['max_queries_to_detect']} queries); benign sessions flagged: "
                  f"{flat['benign_sessions_flagged']}/{flat['benign_sessions']}", markup=False)
    if cfg.watermark:
        console.print("watermark: " + ", ".join(f"{k.removeprefix('watermark_')}={flat[k]}" for k in (
            "watermark_accuracy_drop", "watermark_false_claims", "watermark_survives_finetune",
            "watermark_survives_prune30", "watermark_survives_int8", "watermark_survives_copycat")), markup=False)
