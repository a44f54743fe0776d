"""No privacy noise from ``np.random``, ``random`` or torch's samplers in edgeshield.privacy or edgeshield.fl.

An AST scan of every module there: a call whose callee resolves (through the module's imports and aliases) to
``numpy.random.*``, the ``random`` module or a torch sampling function fails the test, unless a line of the call
carries the comment ``# not privacy noise`` (data shuffling, client sampling, attack simulation). A generator made
by a marked ``np.random.default_rng(...)`` call may then be used freely: the mark is the author's statement that
nothing it draws is privacy noise.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "edgeshield"
PACKAGES = ("privacy", "fl")
MARK = "not privacy noise"
TORCH_SAMPLERS = frozenset({"normal", "randn", "randn_like", "rand", "rand_like", "randint", "randint_like",
                            "randperm", "poisson", "bernoulli", "multinomial", "distributions"})


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted module or object it stands for."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    out[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def _forbidden(name: str) -> bool:
    if name == "numpy.random" or name.startswith("numpy.random."):
        return True
    if name == "random" or name.startswith("random."):
        return True
    parts = name.split(".")
    return parts[0] == "torch" and len(parts) > 1 and parts[1] in TORCH_SAMPLERS


def violations(source: str, filename: str = "<src>") -> list[str]:
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None or not _forbidden(name):
            continue
        end = node.end_lineno or node.lineno
        if any(MARK in lines[i - 1] and "#" in lines[i - 1] for i in range(node.lineno, end + 1)):
            continue
        found.append(f"{filename}:{node.lineno}: {name}(...)")
    return found


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (SRC / pkg).is_dir() for p in (SRC / pkg).rglob("*.py"))


def test_the_scan_covers_the_privacy_package() -> None:
    names = {p.name for p in _modules()}
    assert {"_noise.py", "_mechanisms.py", "_ledger.py"} <= names


def test_no_module_draws_privacy_noise_from_np_random() -> None:
    found = [v for p in _modules() for v in violations(p.read_text(encoding="utf-8"), str(p.relative_to(SRC)))]
    hint = f"privacy noise must come from edgeshield.privacy (OpenDP); mark other uses '# {MARK}':"
    assert not found, "\n".join([hint, *found])


@pytest.mark.parametrize("source", [
    "import numpy as np\nx = np.random.normal(0, 1, 3)\n",
    "import numpy\nx = numpy.random.laplace(size=3)\n",
    "from numpy import random as r\nx = r.standard_normal(3)\n",
    "from numpy.random import default_rng\nrng = default_rng()\n",
    "import numpy.random as npr\nx = npr.normal()\n",
    "import random\nx = random.gauss(0, 1)\n",
    "from random import gauss\nx = gauss(0, 1)\n",
    "import torch\nx = torch.normal(0.0, 1.0, (3,))\n",
    "import torch\nx = torch.randn_like(y)\n",
    "def f():\n    import numpy as np\n    return np.random.default_rng(0).normal()\n",
    "import numpy as np\nrng = np.random.default_rng(0)  # seeded\n",
])
def test_the_scan_catches_each_form(source: str) -> None:
    assert violations(source)


@pytest.mark.parametrize("source", [
    "import numpy as np\nrng = np.random.default_rng(0)  # shuffling: not privacy noise\n",
    "import numpy as np\nrng = np.random.default_rng(\n    [1, 2],  # not privacy noise\n)\n",
    "import numpy as np\ndef f(rng: np.random.Generator) -> None: ...\n",  # an annotation is not a draw
    "import numpy as np\nx = np.zeros(3)\n",
    "from edgeshield.privacy import gaussian_noise\nx = gaussian_noise((3,), 1.0)\n",
])
def test_the_scan_allows_marked_and_unrelated_code(source: str) -> None:
    assert not violations(source)
