"""Live fleet updates over ws/fleets/<name>/: viewers only, re-checked on every event, pushed from the
services through detection.push, and never breaking a service when the channel layer fails."""
from __future__ import annotations

import re

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser, Group

from detection.choices import Label, RunStage, RunStatus
from detection.consumers import CLOSE_FORBIDDEN, CLOSE_NOT_FOUND
from detection.push import push_run_finished, push_run_progress
from detection.routing import websocket_urlpatterns
from detection.services import feedback_give, pipeline_run_create, pipeline_run_execute
from tests.factories import AnomalyResultFactory, FleetFactory, PipelineRunFactory, user_with_role

pytestmark = pytest.mark.django_db(transaction=True)


def _communicator(fleet_name: str, user, query: str = "") -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/fleets/{fleet_name}/{query}")
    communicator.scope["user"] = user
    return communicator


def test_anonymous_and_roleless_users_are_refused():
    fleet = FleetFactory()
    outsider = user_with_role("outsider", None)

    async def scenario():
        for user in (AnonymousUser(), outsider):
            connected, code = await _communicator(fleet.name, user).connect()
            assert (connected, code) == (False, CLOSE_FORBIDDEN)

    async_to_sync(scenario)()


def test_unknown_fleet_is_refused():
    viewer = user_with_role("vera", "viewer")

    async def scenario():
        connected, code = await _communicator("no-such-fleet", viewer).connect()
        assert (connected, code) == (False, CLOSE_NOT_FOUND)

    async_to_sync(scenario)()


def test_viewer_receives_the_run_row_of_a_run_in_progress():
    viewer = user_with_role("vera", "viewer")
    run = PipelineRunFactory(status=RunStatus.RUNNING, stage=RunStage.TRAIN, finished_at=None)

    async def scenario():
        communicator = _communicator(run.fleet.name, viewer)
        connected, _ = await communicator.connect()
        assert connected
        await sync_to_async(push_run_progress)(run)
        row = await communicator.receive_from(timeout=5)
        card = await communicator.receive_from(timeout=5)
        # One fragment per message: a <tr> followed by a <div> in one fragment breaks HTML parsing.
        assert f'<tr id="run-{run.pk}" hx-swap-oob="true"' in row and "latest-run" not in row
        assert '<div id="latest-run" hx-swap-oob="true">' in card
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_finished_run_pushes_the_new_anomalies_banner():
    viewer = user_with_role("vera", "viewer")
    run = PipelineRunFactory(n_anomalies=7)

    async def scenario():
        communicator = _communicator(run.fleet.name, viewer)
        assert (await communicator.connect())[0]
        await sync_to_async(push_run_finished)(run)
        messages = [await communicator.receive_from(timeout=5) for _ in range(3)]  # row, card, banner
        assert '<div id="new-anomalies" hx-swap-oob="true"' in messages[2] and "7 new anomalies" in messages[2]
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_finished_run_pushes_its_new_anomalies_as_list_rows():
    viewer = user_with_role("vera", "viewer")
    run = PipelineRunFactory(n_anomalies=3)
    results = AnomalyResultFactory.create_batch(3, run=run)
    AnomalyResultFactory(run=run, label=Label.NORMAL, severity="")

    async def scenario():
        communicator = _communicator(run.fleet.name, viewer)
        assert (await communicator.connect())[0]
        await sync_to_async(push_run_finished)(run)
        messages = [await communicator.receive_from(timeout=5) for _ in range(4)]  # row, card, banner, rows
        rows = messages[3]
        assert rows.startswith('<tbody hx-swap-oob="afterbegin:#anomaly-rows">')
        ids = re.findall(r'<tr id="anomaly-(\d+)" class="row-new">', rows)
        assert ids == [str(r.pk) for r in sorted(results, key=lambda r: r.timestamp, reverse=True)]
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_only_the_default_anomaly_list_takes_live_rows(client):
    run = PipelineRunFactory()
    AnomalyResultFactory.create_batch(2, run=run)
    client.force_login(user_with_role("vera", "viewer"))
    url = f"/fleets/{run.fleet.name}/anomalies/"
    assert 'id="anomaly-rows"' in client.get(url).content.decode()
    for query in ({"run": run.pk}, {"sort": "-score"}, {"severity": "high"}):
        assert 'id="anomaly-rows"' not in client.get(url, query).content.decode(), query


def test_user_whose_role_is_removed_stops_receiving_events():
    viewer = user_with_role("vera", "viewer")
    run = PipelineRunFactory(status=RunStatus.RUNNING, stage=RunStage.TRAIN, finished_at=None)

    async def scenario():
        communicator = _communicator(run.fleet.name, viewer)
        assert (await communicator.connect())[0]
        await sync_to_async(viewer.groups.remove)(await sync_to_async(Group.objects.get)(name="viewer"))
        await sync_to_async(push_run_progress)(run)
        output = await communicator.receive_output(timeout=5)
        assert output == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}
        await sync_to_async(push_run_progress)(run)
        later = []
        while not await communicator.receive_nothing(timeout=0.3):
            later.append(await communicator.receive_output(timeout=1))
        assert all(o["type"] == "websocket.close" for o in later)  # no event reaches the closed socket
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_feedback_from_another_reviewer_arrives_on_that_anomalys_page_only():
    anomaly = AnomalyResultFactory()
    other = AnomalyResultFactory(run=anomaly.run)
    watcher = user_with_role("vera", "viewer")
    reviewer = user_with_role("rita", "reviewer")

    async def scenario():
        on_page = _communicator(anomaly.fleet.name, watcher, f"?anomaly={anomaly.pk}")
        elsewhere = _communicator(anomaly.fleet.name, watcher, f"?anomaly={other.pk}")
        assert (await on_page.connect())[0] and (await elsewhere.connect())[0]
        await sync_to_async(feedback_give)(anomaly=anomaly, user=reviewer, verdict="false_positive",
                                           comment="sensor recalibrated")
        html = await on_page.receive_from(timeout=5)
        assert 'id="feedback" hx-swap-oob="true"' in html and "sensor recalibrated" in html
        assert "<form" not in html  # rendered for the viewer watching, not for the reviewer
        assert await elsewhere.receive_nothing(timeout=0.3)
        await on_page.disconnect()
        await elsewhere.disconnect()

    async_to_sync(scenario)()


class _BrokenLayer:
    calls = 0

    async def group_send(self, group, message):
        type(self).calls += 1
        raise ConnectionError("redis is down")


def test_failing_channel_layer_does_not_break_pipeline_run_execute(monkeypatch, caplog):
    monkeypatch.setattr("channels.layers.get_channel_layer", lambda *args, **kwargs: _BrokenLayer())
    fleet = FleetFactory()  # no telemetry: the run fails at ingest, after pushing its progress
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert run.status == RunStatus.FAILED and "no telemetry" in run.error
    assert _BrokenLayer.calls >= 2  # progress and the end were both attempted
    assert "could not push" in caplog.text


def test_live_push_off_sends_nothing(settings, monkeypatch):
    settings.VIGIL_LIVE_PUSH = False
    monkeypatch.setattr("channels.layers.get_channel_layer", lambda *args, **kwargs: pytest.fail("pushed"))
    push_run_progress(PipelineRunFactory())


def test_fleet_pages_connect_to_the_fleet_socket_and_keep_polling(client):
    run = PipelineRunFactory(status=RunStatus.RUNNING, stage=RunStage.TRAIN, finished_at=None)
    anomaly = AnomalyResultFactory(run=run)
    client.force_login(user_with_role("vera", "viewer"))
    socket = f'hx-ext="ws" ws-connect="/ws/fleets/{run.fleet.name}/'
    name = run.fleet.name
    pages = (f"/fleets/{name}/", f"/fleets/{name}/runs/", f"/fleets/{name}/anomalies/", f"/anomalies/{anomaly.pk}/")
    for url in pages:
        html = client.get(url).content.decode()
        assert socket in html and "hx-ws-2.min.js" in html, url
    assert 'hx-trigger="every 2s"' in client.get(f"/fleets/{run.fleet.name}/runs/").content.decode()
