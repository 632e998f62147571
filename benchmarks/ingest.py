"""Ingest throughput on the database DATABASE_URL names (default: the embedded SQLite).

Generates a CSV of --rows rows x --metrics metrics over --devices devices (5-minute samples),
then times three steps: parse (read_table), insert (ingest_batch) and read back
(load_telemetry_frame), and checks that the values read back equal the values written. Works on
a scratch fleet, deleted afterwards. Migrates the database first (a no-op when it is current).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/vigil python benchmarks/ingest.py --rows 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from detection.ingest.loader import ingest_batch, load_telemetry_frame  # noqa: E402
from detection.ingest.readers import read_table  # noqa: E402
from detection.models import Fleet, Telemetry  # noqa: E402

FLEET = "benchmark-ingest-scratch"


def write_csv(path: Path, rows: int, metrics: int, devices: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per_device = -(-rows // devices)
    stamps = pd.date_range("2024-01-01", periods=per_device, freq="5min", tz="UTC")
    frame = pd.DataFrame({
        "device_id": np.repeat([f"dev-{i:05d}" for i in range(devices)], per_device)[:rows],
        "timestamp": np.tile(stamps.strftime("%Y-%m-%dT%H:%M:%SZ").to_numpy(), devices)[:rows],
        **{f"metric_{j}": rng.normal(50, 10, rows) for j in range(metrics)},
        "vendor": np.repeat(rng.choice(["acme", "globex", "initech"], devices), per_device)[:rows],
    })
    frame.to_csv(path, index=False)


def timed(step, *args, **kwargs):
    started = time.perf_counter()
    result = step(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--metrics", type=int, default=8)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()

    call_command("migrate", verbosity=0)
    Fleet.objects.filter(name=FLEET).delete()
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "telemetry.csv"
        write_csv(csv_path, args.rows, args.metrics, args.devices)
        batch, parse_s = timed(read_table, csv_path, cohort_columns={"manufacturer": "vendor"})
    try:
        summary, insert_s = timed(ingest_batch, batch=batch, fleet_name=FLEET)
        frame, load_s = timed(load_telemetry_frame, Fleet.objects.get(name=FLEET))
        names = batch.metric_names
        exact = (len(frame) == len(batch.telemetry)
                 and np.array_equal(frame[names].to_numpy(), batch.telemetry[names].to_numpy())
                 and (frame["timestamp"].to_numpy() == batch.telemetry["timestamp"].to_numpy()).all())
    finally:
        fleet = Fleet.objects.filter(name=FLEET).first()
        if fleet is not None:
            Telemetry.objects.filter(fleet=fleet).delete()  # one DELETE, no per-row cascade collection
            fleet.delete()
    rows = len(batch.telemetry)
    result = {
        "database": connection.vendor,
        "rows": rows,
        "metrics": args.metrics,
        "devices": args.devices,
        "parse_seconds": round(parse_s, 3),
        "insert_seconds": round(insert_s, 3),
        "load_seconds": round(load_s, 3),
        "parse_rows_per_second": round(rows / parse_s),
        "insert_rows_per_second": round(rows / insert_s),
        "load_rows_per_second": round(rows / load_s),
        "round_trip_exact": bool(exact),
        "devices_created": summary.devices_created,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
