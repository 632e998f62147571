"""Top metrics name the metric that drove an anomaly: a device whose rolling mean left its own baseline
while staying inside its cohort's range (raised by the hybrid detector's temporal score) is explained
at the device level, a cohort outlier still at the cohort level, and severity follows the top entry.
Django-free: the pipeline core on a crafted fleet."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from detection.ml.pipeline import PipelineConfig, TrainingWindow, run_core
from detection.ml.scoring import device_candidates, severity_from_score

METRICS = ["load", "temp", "signal"]
START = pd.Timestamp("2026-03-01", tz="UTC")
DAYS, TRAIN_DAYS = 10, 6
TRAIN_UNTIL = START + pd.Timedelta(days=TRAIN_DAYS) - pd.Timedelta("1h")
DRIFTER, SPIKER, SPIKE_AT = "d00", "d05", START + pd.Timedelta(days=8, hours=10)


def _fleet() -> pd.DataFrame:
    """12 devices of one cohort, hourly, for 10 days. Each device has its own level of `load` (35 to 65);
    d00's load climbs slowly from day 6 by 12 units, to about 47, inside the cohort's range. `temp`
    is the same for every device (about 20), and d05 has one reading of 40 on day 8."""
    rng = np.random.default_rng(0)
    stamps = pd.date_range(START, periods=DAYS * 24, freq="1h")
    hours = np.arange(len(stamps))
    frames = []
    for d, level in enumerate(np.linspace(35, 65, 12)):
        name = f"d{d:02d}"
        load = level + rng.normal(0, 1, len(stamps))
        if name == DRIFTER:
            load += np.clip(hours - TRAIN_DAYS * 24, 0, None) * (12 / ((DAYS - TRAIN_DAYS) * 24))
        temp = 20 + rng.normal(0, 1, len(stamps))
        if name == SPIKER:
            temp[stamps == SPIKE_AT] = 40.0
        frames.append(pd.DataFrame({
            "device_id": d + 1, "external_id": name, "timestamp": stamps, "manufacturer": "Acme", "model": "M1",
            "os_version": "14", "load": load, "temp": temp, "signal": -60 + rng.normal(0, 2, len(stamps))}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def scored():
    frame = _fleet()
    config = PipelineConfig(algorithm="hybrid", baseline_levels=("global", "cohort", "device"),
                            window=TrainingWindow(train_until=TRAIN_UNTIL))
    out = run_core(frame, metrics=METRICS, metric_domain={"load": "compute", "temp": "thermal"}, config=config)
    rows = out.scored.assign(label=out.result.labels, severity=out.result.severity,
                             top=out.result.top_metrics, score=out.result.scores)
    return out, rows


def test_a_drift_inside_the_cohort_range_is_explained_by_its_metric_at_the_device_level(scored):
    out, rows = scored
    assert "load_roll_mean" in [out.baselines.features[i] for i in
                                device_candidates(out.detector, out.baselines.features, "cohort")]
    drift = rows[(rows["external_id"] == DRIFTER) & (rows["label"] == -1)
                 & (rows["timestamp"] >= START + pd.Timedelta(days=TRAIN_DAYS + 2))]
    assert len(drift) >= 24, "the hybrid detector flags the drifting device"
    for top, severity in zip(drift["top"], drift["severity"]):
        first = top[0]
        assert (first["metric"], first["feature"], first["level"], first["kind"]) == \
            ("load", "load_roll_mean", "device", "rolling mean")
        # The device's own statistics, and the z the temporal score read.
        assert first["typical"] < 40 and abs(first["z"]) > 4
        assert abs(first["value"] - first["typical"]) == pytest.approx(abs(first["z"]) * 1.4826 * first["mad"],
                                                                        rel=1e-3)
        assert severity == severity_from_score(np.array([first["z"]]))[0]
        assert [e["metric"] for e in top] == list(dict.fromkeys(e["metric"] for e in top))  # one entry a metric
    # Inside the cohort's range: at the cohort level the same rolling mean is unremarkable.
    cohort = out.baselines.table("cohort", "median")["load_roll_mean"].iloc[0]
    cohort_mad = out.baselines.table("cohort", "mad")["load_roll_mean"].iloc[0]
    assert (abs(drift["top"].map(lambda t: t[0]["value"]) - cohort) / (1.4826 * cohort_mad) < 2).all()
    assert set(drift["severity"]) <= {"medium", "high", "critical"}


def test_a_cohort_outlier_is_still_explained_at_the_cohort_level(scored):
    _, rows = scored
    spike = rows[(rows["external_id"] == SPIKER) & (rows["timestamp"] == SPIKE_AT)].iloc[0]
    assert spike["label"] == -1
    first = spike["top"][0]
    assert (first["metric"], first["level"]) == ("temp", "cohort")
    assert abs(first["z"]) > 10 and first["feature"] != "temp_roll_mean"


def test_without_temporal_columns_there_are_no_device_level_entries():
    frame = _fleet()
    config = PipelineConfig(algorithm="isolation_forest", baseline_levels=("global", "cohort", "device"),
                            window=TrainingWindow(train_until=TRAIN_UNTIL))
    out = run_core(frame, metrics=METRICS, metric_domain={}, config=config)
    assert device_candidates(out.detector, out.baselines.features, "cohort") == []
    levels = {e["level"] for top in out.result.top_metrics for e in top}
    assert levels and "device" not in levels
