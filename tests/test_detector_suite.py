"""Every registered detector on plain arrays: interface, thresholds, metadata, the ensemble."""
import json
import pickle

import numpy as np
import pandas as pd
import pytest

from detection.ml import suite  # noqa: F401  (registers the detectors)
from detection.ml.deep import LSTMAutoencoderDetector
from detection.ml.detectors import DETECTORS, AnomalyDetectorConfig, DetectorError, detector_metadata
from detection.ml.scoring import impact_of, score_frame, severity_from_score
from detection.ml.statistical import GrubbsDetector
from detection.ml.suite import (
    AutoDetector, EnsembleDetector, data_characteristics, select_detectors, trailing_statistic,
    tune_hyperparameters, weights_from_feedback,
)

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
    assert isinstance(cls.needs_training, bool)
    assert "contamination" in cls.hyperparameters
    for spec in cls.hyperparameters.values():
        if "choices" in spec:
            assert spec["default"] in spec["choices"]
        else:
            assert spec["min"] <= spec["default"] <= spec["max"]
    meta = detector_metadata(name)
    assert meta["name"] == name and meta["summary"]


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


def test_ensemble_scores_and_votes_in_one_pass_match_scoring_them_apart():
    X = _frame()
    det = EnsembleDetector(CONFIG, members=["robust_z", "iqr", "lof"], weights={"lof": 2.0})
    det.fit(X, ["a", "b", "c"])
    probe = _frame(n=300, seed=5)
    probe.iloc[10:12, :3] = [[9.0, -9.0, 9.0], [0.0, 0.0, 40.0]]
    scores, votes = det.score_with_votes(probe)
    np.testing.assert_array_equal(scores, det.score_samples(probe))
    assert set(votes) == {"robust_z", "iqr", "lof"}
    for name, flagged in votes.items():
        np.testing.assert_array_equal(flagged, det.votes(probe)[name])
    # Weighted share: lof weighs 2 of 4.
    share = det.agreement(votes)
    expected = (votes["robust_z"] * 1.0 + votes["iqr"] * 1.0 + votes["lof"] * 2.0) / 4.0
    np.testing.assert_allclose(share, expected)
    assert share[10] == 1.0 and set(np.unique(share)) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    with pytest.raises(DetectorError, match="no member votes"):
        det.agreement({})


def test_score_frame_reports_an_ensembles_votes_on_anomalies_only():
    X = _frame()
    ensemble = EnsembleDetector(CONFIG, members=["robust_z", "iqr"]).fit(X, ["a", "b", "c"])
    probe = _frame(n=200, seed=6)
    probe.iloc[50, :3] = [12.0, 0.0, 0.0]
    kwargs = {"explain": probe, "features": ["a", "b", "c"], "feature_metric": {}, "metric_domain": {},
              "baselines": None}
    result = score_frame(ensemble, probe, **kwargs)
    anomalies = np.flatnonzero(result.labels == -1)
    assert 50 in anomalies
    assert result.votes[50] == {"robust_z": True, "iqr": True} and result.agreement[50] == 1.0
    assert all((result.votes[i] is None) == (result.labels[i] == 1) for i in range(len(probe)))
    persisted = result.anomaly_agreement()
    assert [i for i, a in enumerate(persisted) if a is not None] == anomalies.tolist()
    single = score_frame(_fit("robust_z", X), probe, **kwargs)
    assert single.votes is None and single.agreement is None and single.anomaly_agreement() is None


def test_robust_z_score_is_the_largest_robust_z():
    X = _frame()
    det = _fit("robust_z", X)
    probe = pd.DataFrame([[0.0, 0.0, 0.0, 0.0]], columns=X.columns)
    probe.loc[0, "b"] = np.median(X["b"]) + 1.4826 * np.median(np.abs(X["b"] - np.median(X["b"]))) * 4
    assert det.score_samples(probe)[0] == pytest.approx(4.0, rel=0.05)


# --- the new detectors on crafted series --------------------------------------------------------

SPIKE, SHIFT = 1000, 1100


def _crafted(n=1200, seed=1):
    """Two columns: a daily-like sine (period 50) with noise, and white noise; a spike of 6 in
    column a at SPIKE and a level shift of 6 in column b from SHIFT on."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    X = pd.DataFrame({"a": np.sin(2 * np.pi * t / 50) + 0.1 * rng.normal(size=n), "b": rng.normal(size=n)})
    if n > SHIFT:
        X.loc[SPIKE, "a"] += 6
        X.loc[SHIFT:, "b"] += 6
    return X


NEW = ["grubbs", "windowed_gaussian", "stl_residual", "forecast", "ocsvm", "lstm_ae", "auto"]


@pytest.mark.parametrize("name", NEW)
def test_new_detector_flags_a_spike_and_the_start_of_a_level_shift(name):
    X = _crafted()
    det = DETECTORS[name](AnomalyDetectorConfig(contamination=0.01))
    det.fit(X.iloc[:800], ["a", "b"])
    test = X.iloc[800:]
    flagged = det.score_samples(test) > det.threshold_
    assert flagged[SPIKE - 800]
    assert flagged[SHIFT - 800:SHIFT - 800 + 5].any()
    assert flagged[:SPIKE - 800].mean() < 0.05  # the quiet stretch before the spike


def test_sequential_detector_never_looks_ahead():
    X = _crafted()
    det = DETECTORS["windowed_gaussian"](CONFIG).fit(X.iloc[:800], ["a", "b"])
    full = det.score_samples(X.iloc[800:])
    cut = det.score_samples(X.iloc[800:1050])
    np.testing.assert_allclose(full[:250], cut)


def test_grubbs_critical_value_matches_the_published_table():
    # Grubbs (1969) / NIST e-Handbook 1.3.5.17: n = 10, alpha = 0.05 (two-sided) -> 2.290
    assert GrubbsDetector.critical_value(10, 0.05) == pytest.approx(2.290, abs=0.002)
    with pytest.raises(DetectorError, match="alpha"):
        GrubbsDetector(alpha=1.5)


def test_grubbs_removes_training_outliers_before_estimating():
    X = _frame(n=300)
    X.loc[:4, "a"] = 50.0  # five gross outliers in the training rows
    det = GrubbsDetector(CONFIG).fit(X, ["a", "b", "c"])
    assert det.removed_[0] >= 5 and abs(det.mean_[0]) < 0.3


def test_lstm_autoencoder_is_deterministic_with_a_seed():
    X = _crafted(n=160)
    kwargs = {"window": 5, "hidden": 4, "epochs": 1}
    first = LSTMAutoencoderDetector(CONFIG, **kwargs).fit(X, ["a", "b"])
    again = LSTMAutoencoderDetector(CONFIG, **kwargs).fit(X, ["a", "b"])
    other = LSTMAutoencoderDetector(AnomalyDetectorConfig(min_training_rows=20, random_state=7), **kwargs).fit(
        X, ["a", "b"])
    np.testing.assert_array_equal(first.score_samples(X), again.score_samples(X))
    assert not np.allclose(first.score_samples(X), other.score_samples(X))
    assert first.device_ in ("cpu", "cuda")
    restored = pickle.loads(pickle.dumps(first))  # the model artifact is a pickle
    np.testing.assert_allclose(restored.score_samples(X), first.score_samples(X), rtol=1e-6)


def test_lstm_autoencoder_refuses_too_few_rows_for_its_window():
    X = _crafted(n=40)
    with pytest.raises(DetectorError, match="window=30"):
        LSTMAutoencoderDetector(AnomalyDetectorConfig(min_training_rows=10)).fit(X.iloc[:25], ["a", "b"])


class _Broken(DETECTORS["robust_z"]):
    """Fits, then fails when scoring rows it has not seen."""

    def score_samples(self, X):
        if len(X) < 100:
            raise RuntimeError("model file corrupt")
        return super().score_samples(X)


def test_ensemble_excludes_a_member_that_fails_to_score_and_records_why(monkeypatch):
    monkeypatch.setitem(DETECTORS, "broken", _Broken)
    X = _frame()
    det = EnsembleDetector(CONFIG, members=["broken", "iqr"]).fit(X, ["a", "b", "c"])
    scores = det.score_samples(X.iloc[:10])
    assert scores.shape == (10,)
    assert list(det.members_) == ["iqr"]
    assert "model file corrupt" in det.excluded_["broken"] and det.params()["excluded"]["broken"]


def test_rank_fusion_and_weights():
    X = _frame()
    zero = EnsembleDetector(AnomalyDetectorConfig(min_training_rows=20, ensemble_fusion="rank",
                                                  ensemble_weights=(("iqr", 0.0),)),
                            members=["robust_z", "iqr"]).fit(X, ["a", "b", "c"])
    alone = EnsembleDetector(AnomalyDetectorConfig(min_training_rows=20, ensemble_fusion="rank"),
                             members=["robust_z"]).fit(X, ["a", "b", "c"])
    inside = zero.score_samples(X)
    np.testing.assert_allclose(inside, alone.score_samples(X))  # a member of weight 0 counts for nothing
    assert 0 <= inside.min() and inside.max() <= 1  # training rows rank inside [0, 1]
    far = pd.DataFrame([[30.0, 0, 0, 0], [60.0, 0, 0, 0]], columns=X.columns)
    assert 1 < zero.score_samples(far)[0] < zero.score_samples(far)[1]  # and beyond it keep growing
    with pytest.raises(DetectorError, match="ensemble_fusion"):
        AnomalyDetectorConfig(ensemble_fusion="mean")



# --- alarm persistence (ensemble_smooth_rows) ------------------------------------------------------

def test_trailing_statistic_by_hand_reads_only_earlier_rows():
    x = [0.0, 10.0, 0.0, 10.0, 10.0, 0.0]
    assert trailing_statistic(x, 3).tolist() == [0.0, 5.0, 0.0, 10.0, 10.0, 10.0]
    assert trailing_statistic(x, 2, "mean").tolist() == [0.0, 5.0, 5.0, 5.0, 10.0, 5.0]
    # history stands for the rows before: only its last rows - 1 values are read
    assert trailing_statistic([10.0], 3, history=[99.0, 0.0, 10.0]).tolist() == [10.0]
    assert trailing_statistic(x, 1).tolist() == x
    changed = list(x[:4]) + [-50.0, 50.0]
    assert trailing_statistic(changed, 3)[:4].tolist() == trailing_statistic(x, 3)[:4].tolist()
    with pytest.raises(DetectorError, match="statistic"):
        trailing_statistic(x, 3, "max")


def _persistent(k):
    config = AnomalyDetectorConfig(n_estimators=50, contamination=0.05, min_training_rows=20,
                                   ensemble_smooth_rows=k)
    return EnsembleDetector(config, members=["robust_z", "iqr"])


def test_ensemble_persistence_keeps_a_sustained_shift_and_drops_a_lone_spike():
    rng = np.random.default_rng(3)
    train = pd.DataFrame(rng.normal(size=(1500, 3)), columns=["a", "b", "c"])
    test = pd.DataFrame(rng.normal(size=(200, 3)), columns=["a", "b", "c"], index=range(2000, 2200))
    test.loc[2050, "a"] += 12  # one row
    test.loc[2120:, "b"] += 4  # from row 2120 on
    plain, smooth = _persistent(1).fit(train, ["a", "b", "c"]), _persistent(15).fit(train, ["a", "b", "c"])
    flat = plain.score_samples(test) > plain.threshold_
    held = smooth.score_samples(test) > smooth.threshold_
    assert flat[50] and not held[50]  # the spike alone: flagged without persistence only
    assert held[120:].mean() > 0.85 and held[128:].all()  # the shift: flagged once half the window is in it
    assert not held[:120].any() and flat[:120].sum() >= 2  # no false alarm before it, fewer than without
    # The threshold is the highest smoothed training score: no training row is above it.
    assert (smooth.score_samples(train) <= smooth.threshold_).all()


def test_ensemble_persistence_reads_the_training_tail_as_the_recent_past():
    rng = np.random.default_rng(4)
    train = pd.DataFrame(rng.normal(size=(600, 3)), columns=["a", "b", "c"])
    det = _persistent(9).fit(train, ["a", "b", "c"])
    after = pd.DataFrame(rng.normal(size=(30, 3)), columns=["a", "b", "c"], index=range(600, 630))
    both = det.score_samples(pd.concat([train, after]))[600:]
    np.testing.assert_allclose(det.score_samples(after), both)  # as if scored right after training
    restored = pickle.loads(pickle.dumps(det))
    np.testing.assert_allclose(restored.score_samples(after), both)
    with pytest.raises(DetectorError, match="ensemble_smooth_rows"):
        AnomalyDetectorConfig(ensemble_smooth_rows=0)

def test_weights_from_feedback_follow_each_members_precision():
    feedback = pd.DataFrame({"verdict": ["true_positive"] * 8 + ["false_positive"] * 8 + ["not_sure"] * 3,
                             "good": [True] * 8 + [False] * 8 + [True] * 3,
                             "noisy": [True] * 16 + [True] * 3})
    w = weights_from_feedback(feedback, ["good", "noisy"], priors={"noisy": 2.0})
    assert w["good"] == pytest.approx((8 + 2) / (8 + 4) / 0.5)  # 8 of 8 flagged were true
    assert w["noisy"] == pytest.approx(2.0 * (8 + 2) / (16 + 4) / 0.5)
    assert weights_from_feedback(feedback.iloc[:0], ["good"]) == {"good": 1.0}
    with pytest.raises(DetectorError, match="lacks column.*other"):
        weights_from_feedback(feedback, ["other"])


def test_confidence_weighs_each_members_vote():
    X = _frame()
    det = EnsembleDetector(CONFIG, members=["robust_z", "iqr"], weights={"robust_z": 3.0}).fit(X, ["a", "b", "c"])
    probe = pd.DataFrame([[0.0, 0, 0, 0], [9.0, 0, 0, 0]], columns=X.columns)
    assert det.confidence(probe).tolist() == [0.0, 1.0]
    det.members_["iqr"].threshold_ = np.inf  # iqr never votes now
    assert det.confidence(probe)[1] == pytest.approx(0.75)


def test_severity_is_score_times_business_impact():
    z = np.array([3.0, 3.0, 5.0, 5.0])
    assert severity_from_score(z, (4, 6, 10)).tolist() == ["low", "low", "medium", "medium"]
    assert severity_from_score(z, (4, 6, 10), impact=np.array([1, 2, 1, 2.5])).tolist() == [
        "low", "high", "medium", "critical"]
    with pytest.raises(ValueError, match="ascending"):
        severity_from_score(z, (6, 4, 10))
    top = [{"domain": "power"}]
    assert impact_of(top, None, {"power": 2.0}) == 2.0
    assert impact_of(top, pd.DataFrame({"model": ["X1"]}), {"power": 2.0, "X1": 3.0}) == 3.0
    assert impact_of([{"domain": "network"}], None, {"power": 2.0}) == 1.0


def test_impact_weights_come_from_the_settings_mapping():
    config = AnomalyDetectorConfig.from_mapping({"impact_weights": {"power": 2}, "ensemble_weights": {"lof": 0.5}})
    assert config.impact_weights == (("power", 2.0),) and config.ensemble_weights == (("lof", 0.5),)
    with pytest.raises(DetectorError, match="non-negative.*power"):
        AnomalyDetectorConfig.from_mapping({"impact_weights": {"power": -1}})


def test_selection_follows_the_data_characteristics():
    short = data_characteristics(_frame(n=100), ["a"])
    assert short["multivariate"] is False and select_detectors(short)[0] == ("robust_z", "iqr", "grubbs")
    seasonal = data_characteristics(_crafted().iloc[:800], ["a", "b"])
    assert seasonal["seasonality_strength"] > 0.5 and seasonal["multivariate"] is True
    assert "stl_residual" in select_detectors(seasonal)[0] and "lof" not in select_detectors(seasonal)[0]
    gappy = _frame(n=1500)
    gappy.loc[gappy.index % 3 == 0, ["a", "b"]] = np.nan
    traits = data_characteristics(gappy, ["a", "b", "c"])
    members, reason = select_detectors(traits)
    assert traits["missing_share"] == pytest.approx(0.222, abs=0.01)
    assert "windowed_gaussian" not in members and "lof" in members and "missing" in reason


def test_one_metric_counts_as_univariate_whatever_its_engineered_variants():
    X = _crafted()
    X["a_roll_mean"], X["a_delta_z_device"], X["a_z_device"] = X["a"].rolling(5, min_periods=1).mean(), 0.5, X["a"]
    traits = data_characteristics(X, ["a", "a_roll_mean", "a_delta_z_device", "a_z_device"])
    assert traits["features"] == 4 and traits["metrics"] == 1 and traits["multivariate"] is False
    members, reason = select_detectors(traits)
    assert members == ("nn_novelty",) and "one metric" in reason
    # Two metrics, or one with too many gaps for a sequential model, keep the other rules.
    X["b_roll_std"] = X["b"].rolling(5, min_periods=1).std()
    assert data_characteristics(X, ["a", "b_roll_std"])["metrics"] == 2
    gappy = X[["a"]].copy()
    gappy.loc[gappy.index % 3 == 0, "a"] = np.nan
    assert select_detectors(data_characteristics(gappy, ["a"]))[0] == ("robust_z", "iqr")


def test_auto_on_one_nab_series_picks_nn_novelty_and_flags_its_anomaly_windows(shared_data):
    # An EC2 CPU series of NAB, trained on its probationary rows as evaluate_nab does. Its level moves
    # after training: the rules for several metrics (robust_z, iqr, windowed_gaussian) flag 24 % of
    # the rows outside the anomaly windows here (18 % inside).
    name = "realAWSCloudwatch/ec2_cpu_utilization_5f5533.csv"
    frame = pd.read_csv(shared_data / "nab" / "data" / name, parse_dates=["timestamp"])
    windows = json.loads((shared_data / "nab" / "labels" / "combined_windows.json").read_text())[name]
    X = frame[["value"]]
    train = len(X) * 15 // 100
    det = AutoDetector(CONFIG).fit(X.iloc[:train], ["value"])
    assert det.params()["selected_members"] == "nn_novelty" and det.params()["data_metrics"] == 1
    flagged = det.score_samples(X) > det.threshold_
    inside = np.zeros(len(X), dtype=bool)
    for start, end in windows:
        inside |= frame["timestamp"].between(pd.Timestamp(start), pd.Timestamp(end)).to_numpy()
    inside[:train] = False
    alarm_rate_inside = flagged[train:][inside[train:]].mean()
    alarm_rate_outside = flagged[train:][~inside[train:]].mean()
    assert alarm_rate_inside > 0.02 and alarm_rate_outside < 0.01


def test_auto_detector_records_its_choice_and_reason():
    X = _crafted()
    det = AutoDetector(CONFIG).fit(X.iloc[:800], ["a", "b"])
    selection = det.params()["selection"]
    assert selection["members"] == list(det.member_names) and "stl_residual" in selection["members"]
    assert "seasonal" in selection["reason"] and selection["characteristics"]["rows"] == 800
    assert det.params()["selected_members"] == ",".join(det.member_names) and det.params()["data_rows"] == 800


def test_tuning_uses_time_series_splits_and_picks_the_best_f1():
    rng = np.random.default_rng(3)
    X = pd.DataFrame({"a": rng.normal(size=1200)})
    y = np.zeros(1200, dtype=int)
    y[rng.choice(np.arange(300, 1200), 30, replace=False)] = 1
    X.loc[y == 1, "a"] += 5
    result = tune_hyperparameters("robust_z", X, ["a"], y, {"contamination": [0.001, 0.2]}, n_splits=3)
    assert len(result.trials) == 2 and all(len(t["folds"]) == 3 for t in result.trials)
    assert result.best == {"contamination": 0.001} and result.best_f1 > 0.8
    with pytest.raises(DetectorError, match="labels has 5 entries"):
        tune_hyperparameters("robust_z", X, ["a"], y[:5], {"contamination": [0.01]})


@pytest.mark.django_db
def test_fleet_config_chooses_auto_and_the_model_version_records_the_choice():
    from detection.choices import RunStatus
    from detection.ingest.loader import ingest_batch
    from detection.ingest.synthetic import generate_fleet
    from detection.models import Fleet
    from detection.services import pipeline_run_create, pipeline_run_execute

    ingest_batch(batch=generate_fleet(devices=6, days=3, seed=7), fleet_name="small")
    fleet = Fleet.objects.get(name="small")
    fleet.config = {**(fleet.config or {}), "algorithm": "auto"}
    fleet.save()
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet, params={}).id)
    assert run.status == RunStatus.SUCCEEDED, run.error
    params = run.model_version.params
    assert params["algorithm"] == "auto"
    assert params["selected_members"] and params["selection_reason"]
    assert params["data_rows"] == 6 * 3 * 24


def test_score_frame_raises_severity_by_the_domains_impact_weight():
    from detection.ml.scoring import score_frame

    rng = np.random.default_rng(0)
    X = pd.DataFrame({"m": rng.normal(size=500)})
    probe = pd.DataFrame({"m": [0.0, 5.0]})
    severities = {}
    for weights in ((), (("power", 3.0),)):
        config = AnomalyDetectorConfig(min_training_rows=20, impact_weights=weights)
        det = DETECTORS["robust_z"](config).fit(X, ["m"])
        result = score_frame(det, probe, explain=probe, features=["m"], feature_metric={"m": "m"},
                             metric_domain={"m": "power"}, baselines=None)
        assert result.labels.tolist() == [1, -1]
        severities[weights] = result.severity[1]
    assert severities[()] == "medium" and severities[(("power", 3.0),)] == "critical"


def test_lstm_autoencoder_pickled_before_per_device_reading_scores_as_before():
    """Model artifacts written before 2026-11-21 hold the scaled training tail as history_, no
    pasts_, and the weights as (n_features, blob): loading one converts it."""
    X = _crafted(n=400)
    det = LSTMAutoencoderDetector(CONFIG, window=5, hidden=4, epochs=1).fit(X.iloc[:300], ["a", "b"])
    expected = det.score_samples(X.iloc[300:])
    state = det.__getstate__()
    state.pop("pasts_")
    state.pop("HISTORY")
    state["history_"] = det._scaled(det.history_)
    state["model_state_"] = (2, state["model_state_"])
    old = LSTMAutoencoderDetector.__new__(LSTMAutoencoderDetector)
    old.__setstate__(state)
    np.testing.assert_allclose(old.score_samples(X.iloc[300:]), expected, rtol=1e-4)


def _zero_inflated(n=2000, seed=5):
    """Column a: 60 % of values within 1e-4 of 0, the rest N(0, 1) (a day-over-day delta of a metric
    that is idle most of the time: its MAD is about 1e-4, not 0); column b: N(0, 1)."""
    rng = np.random.default_rng(seed)
    a = np.where(rng.random(n) < 0.6, 1e-4 * rng.normal(size=n), rng.normal(size=n))
    return pd.DataFrame({"a": a, "b": rng.normal(size=n)})


# forecast floors its error spread the same way, but Holt's level turns this series' zeros into
# non-zero errors, so its plain spread is not small here (on the demo fleet it was: F1 0.057 -> 0.109).
@pytest.mark.parametrize("name", ["robust_z", "iqr", "stl_residual"])
def test_spread_floor_keeps_a_zero_inflated_feature_from_swamping_the_score(name):
    X = _zero_inflated()
    floored = DETECTORS[name](AnomalyDetectorConfig(contamination=0.01, min_training_rows=20)).fit(X, ["a", "b"])
    plain = DETECTORS[name](AnomalyDetectorConfig(contamination=0.01, min_training_rows=20,
                                                  spread_floor="none")).fit(X, ["a", "b"])
    ordinary = pd.DataFrame({"a": [1.0], "b": [0.0]})  # one sigma of a's non-zero values
    # The plain MAD (IQR) of a is near 0, so an ordinary value scores far past a 6-sigma value of b.
    assert plain.score_samples(ordinary)[0] > 20 * plain.score_samples(pd.DataFrame({"a": [0.0], "b": [6.0]}))[0]
    assert floored.score_samples(ordinary)[0] < 5
    # A real outlier in a still stands out with the floor.
    assert floored.score_samples(pd.DataFrame({"a": [12.0], "b": [0.0]}))[0] > 3 * floored.threshold_


def test_spread_floor_is_validated_and_declared():
    with pytest.raises(DetectorError, match="spread_floor must be 'mean_ad' or 'none'"):
        AnomalyDetectorConfig(spread_floor="mad")
    for name in ("robust_z", "iqr", "stl_residual", "forecast"):
        assert detector_metadata(name)["hyperparameters"]["spread_floor"]["default"] == "mean_ad"


def test_settable_hyperparameters_are_the_schema_entries_each_constructor_takes():
    from detection.ml.detectors import check_hyperparameter, make_detector, settable_hyperparameters

    assert list(settable_hyperparameters("lstm_ae")) == ["window", "hidden", "epochs"]
    assert list(settable_hyperparameters("lof")) == ["n_neighbors"]
    assert settable_hyperparameters("robust_z") == {}  # contamination, spread_floor: settings of their own
    config = AnomalyDetectorConfig.from_mapping({"detector_params": {"grubbs": {"alpha": 0.01},
                                                                     "windowed_gaussian": {"window": 50}}})
    assert make_detector("grubbs", config).alpha == 0.01 and make_detector("windowed_gaussian", config).window == 50
    assert make_detector("grubbs").alpha == 0.05  # no params: the default
    # The config keeps the checked value: an integer parameter written 60.0 is recorded as 60.
    written = AnomalyDetectorConfig.from_mapping({"detector_params": {"windowed_gaussian": {"window": 60.0}}})
    assert written.detector_params == (("windowed_gaussian", (("window", 60),)),)
    assert type(written.params_for("windowed_gaussian")["window"]) is int
    assert check_hyperparameter("forecast", "trend", True) is True
    with pytest.raises(DetectorError, match="forecast.trend must be one of"):
        check_hyperparameter("forecast", "trend", "yes")
    with pytest.raises(DetectorError, match="grubbs.alpha must be a number, got 'low'"):
        AnomalyDetectorConfig.from_mapping({"detector_params": {"grubbs": {"alpha": "low"}}})
    with pytest.raises(DetectorError, match="detector_params must be an object"):
        AnomalyDetectorConfig.from_mapping({"detector_params": {"grubbs": 0.01}})
