"""/metrics (detection.metrics): Prometheus text format, optional bearer token, Celery task series, stream lag.

The stream consumer's own counters are checked where they are produced (tests/test_stream.py).
"""
from __future__ import annotations

import os
import uuid

import pytest
from django.contrib.auth.models import User
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from anomaly_project.celery import app as celery_app
from detection.metrics import ALERTS_SENT, ALERTS_SUPPRESSED
from tests.factories import FleetFactory

pytestmark = pytest.mark.django_db


def _samples(response) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.content.decode()) for s in family.samples}


@celery_app.task(name="tests.metrics_probe")
def metrics_probe(fail: bool = False) -> str:
    if fail:
        raise RuntimeError("probe failed")
    return "ok"


def test_metrics_is_open_by_default_and_in_prometheus_format(settings):
    settings.VIGIL_METRICS_TOKEN = ""
    before = _samples(Client().get("/metrics")).get(("vigil_alerts_sent_total", (("channel", "test-email"),)), 0)
    ALERTS_SENT.labels(channel="test-email").inc(2)
    ALERTS_SUPPRESSED.labels(reason="test-rate-limit").inc()
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    samples = _samples(response)
    assert samples[("vigil_alerts_sent_total", (("channel", "test-email"),))] == before + 2
    assert samples[("vigil_alerts_suppressed_total", (("reason", "test-rate-limit"),))] >= 1
    assert Client().post("/metrics").status_code == 405


def test_token_protected_metrics_refuse_outsiders(settings):
    settings.VIGIL_METRICS_TOKEN = "s3cret-token"
    outsider = Client()
    outsider.force_login(User.objects.create_user("outsider", password="pw-123456"))  # logged in, no role, no token
    assert outsider.get("/metrics").status_code == 401
    assert Client().get("/metrics").status_code == 401
    wrong = Client().get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong["WWW-Authenticate"].startswith("Bearer")
    ok = Client().get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200 and b"vigil_stream_events_scored" in ok.content


def test_celery_task_durations_and_failures_are_counted(settings):
    settings.VIGIL_METRICS_TOKEN = ""
    key_ok = ("vigil_task_duration_seconds_count", (("state", "SUCCESS"), ("task", "tests.metrics_probe")))
    key_failed = ("vigil_task_failures_total", (("task", "tests.metrics_probe"),))
    before = _samples(Client().get("/metrics"))
    assert metrics_probe.apply().get() == "ok"
    # throw=False traces the failure as a worker does (an eager task that propagates raises before
    # Celery's failure signal, so it is the caller's error to count)
    assert metrics_probe.apply(kwargs={"fail": True}, throw=False).failed()
    after = _samples(Client().get("/metrics"))
    assert after[key_ok] == before.get(key_ok, 0) + 1
    assert after[key_failed] == before.get(key_failed, 0) + 1


def test_stream_lag_is_read_from_redis_at_scrape_time(settings):
    import redis

    from detection.ingest.stream import ensure_group, publish_events, stream_key

    client = redis.Redis.from_url("redis://127.0.0.1:6379/5", socket_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"Redis on 127.0.0.1:6379 is unreachable: {exc}")
    settings.VIGIL_METRICS_TOKEN = ""
    settings.VIGIL_STREAM_REDIS_URL = "redis://127.0.0.1:6379/5"
    settings.VIGIL_STREAM_PREFIX = f"test-{uuid.uuid4().hex[:12]}:telemetry"
    fleet = FleetFactory()
    idle = FleetFactory()  # no stream: no series
    try:
        ensure_group(client, fleet.name)
        publish_events(client, fleet.name, [{"device_id": "d1", "timestamp": f"2026-01-01T0{h}:00:00Z",
                                             "metrics": {"battery_level": 50.0}} for h in range(3)])
        samples = _samples(Client().get("/metrics"))
        assert samples[("vigil_stream_group_lag", (("fleet", fleet.name),))] == 3
        assert samples[("vigil_stream_group_pending", (("fleet", fleet.name),))] == 0
        assert ("vigil_stream_group_lag", (("fleet", idle.name),)) not in samples
    finally:
        client.delete(stream_key(fleet.name))


def test_metrics_still_answer_when_redis_is_down(settings):
    settings.VIGIL_METRICS_TOKEN = ""
    settings.VIGIL_STREAM_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    FleetFactory()
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert not [k for k in _samples(response) if k[0] == "vigil_stream_group_lag"]
