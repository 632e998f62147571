"""Online scoring: score observations of known devices with a fleet's production model version.

Serving runs the same code as training, on the same inputs: the device's recent history is read
back with detection.ingest.loader.load_telemetry_frame, the observations are appended (replacing a
stored sample at the same timestamp), and the frame goes through build_features (with the
PipelineConfig.features saved in the model artifact, resid_scale included), then
detection.ml.pipeline.model_inputs (apply_baselines with the baseline artifact), then the detector's
score_samples and detection.ml.scoring.score_frame for labels, severity and top metrics. So an
observation equal to a stored sample gets the score the pipeline persisted for it.

Two things a sample's features depend on besides the sample itself are loaded with it:
- the device's own past, back to rolling window + delta lag (+ a quarter lag of merge_asof tolerance
  + a margin), for the rolling statistics, the day-over-day delta and the temporal residual;
- the other devices of its cohort in the same cohort bucket (1 h by default), for ``m_cohort_norm``.

Models and baselines are cached per process, keyed by (ModelVersion id, artifact checksum); a fleet
whose production version changes loads the new one on its next request and drops the old one.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from django.conf import settings

from baselines.engine import BaselineSet

from .choices import Label, ModelStatus
from .ingest.loader import load_telemetry_frame
from .ml.artifacts import ArtifactError, load_artifact
from .ml.features import build_features
from .ml.pipeline import PipelineConfig, model_inputs
from .ml.scoring import score_frame
from .models import DEVICE_ATTRIBUTE_COLUMNS, Device, Fleet, ModelVersion

# Extra history read before the window the features need, so that a sample just outside it (clock
# skew between devices and the server) is still found.
HISTORY_MARGIN = pd.Timedelta("1h")


class ServingError(Exception):
    """An observation cannot be scored. `field` names the request field (with the observation's
    index for a batch), `status` the HTTP status the API answers with."""

    def __init__(self, message: str, *, field: str, index: int | None = None, status: int = 400):
        self.field, self.index, self.status = field, index, status
        super().__init__(message)


class NoProductionModel(ServingError):
    """The fleet has no production model version yet: run the pipeline first (409)."""

    def __init__(self, fleet: Fleet):
        super().__init__(f"fleet {fleet.name!r} has no production model version; run the pipeline first",
                         field="fleet", status=409)


@dataclass(frozen=True)
class LoadedModel:
    """A production model version with its baselines, ready to score."""

    model_version: ModelVersion
    detector: Any
    config: PipelineConfig
    model_features: list[str]
    baselines: BaselineSet | None
    baseline_number: int | None
    score_spread: float  # training score quantile 0.99 - 0.5, scales `confidence`


_cache: dict[int, tuple[tuple[int, str], LoadedModel]] = {}  # fleet id -> ((version id, checksum), model)
_lock = threading.Lock()


def production_model_version(*, fleet: Fleet) -> ModelVersion | None:
    return (ModelVersion.objects.filter(fleet=fleet, status=ModelStatus.PRODUCTION)
            .select_related("baseline_version").order_by("-version").first())


def model_cache_info() -> dict[int, dict]:
    """{fleet id: {"model_version_id", "checksum"}} of what this process holds loaded."""
    return {fleet_id: {"model_version_id": key[0], "checksum": key[1]} for fleet_id, (key, _) in _cache.items()}


def model_cache_clear() -> None:
    with _lock:
        _cache.clear()


def model_load(*, fleet: Fleet) -> LoadedModel:
    """The fleet's production model (and its baseline version), from the cache or its artifacts.

    Raises NoProductionModel when there is none, ServingError (503) when an artifact is missing or
    fails its checksum.
    """
    version = production_model_version(fleet=fleet)
    if version is None:
        raise NoProductionModel(fleet)
    key = (version.pk, version.artifact_checksum)
    cached = _cache.get(fleet.pk)
    if cached is not None and cached[0] == key:
        return cached[1]
    with _lock:
        cached = _cache.get(fleet.pk)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            artifact = load_artifact(version.artifact_path, kind="model", checksum=version.artifact_checksum)
            baselines, number = None, None
            if version.baseline_version is not None:
                bv = version.baseline_version
                baselines = load_artifact(bv.artifact_path, kind="baselines", checksum=bv.artifact_checksum)
                number = bv.number
        except ArtifactError as exc:
            raise ServingError(f"model version {version.version} of fleet {fleet.name!r} cannot be loaded: {exc}",
                               field="fleet", status=503) from None
        quantiles = (version.metrics or {}).get("score_quantiles", {})
        q50, q99 = quantiles.get("0.5", quantiles.get(0.5)), quantiles.get("0.99", quantiles.get(0.99))
        spread = float(q99 - q50) if q50 is not None and q99 is not None and q99 > q50 else 1.0
        loaded = LoadedModel(version, artifact["detector"], artifact["config"], list(artifact["model_features"]),
                             baselines, number, spread)
        _cache[fleet.pk] = (key, loaded)  # replaces (and so releases) the fleet's previous version
        return loaded


def detect_observations(*, fleet: Fleet, observations: list[dict]) -> list[dict]:
    """Score observations of a fleet's known devices. Persists nothing: this is a scoring call, and
    neither telemetry nor an AnomalyResult is written.

    observations: [{"device_id": external id (str), "timestamp": aware datetime, "metrics":
        {metric name: finite float}}]; metrics left out are missing values (NaN), as in telemetry.
    Returns one dict per observation, in order: device_id, timestamp (ISO 8601), anomaly_score
    (higher = more anomalous), is_anomaly (score > the model's threshold), severity (critical/high/
    medium/low for anomalies, None otherwise), confidence, top_metrics (as AnomalyResult.top_metrics;
    [] for normal rows), model_version and baseline_version (numbers), processing_time_ms (wall time
    of this call, shared by the observations of a batch).

    confidence is how far the score lies from the threshold, on either side, in units of the spread
    of the training scores (their 0.99 quantile minus their median), clipped to [0, 1]: 0 on the
    threshold, 1 a full spread away or more.

    Raises ServingError naming the field (and index) for an unknown device, an unknown metric, a
    non-finite value or a repeated (device, timestamp); NoProductionModel when the fleet has none.
    """
    started = time.perf_counter()
    if not observations:
        return []
    metrics = fleet.metric_names
    known = set(metrics)
    external_ids = {str(o["device_id"]) for o in observations}
    devices = {d.external_id: d for d in Device.objects.filter(fleet=fleet, external_id__in=external_ids)}
    seen: set[tuple[str, pd.Timestamp]] = set()
    rows = []
    for i, obs in enumerate(observations):
        device = devices.get(str(obs["device_id"]))
        if device is None:
            raise ServingError(f"device {obs['device_id']!r} is not a device of fleet {fleet.name!r}",
                               field="device_id", index=i)
        unknown = sorted(set(obs["metrics"]) - known)
        if unknown:
            raise ServingError(f"unknown metric(s) {', '.join(unknown)}; fleet {fleet.name!r} has "
                               f"{', '.join(metrics)}", field="metrics", index=i)
        bad = [m for m, v in obs["metrics"].items() if v is not None and not np.isfinite(v)]
        if bad:
            raise ServingError(f"metric(s) {', '.join(sorted(bad))} must be finite numbers", field="metrics",
                               index=i)
        ts = _utc(obs["timestamp"])
        if (device.external_id, ts) in seen:
            raise ServingError(f"device {device.external_id!r} appears twice at {ts.isoformat()}",
                               field="timestamp", index=i)
        seen.add((device.external_id, ts))
        rows.append({"device_id": device.pk, **{c: getattr(device, c) for c in DEVICE_ATTRIBUTE_COLUMNS},
                     "external_id": device.external_id, "timestamp": ts,
                     **{m: obs["metrics"].get(m) for m in metrics}, "_obs": i})

    loaded = model_load(fleet=fleet)
    config = loaded.config
    frame = _frame_with_history(fleet, rows, metrics, config, devices.values())
    ff = build_features(frame.drop(columns="_obs"), metrics, config.features)
    usable = loaded.baselines.features if loaded.baselines is not None else loaded.model_features
    model_frame, _, _ = model_inputs(ff.frame, baselines=loaded.baselines, usable=usable, metrics=metrics,
                                     config=config)
    positions = np.flatnonzero(frame["_obs"].to_numpy() >= 0)
    order = frame["_obs"].to_numpy()[positions]
    result = score_frame(
        loaded.detector, model_frame.iloc[positions], explain=ff.frame.iloc[positions], features=usable,
        feature_metric=ff.feature_metric, metric_domain=fleet.metric_domains, baselines=loaded.baselines,
        level=config.z_level, top_k=config.top_k, severity_bands=config.severity_bands)
    elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
    out: list[dict | None] = [None] * len(observations)
    for k, i in enumerate(order):
        score = float(result.scores[k])
        out[int(i)] = {
            "device_id": rows[int(i)]["external_id"],
            "timestamp": rows[int(i)]["timestamp"].isoformat(),
            "anomaly_score": score,
            "is_anomaly": bool(result.labels[k] == Label.ANOMALY),
            "severity": result.severity[k] or None,
            "confidence": round(float(min(abs(score - result.threshold) / loaded.score_spread, 1.0)), 4),
            "top_metrics": result.top_metrics[k],
            "model_version": loaded.model_version.version,
            "baseline_version": loaded.baseline_number,
            "processing_time_ms": elapsed_ms,
        }
    return out


def _utc(value: datetime | str) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _frame_with_history(fleet: Fleet, rows: list[dict], metrics: list[str], config: PipelineConfig,
                        devices) -> pd.DataFrame:
    """History of the observed devices and their cohort peers, with the observations in place of any
    stored sample at the same (device, timestamp); sorted as build_features needs. `_obs` holds the
    observation's index, -1 for stored rows."""
    features = config.features
    lag = pd.Timedelta(features.delta_lag)
    lookback = max(pd.Timedelta(features.rolling_window), lag + lag / 4) + HISTORY_MARGIN
    stamps = pd.DatetimeIndex([r["timestamp"] for r in rows])
    bucket = pd.Timedelta(features.cohort_bucket)
    bucket_start, bucket_end = stamps.min().floor(bucket), stamps.max().floor(bucket) + bucket
    own_ids = sorted({d.pk for d in devices})
    parts = [load_telemetry_frame(fleet, start=stamps.min() - lookback, end=bucket_end, device_ids=own_ids)]
    # m_cohort_norm: the median of the device's cohort in the same bucket, so the peers' samples there.
    cohort_cols = [c for c in features.cohort_columns if c in DEVICE_ATTRIBUTE_COLUMNS]
    peers = Device.objects.filter(fleet=fleet).exclude(pk__in=own_ids)
    if cohort_cols:
        from django.db.models import Q

        match = Q(pk__in=[])
        for key in {tuple(getattr(d, c) for c in cohort_cols) for d in devices}:
            match |= Q(**dict(zip(cohort_cols, key)))
        peers = peers.filter(match)
    peer_ids = list(peers.values_list("pk", flat=True))
    if peer_ids:
        parts.append(load_telemetry_frame(fleet, start=bucket_start, end=bucket_end, device_ids=peer_ids))
    stored = pd.concat(parts, ignore_index=True)
    stored["_obs"] = -1
    new = pd.DataFrame(rows, columns=list(stored.columns))
    new = new.astype({"device_id": np.int64, **dict.fromkeys(metrics, np.float64)})
    new["timestamp"] = pd.to_datetime(new["timestamp"], utc=True).astype(stored["timestamp"].dtype)
    frame = pd.concat([stored, new], ignore_index=True)
    frame = frame.drop_duplicates(["device_id", "timestamp"], keep="last")  # the observation wins
    return frame.sort_values(["device_id", "timestamp"], kind="stable", ignore_index=True)
