"""Long operations report progress through an optional callback (the library never prints); the CLI draws it as
rich bars on stderr only, so --json stdout stays one clean document."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections import defaultdict
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from edgeshield import bundles
from edgeshield._progress import Step
from edgeshield.cli import app
from edgeshield.cli._progress import progress_bars

from conftest import KeySet, make_matmul_model


def _by_task(steps: list[Step]) -> dict[str, list[Step]]:
    tasks: dict[str, list[Step]] = defaultdict(list)
    for s in steps:
        tasks[s.task].append(s)
    return tasks


def _well_formed(steps: list[Step]) -> dict[str, list[Step]]:
    """Per task: the total never changes, done never goes back, and the task ends complete."""
    tasks = _by_task(steps)
    for name, seen in tasks.items():
        assert len({s.total for s in seen}) == 1, name
        assert all(a.done <= b.done for a, b in itertools.pairwise(seen)), name
        assert seen[-1].done == seen[-1].total, name
    return tasks


def test_protect_reports_the_bytes_it_seals_and_writes(tmp_path: Path, keyset: KeySet,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model = make_matmul_model(tmp_path / "m.onnx", d=256, blocks=4)  # 1 MiB of weights: several chunks
    steps: list[Step] = []
    manifest = bundles.protect(model, tmp_path / "m.esb", signing_key=keyset.owner_priv,
                               recipients=[keyset.device_pub], chunk_size=64 * 1024, progress=steps.append)
    tasks = _well_formed(steps)
    assert list(tasks) == ["read weights", "check that ONNX Runtime loads it", "encrypt, hash and MAC",
                           "hash the plaintext", "encrypt and write"]
    assert tasks["encrypt and write"][-1].total == manifest.payload_size
    assert tasks["encrypt, hash and MAC"][-1].unit == "B" and len(tasks["encrypt and write"]) > 10
    assert tasks["read weights"][-1].total == manifest.image.weights_size
    bundles.protect(model, tmp_path / "quiet.esb", signing_key=keyset.owner_priv, recipients=[keyset.device_pub])
    assert capsys.readouterr() == ("", "")  # no callback: nothing anywhere


def test_bars_are_drawn_on_a_terminal_and_nowhere_else() -> None:
    term = Console(file=io.StringIO(), force_terminal=True, width=100, color_system=None)
    with progress_bars(term, background=False) as progress:  # drawn when told: deterministic
        progress(Step("encrypt and write", 512 * 1024, 1024 * 1024, unit="B"))
        progress(Step("ART attacks", 1, 5, note="pgd"))
        progress(Step("ART attacks", 5, 5))
    drawn = term.file.getvalue()
    assert "encrypt and write" in drawn and "0.5/1.0 MB" in drawn
    assert "ART attacks" in drawn and "5/5" in drawn
    assert drawn.endswith("\x1b[2K")  # transient: the bars are erased when the operation ends
    log = Console(file=io.StringIO(), force_terminal=False)
    with progress_bars(log) as progress:
        progress(Step("ART attacks", 1, 5))
    assert log.file.getvalue() == ""  # a log file gets no control sequences
    quiet = Console(file=io.StringIO(), force_terminal=True, width=100)
    with progress_bars(quiet, background=False) as progress:  # the benchmarks' mode: drawn only when told
        progress(Step("server benchmark", 2, 6, note="handshakes"))
    assert "server benchmark: handshakes" in quiet.file.getvalue()


def test_protect_json_stays_one_document_with_progress_on(tmp_path: Path, keyset: KeySet) -> None:
    model = make_matmul_model(tmp_path / "m.onnx", d=64)
    r = CliRunner().invoke(app, ["protect", str(model), "--out", str(tmp_path / "m.esb"), "--signing-key",
                                 str(keyset.dir / "owner.key"), "--recipient", str(keyset.dir / "device.pub"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bundle"] == str(tmp_path / "m.esb")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ART writes ~/.art/config.json when first imported; keep that out of the real home directory."""
    import sys

    h = tmp_path_factory.mktemp("home")
    if "art" not in sys.modules:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(h))
            pytest.importorskip("art.attacks.evasion")
    return h


def test_detect_evaluate_reports_every_attack_and_sweep_step(home: Path) -> None:
    pytest.importorskip("torch")
    from edgeshield.adversarial import calibrate
    from edgeshield.adversarial._torch import onnx_to_torch
    from edgeshield.bundles._ort import onnxruntime as ort
    from edgeshield.evaluation._adversarial import evaluate
    from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

    model = digits_model_path().read_bytes()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    split = load_digits_split()
    file = calibrate(session, split.x_test[:200], model_sha256=hashlib.sha256(model).hexdigest(),
                     input_spec=digits_input_spec(), detectors=("squeeze", "noise"))
    steps: list[Step] = []
    evaluate(session, onnx_to_torch(model), file, split.x_test[200:232], split.y_test[200:232], quick=True,
             attacks=("fgsm", "deepfool"), progress=steps.append)
    tasks = _well_formed(steps)
    assert list(tasks) == ["score clean inputs", "ART attacks", "score adversarial examples",
                           "adaptive attack sweep", "time robust inference"]
    assert [s.note for s in tasks["ART attacks"]] == ["fgsm", "deepfool", ""]
    assert tasks["adaptive attack sweep"][-1].total == 2  # --quick: two λ, one loss, one penalty
    assert all("λ=" in s.note for s in tasks["adaptive attack sweep"][:-1])
