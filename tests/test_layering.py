"""Layering, read from the source: data flows CLI/demo → evaluation/training → runtime, never back.

The imports are read with ``ast`` from every module under src/edgeshield, including the lazy ones inside functions
(which a look at ``sys.modules`` after ``import`` would miss) and ``importlib.import_module("literal")``. An import
under ``if TYPE_CHECKING:`` never runs: it counts for the package rule (a type reaching upwards is still a layering
break) but not for the third-party rules, which are about what a device has to install and load.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "edgeshield"

# What runs on the device or serves it (numpy, ORT, cryptography and the server stack).
RUNTIME = ("bundles", "keys", "adversarial", "extraction", "server", "audit", "monitor", "transport", "watermark",
           "hardware", "updates", "compliance")
# What sits above the runtime and may import it, never the reverse.
ABOVE_RUNTIME = ("evaluation", "training", "demo", "cli")
ATTACK_LIBRARIES = ("art", "torchattacks")
# torch: owner-side training, federated learning, the evaluation, and the ONNX→PyTorch bridge behind the gradient
# detector (all behind their extras). privacy does not import torch today, so it is not on the list.
TORCH_ALLOWED = ("edgeshield/training/", "edgeshield/fl/", "edgeshield/evaluation/", "edgeshield/adversarial/_torch.py")

# Attack libraries imported outside edgeshield.evaluation today, each with where it should go. The test fails both
# on a new entry and on a stale one, so the list can only shrink.
KNOWN_ATTACK_IMPORTS_OUTSIDE_EVALUATION = {
    # the demo's adversarial stage runs ART's FGSM/PGD itself instead of calling edgeshield.evaluation.
    "edgeshield/demo/_adversarial.py": "art",
}


@dataclass(frozen=True)
class Import:
    file: str  # "edgeshield/adversarial/_torch.py"
    line: int
    module: str  # absolute dotted name
    type_only: bool  # under `if TYPE_CHECKING:`

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}" + (" (TYPE_CHECKING)" if self.type_only else "")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _package_of(file: str) -> list[str]:
    """The dotted package a module file lives in (what a relative import is relative to)."""
    return file.removesuffix(".py").split("/")[:-1]  # a package's __init__ is inside the package itself


def scan(source: str, file: str) -> list[Import]:
    """Every import in ``source`` (the module at ``file``, a path relative to src/), lazy ones included."""
    found: list[Import] = []
    package = _package_of(file)

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_one(stmt, True)
                for stmt in child.orelse:
                    visit_one(stmt, type_only)
            else:
                visit_one(child, type_only)

    def visit_one(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(file, node.lineno, a.name, type_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(Import(file, node.lineno, module, type_only))
            # `from edgeshield import cli` imports the submodule edgeshield.cli
            found.extend(Import(file, node.lineno, f"{module}.{a.name}", type_only)
                         for a in node.names if a.name != "*")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append(Import(file, node.lineno, node.args[0].value, type_only))
        visit(node, type_only)

    visit(ast.parse(source, filename=file), False)
    return found


@functools.cache
def all_imports() -> tuple[Import, ...]:
    out: list[Import] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        out.extend(scan(path.read_text(encoding="utf-8"), path.relative_to(SRC).as_posix()))
    return tuple(out)


def _in(file: str, packages: tuple[str, ...]) -> bool:
    return any(file.startswith(f"edgeshield/{p}/") for p in packages)


def _names(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == f"edgeshield.{p}" or module.startswith(f"edgeshield.{p}.") for p in packages)


def test_the_scanner_sees_lazy_relative_dynamic_and_type_only_imports() -> None:
    source = textwrap.dedent("""
        from __future__ import annotations
        import importlib
        from typing import TYPE_CHECKING
        from . import _sibling
        from .._io import atomic_write_bytes
        if TYPE_CHECKING:
            import torch
        else:
            import numpy
        def f():
            import art.attacks.evasion
            from edgeshield import cli
            return importlib.import_module("torchattacks")
    """)
    got = {(i.module, i.type_only) for i in scan(source, "edgeshield/adversarial/_x.py")}
    assert {("edgeshield.adversarial", False), ("edgeshield.adversarial._sibling", False),
            ("edgeshield._io", False), ("torch", True), ("numpy", False), ("art.attacks.evasion", False),
            ("edgeshield.cli", False), ("torchattacks", False)} <= got, got
    assert ("edgeshield.evaluation", False) in {(i.module, i.type_only)
                                                for i in scan("from . import _a", "edgeshield/evaluation/__init__.py")}
    # on the real tree: the harness's lazy ART import inside a function is found
    assert any(i.file == "edgeshield/evaluation/_adversarial.py" and i.top == "art" and not i.type_only
               for i in all_imports())


def test_no_runtime_package_imports_evaluation_training_demo_or_cli() -> None:
    bad = [str(i) for i in all_imports() if _in(i.file, RUNTIME) and _names(i.module, ABOVE_RUNTIME)]
    assert not bad, "\n".join(bad)


def test_only_the_server_package_imports_the_server_among_runtime_packages() -> None:
    """Driving the server app for an evaluation is edgeshield.evaluation's job (extraction/_evaluate used to)."""
    others = tuple(p for p in RUNTIME if p != "server")
    bad = [str(i) for i in all_imports() if _in(i.file, others) and _names(i.module, ("server",))]
    assert not bad, "\n".join(bad)


def test_attack_libraries_only_under_evaluation() -> None:
    outside = {i.file: i.top for i in all_imports()
               if i.top in ATTACK_LIBRARIES and not i.type_only and not i.file.startswith("edgeshield/evaluation/")}
    new = {f: m for f, m in outside.items() if f not in KNOWN_ATTACK_IMPORTS_OUTSIDE_EVALUATION}
    stale = sorted(set(KNOWN_ATTACK_IMPORTS_OUTSIDE_EVALUATION) - set(outside))
    assert not new, f"attack libraries imported outside edgeshield.evaluation: {new}"
    assert not stale, f"no longer imports an attack library, drop it from the known list: {stale}"


def test_torch_only_in_training_fl_evaluation_and_the_torch_bridge() -> None:
    bad = [str(i) for i in all_imports()
           if i.top == "torch" and not i.type_only and not any(i.file.startswith(a) for a in TORCH_ALLOWED)]
    assert not bad, "\n".join(bad)


def test_importing_every_runtime_package_loads_nothing_above_it() -> None:
    """The same at run time (catches what a third-party module or a computed name would pull in)."""
    code = (
        "import sys\n"
        f"for p in {RUNTIME!r}: __import__('edgeshield.' + p)\n"
        f"above = [m for m in sys.modules if m.split('.')[0] in {('torch', *ATTACK_LIBRARIES)!r} or any(\n"
        f"    m == 'edgeshield.' + p or m.startswith('edgeshield.' + p + '.') for p in {ABOVE_RUNTIME!r})]\n"
        "assert not above, above\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
