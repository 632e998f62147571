"""The PatchTST-style forecasting transformer (detection.ml.transformer): it learns to forecast, its
score is the forecast error, it reads rows up to t only, it is deterministic with a seed, and it
survives the model artifact's pickle. Per-device reading is covered in test_sequences.py."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from detection.ml import suite  # noqa: F401  (registers the detectors)
from detection.ml.detectors import DETECTORS, AnomalyDetectorConfig, DetectorError, detector_metadata
from detection.ml.transformer import PatchTSTDetector

CONFIG = AnomalyDetectorConfig(contamination=0.01, min_training_rows=20)
PERIOD, TRAIN, N = 40, 600, 900
SPIKE, BREAK = 700, 800


def _series(seed=0) -> pd.DataFrame:
    """A sine (period 40) with a little noise; a spike of 3 at SPIKE and, from BREAK on, the sine
    turned upside down (a pattern change no single value betrays: it stays within [-1, 1])."""
    rng = np.random.default_rng(seed)
    t = np.arange(N)
    x = np.sin(2 * np.pi * t / PERIOD) + 0.05 * rng.normal(size=N)
    x[SPIKE] += 3
    x[BREAK:] = -np.sin(2 * np.pi * t[BREAK:] / PERIOD) + 0.05 * rng.normal(size=N - BREAK)
    return pd.DataFrame({"a": x})


@pytest.fixture(scope="module")
def fitted():
    X = _series()
    return X, PatchTSTDetector(CONFIG).fit(X.iloc[:TRAIN], ["a"])


def test_it_learns_to_forecast_better_than_the_last_value(fitted):
    X, det = fitted
    scaled = det._scaled(det._imputed(X.iloc[:TRAIN]))
    model = np.abs(det._errors(scaled)[PERIOD:, 0]).mean()
    naive = np.abs(np.diff(scaled[:, 0]))[PERIOD - 1:].mean()  # x[t] - x[t-1]
    assert det.losses_[-1] < det.losses_[0] / 2
    assert model < naive / 2, (model, naive)


def test_spike_and_pattern_break_score_above_the_threshold_normal_rows_below(fitted):
    X, det = fitted
    scores = det.score_samples(X)
    assert scores[SPIKE] > 3 * det.threshold_
    # The upside-down sine is forecast from the sine it learnt: its first rows are far off.
    assert scores[BREAK:BREAK + 10].max() > 1.5 * det.threshold_
    normal = np.r_[TRAIN:SPIKE, SPIKE + PERIOD + 2:BREAK]  # the spike stays in the context for CONTEXT rows
    normal = normal[(normal < SPIKE) | (normal >= SPIKE + det.context)]
    assert (scores[normal] > det.threshold_).mean() < 0.05


def test_scores_read_rows_up_to_t_only(fitted):
    X, det = fitted
    changed = X.copy()
    changed.loc[750:, "a"] = 50.0
    np.testing.assert_array_equal(det.score_samples(X.iloc[TRAIN:])[:150], det.score_samples(changed.iloc[TRAIN:])[:150])
    assert det.score_samples(changed.iloc[TRAIN:])[150] > 10 * det.threshold_


def test_frames_after_training_continue_from_the_training_tail(fitted):
    X, det = fitted
    # Scored alone, the rows after training get the training rows as context, so they score as
    # they do inside the full frame.
    np.testing.assert_allclose(det.score_samples(X.iloc[TRAIN:]), det.score_samples(X)[TRAIN:], rtol=1e-5)


def test_deterministic_with_a_seed_and_survives_pickle():
    X = _series().iloc[:300]
    first = PatchTSTDetector(CONFIG, epochs=2).fit(X, ["a"])
    again = PatchTSTDetector(CONFIG, epochs=2).fit(X, ["a"])
    other = PatchTSTDetector(AnomalyDetectorConfig(min_training_rows=20, random_state=7), epochs=2).fit(X, ["a"])
    np.testing.assert_array_equal(first.score_samples(X), again.score_samples(X))
    assert not np.allclose(first.score_samples(X), other.score_samples(X))
    restored = pickle.loads(pickle.dumps(first))
    np.testing.assert_allclose(restored.score_samples(X), first.score_samples(X), rtol=1e-6)
    assert restored.params()["context"] == 64 and restored.params()["epochs"] == 2


def test_bad_settings_and_too_few_rows_are_refused():
    for context in (8, 18):  # shorter than two patches; not a whole number of strides
        with pytest.raises(DetectorError, match="context"):
            PatchTSTDetector(CONFIG, context=context)
    with pytest.raises(DetectorError, match="epochs"):
        PatchTSTDetector(CONFIG, epochs=-1)
    with pytest.raises(DetectorError, match="at least 128 training values"):
        PatchTSTDetector(CONFIG).fit(_series().iloc[:50], ["a"])


def test_registered_as_experimental_and_left_out_of_the_benchmark_table():
    meta = detector_metadata("patchtst")
    assert meta["experimental"] is True and meta["family"] == "deep learning" and meta["streaming"] is True
    assert DETECTORS["patchtst"] is PatchTSTDetector
    assert not detector_metadata("lstm_ae")["experimental"]
