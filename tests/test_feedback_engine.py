"""baselines.engine's feedback part on hand-made frames: suggestions, bounded application, LLM proposal checks."""
import json

import numpy as np
import pandas as pd
import pytest

from baselines.engine import (
    MAD_TO_SIGMA,
    AdjustmentRefused,
    BaselineError,
    BaselineFeedback,
    apply_feedback,
    compute_baselines,
    feedback_evidence,
    model_overrides,
    resolve_verdicts,
    suggest_baseline_adjustments,
    validate_llm_proposal,
)

A = {"model": "A"}


@pytest.fixture
def baselines():
    """Cohort A: x has median 10 and MAD 1 (40 x 9, 20 x 10, 40 x 11); cohort B: median 50, MAD 1."""
    a = np.r_[np.full(40, 9.0), np.full(20, 10.0), np.full(40, 11.0)]
    df = pd.DataFrame({"model": ["A"] * 100 + ["B"] * 100, "x": np.r_[a, a + 40], "y": np.r_[a, a]})
    return compute_baselines(df, ["x", "y"], ("cohort",), cohort_columns=("model",))


def _anomalies(xs, model="A", start=0):
    return pd.DataFrame({"anomaly_id": range(start, start + len(xs)), "model": model, "x": xs, "y": 10.0})


def _verdicts(ids, verdict):
    return pd.DataFrame({"anomaly_id": list(ids), "verdict": verdict})


def test_statistics_of_the_hand_made_set(baselines):
    row = baselines.stats.query("level == 'cohort' and feature == 'x' and group_key == '{\"model\": \"A\"}'")
    assert row["median"].item() == 10.0 and row["mad"].item() == 1.0


def test_consistent_false_positives_propose_a_shift_that_brings_them_to_z_min(baselines):
    anomalies = pd.concat([_anomalies([15.0] * 6), _anomalies([16.0], start=6)])
    feedback = pd.concat([_verdicts(range(6), "false_positive"), _verdicts([6], "true_positive")])
    proposals = suggest_baseline_adjustments(anomalies, feedback, baselines, ["cohort"], min_count=5, min_share=0.7)
    shift = [p for p in proposals if p.kind == "shift"]
    assert len(shift) == 1
    p = shift[0]
    assert (p.level, p.group_key, p.feature) == ("cohort", A, "x")
    # typical deviation 5, minus z_min (3) robust sigmas (1.4826 x MAD 1): the FP lands on |z| = 3
    assert p.adjustment == pytest.approx(5.0 - 3 * MAD_TO_SIGMA)
    assert p.evidence["n_false_positive"] == 6 and p.evidence["n_reviewed"] == 7
    assert p.evidence["share"] == pytest.approx(6 / 7, abs=1e-4)
    assert p.evidence["typical_deviation"] == pytest.approx(5.0)
    assert "6 of 7" in p.reason


def test_large_deviation_is_clipped_to_the_per_step_bound(baselines):
    anomalies = _anomalies([30.0] * 5)
    proposals = suggest_baseline_adjustments(anomalies, _verdicts(range(5), "false_positive"), baselines, ["cohort"],
                                             learning_rate=0.35, max_shift_mad=1.5)
    (p,) = [p for p in proposals if p.kind == "shift"]
    assert p.adjustment == pytest.approx(1.5 * 1.0 / 0.35)
    apply_feedback(baselines, [p], 0.35, max_shift_mad=1.5)  # the proposal passes its own bound


def test_false_positives_on_both_sides_propose_a_wider_mad(baselines):
    anomalies = _anomalies([16.0, 4.0, 16.0, 4.0, 16.0, 4.0])  # |z| = 6 / 1.4826 = 4.05 either side
    proposals = suggest_baseline_adjustments(anomalies, _verdicts(range(6), "false_positive"), baselines, ["cohort"])
    (p,) = [p for p in proposals if p.feature == "x"]
    assert p.kind == "mad_scale"
    assert p.adjustment == pytest.approx(6 / MAD_TO_SIGMA / 3, abs=1e-3)


def test_mostly_true_positives_or_too_few_propose_nothing(baselines):
    anomalies = _anomalies([15.0] * 10)
    mixed = pd.concat([_verdicts(range(5), "false_positive"), _verdicts(range(5, 10), "true_positive")])
    assert suggest_baseline_adjustments(anomalies, mixed, baselines, ["cohort"]) == []
    few = _verdicts(range(4), "false_positive")
    assert suggest_baseline_adjustments(anomalies, few, baselines, ["cohort"], min_count=5) == []


def test_contamination_and_domain_weight_follow_the_false_positive_share(baselines):
    anomalies = _anomalies([15.0] * 8 + [10.5] * 2)
    anomalies["top_feature"] = ["x"] * 8 + ["y"] * 2
    feedback = pd.concat([_verdicts(range(8), "false_positive"), _verdicts([8, 9], "true_positive")])
    proposals = suggest_baseline_adjustments(anomalies, feedback, baselines, ["cohort"], contamination=0.04,
                                             feature_domain={"x": "battery", "y": "wifi"}, min_count=2)
    by_kind = {p.kind: p for p in proposals}
    # 80 % false positives: towards 0.04 x 0.2, not below half the current value per step
    assert by_kind["contamination"].adjustment == pytest.approx(0.02)
    weight = by_kind["domain_weight"]
    assert weight.feature == "battery" and weight.adjustment == pytest.approx(0.5)
    applied = apply_feedback(baselines, [by_kind["contamination"], weight], 0.5)
    assert model_overrides(applied) == {"contamination": pytest.approx(0.03),
                                        "domain_weights": {"battery": pytest.approx(0.75)}}
    assert model_overrides(baselines) == {}


def test_apply_feedback_moves_statistics_by_the_learning_rate_and_leaves_the_input(baselines):
    before = baselines.stats.copy()
    shift = BaselineFeedback("cohort", A, "x", 2.0, "r", "shift")
    scale = BaselineFeedback("cohort", {"model": "B"}, "y", 2.0, "r", "mad_scale")
    after = apply_feedback(baselines, [shift, scale], 0.35)
    pd.testing.assert_frame_equal(baselines.stats, before)
    get = lambda s, m, f, c: s.query(f"group_key == '{json.dumps({'model': m})}' and feature == '{f}'")[c].item()  # noqa
    assert get(after.stats, "A", "x", "median") == pytest.approx(10.7)
    assert get(after.stats, "B", "y", "mad") == pytest.approx(1.35)
    assert get(after.stats, "B", "x", "median") == 50.0  # untouched


def test_a_shift_beyond_the_bound_is_refused_naming_the_group(baselines):
    too_far = BaselineFeedback("cohort", A, "x", 10.0, "r", "shift")
    with pytest.raises(AdjustmentRefused) as caught:
        apply_feedback(baselines, [too_far], 0.35, max_shift_mad=1.5)
    assert "cohort" in caught.value.reason and '"A"' in caught.value.reason and " x:" in caught.value.reason
    assert "1.5 MAD" in caught.value.reason
    assert isinstance(caught.value, BaselineError)


@pytest.mark.parametrize("factor", [0.4, 2.5])
def test_a_mad_factor_outside_the_bounds_is_refused(baselines, factor):
    with pytest.raises(AdjustmentRefused, match=r"outside the bound \[0.5, 2\]"):
        apply_feedback(baselines, [BaselineFeedback("cohort", A, "x", factor, "r", "mad_scale")])


def test_unknown_group_or_feature_is_refused(baselines):
    with pytest.raises(AdjustmentRefused, match="no such group"):
        apply_feedback(baselines, [BaselineFeedback("cohort", {"model": "Z"}, "x", 0.1, "r")])
    with pytest.raises(AdjustmentRefused, match="feature 'nope'"):
        apply_feedback(baselines, [BaselineFeedback("cohort", A, "nope", 0.1, "r")])


def test_majority_verdict_per_anomaly():
    feedback = pd.DataFrame({"anomaly_id": [1, 1, 1, 2, 2, 3], "verdict": [
        "false_positive", "false_positive", "true_positive", "true_positive", "false_positive", "not_sure"]})
    verdicts = resolve_verdicts(feedback)
    assert verdicts.to_dict() == {1: "false_positive"}  # 2 is a tie, 3 has no vote


@pytest.fixture
def evidence(baselines):
    anomalies = _anomalies([15.0] * 6)
    return feedback_evidence(anomalies, _verdicts(range(6), "false_positive"), baselines, ["cohort"])


def test_llm_proposal_citing_real_counts_within_bounds_is_accepted(baselines, evidence):
    raw = {"level": "cohort", "group_key": {"model": "A"}, "feature": "x", "adjustment": 1.5,
           "reason": "6 of 6 reviewed anomalies in cohort A sit above the median"}
    fb = validate_llm_proposal(raw, baselines, evidence)
    assert (fb.kind, fb.adjustment, fb.evidence["n_false_positive"]) == ("shift", 1.5, 6)


@pytest.mark.parametrize("change, message", [
    ({"level": "planet"}, "level 'planet'"),
    ({"feature": "gps"}, "feature 'gps'"),
    ({"group_key": {"model": "B"}}, "no reviewed anomalies"),
    ({"reason": "trust me, the baseline is wrong"}, "must cite the real counts"),
    ({"reason": "17 false positives"}, "must cite the real counts"),
    ({"adjustment": 40.0}, "exceeds the bound"),
    ({"adjustment": "lots"}, "not a number"),
])
def test_llm_proposal_is_refused_with_the_reason(baselines, evidence, change, message):
    raw = {"level": "cohort", "group_key": {"model": "A"}, "feature": "x", "adjustment": 1.5,
           "reason": "6 false positives of 6 reviewed", **change}
    with pytest.raises(AdjustmentRefused, match=message):
        validate_llm_proposal(raw, baselines, evidence)


@pytest.fixture
def device_baselines():
    """Devices d1..d4 of cohort A: r_roll_mean has median 0 and MAD 1 on each (40 x -1, 20 x 0, 40 x 1)."""
    r = np.r_[np.full(40, -1.0), np.full(20, 0.0), np.full(40, 1.0)]
    devices = [f"d{i}" for i in range(1, 5)]
    df = pd.DataFrame({"model": "A", "external_id": np.repeat(devices, 100), "r_roll_mean": np.tile(r, 4),
                       "x": np.tile(r, 4)})
    return compute_baselines(df, ["r_roll_mean", "x"], ("device",), cohort_columns=("model",))


def _temporal_review(fp_value=2.5, tp_value=8.0):
    """6 false positives on d1 at r_roll_mean = fp_value, 6 true positives on d2 at tp_value."""
    anomalies = pd.DataFrame({"anomaly_id": range(12), "model": "A", "external_id": ["d1"] * 6 + ["d2"] * 6,
                              "r_roll_mean": [fp_value] * 6 + [tp_value] * 6, "x": 0.0})
    feedback = pd.concat([_verdicts(range(6), "false_positive"), _verdicts(range(6, 12), "true_positive")])
    return anomalies, feedback


def test_temporal_score_that_separates_true_from_false_positives_gets_more_weight(device_baselines):
    anomalies, feedback = _temporal_review()
    proposals = suggest_baseline_adjustments(anomalies, feedback, device_baselines, ["device"],
                                             temporal_features=["r_roll_mean"])
    (weight,) = [p for p in proposals if p.kind == "domain_weight"]
    assert (weight.level, weight.group_key, weight.feature) == ("model", {}, "temporal")
    # true positives at |z| 8 / 1.4826, false positives at 2.5 / 1.4826: ratio 3.2, capped at the factor bound 2
    assert weight.adjustment == pytest.approx(2.0)
    assert weight.evidence["n_false_positive"] == 6 and weight.evidence["n_true_positive"] == 6
    applied = apply_feedback(device_baselines, [weight], 0.5)
    assert model_overrides(applied)["domain_weights"] == {"temporal": pytest.approx(1.5)}


def test_false_positives_driving_a_devices_temporal_score_widen_its_mad(device_baselines):
    anomalies, feedback = _temporal_review()
    proposals = suggest_baseline_adjustments(anomalies, feedback, device_baselines, ["device"],
                                             temporal_features=["r_roll_mean"])
    scales = [p for p in proposals if p.kind == "mad_scale"]
    assert [(p.level, p.group_key, p.feature) for p in scales] == [("device", {"external_id": "d1"}, "r_roll_mean")]
    (scale,) = scales
    # below the z_min rule's reach (|z| 1.69 < 3), yet the typical false positive lands on |z| 1
    assert scale.adjustment == pytest.approx(2.5 / MAD_TO_SIGMA, abs=1e-3)
    assert scale.evidence["temporal"] is True and "6 of 6" in scale.reason
    after = apply_feedback(device_baselines, [scale], 0.35)
    row = after.stats.query("level == 'device' and feature == 'r_roll_mean' and group_key == '{\"external_id\": \"d1\"}'")
    assert row["mad"].item() == pytest.approx(1 + 0.35 * (scale.adjustment - 1))


def test_temporal_proposals_need_temporal_features_and_mostly_false_positives(device_baselines):
    anomalies, feedback = _temporal_review()
    plain = suggest_baseline_adjustments(anomalies, feedback, device_baselines, ["device"])
    assert not [p for p in plain if p.feature == "temporal" or p.evidence.get("temporal")]
    # true positives no higher than the false positives: no weight; a device with its true positives: no MAD
    anomalies, _ = _temporal_review(fp_value=2.5, tp_value=2.5)
    anomalies["external_id"] = "d1"
    proposals = suggest_baseline_adjustments(anomalies, feedback, device_baselines, ["device"],
                                             temporal_features=["r_roll_mean"])
    assert proposals == []


def test_hybrid_detector_honours_the_temporal_domain_weight():
    from detection.ml.detectors import TEMPORAL_DOMAIN, AnomalyDetectorConfig, HybridAnomalyDetector

    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=300), "t": rng.normal(size=300)})
    config = AnomalyDetectorConfig(n_estimators=20, temporal_weight=0.6)
    plain = HybridAnomalyDetector(config).fit(X, ["a"], temporal_features=["t"])
    same = HybridAnomalyDetector(config, domain_weights={TEMPORAL_DOMAIN: 1.0}).fit(X, ["a"], temporal_features=["t"])
    tilted = HybridAnomalyDetector(config, domain_weights={TEMPORAL_DOMAIN: 2.0}).fit(X, ["a"], temporal_features=["t"])
    assert plain.effective_temporal_weight() == same.effective_temporal_weight() == 0.6
    np.testing.assert_allclose(plain.score_samples(X), same.score_samples(X))
    assert tilted.effective_temporal_weight() == pytest.approx(1.2 / 1.6)  # w k / (w k + 1 - w)
    assert set(tilted.weights_) == {"a"} and tilted.weights_["a"] == pytest.approx(1.0)  # the forest is untouched
