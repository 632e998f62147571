"""The Django-free explanation core on plain arrays: attributions, payload, writer, validation, breaker."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from detection.ml.detectors import AnomalyDetector, AnomalyDetectorConfig, HybridAnomalyDetector
from explanations.attribution import (
    attribute_in_context,
    head_label,
    is_sequential,
    attribute_kernel,
    attribute_robust_z,
    attribute_tree,
    average_path_length,
    supports_tree_shap,
    tree_explainer,
)
from explanations.llm import CircuitBreaker
from explanations.narrative import BuiltinWriter, build_prompt, fmt, narrate
from explanations.payload import build_payload, duration_words, level_label
from explanations.rows import split_model_column
from explanations.templatetags.explanations import contribution_bars, narrative_blocks
from explanations.validation import validate_narrative

FEATURES = ["battery_level_z_cohort", "battery_level_roll_mean_z_cohort", "cpu_pct_z_cohort", "wifi_rssi_z_cohort"]
FEATURE_METRIC = {f: f.split("_z_")[0].removesuffix("_roll_mean") for f in FEATURES}
DOMAINS = {"battery_level": "battery", "cpu_pct": "compute", "wifi_rssi": "wifi"}


def _frame(n=600, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(n, len(FEATURES)))
    frame = pd.DataFrame(data, columns=FEATURES)
    frame["wifi_rssi_roll_mean_z_device"] = rng.normal(size=n)
    frame["cpu_pct_roll_mean_z_device"] = rng.normal(size=n)
    return frame


def _outliers(frame: pd.DataFrame) -> pd.DataFrame:
    rows = frame.iloc[:5].copy()
    rows["wifi_rssi_z_cohort"] = [-9.0, -7.5, 0.1, 6.0, -12.0]
    rows["cpu_pct_z_cohort"] = [0.2, 5.0, 8.0, 0.0, 1.0]
    rows["cpu_pct_roll_mean_z_device"] = [0.0, 0.0, 9.0, 0.0, 0.0]
    rows.iloc[2, 0] = np.nan  # imputed by the detector, as in scoring
    return rows


@pytest.fixture(scope="module")
def forest_detector():
    frame = _frame()
    domains = {f: DOMAINS[FEATURE_METRIC[f]] for f in FEATURES}
    # battery has two features, so per-domain weighting repeats the others' columns: SHAP must fold them back.
    detector = AnomalyDetector(AnomalyDetectorConfig(n_estimators=40, n_jobs=1), feature_domain=domains)
    return detector.fit(frame, FEATURES), frame


@pytest.fixture(scope="module")
def hybrid_detector():
    frame = _frame(seed=1)
    domains = {f: DOMAINS[FEATURE_METRIC[f]] for f in FEATURES}
    detector = HybridAnomalyDetector(AnomalyDetectorConfig(n_estimators=40, n_jobs=1), feature_domain=domains)
    temporal = ["wifi_rssi_roll_mean_z_device", "cpu_pct_roll_mean_z_device"]
    return detector.fit(frame, FEATURES, temporal_features=temporal), frame


def _feature_metric():
    return {**FEATURE_METRIC, "wifi_rssi_roll_mean_z_device": "wifi_rssi", "cpu_pct_roll_mean_z_device": "cpu_pct"}


# --- attributions ---------------------------------------------------------------------------------

def test_fast_tree_explainer_matches_shaps_own_isolation_forest_loader(forest_detector):
    import shap

    detector, frame = forest_detector
    assert detector.repeats_.max() > 1
    matrix = np.repeat(detector.transform(frame.iloc[:50]).astype(np.float32), detector.repeats_, axis=1)
    ours = tree_explainer(detector.forest_)
    reference = shap.TreeExplainer(detector.forest_)
    np.testing.assert_allclose(ours.shap_values(matrix), reference.shap_values(matrix), atol=1e-10)
    assert float(np.ravel(ours.expected_value)[0]) == pytest.approx(float(np.ravel(reference.expected_value)[0]))
    assert tree_explainer(detector.forest_) is ours  # cached per forest


def test_tree_shap_contributions_add_up_to_the_forest_score(forest_detector):
    detector, frame = forest_detector
    rows = _outliers(frame)
    results = attribute_tree(detector, rows, feature_metric=FEATURE_METRIC, metric_domain=DOMAINS,
                             levels=("cohort",))
    scores = detector.score_samples(rows)
    assert len(results) == len(rows)
    for result, score in zip(results, scores):
        assert result.method == "tree_shap"
        assert result.additivity["checked"] and result.additivity["ok"]
        assert result.additivity["native_error"] < 1e-8
        assert result.base_value + sum(m.contribution for m in result.metrics) == pytest.approx(score, abs=1e-9)
        assert result.output_value == pytest.approx(score, abs=1e-9)
        # one entry per model column, repeated columns folded back; metrics are the source metrics
        assert sorted(f.column for f in result.features) == sorted(FEATURES)
        assert {m.metric for m in result.metrics} == {"battery_level", "cpu_pct", "wifi_rssi"}
        assert sum(m.share for m in result.metrics) == pytest.approx(1.0)
    # the Wi-Fi outlier is carried by wifi_rssi, the CPU one by cpu_pct
    assert results[0].metrics[0].metric == "wifi_rssi"
    assert results[2].metrics[0].metric == "cpu_pct"
    battery = [f for f in results[0].features if f.metric == "battery_level"]
    assert {f.feature for f in battery} == {"battery_level", "battery_level_roll_mean"}
    assert {f.level for f in battery} == {"cohort"}


def test_hybrid_contributions_include_the_temporal_term_and_add_up_to_the_fused_score(hybrid_detector):
    detector, frame = hybrid_detector
    rows = _outliers(frame)
    results = attribute_tree(detector, rows, feature_metric=_feature_metric(), metric_domain=DOMAINS,
                             levels=("cohort", "device"))
    fused = detector.score_samples(rows)
    for result, score in zip(results, fused):
        assert result.additivity["ok"], result.additivity
        assert result.base_value + sum(m.contribution for m in result.metrics) == pytest.approx(score, abs=1e-9)
        assert set(result.components) == {"forest", "temporal"}
    # row 2: the CPU rolling mean against the device's own baseline sets the temporal score
    assert results[2].components["temporal"]["metric"] == "cpu_pct"
    assert results[2].metrics[0].metric == "cpu_pct"


def test_kernel_shap_fallback_explains_a_detector_without_a_forest(forest_detector):
    detector, frame = forest_detector

    class NoForest:
        """A detector with only score_samples, like any non-tree model."""

        def score_samples(self, X):
            return detector.score_samples(X)

    assert not supports_tree_shap(NoForest())
    rows = _outliers(frame)[FEATURES]
    results = attribute_kernel(NoForest(), rows.iloc[:3], frame[FEATURES].iloc[100:300],
                               feature_metric=FEATURE_METRIC, metric_domain=DOMAINS, max_background=10)
    filled = rows.iloc[:3].fillna(frame[FEATURES].iloc[100:300].sample(10, random_state=0).median())
    for result, score in zip(results, detector.score_samples(filled)):
        assert result.method == "kernel_shap" and "10 background rows" in result.note
        assert result.output_value == pytest.approx(score, abs=1e-6)
        assert result.additivity["ok"]
    assert results[0].metrics[0].metric == "wifi_rssi"
    assert results[2].metrics[0].metric == "cpu_pct"


def test_robust_z_fallback_shares_the_excess_over_the_threshold():
    result = attribute_robust_z([{"metric": "wifi_rssi", "domain": "wifi", "z": -9.0},
                                 {"metric": "cpu_pct", "domain": "compute", "z": 3.0}],
                                score=0.9, threshold=0.5, reason="the model artifact is missing")
    assert result.method == "robust_z" and "artifact is missing" in result.note
    assert [m.metric for m in result.metrics] == ["wifi_rssi", "cpu_pct"]
    assert result.metrics[0].share == pytest.approx(0.75)
    assert sum(m.contribution for m in result.metrics) == pytest.approx(0.4)
    assert result.additivity == {"checked": False, "ok": None}


def test_average_path_length_matches_scikit_learn():
    from sklearn.ensemble._iforest import _average_path_length

    n = np.array([1, 2, 3, 10, 256, 10_000])
    np.testing.assert_allclose(average_path_length(n), _average_path_length(n))


def test_model_columns_split_into_feature_and_level():
    assert split_model_column("battery_level_roll_mean_z_cohort", ("cohort",)) == ("battery_level_roll_mean", "cohort")
    assert split_model_column("battery_level_resid", ("cohort",)) == ("battery_level_resid", None)
    assert split_model_column("x_z_unknown", ("cohort",)) == ("x_z_unknown", None)


# --- payload, writer, prompt ----------------------------------------------------------------------

SCHEMA = [{"name": "wifi_rssi", "unit": "dBm", "domain": "wifi"},
          {"name": "battery_level", "unit": "%", "domain": "battery"},
          {"name": "battery_temp", "unit": "°C", "domain": "battery"},
          {"name": "cpu_pct", "unit": "%", "domain": "compute"},
          {"name": "memory_pct", "unit": "%", "domain": "compute"}]
ATTRIBUTES = {"manufacturer": "Samsung", "model": "Galaxy S21", "os_version": "Android 14", "store": "store-007",
              "customer": "acme-retail"}


def payload(top=None, **overrides):
    top = top if top is not None else [
        {"metric": "battery_level", "feature": "battery_level_delta", "domain": "battery", "value": -31.2,
         "typical": -10.05, "mad": 3.1, "z": -4.6, "level": "cohort"},
        {"metric": "wifi_rssi", "feature": "wifi_rssi_roll_mean", "domain": "wifi", "value": -88.0,
         "typical": -61.2, "mad": 4.0, "z": -4.52, "level": "device"},
    ]
    attribution = {"method": "tree_shap", "label": "SHAP TreeExplainer", "base_value": 0.42, "output_value": 0.71,
                   "metrics": [{"metric": "battery_level", "domain": "battery", "contribution": 0.2, "share": 0.69},
                               {"metric": "wifi_rssi", "domain": "wifi", "contribution": 0.09, "share": 0.31}]}
    values = dict(anomaly_id=1, fleet="demo", device="dev-0021", device_attributes=ATTRIBUTES,
                  cohort_label="Samsung Galaxy S21 Android 14", timestamp="2026-10-24T13:00:00+00:00",
                  anomaly_score=0.7134, threshold=0.6021, severity="high", algorithm="isolation_forest",
                  model_version=3, baseline_version=2, top_metrics=top, attribution=attribution,
                  metric_schema=SCHEMA)
    values.update(overrides)
    return build_payload(**values)


def test_payload_holds_values_typicals_spreads_levels_and_ratios():
    p = payload()
    battery = p.top_metrics[0]
    assert battery.spread == pytest.approx(1.4826 * 3.1, abs=1e-6)
    assert battery.aspect == "change over 1 day"
    assert battery.level_label == "Samsung Galaxy S21 on Android 14 devices"
    assert battery.ratio == pytest.approx(3.1, abs=0.01)
    assert p.top_metrics[1].level_label == "this device's own history"
    assert p.metrics() == ["battery_level", "wifi_rssi"]
    assert p.when == "2026-10-24 13:00 UTC"
    assert type(p).from_dict(p.as_dict()).as_dict() == p.as_dict()


def test_builtin_writer_speaks_business_terms_with_payload_numbers_only():
    p = payload()
    text = BuiltinWriter().text(p)
    assert "battery drained 3.1x faster than usual for Samsung Galaxy S21 on Android 14 devices" in text
    assert "-31.2%" in text and "-10.1%" in text and "± 4.6" in text and "robust z-score -4.6" in text
    assert "Next steps:" in text and "Wi-Fi" in text
    result = validate_narrative(text, p)
    assert result.valid, result.reasons
    assert all(n["matched"] is not None for n in result.numbers)


def test_prompt_follows_the_issue_shape():
    prompt = build_prompt(payload())
    assert prompt.startswith("You are explaining an anomaly detected by Isolation Forest (score: 0.713")
    assert "Device dev-0021 (Samsung Galaxy S21 Android 14) at 2026-10-24 13:00 UTC showed unusual behavior:" in prompt
    assert "- battery_level (battery level, change over 1 day): -31.2 % (typical: -10.1 +/- 4.6 for Samsung " \
           "Galaxy S21 on Android 14 devices, z-score: -4.6)" in prompt
    assert prompt.endswith("Explain what this means in business terms and suggest next steps.")


def test_an_ensembles_agreement_is_stated_by_the_writer_and_the_prompt_and_its_counts_validate():
    p = payload(algorithm="ensemble", votes={"robust_z": True, "lof": True, "hybrid": False})
    text = BuiltinWriter().text(p)
    assert "2 of 3 detectors flagged it (lof, robust_z; not hybrid)." in text.split("\n\n")[0]
    assert validate_narrative(text, p).valid
    assert "Detector agreement: 2 of 3 detectors flagged it (lof, robust_z; not hybrid)." in build_prompt(p)
    assert type(p).from_dict(p.as_dict()).votes == p.votes
    # Without the votes, "2 of 3" would be numbers the payload does not hold.
    plain = payload()
    assert "detectors flagged it" not in BuiltinWriter().text(plain)
    assert "Detector agreement" not in build_prompt(plain)
    assert not validate_narrative("2 of 3 detectors flagged it.", plain).valid
    assert payload(votes={"iqr": True}).agreement_text == "1 of 1 detectors flagged it (iqr)"


@pytest.mark.parametrize("value,text", [(-95.0, "-95"), (22.0968, "22.1"), (1.97324, "1.97"), (0.027112, "0.0271"),
                                        (1234.5, "1234"), (0.0, "0"), (-0.00001, "-0.00001"), (None, "n/a")])
def test_numbers_are_printed_with_three_significant_digits(value, text):
    assert fmt(value) == text


def test_duration_words_and_level_labels():
    assert duration_words("12h", adjective=True) == "12-hour"
    assert duration_words("1D") == "1 day"
    assert duration_words("600s") == "10 minutes"
    assert duration_words("1h", article=False) == "hour"
    assert level_label("store", ATTRIBUTES, "") == "devices in store store-007"
    assert level_label("global", {}, "") == "the whole fleet"


# --- validation -----------------------------------------------------------------------------------

GOOD = ("Battery level fell by 31.2 points in a day against a typical 10.05 (z-score -4.6): the battery drained "
        "3.1x faster than usual. The Wi-Fi signal averaged -88 dBm. Check the battery on Galaxy S21 dev-0021 "
        "(Android 14) at 13:00.")


def test_a_narrative_with_payload_metrics_and_rounded_numbers_passes():
    result = validate_narrative(GOOD, payload())
    assert result.valid, result.reasons
    assert set(result.metrics) == {"battery_level", "wifi_rssi"}


@pytest.mark.parametrize("text,reason", [
    (GOOD + " GPS accuracy also degraded.", "names gps"),
    (GOOD + " The screen_brightness spiked.", "'screen_brightness'"),
    (GOOD + " Memory use climbed too.", "memory use (memory_pct)"),
    (GOOD.replace("-88 dBm", "-80.5 dBm"), "states -80.5"),
    (GOOD.replace("31.2", "31.4"), "states 31.4"),
    ("The Wi-Fi signal averaged -88 dBm.", "does not mention the top metric, battery level"),
    ("", "empty"),
])
def test_a_narrative_that_invents_a_metric_misstates_a_number_or_skips_the_top_metric_fails(text, reason):
    result = validate_narrative(text, payload())
    assert not result.valid
    assert any(reason in r for r in result.reasons), result.reasons


def test_numbers_inside_names_and_list_markers_are_not_checked():
    text = "1. Battery level on dev-0021 (Samsung Galaxy S21, Android 14, store-007) fell to -31.2%.\n2. Done."
    assert validate_narrative(text, payload()).valid


def test_the_payloads_own_names_are_not_invented_metrics_even_when_they_look_like_one():
    # A NAB series ingested as a device: its id holds a snake_case token, its fleet a telemetry term.
    p = payload(device="realTraffic/TravelTime_451", fleet="traffic", cohort_label="realTraffic")
    text = BuiltinWriter().text(p)
    assert "realTraffic/TravelTime_451" in text
    result = validate_narrative(text, p)
    assert result.valid, result.reasons
    assert validate_narrative(GOOD + " Fleet traffic, device realTraffic/TravelTime_451.", p).valid
    # The token outside the device's name is still a metric the payload does not have; so is a term
    # that is no payload name. (The fleet's name is blanked wherever it stands: "traffic" is the fleet
    # here, not the telemetry term.)
    result = validate_narrative(GOOD + " Its traveltime_451 rose and the humidity doubled.", p)
    assert not result.valid and any("'traveltime_451'" in r for r in result.reasons)
    assert any("names humidity" in r for r in result.reasons)
    assert any("names traffic" in r for r in validate_narrative(GOOD + " Traffic doubled.", payload()).reasons)


def test_narrate_falls_back_to_the_builtin_writer_when_a_provider_fails_or_is_rejected():
    class Broken:
        name = "llm"

        def write(self, p):
            from explanations.narrative import Narrative
            return Narrative("", "llm", "fake", "prompt", 1.0, error="timed out", error_kind="timeout")

    class Liar:
        name = "llm"

        def write(self, p):
            from explanations.narrative import Narrative
            return Narrative("Battery level dropped 99%.", "llm", "fake", "prompt", 1.0)

    failed = narrate(payload(), Broken())
    assert failed.verdict == "failed" and failed.shown_provider == "builtin"
    assert failed.shown_text == BuiltinWriter().text(payload())
    rejected = narrate(payload(), Liar())
    assert rejected.verdict == "rejected" and "states 99" in rejected.validation.reasons[0]
    assert rejected.shown_text.startswith("Device dev-0021")


# --- circuit breaker ------------------------------------------------------------------------------

def test_breaker_opens_after_consecutive_failures_and_half_opens_after_the_reset_time():
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_seconds=30, clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 31
    assert breaker.state == "half_open" and breaker.allow()
    breaker.record_failure()  # the trial call failed: open again at once
    assert breaker.state == "open"
    now[0] = 62
    breaker.record_success()
    assert breaker.state == "closed"


# --- template filters -----------------------------------------------------------------------------

def test_narrative_blocks_split_paragraphs_and_lists():
    blocks = narrative_blocks("First line.\n\nNext steps:\n- One.\n- Two.\n\n1. A\n2. B")
    assert blocks == [{"kind": "p", "text": "First line."},
                      {"kind": "list", "title": "Next steps:", "items": ["One.", "Two."]},
                      {"kind": "list", "title": "", "items": ["A", "B"]}]


def test_contribution_bars_scale_to_the_largest_contribution():
    class E:
        attributions = {"metrics": [{"metric": "a", "contribution": 2.0, "share": 0.8},
                                    {"metric": "b", "contribution": -0.5, "share": 0.2}]}
        payload = {"metric_labels": {"a": "Alpha"}}

    bars = contribution_bars(E())
    assert [(b["label"], b["width"], b["up"]) for b in bars] == [("Alpha", 100.0, True), ("b", 25.0, False)]


# --- Shapley values in the device's sequence (sequential detectors) ----------------------------------

def _two_device_frame(n=400, seed=5):
    """Two devices x n rows, metrics a and b (white noise); device 2 runs 5 higher in a, and its last
    row has a spike of 8 in a on top."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=2 * n), "b": rng.normal(size=2 * n),
                          "device_id": np.repeat([1, 2], n)})
    frame.loc[n:, "a"] += 5.0
    frame.loc[2 * n - 1, "a"] += 8.0
    return frame


def test_in_context_shapley_values_add_up_to_the_score_the_detector_gave_in_sequence():
    from detection.ml.statistical import WindowedGaussianDetector

    frame = _two_device_frame()
    detector = WindowedGaussianDetector(AnomalyDetectorConfig()).fit(frame.iloc[list(range(300)) + list(range(400, 700))],
                                                                     ["a", "b"])
    assert is_sequential(detector) and head_label(detector, 2) == 400 and head_label(detector, 9) is None
    stored = detector.score_samples(frame)  # the pipeline scores the whole frame, device blocks in order
    sequence = frame.iloc[400:]  # device 2 from its first row, indexed as in the frame
    result = attribute_in_context(detector, sequence, feature_metric={}, metric_domain={"a": "power"})
    assert result.method == "context_shap" and result.additivity["ok"]
    assert result.output_value == pytest.approx(stored[-1], rel=1e-12)
    assert result.base_value + sum(m.contribution for m in result.metrics) == pytest.approx(stored[-1], rel=1e-9)
    by_metric = {m.metric: m for m in result.metrics}
    assert by_metric["a"].contribution > 5 * abs(by_metric["b"].contribution) and by_metric["a"].domain == "power"
    # Scored on its own, as Kernel SHAP scores a row, the spike reads against the wrong past (both
    # devices' training rows), not device 2's own.
    alone = detector.score_samples(frame.iloc[[-1]].drop(columns="device_id"))
    assert abs(alone[0] - stored[-1]) > 1.0


def test_in_context_attribution_refuses_too_many_metrics_and_empty_sequences():
    from detection.ml.statistical import WindowedGaussianDetector
    from explanations.attribution import AttributionError

    frame = _two_device_frame()
    detector = WindowedGaussianDetector(AnomalyDetectorConfig()).fit(frame.iloc[:300], ["a", "b"])
    with pytest.raises(AttributionError, match="2 metrics.*at most 1"):
        attribute_in_context(detector, frame.iloc[:350], feature_metric={}, metric_domain={}, max_metrics=1)
    with pytest.raises(AttributionError, match="4 coalitions x 350 rows is more than 1000"):
        attribute_in_context(detector, frame.iloc[:350], feature_metric={}, metric_domain={}, max_work=1000)
    with pytest.raises(AttributionError, match="no row"):
        attribute_in_context(detector, frame.iloc[:0], feature_metric={}, metric_domain={})
    assert not is_sequential(AnomalyDetector(AnomalyDetectorConfig()).fit(frame.iloc[:300], ["a", "b"]))


def test_an_ensemble_with_alarm_persistence_is_attributed_in_sequence_too():
    from detection.ml.suite import EnsembleDetector

    frame = _two_device_frame()
    config = AnomalyDetectorConfig(ensemble_smooth_rows=5)
    detector = EnsembleDetector(config, members=("robust_z", "iqr")).fit(
        frame.iloc[list(range(300)) + list(range(400, 700))], ["a", "b"])
    assert is_sequential(detector) and head_label(detector, 2) == 400
    stored = detector.score_samples(frame)
    result = attribute_in_context(detector, frame.iloc[400:], feature_metric={}, metric_domain={})
    assert result.output_value == pytest.approx(stored[-1], rel=1e-12) and result.additivity["ok"]
    assert not is_sequential(EnsembleDetector(AnomalyDetectorConfig(), members=("robust_z", "iqr")).fit(
        frame.iloc[:300], ["a", "b"]))


def _pump_frame(n=300, sensors=8, seed=3):
    """Two devices x n rows of `sensors` correlated readings (SKAB-like); device 2's last 6 rows drift
    up by 6 in s0."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=(2 * n, 1))
    frame = pd.DataFrame(common + 0.5 * rng.normal(size=(2 * n, sensors)), columns=[f"s{i}" for i in range(sensors)])
    frame["device_id"] = np.repeat([1, 2], n)
    frame.loc[2 * n - 6:, "s0"] += 6.0
    return frame


def test_alarm_persistence_is_attributed_over_its_window_and_matches_brute_force_shapley_values():
    from itertools import combinations
    from math import factorial

    from detection.ml.suite import EnsembleDetector
    from explanations import attribution

    frame = _pump_frame()
    sensors = [c for c in frame.columns if c != "device_id"]
    config = AnomalyDetectorConfig(ensemble_smooth_rows=4)
    detector = EnsembleDetector(config, members=("robust_z", "lof")).fit(
        frame.iloc[list(range(200)) + list(range(300, 500))], sensors)
    assert attribution.persistence_only(detector) and attribution.context_metric_limit(detector) == 10
    stored = detector.score_samples(frame)
    result = attribute_in_context(detector, frame.iloc[300:], feature_metric={}, metric_domain={})
    assert "last 4 rows" in result.note and result.additivity["ok"]
    assert result.output_value == pytest.approx(stored[-1], rel=1e-12)
    by_metric = {m.metric: m.contribution for m in result.metrics}
    others = max(abs(v) for k, v in by_metric.items() if k != "s0")
    assert result.metrics[0].metric == "s0" and by_metric["s0"] > 3 * others  # the drifting sensor carries it

    # Brute force on 3 sensors: v(S) = the detector's score of the whole sequence with the sensors outside
    # S at their median over the earlier rows in each of the last 4 rows; Shapley values from their definition.
    few = frame[["s0", "s1", "s2", "device_id"]]
    small = EnsembleDetector(config, members=("robust_z", "lof")).fit(
        few.iloc[list(range(200)) + list(range(300, 500))], ["s0", "s1", "s2"])
    sequence = few.iloc[300:]
    typical = sequence[["s0", "s1", "s2"]].iloc[:-1].median()

    def v(kept):
        replaced = sequence.copy()
        for sensor in {"s0", "s1", "s2"} - set(kept):
            replaced.iloc[-4:, replaced.columns.get_loc(sensor)] = typical[sensor]
        return small.score_samples(replaced)[-1]

    players = ["s0", "s1", "s2"]
    expected = {p: sum(factorial(len(c)) * factorial(2 - len(c)) / 6 * (v({*c, p}) - v(c))
                       for size in range(3) for c in combinations([q for q in players if q != p], size))
                for p in players}
    fast = attribute_in_context(small, sequence, feature_metric={}, metric_domain={})
    assert fast.base_value == pytest.approx(v(()), rel=1e-9)
    assert {m.metric: m.contribution for m in fast.metrics} == {p: pytest.approx(x, rel=1e-9, abs=1e-12)
                                                                 for p, x in expected.items()}


def test_persistence_over_a_sequential_member_is_replayed():
    from detection.ml.suite import EnsembleDetector
    from explanations import attribution

    frame = _two_device_frame()
    detector = EnsembleDetector(AnomalyDetectorConfig(ensemble_smooth_rows=5),
                                members=("robust_z", "windowed_gaussian")).fit(
        frame.iloc[list(range(300)) + list(range(400, 700))], ["a", "b"])
    assert is_sequential(detector) and not attribution.persistence_only(detector)
    result = attribute_in_context(detector, frame.iloc[400:], feature_metric={}, metric_domain={})
    assert "one fused score per coalition" not in result.note
    assert result.output_value == pytest.approx(detector.score_samples(frame)[-1], rel=1e-12)
