"""Pipeline benchmark: a synthetic fleet of --devices x --days hourly samples (8 metrics) is
generated, ingested and run through the whole pipeline on whatever DATABASE_URL selects
(the embedded SQLite default when unset).

    python benchmarks/pipeline.py --devices 1000 --days 42 [--json FILE]

Reports seconds and rows/s per stage and the process's peak resident memory (ru_maxrss).
The scratch fleet is deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=int, default=42)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from detection.ingest.loader import ingest_batch
    from detection.ingest.synthetic import generate_fleet
    from detection.models import Fleet
    from detection.services import fleet_delete, pipeline_run_create, pipeline_run_execute

    call_command("migrate", verbosity=0)
    name = f"bench-{args.devices}x{args.days}"
    if (old := Fleet.objects.filter(name=name).first()) is not None:
        fleet_delete(fleet=old)

    stages: dict[str, dict] = {}
    start = time.perf_counter()
    batch = generate_fleet(devices=args.devices, days=args.days, seed=args.seed)
    rows = len(batch.telemetry)
    stages["generate"] = {"seconds": time.perf_counter() - start, "rows": rows}
    start = time.perf_counter()
    ingest_batch(batch=batch, fleet_name=name)
    stages["ingest_write"] = {"seconds": time.perf_counter() - start, "rows": rows}
    del batch
    fleet = Fleet.objects.get(name=name)
    run = pipeline_run_create(fleet=fleet)
    run = pipeline_run_execute(run_id=run.id)
    if run.status != "succeeded":
        sys.exit(f"pipeline run {run.id} ended {run.status}: {run.error}")
    for stage, seconds in run.stage_timings.items():
        stages[f"pipeline_{stage}"] = {"seconds": seconds, "rows": run.row_counts.get(stage, 0)}
    pipeline_total = sum(run.stage_timings.values())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fleet_delete(fleet=fleet)

    report = {
        "database": connection.vendor, "devices": args.devices, "days": args.days, "rows": rows,
        "metrics": 8, "cpu_count": os.cpu_count(),
        "stages": {k: {"seconds": round(v["seconds"], 3), "rows": v["rows"],
                       "rows_per_s": round(v["rows"] / v["seconds"]) if v["seconds"] else None}
                   for k, v in stages.items()},
        "pipeline_seconds": round(pipeline_total, 2), "anomalies": run.n_anomalies,
        "peak_rss_mb": round(peak_mb),
    }
    print(f"{connection.vendor}: {rows:,} rows ({args.devices} devices x {args.days} days, 8 metrics)")
    for k, v in report["stages"].items():
        print(f"  {k:<20} {v['seconds']:8.2f}s  {v['rows_per_s'] or 0:>12,} rows/s")
    print(f"  pipeline total       {pipeline_total:8.2f}s   peak RSS {peak_mb:,.0f} MB")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
