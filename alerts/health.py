"""Model health: drift checks against the active baseline version, retraining triggers, retrains that
produce a candidate model version, and the per-fleet health figures (page and /api/v1/health).

Drift: reference = the fleet's telemetry in the active baseline version's training window (before the
run's train_until, else before the run started; at most VIGIL_ALERTS["drift_reference_days"] days),
current = the last VIGIL_ALERTS["drift_current_hours"] hours of telemetry (ending at the newest sample).
The reference stops where the current window starts, so the two never overlap. Continuous features are
the fleet's metrics, categorical ones its cohort columns (baselines.drift has the tests).

Retraining triggers (each a RetrainReason): the latest drift report says drift; the latest scored run's
anomaly rate is more than rate_factor times the contamination, or less than contamination / rate_factor;
precision from reviewers' feedback (true / (true + false positives), over feedback_days) below
min_precision with at least min_feedback verdicts; the production model older than max_model_age_days.
A retrain is a pipeline run with params {"candidate": true}: its model version is a candidate, promoted
automatically when the fleet's config sets auto_promote, else it waits for an approver.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from baselines.drift import DriftThresholds, drift_report
from baselines.models import BaselineVersion
from detection.choices import AuditAction, Label, ModelStatus, RunStatus, Trigger, Verdict
from detection.models import (
    DEFAULT_COHORT_COLUMNS,
    AnomalyFeedback,
    AnomalyResult,
    Fleet,
    GroundTruthLabel,
    ModelVersion,
    PipelineRun,
    Telemetry,
)

from .choices import DriftStatus
from .models import DriftReport

logger = logging.getLogger(__name__)
SYSTEM_ACTOR = "celery-beat"


def _config() -> dict:
    return settings.VIGIL_ALERTS


class DriftCheckError(Exception):
    """A drift check that cannot run (no active baseline version, no telemetry); nothing was saved."""


# --- drift -----------------------------------------------------------------------------------------------

def drift_windows(*, fleet: Fleet, baseline: BaselineVersion) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """{"reference": (start, end), "current": (start, end)}, ends exclusive. Raises DriftCheckError when the
    fleet has no telemetry."""
    newest = Telemetry.objects.filter(fleet=fleet).aggregate(t=Max("timestamp"))["t"]
    if newest is None:
        raise DriftCheckError(f"fleet {fleet.name!r} has no telemetry")
    current_end = newest + dt.timedelta(microseconds=1)
    current_start = newest - dt.timedelta(hours=_config()["drift_current_hours"])
    trained_until = None
    run = baseline.run
    if run is not None and run.params.get("train_until"):
        trained_until = pd.Timestamp(run.params["train_until"])
        trained_until = (trained_until.tz_localize("UTC") if trained_until.tzinfo is None else trained_until
                         ).to_pydatetime()
    if trained_until is None:
        trained_until = (run.started_at if run is not None and run.started_at else baseline.valid_from)
    reference_end = min(trained_until, current_start)
    reference_start = reference_end - dt.timedelta(days=_config()["drift_reference_days"])
    return {"reference": (reference_start, reference_end), "current": (current_start, current_end)}


def drift_check(*, fleet: Fleet) -> DriftReport:
    """Compare recent telemetry with the active baseline version's training window and save a DriftReport.

    A reference or current window with too few rows gives per-feature status ok with a note (see
    baselines.drift). Raises DriftCheckError when the fleet has no active baseline version or no telemetry.
    """
    from detection.ingest.loader import load_telemetry_frame

    baseline = BaselineVersion.objects.filter(fleet=fleet, is_active=True).select_related("run").first()
    if baseline is None:
        raise DriftCheckError(f"fleet {fleet.name!r} has no active baseline version; run the pipeline first")
    windows = drift_windows(fleet=fleet, baseline=baseline)
    reference = load_telemetry_frame(fleet, start=windows["reference"][0], end=windows["reference"][1])
    current = load_telemetry_frame(fleet, start=windows["current"][0], end=windows["current"][1])
    categorical = [c for c in (fleet.cohort_columns or DEFAULT_COHORT_COLUMNS) if c in reference.columns]
    result = drift_report(reference, current, continuous=fleet.metric_names, categorical=categorical,
                          thresholds=DriftThresholds.from_config(_config().get("drift")))
    summary = result.summary
    if reference.empty:
        summary = "no telemetry before the current window to compare with"
    return DriftReport.objects.create(
        fleet=fleet, baseline_version=baseline, status=result.status, features=result.as_dicts(),
        summary=summary,
        windows={k: [v[0].isoformat(), v[1].isoformat()] for k, v in windows.items()})


def drift_check_all() -> dict[str, str]:
    """drift_check for each fleet with an active baseline version: {fleet name: status or error}."""
    out = {}
    for fleet in Fleet.objects.filter(baseline_versions__is_active=True).distinct():
        try:
            out[fleet.name] = drift_check(fleet=fleet).status
        except DriftCheckError as exc:
            out[fleet.name] = f"skipped: {exc}"
    return out


# --- retraining triggers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrainReason:
    """One fired trigger: kind (drift, anomaly_rate, precision, model_age), what was measured and the limit."""

    kind: str
    detail: str
    value: float | None = None
    limit: float | None = None


def feedback_precision(*, fleet: Fleet, since: dt.datetime | None = None) -> dict:
    """Precision from reviewers' verdicts on fleet's anomalies: {"true_positive", "false_positive",
    "not_sure", "precision" (None without TP+FP)}; one verdict per (anomaly, reviewer) counts."""
    rows = AnomalyFeedback.objects.filter(anomaly__fleet_id=fleet.pk)
    if since is not None:
        rows = rows.filter(updated_at__gte=since)
    counts = {v: 0 for v in Verdict.values}
    for row in rows.order_by().values("verdict").annotate(n=Count("pk")):
        counts[row["verdict"]] = row["n"]
    judged = counts[Verdict.TRUE_POSITIVE] + counts[Verdict.FALSE_POSITIVE]
    return {**counts, "precision": counts[Verdict.TRUE_POSITIVE] / judged if judged else None}


def _latest_scored_run(fleet: Fleet) -> PipelineRun | None:
    return (PipelineRun.objects.filter(fleet=fleet, status=RunStatus.SUCCEEDED, n_scored__gt=0)
            .filter(Q(params__candidate__isnull=True) | Q(params__candidate=False))  # a candidate's is not live
            .order_by("-finished_at", "-id").first())


def retrain_triggers(*, fleet: Fleet, now: dt.datetime | None = None) -> list[RetrainReason]:
    """The triggers that fire for fleet now (see the module docstring); [] without a production model."""
    now = now or timezone.now()
    cfg = _config()
    model = ModelVersion.objects.filter(fleet=fleet, status=ModelStatus.PRODUCTION).order_by("-version").first()
    if model is None:
        return []
    reasons = []
    report = DriftReport.objects.filter(fleet=fleet).first()
    if report is not None and report.status == DriftStatus.DRIFT and report.created_at >= model.created_at:
        reasons.append(RetrainReason("drift", f"drift report {report.pk}: {report.summary}"))
    run = _latest_scored_run(fleet)
    contamination = float(fleet.detection_config().get("contamination") or 0)
    if run is not None and contamination > 0:
        rate = run.n_anomalies / run.n_scored
        factor = cfg["rate_factor"]
        if rate > contamination * factor or rate < contamination / factor:
            detail = (f"run {run.pk} flagged {rate:.2%} of samples, contamination is {contamination:.2%} "
                      f"(limit x{factor:g})")
            reasons.append(RetrainReason("anomaly_rate", detail, rate, contamination))
    precision = feedback_precision(fleet=fleet, since=now - dt.timedelta(days=cfg["feedback_days"]))
    judged = precision[Verdict.TRUE_POSITIVE] + precision[Verdict.FALSE_POSITIVE]
    if judged >= cfg["min_feedback"] and precision["precision"] < cfg["min_precision"]:
        detail = f"precision {precision['precision']:.2f} from {judged} verdicts"
        reasons.append(RetrainReason("precision", detail, precision["precision"], cfg["min_precision"]))
    age_days = (now - model.created_at).total_seconds() / 86400
    if age_days > cfg["max_model_age_days"]:
        reasons.append(RetrainReason("model_age", f"v{model.version} is {age_days:.0f} days old", age_days,
                                     cfg["max_model_age_days"]))
    return reasons


def retrain_start(*, fleet: Fleet, reasons: list[RetrainReason], user=None, actor_label: str = SYSTEM_ACTOR
                  ) -> PipelineRun | None:
    """Start a candidate retrain (a pipeline run with params candidate=true, trigger schedule), audited as
    retrain_triggered with the reasons. Returns None (nothing started) when reasons is empty or the fleet
    already has a run pending or running."""
    from detection.services import audit_record, pipeline_run_create, pipeline_run_enqueue

    if not reasons:
        return None
    with transaction.atomic():
        Fleet.objects.select_for_update().filter(pk=fleet.pk).first()  # one retrain decision per fleet at once
        if PipelineRun.objects.filter(fleet=fleet, status__in=[RunStatus.PENDING, RunStatus.RUNNING]).exists():
            logger.info("fleet %s already has a run in flight; no retrain started", fleet.name)
            return None
        run = pipeline_run_create(fleet=fleet, trigger=Trigger.SCHEDULE, user=user,
                                  params={"candidate": True, "retrain_reasons": [r.kind for r in reasons]})
        audit_record(action=AuditAction.RETRAIN_TRIGGERED, actor=user, actor_label=actor_label, fleet=fleet,
                     target=run, after={"run": run.pk, "reasons": [asdict(r) for r in reasons]},
                     reason="; ".join(r.detail for r in reasons))
        pipeline_run_enqueue(run=run)
    return run


def retrain_check_all(*, now: dt.datetime | None = None) -> dict[str, list[str]]:
    """retrain_triggers then retrain_start for every fleet: {fleet name: fired trigger kinds}."""
    out = {}
    for fleet in Fleet.objects.all():
        reasons = retrain_triggers(fleet=fleet, now=now)
        if reasons:
            retrain_start(fleet=fleet, reasons=reasons)
        out[fleet.name] = [r.kind for r in reasons]
    return out


def retrain_finished(*, run: PipelineRun) -> None:
    """A candidate retrain persisted: promote its model version when the fleet's config sets auto_promote
    (audited by model_version_promote, actor "system"); otherwise it waits for an approver."""
    from detection.services import ModelVersionError, model_version_promote

    model = run.model_version
    if model is None or not run.fleet.detection_config().get("auto_promote"):
        return
    try:
        model_version_promote(version=model, user=None)
    except ModelVersionError:
        logger.warning("candidate v%s of %s could not be promoted", model.version, run.fleet.name,
                       exc_info=True)


def score_fleets() -> dict[str, int | str]:
    """Hourly scoring: one scheduled pipeline run per fleet whose config (or VIGIL_ALERTS["hourly_scoring"])
    enables it and that has no run in flight. {fleet name: run id or the reason it was skipped}."""
    from detection.services import pipeline_run_create, pipeline_run_enqueue

    out: dict[str, int | str] = {}
    for fleet in Fleet.objects.all():
        if not fleet.detection_config().get("hourly_scoring", _config()["hourly_scoring"]):
            out[fleet.name] = "hourly scoring is off"
            continue
        with transaction.atomic():
            in_flight = PipelineRun.objects.filter(fleet=fleet, status__in=[RunStatus.PENDING, RunStatus.RUNNING])
            if in_flight.exists():
                out[fleet.name] = "a run is in flight"
                continue
            run = pipeline_run_create(fleet=fleet, trigger=Trigger.SCHEDULE)
            pipeline_run_enqueue(run=run)
        out[fleet.name] = run.pk
    return out


# --- health figures ----------------------------------------------------------------------------------------

def ground_truth_recall(*, run: PipelineRun) -> dict | None:
    """Share of the fleet's labelled anomaly windows (GroundTruthLabel) inside run's scored period that hold
    at least one anomaly of run on their device: {"hit", "windows", "recall"}; None without labels."""
    span = AnomalyResult.objects.filter(run=run).aggregate(start=Max("timestamp"))
    labels = list(GroundTruthLabel.objects.filter(fleet_id=run.fleet_id,
                                                  start__lte=span["start"] or timezone.now())
                  .values_list("device_id", "start", "end"))
    if not labels:
        return None
    hits = pd.DataFrame(list(AnomalyResult.objects.filter(run=run, label=Label.ANOMALY)
                             .values_list("device_id", "timestamp")), columns=["device_id", "timestamp"])
    by_device = {d: np.sort(g["timestamp"].to_numpy(dtype="datetime64[ns]"))
                 for d, g in hits.groupby("device_id")}
    hit = 0
    for device_id, start, end in labels:
        times = by_device.get(device_id)
        if times is None:
            continue
        i = np.searchsorted(times, np.datetime64(pd.Timestamp(start).tz_convert(None)), side="left")
        hit += bool(i < len(times) and times[i] <= np.datetime64(pd.Timestamp(end).tz_convert(None)))
    return {"hit": hit, "windows": len(labels), "recall": hit / len(labels)}


def model_health(*, fleet: Fleet, now: dt.datetime | None = None) -> dict:
    """One fleet's health summary (JSON-ready): production model (version, age, trained rows), latest run's
    anomaly rate against the contamination, precision from feedback, latest drift status, fired triggers."""
    now = now or timezone.now()
    model = ModelVersion.objects.filter(fleet=fleet, status=ModelStatus.PRODUCTION).order_by("-version").first()
    report = DriftReport.objects.filter(fleet=fleet).first()
    run = _latest_scored_run(fleet)
    precision = feedback_precision(fleet=fleet, since=now - dt.timedelta(days=_config()["feedback_days"]))
    return {
        "model_version": model.version if model else None,
        "model_trained_at": model.created_at.isoformat() if model else None,
        "model_age_days": round((now - model.created_at).total_seconds() / 86400, 2) if model else None,
        "candidates": ModelVersion.objects.filter(fleet=fleet, status=ModelStatus.CANDIDATE).count(),
        "anomaly_rate": round(run.n_anomalies / run.n_scored, 5) if run else None,
        "contamination": fleet.detection_config().get("contamination"),
        "precision": round(precision["precision"], 4) if precision["precision"] is not None else None,
        "verdicts": precision[Verdict.TRUE_POSITIVE] + precision[Verdict.FALSE_POSITIVE],
        "drift": report.status if report else "unknown",
        "drift_checked_at": report.created_at.isoformat() if report else None,
        "triggers": [r.kind for r in retrain_triggers(fleet=fleet, now=now)],
    }


def model_health_summary() -> dict[str, dict]:
    """model_health of every fleet, by name (the model_health part of GET /api/v1/health). Never raises: a
    fleet whose figures fail reports {"error": ...} (a health endpoint reports, it does not crash)."""
    out = {}
    for fleet in Fleet.objects.all():
        try:
            out[fleet.name] = model_health(fleet=fleet)
        except Exception as exc:
            logger.exception("model health of %s failed", fleet.name)
            out[fleet.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def anomaly_rate_series(*, fleet: Fleet, limit: int = 50) -> dict:
    """Anomaly rate of the fleet's last `limit` finished runs, oldest first: {"runs": [ids], "at": [ISO],
    "rate": [share], "candidate": [bool], "contamination": float}."""
    runs = list(PipelineRun.objects.filter(fleet=fleet, status=RunStatus.SUCCEEDED, n_scored__gt=0)
                .order_by("-finished_at", "-id")[:limit])[::-1]
    return {"runs": [r.pk for r in runs], "at": [f"#{r.pk} {r.finished_at:%m-%d %H:%M}" for r in runs],
            "rate": [round(r.n_anomalies / r.n_scored, 5) for r in runs],
            "candidate": [bool(r.params.get("candidate")) for r in runs],
            "contamination": fleet.detection_config().get("contamination")}


def score_distribution(*, fleet: Fleet, bins: int = 30) -> dict:
    """Scores of the latest scored run against those of the production model's training run, as shares per
    bin on common edges: {"edges", "training", "current", "training_run", "current_run", "threshold"}."""
    model = ModelVersion.objects.filter(fleet=fleet, status=ModelStatus.PRODUCTION).order_by("-version").first()
    current = _latest_scored_run(fleet)
    training_run_id = model.run_id if model else None
    series = {}
    for key, run_id in (("training", training_run_id), ("current", current.pk if current else None)):
        values = list(AnomalyResult.objects.filter(run_id=run_id).values_list("anomaly_score", flat=True)) \
            if run_id else []
        series[key] = np.asarray(values, dtype=float)
    both = np.concatenate([series["training"], series["current"]])
    if both.size == 0:
        return {"edges": [], "training": [], "current": [], "training_run": training_run_id,
                "current_run": current.pk if current else None, "threshold": None}
    edges = np.linspace(both.min(), both.max() if both.max() > both.min() else both.min() + 1, bins + 1)
    shares = {k: (np.histogram(v, edges)[0] / v.size).round(5).tolist() if v.size else []
              for k, v in series.items()}
    return {"edges": edges.round(5).tolist(), **shares, "training_run": training_run_id,
            "current_run": current.pk if current else None,
            "threshold": (model.metrics or {}).get("threshold") if model else None}
