"""Scale-out scoring: split a fleet's devices into shards that N Celery workers score in parallel.

A fleet's scoring with its production model is split by device shard (a Celery chord: one
score_shard_task per shard on the ml queue, then merge_shard_scores_task), and gives the same scores,
labels and severities as one worker scoring every device (fleet_score), because a shard holds whole
cohorts: a sample's features depend only on its own device's history (rolling statistics, day-over-day
delta, residual) and on its cohort's median in the same time bucket (m_cohort_norm); the robust
scales, baselines and threshold come from the model's artifacts, never from the rows being scored.

Shards are balanced by device count with the greedy longest-processing-time rule (Graham, "Bounds on
multiprocessing timing anomalies", SIAM J. Appl. Math. 17(2), 1969): cohorts, largest first, each go
to the shard with the fewest devices so far. The split is deterministic, so a retried shard scores the
same devices. Nothing here writes to the database: the result is returned (JSON-able rows).
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import numpy as np
import pandas as pd

from .ingest.loader import load_telemetry_frame
from .ml.features import build_features
from .ml.pipeline import model_inputs
from .ml.scoring import score_frame
from .models import DEVICE_ATTRIBUTE_COLUMNS, Device, Fleet
from .serving import HISTORY_MARGIN, model_load

SCORE_COLUMNS = ["device_id", "timestamp", "anomaly_score", "label", "severity"]


def cohort_shards(devices: list[tuple[int, tuple]], n_shards: int) -> list[list[int]]:
    """Split devices into at most n_shards lists of device ids, never splitting a cohort.

    devices: [(device id, cohort key)], the cohort key being the tuple of the fleet's cohort
    attributes. Returns non-empty shards (fewer than n_shards when there are fewer cohorts), each
    sorted by id. Raises ValueError when n_shards < 1.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    cohorts: dict[tuple, list[int]] = defaultdict(list)
    for device_id, key in devices:
        cohorts[tuple(key)].append(int(device_id))
    shards: list[list[int]] = [[] for _ in range(min(n_shards, len(cohorts)))]
    for key in sorted(cohorts, key=lambda k: (-len(cohorts[k]), tuple(map(str, k)))):
        lightest = min(range(len(shards)), key=lambda i: (len(shards[i]), i))
        shards[lightest].extend(cohorts[key])
    return [sorted(s) for s in shards]


def fleet_shards(*, fleet: Fleet, n_shards: int) -> list[list[int]]:
    """cohort_shards over the fleet's devices, with the cohort columns of its production model."""
    columns = [c for c in model_load(fleet=fleet).config.features.cohort_columns if c in DEVICE_ATTRIBUTE_COLUMNS]
    rows = Device.objects.filter(fleet=fleet).order_by("pk").values_list("pk", *columns)
    return cohort_shards([(r[0], tuple(r[1:])) for r in rows], n_shards)


def score_devices(*, fleet: Fleet, device_ids: list[int] | None = None, start: datetime | None = None,
                  end: datetime | None = None) -> pd.DataFrame:
    """Score the stored samples of some devices (None: all) in [start, end] with the fleet's production
    model, as detection.serving does for one observation.

    The devices must be whole cohorts (a shard of fleet_shards) for their m_cohort_norm to match a
    whole-fleet scoring. History before `start` (rolling window + delta lag + margin) is read for the
    features and not scored. Returns rows x SCORE_COLUMNS (device_id int, timestamp UTC, anomaly_score
    float, label 1/-1, severity "" for normal rows), sorted by device then time.
    Raises serving.NoProductionModel (no production model) or ServingError (artifact unreadable).
    """
    loaded = model_load(fleet=fleet)
    config, metrics = loaded.config, fleet.metric_names
    lag = pd.Timedelta(config.features.delta_lag)
    lookback = max(pd.Timedelta(config.features.rolling_window), lag + lag / 4) + HISTORY_MARGIN
    load_from = None if start is None else pd.Timestamp(start) - lookback
    frame = load_telemetry_frame(fleet, start=load_from, end=end, device_ids=device_ids)
    if frame.empty:
        return pd.DataFrame(columns=SCORE_COLUMNS)
    ff = build_features(frame, metrics, config.features)
    usable = loaded.baselines.features if loaded.baselines is not None else loaded.model_features
    model_frame, _, _ = model_inputs(ff.frame, baselines=loaded.baselines, usable=usable, metrics=metrics,
                                     config=config)
    keep = np.ones(len(frame), dtype=bool) if start is None else \
        (frame["timestamp"] >= pd.Timestamp(start)).to_numpy()
    positions = np.flatnonzero(keep)
    result = score_frame(
        loaded.detector, model_frame.iloc[positions], explain=ff.frame.iloc[positions], features=usable,
        feature_metric=ff.feature_metric, metric_domain=fleet.metric_domains, baselines=loaded.baselines,
        level=config.z_level, top_k=config.top_k, severity_bands=config.severity_bands)
    return pd.DataFrame({
        "device_id": frame["device_id"].to_numpy()[positions].astype(np.int64),
        "timestamp": frame["timestamp"].to_numpy()[positions],
        "anomaly_score": np.asarray(result.scores, dtype=np.float64),
        "label": np.asarray(result.labels, dtype=np.int64),
        "severity": [s or "" for s in result.severity],
    }).sort_values(["device_id", "timestamp"], ignore_index=True)


def scores_to_rows(scores: pd.DataFrame) -> list[list]:
    """JSON-able rows [device_id, ISO timestamp, score, label, severity] for a Celery result."""
    return [[int(d), pd.Timestamp(t).isoformat(), float(s), int(lab), str(sev)]
            for d, t, s, lab, sev in scores[SCORE_COLUMNS].itertuples(index=False)]


def rows_to_scores(rows: list[list]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    return frame.sort_values(["device_id", "timestamp"], ignore_index=True)


def fleet_score(*, fleet: Fleet, start: datetime | None = None, end: datetime | None = None) -> pd.DataFrame:
    """One worker scores every device: the reference the sharded path must equal."""
    return score_devices(fleet=fleet, start=start, end=end)


def fleet_score_sharded(*, fleet: Fleet, n_shards: int, start: datetime | None = None,
                        end: datetime | None = None):
    """Fan the fleet's scoring out over Celery workers: a chord of score_shard_task (one per shard, ml
    queue) whose callback merge_shard_scores_task returns {"rows", "shards", "n_anomalies"}. Returns
    the chord's AsyncResult (.get() it; in-process, with tasks eager, it is already done).
    Raises NoProductionModel before anything is queued when the fleet has no production model."""
    from celery import chord

    from .tasks import merge_shard_scores_task, score_shard_task

    window = [None if t is None else pd.Timestamp(t).isoformat() for t in (start, end)]
    shards = fleet_shards(fleet=fleet, n_shards=n_shards)
    return chord(score_shard_task.s(fleet.pk, shard, *window) for shard in shards)(merge_shard_scores_task.s())
