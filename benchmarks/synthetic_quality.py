"""Detection quality on the synthetic demo fleet, whose injected anomalies are labelled.

    python benchmarks/synthetic_quality.py [--devices 60 --days 14 --seed 7] [--json FILE]

For each detector (isolation_forest, hybrid) and baseline level (global, cohort), it generates
the fleet into a scratch fleet, runs the pipeline and reports: injected windows flagged (at least
one flagged row inside), row precision and recall against the windows, and the false-positive
rate of the special cohort (normal but unlike the rest) relative to the other devices'.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=60)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    import django

    django.setup()
    import pandas as pd
    from django.core.management import call_command

    from detection.ingest.loader import ingest_batch, load_ground_truth
    from detection.ingest.synthetic import SPECIAL_COHORT, generate_fleet
    from detection.ml.evaluation import binary_metrics, in_windows
    from detection.models import AnomalyResult, Fleet
    from detection.services import fleet_delete, pipeline_run_create, pipeline_run_execute

    call_command("migrate", verbosity=0)
    batch = generate_fleet(devices=args.devices, days=args.days, seed=args.seed)
    rows = []
    for algorithm in ("isolation_forest", "hybrid", "ensemble"):
        for z_level in ("global", "cohort"):
            name = f"quality-{algorithm.replace('_', '-')}-{z_level}"
            if (old := Fleet.objects.filter(name=name).first()) is not None:
                fleet_delete(fleet=old)
            ingest_batch(batch=batch, fleet_name=name)
            fleet = Fleet.objects.get(name=name)
            fleet.config = {"algorithm": algorithm, "z_level": z_level}
            fleet.save()
            run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
            scored = pd.DataFrame.from_records(AnomalyResult.objects.filter(run=run).values(
                "device_id", "timestamp", "label", "device__model"))
            scored["timestamp"] = pd.to_datetime(scored["timestamp"], utc=True)
            truth_windows = load_ground_truth(fleet)
            truth = in_windows(scored, truth_windows)
            flagged = (scored["label"] == -1).to_numpy()
            m = binary_metrics(truth, flagged)
            windows = sum(flagged[(scored.device_id == w.device_id).to_numpy()
                                  & scored.timestamp.between(w.start, w.end).to_numpy()].any()
                          for w in truth_windows.itertuples())
            special = (scored["device__model"] == SPECIAL_COHORT[1]).to_numpy()
            fp_special = flagged[special & ~truth].mean()
            fp_other = flagged[~special & ~truth].mean()
            rows.append({"detector": algorithm, "baselines": z_level, "windows_flagged": int(windows),
                         "windows": len(truth_windows), "precision": round(m.precision, 3),
                         "recall": round(m.recall, 3), "f1": round(m.f1, 3),
                         "special_cohort_fp_ratio": round(float(fp_special / fp_other), 2)})
            fleet_delete(fleet=fleet)
    print(f"{args.devices} devices x {args.days} days, seed {args.seed}: {len(batch.telemetry):,} rows, "
          f"{len(batch.labels)} injected windows")
    print(f"{'detector':<18}{'baselines':<10}{'windows':>9}{'precision':>11}{'recall':>8}{'F1':>7}{'S21 FP x':>10}")
    for r in rows:
        print(f"{r['detector']:<18}{r['baselines']:<10}{r['windows_flagged']:>4}/{r['windows']:<4}"
              f"{r['precision']:>11.3f}{r['recall']:>8.3f}{r['f1']:>7.3f}{r['special_cohort_fp_ratio']:>10.2f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
