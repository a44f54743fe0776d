"""edgeshield.evaluation.autoattack_accuracy: the standard AutoAttack (torchattacks 3.5.1) on the shipped MLPs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchattacks")
pytest.importorskip("onnx")

from edgeshield.adversarial._torch import onnx_to_torch  # noqa: E402
from edgeshield.errors import InvalidArgumentError, MissingDependencyError  # noqa: E402
from edgeshield.evaluation import AutoAttackCheckError, AutoAttackResult, autoattack_accuracy  # noqa: E402
from edgeshield.evaluation._autoattack import INSTALL_LINE, clopper_pearson_interval  # noqa: E402
from edgeshield.models import digits_model_path, digits_robust_model_path, load_digits_split  # noqa: E402

N = 20
EPS = 2 / 16


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    split = load_digits_split()
    return split.x_test[:N], split.y_test[:N]


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.set_num_threads(1)
    return {"standard": onnx_to_torch(digits_model_path().read_bytes()),
            "robust": onnx_to_torch(digits_robust_model_path().read_bytes())}


@pytest.fixture(scope="module")
def results(models: dict[str, torch.nn.Module], data: tuple[np.ndarray, np.ndarray]) -> dict[str, AutoAttackResult]:
    x, y = data
    return {name: autoattack_accuracy(m, x, y, norm="Linf", eps=EPS) for name, m in models.items()}


def test_result_structure_and_interval(results: dict[str, AutoAttackResult]) -> None:
    for r in results.values():
        assert (r.norm, r.eps, r.n) == ("Linf", EPS, N)
        assert r.robust_accuracy == r.robust_count / N
        assert 0.0 <= r.ci_low <= r.robust_accuracy <= r.ci_high <= 1.0
        assert r.ci_high - r.ci_low > 0.1  # 20 inputs: a wide interval, not a point
        assert r.robust_accuracy <= r.clean_accuracy
        assert r.seconds > 0
        for part in ("torchattacks 3.5.1", "standard", "APGD-CE", "APGD-T", "FAB-T", "Square", "seed 0"):
            assert part in r.variant
        assert set(r.to_dict()) >= {"robust_accuracy", "ci_low", "ci_high", "n", "variant"}
    assert results["robust"].robust_accuracy > results["standard"].robust_accuracy


def test_autoattack_is_at_least_as_strong_as_art_pgd_on_the_standard_model(
        models: dict[str, torch.nn.Module], data: tuple[np.ndarray, np.ndarray],
        results: dict[str, AutoAttackResult]) -> None:
    from art.attacks.evasion import ProjectedGradientDescent

    from edgeshield.evaluation._adversarial import art_classifier

    x, y = data
    clf = art_classifier(models["standard"], input_shape=(x.shape[1],), nb_classes=10, clip_values=(0.0, 1.0))
    attack = ProjectedGradientDescent(clf, norm=np.inf, eps=EPS, eps_step=2.5 * EPS / 20, max_iter=20,
                                      num_random_init=2, batch_size=N, verbose=False)
    np.random.seed(0)
    pgd = float((clf.predict(attack.generate(x=x, y=y)).argmax(1) == y).mean())
    assert results["standard"].robust_accuracy <= pgd


def test_deterministic_restores_mode_and_rng(models: dict[str, torch.nn.Module],
                                            data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    model = models["standard"]
    model.train()
    state = torch.random.get_rng_state()
    a = autoattack_accuracy(model, x, y, norm="L2", eps=1.0, batch_size=7)  # three AutoAttack calls
    assert model.training
    model.eval()
    assert torch.equal(state, torch.random.get_rng_state())
    b = autoattack_accuracy(model, x, y, norm="L2", eps=1.0)
    assert a.robust_count == b.robust_count and a.norm == "L2"


def test_clopper_pearson_ends() -> None:
    assert clopper_pearson_interval(0, 20)[0] == 0.0
    assert clopper_pearson_interval(20, 20)[1] == 1.0
    low, high = clopper_pearson_interval(10, 20)
    assert low == pytest.approx(0.2720, abs=1e-3) and high == pytest.approx(0.7280, abs=1e-3)  # Beta quantiles


def test_a_randomised_model_fails_the_clean_prediction_check(data: tuple[np.ndarray, np.ndarray]) -> None:
    class Noisy(torch.nn.Module):  # noise in eval mode too: two no-grad passes disagree
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w(x) + 100 * torch.randn(x.shape[0], 10)

    x, y = data
    with pytest.raises(AutoAttackCheckError, match="clean predictions"):
        autoattack_accuracy(Noisy(), x, y, norm="Linf", eps=EPS)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"norm": "L1"}, "norm"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -0.1}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"eps": 1.0}, "whole"),
    ({"batch_size": 0}, "batch_size"),
    ({"x": np.zeros(64, np.float32)}, "x must"),
    ({"x": np.full((N, 64), 2.0, np.float32)}, r"\[0, 1\]"),
    ({"y": np.zeros(N - 1, np.int64)}, "labels"),
    ({"y": np.zeros(N, np.float32)}, "labels"),
    ({"y": np.full(N, 10, np.int64)}, "lie in"),
])
def test_bad_arguments_are_typed(models: dict[str, torch.nn.Module], data: tuple[np.ndarray, np.ndarray],
                                 kwargs: dict[str, object], match: str) -> None:
    x, y = data
    args: dict[str, object] = {"x": x, "y": y, "norm": "Linf", "eps": EPS, **kwargs}
    with pytest.raises(InvalidArgumentError, match=match):
        autoattack_accuracy(models["standard"], **args)  # type: ignore[arg-type]


def test_missing_torchattacks_names_the_no_deps_install() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torchattacks"] = None  # import torchattacks now raises ImportError
        import numpy as np, torch
        from edgeshield.errors import MissingDependencyError
        from edgeshield.evaluation import autoattack_accuracy
        try:
            autoattack_accuracy(torch.nn.Linear(64, 10), np.zeros((2, 64), np.float32), np.zeros(2, np.int64),
                                norm="Linf", eps=0.1)
        except MissingDependencyError as e:
            print("MISSING:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "MISSING:" in out.stdout and INSTALL_LINE in out.stdout and "--no-deps" in out.stdout
    assert issubclass(MissingDependencyError, Exception)
