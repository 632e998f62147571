"""nn_novelty on crafted series (what is new scores high, what was seen before scores low, nothing looks
ahead) and the "top" and "ratio" calibrations of evaluate_nab (ratio_wait is nn_novelty's own)."""
import numpy as np
import pandas as pd
import pytest

from detection import evaluation
from detection.evaluation import EvaluationError, evaluate_nab, nab_suppress_rows
from detection.ml import suite  # noqa: F401  (registers the detectors)
from detection.ml.detectors import DETECTORS, AnomalyDetectorConfig, DetectorError, detector_metadata
from detection.ml.nab import streaming_order_ratio, streaming_rank, streaming_top_rank
from detection.ml.novelty import NearestNeighbourNoveltyDetector, nn_novelty, raw_metric_columns


def _noise(n=600, seed=0):
    return np.random.default_rng(seed).normal(size=n)


def test_a_spike_taller_than_any_before_is_novel_and_its_repeat_is_not():
    x = _noise()
    x[300] += 12.0
    x[450] += 12.0  # the same spike again
    score = nn_novelty(x)
    quiet = np.percentile(score[100:300], 99)
    assert score[300] > 3 * quiet
    assert score[450] < score[300] / 3


def test_only_the_first_rows_of_a_new_level_are_novel():
    x = _noise()
    x[400:] += 8.0
    score = nn_novelty(x)
    assert score[400] == score[350:].max()
    assert score[450:].max() < score[400] / 3  # the new level, once seen, is ordinary


def test_a_recurring_pattern_far_from_the_mean_stops_being_novel():
    # A daily batch job: a tall plateau every 100 rows. The first one is new, the later ones are not.
    x = 0.1 * _noise(1000)
    for start in range(50, 1000, 100):
        x[start:start + 5] += 10.0
    score = nn_novelty(x)
    assert score[50] > 5 * score[[650, 750, 850, 950]].max()


def test_scores_do_not_depend_on_the_unit_or_offset():
    x = _noise()
    x[300] += 6.0
    np.testing.assert_allclose(nn_novelty(1000.0 * x - 42.0), nn_novelty(x), rtol=1e-9, atol=1e-12)


def test_no_row_reads_a_later_one():
    x = _noise()
    x[250:] += 3.0
    full = nn_novelty(x)
    np.testing.assert_allclose(nn_novelty(x[:260]), full[:260])


def test_begin_only_skips_the_history_rows():
    x = _noise()
    full, tail = nn_novelty(x), nn_novelty(x, begin=400)
    np.testing.assert_allclose(tail[400:], full[400:])
    assert not tail[:400].any()


def test_the_window_bounds_what_counts_as_seen():
    x = 0.1 * _noise(800)
    x[100] += 10.0
    x[700] += 10.0  # 600 rows later
    assert nn_novelty(x, window=1000)[700] < 0.2 * nn_novelty(x, window=200)[700]


def test_by_default_a_pattern_seen_ten_thousand_rows_earlier_is_not_novel_again():
    # NAB's longest files run to 22,695 rows; the default search covers them whole.
    x = 0.1 * _noise(11_000)
    x[100] += 10.0
    x[10_900] += 10.0
    assert nn_novelty(x)[10_900] < 0.2 * nn_novelty(x, window=6400)[10_900]


def test_a_flat_series_then_a_change_gives_a_finite_high_score():
    x = np.zeros(300)
    x[200:] = 1.0
    score = nn_novelty(x)
    assert np.isfinite(score).all() and score[200] > 1e6 and score[:200].max() == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        nn_novelty(np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="at least 1"):
        nn_novelty(_noise(), lengths=0)
    assert nn_novelty(np.array([1.0, 2.0])).tolist() == [0.0, 0.0]
    with pytest.raises(DetectorError, match="columns"):
        NearestNeighbourNoveltyDetector(columns="some")


def test_only_the_metric_columns_are_scored_not_their_engineered_variants():
    features = ["value_z_device", "value_roll_mean_z_device", "value_roll_std_z_device", "value_delta_z_device",
                "cpu", "cpu_resid"]
    assert raw_metric_columns(features) == [0, 4]
    assert raw_metric_columns(["value_roll_mean", "value_delta"]) == [0, 1]  # none plain: every column


def test_detector_scores_a_frame_after_training_from_the_training_rows_history():
    rng = np.random.default_rng(3)
    n = 900
    X = pd.DataFrame({"value_z_device": rng.normal(size=n), "value_roll_mean_z_device": rng.normal(size=n)})
    X.loc[700, "value_z_device"] += 15.0
    X.loc[800, "value_roll_mean_z_device"] += 50.0  # an engineered column: not scored
    det = DETECTORS["nn_novelty"](AnomalyDetectorConfig(contamination=0.01, min_training_rows=20))
    det.fit(X.iloc[:600], list(X.columns))
    assert det.columns_ == [0]
    later = det.score_samples(X.iloc[600:])
    assert later[100] > det.threshold_ and later[200] < det.threshold_
    # Scoring the whole frame (it starts with the training rows) gives the same scores for the later rows.
    np.testing.assert_allclose(det.score_samples(X)[600:], later)
    np.testing.assert_allclose(det.score_samples(X.iloc[600:750]), later[:150])


def test_metadata_declares_a_streaming_univariate_distance_detector():
    meta = detector_metadata("nn_novelty")
    assert meta["family"] == "distance" and meta["streaming"] and not meta["multivariate"]
    assert meta["hyperparameters"]["lengths"]["default"] == 3


# --- the "top" calibration and evaluate_nab ----------------------------------------------------

def test_streaming_top_rank_counts_the_earlier_scores_at_least_as_high():
    scores = np.array([5.0, 1.0, 3.0, 3.0, np.nan, 9.0, 0.5, 3.0])
    top = streaming_top_rank(scores, 2)  # rows 0-1 are the reference
    assert np.isnan(top[:2]).all() and np.isnan(top[4])
    # row 2: 3 against {5, 1} -> one at least as high; row 3: 3 against {5, 1, 3} -> two (ties count);
    # row 5: a new maximum; row 6: every earlier score is higher; row 7: 3 against {5, 1, 3, 3, 9, 0.5}.
    np.testing.assert_allclose(top[[2, 3, 5, 6, 7]], [1 / 2, 1 / 3, 1.0, 1 / 6, 1 / 5])


def test_streaming_top_rank_bar_does_not_fall_with_the_length_of_the_history():
    # The rank of the 10th-highest score of a history approaches 1 as the history grows; its top rank stays.
    short, long = np.arange(100.0), np.arange(10000.0)
    for history in (short, long):
        probe = np.r_[history, history[-10]]
        assert streaming_top_rank(probe, len(history))[-1] == pytest.approx(1 / 11)
    assert streaming_rank(np.r_[long, long[-10]], len(long))[-1] > streaming_rank(np.r_[short, short[-10]], 100)[-1]


# --- the "ratio" calibration ---------------------------------------------------------------------

def test_streaming_order_ratio_divides_by_the_geometric_mean_of_the_chosen_ranks():
    scores = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 3.0, np.nan, 100.0])
    ratio = streaming_order_ratio(scores, 5, ranks=(2, 4))  # rows 0-4 are the reference
    assert np.isnan(ratio[:5]).all() and np.isnan(ratio[6])
    # row 5: ranks 2-4 of {16, 8, 4, 2, 1} are 8, 4, 2 (geometric mean 4); row 7: of {16, 8, 4, 3, 2, 1}
    # they are 8, 4, 3 (the NaN of row 6 is not remembered).
    np.testing.assert_allclose(ratio[[5, 7]], [3 / 4, 100 / (8 * 4 * 3) ** (1 / 3)])


def test_streaming_order_ratio_uses_what_there_is_while_the_history_is_short():
    scores = np.array([2.0, 8.0, 4.0, 6.0])
    ratio = streaming_order_ratio(scores, 0, ranks=(2, 3))
    # row 0: nothing earlier; row 1: fewer than 2 earlier, the lowest (2); row 2: ranks 2-3 of {8, 2}
    # is 2 alone; row 3: ranks 2-3 of {8, 4, 2} are 4 and 2.
    assert np.isnan(ratio[0])
    np.testing.assert_allclose(ratio[1:], [8 / 2, 4 / 2, 6 / np.sqrt(8)])


def test_streaming_order_ratio_does_not_depend_on_the_unit_and_tells_a_tall_spike_from_noise():
    rng = np.random.default_rng(3)
    scores = rng.exponential(size=500)
    scores[400] = 40.0
    ratio = streaming_order_ratio(scores, 100)
    np.testing.assert_allclose(streaming_order_ratio(1000.0 * scores, 100), ratio)
    assert ratio[400] > 5 and np.nanmax(np.delete(ratio[100:], 300)) < 2
    # A spike only a little above the earlier top scores is a new maximum all the same: the top rank
    # gives it 1 like the tall one, the ratio does not.
    mild = scores.copy()
    mild[400] = np.sort(scores[:400])[-1] * 1.01
    assert streaming_top_rank(mild, 100)[400] == streaming_top_rank(scores, 100)[400] == 1.0
    assert streaming_order_ratio(mild, 100)[400] < ratio[400] / 5


def test_streaming_order_ratio_refuses_ranks_out_of_order():
    with pytest.raises(ValueError, match="ranks"):
        streaming_order_ratio(np.ones(5), 1, ranks=(9, 8))
    with pytest.raises(ValueError, match="ranks"):
        streaming_order_ratio(np.ones(5), 1, ranks=(0, 8))


def test_suppression_window_is_the_detectors_own_unless_the_environment_names_one(monkeypatch):
    assert nab_suppress_rows("nn_novelty") == 20 and nab_suppress_rows("robust_z") == 50
    monkeypatch.setattr(evaluation, "_NAB_SUPPRESS_OVERRIDE", "30")
    assert nab_suppress_rows("nn_novelty") == nab_suppress_rows("robust_z") == 30
    monkeypatch.setattr(evaluation, "_NAB_SUPPRESS_OVERRIDE", "0")
    with pytest.raises(EvaluationError, match="VIGIL_NAB_SUPPRESS_ROWS"):
        nab_suppress_rows("nn_novelty")


@pytest.mark.django_db
def test_evaluate_nab_uses_the_detectors_own_calibration_unless_told(shared_data, tmp_path):
    from tests.test_evaluation import _nab_layout

    root = _nab_layout(tmp_path / "nab", shared_data)
    novelty = evaluate_nab(path=root, config={"algorithm": "nn_novelty"})
    assert novelty.calibration == "ratio_wait" and novelty.as_dict()["calibration"] == "ratio_wait"
    assert novelty.suppress_rows == 20 and novelty.as_dict()["suppress_rows"] == 20
    # Measured: both windows detected (the shift at its first row, the spike mid-window).
    assert novelty.profiles["standard"].detected_windows == 2
    assert evaluate_nab(path=root, config={"algorithm": "robust_z"}).calibration == "rank_wait"
    told = evaluate_nab(path=root, config={"algorithm": "nn_novelty"}, calibration="rank")
    assert told.calibration == "rank" and told.suppress_rows is None
    with pytest.raises(EvaluationError, match="calibration must be one of"):
        evaluate_nab(path=root, config={"algorithm": "nn_novelty"}, calibration="nope")


@pytest.mark.django_db
def test_the_raw_scores_kept_by_evaluate_nab_recalibrate_to_its_own_result(shared_data, tmp_path):
    # benchmarks/nab_transfer.py re-calibrates these raw scores instead of re-running the detector;
    # that is only sound if they give back exactly what evaluate_nab scored.
    from detection.ml.nab import load_profiles, nab_score, probationary_length
    from tests.test_evaluation import _nab_layout

    root = _nab_layout(tmp_path / "nab", shared_data)
    result = evaluate_nab(path=root, config={"algorithm": "nn_novelty"})
    assert [s.name for s in result.raw_series] == list(result.per_file)
    for s in result.raw_series:  # every row, the probationary ones in-sample
        assert not np.isnan(s.scores).any() and len(s.scores) == result.per_file[s.name]["rows"]
    again = [type(s)(s.name, s.timestamps, evaluation.nab_calibrated(
        s.scores, probationary_length(len(s.scores)), "ratio_wait", 20), s.windows) for s in result.raw_series]
    rescored = nab_score(again, load_profiles(root / "config" / "profiles.json"), wait=20)
    for name, profile in result.profiles.items():
        assert rescored[name].score == pytest.approx(profile.score)
        assert rescored[name].threshold == pytest.approx(profile.threshold)
    # Another calibration of the same raw scores is another result (the function does calibrate).
    ranked = [type(s)(s.name, s.timestamps, evaluation.nab_calibrated(
        s.scores, probationary_length(len(s.scores)), "rank", 20), s.windows) for s in result.raw_series]
    assert nab_score(ranked, load_profiles(root / "config" / "profiles.json"))["standard"].threshold <= 1.0
    assert result.profiles["standard"].threshold != pytest.approx(
        nab_score(ranked, load_profiles(root / "config" / "profiles.json"))["standard"].threshold)
