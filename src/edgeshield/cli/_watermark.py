"""`edgeshield watermark …`: embed and verify a keyed ownership watermark in an ONNX model's weights, and test a
suspected extracted copy for the served (DAWN) watermark.

`verify` and `verify-copy` answer a question, so finding no watermark is not a failure: they print the statistic
and p-value and exit 0 either way (`present: false` in JSON). Only bad input, bad evidence or a bad key file exit
non-zero (2, 3 and 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeshield.cli._common import JsonOpt, console, emit_json, requires

app = typer.Typer(help="Ownership watermarks: a keyed spread-spectrum mark in a model's weights (embed, verify) "
                       "and a served DAWN mark in its answers that survives extraction (verify-copy).",
                  no_args_is_help=True)

KeyOpt = Annotated[Path, typer.Option("--key", help="The owner's secret watermark key (from `watermark keygen`).")]
PositionsOpt = Annotated[
    int | None,
    typer.Option("--positions", min=16, help="Number of weights carrying the mark (verify needs the embed value)."),
]


@app.command("keygen")
def keygen(
    key: Annotated[Path, typer.Argument(help="Where to write the new 32-byte key (mode 0600).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a random secret watermark key."""
    from edgeshield.watermark import generate_key

    generate_key(key, overwrite=force)
    if as_json:
        emit_json({"key": str(key)})
    else:
        console.print(f"watermark key written to {key} (keep it secret)", markup=False)


@app.command("embed")
@requires("owner")
def embed(
    model: Annotated[Path, typer.Argument(help="The ONNX model to mark.")],
    key: KeyOpt,
    out: Annotated[Path, typer.Option("--out", help="Where to write the watermarked ONNX model (atomically).")],
    strength: Annotated[
        float | None, typer.Option("--strength", help="Per-weight change in units of the layer's std (default 0.25).")
    ] = None,
    positions: PositionsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add the key's watermark to MODEL's weights and write the result to OUT."""
    from edgeshield.watermark import DEFAULT_POSITIONS, DEFAULT_STRENGTH, embed_file, load_key

    report = embed_file(model, load_key(key), out,
                        strength=DEFAULT_STRENGTH if strength is None else strength,
                        positions=DEFAULT_POSITIONS if positions is None else positions)
    if as_json:
        emit_json({"out": str(out), **report.to_dict()})
        return
    console.print(f"watermarked {report.positions} weights in {len(report.tensors)} tensors "
                  f"(strength {report.strength:g}, largest change {report.max_abs_change:.3g}); "
                  f"expected statistic z ≈ {report.expected_statistic:.1f}; wrote {out}", markup=False)


@app.command("verify")
@requires("owner")
def verify(
    model: Annotated[Path, typer.Argument(help="The suspect ONNX model (fine-tuned, pruned or quantised copies too).")],
    key: KeyOpt,
    positions: PositionsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Test MODEL for the key's watermark; exit 0 whether or not it is found (see `present`)."""
    from edgeshield._io import check_readable_file
    from edgeshield.watermark import DEFAULT_POSITIONS, load_key
    from edgeshield.watermark import verify as run_verify

    data = check_readable_file(model, what="model").read_bytes()
    result = run_verify(data, load_key(key), positions=DEFAULT_POSITIONS if positions is None else positions)
    if as_json:
        emit_json(result.to_dict())
        return
    verdict = "PRESENT" if result.present else "not found"
    console.print(f"watermark {verdict}: z = {result.statistic:.2f} over {result.positions_used} weights, "
                  f"p = {result.p_value:.3g} (bound {result.p_bound:.3g}, threshold {result.threshold:g})",
                  markup=False)


@app.command("verify-copy")
def verify_copy(
    suspect: Annotated[Path, typer.Argument(help="The suspected copy (an ONNX model, e.g. one trained on our API).")],
    evidence: Annotated[
        Path, typer.Option("--evidence", help="The evidence store of watermarked answers the server kept (SQLite).")
    ],
    client: Annotated[
        str | None, typer.Option("--client", help="Use only the evidence served to this client (default: all).")
    ] = None,
    classes: Annotated[int, typer.Option("--classes", min=2, help="Number of classes the model answers.")] = 10,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Claim the copy when the p-value is below this.")
    ] = 1e-6,
    victim: Annotated[
        Path | None,
        typer.Option("--victim", help="The served model (ONNX): each unit's victim label is excluded from the "
                                      "suspect's vote, so a copy that learnt a mark on part of a unit still matches."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Test SUSPECT for the served watermark, one trial per marked unit; exit 0 whether or not it is found."""
    from edgeshield._io import check_readable_file
    from edgeshield.watermark import EvidenceStore
    from edgeshield.watermark import verify_copy as run_verify_copy

    data = check_readable_file(suspect, what="suspect model").read_bytes()
    honest = None if victim is None else check_readable_file(victim, what="victim model").read_bytes()
    with EvidenceStore(evidence, create=False) as store:
        ev = store.evidence(client)
    result = run_verify_copy(data, ev.x, ev.labels, classes=classes, units=ev.units, victim=honest,
                             threshold=threshold)
    if as_json:
        emit_json({**result.to_dict(), "client": client, "victim_excluded": victim is not None})
        return
    verdict = "PRESENT" if result.present else "not found"
    console.print(f"served watermark {verdict}: {result.matches} of {result.units} marked units reproduced "
                  f"({result.evidence} watermarked answers; null rate 1/{classes - 1} per unit), "
                  f"p = {result.p_value:.3g} (threshold {result.threshold:g})",
                  markup=False, soft_wrap=True)  # one line, however narrow the terminal
