"""Detectors on plain frames: pre-flight errors, thresholds, weights, the hybrid temporal part."""
import numpy as np
import pandas as pd
import pytest

from detection.ml.detectors import (
    AnomalyDetector, AnomalyDetectorConfig, DetectorError, HybridAnomalyDetector, domain_feature_weights,
)

CONFIG = AnomalyDetectorConfig(n_estimators=100, contamination=0.05, min_training_rows=20)


def _gaussian(n=2000, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, d)), columns=[f"f{i}" for i in range(d)])


def test_outliers_score_higher_and_threshold_matches_contamination():
    X = _gaussian()
    det = AnomalyDetector(CONFIG).fit(X, list(X.columns))
    assert (det.predict(X) == -1).mean() == pytest.approx(0.05, abs=0.01)
    probe = pd.DataFrame([[0, 0, 0, 0], [8, 8, 0, 0]], columns=X.columns, dtype=float)
    s = det.score_samples(probe)
    assert s[1] > det.threshold_ > s[0]


def test_preflight_errors_name_the_problem():
    X = _gaussian(n=100)
    det = AnomalyDetector(CONFIG)
    with pytest.raises(DetectorError, match="missing.*f9"):
        det.fit(X, ["f0", "f9"])
    with pytest.raises(DetectorError, match="f0_z_cohort.*baselines were not computed"):
        det.fit(X, ["f0_z_cohort"])
    with pytest.raises(DetectorError, match="too few training rows: 10"):
        det.fit(X.iloc[:10], ["f0"])
    X["empty"] = np.nan
    with pytest.raises(DetectorError, match="all-NaN.*empty"):
        det.fit(X, ["f0", "empty"])
    with pytest.raises(DetectorError, match="contamination"):
        AnomalyDetectorConfig(contamination=0.9)


def test_near_constant_features_are_dropped_and_missing_values_imputed():
    X = _gaussian()
    X["flat"] = 1.0
    X.loc[::7, "f0"] = np.nan
    det = AnomalyDetector(CONFIG).fit(X, ["f0", "f1", "flat"])
    assert det.features_ == ["f0", "f1"] and "flat" in det.dropped_
    assert np.isfinite(det.score_samples(X)).all()


def test_domain_weights_balance_domains():
    w = domain_feature_weights(["a1", "a2", "a3", "b1"], {"a1": "A", "a2": "A", "a3": "A", "b1": "B"})
    assert w["b1"] == pytest.approx(3 * w["a1"])
    assert sum(v for k, v in w.items() if k.startswith("a")) == pytest.approx(w["b1"])


def test_hybrid_catches_a_jump_the_forest_alone_sees_as_ordinary():
    # Row 1500 is ordinary in f0/f1, but its temporal column is 15 robust standard deviations out.
    X = _gaussian(n=3000, d=2)
    X.loc[1500, ["f0", "f1"]] = 0.0
    X["f0_resid"] = np.random.default_rng(1).normal(size=len(X))
    X.loc[1500, "f0_resid"] = 15.0
    forest = AnomalyDetector(CONFIG).fit(X, ["f0", "f1"])
    hybrid = HybridAnomalyDetector(CONFIG).fit(X, ["f0", "f1"], temporal_features=["f0_resid"])
    assert hybrid.predict(X.iloc[[1500]])[0] == -1
    assert forest.predict(X.iloc[[1500]])[0] == 1  # the forest never sees the residual column
    with pytest.raises(DetectorError, match="needs temporal columns"):
        HybridAnomalyDetector(CONFIG).fit(X, ["f0"], temporal_features=[])


def test_fit_is_deterministic_for_a_seed():
    X = _gaussian()
    a = AnomalyDetector(CONFIG).fit(X, list(X.columns)).score_samples(X)
    b = AnomalyDetector(CONFIG).fit(X, list(X.columns)).score_samples(X)
    np.testing.assert_array_equal(a, b)
