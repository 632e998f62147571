"""The synthetic demo fleet: determinism, shapes, the special cohort, injected anomalies, the command."""
from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
from django.core.management import CommandError, call_command

from detection.ingest.base import DEVICE_COLUMNS, LABEL_COLUMNS
from detection.ingest.synthetic import (
    ANOMALY_KINDS, METRICS, PHYSICAL_RANGE, SPECIAL_COHORT, SPECIAL_COHORT_NAME, generate_fleet,
)

MAD_TO_SIGMA = 1.4826
HAS_LOADER = importlib.util.find_spec("detection.ingest.loader") is not None


@pytest.fixture(scope="module")
def demo():
    return generate_fleet(devices=60, days=14, seed=7)


@pytest.fixture(scope="module")
def larger():
    return generate_fleet(devices=150, days=21, seed=11)


def _labelled_rows(batch) -> np.ndarray:
    """Boolean mask over telemetry rows that lie inside any label window."""
    tel = batch.telemetry
    mask = np.zeros(len(tel), dtype=bool)
    first_row = pd.Series(np.arange(len(tel)), index=tel["external_id"]).groupby(level=0).min()
    first_ts = tel.groupby("external_id")["timestamp"].min()
    step = tel["timestamp"].iloc[1] - tel["timestamp"].iloc[0]
    for label in batch.labels.itertuples():
        base = first_row[label.external_id]
        lo = base + (label.start - first_ts[label.external_id]) // step
        hi = base + (label.end - first_ts[label.external_id]) // step
        mask[lo:hi + 1] = True
    return mask


def test_same_seed_gives_the_same_fleet_and_another_seed_does_not():
    a, b = (generate_fleet(devices=20, days=3, seed=5) for _ in range(2))
    pd.testing.assert_frame_equal(a.devices, b.devices)
    pd.testing.assert_frame_equal(a.telemetry, b.telemetry)
    pd.testing.assert_frame_equal(a.labels, b.labels)
    other = generate_fleet(devices=20, days=3, seed=6)
    assert not np.allclose(a.telemetry["cpu_pct"].fillna(0), other.telemetry["cpu_pct"].fillna(0))


def test_batch_has_the_ingest_shape_and_physical_ranges(demo):
    assert demo.source == "synthetic"
    assert demo.cohort_columns == ["manufacturer", "model", "os_version"]
    assert demo.metric_names == METRICS
    assert {m["name"]: (m["unit"], m["domain"]) for m in demo.metric_schema} == {
        "battery_level": ("%", "battery"), "battery_temp": ("°C", "battery"),
        "storage_free": ("%", "storage"), "cpu_pct": ("%", "compute"), "memory_pct": ("%", "compute"),
        "network_rx_mb": ("MB", "network"), "network_tx_mb": ("MB", "network"), "wifi_rssi": ("dBm", "wifi"),
    }
    assert list(demo.devices.columns) == DEVICE_COLUMNS and len(demo.devices) == 60
    assert demo.devices["external_id"].iloc[0] == "dev-0001" and demo.devices["external_id"].is_unique
    assert demo.devices["store"].str.fullmatch(r"store-\d{3}").all()
    assert demo.devices["store"].nunique() == 5 and 1 < demo.devices["customer"].nunique() <= 4
    assert demo.devices.groupby(demo.cohort_columns).ngroups == 7

    tel = demo.telemetry
    assert list(tel.columns) == ["external_id", "timestamp", *METRICS]
    assert len(tel) == 60 * 14 * 24
    assert str(tel["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert all(tel[m].dtype == np.float64 for m in METRICS)
    assert tel["timestamp"].min() == pd.Timestamp("2026-10-18", tz="UTC")
    assert tel["timestamp"].max() == pd.Timestamp("2026-10-31 23:00", tz="UTC")
    assert (tel["timestamp"] == tel["timestamp"].dt.floor("h")).all()
    assert not tel.duplicated(["external_id", "timestamp"]).any()
    assert tel.equals(tel.sort_values(["external_id", "timestamp"], ignore_index=True))
    for metric, (low, high) in PHYSICAL_RANGE.items():
        assert tel[metric].min() >= low and tel[metric].max() <= high, metric


def test_start_is_taken_as_utc_and_floored_to_the_hour():
    batch = generate_fleet(devices=2, days=2, seed=1, start=pd.Timestamp("2025-03-01 10:37"))
    assert batch.telemetry["timestamp"].min() == pd.Timestamp("2025-03-01 10:00", tz="UTC")
    assert len(batch.telemetry) == 2 * 48


@pytest.mark.parametrize("kwargs", [
    {"devices": 0, "days": 3}, {"devices": 5, "days": 0}, {"devices": 5, "days": 3, "freq": "7h"},
])
def test_invalid_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        generate_fleet(seed=1, **kwargs)


def test_special_cohort_is_normal_but_has_a_lower_battery_and_runs_hotter(larger):
    assert SPECIAL_COHORT_NAME == "Samsung Galaxy S21 Android 14"
    special_ids = larger.devices.loc[
        (larger.devices[larger.cohort_columns] == SPECIAL_COHORT).all(axis=1), "external_id"]
    assert len(special_ids) >= 5
    tel = larger.telemetry
    special, labelled = tel["external_id"].isin(special_ids).to_numpy(), _labelled_rows(larger)
    # Its difference is normal behaviour: only the random injections are labelled, as for every cohort.
    assert labelled[special].mean() < 0.05
    normal_special, normal_rest = tel[special & ~labelled], tel[~special & ~labelled]
    assert normal_special["battery_level"].median() < normal_rest["battery_level"].median() - 8
    assert normal_special["battery_temp"].median() > normal_rest["battery_temp"].median() + 4


def test_every_kind_is_injected_with_windows_inside_the_data(demo):
    labels = demo.labels
    assert list(labels.columns) == LABEL_COLUMNS
    assert set(labels["kind"]) == set(ANOMALY_KINDS)
    assert (labels["source"] == "synthetic").all() and labels["metric"].isin(METRICS).all()
    assert (labels["start"] <= labels["end"]).all()
    span = demo.telemetry.groupby("external_id")["timestamp"].agg(["min", "max"])
    joined = labels.join(span, on="external_id")
    assert (joined["start"] >= joined["min"]).all() and (joined["end"] <= joined["max"]).all()
    for _, windows in labels.groupby("external_id"):  # never two windows over the same sample
        assert (windows["start"].iloc[1:].to_numpy() > windows["end"].iloc[:-1].to_numpy()).all()


def test_a_tiny_fleet_still_gets_every_kind():
    batch = generate_fleet(devices=1, days=2, seed=3)
    assert set(batch.labels["kind"]) == set(ANOMALY_KINDS)
    assert batch.telemetry[METRICS].notna().any().all()


@pytest.mark.parametrize("fleet", ["demo", "larger"])
def test_injected_windows_deviate_from_the_device_own_normal_behaviour(fleet, request):
    """Robust z of the labelled metric inside the window against the device's samples outside any window.

    A stuck sensor keeps a plausible level, so it is measured on the 24-sample rolling std instead, and a
    drift on the last quarter of its window, where it has slid furthest.
    """
    batch = request.getfixturevalue(fleet)
    tel, labelled = batch.telemetry, _labelled_rows(batch)
    for label in batch.labels.itertuples():
        rows = (tel["external_id"] == label.external_id).to_numpy()
        device = tel[rows]
        series, outside = device[label.metric], ~labelled[rows]
        inside = ((device["timestamp"] >= label.start) & (device["timestamp"] <= label.end)).to_numpy()
        if label.kind == "stuck_sensor":
            assert series[inside].nunique() == 1
            series = series.rolling(24, min_periods=20).std()
            inside = (device["timestamp"] == label.end).to_numpy()  # the rolling window is the stuck one
        values = series[inside].to_numpy()
        if label.kind == "drift":
            values = values[-max(1, len(values) // 4):]
        median = series[outside].median()
        mad = MAD_TO_SIGMA * (series[outside] - median).abs().median()
        z = np.nanmedian(np.abs(values - median) / mad)
        assert z >= 3, f"{label.kind} on {label.metric} of {label.external_id}: robust z {z:.1f}"


def test_missing_values_are_rare_and_never_a_whole_column(demo):
    share = demo.telemetry[METRICS].isna().to_numpy().mean()
    assert 0 < share < 0.005
    assert demo.telemetry[METRICS].notna().any().all()
    assert demo.telemetry[["external_id", "timestamp"]].notna().all().all()


def test_full_size_fleet_is_a_million_rows_with_one_to_two_percent_anomalous():
    batch = generate_fleet(devices=1000, days=42, seed=7)
    assert len(batch.telemetry) == 1000 * 42 * 24
    assert 0.01 <= _labelled_rows(batch).mean() <= 0.02


def test_demo_fleet_has_one_to_two_percent_anomalous_rows(demo):
    assert 0.01 <= _labelled_rows(demo).mean() <= 0.02


needs_loader = pytest.mark.skipif(
    not HAS_LOADER, reason="detection/ingest/loader.py (ingest_batch) is not written yet")


@needs_loader
@pytest.mark.django_db
def test_generate_fleet_command_ingests_once_and_skips_with_if_missing(capsys):
    from detection.models import Device, Fleet, GroundTruthLabel, Telemetry

    call_command("generate_fleet", fleet="demo-test", devices=4, days=2, seed=7)
    fleet = Fleet.objects.get(name="demo-test")
    assert Device.objects.filter(fleet=fleet).count() == 4
    assert Telemetry.objects.filter(fleet=fleet).count() == 4 * 48
    expected = generate_fleet(devices=4, days=2, seed=7)
    assert GroundTruthLabel.objects.filter(fleet=fleet).count() == len(expected.labels)
    assert "4 devices" in capsys.readouterr().out

    call_command("generate_fleet", fleet="demo-test", devices=9, days=3, seed=8, if_missing=True)
    assert "already exists" in capsys.readouterr().out
    assert Device.objects.filter(fleet=fleet).count() == 4
    with pytest.raises(CommandError, match="already exists"):
        call_command("generate_fleet", fleet="demo-test", devices=4, days=2, seed=7)


@needs_loader
@pytest.mark.django_db
@pytest.mark.parametrize("args, field", [
    ({"devices": 0, "days": 3}, "--devices"), ({"devices": 3, "days": 1}, "--days"),
    ({"devices": 3, "days": 3, "fleet": "not a slug"}, "--fleet"),
])
def test_generate_fleet_command_rejects_bad_arguments(args, field):
    from detection.models import Fleet

    with pytest.raises(CommandError, match=field):
        call_command("generate_fleet", **{"fleet": "demo-bad", "seed": 1, **args})
    assert not Fleet.objects.exists()
