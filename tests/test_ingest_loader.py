"""Loader, bulk inserts and the ingest command, on whichever database DATABASE_URL selects."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, transaction

from detection.ingest.base import IngestBatch, IngestError
from detection.ingest.bulk import bulk_insert
from detection.ingest.loader import ingest_batch, load_ground_truth, load_telemetry_frame
from detection.ingest.readers import read_table
from detection.models import Device, Fleet, GroundTruthLabel, Telemetry

UTC = "UTC"
CSV = (
    "serial,time,vendor,temp,load\n"
    "d1,2024-01-01 00:00:00,acme,0.1,1e-300\n"
    "d1,2024-01-01 00:05:00.123456,acme,12345.678901234567,\n"
    "d2,2024-01-01 00:00:00,globex,-0.0,5\n"
    "d2,2024-01-01 00:05:00,globex,1.7976931348623157e308,2.2250738585072014e-308\n"
)


def batch_from(tmp_path, text: str = CSV) -> IngestBatch:
    path = tmp_path / "t.csv"
    path.write_text(text)
    return read_table(path, device_column="serial", timestamp_column="time",
                      cohort_columns={"manufacturer": "vendor"})


@pytest.mark.django_db
def test_round_trip_returns_exactly_the_values_written(tmp_path):
    batch = batch_from(tmp_path)
    summary = ingest_batch(batch=batch, fleet_name="lab", description="bench")
    assert (summary.devices_created, summary.devices_existing, summary.rows, summary.labels) == (2, 0, 4, 0)
    fleet = Fleet.objects.get(pk=summary.fleet_id)
    assert fleet.metric_names == ["temp", "load"] and fleet.cohort_columns == ["manufacturer"]

    frame = load_telemetry_frame(fleet)
    assert list(frame.columns) == ["device_id", "external_id", "manufacturer", "model", "os_version", "store",
                                   "customer", "timestamp", "temp", "load"]
    assert frame["device_id"].dtype == np.int64 and str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert frame["external_id"].tolist() == batch.telemetry["external_id"].tolist()
    assert frame["manufacturer"].tolist() == ["acme", "acme", "globex", "globex"]
    assert (frame["timestamp"].to_numpy() == batch.telemetry["timestamp"].to_numpy()).all()
    metrics = ["temp", "load"]
    np.testing.assert_array_equal(frame[metrics].to_numpy(), batch.telemetry[metrics].to_numpy())
    stored = Telemetry.objects.get(device__external_id="d1", timestamp=pd.Timestamp("2024-01-01", tz=UTC))
    assert stored.values == {"temp": 0.1, "load": 1e-300}
    assert Telemetry.objects.filter(timestamp__gt=pd.Timestamp("2024-01-01 00:05", tz=UTC)).count() == 1


@pytest.mark.django_db
def test_load_keeps_a_half_open_time_range_and_chosen_devices(tmp_path):
    fleet = Fleet.objects.get(pk=ingest_batch(batch=batch_from(tmp_path), fleet_name="lab").fleet_id)
    d2 = Device.objects.get(external_id="d2").pk
    frame = load_telemetry_frame(fleet, start=pd.Timestamp("2024-01-01 00:00", tz=UTC),
                                 end=pd.Timestamp("2024-01-01 00:05", tz=UTC), device_ids=[d2])
    assert frame["device_id"].tolist() == [d2] and frame["timestamp"].iloc[0].minute == 0
    assert load_telemetry_frame(fleet, device_ids=[]).empty


@pytest.mark.django_db(transaction=True)
def test_second_ingest_of_the_same_samples_is_refused_and_saves_nothing(tmp_path):
    batch = batch_from(tmp_path)
    ingest_batch(batch=batch, fleet_name="lab")
    extra = batch_from(tmp_path, CSV + "d3,2024-01-01 00:00:00,initech,1,1\n")
    with pytest.raises(IngestError) as caught:
        ingest_batch(batch=extra, fleet_name="lab")
    text = caught.value.summary()
    assert "nothing was saved" in text
    assert "device 'd1' already has 2 samples between 2024-01-01 00:00:00 and 2024-01-01 00:05:00" in text
    assert Telemetry.objects.count() == 4 and not Device.objects.filter(external_id="d3").exists()


@pytest.mark.django_db
def test_new_samples_extend_a_fleet_and_update_changed_device_attributes(tmp_path):
    ingest_batch(batch=batch_from(tmp_path), fleet_name="lab")
    later = batch_from(tmp_path, "serial,time,vendor,temp,load\nd1,2024-01-02,acme2,1,2\nd1,2024-01-03,,1,2\n"
                                 "d9,2024-01-02,,3,4\n")
    summary = ingest_batch(batch=later, fleet_name="lab")
    assert (summary.fleet_created, summary.devices_created, summary.devices_existing) == (False, 1, 1)
    assert Device.objects.get(external_id="d1").manufacturer == "acme2"
    assert Device.objects.get(external_id="d2").manufacturer == "globex"
    assert Telemetry.objects.count() == 7


@pytest.mark.django_db
def test_batch_with_other_metrics_than_the_fleet_is_refused(tmp_path):
    ingest_batch(batch=batch_from(tmp_path), fleet_name="lab")
    other = batch_from(tmp_path, "serial,time,vendor,temp,humidity\nd1,2024-02-01,acme,1,2\n")
    with pytest.raises(IngestError, match="lacks load and adds humidity"):
        ingest_batch(batch=other, fleet_name="lab")
    assert Telemetry.objects.count() == 4


@pytest.mark.django_db
def test_fleet_name_must_be_a_slug(tmp_path):
    with pytest.raises(IngestError, match="must be a slug"):
        ingest_batch(batch=batch_from(tmp_path), fleet_name="my lab")
    assert not Fleet.objects.exists()


@pytest.mark.django_db
def test_ground_truth_is_written_and_loaded(tmp_path):
    batch = batch_from(tmp_path)
    batch.labels = pd.DataFrame({"external_id": ["d2"], "start": [pd.Timestamp("2024-01-01", tz=UTC)],
                                 "end": [pd.Timestamp("2024-01-01 00:05", tz=UTC)], "kind": ["spike"],
                                 "metric": ["temp"], "source": ["test"]})
    fleet = Fleet.objects.get(pk=ingest_batch(batch=batch, fleet_name="lab").fleet_id)
    truth = load_ground_truth(fleet)
    assert list(truth.columns) == ["device_id", "external_id", "start", "end", "kind", "metric"]
    assert truth.iloc[0][["external_id", "kind", "metric"]].tolist() == ["d2", "spike", "temp"]
    assert truth["end"].iloc[0] == pd.Timestamp("2024-01-01 00:05", tz=UTC)


@pytest.mark.django_db
def test_bulk_insert_writes_nan_as_json_null_and_datetimes_the_orm_reads_back():
    fleet = Fleet.objects.create(name="f")
    device = Device.objects.create(fleet=fleet, external_id="d")
    stamp = pd.Timestamp("2024-03-01 12:00:00.250000", tz=UTC)
    rows = [(fleet.pk, device.pk, stamp, {"a": float("nan"), "b": np.float32(1.5), "c": [float("inf"), 2.0]}),
            (fleet.pk, device.pk, stamp.to_pydatetime().replace(microsecond=0), {"a": 1.0})]
    assert bulk_insert(Telemetry, ["fleet", "device_id", "timestamp", "values"], rows) == 2
    first, second = Telemetry.objects.order_by("timestamp")
    assert second.values == {"a": None, "b": 1.5, "c": [None, 2.0]} and second.timestamp == stamp
    assert first.values == {"a": 1.0} and Telemetry.objects.filter(timestamp__lt=stamp).count() == 1
    with pytest.raises(ValueError, match="not a timezone-aware datetime"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bulk_insert(GroundTruthLabel, ["fleet", "device", "start", "end"],
                    [(fleet.pk, device.pk, stamp.tz_localize(None), stamp)])


@pytest.mark.django_db(transaction=True)
def test_bulk_insert_commits_nothing_of_its_own():
    fleet = Fleet.objects.create(name="f")
    device = Device.objects.create(fleet=fleet, external_id="d")
    stamp = pd.Timestamp("2024-03-01", tz=UTC)
    with pytest.raises(IntegrityError), transaction.atomic():
        bulk_insert(Telemetry, ["fleet", "device", "timestamp", "values"], [(fleet.pk, device.pk, stamp, {})])
        bulk_insert(Telemetry, ["fleet", "device", "timestamp", "values"], [(fleet.pk, device.pk, stamp, {})])
    assert not Telemetry.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_command_refuses_a_broken_file_and_saves_nothing(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(CSV.replace("12345.678901234567", "warm").replace("2024-01-01 00:05:00,", "soon,"))
    with pytest.raises(CommandError) as caught:
        call_command("ingest", str(path), "--fleet", "lab", "--device-column", "serial",
                     "--timestamp-column", "time")
    message = str(caught.value)
    assert "nothing was written" in message
    assert "row 2, column 'temp': 'warm' is not a number" in message
    assert "row 4, column 'time': 'soon' is not a timestamp" in message
    assert not Fleet.objects.exists() and not Telemetry.objects.exists()


@pytest.mark.django_db
def test_command_ingests_a_csv_and_prints_a_summary(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text(CSV)
    call_command("ingest", str(path), "--fleet", "lab", "--device-column", "serial",
                 "--timestamp-column", "time", "--metric", "temp", "--manufacturer-column", "vendor")
    out = capsys.readouterr().out
    assert "Created fleet 'lab': 2 devices (2 new), 4 rows, 0 labels" in out and "rows/s" in out
    assert Fleet.objects.get(name="lab").metric_names == ["temp"]
    assert Device.objects.get(external_id="d2").manufacturer == "globex"


@pytest.mark.django_db
def test_command_needs_a_format_it_cannot_infer(tmp_path):
    with pytest.raises(CommandError, match="cannot tell the format"):
        call_command("ingest", str(tmp_path / "data.txt"), "--fleet", "lab")


@pytest.mark.django_db
def test_command_ingests_the_real_skab_valve1_folder(shared_data, capsys):
    folder = shared_data / "skab" / "data" / "valve1"
    call_command("ingest", str(folder), "--fleet", "skab", "--format", "skab")
    fleet = Fleet.objects.get(name="skab")
    assert Device.objects.filter(fleet=fleet).count() == 16 and len(fleet.metric_names) == 8
    assert fleet.metric_domains["volume_flow_rate_rms"] == "hydraulic"
    frame = load_telemetry_frame(fleet)
    assert len(frame) == Telemetry.objects.filter(fleet=fleet).count() == 18_160
    assert not frame[fleet.metric_names].isna().any().any()
    truth = load_ground_truth(fleet)
    assert len(truth) == 16 and set(truth["kind"]) == {"skab_anomaly"}
    assert "16 devices (16 new), 18,160 rows, 16 labels" in capsys.readouterr().out


@pytest.mark.django_db
def test_round_trip_with_more_metrics_than_one_json_call_takes(tmp_path):
    names = [f"m{i}" for i in range(60)]
    values = np.random.default_rng(3).normal(size=(2, 60))
    rows = "".join(f"d,2024-01-0{r + 1}," + ",".join(map(repr, values[r].tolist())) + "\n" for r in range(2))
    path = tmp_path / "wide.csv"
    path.write_text("device_id,timestamp," + ",".join(names) + "\n" + rows)
    fleet = Fleet.objects.get(pk=ingest_batch(batch=read_table(path), fleet_name="wide").fleet_id)
    np.testing.assert_array_equal(load_telemetry_frame(fleet)[names].to_numpy(), values)


@pytest.mark.django_db
def test_command_ingests_a_real_nab_category_with_its_windows(shared_data):
    call_command("ingest", str(shared_data / "nab" / "data" / "realTraffic"), "--fleet", "traffic",
                 "--format", "nab")
    fleet = Fleet.objects.get(name="traffic")
    assert fleet.cohort_columns == ["manufacturer"] and len(load_ground_truth(fleet)) == 14
    assert len(load_telemetry_frame(fleet)) == 15_664


def test_command_refuses_table_options_for_a_benchmark_layout(tmp_path):
    with pytest.raises(CommandError, match="--metric: for csv and parquet only, not nab"):
        call_command("ingest", str(tmp_path), "--fleet", "x", "--format", "nab", "--metric", "value")
