"""Benchmark evaluation on labelled public data, through the same pipeline users run.

evaluate_skab ingests SKAB files into a scratch fleet, runs the pipeline with SKAB's protocol
(train on the first 400 rows of each file, the normal part; score the rest) and scores the
persisted decisions against the `anomaly` column.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from django.utils import timezone

from .choices import RunStatus, Trigger
from .ingest.loader import ingest_batch, load_ground_truth
from .ingest.readers import read_skab
from .ml.evaluation import BinaryMetrics, binary_metrics, in_windows
from .models import AnomalyResult, Fleet
from .services import fleet_delete, pipeline_run_create, pipeline_run_execute

SKAB_TRAIN_ROWS = 400
# SKAB samples once a second and each file lasts ~20 minutes: windows in seconds, not hours.
SKAB_FLEET_CONFIG = {
    "rolling_window": "60s", "delta_lag": "600s", "cohort_bucket": "1s",
    # Each file is its own experiment with its own operating point: normalise each against its
    # own reference period (device level).
    "z_level": "device",
    # The reference period is 400 s: a device baseline from it cannot stand for the rest of the
    # experiment, so the hybrid's temporal part compares each second with the previous window.
    "hybrid_temporal": "residual",
    "hybrid_temporal_weight": 0.5,
}


class EvaluationError(Exception):
    """The evaluation could not run; the message says why."""


@dataclass
class EvaluationResult:
    dataset: str
    metrics: BinaryMetrics
    files: int
    scored_rows: int
    run_id: int
    seconds: float
    config: dict
    per_file: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, **self.metrics.as_dict(), "files": self.files,
                "scored_rows": self.scored_rows, "run_id": self.run_id, "seconds": round(self.seconds, 2),
                "config": self.config, "per_file": self.per_file, "warnings": self.warnings}


def evaluate_skab(*, path: Path | str, predictions_dir: Path | str | None = None, keep: bool = False,
                  config: dict | None = None, progress=None) -> EvaluationResult:
    """Run SKAB's protocol on every labelled SKAB file under `path`.

    Files without an `anomaly` column (anomaly-free.csv) are not scored. With predictions_dir,
    one CSV per file (datetime, anomaly 0/1) is written there. Raises EvaluationError (and
    detection.ingest.IngestError for unreadable files).
    """
    started = time.perf_counter()
    batch = read_skab(path)
    labelled = set(batch.labels["external_id"])
    if not labelled:
        raise EvaluationError(f"no labelled SKAB file (with an 'anomaly' column) under {path}")
    keep_devices = batch.devices["external_id"].isin(labelled)
    batch.devices = batch.devices[keep_devices].reset_index(drop=True)
    batch.telemetry = batch.telemetry[batch.telemetry["external_id"].isin(labelled)].reset_index(drop=True)
    fleet_config = {**SKAB_FLEET_CONFIG, **(config or {})}
    name = f"eval-skab-{timezone.now():%Y%m%d%H%M%S%f}"
    ingest_batch(batch=batch, fleet_name=name, description=f"SKAB evaluation scratch fleet from {path}")
    fleet = Fleet.objects.get(name=name)
    fleet.config = fleet_config
    fleet.save(update_fields=["config"])
    try:
        run = pipeline_run_create(fleet=fleet, trigger=Trigger.EVALUATION,
                                  params={"train_rows_per_device": SKAB_TRAIN_ROWS, "score": "after_training"})
        run = pipeline_run_execute(run_id=run.id, progress=progress)
        if run.status != RunStatus.SUCCEEDED:
            raise EvaluationError(f"pipeline run {run.id} ended {run.status}: {run.error}")
        scored = pd.DataFrame.from_records(
            AnomalyResult.objects.filter(run=run).order_by("device_id", "timestamp")
            .values_list("device_id", "device__external_id", "timestamp", "label"),
            columns=["device_id", "external_id", "timestamp", "label"])
        scored["timestamp"] = pd.to_datetime(scored["timestamp"], utc=True)
        truth = in_windows(scored, load_ground_truth(fleet))
        predicted = (scored["label"] == -1).to_numpy()
        per_file = {}
        for ext, idx in scored.groupby("external_id").indices.items():
            per_file[ext] = binary_metrics(truth[idx], predicted[idx]).as_dict()
        if predictions_dir:
            _write_predictions(Path(predictions_dir), scored, predicted)
        return EvaluationResult("skab", binary_metrics(truth, predicted), len(per_file), len(scored), run.id,
                                time.perf_counter() - started, {**fleet.detection_config()}, per_file,
                                list(run.warnings))
    finally:
        if not keep:
            fleet_delete(fleet=fleet)


def _write_predictions(folder: Path, scored: pd.DataFrame, predicted) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = scored.assign(anomaly=predicted.astype(int))
    for ext, group in out.groupby("external_id"):
        target = folder / f"{ext.replace('/', '_')}.csv"
        frame = pd.DataFrame({"datetime": group["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"),
                              "anomaly": group["anomaly"]})
        frame.to_csv(target, index=False)
