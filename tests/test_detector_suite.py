"""Every registered detector on plain arrays: interface, thresholds, metadata, the ensemble."""
import numpy as np
import pandas as pd
import pytest

from detection.ml import suite  # noqa: F401  (registers the detectors)
from detection.ml.detectors import DETECTORS, AnomalyDetectorConfig, DetectorError
from detection.ml.suite import EnsembleDetector

CONFIG = AnomalyDetectorConfig(n_estimators=100, contamination=0.05, min_training_rows=20)


def _frame(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    X["a_resid"] = rng.normal(size=n)
    return X


def _fit(name, X):
    det = DETECTORS[name](CONFIG)
    if det.uses_temporal:
        return det.fit(X, ["a", "b", "c"], temporal_features=["a_resid"])
    return det.fit(X, ["a", "b", "c"])


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_flags_a_clear_outlier_and_respects_contamination(name):
    X = _frame()
    det = _fit(name, X)
    share = (det.score_samples(X) > det.threshold_).mean()
    assert share == pytest.approx(0.05, abs=0.02)
    probe = pd.DataFrame([[0.0, 0.0, 0.0, 0.0], [9.0, -9.0, 9.0, 12.0]], columns=X.columns)
    low, high = det.score_samples(probe)
    assert high > det.threshold_ > low


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_declares_its_metadata(name):
    cls = DETECTORS[name]
    assert cls.family and isinstance(cls.multivariate, bool) and isinstance(cls.streaming, bool)
    assert "contamination" in cls.hyperparameters
    for spec in cls.hyperparameters.values():
        assert spec["min"] <= spec["default"] <= spec["max"]


def test_ensemble_leaves_out_a_failing_member_with_its_reason():
    X = _frame()
    det = EnsembleDetector(CONFIG, members=["hybrid", "robust_z"]).fit(X, ["a", "b", "c"], temporal_features=[])
    assert list(det.members_) == ["robust_z"]
    assert "temporal columns" in det.excluded_["hybrid"]
    with pytest.raises(DetectorError, match="every ensemble member failed"):
        EnsembleDetector(CONFIG, members=["hybrid"]).fit(X, ["a", "b", "c"], temporal_features=[])
    with pytest.raises(DetectorError, match="unknown ensemble member"):
        EnsembleDetector(CONFIG, members=["nope"])


def test_ensemble_confidence_is_member_agreement():
    X = _frame()
    det = EnsembleDetector(CONFIG, members=["robust_z", "iqr", "lof"]).fit(X, ["a", "b", "c"])
    probe = pd.DataFrame([[0.0, 0.0, 0.0, 0.0], [9.0, -9.0, 9.0, 0.0]], columns=X.columns)
    assert det.confidence(probe).tolist() == [0.0, 1.0]


def test_robust_z_score_is_the_largest_robust_z():
    X = _frame()
    det = _fit("robust_z", X)
    probe = pd.DataFrame([[0.0, 0.0, 0.0, 0.0]], columns=X.columns)
    probe.loc[0, "b"] = np.median(X["b"]) + 1.4826 * np.median(np.abs(X["b"] - np.median(X["b"]))) * 4
    assert det.score_samples(probe)[0] == pytest.approx(4.0, rel=0.05)
