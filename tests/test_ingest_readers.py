"""Readers: each kind of broken file is refused naming file, row and column; real layouts read right."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from detection.ingest.base import DEVICE_COLUMNS, LABEL_COLUMNS, IngestError
from detection.ingest.readers import (
    MAX_PROBLEMS,
    infer_format,
    read_cmapss,
    read_nab,
    read_skab,
    read_source,
    read_table,
)

GOOD = (
    "device_id,timestamp,temp,load\n"
    "d2,2024-01-01 00:00:00,7.0,\n"
    "d1,2024-01-01 00:05:00,1.6,3\n"
    "d1,2024-01-01 00:00:00,1.5,2\n"
)
SKAB_HEADER = ("datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;"
               "Voltage;Volume Flow RateRMS;anomaly;changepoint")


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(call, *args, **kwargs):
    with pytest.raises(IngestError) as caught:
        call(*args, **kwargs)
    return caught.value.problems


def only(found):
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# --- clean sources -------------------------------------------------------------------------------

def test_clean_csv_becomes_a_sorted_batch(tmp_path):
    batch = read_table(write(tmp_path, "t.csv", GOOD))
    assert batch.metric_names == ["temp", "load"]
    assert list(batch.telemetry.columns) == ["external_id", "timestamp", "temp", "load"]
    assert str(batch.telemetry["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert batch.telemetry["external_id"].tolist() == ["d1", "d1", "d2"]
    assert batch.telemetry["temp"].tolist() == [1.5, 1.6, 7.0]
    assert np.isnan(batch.telemetry["load"].iloc[2])
    assert list(batch.devices.columns) == DEVICE_COLUMNS
    assert batch.devices["external_id"].tolist() == ["d1", "d2"]
    assert list(batch.labels.columns) == LABEL_COLUMNS and batch.labels.empty


def test_parquet_with_zoned_timestamps_and_integer_device_ids(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({
        "unit": [7, 7],
        "ts": pd.to_datetime(["2024-01-01 01:00", "2024-01-01 02:00"]).tz_localize("Europe/Berlin"),
        "v": [1.0, 2.0],
    }).to_parquet(path)
    batch = read_table(path, fmt="parquet", device_column="unit", timestamp_column="ts")
    assert batch.telemetry["external_id"].tolist() == ["7", "7"]
    assert batch.telemetry["timestamp"].iloc[0] == pd.Timestamp("2024-01-01 00:00", tz="UTC")


def test_folder_means_every_file_of_the_format(tmp_path):
    write(tmp_path, "a.csv", "device_id,timestamp,v\na,2024-01-01,1\n")
    write(tmp_path, "b.csv", "device_id,timestamp,v\nb,2024-01-01,2\n")
    write(tmp_path, "notes.txt", "ignored")
    assert read_table(tmp_path).telemetry["external_id"].tolist() == ["a", "b"]


def test_device_attributes_take_the_latest_non_empty_value(tmp_path):
    path = write(tmp_path, "t.csv", "device_id,timestamp,vendor,os,v\n"
                                    "d1,2024-01-01 00:00,acme,1.0,1\n"
                                    "d1,2024-01-01 00:10,,2.0,1\n"
                                    "d1,2024-01-01 00:05,acme,1.5,1\n")
    batch = read_table(path, cohort_columns={"manufacturer": "vendor", "os_version": "os"})
    assert batch.metric_names == ["v"]
    assert batch.devices.iloc[0][["manufacturer", "os_version", "model"]].tolist() == ["acme", "2.0", ""]
    assert batch.cohort_columns == ["manufacturer", "os_version"]


def test_offsets_are_converted_to_utc(tmp_path):
    text = "device_id,timestamp,v\nd,2024-01-01T12:00:00+02:00,1\nd,2024-01-01T11:00:00Z,2\n"
    stamps = read_table(write(tmp_path, "t.csv", text)).telemetry["timestamp"]
    assert stamps.tolist() == [pd.Timestamp("2024-01-01 10:00", tz="UTC"),
                               pd.Timestamp("2024-01-01 11:00", tz="UTC")]


def test_metric_names_become_identifiers_that_keep_their_source_name(tmp_path):
    path = write(tmp_path, "t.csv", "device_id,timestamp,Battery Level %,cpu\nd,2024-01-01,50,1\n")
    batch = read_table(path, metric_units={"Battery Level %": "%"}, metric_domains={"cpu": "compute"})
    assert batch.metric_schema == [
        {"name": "battery_level", "unit": "%", "domain": "other", "label": "Battery Level %"},
        {"name": "cpu", "unit": "", "domain": "compute"},
    ]


def test_read_source_dispatches_and_refuses_unknown_formats(tmp_path):
    assert read_source(write(tmp_path, "t.csv", GOOD), "csv").metric_names == ["temp", "load"]
    with pytest.raises(ValueError):
        read_source(tmp_path, "xlsx")


def test_format_is_inferred_from_extension_or_folder(tmp_path):
    assert infer_format(write(tmp_path, "t.csv", GOOD)) == "csv"
    assert infer_format(tmp_path) == "csv"
    assert "give one of" in only(problems(infer_format, tmp_path / "t.txt")).message


# --- broken sources: one test per kind -----------------------------------------------------------

def test_missing_file(tmp_path):
    found = only(problems(read_table, tmp_path / "nope.csv"))
    assert found.file.endswith("nope.csv") and "not found" in found.message


def test_empty_file(tmp_path):
    assert only(problems(read_table, write(tmp_path, "t.csv", ""))).message == "file is empty"


def test_header_only_file(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", "device_id,timestamp,v\n")))
    assert "no data rows" in found.message and found.file.endswith("t.csv")


def test_binary_file_is_not_read_as_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    assert "not a CSV text file" in only(problems(read_table, path)).message


def test_wrong_delimiter_names_the_missing_columns_and_lists_what_is_there(tmp_path):
    found = problems(read_table, write(tmp_path, "t.csv", GOOD.replace(",", ";")))
    assert [p.column for p in found] == ["device_id", "timestamp"]
    assert "'device_id;timestamp;temp;load'" in found[0].message


def test_missing_device_column(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", GOOD), device_column="serial"))
    assert found.column == "serial"
    assert "device column 'serial' is not in the file" in found.message
    assert "'device_id', 'timestamp', 'temp', 'load'" in found.message


def test_missing_timestamp_column(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", GOOD), timestamp_column="time"))
    assert found.column == "time" and "timestamp column 'time'" in found.message


def test_unknown_metric_column_requested(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", GOOD), metrics=["temp", "humidity"]))
    assert found.column == "humidity" and "metric column 'humidity' is not in the file" in found.message


def test_non_numeric_value_names_row_column_and_value(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", GOOD.replace("1.6", "warm"))))
    assert (found.row, found.column) == (2, "temp")
    assert "'warm' is not a number" in found.message
    assert str(found).startswith(f"{tmp_path / 't.csv'}, row 2, column 'temp'")


def test_unparseable_timestamp_names_row_and_value(tmp_path):
    path = write(tmp_path, "t.csv", GOOD.replace("2024-01-01 00:05:00", "yesterday"))
    found = only(problems(read_table, path))
    assert (found.row, found.column) == (2, "timestamp")
    assert "'yesterday' is not a timestamp" in found.message


def test_duplicate_sample_names_both_rows(tmp_path):
    path = write(tmp_path, "t.csv", GOOD + "d1,2024-01-01 00:05:00,9,9\n")
    found = only(problems(read_table, path))
    assert found.row == 4 and "is already at row 2" in found.message and "'d1'" in found.message


def test_duplicate_across_files_names_both_files(tmp_path):
    write(tmp_path, "a.csv", "device_id,timestamp,v\nd,2024-01-01,1\n")
    write(tmp_path, "b.csv", "device_id,timestamp,v\nd,2024-01-01,2\n")
    found = only(problems(read_table, tmp_path))
    assert found.file.endswith("b.csv") and f"row 1 of {tmp_path / 'a.csv'}" in found.message


def test_metric_with_no_values_at_all(tmp_path):
    path = write(tmp_path, "t.csv", "device_id,timestamp,v,w\nd,2024-01-01,1,\nd,2024-01-02,2,\n")
    found = only(problems(read_table, path, metrics=["v", "w"]))
    assert found.column == "w" and "no values in any row" in found.message


def test_infinite_value(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", GOOD.replace("1.6", "inf"))))
    assert (found.row, found.column) == (2, "temp") and "infinite" in found.message


def test_file_without_numeric_columns(tmp_path):
    path = write(tmp_path, "t.csv", "device_id,timestamp,note\nd,2024-01-01,fine\n")
    found = only(problems(read_table, path))
    assert "no metric columns" in found.message
    assert "available columns: device_id, timestamp, note" in found.message


def test_empty_device_id(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", GOOD.replace("d2,", " ,"))))
    assert (found.row, found.column, found.message) == (1, "device_id", "device id is empty")


def test_blank_and_na_cells_are_missing_values_and_na_can_name_a_device(tmp_path):
    text = "device_id,timestamp,v\nNA,2024-01-01,1\nNA,2024-01-02,NA\nNA,2024-01-03, \nNA,2024-01-04,\n"
    batch = read_table(write(tmp_path, "t.csv", text))
    assert batch.devices["external_id"].tolist() == ["NA"] and batch.telemetry["v"].isna().sum() == 3
    found = only(problems(read_table, write(tmp_path, "t.csv", text + "NA,2024-01-05,x\n")))
    assert (found.row, found.message) == (5, "'x' is not a number")


def test_mixed_naive_and_zoned_timestamps(tmp_path):
    text = "device_id,timestamp,v\nd,2024-01-01 00:00:00,1\nd,2024-01-01 02:00:00+01:00,2\n"
    path = write(tmp_path, "t.csv", text)
    found = only(problems(read_table, path))
    assert found.column == "timestamp"
    assert "first at row 2" in found.message and "first at row 1" in found.message


def test_parquet_format_on_a_csv_file(tmp_path):
    path = write(tmp_path, "t.parquet", GOOD)
    assert "is not a Parquet file" in only(problems(read_table, path, fmt="parquet")).message


def test_csv_format_on_a_parquet_file(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"device_id": ["d"], "timestamp": ["2024-01-01"], "v": [1.0]}).to_parquet(path)
    assert "read it with format 'parquet'" in only(problems(read_table, path)).message


def test_skab_format_on_a_nab_file(tmp_path):
    path = write(tmp_path, "series.csv", "timestamp,value\n2024-01-01 00:00:00,1\n")
    found = only(problems(read_skab, path))
    assert "not a SKAB file" in found.message and "read it with format 'nab'" in found.message


def test_nab_format_on_a_skab_file(tmp_path):
    path = write(tmp_path, "0.csv", SKAB_HEADER + "\n2020-03-09 10:14:33;1;1;1;1;1;1;1;1;0.0;0.0\n")
    found = only(problems(read_nab, path))
    assert found.column == "timestamp" and "read it with format 'skab'" in found.message


def test_cmapss_format_on_a_nab_file(tmp_path):
    path = write(tmp_path, "train_FD001.txt", "timestamp,value\n2024-01-01 00:00:00,1\n")
    assert "read it with format 'nab'" in only(problems(read_cmapss, path)).message


def test_table_format_on_a_nab_file_suggests_nab(tmp_path):
    path = write(tmp_path, "series.csv", "timestamp,value\n2024-01-01 00:00:00,1\n")
    assert "read it with format 'nab'" in only(problems(read_table, path)).message


def test_cmapss_row_with_the_wrong_number_of_fields(tmp_path):
    line = " ".join(["1", "1"] + ["0.5"] * 24)
    path = write(tmp_path, "train_FD001.txt", f"{line} \n{line.replace('1 1', '1 2', 1)} 9\n1 3 0.5\n")
    found = problems(read_cmapss, path)
    assert [(p.row, p.message.split(",")[0]) for p in found] == [(2, "has 27 fields"), (3, "has 3 fields")]


def test_cmapss_non_numeric_field(tmp_path):
    fields = ["1", "1"] + ["0.5"] * 24
    fields[7] = "n/a"
    found = only(problems(read_cmapss, write(tmp_path, "train_FD001.txt", " ".join(fields) + "\n")))
    assert (found.row, found.column) == (1, "sensor_3") and "'n/a'" in found.message


def test_nab_file_without_value_column(tmp_path):
    found = only(problems(read_nab, write(tmp_path, "s.csv", "timestamp,reading\n2024-01-01,1\n")))
    assert found.column == "value" and "timestamp, reading" in found.message


def test_folder_without_matching_files(tmp_path):
    write(tmp_path, "t.parquet.bak", "x")
    found = only(problems(read_table, tmp_path))
    assert found.file == str(tmp_path) and "no *.csv files" in found.message


def test_timestamp_column_empty_in_every_row(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", "device_id,timestamp,v\nd,,1\ne,,2\n")))
    assert found.column == "timestamp" and "empty in every row" in found.message


def test_row_with_too_many_fields_is_named(tmp_path):
    found = only(problems(read_table, write(tmp_path, "t.csv", GOOD + "d3,2024-01-01,1,2,3\n")))
    assert found.row == 4 and "has 5 fields, the header has 4" in found.message


def test_header_naming_a_column_twice(tmp_path):
    path = write(tmp_path, "t.csv", "device_id,timestamp,v,v\nd,2024-01-01,1,2\n")
    assert "'v' more than once" in only(problems(read_table, path)).message


def test_column_cannot_be_device_and_metric(tmp_path):
    found = problems(read_table, write(tmp_path, "t.csv", GOOD), metrics=["temp", "device_id"])
    assert "cannot be both the device column and a metric column" in only(found).message


def test_unknown_device_attribute(tmp_path):
    found = problems(read_table, write(tmp_path, "t.csv", GOOD), cohort_columns={"colour": "temp"})
    assert "unknown device attribute 'colour'" in found[0].message


def test_reserved_and_colliding_metric_names(tmp_path):
    path = write(tmp_path, "t.csv", "device_id,timestamp,model,a b,a-b\nd,2024-01-01,1,2,3\n")
    messages = [p.message for p in problems(read_table, path)]
    assert any("'model' is reserved" in m for m in messages)
    assert any("'a b' and 'a-b' both become metric 'a_b'" in m for m in messages)


def test_skab_anomaly_must_be_0_or_1(tmp_path):
    path = write(tmp_path, "0.csv", SKAB_HEADER + "\n2020-03-09 10:14:33;1;1;1;1;1;1;1;1;2.0;0.0\n")
    found = only(problems(read_skab, path))
    assert (found.row, found.column) == (1, "anomaly") and "0 or 1" in found.message


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    text = GOOD.replace("1.6", "warm").replace("2024-01-01 00:00:00,1.5", "soon,1.5").replace("d2,", ",")
    found = problems(read_table, write(tmp_path, "t.csv", text))
    assert {(p.row, p.column) for p in found} == {(1, "device_id"), (2, "temp"), (3, "timestamp")}


def test_problem_list_is_capped_and_counts_the_rest(tmp_path):
    rows = "".join(f"d{i},2024-01-01,x{i},y\n" for i in range(5000))
    path = write(tmp_path, "t.csv", "device_id,timestamp,a,b\n" + rows)
    found = problems(read_table, path, metrics=["a", "b"])
    assert len(found) <= MAX_PROBLEMS + 1
    assert "4,995 more rows like this" in found[5].message and found[5].column == "a"


# --- the real benchmark layouts ------------------------------------------------------------------

def test_nab_root_gives_41_series_and_their_windows(shared_data):
    batch = read_nab(shared_data / "nab")
    assert len(batch.devices) == 41 and len(batch.telemetry) == 137_366
    assert batch.metric_names == ["value"] and batch.cohort_columns == ["manufacturer"]
    assert set(batch.devices["manufacturer"]) == {"artificialNoAnomaly", "artificialWithAnomaly",
                                                  "realAWSCloudwatch", "realAdExchange", "realTraffic"}
    windows = json.loads((shared_data / "nab" / "labels" / "combined_windows.json").read_text())
    expected = {(key.removesuffix(".csv"), pd.Timestamp(s, tz="UTC"), pd.Timestamp(e, tz="UTC"))
                for key, pairs in windows.items() for s, e in pairs}
    assert len(expected) == 64
    assert set(batch.labels[["external_id", "start", "end"]].itertuples(index=False, name=None)) == expected
    assert set(batch.labels["kind"]) == {"nab_window"} and set(batch.labels["source"]) == {"nab"}


def test_nab_repeated_timestamps_are_kept_as_distinct_samples(shared_data):
    path = shared_data / "nab" / "data" / "realAWSCloudwatch" / "ec2_disk_write_bytes_1ef3de.csv"
    raw = pd.read_csv(path)
    stamps = read_nab(path).telemetry["timestamp"]
    assert len(stamps) == len(raw) and stamps.is_unique
    assert (stamps.dt.floor("s") == pd.to_datetime(raw["timestamp"]).dt.tz_localize("UTC")).all()


def test_nab_category_folder(shared_data):
    batch = read_nab(shared_data / "nab" / "data" / "realTraffic")
    assert len(batch.devices) == 7 and len(batch.labels) == 14


def test_skab_valve1_labels_cover_exactly_the_anomalous_rows(shared_data):
    folder = shared_data / "skab" / "data" / "valve1"
    batch = read_skab(folder)
    assert len(batch.devices) == 16 and len(batch.metric_names) == 8
    assert "volume_flow_rate_rms" in batch.metric_names and "anomaly" not in batch.telemetry.columns
    assert {m["label"] for m in batch.metric_schema} >= {"Volume Flow RateRMS", "Accelerometer1RMS"}
    assert set(batch.devices["model"]) == {"valve1"} and batch.devices["external_id"].iloc[0] == "valve1/0"
    anomalous = sum(int(pd.read_csv(f, sep=";")["anomaly"].sum()) for f in folder.glob("*.csv"))
    merged = batch.telemetry.merge(batch.labels, on="external_id")
    inside = merged[(merged["timestamp"] >= merged["start"]) & (merged["timestamp"] <= merged["end"])]
    assert len(batch.labels) == 16 and len(inside) == anomalous


def test_skab_root_adds_the_anomaly_free_run_without_labels(shared_data):
    batch = read_skab(shared_data / "skab")
    assert "anomaly-free/anomaly-free" in set(batch.devices["external_id"])
    assert "anomaly-free/anomaly-free" not in set(batch.labels["external_id"])


def test_cmapss_train_gives_100_units_with_their_last_30_cycles_labelled(shared_data):
    batch = read_cmapss(shared_data / "cmapss")
    assert len(batch.devices) == 100 and batch.devices["external_id"].iloc[0] == "FD001/unit_001"
    assert [m for m in batch.metric_names if m.startswith("sensor_")] == [f"sensor_{i}" for i in range(1, 22)]
    assert batch.telemetry["timestamp"].min() == pd.Timestamp("2000-01-01 01:00", tz="UTC")
    assert len(batch.labels) == 100
    assert ((batch.labels["end"] - batch.labels["start"]) == pd.Timedelta(hours=29)).all()
    last = batch.telemetry.groupby("external_id")["timestamp"].max()
    assert (batch.labels.set_index("external_id")["end"] == last).all()


def test_cmapss_test_split_labels_from_remaining_useful_life(shared_data):
    batch = read_cmapss(shared_data / "cmapss", split="test", degraded_cycles=30)
    rul = np.loadtxt(shared_data / "cmapss" / "RUL_FD001.txt")
    assert len(batch.devices) == 100 and len(batch.labels) == int((rul < 30).sum())
