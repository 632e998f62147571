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
whose production version changes loads the new one on its next request and drops the old one. The
baselines' per-level lookup tables are built with them (CachedBaselineSet), not on every call.

The online path. A model whose detector is the hybrid or the isolation forest one (with StackedForest)
also gets a detection.ml.online.OnlineModel when it is loaded (baseline lookup dicts, detector arrays).
A call then reads the same history as above in one raw SQL query returning arrays (SQLite or
PostgreSQL), merges the observations in and computes features, model inputs, scores and explanations
for the observations' rows in numpy: the same answers as the pandas path (tests/test_serving_fast.py)
at ~1 ms a call instead of ~40 ms. The devices and the production version's (id, checksum) are read
together in one small raw query, so a promotion is picked up on the next request. Anything else (another
detector, no baselines, another database; FAST_PATH off) goes through the pandas path, unchanged.
"""
from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from django.conf import settings
from django.db import connections
from django.db.models.signals import post_delete, post_save

from baselines.engine import BaselineSet

from .choices import Label, ModelStatus
from .ingest.base import DEVICE_COLUMNS, METRIC_NAME_RE
from .ingest.loader import load_telemetry_frame
from .ml.artifacts import ArtifactError, load_artifact
from .ml.features import build_features
from .ml.online import History, OnlineModel, Unsupported, merge_observations
from .ml.pipeline import PipelineConfig, model_inputs
from .ml.scoring import ScoreResult, score_frame
from .models import DEVICE_ATTRIBUTE_COLUMNS, Device, Fleet, ModelVersion, Telemetry

logger = logging.getLogger(__name__)

# Extra history read before the window the features need, so that a sample just outside it (clock
# skew between devices and the server) is still found.
HISTORY_MARGIN = pd.Timedelta("1h")
# Score with detection.ml.online when the model supports it (False: always the pandas path, the
# reference the online path is tested against).
FAST_PATH = True


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
    # detection.ml.online's precomputed model (baseline lookup tables, detector arrays), None when
    # the model needs the pandas path (another detector, no baselines, ...).
    online: OnlineModel | None = None


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
        _fleets.clear()
        _devices.clear()
        _production.clear()


# Fleet definitions (name -> Fleet) as a scoring call last read them, for FLEET_CACHE_SECONDS: the
# ORM read of a Fleet (its JSON schema and config parsed) was about a sixth of a /detect call's CPU.
# A fleet saved in this process is dropped at once (post_save); one edited elsewhere (the admin,
# another worker) is seen here within that time.
FLEET_CACHE_SECONDS = 10.0
_fleets: dict[str, tuple[float, Fleet]] = {}
# The same for a fleet's devices as scoring reads them (_devices_and_production), and for which model
# version is the fleet's production one: a promotion or rollback in this process is seen at once
# (post_save), one made by another process within settings.VIGIL_SERVING_PRODUCTION_CACHE_SECONDS.
DEVICE_CACHE_SECONDS = FLEET_CACHE_SECONDS
_devices: dict[int, dict[str, tuple[float, "_DeviceRow"]]] = {}  # fleet id -> {external id: (expiry, row)}
_production: dict[int, tuple[float, tuple[int, str] | None]] = {}  # fleet id -> (expiry, (id, checksum))


def _unexpired(cache: dict, keys, now: float) -> tuple[dict, list]:
    """({key: value} of `keys` that `cache` ({key: (expiry, value)}) holds unexpired at `now`, the
    other keys)."""
    found, missing = {}, []
    for key in keys:
        hit = cache.get(key)
        if hit is not None and hit[0] > now:
            found[key] = hit[1]
        else:
            missing.append(key)
    return found, missing


def fleets_by_name(names) -> dict[str, Fleet]:
    """{name: Fleet} for those of `names` that exist, from this process's cache or one query."""
    now = time.monotonic()
    found, missing = _unexpired(_fleets, names, now)
    if missing:
        for fleet in Fleet.objects.filter(name__in=missing):
            found[fleet.name] = fleet
            with _lock:
                _fleets[fleet.name] = (now + FLEET_CACHE_SECONDS, fleet)
    return found


def _forget_fleet(sender, instance: Fleet, **kwargs) -> None:
    with _lock:
        for name in [n for n, (_, f) in _fleets.items() if f.pk == instance.pk or n == instance.name]:
            del _fleets[name]  # a renamed fleet is forgotten under its old name too
        _devices.pop(instance.pk, None)  # a fleet deleted and made again may get the same id (SQLite)
        _production.pop(instance.pk, None)


post_save.connect(_forget_fleet, sender=Fleet, dispatch_uid="serving-forget-fleet-save")
post_delete.connect(_forget_fleet, sender=Fleet, dispatch_uid="serving-forget-fleet-delete")


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
                baselines = CachedBaselineSet.of(
                    load_artifact(bv.artifact_path, kind="baselines", checksum=bv.artifact_checksum))
                number = bv.number
        except ArtifactError as exc:
            raise ServingError(f"model version {version.version} of fleet {fleet.name!r} cannot be loaded: {exc}",
                               field="fleet", status=503) from None
        quantiles = (version.metrics or {}).get("score_quantiles", {})
        q50, q99 = quantiles.get("0.5", quantiles.get(0.5)), quantiles.get("0.99", quantiles.get(0.99))
        spread = float(q99 - q50) if q50 is not None and q99 is not None and q99 > q50 else 1.0
        detector = _single_threaded(artifact["detector"])
        loaded = LoadedModel(version, detector, artifact["config"], list(artifact["model_features"]), baselines,
                             number, spread, _online_model(detector, artifact["config"], baselines, fleet))
        _cache[fleet.pk] = (key, loaded)  # replaces (and so releases) the fleet's previous version
        return loaded


def _online_model(detector, config: PipelineConfig, baselines, fleet: Fleet) -> OnlineModel | None:
    """The model's detection.ml.online form, or None (logged) when it needs the pandas path."""
    try:
        return OnlineModel(detector=detector, config=config, baselines=baselines, metrics=fleet.metric_names,
                           forest_type=StackedForest)
    except Unsupported as exc:
        logger.info("fleet %s: model scored by the pandas path (%s)", fleet.name, exc)
        return None


def _production_model(fleet: Fleet, key: tuple[int, str] | None) -> LoadedModel:
    """model_load without its queries when the cached version is still the production one: `key` is
    the (id, artifact checksum) of the fleet's production version as just read (_devices_and_production),
    None when there is none. Another version (a promotion, a rollback) goes through model_load, which
    loads it. Raises NoProductionModel, or model_load's ServingError."""
    if key is None:
        raise NoProductionModel(fleet)
    cached = _cache.get(fleet.pk)
    if cached is not None and cached[0] == key:
        return cached[1]
    return model_load(fleet=fleet)


def _fetch(connection, sql: str, params: list) -> list[tuple]:
    """Rows of a raw query (%s placeholders) on the DB-API cursor: no ORM, no per-row converters."""
    with connection.cursor() as cursor, connection.wrap_database_errors:
        if connection.vendor == "sqlite":
            # sqlite3's own execute, with qmarks: Django's cursor wrapper rewrites %s with a regex
            # on every call, which costs as much as these indexed queries.
            sqlite3.Cursor.execute(cursor.cursor, sql.replace("%s", "?"), params)
        else:
            # A server-side binding cursor of psycopg, prepared: PostgreSQL parses and plans these
            # queries once per connection instead of on every request (Django's own cursors bind on
            # the client, which cannot prepare).
            with psycopg.Cursor(cursor.cursor.connection) as prepared:
                prepared.execute(sql, params, prepare=True)
                return prepared.fetchall()
        return cursor.cursor.fetchall()


class CachedBaselineSet(BaselineSet):
    """A BaselineSet whose wide tables (BaselineSet.table) are built once, when the model version is
    loaded, instead of on every lookup.

    table() pivots the long stats frame and parses each group key's JSON: ~8 ms a call, and a /detect
    call made 4 to 6 of them (apply_baselines, and lookup with fall-back levels for top metrics), for
    statistics that only change with the baseline version, i.e. with the cache key. Callers only read
    the tables (column selection and .replace make copies), so sharing them between requests is safe.
    Lookups, and so scores, are those of baselines.engine.lookup on the same tables.
    """

    @classmethod
    def of(cls, baselines: BaselineSet) -> CachedBaselineSet:
        import dataclasses

        cached = cls(**{f.name: getattr(baselines, f.name) for f in dataclasses.fields(BaselineSet)
                        if hasattr(baselines, f.name)})  # sets pickled before `overrides` lack it
        cached._tables = {(level, what): BaselineSet.table(cached, level, what)
                          for level in cached.levels for what in ("median", "mad", "fallback_level")}
        return cached

    def table(self, level: str, what: str) -> pd.DataFrame:
        found = getattr(self, "_tables", {}).get((level, what))  # a dataclasses.replace() copy has none
        return found if found is not None else super().table(level, what)


def _single_threaded(detector):
    """The detector with n_jobs=1. A scoring call holds a handful of rows, for which a joblib thread
    pool costs more than it saves (measured: ~160 ms of pool start-up per /detect call with n_jobs=2),
    and concurrent requests are already spread over the server's workers. Scores are unchanged."""
    import dataclasses

    config = getattr(detector, "config", None)
    if dataclasses.is_dataclass(config) and getattr(config, "n_jobs", 1) != 1:
        detector.config = dataclasses.replace(config, n_jobs=1)
    forest = getattr(detector, "forest_", None)
    if forest is not None and hasattr(forest, "n_jobs"):
        forest.n_jobs = 1
        if StackedForest.supports(forest):
            detector.forest_ = StackedForest(forest)
    return detector


class StackedForest:
    """A fitted sklearn IsolationForest whose score_samples walks all trees at once in numpy.

    sklearn scores tree by tree (apply + path lengths per tree, ~0.5 ms of Python per tree), which
    dominates a /detect call on a few rows: 300 trees cost ~150 ms. Here the trees' nodes are stacked
    into flat arrays and rows x trees descend together, one vectorised step per level (at most
    max_depth steps), in chunks of CHUNK_ROWS rows. Same definition as sklearn (Liu, Ting and Zhou,
    "Isolation Forest", ICDM 2008): a row's depth in a tree is its leaf's depth plus c(n) of the
    training samples left in that leaf, minus 1 (sklearn's _decision_path_lengths and
    _average_path_length_per_tree), and score_samples = -2 ** (-mean depth / c(max_samples)), so the
    scores equal sklearn's up to float summation order (|difference| < 1e-12). Every other attribute is
    the wrapped forest's.
    """

    CHUNK_ROWS = 2048
    # From this many rows on, sklearn's own tree-by-tree walk (Cython, per tree) is the faster one: its
    # fixed ~0.05 ms a tree is then spread over enough rows (300 trees, 2,000 rows: 36 ms against 57 ms
    # here; 500 rows: 19 ms against 15 ms). Stream micro-batches are this large, /detect calls are not.
    SKLEARN_ROWS = 1000

    @staticmethod
    def supports(forest) -> bool:
        return all(hasattr(forest, a) for a in ("estimators_", "estimators_features_", "_decision_path_lengths",
                                                "_average_path_length_per_tree", "_max_samples", "_max_features",
                                                "n_features_in_"))

    def __init__(self, forest):
        from sklearn.ensemble._iforest import _average_path_length

        self._forest = forest
        trees = [e.tree_ for e in forest.estimators_]
        offsets = np.cumsum([0] + [t.node_count for t in trees[:-1]])
        self._roots = offsets.astype(np.int64)
        subsample = forest._max_features != forest.n_features_in_
        lefts, rights, features, thresholds, leaf_depths = [], [], [], [], []
        for k, (tree, offset) in enumerate(zip(trees, offsets)):
            leaf = tree.children_left == -1
            # A leaf points to itself and sends every row left (threshold +inf), so rows that reach
            # their leaf early stay there while the others descend: no per-level test for leaves.
            own = np.arange(tree.node_count) + offset
            lefts.append(np.where(leaf, own, tree.children_left + offset))
            rights.append(np.where(leaf, own, tree.children_right + offset))
            # sklearn only indexes a tree's own features when the forest subsamples them
            columns = np.asarray(forest.estimators_features_[k]) if subsample else np.arange(forest.n_features_in_)
            features.append(np.where(leaf, 0, columns[np.maximum(tree.feature, 0)]))
            thresholds.append(np.where(leaf, np.inf, tree.threshold))
            leaf_depths.append(np.asarray(forest._decision_path_lengths[k], dtype=np.float64)
                               + np.asarray(forest._average_path_length_per_tree[k], dtype=np.float64) - 1.0)
        self._left, self._right = np.concatenate(lefts).astype(np.int64), np.concatenate(rights).astype(np.int64)
        self._feature, self._threshold = np.concatenate(features).astype(np.int64), np.concatenate(thresholds)
        self._leaf_depth = np.concatenate(leaf_depths)
        self._levels = max(t.max_depth for t in trees)
        self._denominator = len(trees) * float(_average_path_length([forest._max_samples])[0])

    def __getattr__(self, name):
        return getattr(self._forest, name)

    def score_samples(self, X) -> np.ndarray:
        """As IsolationForest.score_samples: X rows x the forest's features; lower is more abnormal."""
        X = np.asarray(X, dtype=np.float32)
        if len(X) >= self.SKLEARN_ROWS:
            return self._forest.score_samples(X)
        depths = np.concatenate([self._depths(X[i:i + self.CHUNK_ROWS])
                                 for i in range(0, len(X), self.CHUNK_ROWS)]) if len(X) else np.zeros(0)
        if self._denominator == 0:
            return -np.ones_like(depths)
        return -(2 ** (-depths / self._denominator))

    def _depths(self, X: np.ndarray) -> np.ndarray:
        # float32 values compared as float64 with the float64 thresholds, as sklearn's Tree.apply does
        X = X.astype(np.float64)
        if len(X) == 1:  # one /detect observation: 1-d arrays, a handful of numpy calls per level
            x, node = X[0], self._roots
            for _ in range(self._levels):
                node = np.where(x[self._feature[node]] <= self._threshold[node], self._left[node], self._right[node])
            return self._leaf_depth[node].sum()[None]
        node = np.repeat(self._roots[None, :], len(X), axis=0)
        rows = np.arange(len(X))[:, None]
        for _ in range(self._levels):
            node = np.where(X[rows, self._feature[node]] <= self._threshold[node], self._left[node],
                            self._right[node])
        return self._leaf_depth[node].sum(axis=1)


def detect_observations(*, fleet: Fleet, observations: list[dict]) -> list[dict]:
    """Score observations of a fleet's known devices. Persists nothing: this is a scoring call, and
    neither telemetry nor an AnomalyResult is written.

    observations: [{"device_id": external id (str), "timestamp": aware datetime, "metrics":
        {metric name: finite float}}]; metrics left out are missing values (NaN), as in telemetry.
    Returns one dict per observation, in order: device_id, timestamp (ISO 8601), anomaly_score
    (higher = more anomalous), is_anomaly (score > the model's threshold), severity (critical/high/
    medium/low for anomalies, None otherwise), confidence, agreement, top_metrics (as
    AnomalyResult.top_metrics; [] for normal rows), model_version and baseline_version (numbers),
    processing_time_ms (wall time of this call, shared by the observations of a batch).

    confidence: for an ensemble (or auto) model, the detectors' agreement with the label: the
    weighted share of member detectors that flag the row (agreement, also returned) for an anomaly,
    one minus it for a normal row. For a single detector, how far the score lies from the
    threshold, on either side, in units of the spread of the training scores (their 0.99 quantile
    minus their median), clipped to [0, 1]: 0 on the threshold, 1 a full spread away or more;
    agreement is then None.

    Raises ServingError naming the field (and index) for an unknown device, an unknown metric, a
    non-finite value or a repeated (device, timestamp); NoProductionModel when the fleet has none.
    """
    started = time.perf_counter()
    if not observations:
        return []
    metrics = fleet.metric_names
    known = set(metrics)
    devices, production = _devices_and_production(fleet, {str(o["device_id"]) for o in observations})
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

    loaded = _production_model(fleet, production)
    result = None
    if FAST_PATH and loaded.online is not None and loaded.online.metrics == metrics:
        try:
            result = _score_online(fleet, loaded.online, rows, metrics, devices)
        except Unsupported as exc:
            logger.debug("fleet %s: pandas path for this call (%s)", fleet.name, exc)
    if result is None:
        result, order = _score_frame(fleet, loaded, rows, metrics, devices)
    else:
        order = np.arange(len(rows))
    elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
    out: list[dict | None] = [None] * len(observations)
    for k, i in enumerate(order.tolist()):
        score = float(result.scores[k])
        anomaly = bool(result.labels[k] == Label.ANOMALY)
        agreement = None if result.agreement is None else round(float(result.agreement[k]), 4)
        if agreement is None:
            confidence = round(float(min(abs(score - result.threshold) / loaded.score_spread, 1.0)), 4)
        else:
            confidence = agreement if anomaly else round(1.0 - agreement, 4)
        out[i] = {
            "device_id": rows[i]["external_id"],
            "timestamp": rows[i]["timestamp"].isoformat(),
            "anomaly_score": score,
            "is_anomaly": anomaly,
            "severity": result.severity[k] or None,
            "confidence": confidence,
            "agreement": agreement,
            "top_metrics": result.top_metrics[k],
            "model_version": loaded.model_version.version,
            "baseline_version": loaded.baseline_number,
            "processing_time_ms": elapsed_ms,
        }
    return out


@dataclass(frozen=True)
class _DeviceRow:
    """A fleet device as serving reads it (the Device columns it uses, pk included)."""

    pk: int
    external_id: str
    manufacturer: str
    model: str
    os_version: str
    store: str
    customer: str

    def attributes(self) -> dict[str, str]:
        return {c: getattr(self, c) for c in DEVICE_COLUMNS}


def _devices_and_production(fleet: Fleet, external_ids: set[str]
                            ) -> tuple[dict[str, _DeviceRow], tuple[int, str] | None]:
    """({external id: device} of the fleet's devices among `external_ids`, (id, artifact checksum) of
    the fleet's production model version or None).

    Both come from this process's cache when it holds them (devices for DEVICE_CACHE_SECONDS, the
    production pointer for settings.VIGIL_SERVING_PRODUCTION_CACHE_SECONDS); what it lacks is read
    in one raw query, a round trip less than two. On PostgreSQL at 300 requests/s, that query was a third of the database's
    work and, with the server on the same two cores, took /detect's p99 from ~30 ms to over 100 ms.
    An unknown external id is looked up again on every call, so a device added anywhere scores at once.
    """
    now = time.monotonic()
    devices, missing = _unexpired(_devices.get(fleet.pk, {}), external_ids, now)
    production = _production.get(fleet.pk)
    if not missing and production is not None and production[0] > now:
        return devices, production[1]
    connection = connections[Device.objects.db]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(c) for c in ["id", *DEVICE_COLUMNS])
    blanks = ", NULL" * (len(DEVICE_COLUMNS) - 1)
    ids, param = _id_list(connection, sorted(missing))
    rows = _fetch(connection,
                  f"SELECT 0, {columns} FROM {quote(Device._meta.db_table)} WHERE fleet_id = %s AND external_id {ids} "
                  f"UNION ALL SELECT 1, v.id, v.artifact_checksum{blanks} FROM (SELECT id, artifact_checksum FROM "
                  f"{quote(ModelVersion._meta.db_table)} WHERE fleet_id = %s AND status = %s ORDER BY version DESC "
                  f"LIMIT 1) v", [fleet.pk, param, fleet.pk, ModelStatus.PRODUCTION.value])
    read = {r[2]: _DeviceRow(*r[1:]) for r in rows if r[0] == 0}
    pointer = next(((r[1], r[2]) for r in rows if r[0] == 1), None)
    with _lock:
        _devices.setdefault(fleet.pk, {}).update(
            (external_id, (now + DEVICE_CACHE_SECONDS, device)) for external_id, device in read.items())
        _production[fleet.pk] = (now + float(settings.VIGIL_SERVING_PRODUCTION_CACHE_SECONDS), pointer)
    return {**devices, **read}, pointer


def _forget_device(sender, instance: Device, **kwargs) -> None:
    with _lock:
        known = _devices.get(instance.fleet_id, {})
        for external_id in [e for e, (_, d) in known.items() if d.pk == instance.pk or e == instance.external_id]:
            del known[external_id]


def _forget_production(sender, instance: ModelVersion, **kwargs) -> None:
    with _lock:
        _production.pop(instance.fleet_id, None)


post_save.connect(_forget_device, sender=Device, dispatch_uid="serving-forget-device-save")
post_delete.connect(_forget_device, sender=Device, dispatch_uid="serving-forget-device-delete")
post_save.connect(_forget_production, sender=ModelVersion, dispatch_uid="serving-forget-production-save")
post_delete.connect(_forget_production, sender=ModelVersion, dispatch_uid="serving-forget-production-delete")


def _id_list(connection, values: list) -> tuple[str, object]:
    """A membership test for a list of values as one parameter: (SQL after the column, parameter)."""
    if connection.vendor == "postgresql":
        return "= ANY(%s)", list(values)
    return "IN (SELECT value FROM json_each(%s))", json.dumps(list(values))


def _score_frame(fleet: Fleet, loaded: LoadedModel, rows: list[dict], metrics: list[str], devices: dict
                 ) -> tuple[ScoreResult, np.ndarray]:
    """The pandas path: the observations with their history through build_features, model_inputs and
    score_frame, as the pipeline scores stored rows. Returns (result, observation index per result row)."""
    config = loaded.config
    frame = _frame_with_history(fleet, rows, metrics, config, devices.values())
    ff = build_features(frame.drop(columns="_obs"), metrics, config.features)
    usable = loaded.baselines.features if loaded.baselines is not None else loaded.model_features
    positions = np.flatnonzero(frame["_obs"].to_numpy() >= 0)
    order = frame["_obs"].to_numpy()[positions]
    # Only the observations' rows go on: model_inputs works row by row (baseline lookups and z-scores
    # of the row's own values), so the stored rows, needed above for the features, are not computed.
    observed = ff.frame.iloc[positions]
    model_frame, _, _ = model_inputs(observed, baselines=loaded.baselines, usable=usable, metrics=metrics,
                                     config=config)
    result = score_frame(
        loaded.detector, model_frame, explain=observed, features=usable,
        feature_metric=ff.feature_metric, metric_domain=fleet.metric_domains, baselines=loaded.baselines,
        level=config.z_level, top_k=config.top_k, severity_bands=config.severity_bands)
    return result, order


def _score_online(fleet: Fleet, online: OnlineModel, rows: list[dict], metrics: list[str], devices: dict
                  ) -> ScoreResult:
    """The online path (detection.ml.online): the same history as _frame_with_history, read as arrays,
    the observations merged in, then features, model inputs and scores for the observations' rows.
    Returns the result in observation order. Raises Unsupported for a database it does not read."""
    spec = online.spec
    stamps = np.array([r["timestamp"].value for r in rows], dtype=np.int64)
    lookback = max(spec.window_ns, spec.lag_ns + spec.tolerance_ns) + HISTORY_MARGIN.value
    first, last = int(stamps.min()), int(stamps.max())
    bucket_start = first // spec.bucket_ns * spec.bucket_ns
    bucket_end = last // spec.bucket_ns * spec.bucket_ns + spec.bucket_ns
    own = {r["device_id"]: devices[r["external_id"]] for r in rows}
    stored, cohort_of = _read_history(fleet, metrics, own, online.cohort_columns, start=first - lookback,
                                      end=bucket_end, peers_start=bucket_start)
    new = History(device=np.array([r["device_id"] for r in rows], dtype=np.int64), stamps=stamps,
                  values=np.array([[r[m] for m in metrics] for r in rows], dtype=np.float64).reshape(len(rows), -1),
                  cohort=np.array([cohort_of[r["device_id"]] for r in rows], dtype=np.int64))
    history, positions = merge_observations(stored, new)
    attributes = {pk: d.attributes() for pk, d in own.items()}
    return online.score(history, positions, [attributes[r["device_id"]] for r in rows], fleet.metric_domains)


def _read_history(fleet: Fleet, metrics: list[str], own: dict[int, _DeviceRow], cohort_columns: list[str], *,
                  start: int, end: int, peers_start: int) -> tuple[History, dict[int, int]]:
    """The samples _frame_with_history reads, as arrays, in one raw query: the devices in `own` in
    [start, end), and their cohort peers (the fleet's other devices with the same values of
    `cohort_columns`; all of them when there are none) in [peers_start, end). Times in ns since the
    epoch. Returns (history, not sorted; {observed device id: its cohort code}).

    Values are read with the loader's own JSON extraction (json_extract on SQLite, ->>::float8 on
    PostgreSQL), so they parse exactly as load_telemetry_frame reads them. Raises Unsupported on
    another database or a metric name that is not an identifier.
    """
    connection = connections[Telemetry.objects.db]
    vendor = connection.vendor
    if vendor not in ("sqlite", "postgresql") or not all(METRIC_NAME_RE.fullmatch(m) for m in metrics):
        raise Unsupported(f"history read on {vendor}")
    keys = sorted({tuple(getattr(d, c) for c in cohort_columns) for d in own.values()})
    code = {key: k for k, key in enumerate(keys)}
    cohort_of = {pk: code[tuple(getattr(d, c) for c in cohort_columns)] for pk, d in own.items()}
    sql = _history_sql(vendor, tuple(metrics), tuple(cohort_columns), len(keys) if cohort_columns else 0)
    adapt = connection.ops.adapt_datetimefield_value
    start_at, end_at, peers_at = (adapt(_datetime(ns)) for ns in (start, end, peers_start))
    _, own_param = _id_list(connection, sorted(own))
    matches = [v for key in keys for v in key] if cohort_columns else []
    records = _fetch(connection, sql, [fleet.pk, start_at, end_at, own_param, *matches, fleet.pk, *matches,
                                       own_param, fleet.pk, peers_at, end_at])
    m = len(metrics)
    columns = list(zip(*records)) if records else [()] * (3 + m)
    device_ids = np.array(columns[0], dtype=np.int64)
    cohort = np.array(columns[2 + m], dtype=np.int64)
    for pk, k in cohort_of.items():  # the observed devices' own rows (code -1 in the query)
        cohort[device_ids == pk] = k
    stamps = _parse_sqlite_stamps(columns[1]) if vendor == "sqlite" else np.array(columns[1], dtype=np.int64) * 1000
    values = np.array(columns[2:2 + m], dtype=np.float64).T.reshape(len(records), m)
    return History(device_ids, stamps, values, cohort), cohort_of


@functools.lru_cache(maxsize=256)
def _history_sql(vendor: str, metrics: tuple[str, ...], cohort_columns: tuple[str, ...], n_keys: int) -> str:
    """_read_history's query (%s placeholders): the observed devices' samples, then their peers' with
    the index of their cohort key (-1 for the observed devices' rows, whose cohorts are known).
    Parameters: fleet, start, end, own ids, n_keys cohort keys (CASE), fleet, the keys again (WHERE),
    own ids, fleet, peers' start, end."""
    quote = connections[Telemetry.objects.db].ops.quote_name
    telemetry, device = quote(Telemetry._meta.db_table), quote(Device._meta.db_table)
    own_ids = "IN (SELECT value FROM json_each(%s))" if vendor == "sqlite" else "= ANY(%s)"
    if vendor == "sqlite":
        stamp = 'CAST(t."timestamp" AS TEXT)'
        values = "".join(f""", json_extract(t."values", '$.{m}')""" for m in metrics)  # identifiers, checked
    else:
        stamp = '(EXTRACT(EPOCH FROM t."timestamp") * 1000000)::bigint'
        values = "".join(f""", (t."values"->>'{m}')::float8""" for m in metrics)
    if cohort_columns:
        match = ["(" + " AND ".join(f"d.{quote(c)} = %s" for c in cohort_columns) + ")" for _ in range(n_keys)]
        code = "CASE " + " ".join(f"WHEN {c} THEN {k}" for k, c in enumerate(match)) + " END"
        peers = f" AND ({' OR '.join(match)})"
    else:
        code, peers = "0", ""
    return (f'SELECT t.device_id, {stamp}{values}, -1 FROM {telemetry} t WHERE t.fleet_id = %s '
            f'AND t."timestamp" >= %s AND t."timestamp" < %s AND t.device_id {own_ids} '
            f'UNION ALL '
            f'SELECT t.device_id, {stamp}{values}, {code} FROM {device} d JOIN {telemetry} t ON t.device_id = d.id '
            f'WHERE d.fleet_id = %s{peers} AND NOT (d.id {own_ids}) AND t.fleet_id = %s '
            f'AND t."timestamp" >= %s AND t."timestamp" < %s')


def _datetime(ns: int) -> datetime:
    """An aware UTC datetime (microseconds) for ns since the epoch, as pd.Timestamp.to_pydatetime()."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)


def _parse_sqlite_stamps(texts: tuple) -> np.ndarray:
    """ns since the epoch of SQLite's datetime texts: Django's 'YYYY-MM-DD HH:MM:SS[.ffffff]' (UTC) by
    numpy; any other ISO 8601 form (numpy refuses it, or warns about an offset) by the loader's parser."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.array(texts, dtype="datetime64[ns]").view(np.int64)
        except (ValueError, Warning):
            pass
    return pd.to_datetime(pd.Index(texts, dtype=object), format="ISO8601", utc=True).as_unit("ns").asi8


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
    # m_cohort_norm: the median of the device's cohort in the same bucket, so the peers' samples there.
    cohort_cols = [c for c in features.cohort_columns if c in DEVICE_ATTRIBUTE_COLUMNS]
    peer_ids: list[int] = []
    if cohort_cols:  # without cohort columns the whole fleet is one cohort: read the peers apart (below)
        from django.db.models import Q

        match = Q(pk__in=[])
        for key in {tuple(getattr(d, c) for c in cohort_cols) for d in devices}:
            match |= Q(**dict(zip(cohort_cols, key)))
        peers = Device.objects.filter(fleet=fleet).exclude(pk__in=own_ids).filter(match)
        peer_attributes = {pk: tuple(rest) for pk, *rest in peers.values_list("pk", *DEVICE_COLUMNS)}
        peer_ids = list(peer_attributes)
    # One read for the devices and their peers, then the peers' rows before their bucket are dropped:
    # the same rows as a read per group, at one read's fixed cost.
    attributes = {d.pk: tuple(getattr(d, c) for c in DEVICE_COLUMNS) for d in devices}
    if peer_ids:
        attributes.update(peer_attributes)
    stored = _read_samples(fleet, metrics, attributes, start=stamps.min() - lookback, end=bucket_end)
    if peer_ids:
        peer_rows = np.isin(stored["device_id"].to_numpy(), peer_ids)
        stored = stored[~peer_rows | (stored["timestamp"] >= bucket_start).to_numpy()]
    if not cohort_cols:
        peer_ids = list(Device.objects.filter(fleet=fleet).exclude(pk__in=own_ids).values_list("pk", flat=True))
        if peer_ids:
            stored = pd.concat([stored, load_telemetry_frame(fleet, start=bucket_start, end=bucket_end,
                                                             device_ids=peer_ids)], ignore_index=True)
    stored = stored.reset_index(drop=True)
    stored["_obs"] = -1
    # Column by column with the stored frame's dtypes (DataFrame.astype with a dict costs ~4 ms here).
    new = {c: [r[c] for r in rows] for c in stored.columns}
    new["device_id"] = np.array(new["device_id"], dtype=np.int64)
    new.update({m: np.array(new[m], dtype=np.float64) for m in metrics})  # None -> NaN
    new["timestamp"] = pd.to_datetime(new["timestamp"], utc=True).astype(stored["timestamp"].dtype)
    frame = pd.concat([stored, pd.DataFrame(new)], ignore_index=True)
    # Sorted by (device, timestamp), stable, then the last row of each (device, timestamp): the
    # observation, which comes after the stored sample it replaces. The same rows in the same order
    # as drop_duplicates(keep="last") then a stable sort_values, in numpy.
    device = frame["device_id"].to_numpy()
    stamp = frame["timestamp"].to_numpy(dtype="datetime64[ns]").view(np.int64)
    order = np.lexsort((stamp, device))
    device, stamp = device[order], stamp[order]
    last = np.r_[(device[1:] != device[:-1]) | (stamp[1:] != stamp[:-1]), True]
    return frame.take(order[last]).reset_index(drop=True)


def _read_samples(fleet: Fleet, metrics: list[str], attributes: dict[int, tuple], *, start: pd.Timestamp,
                  end: pd.Timestamp) -> pd.DataFrame:
    """The samples of the devices in `attributes` ({device pk: DEVICE_COLUMNS values}) in [start, end):
    the frame load_telemetry_frame returns for them (same columns, dtypes and values), not sorted.

    On SQLite this runs the loader's own query (json_extract per metric, so values parse exactly as
    the pipeline read them) through the (device, timestamp) index and builds the frame from arrays:
    load_telemetry_frame also re-reads the fleet's devices and merges them in, which costs more than
    the read itself for the ~100 rows of a /detect call. Other databases go through the loader.
    """
    connection = connections[Telemetry.objects.db]
    if connection.vendor != "sqlite" or not all(METRIC_NAME_RE.fullmatch(m) for m in metrics):
        # (the loader raises the ValueError naming a metric that is not an identifier)
        return load_telemetry_frame(fleet, start=start, end=end, device_ids=sorted(attributes))
    adapt = connection.ops.adapt_datetimefield_value
    values = "".join(f""", json_extract("values", '$.{m}')""" for m in metrics)  # identifiers, checked above
    table = connection.ops.quote_name(Telemetry._meta.db_table)
    sql = (f'SELECT device_id, CAST("timestamp" AS TEXT){values} FROM {table} WHERE fleet_id = ? '
           f'AND "timestamp" >= ? AND "timestamp" < ? AND device_id IN (SELECT value FROM json_each(?))')
    params = [fleet.pk, adapt(pd.Timestamp(start).to_pydatetime()), adapt(pd.Timestamp(end).to_pydatetime()),
              json.dumps(sorted(int(d) for d in attributes))]
    with connection.cursor() as cursor, connection.wrap_database_errors:
        cursor.cursor.execute(sql, params)
        records = cursor.cursor.fetchall()
    columns = list(zip(*records)) if records else [()] * (2 + len(metrics))
    device_ids = np.array(columns[0], dtype=np.int64)
    codes, uniques = pd.factorize(pd.Series(columns[1], dtype=object))
    stamps = pd.to_datetime(pd.Index(uniques, dtype=object), format="ISO8601", utc=True).take(codes)
    device_values = [attributes[int(d)] for d in device_ids]
    frame = {"device_id": device_ids}
    for k, c in enumerate(DEVICE_COLUMNS):
        frame[c] = np.array([v[k] for v in device_values], dtype=object)
    frame["timestamp"] = stamps if records else pd.Series(dtype="datetime64[ns, UTC]")
    for k, m in enumerate(metrics):
        frame[m] = np.array(columns[2 + k], dtype=np.float64)
    return pd.DataFrame(frame)
