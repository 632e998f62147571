"""NAB scoring rules on hand-worked examples (Lavin & Ahmad 2015; numenta/NAB nab/sweeper.py).

Arithmetic used throughout: scaled_sigmoid(y) = 2 / (1 + exp(5 y)) - 1 = tanh(-2.5 y), so
scaled_sigmoid(-1) = tanh(2.5) = 0.9866143, and a true positive earns
A_tp * scaled_sigmoid(y) / 0.9866143.
"""
import math

import numpy as np
import pandas as pd
import pytest

from detection.ml.nab import (
    CostMatrix,
    NabError,
    NabSeries,
    load_profiles,
    nab_score,
    normalised_score,
    probationary_length,
    refractory,
    scaled_sigmoid,
    suppress_repeats,
    score_detections,
    streaming_rank,
    sweep,
    window_bounds,
)

STANDARD = CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=1.0)
LOW_FP = CostMatrix(tp_weight=1.0, fp_weight=0.22, fn_weight=1.0)
LOW_FN = CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0)
MAX_TP = math.tanh(2.5)  # scaled_sigmoid(-1) = 0.98661429815


def stamps(n: int) -> pd.DatetimeIndex:
    return pd.date_range("2024-01-01", periods=n, freq="5min")


def window(ts, left: int, right: int) -> tuple:
    return (ts[left], ts[right])


def detections(n: int, *rows: int) -> np.ndarray:
    d = np.zeros(n, dtype=bool)
    d[list(rows)] = True
    return d


# 1000 rows: probationary period floor(0.15 * 1000) = 150 rows; one window on rows 500..599 (W = 100).
N = 1000
TS = stamps(N)
WIN = [window(TS, 500, 599)]


def test_probationary_length_is_15_percent_capped_at_750_rows():
    assert probationary_length(100) == 15        # floor(15.0)
    assert probationary_length(4032) == 604      # floor(604.8)
    assert probationary_length(5000) == 750      # floor(750.0) = 15 % of 5000
    assert probationary_length(20000) == 750     # 3000 capped at 750


def test_scaled_sigmoid_values():
    assert float(scaled_sigmoid(-1.0)) == pytest.approx(0.9866143, abs=1e-7)  # 2/(1+e^-5) - 1
    assert float(scaled_sigmoid(0.0)) == 0.0                                  # 2/(1+1) - 1
    assert float(scaled_sigmoid(3.0)) == pytest.approx(-0.9999994, abs=1e-7)  # 2/(1+e^15) - 1
    assert float(scaled_sigmoid(3.01)) == -1.0                                # beyond 3: -1 flat


def test_detection_at_window_start_earns_the_full_tp_weight():
    # Row 500: y = -(599 - 500 + 1) / 100 = -1 -> 1.0 * scaled_sigmoid(-1) / scaled_sigmoid(-1) = 1.0
    s = score_detections(TS, detections(N, 500), WIN, STANDARD)
    assert s.raw == pytest.approx(1.0) and (s.detected, s.false_positives) == (1, 0)


def test_detection_at_window_end_earns_almost_nothing():
    # Row 599: y = -(599 - 599 + 1) / 100 = -0.01 -> tanh(0.025) / tanh(2.5) = 0.0249948 / 0.9866143 = 0.025334
    s = score_detections(TS, detections(N, 599), WIN, STANDARD)
    assert s.raw == pytest.approx(0.0249948 / MAX_TP, abs=1e-6)
    assert s.raw == pytest.approx(0.025334, abs=1e-5)


def test_only_the_first_detection_in_a_window_counts():
    # Rows 550 and 500 both detect; 500 (y = -1) earns 1.0, 550 (y = -0.5) is ignored, not added.
    s = score_detections(TS, detections(N, 500, 550, 599), WIN, STANDARD)
    assert s.raw == pytest.approx(1.0)
    # The middle row alone: y = -(599 - 550 + 1) / 100 = -0.5 -> tanh(1.25) / tanh(2.5) = 0.8482836 / 0.9866143
    assert score_detections(TS, detections(N, 550), WIN, STANDARD).raw == pytest.approx(0.8597924, abs=1e-6)


def test_a_missed_window_costs_the_fn_weight():
    nothing = np.zeros(N, dtype=bool)
    assert score_detections(TS, nothing, WIN, STANDARD).raw == pytest.approx(-1.0)   # -A_fn
    assert score_detections(TS, nothing, WIN, LOW_FN).raw == pytest.approx(-2.0)     # -A_fn, FN profile


def test_false_positive_right_after_a_window_costs_less_than_one_far_away():
    # The window is detected at its start (1.0) each time, so only the FP's cost differs.
    # Row 600: y = (600 - 599) / (100 - 1) = 0.010101 -> tanh(-0.0252525) * 0.11 = -0.0252472 * 0.11 = -0.0027772
    near = score_detections(TS, detections(N, 500, 600), WIN, STANDARD)
    assert near.raw == pytest.approx(1.0 - 0.0027772, abs=1e-6)
    # Row 950: y = 351 / 99 = 3.545 > 3 -> -1 * 0.11
    far = score_detections(TS, detections(N, 500, 950), WIN, STANDARD)
    assert far.raw == pytest.approx(1.0 - 0.11)
    # Row 700: y = 101 / 99 = 1.0202 -> tanh(-2.5505) * 0.11 = -0.9878926 * 0.11 = -0.1086682
    mid = score_detections(TS, detections(N, 500, 700), WIN, STANDARD)
    assert mid.raw == pytest.approx(1.0 - 0.1086682, abs=1e-6)
    assert far.raw < mid.raw < near.raw
    assert (near.false_positives, far.false_positives) == (1, 1)


def test_false_positive_before_any_window_costs_the_full_fp_weight():
    # Row 200 precedes the only window: -1 * A_fp; the window is missed: -A_fn.
    assert score_detections(TS, detections(N, 200), WIN, STANDARD).raw == pytest.approx(-1.0 - 0.11)
    assert score_detections(TS, detections(N, 200), WIN, LOW_FP).raw == pytest.approx(-1.0 - 0.22)


def test_probationary_rows_are_not_scored():
    # Row 149 is the last probationary row (150 rows): its "FP" is ignored; row 150 is scored.
    assert score_detections(TS, detections(N, 149), WIN, STANDARD).raw == pytest.approx(-1.0)
    assert score_detections(TS, detections(N, 150), WIN, STANDARD).raw == pytest.approx(-1.0 - 0.11)
    # A window wholly inside the probationary rows is not counted at all: missing it costs nothing.
    early = [window(TS, 50, 80), *WIN]
    s = score_detections(TS, detections(N, 60), early, STANDARD)
    assert (s.windows, s.raw) == (1, pytest.approx(-1.0))
    # The cap: 10,000 rows -> 750 probationary rows (not 1500).
    ts = stamps(10_000)
    assert score_detections(ts, detections(10_000, 749), [], STANDARD).raw == 0.0
    assert score_detections(ts, detections(10_000, 750), [], STANDARD).raw == pytest.approx(-0.11)


def test_window_bounds_are_inclusive_row_ranges():
    assert window_bounds(TS, WIN) == [(500, 599)]
    # Bounds between samples snap inwards; a window between two samples holds no row and is dropped.
    between = (TS[10] + pd.Timedelta("1min"), TS[20] - pd.Timedelta("1min"))
    assert window_bounds(TS, [between]) == [(11, 19)]
    assert window_bounds(TS, [(TS[3] + pd.Timedelta("1min"), TS[3] + pd.Timedelta("2min"))]) == []
    with pytest.raises(NabError, match="overlaps"):
        window_bounds(TS, [window(TS, 10, 20), window(TS, 20, 30)])
    with pytest.raises(NabError, match="ends before"):
        window_bounds(TS, [(TS[20], TS[10])])


def _crafted_corpus() -> list[NabSeries]:
    """File a: window 500..599, a score of 0.8 at its first row, twenty 0.7 spikes at rows 200..219
    (before the window: each a full FP). File b: window 300..399, 0.6 at row 350 (y = -0.5).
    Every other row scores 0.1."""
    a, b = np.full(N, 0.1), np.full(N, 0.1)
    a[500], a[200:220], b[350] = 0.8, 0.7, 0.6
    return [NabSeries("a", TS, a, WIN), NabSeries("b", TS, b, [window(TS, 300, 399)])]


def test_threshold_sweep_on_a_crafted_corpus():
    # Standard (A_tp 1, A_fp 0.11, A_fn 1), two windows:
    #   +inf: both missed                      -> -2
    #   0.8 : a detected at its start (1.0), b missed (-1)   -> 0.0
    #   0.7 : + 20 FPs before a's window (20 * -0.11 = -2.2) -> -2.2
    #   0.6 : + b at y = -0.5 (0.8597924) instead of -1      -> -2.2 + 1.8597924 = -0.3402076
    #   0.1 : every scored row detects: far below
    by_threshold = {t.threshold: t for t in sweep(_crafted_corpus(), STANDARD)}
    assert by_threshold[math.inf].raw == pytest.approx(-2.0)
    assert by_threshold[0.8].raw == pytest.approx(0.0)
    assert by_threshold[0.7].raw == pytest.approx(-2.2)
    assert by_threshold[0.6].raw == pytest.approx(-0.3402076, abs=1e-6)
    assert by_threshold[0.1].raw < -50
    assert (by_threshold[0.6].detected_windows, by_threshold[0.6].false_positives) == (2, 20)


def test_each_profile_gets_its_own_optimal_threshold():
    result = nab_score(_crafted_corpus(), {"standard": STANDARD, "reward_low_FP_rate": LOW_FP,
                                           "reward_low_FN_rate": LOW_FN})
    std, low_fp, low_fn = result["standard"], result["reward_low_FP_rate"], result["reward_low_FN_rate"]
    # Standard: best is 0.8 (raw 0.0); null = -2, perfect = 2 -> 100 * (0 + 2) / (2 + 2) = 50
    assert (std.threshold, std.raw, std.score) == (0.8, pytest.approx(0.0), pytest.approx(50.0))
    # Low FP (A_fp 0.22): 0.6 gives -4.4 + 1.8597924 = -2.5402 < 0.0 at 0.8 -> 0.8, score 50 again
    assert (low_fp.threshold, low_fp.score) == (0.8, pytest.approx(50.0))
    # Low FN (A_fn 2): 0.8 -> 1 - 2 = -1; 0.6 -> -1 - 2.2 + (0.8597924 + 2) = -0.3402076 -> 0.6 wins;
    # null = -4, perfect = 2 -> 100 * (-0.3402076 + 4) / 6 = 60.99654
    assert low_fn.threshold == 0.6
    assert low_fn.score == pytest.approx(60.99654, abs=1e-4)
    assert low_fn.per_file["b"].raw == pytest.approx(0.8597924, abs=1e-6)
    assert low_fn.per_file["a"].raw == pytest.approx(1.0 - 2.2)


def test_null_detector_scores_0_and_perfect_detector_100():
    corpus = _crafted_corpus()
    null = [NabSeries(s.name, s.timestamps, np.full(N, 0.5), s.windows) for s in corpus]
    perfect = []
    for s in corpus:
        scores = np.zeros(N)
        for left, _ in window_bounds(s.timestamps, s.windows):
            scores[left] = 1.0
        perfect.append(NabSeries(s.name, s.timestamps, scores, s.windows))
    for profiles in ({"standard": STANDARD}, {"low_fp": LOW_FP}, {"low_fn": LOW_FN}):
        (name, cost), = profiles.items()
        # A constant score: detecting everywhere loses hundreds of FPs, so the optimum is never to detect.
        assert nab_score(null, profiles)[name].score == pytest.approx(0.0)
        assert math.isinf(nab_score(null, profiles)[name].threshold)
        assert nab_score(perfect, profiles)[name].score == pytest.approx(100.0)


def test_sweep_matches_scoring_each_threshold_one_by_one():
    rng = np.random.default_rng(3)
    corpus = []
    for k in range(3):
        n = 600 + 50 * k
        ts = stamps(n)
        scores = np.round(rng.random(n), 2)  # rounding makes ties
        scores[rng.integers(0, n, 5)] = np.nan
        corpus.append(NabSeries(f"f{k}", ts, scores, [window(ts, 200, 260), window(ts, 400 + k, 450)]))
    for cost in (STANDARD, LOW_FP, LOW_FN):
        for t in sweep(corpus, cost)[::7]:
            one_by_one = sum(score_detections(s.timestamps, s.scores >= t.threshold, s.windows, cost).raw
                             for s in corpus)
            assert t.raw == pytest.approx(one_by_one, abs=1e-9)


def test_refractory_keeps_a_detection_only_when_none_of_the_wait_before_it_was_kept():
    d = detections(20, 2, 3, 4, 5, 6, 9, 12, 13)
    # wait 3: 2 kept; 3-5 within 3 rows of it; 6 is 4 rows after 2 -> kept; 9 is 3 after 6 -> dropped
    # (a dropped row silences nothing); 12 is 6 after 6 -> kept; 13 dropped.
    assert np.flatnonzero(refractory(d, 3)).tolist() == [2, 6, 12]
    assert np.flatnonzero(refractory(d, 1)).tolist() == [2, 4, 6, 9, 12]
    assert (refractory(d, 0) == d).all()
    with pytest.raises(ValueError, match="wait must be at least 0"):
        refractory(d, -1)


def test_sweep_with_a_wait_on_a_crafted_corpus():
    # One window on rows 500..599 (W = 100), standard profile. A rising score 0.5, 0.6, 0.7 on rows
    # 300-302 (before the window: each detection costs the full -0.11) and 0.9 on row 510 (y = -0.9).
    scores = np.zeros(N)
    scores[[300, 301, 302]] = [0.5, 0.6, 0.7]
    scores[510] = 0.9
    corpus = [NabSeries("a", TS, scores, WIN)]
    tp = float(scaled_sigmoid(-0.9)) / MAX_TP  # 0.9788... / 0.9866... = 0.99212
    plain = {t.threshold: t for t in sweep(corpus, STANDARD)}
    waited = {t.threshold: t for t in sweep(corpus, STANDARD, wait=5)}
    # Without a wait, every row of the rise is a false positive: 0.5 -> tp - 3 * 0.11.
    assert plain[0.5].raw == pytest.approx(tp - 0.33) and plain[0.5].false_positives == 3
    # With a wait of 5 rows the first row of the rise silences the other two: tp - 0.11 at 0.5;
    # at 0.6 row 301 fires first and silences 302.
    assert waited[0.5].raw == pytest.approx(tp - 0.11) and waited[0.5].false_positives == 1
    assert waited[0.6].raw == pytest.approx(tp - 0.11) and waited[0.6].detections == 2
    assert waited[0.9].raw == pytest.approx(tp) and waited[math.inf].raw == pytest.approx(-1.0)
    result = nab_score(corpus, {"standard": STANDARD}, wait=5)["standard"]
    assert result.threshold == 0.9 and result.per_file["a"].false_positives == 0
    # A wait that reaches the window silences its detection: 0.5 then misses it (-1 - 0.11).
    near = scores.copy()
    near[[300, 301, 302]] = 0.0
    near[505] = 0.5
    assert {t.threshold: t for t in sweep([NabSeries("a", TS, near, WIN)], STANDARD, wait=10)}[0.5].raw \
        == pytest.approx(float(scaled_sigmoid(-0.95)) / MAX_TP)
    with pytest.raises(ValueError, match="wait must be at least 0"):
        sweep(corpus, STANDARD, wait=-1)


def test_sweep_with_a_wait_matches_scoring_each_threshold_one_by_one():
    # The wait's sweep switches rows on one by one and re-decides only the rows a change reaches;
    # scoring each candidate threshold from scratch (refractory, then score_detections) must agree.
    rng = np.random.default_rng(5)
    for trial in range(12):
        corpus = []
        for k in range(int(rng.integers(1, 4))):
            n = int(rng.integers(300, 700))
            ts = stamps(n)
            scores = np.round(rng.random(n) * 3, 1)  # rounding makes ties
            scores[rng.random(n) < 0.1] = np.nan
            corpus.append(NabSeries(f"f{k}", ts, scores, [window(ts, 150, 170 + k), window(ts, 250, 252)]))
        wait = int(rng.integers(1, 12))
        for cost in (STANDARD, LOW_FN):
            for t in sweep(corpus, cost, wait=wait):
                one_by_one = []
                for s in corpus:
                    d = np.nan_to_num(s.scores, nan=-1) >= t.threshold
                    d[:probationary_length(len(d))] = False
                    one_by_one.append(score_detections(s.timestamps, refractory(d, wait), s.windows, cost))
                assert t.raw == pytest.approx(sum(f.raw for f in one_by_one), abs=1e-9), (trial, t)
                assert t.false_positives == sum(f.false_positives for f in one_by_one)
                assert t.detected_windows == sum(f.detected for f in one_by_one)


def test_normalisation_needs_a_window():
    assert normalised_score(-1.0, -2.0, 2.0) == pytest.approx(25.0)  # 100 * (-1 + 2) / (2 + 2)
    with pytest.raises(NabError, match="undefined"):
        nab_score([NabSeries("quiet", TS, np.zeros(N), [])], {"standard": STANDARD})


def test_profiles_file_is_read(shared_data, tmp_path):
    profiles = load_profiles(shared_data / "nab" / "config" / "profiles.json")
    assert profiles == {"standard": STANDARD, "reward_low_FP_rate": LOW_FP, "reward_low_FN_rate": LOW_FN}
    bad = tmp_path / "profiles.json"
    bad.write_text('{"standard": {"CostMatrix": {"tpWeight": 1}}}')
    with pytest.raises(NabError, match="fpWeight"):
        load_profiles(bad)
    with pytest.raises(NabError, match="cannot read"):
        load_profiles(tmp_path / "missing.json")


def test_scores_must_match_the_rows():
    with pytest.raises(NabError, match="3 anomaly scores for 1000 rows"):
        NabSeries("x", TS, np.zeros(3), [])


def test_streaming_rank_compares_each_score_with_the_past_only():
    # Reference rows 0..2 = [1, 3, 2]; then 5, 0, 3, nan, 4.
    scores = np.array([1.0, 3.0, 2.0, 5.0, 0.0, 3.0, np.nan, 4.0])
    ranks = streaming_rank(scores, 3)
    assert np.isnan(ranks[:3]).all()
    assert ranks[3] == 1.0            # 5 > all of {1, 3, 2}: 3 / 3
    assert ranks[4] == 0.0            # 0 < all of {1, 3, 2, 5}: 0 / 4
    assert ranks[5] == pytest.approx(3 / 5)  # 3 exceeds {1, 2, 0} of {1, 3, 2, 5, 0}; ties do not count
    assert np.isnan(ranks[6])         # no score, not remembered
    assert ranks[7] == pytest.approx(5 / 6)  # 4 exceeds {1, 3, 2, 0, 3} of six earlier scores
    # Causal: changing a later score leaves every earlier rank as it was.
    changed = scores.copy()
    changed[7] = -100.0
    assert np.array_equal(streaming_rank(changed, 3)[:7], ranks[:7], equal_nan=True)


def test_streaming_rank_makes_files_on_different_scales_comparable():
    # The same shape at 1x and 1000x scale ranks the same, so one corpus threshold fits both.
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    assert np.array_equal(streaming_rank(x, 50), streaming_rank(1000 * x + 7, 50), equal_nan=True)


def test_suppress_repeats_keeps_only_new_highs_of_the_recent_rows():
    s = np.array([np.nan, 0.2, 0.9, 0.95, 0.95, 0.5, 0.3, 0.96, 0.1, 0.2])
    out = suppress_repeats(s, 3)
    assert np.isnan(out[0])
    # 0.9 and 0.95 are new highs; the repeated 0.95 and the fall to 0.5/0.3 are not; 0.96 is
    # (the last 3 rows held 0.95, 0.5, 0.3); the final 0.2 is below the 0.96 two rows earlier.
    assert out[1:].tolist() == [0.2, 0.9, 0.95, 0.0, 0.0, 0.0, 0.96, 0.0, 0.0]
    # causal: the first k outputs never depend on later rows
    np.testing.assert_array_equal(suppress_repeats(s[:6], 3), out[:6])
    with pytest.raises(ValueError, match="window"):
        suppress_repeats(s, 0)
