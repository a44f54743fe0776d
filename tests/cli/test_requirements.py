"""Every command checks at start-up that the extras it needs are installed, and names the right one in one line.

Each case runs the real CLI in a subprocess with the heavy module made unimportable (``sys.modules[name] = None``,
which is what a plain ``pip install edgeshield`` looks like to an import); ``scripts/check_device_install.py``
does the same in a real venv without extras.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from test_cli import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]

_BLOCKED_RUN = """\
import sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
sys.argv = ["edgeshield", *sys.argv[2:]]
from edgeshield.cli import main
main()
"""


def cli_without(blocked: tuple[str, ...], *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCKED_RUN, ",".join(blocked), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def gradient_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detector file that decides with the gradient detector (what `run --detector` needs torch for)."""
    from edgeshield.adversarial import CalibratedDetector, DetectorFile
    from edgeshield.models import digits_input_spec

    path = tmp_path_factory.mktemp("req") / "gradient.json"
    DetectorFile(model_sha256="0" * 64, input_spec=digits_input_spec(), target_fpr=0.02, flag_fpr=0.05,
                 decision="gradient", detectors=(CalibratedDetector("gradient", {}, 1.0, 0.5, {}),)).save(path)
    return path


BUNDLE = ("m.esb", "--owner-key", "o.pub", "--device-key", "d.key")  # never opened: the check comes first
CASES = {
    "protect": (("onnx",), ["protect", "m.onnx", "--out", "o.esb", "--signing-key", "o.key", "--recipient", "d.pub"],
                "owner"),
    "protect --sigstore-sig": (("model_signing",), ["protect", "m.onnx", "--out", "o.esb", "--signing-key", "o.key",
                                                    "--recipient", "d.pub", "--sigstore-sig", "m.sig"], "owner"),
    "verify --sigstore-sig": (("OpenSSL",), ["verify", "--model", "m.onnx", "--sigstore-sig", "m.sig",
                                             "--owner-key", "o.pub"], "owner"),
    "watermark embed": (("onnx",), ["watermark", "embed", "m.onnx", "--key", "w.key", "--out", "w.onnx"], "owner"),
    "watermark verify": (("onnx",), ["watermark", "verify", "m.onnx", "--key", "w.key"], "owner"),
    "detect expose-hidden": (("onnx",), ["detect", "expose-hidden", "m.onnx", "--out", "h.onnx"], "owner"),
    "detect calibrate --detectors gradient": (
        ("torch",), ["detect", "calibrate", *BUNDLE, "--clean", "c.npy", "--out", "d.json",
                     "--detectors", "squeeze, gradient"], "eval"),
    "detect evaluate": (("art",), ["detect", "evaluate", *BUNDLE, "--detector", "d.json", "--data", "x.npy",
                                   "--labels", "y.npy"], "eval"),
    "detect evaluate --out-dir": (("matplotlib",), ["detect", "evaluate", *BUNDLE, "--detector", "d.json",
                                                    "--data", "x.npy", "--labels", "y.npy", "--out-dir", "roc"],
                                  "eval"),
    "run --detector (gradient)": (("torch",), ["run", *BUNDLE, "--input", "x.npy", "--detector", "{gradient}"],
                                  "eval"),
    "extraction evaluate": (("torch",), ["extraction", "evaluate", "--quick"], "eval"),
    "demo": (("sklearn",), ["demo"], "demo"),
    "train robust": (("torch",), ["train", "robust", "--digits", "--out", "m.onnx"], "train"),
    "train robust (onnxscript)": (("onnxscript",), ["train", "robust", "--digits", "--out", "m.onnx"], "train"),
    "update repo init": (("tuf",), ["update", "repo", "init", "repo", "--keys", "k"], "update"),
    "update pull": (("tuf",), ["update", "pull", "dev", "--device-key", "d.key"], "update"),
    "serve --released-key": (("tpm2_pytss",), ["serve", "b.esb", "--owner-key", "o.pub", "--released-key", "r.json",
                                               "--tpm-keys", "k.json", "--ca", "ca", "--cert", "c.crt", "--key",
                                               "c.key", "--audit-db", "a.db", "--audit-key", "a.key"], "tpm"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_missing_extra_is_one_line_naming_it(case, gradient_detector, tmp_path):
    blocked, argv, extra = CASES[case]
    argv = [a.replace("{gradient}", str(gradient_detector)) for a in argv]
    proc = cli_without(blocked, *argv, cwd=tmp_path)
    assert_one_line_error(proc, 1, f"pip install 'edgeshield[{extra}]'")
    assert re.search(rf"\b{re.escape(blocked[0])}\b", proc.stderr), proc.stderr  # names what is missing
    assert proc.stdout == ""  # before any work (the demo used to run a stage first)
    assert list(tmp_path.iterdir()) == []  # and wrote nothing


@pytest.mark.parametrize("argv", [
    ["detect", "calibrate", *BUNDLE, "--clean", "c.npy", "--out", "d.json", "--detectors", "squeeze,noise"],
    ["run", *BUNDLE, "--input", "x.npy"],
    ["verify", "m.esb", "--owner-key", "o.pub"],
    ["watermark", "verify-copy", "s.onnx", "--evidence", "e.db"],
])
def test_device_paths_do_not_ask_for_extras(argv):
    """Without the option that needs them, commands run on a plain install: here they fail only on the dummy paths."""
    proc = cli_without(("torch", "onnx", "art", "sklearn", "model_signing", "OpenSSL", "matplotlib", "scipy"), *argv)
    assert_one_line_error(proc, 2, "not found")


def test_run_with_a_runtime_detector_file_needs_no_torch(tmp_path):
    from edgeshield.adversarial import CalibratedDetector, DetectorFile
    from edgeshield.models import digits_input_spec

    path = tmp_path / "squeeze.json"
    DetectorFile(model_sha256="0" * 64, input_spec=digits_input_spec(), target_fpr=0.02, flag_fpr=0.05,
                 decision="squeeze", detectors=(CalibratedDetector("squeeze", {}, 1.0, 0.5, {}),)).save(path)
    proc = cli_without(("torch", "onnx"), "run", *BUNDLE, "--input", "x.npy", "--detector", path)
    assert_one_line_error(proc, 2, "not found")


def test_the_check_imports_nothing():
    code = ("import sys; from edgeshield.cli._common import EXTRA_MODULES, importable; "
            "[importable(m) for ms in EXTRA_MODULES.values() for m in ms]; "
            "print(sorted(m for ms in EXTRA_MODULES.values() for m in ms if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# What each command declares (README's install table says the same). A command not listed must need nothing.
EXPECTED = {
    "protect": {"owner"},
    "verify": {"owner"},  # only with --sigstore-sig
    "run": {"eval"},  # only with a gradient --detector
    "serve": {"eval", "tpm", "ohttp", "h3"},  # eval: gradient --detector, tpm: --released-key, --ohttp, --http3-port
    "client predict": {"ohttp", "h3"},  # only with --ohttp / --http3
    "demo": {"demo"},
    "detect expose-hidden": {"owner"},
    "detect calibrate": {"eval", "owner"},  # eval only with --detectors gradient, owner only with --signing-key
    "detect evaluate": {"eval"},
    "watermark embed": {"owner"},
    "watermark verify": {"owner"},
    "extraction evaluate": {"eval"},
    "train robust": {"train"},
    "comply report": {"comply"},  # only with --format oscal
    "fl simulate": {"fl"},
    "fl server": {"fl"},
    "fl client": {"fl"},
    "tpm seal-device-key": {"tpm"},
    "tpm approve-pcrs": {"tpm"},  # only with --from-tpm
    "tpm unseal-test": {"tpm"},
    "tpm pcr read": {"tpm"},
    "tpm pcr extend": {"tpm"},
    "update repo init": {"update"},
    "update repo publish": {"update"},
    "update repo timestamp": {"update"},
    "update pull": {"update"},  # install, commit, rollback, status and init need no extra
    "attest keys": {"tpm"},
    "attest quote": {"tpm"},
    "attest enrol": {"tpm"},
    "attest fetch-key": {"tpm"},
    "attest serve": {"tpm"},
}


def _commands():  # type: ignore[no-untyped-def]
    import typer.main

    from edgeshield.cli import app

    def walk(group, prefix):  # type: ignore[no-untyped-def]
        for name, cmd in group.commands.items():
            path = f"{prefix} {name}".strip()
            if hasattr(cmd, "commands"):
                yield from walk(cmd, path)
            else:
                yield path, cmd.callback

    yield from walk(typer.main.get_command(app), "")


def test_declared_needs_per_command():
    from edgeshield.cli._common import needs_of

    declared = {path: {n.extra for n in needs_of(cb)} for path, cb in _commands()}
    assert {p for p in declared if p in EXPECTED} == set(EXPECTED)  # each is registered with its check on top
    for path, extras in declared.items():
        assert extras == EXPECTED.get(path, set()), path


def test_every_install_hint_names_an_extra_that_exists():
    """`pip install 'edgeshield[X]'` anywhere in the package names an extra of pyproject.toml (not `[server]`)."""
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    from edgeshield.cli._common import EXTRA_MODULES

    assert set(EXTRA_MODULES) <= extras
    hints = {(p.relative_to(ROOT), m) for p in (ROOT / "src").rglob("*.py")
             for m in re.findall(r"edgeshield\[(\w+)\]", p.read_text())}
    assert hints, "no install hints found"
    assert {(p, m) for p, m in hints if m not in extras} == set()
