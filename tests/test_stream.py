"""The live Redis stream consumer (detection.ingest.stream) against a real Redis on 127.0.0.1:6379 (db 5).

Every test has its own fleet, hence its own stream keys. Without Redis the tests skip, on CI they fail.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import types
import uuid

import numpy as np
import pandas as pd
import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from detection import serving
from detection.choices import Trigger
from detection.ingest.loader import ingest_batch
from detection.ingest.stream import (
    EventError, StreamConsumer, ensure_group, dead_letter_key, parse_event, publish_events, stream_consume,
    stream_group_info, stream_key,
)
from detection.ingest.synthetic import generate_fleet
from detection.models import AnomalyResult, Fleet, PipelineRun, Telemetry
from detection.services import pipeline_run_create, pipeline_run_execute

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

REDIS_URL = "redis://127.0.0.1:6379/5"
DEVICES, DAYS, STREAM_HOURS = 12, 4, 10


@pytest.fixture
def redis_client(settings):
    """db 5 of the local Redis, with stream keys of this test's own (VIGIL_STREAM_PREFIX), removed afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"Redis on 127.0.0.1:6379 is unreachable: {exc}")
    settings.VIGIL_STREAM_REDIS_URL = REDIS_URL
    settings.VIGIL_STREAM_PREFIX = prefix = f"test-{uuid.uuid4().hex[:12]}:telemetry"
    settings.VIGIL_LIVE_PUSH = False
    yield client
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="module")
def trained_fleet(django_db_setup, django_db_blocker, tmp_path_factory):
    """One trained fleet for the module (training is the slow part), and the STREAM_HOURS of telemetry
    after its stored data, as events. Tests' own writes roll back; the fleet is deleted at the end."""
    from django.test import override_settings

    from detection.services import fleet_delete

    name = f"stream-{uuid.uuid4().hex[:10]}"
    batch = generate_fleet(devices=DEVICES, days=DAYS, seed=3)
    cut = batch.telemetry["timestamp"].max() - pd.Timedelta(hours=STREAM_HOURS - 1)
    held_out = batch.telemetry[batch.telemetry["timestamp"] >= cut]
    batch.telemetry = batch.telemetry[batch.telemetry["timestamp"] < cut].reset_index(drop=True)
    batch.labels = batch.labels[batch.labels["start"] < cut].reset_index(drop=True)
    with django_db_blocker.unblock(), override_settings(VIGIL_ARTIFACT_DIR=tmp_path_factory.mktemp("artifacts")):
        ingest_batch(batch=batch, fleet_name=name)
        fleet = Fleet.objects.get(name=name)
        run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
        assert run.model_version_id, run.error
    held_out = held_out.sort_values(["timestamp", "external_id"], ignore_index=True)  # as a fleet sends them
    metrics = fleet.metric_names
    events = [{"device_id": row["external_id"], "timestamp": row["timestamp"],
               "metrics": {m: (None if np.isnan(row[m]) else float(row[m])) for m in metrics}}
              for row in held_out.to_dict("records")]
    yield fleet, events
    with django_db_blocker.unblock():
        fleet_delete(fleet=fleet)


@pytest.fixture
def live(redis_client, trained_fleet):
    fleet, events = trained_fleet
    serving.model_cache_clear()
    return types.SimpleNamespace(fleet=Fleet.objects.get(pk=fleet.pk), client=redis_client, events=events,
                                 metrics=fleet.metric_names)


def _stream_results(fleet):
    return AnomalyResult.objects.filter(fleet=fleet, run__trigger=Trigger.STREAM)


def _consume(live, **kwargs):
    kwargs = {"batch": DEVICES * 5, "block_ms": 50, "idle_exit": True, "client": live.client, **kwargs}
    return stream_consume(fleet_name=live.fleet.name, consumer=kwargs.pop("consumer", "c1"), **kwargs)


def test_stream_scores_every_event_as_serving_does(live):
    publish_events(live.client, live.fleet.name, live.events)
    telemetry_before = Telemetry.objects.filter(fleet=live.fleet).count()
    stats = _consume(live)

    assert stats.scored == len(live.events) == DEVICES * STREAM_HOURS
    assert stats.dead_lettered == stats.duplicates == 0
    results = list(_stream_results(live.fleet).select_related("device").order_by("timestamp", "device__external_id"))
    assert len(results) == len(live.events)
    assert Telemetry.objects.filter(fleet=live.fleet).count() == telemetry_before + len(live.events)
    run = PipelineRun.objects.get(fleet=live.fleet, trigger=Trigger.STREAM)
    assert run.n_scored == len(live.events)
    assert run.n_anomalies == sum(r.is_anomaly for r in results)
    # Same features, baselines and model as /api/v1/detect: the scores agree (micro-batches hold
    # whole hours here, so every cohort bucket is complete in both).
    expected = serving.detect_observations(fleet=live.fleet, observations=live.events)
    np.testing.assert_allclose([r.anomaly_score for r in results], [e["anomaly_score"] for e in expected],
                               rtol=1e-9, atol=1e-9)
    assert [r.severity or None for r in results] == [e["severity"] for e in expected]
    assert [r.top_metrics for r in results] == [e["top_metrics"] for e in expected]
    assert stream_group_info(live.client, live.fleet.name)["pending"] == 0
    # and /metrics counts it, under the fleet's label
    samples = _metrics(Client().get("/metrics").content.decode())
    fleet = live.fleet.name
    assert samples[("vigil_stream_events_ingested_total", (("fleet", fleet),))] == len(live.events)
    assert samples[("vigil_stream_events_scored_total", (("fleet", fleet),))] == len(live.events)
    assert samples[("vigil_stream_event_latency_seconds_count", (("fleet", fleet),))] == len(live.events)
    assert samples[("vigil_scoring_latency_seconds_count", (("fleet", fleet),))] == stats.batches
    by_severity = {dict(k[1])["severity"]: v for k, v in samples.items()
                   if k[0] == "vigil_anomalies_total" and dict(k[1])["fleet"] == fleet}
    assert sum(by_severity.values()) == run.n_anomalies
    assert samples[("vigil_stream_group_lag", (("fleet", fleet),))] == 0


def test_stream_keeps_an_ensembles_votes_on_its_anomalies(live):
    live.fleet.config = {"algorithm": "ensemble", "ensemble_members": ["robust_z", "iqr", "lof"]}
    live.fleet.save()
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=live.fleet).id)
    assert run.model_version.algorithm == "ensemble", run.error
    serving.model_cache_clear()
    publish_events(live.client, live.fleet.name, live.events)
    _consume(live)
    results = list(_stream_results(live.fleet).select_related("device")
                   .order_by("timestamp", "device__external_id"))
    assert len(results) == len(live.events) and any(r.is_anomaly for r in results)
    expected = serving.detect_observations(fleet=live.fleet, observations=live.events)
    for r, e in zip(results, expected):
        assert r.model_version_id == run.model_version_id and r.is_anomaly == e["is_anomaly"]
        if r.is_anomaly:
            assert set(r.votes) == {"robust_z", "iqr", "lof"}
            assert r.agreement == pytest.approx(e["agreement"])
            assert r.agreement == pytest.approx(sum(r.votes.values()) / 3, abs=1e-4)
        else:
            assert r.votes is None and r.agreement is None


def _metrics(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_consumer_killed_before_ack_loses_and_duplicates_nothing(live):
    events = live.events[: DEVICES * 4]
    publish_events(live.client, live.fleet.name, events)
    stream_consume(fleet_name=live.fleet.name, consumer="warmup", max_events=0, client=live.client)  # group only
    dying = StreamConsumer(fleet=live.fleet, consumer="dying", client=live.client, batch=DEVICES * 3)
    entries = dying.read()
    assert len(entries) == DEVICES * 3
    dying._persist(entries[: DEVICES * 2])  # wrote two hours, then died: nothing acknowledged
    assert _stream_results(live.fleet).count() == DEVICES * 2
    assert stream_group_info(live.client, live.fleet.name)["pending"] == DEVICES * 3

    time.sleep(0.05)
    stats = _consume(live, consumer="survivor", reclaim_idle_ms=20)

    assert stats.reclaimed == DEVICES * 3  # the dead consumer's entries, claimed with XAUTOCLAIM
    assert stats.duplicates == DEVICES * 2  # already persisted: acknowledged, not written again
    assert stats.scored == DEVICES * 2  # its unpersisted hour and the hour nobody had read
    keys = list(_stream_results(live.fleet).values_list("device_id", "timestamp"))
    assert len(keys) == len(set(keys)) == len(events)
    info = stream_group_info(live.client, live.fleet.name)
    assert info["pending"] == 0 and info["lag"] == 0


def test_consumer_scores_with_what_another_consumer_persisted_meanwhile(live):
    """A consumer's in-memory history lacks the hours another consumer of the group scored; it reads
    them back before scoring, so its samples still get detect's scores."""
    hours = [live.events[h * DEVICES:(h + 1) * DEVICES] for h in range(4)]
    publish_events(live.client, live.fleet.name, hours[0])
    stream_consume(fleet_name=live.fleet.name, consumer="a", max_events=0, client=live.client)  # group only
    b = StreamConsumer(fleet=live.fleet, consumer="b", client=live.client, batch=DEVICES * 5, block_ms=50)
    b.process(b.read())  # b holds hour 0
    publish_events(live.client, live.fleet.name, hours[1] + hours[2])
    assert _consume(live, consumer="a").scored == DEVICES * 2  # a persists hours 1 and 2
    publish_events(live.client, live.fleet.name, hours[3])
    b.process(b.read())

    assert b.stats.scored == DEVICES * 2
    results = {(r.device.external_id, r.timestamp): r.anomaly_score
               for r in _stream_results(live.fleet).select_related("device").filter(timestamp=hours[3][0]["timestamp"])}
    expected = serving.detect_observations(fleet=live.fleet, observations=hours[3])
    np.testing.assert_allclose([results[(e["device_id"], e["timestamp"])] for e in hours[3]],
                               [e["anomaly_score"] for e in expected], rtol=1e-9, atol=1e-9)


def test_consumer_scores_with_the_samples_another_consumer_has_in_flight(live):
    """The group hands hour 0 to a and hour 1 to b; b scores hour 1 while a has not persisted hour 0 yet,
    reading hour 0's samples from the stream, so hour 1 still gets detect's scores."""
    publish_events(live.client, live.fleet.name, live.events[: DEVICES * 2])
    stream_consume(fleet_name=live.fleet.name, consumer="a", max_events=0, client=live.client)  # group only
    a = StreamConsumer(fleet=live.fleet, consumer="a", client=live.client, batch=DEVICES, block_ms=50)
    b = StreamConsumer(fleet=live.fleet, consumer="b", client=live.client, batch=DEVICES, block_ms=50)
    hour0, hour1 = a.read(), b.read()
    b.process(hour1)
    assert _stream_results(live.fleet).count() == DEVICES  # hour 0 is not persisted yet
    a.process(hour0)

    events = live.events[DEVICES: DEVICES * 2]
    results = {(r.device.external_id, r.timestamp): r.anomaly_score
               for r in _stream_results(live.fleet).select_related("device").filter(timestamp=events[0]["timestamp"])}
    expected = serving.detect_observations(fleet=live.fleet, observations=events)
    np.testing.assert_allclose([results[(e["device_id"], e["timestamp"])] for e in events],
                               [e["anomaly_score"] for e in expected], rtol=1e-9, atol=1e-9)
    assert stream_group_info(live.client, live.fleet.name)["pending"] == 0


def test_backlog_older_than_the_preloaded_stretch_is_scored_with_its_own_past(live):
    """stream_consume preloads the stored stretch before the fleet's newest sample; events from long
    before it (a replayed backlog) are scored against their own past, as detect scores them."""
    first = Telemetry.objects.filter(fleet=live.fleet).order_by("timestamp").values_list("timestamp", flat=True)[0]
    old = first + pd.Timedelta(days=2)
    events = [{"device_id": t.device.external_id, "timestamp": t.timestamp,
               "metrics": {m: t.values.get(m) for m in live.metrics}}
              for t in Telemetry.objects.filter(fleet=live.fleet, timestamp=old).select_related("device")]
    assert len(events) == DEVICES
    publish_events(live.client, live.fleet.name, events)

    assert _consume(live).scored == DEVICES

    scores = dict(_stream_results(live.fleet).values_list("device__external_id", "anomaly_score"))
    expected = serving.detect_observations(fleet=live.fleet, observations=events)
    np.testing.assert_allclose([scores[e["device_id"]] for e in events], [e["anomaly_score"] for e in expected],
                               rtol=1e-9, atol=1e-9)


def test_restarted_consumer_reads_its_own_pending_entries_first(live):
    publish_events(live.client, live.fleet.name, live.events[:DEVICES * 2])
    stream_consume(fleet_name=live.fleet.name, consumer="c1", max_events=0, client=live.client)
    StreamConsumer(fleet=live.fleet, consumer="c1", client=live.client, batch=DEVICES).read()  # then crashed
    stats = _consume(live, consumer="c1", reclaim_idle_ms=60_000)  # same name, restarted at once
    assert stats.scored == DEVICES * 2 and stats.reclaimed == 0
    assert stream_group_info(live.client, live.fleet.name)["pending"] == 0


def test_consumers_of_the_group_share_the_work(live):
    publish_events(live.client, live.fleet.name, live.events)
    first = _consume(live, consumer="a", max_events=DEVICES * 3, idle_exit=False)
    second = _consume(live, consumer="b")
    assert first.scored == DEVICES * 3
    assert second.scored == len(live.events) - DEVICES * 3
    assert _stream_results(live.fleet).count() == len(live.events)


def test_redelivered_event_is_not_persisted_twice(live):
    event = live.events[0]
    publish_events(live.client, live.fleet.name, [event])
    assert _consume(live).scored == 1
    telemetry = Telemetry.objects.filter(fleet=live.fleet).count()
    publish_events(live.client, live.fleet.name, [event, event])  # a producer retry, twice in one batch
    stats = _consume(live)
    assert (stats.scored, stats.duplicates, stats.dead_lettered) == (0, 2, 0)
    assert _stream_results(live.fleet).count() == 1
    assert Telemetry.objects.filter(fleet=live.fleet).count() == telemetry


def test_malformed_events_go_to_the_dead_letter_stream_with_the_reason(live):
    name, key = live.fleet.name, stream_key(live.fleet.name)
    good = live.events[0]
    base = {"fleet": name, "device_id": good["device_id"], "timestamp": good["timestamp"].isoformat(),
            "metrics": {"battery_level": 50.0}}
    bad = {
        "{not json": "not valid JSON",
        json.dumps([1, 2]): "must be a JSON object",
        json.dumps({**base, "fleet": "other"}): "fleet: 'other'",
        json.dumps({**base, "device_id": ""}): "device_id",
        json.dumps({**base, "device_id": "dev-9999"}): "device_id: 'dev-9999' is not a device",
        json.dumps({**base, "timestamp": "yesterday"}): "timestamp: 'yesterday'",
        json.dumps({**base, "metrics": {"bogus": 1}}): "unknown metric(s) bogus",
        '{"fleet": "%s", "device_id": "x", "timestamp": "2026-01-01T00:00:00Z", "metrics": {"cpu_pct": NaN}}'
        % name: "metrics.cpu_pct",
        json.dumps({**base, "metrics": {"cpu_pct": "high"}}): "metrics.cpu_pct",
    }
    for payload in bad:
        live.client.xadd(key, {"event": payload})
    live.client.xadd(key, {"payload": "wrong field"})
    publish_events(live.client, name, [good])

    stats = _consume(live)

    assert stats.scored == 1  # the consumer kept going
    assert stats.dead_lettered == len(bad) + 1
    dead = live.client.xrange(dead_letter_key(name))
    reasons = {f[b"event"].decode(): f[b"reason"].decode() for _, f in dead}
    for payload, expected in bad.items():
        assert expected in reasons[payload], (payload, reasons[payload])
    assert "no 'event' field" in reasons[json.dumps({"payload": "wrong field"})]
    assert all(f[b"source_id"] and f[b"consumer"] == b"c1" for _, f in dead)
    assert stream_group_info(live.client, name)["pending"] == 0


def test_parse_event_names_the_field():
    fields = {b"event": json.dumps({"fleet": "f", "device_id": "d", "timestamp": "2026-01-01T01:00:00",
                                    "metrics": {"a": 1, "b": None}})}
    event = parse_event("1-0", fields, fleet="f", metrics=["a", "b"])
    assert event.timestamp == pd.Timestamp("2026-01-01T01:00:00", tz="UTC")  # naive = UTC
    assert event.metrics["a"] == 1.0 and np.isnan(event.metrics["b"])
    with pytest.raises(EventError, match=r"metrics\.a: must be a finite number"):
        parse_event("1-0", {"event": fields[b"event"].replace('"a": 1', '"a": true')}, fleet="f", metrics=["a", "b"])


def test_alerts_hook_gets_the_new_anomalies_and_its_failure_does_not_stop_the_stream(live, monkeypatch):
    calls = []
    hook = types.ModuleType("alerts.services")
    hook.alerts_ingest = lambda *, anomalies: calls.append(list(anomalies))
    monkeypatch.setitem(sys.modules, "alerts.services", hook)
    spike = {**live.events[0], "metrics": {**live.events[0]["metrics"], "battery_temp": 59.0, "cpu_pct": 100.0}}
    publish_events(live.client, live.fleet.name, [spike, *live.events[1:DEVICES]])
    stats = _consume(live)
    anomalies = set(_stream_results(live.fleet).filter(label=-1).values_list("pk", flat=True))
    assert stats.anomalies == len(anomalies) >= 1
    assert len(calls) == 1 and {a.pk for a in calls[0]} == anomalies  # one call per micro-batch
    assert all(isinstance(a, AnomalyResult) and a.is_anomaly for a in calls[0])
    # a redelivered anomaly goes to the hook again (the first delivery may have died before it); the
    # hook skips what it already has, and nothing is written twice
    flagged = calls[0][0]
    again = next(e for e in [spike, *live.events[1:DEVICES]]
                 if e["device_id"] == flagged.device.external_id and e["timestamp"] == flagged.timestamp)
    publish_events(live.client, live.fleet.name, [again])
    assert _consume(live).duplicates == 1
    assert [a.pk for a in calls[1]] == [flagged.pk]
    assert _stream_results(live.fleet).count() == DEVICES

    def broken(*, anomalies):
        raise RuntimeError("smtp down")

    hook.alerts_ingest = broken
    spike2 = {**live.events[DEVICES], "metrics": {**live.events[DEVICES]["metrics"], "battery_temp": 59.0}}
    publish_events(live.client, live.fleet.name, [spike2])
    assert _consume(live).scored == 1
    assert stream_group_info(live.client, live.fleet.name)["pending"] == 0


def test_command_consumes_with_bounded_flags_and_errors_clearly(live, capsys):
    publish_events(live.client, live.fleet.name, live.events[: DEVICES * 2])
    call_command("stream_consume", "--fleet", live.fleet.name, "--consumer", "cmd", "--batch", str(DEVICES),
                 "--block-ms", "50", "--max-events", str(DEVICES * 2))
    assert f"scored {DEVICES * 2}" in capsys.readouterr().out
    assert _stream_results(live.fleet).count() == DEVICES * 2
    with pytest.raises(CommandError, match="fleet 'nope' does not exist"):
        call_command("stream_consume", "--fleet", "nope", "--max-events", "1")
    empty = Fleet.objects.create(name=f"{live.fleet.name}-new", metric_schema=live.fleet.metric_schema)
    with pytest.raises(CommandError, match="no production model version"):
        call_command("stream_consume", "--fleet", empty.name, "--max-events", "1")
    with pytest.raises(CommandError, match="--batch"):
        call_command("stream_consume", "--fleet", live.fleet.name, "--batch", "0")


def test_a_batch_that_keeps_failing_is_retried_then_dead_lettered(live, monkeypatch):
    from detection.ingest import stream

    def broken(self, batch):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(stream.MicroBatchScorer, "score", broken)
    publish_events(live.client, live.fleet.name, live.events[:3])
    ensure_group(live.client, live.fleet.name)
    first = StreamConsumer(fleet=live.fleet, consumer="c1", client=live.client, batch=10)
    first.process(first.read())
    assert first.stats.failed_batches == 1 and first.stats.dead_lettered == 0
    assert stream_group_info(live.client, live.fleet.name)["pending"] == 3  # left for a retry

    stats = _consume(live, consumer="c1", max_events=3, idle_exit=False)  # two more failures, then given up
    assert stats.failed_batches == 2 and stats.dead_lettered == 3 and stats.scored == 0
    reasons = [f[b"reason"].decode() for _, f in live.client.xrange(dead_letter_key(live.fleet.name))]
    assert reasons == ["scoring failed 3 times: RuntimeError: model exploded"] * 3
    assert stream_group_info(live.client, live.fleet.name)["pending"] == 0


def test_new_anomalies_are_pushed_once_per_micro_batch(live, settings):
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from detection.push import group_name

    settings.VIGIL_LIVE_PUSH = True
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(group_name(live.fleet.pk), channel)
    spike = {**live.events[0], "metrics": {**live.events[0]["metrics"], "battery_temp": 59.0, "cpu_pct": 100.0}}
    publish_events(live.client, live.fleet.name, [spike, *live.events[1:DEVICES * 2]])
    stats = _consume(live, batch=DEVICES * 2)
    assert stats.batches == 1 and stats.anomalies >= 1

    async def drain():
        received = []
        while True:
            try:
                received.append(await asyncio.wait_for(layer.receive(channel), 0.2))
            except asyncio.TimeoutError:
                return received

    messages = async_to_sync(drain)()
    run = PipelineRun.objects.get(fleet=live.fleet, trigger=Trigger.STREAM)
    html = [m["html"] for m in messages if m["type"] == "fleet.html"]
    # one push_run_finished for the batch: each fragment once (run row, latest-run card, banner...)
    for element in (f'<tr id="run-{run.pk}"', '<div id="latest-run"', '<div id="new-anomalies"'):
        assert sum(h.lstrip().startswith(element) for h in html) == 1, element
    assert any('id="new-anomalies"' in h and f"run #{run.pk}" in h for h in html)
