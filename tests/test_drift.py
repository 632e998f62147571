"""Drift: KS, chi-square and PSI on crafted samples (Django-free), and the drift check on a synthetic fleet."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from baselines import drift


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift(rng):
    reference = rng.normal(50, 10, 5000)
    assert drift.psi(reference, rng.normal(50, 10, 5000)) < 0.02
    shifted = drift.psi(reference, rng.normal(60, 10, 5000))  # one standard deviation
    assert shifted > 0.25
    assert drift.psi(reference, rng.normal(55, 10, 5000)) < shifted  # grows with the shift


def test_psi_matches_a_hand_computed_value():
    reference = np.arange(100, dtype=float)  # quantile edges at 49.5: two bins of 50
    current = np.r_[np.zeros(80), np.full(20, 99.0)]  # 80 % low, 20 % high
    expected = (0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5)
    assert drift.psi(reference, current, bins=2) == pytest.approx(expected)


def test_psi_bins_are_open_ended_and_empty_bins_stay_finite(rng):
    reference = rng.normal(0, 1, 1000)
    value = drift.psi(reference, np.full(500, 100.0))  # everything beyond the last reference value
    assert np.isfinite(value) and value > 5


def test_psi_rejects_empty_samples_and_too_few_bins():
    with pytest.raises(ValueError, match="both samples"):
        drift.psi([np.nan, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="bins"):
        drift.psi([1.0], [1.0], bins=1)


def test_ks_flags_a_shift_and_passes_the_same_distribution(rng):
    same = drift.continuous_drift("x", rng.normal(0, 1, 3000), rng.normal(0, 1, 3000))
    assert same.status == drift.OK and same.p_value > 0.01 and same.statistic < 0.05
    moved = drift.continuous_drift("x", rng.normal(0, 1, 3000), rng.normal(0.8, 1, 3000))
    assert moved.status == drift.DRIFT and moved.p_value < 1e-10 and moved.statistic > 0.2


def test_a_tiny_but_significant_shift_is_only_a_warning_or_ok(rng):
    # 100k rows make any shift significant; the effect size keeps 0.05 sd from being called drift
    result = drift.continuous_drift("x", rng.normal(0, 1, 100_000), rng.normal(0.05, 1, 100_000))
    assert result.p_value < 0.01 and result.status == drift.OK


def test_too_few_values_are_ok_with_a_note(rng):
    result = drift.continuous_drift("x", rng.normal(0, 1, 10), rng.normal(5, 1, 10))
    assert result.status == drift.OK and "too few" in result.note and result.statistic is None


def test_chi_square_on_categories(rng):
    reference = rng.choice(["Android 13", "Android 14"], 2000, p=[0.5, 0.5])
    assert drift.categorical_drift("os", reference, rng.choice(["Android 13", "Android 14"], 2000)).status == drift.OK
    rollout = drift.categorical_drift("os", reference, rng.choice(["Android 13", "Android 14", "Android 15"], 2000,
                                                                  p=[0.1, 0.3, 0.6]))
    assert rollout.status == drift.DRIFT and rollout.effect > 0.2


def test_report_status_needs_a_share_of_features_to_drift(rng):
    n = 2000
    reference = pd.DataFrame({f"m{i}": rng.normal(0, 1, n) for i in range(10)})
    current = pd.DataFrame({f"m{i}": rng.normal(0, 1, n) for i in range(10)})
    assert drift.drift_report(reference, current, continuous=list(reference)).status == drift.OK
    current["m0"] += 2  # one of ten drifts: 10 % < drift_share 20 % -> warning
    one = drift.drift_report(reference, current, continuous=list(reference))
    assert one.status == drift.WARNING and one.drifting == ["m0"]
    current["m1"] += 2
    two = drift.drift_report(reference, current, continuous=list(reference))
    assert two.status == drift.DRIFT and "2 of 10 features drifting" in two.summary
    assert all(isinstance(row["psi"], float) for row in two.as_dicts())


def test_report_names_a_missing_column(rng):
    frame = pd.DataFrame({"a": rng.normal(0, 1, 50)})
    with pytest.raises(ValueError, match=r"current has no column\(s\) \['b'\]"):
        drift.drift_report(frame.assign(b=1.0), frame, continuous=["a", "b"])


# --- the drift check on a fleet ---------------------------------------------------------------------------

@pytest.fixture
def small_fleet(db, settings):
    settings.VIGIL_DETECTION = {**settings.VIGIL_DETECTION, "n_estimators": 50}  # fast; drift reads telemetry
    from detection.ingest.loader import ingest_batch
    from detection.ingest.synthetic import generate_fleet
    from detection.models import Fleet

    start = pd.Timestamp("2024-05-01", tz="UTC")
    ingest_batch(batch=generate_fleet(devices=14, days=6, seed=5, start=start), fleet_name="small")
    return Fleet.objects.get(name="small"), start


def _train(fleet, until):
    from detection.services import pipeline_run_create, pipeline_run_execute

    run = pipeline_run_create(fleet=fleet, params={"train_until": until.isoformat()})
    run = pipeline_run_execute(run_id=run.pk)
    assert run.status == "succeeded", run.error
    return run


def test_drift_check_compares_the_last_day_with_the_training_window(small_fleet, settings):
    from alerts.health import drift_check
    from detection.models import Telemetry

    fleet, start = small_fleet
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "drift_current_hours": 24}
    _train(fleet, start + pd.Timedelta(days=4))
    report = drift_check(fleet=fleet)
    assert report.status in {"ok", "warning"}
    battery = next(f for f in report.features if f["feature"] == "battery_level")
    assert battery["status"] == "ok"
    assert report.windows["reference"][1] == (start + pd.Timedelta(days=4)).isoformat()
    # move three of the 11 features in the last day (drift_share 0.2 needs 3): the check must say drift
    newest = start + pd.Timedelta(days=6)
    rows = list(Telemetry.objects.filter(fleet=fleet, timestamp__gte=newest - dt.timedelta(hours=23)))
    for row in rows:
        row.values = {**row.values, "battery_level": (row.values.get("battery_level") or 0) * 0.3,
                      "battery_temp": (row.values.get("battery_temp") or 0) + 15,
                      "cpu_pct": (row.values.get("cpu_pct") or 0) + 40}
    Telemetry.objects.bulk_update(rows, ["values"])
    shifted = drift_check(fleet=fleet)
    by_feature = {f["feature"]: f for f in shifted.features}
    assert by_feature["battery_level"]["status"] == "drift" and by_feature["battery_level"]["psi"] > 0.25
    assert shifted.status == "drift"


def test_drift_check_needs_an_active_baseline(small_fleet):
    from alerts.health import DriftCheckError, drift_check

    with pytest.raises(DriftCheckError, match="no active baseline version"):
        drift_check(fleet=small_fleet[0])
