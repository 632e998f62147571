"""Retraining triggers, candidate retrains with and without auto_promote, the beat schedule sync, and the
model_health part of /api/v1/health."""
from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from django.core.management import call_command
from django.utils import timezone

from alerts import health
from alerts.models import DriftReport
from detection.choices import AuditAction, ModelStatus, RunStatus, Verdict
from detection.models import AnomalyFeedback, AuditEvent, ModelVersion, PipelineRun
from tests.factories import (
    AnomalyResultFactory,
    FleetFactory,
    ModelVersionFactory,
    PipelineRunFactory,
    user_with_role,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet():
    fleet = FleetFactory(name="ops", config={"contamination": 0.02})
    ModelVersionFactory(fleet=fleet, status=ModelStatus.PRODUCTION)
    return fleet


def kinds(fleet, **kw) -> list[str]:
    return [r.kind for r in health.retrain_triggers(fleet=fleet, **kw)]


def test_nothing_fires_for_a_fresh_healthy_model(fleet):
    PipelineRunFactory(fleet=fleet, n_scored=1000, n_anomalies=20)
    assert kinds(fleet) == []


def test_no_production_model_means_no_triggers():
    assert kinds(FleetFactory(name="empty")) == []


def test_model_age_trigger(fleet, settings):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "max_model_age_days": 30}
    assert kinds(fleet, now=timezone.now() + dt.timedelta(days=29)) == []
    assert kinds(fleet, now=timezone.now() + dt.timedelta(days=31)) == ["model_age"]


@pytest.mark.parametrize(("anomalies", "fires"), [(20, False), (59, False), (61, True), (7, False), (6, True)])
def test_anomaly_rate_far_from_contamination(fleet, settings, anomalies, fires):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "rate_factor": 3.0}  # 2 % -> limits 0.67 % and 6 %
    PipelineRunFactory(fleet=fleet, n_scored=1000, n_anomalies=anomalies)
    assert ("anomaly_rate" in kinds(fleet)) is fires


def test_candidate_runs_do_not_count_for_the_rate(fleet):
    PipelineRunFactory(fleet=fleet, n_scored=1000, n_anomalies=20)
    PipelineRunFactory(fleet=fleet, n_scored=1000, n_anomalies=500, params={"candidate": True})
    assert "anomaly_rate" not in kinds(fleet)
    assert health.model_health(fleet=fleet)["anomaly_rate"] == 0.02


def _verdicts(fleet, true_pos: int, false_pos: int):
    run = PipelineRunFactory(fleet=fleet, n_scored=1000, n_anomalies=20)
    users = [user_with_role(f"r{true_pos}-{false_pos}-{i}", "reviewer") for i in range(true_pos + false_pos)]
    for i, user in enumerate(users):
        AnomalyFeedback.objects.create(anomaly=AnomalyResultFactory(run=run), user=user,
                                       verdict=Verdict.TRUE_POSITIVE if i < true_pos else Verdict.FALSE_POSITIVE)


def test_precision_trigger_needs_enough_verdicts(fleet, settings):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "min_feedback": 10, "min_precision": 0.5}
    _verdicts(fleet, 2, 6)  # precision 0.25 but only 8 verdicts
    assert "precision" not in kinds(fleet)
    _verdicts(fleet, 0, 4)  # 12 verdicts, precision 2/12
    reasons = health.retrain_triggers(fleet=fleet)
    precision = next(r for r in reasons if r.kind == "precision")
    assert precision.value == pytest.approx(2 / 12)


def test_drift_trigger_only_after_the_model_was_trained(fleet):
    DriftReport.objects.create(fleet=fleet, status="drift", summary="3 of 11 features drifting")
    assert "drift" in kinds(fleet)
    ModelVersionFactory(fleet=fleet, status=ModelStatus.PRODUCTION, version=99)  # a newer model
    ModelVersion.objects.filter(fleet=fleet).exclude(version=99).update(status=ModelStatus.RETIRED)
    assert "drift" not in kinds(fleet)


# --- retrains through the real pipeline --------------------------------------------------------------------

@pytest.fixture
def trained_fleet(django_capture_on_commit_callbacks, settings):
    settings.VIGIL_DETECTION = {**settings.VIGIL_DETECTION, "n_estimators": 50}  # fast; versions are the point
    from detection.ingest.loader import ingest_batch
    from detection.ingest.synthetic import generate_fleet
    from detection.models import Fleet
    from detection.services import pipeline_run_create, pipeline_run_execute

    ingest_batch(batch=generate_fleet(devices=14, days=5, seed=2, start=pd.Timestamp("2024-06-01", tz="UTC")),
                 fleet_name="plant")
    fleet = Fleet.objects.get(name="plant")
    with django_capture_on_commit_callbacks(execute=True):
        run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).pk)
    assert run.status == RunStatus.SUCCEEDED, run.error
    return fleet


def _retrain(fleet, capture):
    reasons = [health.RetrainReason("model_age", "v1 is 40 days old", 40, 30)]
    with capture(execute=True):
        run = health.retrain_start(fleet=fleet, reasons=reasons)
    run.refresh_from_db()
    return run


def test_retrain_makes_a_candidate_and_keeps_production(trained_fleet, django_capture_on_commit_callbacks):
    fleet = trained_fleet
    production = ModelVersion.objects.get(fleet=fleet, status=ModelStatus.PRODUCTION)
    run = _retrain(fleet, django_capture_on_commit_callbacks)
    assert run.status == RunStatus.SUCCEEDED and run.params["candidate"] is True
    assert run.model_version.status == ModelStatus.CANDIDATE
    assert ModelVersion.objects.get(fleet=fleet, status=ModelStatus.PRODUCTION) == production
    event = AuditEvent.objects.get(action=AuditAction.RETRAIN_TRIGGERED)
    assert event.actor_label == "celery-beat" and event.after["reasons"][0]["kind"] == "model_age"
    assert health.model_health(fleet=fleet)["candidates"] == 1


def test_auto_promote_promotes_the_candidate(trained_fleet, django_capture_on_commit_callbacks):
    fleet = trained_fleet
    fleet.config = {**fleet.config, "auto_promote": True}
    fleet.save()
    run = _retrain(fleet, django_capture_on_commit_callbacks)
    assert ModelVersion.objects.get(fleet=fleet, status=ModelStatus.PRODUCTION) == run.model_version
    assert AuditEvent.objects.filter(action=AuditAction.MODEL_PROMOTED, actor_label="system").exists()


def test_no_second_retrain_while_one_is_in_flight(fleet):
    PipelineRunFactory(fleet=fleet, status=RunStatus.RUNNING)
    assert health.retrain_start(fleet=fleet, reasons=[health.RetrainReason("model_age", "old")]) is None
    assert not AuditEvent.objects.filter(action=AuditAction.RETRAIN_TRIGGERED).exists()


def test_retrain_check_all_starts_runs_only_where_triggered(fleet, settings, monkeypatch):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "max_model_age_days": 30}
    ModelVersion.objects.filter(fleet=fleet).update(created_at=timezone.now() - dt.timedelta(days=45))
    healthy = FleetFactory(name="fine")
    ModelVersionFactory(fleet=healthy, status=ModelStatus.PRODUCTION)
    started = []
    monkeypatch.setattr("detection.services.pipeline_run_enqueue", lambda *, run: started.append(run.fleet.name))
    assert health.retrain_check_all() == {"ops": ["model_age"], "fine": []}
    assert started == ["ops"]


def test_hourly_scoring_is_opt_in_and_skips_fleets_in_flight(fleet, settings, monkeypatch):
    started = []
    monkeypatch.setattr("detection.services.pipeline_run_enqueue", lambda *, run: started.append(run.pk))
    assert health.score_fleets() == {"ops": "hourly scoring is off"}
    fleet.config = {**fleet.config, "hourly_scoring": True}
    fleet.save()
    out = health.score_fleets()
    assert PipelineRun.objects.get(pk=out["ops"]).trigger == "schedule" and started == [out["ops"]]
    assert health.score_fleets() == {"ops": "a run is in flight"}


# --- beat schedule ---------------------------------------------------------------------------------------

def test_sync_schedules_writes_every_entry_and_keeps_admin_choices(capsys):
    from django_celery_beat.models import PeriodicTask

    from anomaly_project.celery import app

    call_command("sync_schedules")
    tasks = {t.name: t for t in PeriodicTask.objects.all()}
    for name, entry in app.conf.beat_schedule.items():
        assert tasks[name].task == entry["task"]
    assert tasks["daily-drift-check"].crontab.hour == "2" and tasks["daily-drift-check"].queue == "ml"
    # an admin pauses one and re-times another: sync keeps the pause, restores the schedule
    PeriodicTask.objects.filter(name="alert-digests").update(enabled=False)
    drift = tasks["daily-drift-check"]
    drift.crontab.hour = "5"
    drift.crontab.save()
    call_command("sync_schedules", "--keep-edits")
    assert PeriodicTask.objects.get(name="daily-drift-check").crontab.hour == "5"
    call_command("sync_schedules")
    assert PeriodicTask.objects.get(name="daily-drift-check").crontab.hour == "2"
    assert PeriodicTask.objects.get(name="alert-digests").enabled is False


def test_an_entry_removed_from_the_dict_is_disabled_not_deleted():
    from django_celery_beat.models import PeriodicTask

    from alerts.schedules import schedules_sync
    from anomaly_project.celery import app

    schedules_sync()
    smaller = {k: v for k, v in app.conf.beat_schedule.items() if k != "hourly-scoring"}
    result = schedules_sync(schedule=smaller)
    assert result.disabled == ["hourly-scoring"]
    assert PeriodicTask.objects.get(name="hourly-scoring").enabled is False


def test_every_scheduled_task_is_registered():
    from anomaly_project.celery import app

    app.loader.import_default_modules()
    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in app.tasks


# --- /api/v1/health ---------------------------------------------------------------------------------------

def test_health_reports_model_health_per_fleet(client, fleet):
    PipelineRunFactory(fleet=fleet, n_scored=1000, n_anomalies=300)
    DriftReport.objects.create(fleet=fleet, status="warning", summary="1 of 11 features drifting")
    body = client.get("/api/v1/health").json()
    ops = body["model_health"]["ops"]
    assert ops["drift"] == "warning" and ops["anomaly_rate"] == 0.3 and ops["contamination"] == 0.02
    assert "anomaly_rate" in ops["triggers"] and ops["model_version"] is not None


def test_commands_report_triggers_and_name_a_bad_fleet(fleet, capsys, settings, monkeypatch):
    from django.core.management import CommandError

    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "max_model_age_days": 30}
    ModelVersion.objects.filter(fleet=fleet).update(created_at=timezone.now() - dt.timedelta(days=40))
    call_command("check_retrain", "--dry-run")
    assert "ops: model_age: v" in capsys.readouterr().out
    assert not PipelineRun.objects.filter(params__candidate=True).exists()
    monkeypatch.setattr("detection.services.pipeline_run_enqueue", lambda *, run: None)
    call_command("check_retrain", "--fleet", "ops")
    assert "candidate retrain run" in capsys.readouterr().out
    with pytest.raises(CommandError, match="--fleet: no fleet named 'nope'"):
        call_command("check_retrain", "--fleet", "nope")
    with pytest.raises(CommandError, match="no active baseline version"):
        call_command("check_drift", "--fleet", "ops")


def test_a_production_run_turns_its_last_day_of_anomalies_into_alerts(trained_fleet,
                                                                     django_capture_on_commit_callbacks):
    from django.db.models import Max

    from alerts.models import AlertAnomaly
    from detection.models import AnomalyResult

    run = PipelineRun.objects.get(fleet=trained_fleet)
    newest = AnomalyResult.objects.filter(run=run).aggregate(t=Max("timestamp"))["t"]
    recent = set(AnomalyResult.objects.filter(run=run, label=-1, timestamp__gte=newest - dt.timedelta(hours=24))
                 .values_list("pk", flat=True))
    assert recent and set(AlertAnomaly.objects.values_list("anomaly_id", flat=True)) == recent
    _retrain(trained_fleet, django_capture_on_commit_callbacks)  # a candidate's results are not news
    assert set(AlertAnomaly.objects.values_list("anomaly_id", flat=True)) == recent
