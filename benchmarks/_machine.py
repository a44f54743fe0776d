"""The machine note every benchmark prints: CPU model, usable cores, memory, OS (read from /proc where present)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _proc_field(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def hardware() -> str:
    cpu = _proc_field("/proc/cpuinfo", "model name") or "unknown CPU"
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    mem = f"{int(mem_kib.split()[0]) / (1 << 20):.1f} GiB RAM" if mem_kib else "unknown RAM"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores (os.cpu_count()={os.cpu_count()}), {mem}, {platform.system()} {platform.machine()}"


def eval_stack() -> str:
    """Versions of the evaluation stack (ONNX Runtime, PyTorch, ART, scikit-learn, numpy)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import sklearn
    import torch

    from edgeshield.bundles._ort import onnxruntime as ort

    try:
        art = version("adversarial-robustness-toolbox")
    except PackageNotFoundError:
        art = "?"
    return (f"Python {platform.python_version()}, onnxruntime {ort.__version__}, torch {torch.__version__}, "
            f"ART {art}, scikit-learn {sklearn.__version__}, numpy {numpy.__version__}")


def open_report(width: int, info: dict[str, str]):  # type: ignore[no-untyped-def]
    """A rich console (``width`` columns when not a terminal) that has printed the machine note."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=width)
    console.print(f"[bold]Machine:[/bold] {info['hardware']}\n[bold]Software:[/bold] {info['versions']}")
    return console


def write_report(console, path: str | None, results: dict, also: str = "") -> None:  # type: ignore[no-untyped-def]
    """With ``--json PATH``: the flat results as sorted, indented JSON, written atomically; says so on ``console``."""
    if not path:
        return
    import json

    from edgeshield._io import atomic_write_bytes

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, (json.dumps(results, indent=2, sort_keys=True) + "\n").encode())
    console.print(f"wrote {target}{also}")
