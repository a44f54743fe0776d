"""The system evaluation: real ONNX Runtime verdicts, per-input worst case over AutoAttack and the adaptive sweep."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeshield.adversarial import SmoothingConfig, calibrate
from edgeshield.adversarial._hidden import expose_hidden
from edgeshield.adversarial._torch import onnx_to_torch
from edgeshield.errors import InvalidArgumentError
from edgeshield.evaluation._system import (
    Budget,
    DefendedSystem,
    SuiteConfig,
    evaluate_system,
    flat_figures,
    report_table,
)
from edgeshield.models import digits_input_spec, digits_model_path, digits_robust_model_path, load_digits_split

N_CAL = 225
TINY = SuiteConfig(iters=8, lambdas=(0.0, 1.0), losses=("ce",), eot_draws=2)


def _system(path: Any, split: Any, name: str, smoothing: SmoothingConfig | None = None) -> DefendedSystem:
    from edgeshield.bundles._ort import onnxruntime as ort

    model, _ = expose_hidden(path.read_bytes())
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    spec = dataclasses.replace(digits_input_spec(), quantum=1 / 16)
    file = calibrate(session, split.x_test[:N_CAL], model_sha256="0" * 64, input_spec=spec,
                     detectors=("squeeze", "noise", "reconstruction", "mahalanobis", "lid"), reference=split.x_train,
                     reference_labels=split.y_train, noise={"seed": 0}, decision="fisher")
    return DefendedSystem(name, session, onnx_to_torch(model), file, smoothing=smoothing)


@pytest.fixture(scope="module")
def split() -> Any:
    return load_digits_split()


@pytest.fixture(scope="module")
def standard(split: Any) -> DefendedSystem:
    return _system(digits_model_path(), split, "standard MLP")


def test_budget_parse_and_names() -> None:
    b = Budget.parse("linf:2/16")
    assert (b.norm, b.eps, b.key, b.label) == ("Linf", 0.125, "linf_2_16", "L∞ 2/16")
    assert Budget.parse(" L2 : 1.0 ").key == "l2_1" and Budget.parse("l2:0.5").label == "L2 0.5"
    assert Budget.parse("linf:0.25").label == "L∞ 4/16" and Budget.parse("linf:1/3").key == "linf_1_3"
    for bad in ("linf", "linf:", "l3:1", "linf:1/0", "linf:16/16", "l2:-1", "l2:0", "linf:2/16/2"):
        with pytest.raises(InvalidArgumentError):
            Budget.parse(bad)


@given(st.integers(1, 40), st.integers(1, 64))
def test_budget_parse_fractions(num: int, den: int) -> None:
    if num >= den:
        with pytest.raises(InvalidArgumentError):
            Budget.parse(f"linf:{num}/{den}")
        return
    b = Budget.parse(f"linf:{num}/{den}")
    assert b.eps == num / den and Budget.parse(b.label.replace("L∞ ", "linf:")) == b


def test_judge_is_the_runtime_verdict(standard: DefendedSystem, split: Any) -> None:
    x, y = split.x_test[N_CAL:N_CAL + 60], split.y_test[N_CAL:N_CAL + 60]
    mis, ok, refused = standard.judge(x, y)
    assert ok.all()  # clean digits sit on the 1/16 grid
    d = standard.robust.decide(x)
    assert np.array_equal(refused, d.verdicts == 2)
    answered = ~refused
    assert np.array_equal(mis[answered], d.predictions[answered] != y[answered])
    off_grid = x + 0.01
    _, ok_off, _ = standard.judge(off_grid, y)
    assert not ok_off.any()  # validation refuses them before any detector runs


def test_the_standard_mlp_is_broken_and_the_worst_case_covers_every_attack(standard: DefendedSystem,
                                                                             split: Any) -> None:
    x, y = split.x_test[N_CAL:N_CAL + 40], split.y_test[N_CAL:N_CAL + 40]
    res = evaluate_system(standard, x, y, (Budget("Linf", 2 / 16),), suite=TINY)
    b = res.budgets[0]
    assert res.n == 40 and res.fpr["rate"] <= 0.2
    broken = b.end_to_end_success["k"]
    assert broken >= max(r["k"] for r in b.per_attack.values())  # the per-input union
    assert set(b.per_attack) == {"autoattack", "adaptive"}
    assert b.end_to_end_success["rate"] > 0.2  # a two-grey-level attack breaks an undefended-by-training MLP
    assert b.end_to_end_success["ci_low"] <= b.end_to_end_success["rate"] <= b.end_to_end_success["ci_high"]
    n_broken = res.n - b.system_robust_accuracy["k"]
    assert n_broken >= broken  # clean errors the system accepts count as broken too
    flat = flat_figures(res, prefix="s_")
    assert flat["s_adaptive_end_to_end_success_linf_2_16"] == b.end_to_end_success["rate"]
    assert {"s_system_robust_accuracy_linf_2_16_ci_low", "s_system_fpr"} <= set(flat)
    assert report_table([res]).row_count == 1


def test_the_robust_mlp_does_better_than_the_standard_one(standard: DefendedSystem, split: Any) -> None:
    x, y = split.x_test[N_CAL:N_CAL + 40], split.y_test[N_CAL:N_CAL + 40]
    robust = _system(digits_robust_model_path(), split, "robust MLP")
    quick = dataclasses.replace(TINY, autoattack=False)
    a = evaluate_system(standard, x, y, (Budget("Linf", 2 / 16),), suite=quick).budgets[0]
    b = evaluate_system(robust, x, y, (Budget("Linf", 2 / 16),), suite=quick).budgets[0]
    assert b.end_to_end_success["rate"] < a.end_to_end_success["rate"]


def test_l2_budget_and_smoothing_run_through_the_runtime(split: Any) -> None:
    x, y = split.x_test[N_CAL:N_CAL + 12], split.y_test[N_CAL:N_CAL + 12]
    system = _system(digits_robust_model_path(), split, "smoothed", SmoothingConfig(sigma=0.25, n0=10, n=100))
    res = evaluate_system(system, x, y, (Budget("L2", 1.0),), suite=dataclasses.replace(TINY, autoattack=False))
    assert res.smoothing is not None and "sigma=0.25" in res.smoothing
    assert 0.0 <= res.budgets[0].system_robust_accuracy["rate"] <= 1.0


def test_bad_arguments_are_typed_errors(standard: DefendedSystem, split: Any) -> None:
    x = split.x_test[:5]
    with pytest.raises(InvalidArgumentError):
        evaluate_system(standard, x, split.y_test[:4])
    with pytest.raises(InvalidArgumentError):
        evaluate_system(standard, x, split.y_test[:5], ())
    with pytest.raises(InvalidArgumentError):
        Budget("L1", 1.0)  # type: ignore[arg-type]
