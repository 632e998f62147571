"""Per-device sequences: the sequential detectors and the ensemble's alarm persistence read each
device's rows (SEQUENCE_KEY) as a series of its own, continue it from the device's own training
rows, and read a frame without the key as one series, as before."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from detection import serving
from detection.ingest.loader import ingest_batch, load_telemetry_frame
from detection.ingest.synthetic import generate_fleet
from detection.ml import suite  # noqa: F401  (registers the detectors)
from detection.ml.detectors import (
    DETECTORS, HISTORY_BUDGET, HISTORY_FLOOR, SEQUENCE_KEY, AnomalyDetectorConfig, history_rows, sequence_blocks,
)
from detection.ml.features import FeatureConfig, build_features, resid_scales
from detection.ml.pipeline import PipelineConfig, model_inputs
from detection.models import AnomalyResult, Fleet
from detection.services import pipeline_run_create, pipeline_run_execute

SEQUENTIAL = ["windowed_gaussian", "stl_residual", "forecast", "nn_novelty", "patchtst", "lstm_ae"]
FEATURES = ["a", "b"]
CONFIG = AnomalyDetectorConfig(contamination=0.03)
ROWS, TRAIN = 600, 400  # rows per device, of which the first TRAIN train


def _fleet(levels=(0.0, 100.0, -50.0), seed=0) -> pd.DataFrame:
    """Devices 1, 2, ... at very different levels (unit noise), ROWS rows each, in device order."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(np.vstack([level + rng.normal(0, 1, (ROWS, 2)) for level in levels]), columns=FEATURES)
    X[SEQUENCE_KEY] = np.repeat(np.arange(1, len(levels) + 1), ROWS)
    return X


def _split(X: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    training = (X.groupby(SEQUENCE_KEY).cumcount() < TRAIN).to_numpy()
    return X[training], X[~training]


def _fit(name: str, X: pd.DataFrame, config=CONFIG, **kwargs):
    return DETECTORS[name](config, **kwargs).fit(X, FEATURES)


def _starts(X: pd.DataFrame) -> np.ndarray:
    return np.array([a for _, a, _ in sequence_blocks(X)])


def test_sequence_blocks_are_the_runs_of_one_key():
    X = pd.DataFrame({"a": range(7), SEQUENCE_KEY: [5, 5, 3, 3, 3, 5, 9]})
    assert sequence_blocks(X) == [(5, 0, 2), (3, 2, 5), (5, 5, 6), (9, 6, 7)]
    assert all(type(key) is int for key, _, _ in sequence_blocks(X))
    assert sequence_blocks(X.drop(columns=SEQUENCE_KEY)) is None
    assert sequence_blocks(X.iloc[:0]) == []


def test_history_per_device_is_bounded_over_the_fleet(monkeypatch):
    assert history_rows(1000, 3) == 1000
    assert history_rows(6400, 10_000) == HISTORY_FLOOR
    assert history_rows(1000, 1000) == HISTORY_BUDGET // 1000
    assert history_rows(4, 10_000) == 4  # never more than asked for
    monkeypatch.setattr("detection.ml.detectors.HISTORY_BUDGET", 300)
    det = _fit("nn_novelty", _fleet())  # HISTORY 6400 rows, the budget 300 rows over 3 devices
    assert {key: (len(p.tail), p.rows) for key, p in det.pasts_.items()} == {k: (100, ROWS) for k in (1, 2, 3)}
    assert np.array_equal(det.pasts_[2].tail, det._imputed(_fleet())[2 * ROWS - 100:2 * ROWS])


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_no_false_alarm_where_one_device_follows_another(name):
    X = _fleet()
    starts = _starts(X)[1:]  # the rows where device 2 and device 3 begin
    one_series = _fit(name, X[FEATURES])
    assert (one_series.score_samples(X[FEATURES])[starts] > one_series.threshold_).any()  # the old reading
    det = _fit(name, X)
    scores = det.score_samples(X)
    assert not (scores[starts] > det.threshold_).any()
    if name != "nn_novelty":  # its novelty falls as any new series fills (the first device's rows too)
        early = np.concatenate([scores[a:a + 20] for a in starts])
        assert (early > det.threshold_).mean() <= 0.1  # no more than chance right after a boundary


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_a_device_scores_the_same_with_or_without_another_device_before_it(name):
    train, test = _split(_fleet())
    det = _fit(name, train)
    fleet = det.score_samples(test)
    for key in (2, 3):
        alone = test[test[SEQUENCE_KEY] == key]
        assert np.array_equal(det.score_samples(alone), fleet[(test[SEQUENCE_KEY] == key).to_numpy()])
    # A device training never saw starts its own series, whatever comes before it.
    new = _fleet(levels=(500.0,), seed=9).assign(**{SEQUENCE_KEY: 99})
    after = pd.concat([test, new], ignore_index=True)
    assert np.array_equal(det.score_samples(new), det.score_samples(after)[len(test):])


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_scoring_after_training_continues_each_device_from_its_own_training_rows(name):
    X = _fleet()
    train, test = _split(X)
    det = _fit(name, train)
    continued = det.score_samples(X)[(X.groupby(SEQUENCE_KEY).cumcount() >= TRAIN).to_numpy()]
    assert np.allclose(det.score_samples(test), continued, rtol=1e-12, atol=1e-12)
    assert not (det.score_samples(test)[_starts(test)] > det.threshold_).any()


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_one_device_with_the_key_scores_as_the_same_series_without_it(name):
    X = _fleet(levels=(3.0,))
    keyed, plain = _fit(name, X), _fit(name, X[FEATURES])
    scores = plain.score_samples(X[FEATURES])
    assert np.array_equal(keyed.score_samples(X), scores)
    # The one difference: per device, the first WARMUP_ROWS training rows do not set the threshold.
    warm = keyed.WARMUP_ROWS
    assert keyed.threshold_ == np.quantile(scores[warm:], 1 - keyed.config.contamination)
    assert plain.threshold_ == np.quantile(scores, 1 - plain.config.contamination)
    if name != "forecast":  # forecast: the key-less series restarts from the first row's level (kept as it was)
        train, test = _split(X)
        keyed, plain = _fit(name, train), _fit(name, train[FEATURES])
        assert np.array_equal(keyed.score_samples(test), plain.score_samples(test[FEATURES]))


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_a_model_fitted_per_device_reads_a_frame_without_the_key_as_one_series(name):
    train, test = _split(_fleet())
    keyed, plain = _fit(name, train), _fit(name, train[FEATURES])
    assert keyed.history_.shape == plain.history_.shape and np.array_equal(keyed.history_, plain.history_)
    if name in ("windowed_gaussian", "nn_novelty"):  # their fit reads no device boundary
        assert np.array_equal(keyed.score_samples(test[FEATURES]), plain.score_samples(test[FEATURES]))
    assert np.isfinite(keyed.score_samples(test[FEATURES])).all()


# --- the ensemble's alarm persistence --------------------------------------------------------------

def _ensemble(smooth=5):
    return DETECTORS["ensemble"](AnomalyDetectorConfig(contamination=0.03, ensemble_smooth_rows=smooth),
                                 members=("robust_z",))


def test_ensemble_persistence_does_not_carry_an_alarm_into_the_next_device():
    X = _fleet(levels=(0.0, 0.0, 0.0))
    train, test = _split(X)
    test = test.copy()
    ends = np.flatnonzero(np.diff(test[SEQUENCE_KEY].to_numpy())) + 1  # first rows of devices 2 and 3
    for end in ends:
        test.iloc[end - 6:end, 0] = 40.0  # each device ends in an anomaly
    starts = _starts(test)[1:]
    plain = _ensemble().fit(train[FEATURES], FEATURES)
    assert (plain.score_samples(test[FEATURES])[starts] > plain.threshold_).all()  # the old reading
    det = _ensemble().fit(train, FEATURES)
    scores = det.score_samples(test)
    assert (scores[ends - 1] > det.threshold_).all()  # the anomalies themselves are flagged
    assert not (scores[starts] > det.threshold_).any()
    for key in (2, 3):
        rows = (test[SEQUENCE_KEY] == key).to_numpy()
        assert np.array_equal(det.score_samples(test[rows]), scores[rows])


def test_ensemble_history_is_each_devices_own_and_the_threshold_unchanged():
    X = _fleet(levels=(0.0, 4.0, -3.0))
    train, test = _split(X)
    det = _ensemble().fit(train, FEATURES)
    assert set(det.pasts_) == {1, 2, 3} and all(len(p[2]) == 4 for p in det.pasts_.values())
    continued = det.score_samples(X)[(X.groupby(SEQUENCE_KEY).cumcount() >= TRAIN).to_numpy()]
    assert np.array_equal(det.score_samples(test), continued)
    # The threshold is the one-series rule's, as measured (see EnsembleDetector.fit).
    assert det.threshold_ == _ensemble().fit(train[FEATURES], FEATURES).threshold_


def test_ensemble_without_persistence_ignores_the_key():
    train, test = _split(_fleet(levels=(0.0, 2.0)))
    keyed, plain = _ensemble(smooth=1).fit(train, FEATURES), _ensemble(smooth=1).fit(train[FEATURES], FEATURES)
    assert np.array_equal(keyed.score_samples(test), plain.score_samples(test[FEATURES]))


# --- the pipeline and serving ----------------------------------------------------------------------

def test_model_inputs_carry_the_device_key_but_never_as_a_feature():
    batch = generate_fleet(devices=3, days=2, seed=1)
    df = batch.telemetry.merge(batch.devices, on="external_id").sort_values(["external_id", "timestamp"])
    df = df.assign(device_id=df["external_id"].rank(method="dense").astype(int)).reset_index(drop=True)
    metrics = ["battery_level", "cpu_pct"]
    config = PipelineConfig(features=FeatureConfig(resid_scale=resid_scales(df, metrics)))
    ff = build_features(df, metrics, config.features)
    frame, features, temporal = model_inputs(ff.frame, baselines=None, usable=ff.model_features, metrics=metrics,
                                             config=config)
    assert SEQUENCE_KEY in frame.columns and SEQUENCE_KEY not in features and SEQUENCE_KEY not in temporal
    assert (frame[SEQUENCE_KEY] == df[SEQUENCE_KEY]).all()


def _fleet_run(name: str, algorithm: str, **params):
    fleet = Fleet.objects.get(name=name)
    fleet.config = {"algorithm": algorithm, "ensemble_members": ["windowed_gaussian", "robust_z"],
                    "ensemble_smooth_rows": 5}
    fleet.save(update_fields=["config"])
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet, params=params).id)
    assert run.model_version_id, run.error
    return fleet, run


def _scores(run) -> dict:
    return {(r.device_id, r.timestamp): r.anomaly_score for r in AnomalyResult.objects.filter(run=run)}


@pytest.mark.django_db
@pytest.mark.parametrize("algorithm", ["windowed_gaussian", "forecast", "ensemble"])
def test_pipeline_scores_after_training_as_the_continuation_of_each_devices_training(algorithm):
    ingest_batch(batch=generate_fleet(devices=6, days=4, seed=3), fleet_name="seq")
    window = {"train_rows_per_device": 48}
    _, whole = _fleet_run("seq", algorithm, **window)
    _, after = _fleet_run("seq", algorithm, **window, score="after_training")
    assert whole.threshold == pytest.approx(after.threshold, rel=1e-12)
    everything, later = _scores(whole), _scores(after)
    assert len(later) == 6 * (4 * 24 - 48)
    for key, score in later.items():
        assert math.isclose(score, everything[key], rel_tol=1e-9, abs_tol=1e-9), key


@pytest.mark.django_db
def test_serving_continues_each_device_from_its_own_training_rows():
    serving.model_cache_clear()
    ingest_batch(batch=generate_fleet(devices=6, days=4, seed=3), fleet_name="seq-serving")
    fleet, run = _fleet_run("seq-serving", "windowed_gaussian", train_rows_per_device=48, score="after_training")
    frame = load_telemetry_frame(fleet)
    firsts = frame.groupby("device_id").nth(48)  # each device's first row after its training rows
    assert len(firsts) == 6
    try:
        for row in firsts.itertuples():
            result = AnomalyResult.objects.select_related("device").get(run=run, device_id=row.device_id,
                                                                        timestamp=row.timestamp)
            row = row._asdict()
            observation = {"device_id": result.device.external_id, "timestamp": result.timestamp,
                           "metrics": {m: (None if np.isnan(row[m]) else float(row[m])) for m in fleet.metric_names}}
            got = serving.detect_observations(fleet=fleet, observations=[observation])[0]
            assert math.isclose(got["anomaly_score"], result.anomaly_score, rel_tol=1e-9, abs_tol=1e-9)
    finally:
        serving.model_cache_clear()


def test_a_sampled_training_set_takes_the_plain_quantile_without_the_warm_up(monkeypatch):
    # Above THRESHOLD_SAMPLE rows fit scores a random sample: its rows have no position in their
    # device, so the warm-up (a device's first WARMUP_ROWS rows) cannot be told and is not applied.
    cls = DETECTORS["windowed_gaussian"]
    X = _fleet()
    monkeypatch.setattr(cls, "THRESHOLD_SAMPLE", len(X) - 1)
    detector = _fit("windowed_gaussian", X)
    sample = detector._threshold_rows(X)
    assert len(sample) == len(X) - 1
    assert detector.threshold_ == np.quantile(detector.score_samples(sample), 1 - detector.config.contamination)
