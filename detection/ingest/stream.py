"""Live telemetry from Redis Streams, scored in micro-batches with the fleet's production model.

Keys (one stream per fleet; see stream_key / dead_letter_key):
- ``vigil:telemetry:<fleet>``: the events. Each entry has one field, ``event``, holding a JSON object
  ``{"fleet": name, "device_id": external id, "timestamp": ISO 8601 (naive = UTC),
  "metrics": {metric name: number or null}}`` (publish_events writes it).
- consumer group ``vigil-scorers`` (GROUP) on that stream: every consumer of the group gets its own
  share of the entries, so several `manage.py stream_consume --fleet NAME` processes split the work.
- ``vigil:telemetry:<fleet>:dead``: the dead-letter stream. An entry that cannot be scored (bad JSON, a
  missing or bad field, an unknown metric or device, or a micro-batch that failed MAX_ATTEMPTS times)
  is copied there with fields ``event`` (the raw payload), ``reason``, ``source_id`` (its id in the
  main stream), ``consumer``; it is capped at about DEAD_LETTER_MAXLEN entries.

Delivery is at least once, persisting is exactly once per (device, timestamp):
1. read a micro-batch (XREADGROUP; first the consumer's own pending entries, after a restart);
2. parse and validate every entry (parse_event, Django-free); bad ones go to the dead-letter stream;
3. score the good ones (MicroBatchScorer, Django-free: the same features (build_features_at: build_features'
   values for the batch's rows only) / model_inputs / score_frame the pipeline and /api/v1/detect run,
   with the production model's saved config and baselines, on a per-device in-memory history instead of
   a database read of the whole window per batch. What other consumers of the group handled meanwhile
   is added first: the entries before this batch's that they have not acknowledged yet are read back
   from the stream (XPENDING + XRANGE: scored concurrently, not persisted), the samples they persisted
   from the database (only those newer than the history's). So several consumers score a sample as
   one consumer, and as detect, would. stream_consume preloads the fleet's latest stored stretch
   before its first read (StreamConsumer.prepare));
4. in one transaction, drop events whose (device, timestamp) already has a stream result (a
   redelivery), then bulk-insert telemetry (new samples only) and AnomalyResult rows, under one
   PipelineRun per (fleet, model version) with trigger "stream"; (run, device, timestamp) is unique
   in the database, so two consumers racing on a reclaimed entry cannot both write it;
5. after the commit: the alerts hook (alerts.services.alerts_ingest, when the alerts app is installed)
   with the batch's anomalies, redelivered ones included (the hook skips what it already has), and
   one live push (detection.push.push_run_finished) when the batch has new anomalies;
6. XACK. A consumer that dies before 6 leaves its entries pending; a live consumer claims them
   (XAUTOCLAIM) once they have been idle reclaim_idle_ms, and step 4 drops what was already written.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pandas as pd

from .base import DEVICE_COLUMNS

logger = logging.getLogger(__name__)

STREAM_PREFIX = "vigil:telemetry"
GROUP = "vigil-scorers"
EVENT_FIELD = "event"
DEAD_LETTER_MAXLEN = 100_000
MAX_ATTEMPTS = 3  # an entry delivered this often whose micro-batch fails again is dead-lettered
IN_FLIGHT_MAX = 50_000  # at most this many earlier entries of other consumers are read back per micro-batch
HISTORY_MARGIN = pd.Timedelta("1h")  # as detection.serving: clock skew between devices and server
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def stream_prefix() -> str:
    """settings.VIGIL_STREAM_PREFIX (or the environment variable), default ``vigil:telemetry``: lets
    several Vigil instances (or test runs) share one Redis."""
    try:
        from django.conf import settings

        configured = getattr(settings, "VIGIL_STREAM_PREFIX", "")
    except Exception:  # Django not configured
        configured = ""
    return configured or os.environ.get("VIGIL_STREAM_PREFIX") or STREAM_PREFIX


def stream_key(fleet: str) -> str:
    """The fleet's event stream, ``vigil:telemetry:<fleet>``."""
    return f"{stream_prefix()}:{fleet}"


def dead_letter_key(fleet: str) -> str:
    """The fleet's dead-letter stream, ``vigil:telemetry:<fleet>:dead``."""
    return f"{stream_prefix()}:{fleet}:dead"


def redis_url() -> str:
    """VIGIL_STREAM_REDIS_URL, else REDIS_URL (settings or environment), else redis://127.0.0.1:6379/0."""
    try:
        from django.conf import settings

        configured = getattr(settings, "VIGIL_STREAM_REDIS_URL", "") or getattr(settings, "REDIS_URL", "")
    except Exception:  # Django not configured: a script or the benchmark's producer
        configured = ""
    return (configured or os.environ.get("VIGIL_STREAM_REDIS_URL") or os.environ.get("REDIS_URL")
            or DEFAULT_REDIS_URL)


def redis_client(url: str | None = None, **kwargs):
    import redis

    return redis.Redis.from_url(url or redis_url(), **kwargs)


# --- events (Django-free) ------------------------------------------------------------------------------
class EventError(ValueError):
    """A stream entry that cannot be scored; the message is the dead-letter reason and names the field.
    `kind` is a short code for the metrics label (payload, fleet, device_id, timestamp, metrics, device,
    failed)."""

    def __init__(self, message: str, *, kind: str):
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class StreamEvent:
    entry_id: str
    device_id: str  # the device's external id
    timestamp: datetime  # aware, UTC
    metrics: dict[str, float]  # NaN for null


def event_payload(*, fleet: str, device_id: str, timestamp, metrics: Mapping[str, float | None]) -> str:
    """The JSON an entry's ``event`` field holds; NaN values become null."""
    ts = pd.Timestamp(timestamp)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    clean = {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
             for k, v in metrics.items()}
    return json.dumps({"fleet": fleet, "device_id": str(device_id), "timestamp": ts.isoformat(),
                       "metrics": clean}, separators=(",", ":"))


def publish_events(client, fleet: str, events: Iterable[Mapping[str, Any]], *, maxlen: int | None = None,
                   chunk: int = 1000) -> list[str]:
    """XADD events ({device_id, timestamp, metrics}) to the fleet's stream, `chunk` per round trip;
    returns the entry ids. maxlen caps the stream (approximately) for producers that never trim."""
    ids: list[str] = []
    pipe = client.pipeline(transaction=False)
    pending = 0
    for event in events:
        pipe.xadd(stream_key(fleet), {EVENT_FIELD: event_payload(fleet=fleet, **event)},
                  maxlen=maxlen, approximate=True)
        pending += 1
        if pending >= chunk:
            ids.extend(_text(i) for i in pipe.execute())
            pending = 0
    if pending:
        ids.extend(_text(i) for i in pipe.execute())
    return ids


def parse_event(entry_id: str, fields: Mapping, *, fleet: str, metrics: Collection[str]) -> StreamEvent:
    """Validate one stream entry (fields as redis-py returns them, bytes or str).

    Raises EventError naming the field: no ``event`` field, not JSON or not an object, a fleet other
    than the stream's, a missing/empty device_id, a timestamp that is not ISO 8601, metrics that are not
    an object, an unknown metric, or a value that is not a finite number or null.
    """
    raw = _field(fields, EVENT_FIELD)
    if raw is None:
        raise EventError(f"entry has no {EVENT_FIELD!r} field", kind="payload")
    event = _loads(raw)
    if not isinstance(event, dict):
        raise EventError(f"{EVENT_FIELD!r} must be a JSON object, got {type(event).__name__}", kind="payload")
    if event.get("fleet") != fleet:
        raise EventError(f"fleet: {event.get('fleet')!r} is not this stream's fleet {fleet!r}", kind="fleet")
    device = event.get("device_id")
    if isinstance(device, bool) or not isinstance(device, (str, int)) or not str(device).strip():
        raise EventError(f"device_id: must be a non-empty string, got {device!r}", kind="device_id")
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        raise EventError(f"timestamp: must be an ISO 8601 string, got {stamp!r}", kind="timestamp")
    try:  # datetime keeps microseconds, as the database does; ~50x faster than pd.Timestamp
        ts = datetime.fromisoformat(stamp)
    except ValueError:
        raise EventError(f"timestamp: {stamp!r} is not an ISO 8601 time", kind="timestamp") from None
    ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)
    values = event.get("metrics")
    if not isinstance(values, dict):
        raise EventError(f"metrics: must be an object of metric name -> number, got {values!r}", kind="metrics")
    if not isinstance(metrics, (set, frozenset)):
        metrics = set(metrics)
    if not metrics.issuperset(values):
        unknown = sorted(k for k in values if k not in metrics)
        raise EventError(f"metrics: unknown metric(s) {', '.join(unknown)}", kind="metrics")
    clean: dict[str, float] = {}
    for name, value in values.items():
        if type(value) is float and value - value == 0.0:  # a finite float, the common case (inf - inf is NaN)
            clean[name] = value
        elif value is None:
            clean[name] = math.nan
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise EventError(f"metrics.{name}: must be a finite number or null, got {value!r}", kind="metrics")
        else:
            clean[name] = float(value)
    return StreamEvent(entry_id, str(device).strip(), ts, clean)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        return False


def _loads(raw):
    """The entry's JSON: orjson (several times faster than json); what orjson refuses goes through json
    again, which reads NaN / Infinity (then refused by the metrics check with their own reason) and
    words the error the same way whatever the parser."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise EventError(f"{EVENT_FIELD!r} is not valid JSON: {exc}", kind="payload") from None


def entry_time(entry_id: str) -> float:
    """When Redis added the entry (its id's milliseconds part), in seconds since the epoch."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


# --- micro-batch scoring (Django-free) ------------------------------------------------------------------
@dataclass
class BatchScores:
    """Scores for the rows of one micro-batch frame, in its order (n rows)."""

    scores: np.ndarray
    labels: np.ndarray  # -1 anomaly, 1 normal
    threshold: float
    severity: np.ndarray  # "" for normal rows
    top_metrics: list[list[dict]]
    votes: list[dict | None] | None = None  # an ensemble's members' votes and agreement (ScoreResult)
    agreement: list[float | None] | None = None  # anomalies only (ScoreResult.anomaly_agreement)


class MicroBatchScorer:
    """Scores micro-batches of one fleet with one model, keeping each device's recent telemetry in memory.

    model: anything with `detector`, `config` (PipelineConfig), `model_features` and `baselines`
        (detection.serving.LoadedModel). metrics: the fleet's metric names in schema order;
        metric_domain: {metric: domain}.
    A sample's features need its device's past back to lookback = max(rolling window, delta lag * 1.25)
    + 1 h, and its cohort peers in the same cohort bucket: the scorer holds exactly that, per device
    (trimmed after each batch). Rows of devices it has never seen must be added first with
    add_history (the Django side reads them from the database: devices_without_history says which).
    """

    def __init__(self, *, model, metrics: Sequence[str], metric_domain: Mapping[str, str]):
        self.model = model
        self.metrics = list(metrics)
        self.metric_domain = dict(metric_domain)
        features = model.config.features
        lag = pd.Timedelta(features.delta_lag)
        self.lookback = max(pd.Timedelta(features.rolling_window), lag + lag / 4) + HISTORY_MARGIN
        self.bucket = pd.Timedelta(features.cohort_bucket)
        self.columns = ["device_id", *DEVICE_COLUMNS, "timestamp", *self.metrics]  # as load_telemetry_frame
        self.history = pd.DataFrame({c: pd.Series(dtype=self._dtype(c)) for c in self.columns})
        self.known: set[int] = set()
        # Set by StreamConsumer.prepare: history was preloaded from here on, before any batch was seen.
        self.preloaded_from: pd.Timestamp | None = None
        self.usable = model.baselines.features if model.baselines is not None else list(model.model_features)

    def _dtype(self, column: str):
        if column == "device_id":
            return np.int64
        if column == "timestamp":
            return "datetime64[ns, UTC]"
        return np.float64 if column in self.metrics else object

    def devices_without_history(self, device_ids: Iterable[int]) -> list[int]:
        return sorted({int(d) for d in device_ids} - self.known)

    def latest(self, device_ids: Iterable[int]) -> pd.Timestamp | None:
        """The earliest, over device_ids, of each device's latest sample held (None when a device has
        none): samples after it may have been persisted by someone else."""
        ids = pd.Index(np.asarray(list(device_ids), dtype=np.int64)).unique()
        held = self.history.groupby("device_id", sort=False)["timestamp"].max().reindex(ids)
        return None if held.isna().any() or not len(held) else held.min()

    def reset(self) -> None:
        """Forget the history (and which devices it covers)."""
        self.history = self.history.iloc[:0]
        self.known = set()
        self.preloaded_from = None

    def add_history(self, frame: pd.DataFrame, device_ids: Iterable[int]) -> None:
        """Add stored telemetry (load_telemetry_frame's columns) and mark `device_ids` as known (also
        those without any stored sample)."""
        self.known.update(int(d) for d in device_ids)
        if len(frame):
            self.history = self._merge(self.history, self._conform(frame))
            self._trim()

    def _conform(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame[self.columns].copy()
        frame["device_id"] = frame["device_id"].astype(np.int64)
        if frame["timestamp"].dtype != "datetime64[ns, UTC]":  # to_datetime walks an already converted column
            frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True).astype("datetime64[ns, UTC]")
        return frame.astype(dict.fromkeys(self.metrics, np.float64))

    @staticmethod
    def _merge(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
        """old and new rows sorted by device then timestamp, the last of each (device, timestamp) kept
        (the newest value wins): concat, drop_duplicates(keep="last"), stable sort, in numpy."""
        frame = pd.concat([old, new], ignore_index=True) if len(old) else new.reset_index(drop=True)
        device = frame["device_id"].to_numpy()
        stamps = frame["timestamp"].to_numpy(dtype="datetime64[ns]").view(np.int64)
        order = np.lexsort((np.arange(len(frame)), stamps, device))  # stable: equal keys keep their order
        device, stamps = device[order], stamps[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = (device[1:] != device[:-1]) | (stamps[1:] != stamps[:-1])
        return frame.take(order[last]).reset_index(drop=True)

    def _trim(self) -> None:
        """Keep each device's samples within lookback of its latest one (history is sorted)."""
        history = self.history
        if not len(history):
            return
        device = history["device_id"].to_numpy()
        stamps = history["timestamp"].to_numpy(dtype="datetime64[ns]").view(np.int64)
        last = np.r_[device[1:] != device[:-1], True]
        block = np.cumsum(np.r_[True, device[1:] != device[:-1]]) - 1
        latest = stamps[last][block]
        keep = stamps >= latest - self.lookback.value
        if not keep.all():
            self.history = history[keep].reset_index(drop=True)

    def score(self, batch: pd.DataFrame) -> BatchScores:
        """Score a micro-batch and add it to the history.

        batch: n rows x (device_id [int], the device attribute columns, timestamp [datetime64[ns, UTC]],
            one float64 column per metric, NaN = missing), one row per (device, timestamp).
        Returns BatchScores aligned with batch's rows. Raises KeyError for a missing column and
        BaselineError when the baselines lack the model's level or a feature (a broken artifact).
        """
        from detection.ml.features import build_features_at
        from detection.ml.pipeline import model_inputs
        from detection.ml.scoring import score_frame

        new = self._conform(batch)
        n = len(new)
        if n == 0:
            return BatchScores(np.empty(0), np.empty(0, dtype=np.int64), float(self.model.detector.threshold_),
                               np.empty(0, dtype=object), [])
        history = self.history
        in_batch = history["device_id"].isin(new["device_id"].unique())
        buckets = new["timestamp"].dt.floor(self.bucket).unique()
        peers = ~in_batch & history["timestamp"].dt.floor(self.bucket).isin(buckets)
        context = history[in_batch | peers].assign(_obs=-1)
        frame = self._merge(context, new.assign(_obs=np.arange(n)))
        config = self.model.config
        obs = frame["_obs"].to_numpy()
        positions = np.flatnonzero(obs >= 0)
        # Features of the batch's rows only, the context read as their past and cohort peers: the same
        # values build_features gives them over the whole frame, at a cost that does not grow with it.
        ff = build_features_at(frame.drop(columns="_obs"), positions, self.metrics, config.features)
        model_frame, _, _ = model_inputs(ff.frame, baselines=self.model.baselines, usable=self.usable,
                                         metrics=self.metrics, config=config)
        result = score_frame(
            self.model.detector, model_frame, explain=ff.frame,
            features=self.usable, feature_metric=ff.feature_metric, metric_domain=self.metric_domain,
            baselines=self.model.baselines, level=config.z_level, top_k=config.top_k,
            severity_bands=config.severity_bands)
        order = np.empty(n, dtype=np.int64)
        order[obs[positions]] = np.arange(len(positions))  # batch row -> scored position
        self.history = self._merge(history, new)
        self._trim()
        agreement = result.anomaly_agreement()
        return BatchScores(np.asarray(result.scores)[order], np.asarray(result.labels)[order], result.threshold,
                           np.asarray(result.severity, dtype=object)[order],
                           [result.top_metrics[k] for k in order],
                           None if result.votes is None else [result.votes[k] for k in order],
                           None if agreement is None else [agreement[k] for k in order])


def events_frame(events: Sequence[StreamEvent], devices: Mapping[str, Mapping[str, Any]],
                 metrics: Sequence[str]) -> pd.DataFrame:
    """The scorer's input for parsed events of known devices: devices maps external id ->
    {"pk", external_id, manufacturer, model, os_version, store, customer}."""
    of = [devices[e.device_id] for e in events]
    rows = {"device_id": np.array([d["pk"] for d in of], dtype=np.int64)}
    for column in DEVICE_COLUMNS:
        rows[column] = [d[column] for d in of]
    rows["timestamp"] = pd.to_datetime([e.timestamp for e in events], utc=True).as_unit("ns")
    nan = math.nan
    values = np.array([[e.metrics.get(m, nan) for m in metrics] for e in events], dtype=np.float64)
    for j, m in enumerate(metrics):
        rows[m] = values[:, j] if len(events) else np.empty(0)
    return pd.DataFrame(rows)


def _absent(keys: list[tuple[int, datetime]], found: set) -> np.ndarray:
    """Mask of keys not in found ((device pk, aware datetime) pairs from the database)."""
    if not found:
        return np.ones(len(keys), dtype=bool)
    return np.fromiter((k not in found for k in keys), dtype=bool, count=len(keys))


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Mapping, name: str):
    if name in fields:
        return fields[name]
    return fields.get(name.encode())


def stream_group_info(client, fleet: str) -> dict | None:
    """{"lag", "pending", "consumers"} of GROUP on the fleet's stream (lag None on Redis < 7), or None
    when the stream or group does not exist."""
    import redis

    try:
        groups = client.xinfo_groups(stream_key(fleet))
    except redis.ResponseError:  # no such key
        return None
    for group in groups:
        if _text(group.get("name")) == GROUP:
            lag = group.get("lag")
            return {"lag": None if lag is None else int(lag), "pending": int(group.get("pending", 0)),
                    "consumers": int(group.get("consumers", 0))}
    return None


# --- the consumer (Django) --------------------------------------------------------------------------------
@dataclass
class ConsumerStats:
    """What one stream_consume call did. latencies_s: event -> persisted result, per scored event;
    alert_latencies_s: event -> alerts hook returned, per anomaly (empty without the alerts app)."""

    read: int = 0
    scored: int = 0
    anomalies: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    batches: int = 0
    failed_batches: int = 0
    latencies_s: list[float] = field(default_factory=list)
    alert_latencies_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.endswith("latencies_s")}


class StreamConsumerError(Exception):
    """The consumer cannot start: unknown fleet, no production model, Redis unreachable."""


def ensure_group(client, fleet: str) -> None:
    """Create GROUP on the fleet's stream (and the stream) unless it exists; new groups start at the
    stream's beginning, so events published before the first consumer started are scored too."""
    import redis

    try:
        client.xgroup_create(stream_key(fleet), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class StreamConsumer:
    """One consumer of the fleet's group. Use stream_consume unless you drive the loop yourself."""

    def __init__(self, *, fleet, consumer: str, client, batch: int = 500, block_ms: int = 1000,
                 reclaim_idle_ms: int = 60_000, push: bool = True):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if block_ms < 0:
            raise ValueError(f"block_ms must be >= 0, got {block_ms}")
        self.fleet, self.consumer, self.client = fleet, consumer, client
        self.batch, self.block_ms, self.reclaim_idle_ms, self.push = batch, block_ms, reclaim_idle_ms, push
        self.count = batch  # entries per read; stream_consume lowers it to stop exactly at max_events
        self.key, self.dead_key = stream_key(fleet.name), dead_letter_key(fleet.name)
        self.metrics = fleet.metric_names
        self._metric_set = frozenset(self.metrics)
        self.stats = ConsumerStats()
        self._devices: dict[str, dict] = {}
        self._scorer: MicroBatchScorer | None = None
        self._run = None
        self._own_pending = True  # after a restart, first re-read what this consumer name left pending
        self._last_reclaim = 0.0
        self._last_lag = 0.0
        self.failures_in_a_row = 0

    # -- reading --
    def read(self) -> list[tuple[str, dict]]:
        """The next micro-batch: own pending entries first, then entries reclaimed from idle consumers
        (at most every reclaim_idle_ms / 2), then new ones (blocking up to block_ms)."""
        if self._own_pending:
            entries = self._xreadgroup("0", block=None)
            if entries:
                return entries
            self._own_pending = False
        now = time.monotonic()
        if self.reclaim_idle_ms >= 0 and now - self._last_reclaim >= self.reclaim_idle_ms / 2000:
            self._last_reclaim = now
            entries = self.reclaim()
            if entries:
                return entries
        return self._xreadgroup(">", block=self.block_ms or None)

    def _xreadgroup(self, start: str, *, block: int | None) -> list[tuple[str, dict]]:
        reply = self.client.xreadgroup(GROUP, self.consumer, {self.key: start}, count=self.count, block=block)
        entries = []
        for _, items in reply or []:
            entries.extend((_text(i), f) for i, f in items if f is not None)  # None: trimmed meanwhile
        return entries

    def reclaim(self) -> list[tuple[str, dict]]:
        """XAUTOCLAIM entries idle for reclaim_idle_ms from any consumer of the group (dead ones)."""
        reply = self.client.xautoclaim(self.key, GROUP, self.consumer, min_idle_time=self.reclaim_idle_ms,
                                       start_id="0-0", count=self.count)
        entries = [(_text(i), f) for i, f in reply[1] if f is not None]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:  # trimmed from the stream while pending: nothing left to score
            self.client.xack(self.key, GROUP, *deleted)
        if entries:
            from detection.metrics import EVENTS_RECLAIMED

            self.stats.reclaimed += len(entries)
            EVENTS_RECLAIMED.labels(fleet=self.fleet.name).inc(len(entries))
        return entries

    # -- processing --
    def process(self, entries: list[tuple[str, dict]]) -> None:
        """Score, persist and acknowledge one micro-batch. A failure leaves the entries pending for a
        retry; entries delivered MAX_ATTEMPTS times are dead-lettered with the error instead."""
        from detection import metrics as m

        if not entries:
            return
        name = self.fleet.name
        self.stats.read += len(entries)
        m.EVENTS_INGESTED.labels(fleet=name).inc(len(entries))
        started = time.perf_counter()
        try:
            dead, scored = self._persist(entries)
        except Exception as exc:
            self.stats.failed_batches += 1
            self.failures_in_a_row += 1
            m.BATCH_FAILURES.labels(fleet=name).inc()
            logger.exception("stream batch of %d entries on %s failed", len(entries), self.key)
            deliveries = self._deliveries([entry_id for entry_id, _ in entries])
            given_up = [(entry_id, fields, EventError(
                f"scoring failed {MAX_ATTEMPTS} times: {type(exc).__name__}: {exc}", kind="failed"))
                for entry_id, fields in entries if deliveries.get(entry_id, 0) >= MAX_ATTEMPTS]
            if given_up:
                self._dead_letter(given_up)
                self._ack([e[0] for e in given_up])
            self._own_pending = True  # retry the rest from this consumer's pending list
            return
        self.failures_in_a_row = 0
        self._dead_letter(dead)
        self._ack([entry_id for entry_id, _ in entries])
        m.SCORING_LATENCY.labels(fleet=name).observe(time.perf_counter() - started)
        self.stats.batches += 1
        if time.monotonic() - self._last_lag > 5:
            self._last_lag = time.monotonic()
            info = stream_group_info(self.client, name)
            if info and info["lag"] is not None:
                m.STREAM_LAG.labels(fleet=name).set(info["lag"])

    def _persist(self, entries):
        from django.db import IntegrityError

        from detection import metrics as m
        from detection.serving import model_load

        name = self.fleet.name
        dead: list[tuple[str, dict, EventError]] = []
        events: list[StreamEvent] = []
        raw = dict(entries)
        for entry_id, fields in entries:
            try:
                events.append(parse_event(entry_id, fields, fleet=name, metrics=self._metric_set))
            except EventError as exc:
                dead.append((entry_id, fields, exc))
        self._load_devices({e.device_id for e in events})
        known, seen, duplicates = [], set(), 0
        for e in events:
            if e.device_id not in self._devices:
                dead.append((e.entry_id, raw[e.entry_id], EventError(
                    f"device_id: {e.device_id!r} is not a device of fleet {name!r}", kind="device")))
            elif (e.device_id, e.timestamp) in seen:
                duplicates += 1  # the same sample twice in one batch: the first one counts
            else:
                seen.add((e.device_id, e.timestamp))
                known.append(e)
        if not known:
            self.stats.duplicates += duplicates
            m.EVENTS_DUPLICATE.labels(fleet=name).inc(duplicates)
            return dead, 0
        loaded = model_load(fleet=self.fleet)
        scorer = self._scorer_for(loaded)
        frame = events_frame(known, self._devices, self.metrics)
        if scorer.preloaded_from is not None:  # the first batch after prepare()
            if frame["timestamp"].min() - scorer.lookback < scorer.preloaded_from:
                scorer.reset()  # it reaches back before the preloaded stretch: load its own, as without prepare
            scorer.preloaded_from = None
        new_devices = scorer.devices_without_history(frame["device_id"])
        if new_devices:
            self._warm(scorer, frame, new_devices)
        in_flight = self._in_flight_start(min((i for i, _ in entries), key=_id_order))  # before the catch-up read
        if not new_devices or len(new_devices) < frame["device_id"].nunique():
            self._catch_up(scorer, frame)
        if in_flight is not None:
            self._add_in_flight(scorer, *in_flight)
        scores = scorer.score(frame)
        keys = [(self._devices[e.device_id]["pk"], e.timestamp) for e in known]  # frame's rows, in order
        for attempt in range(2):
            try:
                written = self._write(frame, scores, loaded, keys)
                break
            except IntegrityError:  # another consumer wrote some of these meanwhile: filter again
                if attempt:
                    raise
        persisted_at = time.time()
        duplicates += len(known) - int(written.sum())
        self.stats.duplicates += duplicates
        m.EVENTS_DUPLICATE.labels(fleet=name).inc(duplicates)
        n_written = int(written.sum())
        self.stats.scored += n_written
        m.EVENTS_SCORED.labels(fleet=name).inc(n_written)
        latency = m.EVENT_LATENCY.labels(fleet=name)
        for e, ok in zip(known, written):
            if ok:
                lat = max(persisted_at - entry_time(e.entry_id), 0.0)
                latency.observe(lat)
                self.stats.latencies_s.append(lat)
        anomalous = written & (scores.labels == -1)
        self.stats.anomalies += int(anomalous.sum())
        for severity, count in pd.Series(scores.severity[anomalous]).value_counts().items():
            m.ANOMALIES.labels(fleet=name, severity=severity or "none").inc(int(count))
        if anomalous.any() or not written.all():
            self._after_commit(keys, known, new=anomalous, redelivered=~written)
        return dead, n_written

    def _load_devices(self, external_ids: set[str]) -> None:
        from detection.models import Device

        missing = external_ids - set(self._devices)
        if not missing:
            return
        for row in Device.objects.filter(fleet=self.fleet, external_id__in=missing).values(
                "pk", *DEVICE_COLUMNS):
            self._devices[row["external_id"]] = row

    def _scorer_for(self, loaded) -> MicroBatchScorer:
        if self._scorer is None or self._scorer.model is not loaded:
            self._scorer = MicroBatchScorer(model=loaded, metrics=self.metrics,
                                            metric_domain=self.fleet.metric_domains)
            self._run = stream_run_get(fleet=self.fleet, model_version=loaded.model_version,
                                       threshold=float(loaded.detector.threshold_), stream=self.key)
        return self._scorer

    def prepare(self) -> None:
        """Before the first read: load the model and the fleet's latest stored stretch of telemetry
        (lookback before its newest sample, every device), what the first micro-batch of a live stream
        would load itself, so that it does not wait for it. A first batch that reaches back before that
        stretch (a backlog older than the stored data) drops it and loads its own window instead."""
        from django.db.models import Max, OuterRef, Subquery

        from detection.ingest.loader import load_telemetry_frame
        from detection.models import Device, Telemetry
        from detection.serving import model_load

        scorer = self._scorer_for(model_load(fleet=self.fleet))
        if scorer.known:
            return
        # The newest sample per device through the (device, timestamp) index, not a scan of the fleet.
        newest = Telemetry.objects.filter(device=OuterRef("pk")).order_by("-timestamp").values("timestamp")[:1]
        latest = Device.objects.filter(fleet=self.fleet).annotate(newest=Subquery(newest)).aggregate(
            latest=Max("newest"))["latest"]
        if latest is None:
            return
        start = pd.Timestamp(latest) - scorer.lookback
        stored = load_telemetry_frame(self.fleet, start=start, end=pd.Timestamp(latest) + scorer.bucket)
        scorer.add_history(stored, stored["device_id"].unique().tolist())
        scorer.preloaded_from = start

    def _warm(self, scorer: MicroBatchScorer, frame: pd.DataFrame, device_ids: list[int]) -> None:
        """Stored history of devices the scorer has not seen: the whole fleet on the first batch (so the
        cohort peers are there too), the new devices after that."""
        from detection.ingest.loader import load_telemetry_frame

        start = frame["timestamp"].min() - scorer.lookback
        end = frame["timestamp"].max() + scorer.bucket
        first = not scorer.known
        stored = load_telemetry_frame(self.fleet, start=start, end=end, device_ids=None if first else device_ids)
        ids = set(device_ids) | (set(stored["device_id"].unique().tolist()) if first else set())
        scorer.add_history(stored, ids)

    def _in_flight_start(self, first: str) -> tuple[str, str] | None:
        """(oldest, first): the range of entries before this batch's first one that the group delivered to
        other consumers and that they have not acknowledged yet, i.e. not persisted, or None. Taken
        before the database catch-up read, so that an entry acknowledged in between is in one of them."""
        pending = self.client.xpending_range(self.key, GROUP, min="-", max=f"({first}", count=IN_FLIGHT_MAX)
        others = [_text(p["message_id"]) for p in pending if _text(p["consumer"]) != self.consumer]
        return (min(others, key=_id_order), first) if others else None

    def _add_in_flight(self, scorer: MicroBatchScorer, oldest: str, first: str) -> None:
        """Add the samples of other consumers' in-flight entries (oldest up to this batch) to the history:
        the group hands consecutive entries to different consumers, so the samples just before this
        batch's may be another consumer's, scored at the same time and not persisted yet. Without them
        this batch's rolling windows and deltas would miss them, and its scores would not be detect's.
        Entries that do not parse (their consumer dead-letters them) and unknown devices are skipped."""
        reply = self.client.xrange(self.key, min=oldest, max=f"({first}", count=IN_FLIGHT_MAX)
        events = []
        for entry_id, fields in reply:
            if fields is None:
                continue
            try:
                events.append(parse_event(_text(entry_id), fields, fleet=self.fleet.name, metrics=self._metric_set))
            except EventError:
                continue
        self._load_devices({e.device_id for e in events})
        events = [e for e in events if e.device_id in self._devices]
        if events:
            scorer.add_history(events_frame(events, self._devices, self.metrics), [])

    def _catch_up(self, scorer: MicroBatchScorer, frame: pd.DataFrame) -> None:
        """Stored samples of the batch's devices newer than the scorer's latest one of them: what other
        consumers of the group (or file ingestion) persisted meanwhile, so that this batch's rolling
        windows hold them too. Alone on the stream, the read finds nothing (one index lookup)."""
        from detection.ingest.loader import load_telemetry_frame

        device_ids = frame["device_id"].unique()
        lo = frame["timestamp"].min() - scorer.lookback
        since = scorer.latest(device_ids)
        start = lo if since is None else max(since + pd.Timedelta(microseconds=1), lo)
        end = frame["timestamp"].max() + scorer.bucket
        if start >= end:
            return
        stored = load_telemetry_frame(self.fleet, start=start, end=end, device_ids=device_ids.tolist())
        if len(stored):
            scorer.add_history(stored, [])

    def _write(self, frame: pd.DataFrame, scores: BatchScores, loaded, keys: list[tuple[int, datetime]]):
        """One transaction: telemetry (new samples only) and results (rows without a stream result yet).
        keys: (device pk, aware UTC datetime) of each frame row, as the database returns them.
        Returns the mask of frame rows written (False: a stream result for that sample exists)."""
        from django.db import transaction
        from django.db.models import F
        from django.utils import timezone

        from detection.ingest.bulk import bulk_insert_columns, bulk_insert_frame
        from detection.models import AnomalyResult, PipelineRun, Telemetry

        run = self._run
        device_ids = sorted({k[0] for k in keys})
        lo, hi = min(k[1] for k in keys), max(k[1] for k in keys)
        with transaction.atomic():
            # By run, so that the unique (run, device, timestamp) index answers, not a scan of the fleet's
            # pipeline results. Usually empty (no redelivery): the membership tests run only then.
            runs = self._stream_runs()
            done = set(AnomalyResult.objects.filter(
                run_id__in=runs, device_id__in=device_ids, timestamp__gte=lo, timestamp__lte=hi,
            ).order_by().values_list("device_id", "timestamp"))
            written = _absent(keys, done)
            if not written.any():
                return written
            stored = set(Telemetry.objects.filter(device_id__in=device_ids, timestamp__gte=lo, timestamp__lte=hi)
                         .values_list("device_id", "timestamp"))
            fresh = written & _absent(keys, stored)
            if fresh.any():
                telemetry = frame.loc[fresh, ["device_id", "timestamp", *self.metrics]]
                telemetry.insert(0, "fleet_id", np.int64(self.fleet.pk))
                bulk_insert_frame(Telemetry, telemetry, json_field="values", json_columns=self.metrics)
            idx = np.flatnonzero(written)
            bulk_insert_columns(AnomalyResult, {
                "run_id": run.pk, "fleet_id": self.fleet.pk,
                "device_id": frame["device_id"].to_numpy()[idx],
                "timestamp": frame["timestamp"].iloc[idx].reset_index(drop=True),
                "anomaly_score": scores.scores[idx], "label": scores.labels[idx], "threshold": scores.threshold,
                "severity": scores.severity[idx], "model_version_id": loaded.model_version.pk,
                "baseline_version_id": loaded.model_version.baseline_version_id,
                "top_metrics": [scores.top_metrics[i] for i in idx],
                "votes": None if scores.votes is None else [scores.votes[i] for i in idx],
                "agreement": None if scores.agreement is None else [scores.agreement[i] for i in idx],
            })
            n_anomalies = int((scores.labels[idx] == -1).sum())
            PipelineRun.objects.filter(pk=run.pk).update(
                n_scored=F("n_scored") + len(idx), n_anomalies=F("n_anomalies") + n_anomalies,
                finished_at=timezone.now())
        return written

    def _stream_runs(self) -> list[int]:
        """The fleet's stream runs (one per model version that streamed; another consumer may have
        just created one)."""
        from detection.choices import Trigger
        from detection.models import PipelineRun

        return list(PipelineRun.objects.filter(fleet=self.fleet, trigger=Trigger.STREAM).values_list("pk", flat=True))

    def _after_commit(self, keys: list[tuple[int, datetime]], events: list[StreamEvent], *, new: np.ndarray,
                      redelivered: np.ndarray) -> None:
        """The alerts hook with the batch's anomalies, then one live push when there are new ones.

        Redelivered samples that are stream anomalies go to the hook again: their first delivery may
        have died between its commit and the hook, and alerts_ingest skips a (device, timestamp) that
        is already in an alert, so the hook is at least once too."""
        try:
            from alerts.services import alerts_ingest
        except ImportError:
            alerts_ingest = None
        if alerts_ingest is not None:
            anomalies = self._stream_anomalies({k for k, keep in zip(keys, new | redelivered) if keep})
            if anomalies:
                try:
                    alerts_ingest(anomalies=anomalies)
                    done = time.time()
                    self.stats.alert_latencies_s.extend(
                        max(done - entry_time(e.entry_id), 0.0) for e, is_new in zip(events, new) if is_new)
                except Exception:  # the results are committed; an alerting failure must not stop the stream
                    logger.exception("alerts_ingest failed for %d stream anomalies of %s", len(anomalies),
                                     self.fleet.name)
        if self.push and new.any():
            from detection.models import PipelineRun
            from detection.push import push_run_finished

            push_run_finished(PipelineRun.objects.select_related("fleet").get(pk=self._run.pk))

    def _stream_anomalies(self, pairs: set[tuple[int, datetime]]) -> list:
        """The stream's AnomalyResult rows (label -1) at these (device pk, timestamp) pairs, as deferred
        instances like .only(...) makes (other fields load on access), without a queryset's per-row
        overhead: the alerts hook reads their pk and label."""
        from django.db import router

        from detection.choices import Label
        from detection.models import AnomalyResult

        found = AnomalyResult.objects.filter(
            run_id__in=self._stream_runs(), label=Label.ANOMALY, device_id__in=sorted({p[0] for p in pairs}),
            timestamp__gte=min(p[1] for p in pairs), timestamp__lte=max(p[1] for p in pairs),
        ).order_by().values_list("pk", "run_id", "device_id", "timestamp", "severity")
        db = router.db_for_read(AnomalyResult)
        order = [f.attname for f in AnomalyResult._meta.concrete_fields]  # from_db reads values in this order
        fields = sorted(["id", "label", "fleet_id", "run_id", "device_id", "timestamp", "severity"], key=order.index)
        anomalies = []
        for pk, run, device, ts, severity in found:
            if (device, ts) in pairs:
                known = {"id": pk, "label": Label.ANOMALY, "fleet_id": self.fleet.pk, "run_id": run,
                         "device_id": device, "timestamp": ts, "severity": severity}
                anomalies.append(AnomalyResult.from_db(db, fields, [known[f] for f in fields]))
        return anomalies

    def _dead_letter(self, dead: list[tuple[str, dict, EventError]]) -> None:
        if not dead:
            return
        from detection.metrics import EVENTS_DEAD_LETTERED

        pipe = self.client.pipeline(transaction=False)
        for entry_id, fields, error in dead:
            payload = _field(fields, EVENT_FIELD)
            if payload is None:
                payload = json.dumps({_text(k): _text(v) for k, v in fields.items()})
            pipe.xadd(self.dead_key, {"event": payload, "reason": str(error), "kind": error.kind,
                                      "source_id": entry_id, "consumer": self.consumer},
                      maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            EVENTS_DEAD_LETTERED.labels(fleet=self.fleet.name, reason=error.kind).inc()
            logger.warning("dead-lettered %s of %s: %s", entry_id, self.key, error)
        pipe.execute()
        self.stats.dead_lettered += len(dead)

    def _deliveries(self, ids: list[str]) -> dict[str, int]:
        """{entry id: how often the group delivered it} (XPENDING of this consumer): it counts across
        restarts and consumers, as every read of a pending entry (own re-read or XAUTOCLAIM) adds one."""
        ordered = sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))
        pending = self.client.xpending_range(self.key, GROUP, min=ordered[0], max=ordered[-1],
                                             count=len(ids) * 2 + 100, consumername=self.consumer)
        return {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}

    def _ack(self, ids: list[str]) -> None:
        if ids:
            self.client.xack(self.key, GROUP, *ids)


def stream_run_get(*, fleet, model_version, threshold: float | None, stream: str):
    """The PipelineRun (trigger "stream") that holds the stream's results for this model version,
    created on first use. All consumers of the fleet share it, so the database's unique (run, device,
    timestamp) guards against two of them writing one sample. The run is marked succeeded at once (it
    has no end); n_scored / n_anomalies grow with every micro-batch and finished_at is the last one."""
    from django.utils import timezone

    from detection.choices import RunStage, RunStatus, Trigger
    from detection.models import PipelineRun

    def existing():
        return (PipelineRun.objects.filter(fleet=fleet, trigger=Trigger.STREAM, model_version=model_version)
                .order_by("pk").first())

    run = existing()
    if run is None:
        now = timezone.now()
        mine = PipelineRun.objects.create(
            fleet=fleet, trigger=Trigger.STREAM, status=RunStatus.SUCCEEDED, stage=RunStage.DONE,
            params={"source": "stream", "stream": stream}, model_version=model_version,
            baseline_version=model_version.baseline_version, started_at=now, finished_at=now,
            threshold=threshold)
        run = existing()
        if run.pk != mine.pk:  # two consumers started at once: keep the older run
            mine.delete()
    return run


def stream_consume(*, fleet_name: str, consumer: str, batch: int = 500, block_ms: int = 1000,
                   max_events: int | None = None, reclaim_idle_ms: int = 60_000, client=None,
                   stop: Callable[[], bool] = lambda: False, idle_exit: bool = False,
                   push: bool = True) -> ConsumerStats:
    """Consume the fleet's stream as `consumer` of GROUP until stop() is true, max_events entries have
    been handled (scored, duplicate or dead-lettered), or, with idle_exit, a read came back empty.

    Raises StreamConsumerError for an unknown fleet, a fleet without a production model version, or an
    unreachable Redis; ValueError for a bad batch/block_ms.
    """
    import redis

    from detection.models import Fleet
    from detection.serving import ServingError, model_load

    fleet = Fleet.objects.filter(name=fleet_name).first()
    if fleet is None:
        raise StreamConsumerError(f"fleet {fleet_name!r} does not exist")
    try:
        model_load(fleet=fleet)
    except ServingError as exc:
        raise StreamConsumerError(str(exc)) from None
    client = client if client is not None else redis_client()
    try:
        ensure_group(client, fleet.name)
    except redis.ConnectionError as exc:
        raise StreamConsumerError(f"Redis at {redis_url()} is unreachable: {exc}") from None
    worker = StreamConsumer(fleet=fleet, consumer=consumer, client=client, batch=batch, block_ms=block_ms,
                            reclaim_idle_ms=reclaim_idle_ms, push=push)
    worker.prepare()
    stats = worker.stats
    while not stop():
        handled = stats.scored + stats.duplicates + stats.dead_lettered
        if max_events is not None and handled >= max_events:
            break
        worker.count = batch if max_events is None else max(min(batch, max_events - handled), 1)
        try:
            entries = worker.read()
        except redis.ConnectionError:
            logger.warning("Redis connection lost; retrying in 1 s", exc_info=True)
            time.sleep(1)
            continue
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            logger.warning("stream %s or its group was deleted; creating them again", stream_key(fleet.name))
            ensure_group(client, fleet.name)
            continue
        if not entries:
            if idle_exit:
                break
            continue
        worker.process(entries)
        if worker.failures_in_a_row:  # back off while the database or model is unavailable
            time.sleep(min(0.5 * worker.failures_in_a_row, 5))
    return stats
