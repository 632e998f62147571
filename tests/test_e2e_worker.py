"""The production stack end to end: a real Celery worker process on Redis, PostgreSQL, channels-redis.

A run started through the API is executed by a worker process (not in-process) on the test's
PostgreSQL database; its anomalies come back through the API, and a websocket client subscribed to the
fleet receives the run's events through the Redis channel layer. A worker killed (SIGKILL) in the middle
of a run loses nothing: the broker delivers the task again after its visibility timeout, and the next
worker completes the run once, with no duplicated result or model version.

Runs in the PostgreSQL pass of .ci/run (DATABASE_URL=postgres://..., Redis on 127.0.0.1:6379); it uses
Redis database 6 (8 in a second test process: conftest.worker_redis_db). Skipped on SQLite; on
PostgreSQL with CI=true, an unreachable Redis is a failure.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from detection.choices import Label, RunStatus
from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import generate_fleet
from detection.models import AnomalyResult, Fleet, ModelVersion, PipelineRun
from detection.routing import websocket_urlpatterns
from conftest import worker_redis_db

from factories import user_with_role

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# Each test empties this database, so each test process has its own (db 6 in the first; its Celery
# workers must not take another process's tasks, which name runs in another test database).
REDIS_URL = os.environ.get("VIGIL_E2E_REDIS_URL", f"redis://127.0.0.1:6379/{worker_redis_db(6)}")
REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 150  # seconds for one pipeline run on a busy 2-core machine


def _unavailable(reason: str):
    (pytest.fail if os.environ.get("CI", "").lower() in ("1", "true") else pytest.skip)(reason)


@pytest.fixture
def services_up():
    if django_settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        # The SQLite pass of .ci/run skips it; the PostgreSQL pass runs it (and fails without Redis).
        pytest.skip("the end-to-end test runs in the PostgreSQL pass (DATABASE_URL=postgres://...)")
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {REDIS_URL} is not reachable: {exc}")
    client.flushdb()
    yield client
    client.flushdb()


def _forget_result_backend(app) -> None:
    """Drop the app's cached result backend (Celery keeps it on _backend_cache, or per thread), so the
    next use builds it from the current result_backend setting."""
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


@pytest.fixture
def stack(services_up, settings, tmp_path):
    """Point this process's Celery producer and channel layer at Redis db 6; yield a worker factory."""
    from anomaly_project.celery import app

    db = django_settings.DATABASES["default"]
    database_url = (f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
                    f"/{db['NAME']}")
    saved = {k: app.conf[k] for k in ("broker_url", "result_backend", "task_always_eager")}
    app.conf.update(broker_url=REDIS_URL, result_backend=REDIS_URL, task_always_eager=False)
    app._pool = app.amqp._producer_pool = None  # built for the in-memory broker, if an earlier test sent
    # and the result backend, if an earlier test built the in-memory one (an eager chord's .get()): a
    # chord's size must be stored where the workers count its parts, in Redis.
    _forget_result_backend(app)
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [REDIS_URL]}}}
    workers: list[subprocess.Popen] = []

    def start_worker(name: str, *, visibility_timeout: int = 600) -> subprocess.Popen:
        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": REDIS_URL,
               "VIGIL_VAR_DIR": str(tmp_path / "var"), "VIGIL_ARTIFACT_DIR": str(settings.VIGIL_ARTIFACT_DIR),
               "CELERY_VISIBILITY_TIMEOUT": str(visibility_timeout), "VIGIL_N_JOBS": "1",
               "VIGIL_TASK_LOG_LEVEL": "INFO",  # each task's "succeeded" line, read by the sharding test
               "DJANGO_SETTINGS_MODULE": "anomaly_project.settings"}
        log = (tmp_path / f"{name}.log").open("w")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "anomaly_project", "worker", "-Q", "default,ml",
             "--pool", "solo", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel", "INFO"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        workers.append(worker)
        deadline = time.monotonic() + 60
        while "ready." not in (tmp_path / f"{name}.log").read_text():
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker {name} did not start:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.2)
        return worker

    yield start_worker
    for log in sorted(tmp_path.glob("*.log")):  # shown by pytest when the test fails
        print(f"--- {log.name} (last lines)\n{log.read_text()[-12000:]}")
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
    app.conf.update(saved)
    app._pool = app.amqp._producer_pool = None
    _forget_result_backend(app)


@pytest.fixture
def fleet_and_token():
    ingest_batch(batch=generate_fleet(devices=12, days=4, seed=11), fleet_name="e2e")
    user = user_with_role("operator", "approver")
    return Fleet.objects.get(name="e2e"), user, Token.objects.create(user=user).key


def _finished_row(html: str, run_id: int) -> bool:
    """The run's row as pushed when it finished: a finished row no longer polls (no hx-get)."""
    tag = html.strip().split(">", 1)[0]
    return tag.startswith(f'<tr id="run-{run_id}"') and "hx-get" not in tag


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_worker_runs_the_pipeline_and_the_fleet_socket_hears_it(stack, fleet_and_token):
    fleet, user, token = fleet_and_token
    stack("w1")
    api = APIClient(HTTP_AUTHORIZATION=f"Token {token}")

    async def scenario() -> tuple[int, list[str]]:
        from asgiref.sync import sync_to_async

        communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/fleets/{fleet.name}/")
        communicator.scope["user"] = user
        connected, _ = await communicator.connect()
        assert connected
        response = await sync_to_async(api.post)("/api/v1/runs/", {"fleet": fleet.name}, format="json")
        assert response.status_code == 202, response.json()
        assert response.json()["status"] in (RunStatus.PENDING, RunStatus.RUNNING)  # queued, not run here
        run_id = response.json()["id"]
        # Wait for the finished run's row and the anomaly banner pushed by the worker (a receive that
        # times out cancels the consumer, so each waits for what is left of one deadline).
        messages: list[str] = []
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (any(_finished_row(m, run_id) for m in messages)
                   and any('id="new-anomalies"' in m for m in messages)):
            messages.append(await communicator.receive_from(timeout=max(deadline - time.monotonic(), 0.1)))
        await communicator.disconnect()
        return run_id, messages

    run_id, messages = async_to_sync(scenario)()
    assert any(_finished_row(m, run_id) for m in messages), "the finished run's row did not come over the socket"
    banner = next(m for m in messages if 'id="new-anomalies"' in m)
    run = _wait_for(lambda: PipelineRun.objects.filter(pk=run_id, status__in=[
        RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.DEGRADED]).first(), RUN_TIMEOUT, "the run to finish")
    assert run.status == RunStatus.SUCCEEDED, run.error

    listed = api.get(f"/api/v1/anomalies/?run={run_id}&label={Label.ANOMALY}")
    assert listed.status_code == 200
    assert listed.json()["count"] == run.n_anomalies > 0
    assert f"{run.n_anomalies} new anomal" in banner
    assert api.get(f"/api/v1/runs/{run_id}/").json()["status"] == RunStatus.SUCCEEDED


def test_a_killed_worker_loses_no_run_and_duplicates_nothing(stack, fleet_and_token):
    fleet, user, token = fleet_and_token
    api = APIClient(HTTP_AUTHORIZATION=f"Token {token}")
    first = stack("w-doomed", visibility_timeout=3)
    response = api.post("/api/v1/runs/", {"fleet": fleet.name}, format="json")
    assert response.status_code == 202
    run_id = response.json()["id"]
    _wait_for(lambda: PipelineRun.objects.get(pk=run_id).status == RunStatus.RUNNING, 60, "the run to start")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert PipelineRun.objects.get(pk=run_id).status == RunStatus.RUNNING  # died mid-run
    assert not AnomalyResult.objects.filter(run_id=run_id).exists()
    time.sleep(4)  # past the visibility timeout: the unacknowledged task becomes deliverable again

    stack("w-rescue", visibility_timeout=3)
    run = _wait_for(lambda: PipelineRun.objects.filter(pk=run_id, status__in=[
        RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.DEGRADED]).first(), RUN_TIMEOUT, "the redelivered run")
    assert run.status == RunStatus.SUCCEEDED, run.error
    time.sleep(2)  # a second (duplicate) delivery would have been picked up by now
    assert AnomalyResult.objects.filter(run_id=run_id).count() == run.n_scored > 0
    assert ModelVersion.objects.filter(fleet=fleet).count() == 1
    assert PipelineRun.objects.filter(fleet=fleet).count() == 1


def test_two_worker_processes_split_sharded_scoring_and_match_one_worker(stack, fleet_and_token, tmp_path):
    """Scale-out for real: two worker processes on one broker take the shards of a chord between them,
    and the merged scores equal one in-process worker's (tests/test_api_sharding.py checks the same
    equality with eager tasks)."""
    import pandas as pd

    from detection.services import pipeline_run_create, pipeline_run_execute
    from detection.sharding import fleet_score, fleet_score_sharded, fleet_shards, rows_to_scores

    fleet, _, _ = fleet_and_token
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)  # in this process
    assert run.model_version_id, run.error
    stack("w-a")
    stack("w-b")
    shards = fleet_shards(fleet=fleet, n_shards=6)
    assert len(shards) >= 4  # 12 devices in several cohorts

    merged = fleet_score_sharded(fleet=fleet, n_shards=6).get(timeout=RUN_TIMEOUT)
    single = fleet_score(fleet=fleet)
    assert merged["shards"] == len(shards)
    sharded = rows_to_scores(merged["rows"])
    pd.testing.assert_frame_equal(sharded[["device_id", "label", "severity"]],
                                  single[["device_id", "label", "severity"]])
    assert sharded["anomaly_score"].to_numpy() == pytest.approx(single["anomaly_score"].to_numpy(), rel=1e-9)
    # Each worker ran some of the shards (prefetch 1 and acks_late: a worker holds one task at a time).
    done = {name: sum("score_shard_task[" in line and "succeeded" in line  # celery's INFO line per task
                      for line in (tmp_path / f"{name}.log").read_text().splitlines()) for name in ("w-a", "w-b")}
    assert sum(done.values()) == len(shards), done
    assert all(n >= 1 for n in done.values()), done
