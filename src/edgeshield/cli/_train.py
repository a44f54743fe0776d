"""`edgeshield train robust`: adversarial training (PGD-AT or TRADES) on the owner's side, exported as ONNX.

A thin layer over ``edgeshield.training``: load the data (an ``.npz`` with ``x`` and ``y``, or the digits split),
build one of the digits architectures, train at the given budget and write an ONNX file ready for ``protect``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from edgeshield.cli._common import JsonOpt, console, emit_json, requires
from edgeshield.cli._progress import progress_bars
from edgeshield.errors import InvalidArgumentError, OutputExistsError

app = typer.Typer(help="Train models on the owner's side: adversarial training, exported as ONNX.",
                  no_args_is_help=True)

_WIDTH = 64  # both architectures take the digits' flat 8x8 image


@app.callback()
def _group() -> None:
    """Train models on the owner's side: adversarial training, exported as ONNX."""


def _load_npz(path: Path, what: str) -> tuple[Any, Any]:
    import numpy as np

    from edgeshield._io import check_readable_file

    check_readable_file(path, what=what)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise InvalidArgumentError(f"{what} {path} must hold arrays 'x' and 'y', has {sorted(data.files)}")
            return data["x"], data["y"]
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"{what} {path} is not a readable .npz file: {exc}") from None


@app.command("robust")
@requires("train")
def robust(
    out: Annotated[Path, typer.Option("--out", help="Write the ONNX model here.")],
    data: Annotated[Path | None, typer.Option("--data", help="Training data: .npz with x [N, 64], y [N].")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Validation data (.npz, x and y) for the report.")] = None,
    digits: Annotated[bool, typer.Option("--digits", help="Train on the digits split (validate on its test half).")]
    = False,
    arch: Annotated[str, typer.Option("--arch", help="mlp (the shipped architecture) or cnn.")] = "mlp",
    method: Annotated[str, typer.Option("--method", help="trades or pgd.")] = "trades",
    norm: Annotated[str, typer.Option("--norm", help="linf or l2.")] = "linf",
    eps: Annotated[float, typer.Option("--eps", help="Attack budget in input units.")] = 2 / 16,
    steps: Annotated[int, typer.Option("--steps", help="Attack steps per batch.")] = 10,
    beta: Annotated[float, typer.Option("--beta", help="TRADES trade-off (clean vs robust).")] = 6.0,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs (default: mlp 150, cnn 30).")] = None,
    warmup: Annotated[int | None, typer.Option(
        "--warmup-epochs", help="Epochs ramping eps up from 0 (default: 5, fewer when --epochs is small).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialisation, batch order and attack starts.")]
    = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Adversarially train a digits architecture (PGD-AT or TRADES) and export it as ONNX for `protect`."""
    import numpy as np

    from edgeshield.training import digits_cnn, digits_mlp, digits_robust_config, export_onnx, train_robust
    from edgeshield.training._models import import_torch

    if digits == (data is not None):
        raise InvalidArgumentError("give exactly one of --data FILE.npz and --digits")
    if arch not in ("mlp", "cnn"):
        raise InvalidArgumentError(f"--arch must be mlp or cnn, not {arch!r}")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists (use --force to overwrite)")
    overrides: dict[str, Any] = {"norm": norm, "eps": eps, "steps": steps, "beta": beta, "seed": seed}
    if epochs is not None:
        overrides["epochs"] = epochs
        overrides["warmup_epochs"] = min(5, max(epochs - 1, 0)) if warmup is None else warmup
    elif warmup is not None:
        overrides["warmup_epochs"] = warmup
    arch_name: Literal["mlp", "cnn"] = "mlp" if arch == "mlp" else "cnn"
    config = digits_robust_config(arch=arch_name, method=method, **overrides)  # type: ignore[arg-type]
    x: Any
    y: Any
    x_val: Any = None
    y_val: Any = None
    if data is not None:
        x, y = _load_npz(data, "--data")
        if val is not None:
            x_val, y_val = _load_npz(val, "--val")
    else:
        from edgeshield.models import load_digits_split

        split = load_digits_split()
        x, y, x_val, y_val = split.x_train, split.y_train, split.x_test, split.y_test
    if np.ndim(x) != 2 or np.shape(x)[1] != _WIDTH:
        raise InvalidArgumentError(f"--arch {arch} takes x of shape [N, {_WIDTH}], not {np.shape(x)}")
    torch = import_torch()
    torch.manual_seed(seed)
    model = digits_mlp() if arch == "mlp" else digits_cnn()
    with progress_bars() as progress:
        report = train_robust(model, x, y, config, x_val=x_val, y_val=y_val, progress=progress)
    export_onnx(model, out, sample=np.asarray(x[:256], dtype=np.float32))
    result = {**report.to_dict(), "arch": arch, "out": str(out)}
    if as_json:
        emit_json(result)
        return
    console.print(f"{config.method} ({config.norm}, eps {config.eps:g}, {config.steps} steps), {arch}, "
                  f"{report.epochs} epochs in {report.seconds:.1f} s", markup=False)
    console.print(f"{report.measured_on} accuracy {report.clean_accuracy:.4f}; under the training-time PGD "
                  f"{report.robust_accuracy:.4f} (not an evaluation: see benchmarks/robust_training.py)", markup=False)
    console.print(f"wrote {out}", markup=False)
