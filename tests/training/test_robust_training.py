"""Robust training: the budget's validation, the attack's projection, PGD-AT/TRADES doing their job, ONNX export,
the shipped robust model and the `train robust` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgeshield.bundles._ort import onnxruntime as ort  # noqa: E402
from edgeshield.errors import InvalidArgumentError, MissingDependencyError  # noqa: E402
from edgeshield.models import (  # noqa: E402
    digits_model_path,
    digits_robust_model_path,
    load_digits_split,
)
from edgeshield.training import (  # noqa: E402
    RobustTrainingConfig,
    digits_cnn,
    digits_mlp,
    export_onnx,
    train_robust,
    train_standard,
)
from edgeshield.training._robust import _accuracies, pgd_perturb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from test_cli import assert_one_line_error, cli  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def split():  # type: ignore[no-untyped-def]
    return load_digits_split()


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"eps": 0.0}, "eps"), ({"eps": -0.1}, "eps"), ({"eps": math.nan}, "eps"), ({"eps": 1.0}, "whole value range"),
    ({"steps": 0}, "steps"), ({"step_size": 0.0}, "step_size"), ({"beta": -1.0}, "beta"), ({"epochs": 0}, "epochs"),
    ({"warmup_epochs": 60}, "warmup_epochs"), ({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr"),
    ({"method": "fgsm"}, "method"), ({"norm": "l1"}, "norm"), ({"value_range": (1.0, 0.0)}, "value_range"),
    ({"seed": -1}, "seed"), ({"steps": True}, "steps"),
])
def test_impossible_budgets_are_one_line_typed_errors(kwargs, needle):
    with pytest.raises(InvalidArgumentError, match=needle) as info:
        RobustTrainingConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_defaults_and_step_size():
    config = RobustTrainingConfig()
    assert (config.method, config.norm, config.eps, config.steps, config.beta) == ("trades", "linf", 0.125, 10, 6.0)
    assert config.effective_step_size == pytest.approx(2.5 * 0.125 / 10)
    assert RobustTrainingConfig(step_size=0.01).effective_step_size == 0.01
    assert RobustTrainingConfig(norm="l2", eps=1.5).eps == 1.5  # an L2 ball may exceed the per-pixel span


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.125), ("l2", 1.0)])
def test_pgd_stays_in_the_ball_and_the_value_range(split, norm, eps):
    torch.manual_seed(0)
    model = digits_mlp().eval()
    x, y = torch.from_numpy(split.x_test[:64]), torch.from_numpy(split.y_test[:64])
    adv = pgd_perturb(model, x, lambda z: torch.nn.functional.cross_entropy(z, y, reduction="sum"), norm=norm,
                      eps=eps, steps=5, step_size=eps / 2, value_range=(0.0, 1.0),
                      generator=torch.Generator().manual_seed(0))
    delta = (adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float(size.mean()) > eps / 4  # it moved


def test_library_standard_training_is_the_shipped_model(split):
    """digits_mlp + train_standard give the weights of the shipped digits.onnx (the script's recipe).

    Bit-exact on the CPU that built the model; another CPU's kernels (AVX-512 against AVX2, a different
    reduction order) drift by ~1e-4 over 60 epochs, so weights are compared to 2e-3 and the predictions must
    agree. A different recipe (seed, epochs, learning rate) moves weights by far more than that.
    """
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = digits_mlp()
    report = train_standard(model, split.x_train, split.y_train, epochs=60, seed=0, x_val=split.x_test,
                            y_val=split.y_test)
    shipped = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(digits_model_path())).graph.initializer}
    ours = {f"inner.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(ours) <= set(shipped)
    for name, value in ours.items():
        np.testing.assert_allclose(value, shipped[name], rtol=0, atol=2e-3, err_msg=name)
    shipped_session = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    shipped_labels = shipped_session.run(None, {shipped_session.get_inputs()[0].name: split.x_test})[0].argmax(axis=1)
    with torch.no_grad():
        our_labels = model(torch.from_numpy(split.x_test)).argmax(dim=1).numpy()
    assert np.mean(our_labels == shipped_labels) >= 0.995
    assert report.method == "standard" and report.measured_on == "validation"
    assert report.clean_accuracy == pytest.approx(0.9778, abs=0.006)


def test_trades_and_pgd_beat_standard_training_under_attack(split):
    """A short run at the digits budget: robust accuracy under the training-time PGD rises well above standard's."""
    x, y = split.x_train, split.y_train
    reports = {}
    for method in ("standard", "pgd", "trades"):
        torch.manual_seed(0)
        model = digits_mlp()
        if method == "standard":
            reports[method] = train_standard(model, x, y, epochs=12, x_val=split.x_test, y_val=split.y_test)
        else:
            config = RobustTrainingConfig(method=method, epochs=12, warmup_epochs=2, steps=5)
            steps = []
            reports[method] = train_robust(model, x, y, config, x_val=split.x_test, y_val=split.y_test,
                                           progress=steps.append)
            assert [s.done for s in steps] == list(range(1, 13)) and steps[0].note.endswith("eps 0")
    for method in ("pgd", "trades"):
        assert reports[method].robust_accuracy > reports["standard"].robust_accuracy + 0.25, reports
        assert reports[method].clean_accuracy > 0.85
        assert reports[method].config.method == method


def test_robust_training_is_deterministic(split):
    config = RobustTrainingConfig(method="trades", epochs=2, warmup_epochs=1, steps=2, batch_size=128, seed=3)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = digits_mlp()
        report = train_robust(model, split.x_train[:300], split.y_train[:300], config)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert report.measured_on == "training"


def test_bad_training_data_is_a_typed_error(split):
    config = RobustTrainingConfig(epochs=1, warmup_epochs=0, steps=1)
    model = digits_mlp()
    x, y = split.x_train[:32], split.y_train[:32]
    with pytest.raises(InvalidArgumentError, match="outside"):
        train_robust(model, x * 2, y, config)
    with pytest.raises(InvalidArgumentError, match="label 10"):
        train_robust(model, x, np.full(32, 10), config)
    with pytest.raises(InvalidArgumentError, match="integer labels"):
        train_robust(model, x, y[:5], config)
    with pytest.raises(InvalidArgumentError, match="both x_val and y_val"):
        train_robust(model, x, y, config, x_val=x)
    with pytest.raises(InvalidArgumentError, match="RobustTrainingConfig"):
        train_robust(model, x, y, {"eps": 0.1})  # type: ignore[arg-type]


def test_export_onnx_cnn_matches_torch_and_keeps_no_build_paths(tmp_path, split):
    torch.manual_seed(0)
    model = digits_cnn().eval()
    path = tmp_path / "cnn.onnx"
    export_onnx(model, path)
    data = path.read_bytes()
    assert b"stack_trace" not in data and str(tmp_path).encode() not in data
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    got = sess.run(["logits"], {"input": split.x_test[:7]})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(split.x_test[:7])).numpy(), rtol=1e-4, atol=1e-4)


def test_export_needs_a_sample_when_the_width_is_unknown(tmp_path):
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(InvalidArgumentError, match="sample="):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_shipped_robust_model(split):
    """Same signature as digits.onnx, clean accuracy >= 0.96, and far more robust under the training-time PGD."""
    from edgeshield.adversarial._torch import onnx_to_torch

    def session(path):  # type: ignore[no-untyped-def]
        return ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])

    std, rob = session(digits_model_path()), session(digits_robust_model_path())
    for a, b in ((std.get_inputs(), rob.get_inputs()), (std.get_outputs(), rob.get_outputs())):
        assert [(t.name, t.type, len(t.shape)) for t in a] == [(t.name, t.type, len(t.shape)) for t in b]
    clean = float((rob.run(["logits"], {"input": split.x_test})[0].argmax(1) == split.y_test).mean())
    assert clean >= 0.96
    budget = RobustTrainingConfig(steps=20)
    robust = {name: _accuracies(torch, onnx_to_torch(path.read_bytes()), split.x_test, split.y_test, budget)[1]
              for name, path in (("standard", digits_model_path()), ("robust", digits_robust_model_path()))}
    assert robust["robust"] > 0.7 and robust["robust"] > robust["standard"] + 0.4, robust


def test_the_package_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgeshield.training import RobustTrainingConfig, digits_mlp\n"
            "from edgeshield.errors import MissingDependencyError\n"
            "RobustTrainingConfig()\n"
            "try:\n    digits_mlp()\nexcept MissingDependencyError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "edgeshield[train]" in proc.stdout
    assert issubclass(MissingDependencyError, Exception)


def test_cli_train_robust(tmp_path, split):
    data = tmp_path / "train.npz"
    np.savez(data, x=split.x_train[:200], y=split.y_train[:200])
    out = tmp_path / "m.onnx"
    proc = cli("train", "robust", "--data", data, "--out", out, "--arch", "mlp", "--method", "pgd", "--epochs", "2",
               "--steps", "2", "--eps", "0.1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["method"] == "pgd" and doc["measured_on"] == "training" and doc["config"]["eps"] == 0.1
    assert doc["epochs"] == 2 and 0.0 <= doc["robust_accuracy"] <= doc["clean_accuracy"] + 1e-9
    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    assert sess.run(["logits"], {"input": split.x_test[:3]})[0].shape == (3, 10)
    assert_one_line_error(cli("train", "robust", "--data", data, "--out", out), 2, "exists")


@pytest.mark.parametrize(("args", "needle"), [
    (["--eps", "0"], "eps"),
    (["--eps", "1.5"], "whole value range"),
    (["--method", "fgsm"], "method"),
    (["--digits"], "exactly one"),
    (["--arch", "resnet"], "arch"),
])
def test_cli_bad_budgets(tmp_path, args, needle):
    data = tmp_path / "train.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    proc = cli("train", "robust", "--data", data, "--out", tmp_path / "m.onnx", *args)
    assert_one_line_error(proc, 2, needle)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_data_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros(3))
    assert_one_line_error(cli("train", "robust", "--data", bad, "--out", tmp_path / "m.onnx"), 2, "'x' and 'y'")
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=np.zeros((4, 10), np.float32), y=np.zeros(4, np.int64))
    assert_one_line_error(cli("train", "robust", "--data", wide, "--out", tmp_path / "m.onnx"), 2, "[N, 64]")
