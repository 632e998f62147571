"""Prometheus metrics of this process, and the /metrics view that exposes them.

Other apps import the counters they feed from here, e.g. the alerts app:

    from detection.metrics import ALERTS_SENT, ALERTS_SUPPRESSED
    ALERTS_SENT.labels(channel="email").inc()
    ALERTS_SUPPRESSED.labels(reason="rate_limit").inc()

What is counted where:
- the live stream consumer (detection.ingest.stream, `manage.py stream_consume`) feeds the
  vigil_stream_* series, SCORING_LATENCY and ANOMALIES; it runs in its own process, so it serves
  them on its own port (`stream_consume --metrics-port 9108`) as well;
- the web process serves /metrics (this module's `metrics_view`): its own counters, Celery task
  durations and failures of the tasks it runs (eagerly, with REDIS_URL unset), and the stream lag
  of every fleet, read from Redis at scrape time (StreamLagCollector);
- Celery workers count task durations and failures through the signal handlers below once this
  module is imported in the worker (detection.tasks or the app's ready()).
Multiprocess mode (one registry across gunicorn/Celery processes) is not set up: each process
exposes its own series.

Access: with VIGIL_METRICS_TOKEN set (setting or environment variable), /metrics answers only a
request with ``Authorization: Bearer <token>`` and 401 otherwise; with it unset /metrics is open,
as Prometheus endpoints usually are (keep it on an internal network then).
"""
from __future__ import annotations

import hmac
import logging
import os
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --- live stream -----------------------------------------------------------------------------------
EVENTS_INGESTED = Counter("vigil_stream_events_ingested", "Stream events read from Redis", ["fleet"])
EVENTS_SCORED = Counter("vigil_stream_events_scored", "Stream events scored and persisted", ["fleet"])
EVENTS_DUPLICATE = Counter("vigil_stream_events_duplicate",
                           "Redelivered stream events already persisted (acknowledged, not scored again)",
                           ["fleet"])
EVENTS_DEAD_LETTERED = Counter("vigil_stream_events_dead_lettered",
                               "Stream events moved to the dead-letter stream", ["fleet", "reason"])
EVENTS_RECLAIMED = Counter("vigil_stream_events_reclaimed",
                           "Pending stream events claimed from idle consumers (XAUTOCLAIM)", ["fleet"])
BATCH_FAILURES = Counter("vigil_stream_batch_failures",
                         "Micro-batches that failed and were left pending for a retry", ["fleet"])
SCORING_LATENCY = Histogram("vigil_scoring_latency_seconds",
                            "Wall time to score and persist one micro-batch", ["fleet"], buckets=LATENCY_BUCKETS)
EVENT_LATENCY = Histogram("vigil_stream_event_latency_seconds",
                          "From the event's arrival in the stream to its persisted result", ["fleet"],
                          buckets=LATENCY_BUCKETS)
STREAM_LAG = Gauge("vigil_stream_lag_events",
                   "Entries of the stream not yet delivered to the consumer group (consumer's view)", ["fleet"])

# --- anomalies and alerts --------------------------------------------------------------------------
ANOMALIES = Counter("vigil_anomalies", "Anomalies persisted, by severity", ["fleet", "severity"])
ALERTS_SENT = Counter("vigil_alerts_sent", "Alert notifications sent", ["channel"])
ALERTS_SUPPRESSED = Counter("vigil_alerts_suppressed",
                            "Alerts not sent (deduplicated, aggregated, rate limited, snoozed)", ["reason"])

# --- Celery tasks ----------------------------------------------------------------------------------
TASK_DURATION = Histogram("vigil_task_duration_seconds", "Celery task run time", ["task", "state"],
                          buckets=LATENCY_BUCKETS + (120.0, 300.0, 900.0, 3600.0))
TASK_FAILURES = Counter("vigil_task_failures", "Celery tasks that raised", ["task"])

_task_started: dict[str, float] = {}
_task_lock = threading.Lock()


def _task_prerun(task_id=None, **_):
    with _task_lock:
        _task_started[task_id] = time.perf_counter()


def _task_postrun(task_id=None, task=None, state=None, **_):
    with _task_lock:
        started = _task_started.pop(task_id, None)
    if started is not None:
        TASK_DURATION.labels(task=getattr(task, "name", "unknown"), state=state or "unknown").observe(
            time.perf_counter() - started)


def _task_failure(sender=None, **_):
    TASK_FAILURES.labels(task=getattr(sender, "name", "unknown")).inc()


def _connect_celery_signals() -> None:
    try:
        from celery import signals
    except ImportError:  # pragma: no cover - celery is a main dependency
        return
    signals.task_prerun.connect(_task_prerun, weak=False, dispatch_uid="vigil-metrics-prerun")
    signals.task_postrun.connect(_task_postrun, weak=False, dispatch_uid="vigil-metrics-postrun")
    signals.task_failure.connect(_task_failure, weak=False, dispatch_uid="vigil-metrics-failure")


_connect_celery_signals()


class StreamLagCollector:
    """vigil_stream_group_lag / vigil_stream_group_pending per fleet, read from Redis at scrape time
    (XINFO GROUPS: `lag` = entries not yet delivered to the group, `pending` = delivered, not
    acknowledged). Fleets without a stream are left out; an unreachable Redis yields no series."""

    def describe(self):
        # what register() reads instead of collect(), so importing this module touches neither Redis
        # nor the database
        yield GaugeMetricFamily("vigil_stream_group_lag", "", labels=["fleet"])
        yield GaugeMetricFamily("vigil_stream_group_pending", "", labels=["fleet"])

    def collect(self):
        lag = GaugeMetricFamily("vigil_stream_group_lag", "Stream entries not yet delivered to the consumer group",
                                labels=["fleet"])
        pending = GaugeMetricFamily("vigil_stream_group_pending",
                                    "Stream entries delivered to the consumer group but not acknowledged",
                                    labels=["fleet"])
        try:
            from .ingest.stream import redis_client, stream_group_info
            from .models import Fleet

            client = redis_client(socket_timeout=0.5)
            for name in Fleet.objects.values_list("name", flat=True):
                info = stream_group_info(client, name)
                if info is None:
                    continue
                if info["lag"] is not None:
                    lag.add_metric([name], info["lag"])
                pending.add_metric([name], info["pending"])
        except Exception as exc:  # a scrape must not fail because Redis or the database is down
            logger.info("stream lag not collected: %s", exc)
        yield lag
        yield pending


_lag_collector = StreamLagCollector()
try:
    REGISTRY.register(_lag_collector)
except ValueError:  # already registered (module reloaded)
    pass


def metrics_token() -> str:
    from django.conf import settings

    return str(getattr(settings, "VIGIL_METRICS_TOKEN", "") or os.environ.get("VIGIL_METRICS_TOKEN", ""))


def metrics_view(request):
    """GET /metrics: this process's series in the Prometheus text format (401 without the token
    when VIGIL_METRICS_TOKEN is set)."""
    from django.http import HttpResponse, HttpResponseNotAllowed

    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    token = metrics_token()
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            response = HttpResponse("metrics token required\n", status=401, content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
