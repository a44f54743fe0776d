"""edgeshield.evaluation.autoattack_accuracy/autoattack_examples: the standard AutoAttack (torchattacks 3.5.1) on the
shipped MLPs and a tiny model trained here, in torchattacks' variant and with the reference's parameters."""

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
from edgeshield.evaluation._autoattack import (  # noqa: E402
    INSTALL_LINE,
    REFERENCE_ITERATIONS,
    AutoAttackRun,
    autoattack_examples,
    clopper_pearson_interval,
)
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


@pytest.mark.parametrize("iterations", [None, REFERENCE_ITERATIONS])
def test_a_randomised_model_fails_the_clean_prediction_check(data: tuple[np.ndarray, np.ndarray],
                                                             iterations: int | None) -> None:
    class Noisy(torch.nn.Module):  # noise in eval mode too: two no-grad passes disagree
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w(x) + 100 * torch.randn(x.shape[0], 10)

    x, y = data
    with pytest.raises(AutoAttackCheckError, match="clean predictions"):
        autoattack_accuracy(Noisy(), x, y, norm="Linf", eps=EPS, iterations=iterations)


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
    ({"iterations": 0}, "iterations"),
    ({"iterations": -5}, "iterations"),
    ({"iterations": True}, "iterations"),
    ({"iterations": 2.5}, "iterations"),
])
def test_bad_arguments_are_typed(models: dict[str, torch.nn.Module], data: tuple[np.ndarray, np.ndarray],
                                 kwargs: dict[str, object], match: str) -> None:
    x, y = data
    args: dict[str, object] = {"x": x, "y": y, "norm": "Linf", "eps": EPS, **kwargs}
    with pytest.raises(InvalidArgumentError, match=match):
        autoattack_accuracy(models["standard"], **args)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=match):
        autoattack_examples(models["standard"], **args)  # type: ignore[arg-type]


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


# --- autoattack_examples ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """A linear softmax classifier trained here on the digits training split (full-batch Adam, about a second)."""
    split = load_digits_split()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train.astype(np.int64))
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def _check_run(run: AutoAttackRun, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, norm: str,
               eps: float) -> None:
    assert run.x_adv.shape == x.shape and run.x_adv.dtype == np.float32
    assert run.x_adv.min() >= 0.0 and run.x_adv.max() <= 1.0
    delta = (run.x_adv - x).astype(np.float64)
    size = np.abs(delta).max(1) if norm == "Linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps * (1 + 1e-5) + 1e-6
    with torch.no_grad():
        assert np.array_equal(run.clean_pred, model(torch.from_numpy(x)).argmax(1).numpy())
        assert np.array_equal(run.adv_pred, model(torch.from_numpy(run.x_adv)).argmax(1).numpy())
    moved = np.abs(delta).max(1) > 0
    # only inputs classified correctly are attacked, and an example is kept only where it breaks the input
    assert not (moved & ((run.clean_pred != y) | (run.adv_pred == y))).any()
    assert (run.norm, run.eps) == (norm, eps) and run.seconds > 0


def test_examples_on_a_tiny_trained_model(tiny: torch.nn.Module) -> None:
    split = load_digits_split()
    x, y = split.x_test[:10], split.y_test[:10]
    run = autoattack_examples(tiny, x, y, norm="Linf", eps=1 / 16)
    _check_run(run, tiny, x, y, "Linf", 1 / 16)
    assert run.iterations is None and run.variant.startswith("torchattacks 3.5.1 AutoAttack(version='standard')")
    assert (run.clean_pred == y).mean() >= 0.75  # it learned something, so there is something to break
    assert (run.adv_pred != y).sum() > (run.clean_pred != y).sum()  # ... and AutoAttack broke some of it
    acc = autoattack_accuracy(tiny, x, y, norm="Linf", eps=1 / 16)
    assert acc.robust_count == int((run.adv_pred == y).sum()) and acc.variant == run.variant


def test_default_examples_are_torchattacks_autoattack_unchanged(models: dict[str, torch.nn.Module],
                                                               data: tuple[np.ndarray, np.ndarray]) -> None:
    """iterations=None is exactly torchattacks' AutoAttack(version="standard") on the [N, 1, 8, 8] view."""
    import torchattacks

    x, y = data[0][:10], data[1][:10]
    model = models["standard"]

    class Images(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model  # a parameter to read the device from

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.inner(images.reshape(len(images), -1))  # type: ignore[no-any-return]

    run = autoattack_examples(model, x, y, norm="Linf", eps=EPS, seed=3)
    with torch.random.fork_rng(devices=[]):
        theirs = torchattacks.AutoAttack(Images().eval(), norm="Linf", eps=EPS, version="standard", n_classes=10,
                                         seed=3)(torch.from_numpy(x).reshape(len(x), 1, 8, 8), torch.from_numpy(y))
    assert np.array_equal(run.x_adv, theirs.detach().reshape(len(x), 64).numpy())
    assert "seed 3" in run.variant


REFERENCE_PARTS = (
    "fra31/auto-attack",
    "version='standard'",
    "APGD-CE (CE loss, 100 steps, 1 restart, rho 0.75",
    "APGD-T (targeted DLR, 9 target classes, 100 steps, 1 restart, rho 0.75",
    "FAB-T (multi-targeted, 9 target classes, 100 steps, 1 restart, alpha_max 0.1, eta 1.05, beta 0.9",
    "Square (5000 queries, 1 restart, p_init 0.8, margin loss, resc_schedule False",
    "seed 0",
    "differs from the reference",
)


def test_reference_variant_runs_every_attack_and_respects_the_budget(models: dict[str, torch.nn.Module],
                                                                     data: tuple[np.ndarray, np.ndarray]) -> None:
    """The robust MLP: at Linf 1/16 its inputs survive, so all four attacks run their full course (a few seconds);
    at L2 1.0 APGD-CE breaks them, which checks the L2 budget without paying for the rest."""
    x, y = data[0][:4], data[1][:4]
    model = models["robust"]
    for norm, eps in (("Linf", 1 / 16), ("L2", 1.0)):
        run = autoattack_examples(model, x, y, norm=norm, eps=eps, iterations=REFERENCE_ITERATIONS)
        _check_run(run, model, x, y, norm, eps)
        assert run.iterations == REFERENCE_ITERATIONS
        for part in REFERENCE_PARTS:
            assert part in run.variant, part
        assert "where the reference runs" not in run.variant


def test_fewer_iterations_are_named(models: dict[str, torch.nn.Module], data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data[0][:6], data[1][:6]
    a = autoattack_examples(models["standard"], x, y, norm="L2", eps=1.0, iterations=3, batch_size=4)
    b = autoattack_examples(models["standard"], x, y, norm="L2", eps=1.0, iterations=3, batch_size=4)
    _check_run(a, models["standard"], x, y, "L2", 1.0)
    assert "3 steps" in a.variant and "(3 iterations where the reference runs 100)" in a.variant
    assert "per batch of 4 inputs" in a.variant
    assert np.array_equal(a.x_adv, b.x_adv)  # seeded: the same examples twice
