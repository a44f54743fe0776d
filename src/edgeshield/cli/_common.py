"""What every CLI command shares: consoles, JSON output, option types, and the extras a command needs."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ParamSpec, TypeVar

import click
import typer
from rich.console import Console

from edgeshield.errors import EdgeShieldError, InvalidArgumentError, MissingDependencyError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON object instead of text.")]
PassphraseEnvOpt = Annotated[
    str | None,
    typer.Option(
        "--passphrase-env",
        metavar="VAR",
        help="Name of an environment variable holding the private key's passphrase (never pass it as an argument).",
    ),
]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def parse_meta(items: list[str] | None) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--meta expects key=value, got {item!r}")
        if key in meta:
            raise InvalidArgumentError(f"--meta key {key!r} given twice")
        meta[key] = value
    return meta


# --- what a command needs beyond a plain `pip install edgeshield` -------------------------------------------------
# A command declares it with @requires(EXTRA, *MODULES, when=...) under its @app.command line. Before the command
# does any work, the decorator looks the modules up with importlib.util.find_spec (nothing is imported, so the check
# costs microseconds) and, if one is missing, fails with one line naming the extra that installs it.
# The import names each extra of pyproject.toml provides that EdgeShield uses (the default when MODULES is empty):
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "owner": ("onnx",),  # protect's graph/weights split, weight watermarks; model-signing: model_signing, OpenSSL
    "train": ("torch", "onnx", "onnxscript", "sklearn"),
    "eval": ("torch", "onnx", "art", "sklearn"),  # gradients, ART attacks, ROC metrics; plots also need matplotlib
    "demo": ("torch", "onnx", "art", "sklearn"),
    "comply": ("trestle",),
    "privacy": ("opendp", "dp_accounting"),
    "fl": ("flwr", "torch", "opendp", "dp_accounting"),  # OSCAL assessment results (compliance-trestle's models)
    "tpm": ("tpm2_pytss",),  # TPM-sealed device keys, PCR approvals, PCRs
    "update": ("tuf",),  # TUF update repositories and pulling updates (install/commit/rollback need nothing)
    "ohttp": ("pyhpke",),  # Oblivious HTTP: serve --ohttp, client predict --ohttp (HPKE contexts with the exporter)
    "h3": ("aioquic",),  # HTTP/3 over QUIC: serve --http3-port, client predict --http3
}

Arguments = Mapping[str, Any]
_P = ParamSpec("_P")
_R = TypeVar("_R")
_NEEDS = "__edgeshield_needs__"


@dataclass(frozen=True)
class Need:
    """``modules`` must be importable whenever ``when(arguments)``; the extra ``extra`` installs them."""

    extra: str
    modules: tuple[str, ...]
    when: Callable[[Arguments], bool] | None = None

    def missing(self, arguments: Arguments) -> list[str]:
        if self.when is not None and not self.when(arguments):
            return []
        return [m for m in self.modules if not importable(m)]


def importable(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it (a dotted name imports its parent packages)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or blocked (sys.modules[name] = None)
        return False


def requires(extra: str, *modules: str,
             when: Callable[[Arguments], bool] | None = None) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Declare that a command needs ``modules`` (default: the extra's, ``EXTRA_MODULES``), optionally only ``when``
    its arguments (by parameter name) say so. Goes *under* ``@app.command(...)``; stacks."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"unknown extra {extra!r}; pyproject.toml defines {sorted(EXTRA_MODULES)}")
    need = Need(extra, tuple(modules) or EXTRA_MODULES[extra], when)

    def decorate(func: Callable[_P, _R]) -> Callable[_P, _R]:
        needs: list[Need] | None = getattr(func, _NEEDS, None)
        if needs is not None:  # already checked by a @requires below this one: one check for all
            needs.insert(0, need)
            return func
        needs = [need]
        signature = inspect.signature(func)

        @functools.wraps(func)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            bound = signature.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            check_needs(needs, bound.arguments)
            return func(*args, **kwargs)

        setattr(checked, _NEEDS, needs)
        return checked

    return decorate


def needs_of(command: Callable[..., Any]) -> list[Need]:
    """What ``@requires`` declared on a command callback (empty: a plain install runs it)."""
    return list(getattr(command, _NEEDS, []))


def check_needs(needs: list[Need], arguments: Arguments) -> None:
    """Raise ``MissingDependencyError`` naming the first extra whose modules are missing."""
    for need in needs:
        missing = need.missing(arguments)
        if missing:
            ctx = click.get_current_context(silent=True)
            command = f"'{ctx.command_path.partition(' ')[2]}'" if ctx is not None else "this command"
            raise MissingDependencyError(f"{command} needs {', '.join(missing)} (not installed): "
                                         f"pip install 'edgeshield[{need.extra}]'")


def given(option: str) -> Callable[[Arguments], bool]:
    """``when=given("out_dir")``: the need applies when that option is set."""
    return lambda arguments: arguments.get(option) is not None


def listed(option: str, item: str) -> Callable[[Arguments], bool]:
    """``when=listed("detectors", "gradient")``: the need applies when a comma-separated option names ``item``."""
    return lambda arguments: item in {part.strip() for part in (arguments.get(option) or "").split(",")}


def gradient_detector_file(option: str) -> Callable[[Arguments], bool]:
    """The need applies when the detector file in ``option`` decides with the gradient detector (PyTorch).

    An unreadable file counts as no: the command itself then reports what is wrong with it."""

    def when(arguments: Arguments) -> bool:
        path = arguments.get(option)
        if path is None:
            return False
        from edgeshield.adversarial import DetectorFile

        try:
            return "gradient" in DetectorFile.load(path).decision_detectors()
        except EdgeShieldError:
            return False

    return when
