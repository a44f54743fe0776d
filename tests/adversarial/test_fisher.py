"""The Fisher combiner: empirical p-values against clean calibration scores, calibrated on clean data only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshield.adversarial import DetectorFile, EnsembleDetector, ReconstructionDetector, RobustModel, calibrate
from edgeshield.adversarial._calibrate import build_all, threshold_at_fpr
from edgeshield.adversarial._detectors import empirical_p_values, fisher_statistic, leave_one_out_p_values
from edgeshield.errors import InvalidArgumentError
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split

SPEC = digits_input_spec()


@pytest.fixture(scope="module")
def session() -> Any:
    from edgeshield.bundles._ort import onnxruntime as ort

    return ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def split() -> Any:
    return load_digits_split()


@pytest.fixture(scope="module")
def file(session: Any, split: Any) -> DetectorFile:
    return calibrate(session, split.x_test[:225], model_sha256="ab" * 32, input_spec=SPEC, reference=split.x_train,
                     detectors=("squeeze", "noise", "reconstruction"))


def test_p_values_known_answers() -> None:
    clean = np.array([1.0, 2.0, 3.0])
    assert np.allclose(empirical_p_values(np.array([0.0, 1.0, 2.5, 3.0, 4.0]), clean),
                       [4 / 4, 4 / 4, 2 / 4, 2 / 4, 1 / 4])
    # leave-one-out: each against the other two, (1 + #{others >= s}) / 3; ties count as ">="
    assert np.allclose(leave_one_out_p_values(np.array([3.0, 1.0, 2.0, 2.0])), [1 / 4, 4 / 4, 3 / 4, 3 / 4])
    p = [np.array([0.5, 1.0]), np.array([0.25, 1.0])]
    assert np.allclose(fisher_statistic(p), [-2 * (np.log(0.5) + np.log(0.25)), 0.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.lists(st.floats(-1e6, 1e6), min_size=1,
                                                                          max_size=50))
def test_p_values_are_in_the_unit_interval_and_fall_with_the_score(clean: list[float], scores: list[float]) -> None:
    c = np.sort(np.array(clean))
    s = np.sort(np.array(scores))
    p = empirical_p_values(s, c)
    assert ((p > 0) & (p <= 1)).all() and (np.diff(p) <= 0).all()
    assert p.min() >= 1 / (len(c) + 1)
    loo = leave_one_out_p_values(np.array(clean))
    assert ((loo > 0) & (loo <= 1)).all()


def test_calibrated_fisher_holds_its_fpr_on_held_out_clean_data() -> None:
    """Two dependent members (PCA residuals, L1 and L2) on Gaussian data: calibrate on 2,000 clean inputs, measure on
    40,000 more. The threshold comes from leave-one-out statistics, so held-out clean inputs see the same law."""
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(3.0, 0.2, 12))
    ref, cal, held = (rng.multivariate_normal(np.zeros(12), cov, size=n) for n in (2000, 2000, 40_000))
    members = [ReconstructionDetector.fit(ref, components=4, norm="l1"),
               ReconstructionDetector.fit(ref, components=6, norm="l2")]
    clean_scores = [m.scores(cal) for m in members]
    fisher = EnsembleDetector(members, [1.0, 1.0], combine="fisher", clean_scores=clean_scores)
    assert fisher.name == "fisher"
    for target in (0.02, 0.05):
        t = threshold_at_fpr(fisher_statistic([leave_one_out_p_values(s) for s in clean_scores]), target)
        measured = float((fisher.scores(held) > t).mean())
        assert abs(measured - target) < 0.4 * target, (target, measured)


def test_calibrate_writes_a_fisher_detector_beside_the_ensemble(file: DetectorFile, session: Any, split: Any) -> None:
    ens, fisher = file.get("ensemble"), file.get("fisher")
    assert fisher.params["members"] == ens.params["members"] == ["squeeze", "noise", "reconstruction"]
    assert fisher.params["combine"] == "fisher" and "combine" not in ens.params  # old ensembles read as before
    assert all(len(c) == 225 and c == sorted(c) for c in fisher.params["clean_scores"])
    assert fisher.calibration["fpr_reject"] <= file.target_fpr
    assert file.decision == "ensemble"
    held = split.x_test[225:]
    for name in ("ensemble", "fisher"):
        model = RobustModel(session, file, detector=name)
        rejected = float((model.decide(held).verdicts == 2).mean())
        assert rejected <= 0.06, (name, rejected)  # 225 held-out clean digits, target 2 %


def test_decision_can_be_fisher(session: Any, split: Any, file: DetectorFile) -> None:
    f = calibrate(session, split.x_test[:225], model_sha256="ab" * 32, input_spec=SPEC, detectors=("squeeze",),
                  decision="fisher")
    assert f.decision == "fisher" and f.decision_detectors() == {"fisher", "squeeze"}
    dets = build_all(f, RobustModel(session, f).clf)
    assert dets["fisher"].members[0] is dets["squeeze"]  # type: ignore[attr-defined]  # members built once
    with pytest.raises(InvalidArgumentError, match="no detector 'nope'"):
        calibrate(session, split.x_test[:225], model_sha256="ab" * 32, input_spec=SPEC, detectors=("squeeze",),
                  decision="nope")


def test_fisher_needs_clean_scores_for_every_member(file: DetectorFile, session: Any) -> None:
    det = build_all(file, RobustModel(session, file).clf, names=["squeeze"])["squeeze"]
    with pytest.raises(InvalidArgumentError, match="clean calibration scores"):
        EnsembleDetector([det], [1.0], combine="fisher")
    with pytest.raises(InvalidArgumentError, match="clean calibration scores"):
        EnsembleDetector([det], [1.0], combine="fisher", clean_scores=[[]])
    with pytest.raises(InvalidArgumentError, match="finite"):
        EnsembleDetector([det], [1.0], combine="fisher", clean_scores=[[np.nan]])
    with pytest.raises(InvalidArgumentError, match="max or fisher"):
        EnsembleDetector([det], [1.0], combine="mean")  # type: ignore[arg-type]
