"""What every benchmark shares about the machine: the note it prints (CPU model, usable cores, memory, OS, read from
/proc where present), the background load during a run, and peak memory measured in a fresh child process."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


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


def temp_dir() -> str:
    """Where temporary files go and on what file system (from /proc/mounts), e.g. for a benchmark that writes them."""
    import tempfile

    fs = "?"
    try:
        tmp = os.path.realpath(tempfile.gettempdir())
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if (tmp == mnt or tmp.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fs = mnt, f"{kind} on {dev}"
    except OSError:
        pass
    return f"temp dir {tempfile.gettempdir()} ({fs})"


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


def bundle_stack() -> str:
    """Versions of what protecting and opening a bundle runs on (Python, ONNX Runtime, cryptography, numpy)."""
    import cryptography
    import numpy
    from cryptography.hazmat.backends.openssl import backend

    from edgeshield.bundles._ort import onnxruntime as ort

    return (f"Python {platform.python_version()}, onnxruntime {ort.__version__}, cryptography "
            f"{cryptography.__version__} ({backend.openssl_version_text()}), numpy {numpy.__version__}")


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])


def own_cpu_s() -> float:
    """CPU seconds this process and its waited-for children have used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Background:
    """How busy the rest of the machine was during a run: create it when the run starts, ``stop`` it when it ends."""

    def __init__(self) -> None:
        self.load_start = os.getloadavg()[0]
        self.busy, self.total = cpu_ticks()
        self.own = own_cpu_s()

    def stop(self) -> dict[str, Any]:
        """The flat fields every report carries: load average at start and end, CPU time other processes used."""
        busy, total = cpu_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        others = max(0.0, (busy - self.busy) / hz - (own_cpu_s() - self.own))
        machine = (total - self.total) / hz
        return {
            "loadavg_1min_start": self.load_start,
            "loadavg_1min_end": os.getloadavg()[0],
            "other_processes_cpu_s": others,
            "other_processes_cpu_share": others / machine if machine else None,
        }

    @staticmethod
    def note(results: dict[str, Any]) -> str:
        """One sentence on what ``stop`` returned (``results`` holds its fields)."""
        return (f"Background: other processes used {results['other_processes_cpu_s']:.1f} CPU-s "
                f"({100 * (results['other_processes_cpu_share'] or 0):.0f}% of the machine) during the run; 1-min "
                f"load average {results['loadavg_1min_start']:.2f} at start, {results['loadavg_1min_end']:.2f} at end.")


def mem_available_bytes() -> int:
    """Memory the kernel says is available for new allocations (MemAvailable); -1 where unknown."""
    field = _proc_field("/proc/meminfo", "MemAvailable")
    return int(field.split()[0]) * 1024 if field else -1


# --- peak memory, each measurement in a fresh child process -----------------------------------------------------
def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm_bytes() -> int:
    """The same high-water mark from /proc (VmHWM), for this process image only; -1 where there is none."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def run_child(script: str | os.PathLike[str], args: list[str]) -> dict[str, Any]:
    """Run ``script --_child ARGS...`` in a fresh interpreter and return the JSON object its last stdout line holds.

    The child is started through ``sh`` without ``exec``: on Linux ru_maxrss survives ``execve`` and a child forked
    directly from the (large) benchmark process would report that process's peak as its own. ``sh`` is small, and
    the interpreter it forks starts with a clean high-water mark.
    """
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
    cmd = [sys.executable, str(Path(script).resolve()), "--_child", *args]
    proc = subprocess.run(
        ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args[0]} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def hwm_warning(what: str, r: dict[str, Any]) -> str | None:
    """A warning where a child's ru_maxrss (``peak``) and VmHWM (``vm_hwm``) disagree by more than 2 %."""
    if r["vm_hwm"] > 0 and abs(r["peak"] - r["vm_hwm"]) > 0.02 * r["peak"]:
        return f"{what}: ru_maxrss {r['peak'] / 1e6:.0f} MB differs from VmHWM {r['vm_hwm'] / 1e6:.0f} MB"
    return None


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
