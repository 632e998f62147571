"""Writes for the detection app: creating and executing pipeline runs, review feedback, model promotion.

pipeline_run_execute is what both `manage.py run_pipeline` and the Celery task call. Stages run in
the strict order ingest -> features -> baselines -> train -> score -> persist; the middle four are
the Django-free core in detection.ml.pipeline.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from baselines.models import BaselineStatistic, BaselineVersion

from .choices import AuditAction, Label, ModelStatus, RunStage, RunStatus, Trigger, Verdict
from .errors import InputError
from .ingest.bulk import bulk_insert, bulk_insert_columns
from .ingest.loader import load_telemetry_frame
from .ml.artifacts import FORMAT_VERSION, ArtifactError, load_artifact, save_artifact
from .ml.pipeline import PipelineConfig, PipelineOutput, StageError, TrainingWindow, run_core
from .models import AnomalyFeedback, AnomalyResult, AuditEvent, Fleet, ModelVersion, PipelineRun
from .push import push_feedback, push_run_finished, push_run_progress, push_versions_changed

logger = logging.getLogger(__name__)

Progress = Callable[[PipelineRun, str, dict], None]


class PipelineRunError(Exception):
    """The run could not start (bad parameters, unknown fleet); nothing was saved."""


def pipeline_run_create(*, fleet: Fleet, trigger: str = Trigger.CLI, user=None, params: dict | None = None
                        ) -> PipelineRun:
    """A pending run. params may hold train_until (ISO timestamp), train_rows_per_device, score
    ("all" or "after_training") and candidate (true: the run's model version is a candidate, not
    production); they are validated here so that a bad value never starts a run.
    baseline_version_id (optional): use that baseline version of the fleet instead of computing new
    baselines; the run activates it when it persists (the feedback loop's retrain)."""
    params = dict(params or {})
    _training_window(params)
    _given_baseline(fleet, params)
    return PipelineRun.objects.create(fleet=fleet, trigger=trigger, started_by=user, params=params)


def pipeline_run_enqueue(*, run: PipelineRun) -> None:
    """Hand the run to Celery once the transaction that created it commits."""
    from .tasks import run_pipeline_task

    transaction.on_commit(lambda: run_pipeline_task.delay(run.id))


def pipeline_run_execute(*, run_id: int, progress: Progress | None = None) -> PipelineRun:
    """Run a pending pipeline run to the end. Idempotent: a run that another worker already claimed
    (status no longer pending) is returned untouched.

    Raises nothing for pipeline failures: the run is marked failed (features/train/score) or degraded
    (persist) with the error recorded, and returned.
    """
    claimed = PipelineRun.objects.filter(id=run_id, status=RunStatus.PENDING).update(
        status=RunStatus.RUNNING, started_at=timezone.now(), stage=RunStage.INGEST)
    run = PipelineRun.objects.select_related("fleet").get(id=run_id)
    if claimed != 1:
        logger.info("run %s was already claimed (status %s)", run_id, run.status)
        return run
    fleet = run.fleet

    def report(stage: str, info: dict) -> None:
        if info:
            run.stage_timings[stage] = info["seconds"]
            run.row_counts[stage] = info["rows"]
            PipelineRun.objects.filter(id=run.id).update(stage_timings=run.stage_timings, row_counts=run.row_counts)
        else:
            run.stage = stage
            PipelineRun.objects.filter(id=run.id).update(stage=stage)
        transaction.on_commit(lambda: push_run_progress(run))
        if progress:
            progress(run, stage, info)

    try:
        window = _training_window(run.params)
        config = PipelineConfig.from_settings(fleet.detection_config(), cohort_columns=fleet.cohort_columns,
                                              window=window)
        report(RunStage.INGEST, {})
        start = time.perf_counter()
        frame = load_telemetry_frame(fleet)
        if frame.empty:
            raise StageError("ingest", f"fleet {fleet.name!r} has no telemetry; ingest some first")
        report(RunStage.INGEST, {"seconds": round(time.perf_counter() - start, 3), "rows": len(frame)})
        given = _given_baseline(fleet, run.params)
        output = run_core(frame, metrics=fleet.metric_names, metric_domain=fleet.metric_domains, config=config,
                          progress=report, baselines=_load_baseline_set(given) if given else None,
                          feedback=reviewed_anomalies(fleet) if _weighs_by_reviews(config) else None)
    except (StageError, ValueError, PipelineRunError, ArtifactError) as exc:
        return _finish(run, RunStatus.FAILED, error=str(exc))
    except Exception as exc:  # an unexpected bug still ends the run with a clear status
        logger.exception("pipeline run %s failed", run.id)
        return _finish(run, RunStatus.FAILED, error=f"unexpected {type(exc).__name__}: {exc}")

    run.warnings = output.warnings
    report(RunStage.PERSIST, {})
    start = time.perf_counter()
    try:
        _persist(run, output, config)
    except Exception as exc:
        logger.exception("persisting run %s failed; nothing was written", run.id)
        return _finish(run, RunStatus.DEGRADED, error=f"persist failed, nothing was saved: {type(exc).__name__}: {exc}")
    report(RunStage.PERSIST, {"seconds": round(time.perf_counter() - start, 3), "rows": len(output.scored)})
    run = _finish(run, RunStatus.SUCCEEDED)
    _warm_run_aggregates(run)
    return run


def feedback_carry_over(*, run: PipelineRun) -> int:
    """Copy reviewers' verdicts from the fleet's earlier runs onto run's anomalies at the same (device,
    timestamp): each reviewer's latest verdict there (by updated_at), with its comment, and carried_from
    pointing at it. Called inside the persist transaction, so a run's results and the carried verdicts
    are written together or not at all. Samples that are no longer anomalies carry nothing (they leave
    the review list), and a reviewer who gives a verdict on the new anomaly replaces the copy.
    Returns the number of verdicts copied."""
    anomalies = {(device, stamp): pk for pk, device, stamp in AnomalyResult.objects.filter(
        run=run, label=Label.ANOMALY).values_list("pk", "device_id", "timestamp")}
    if not anomalies:
        return 0
    latest: dict[tuple, AnomalyFeedback] = {}
    earlier = (AnomalyFeedback.objects.filter(anomaly__fleet_id=run.fleet_id, anomaly__label=Label.ANOMALY)
               .exclude(anomaly__run=run).select_related("anomaly").order_by("updated_at", "id"))
    for item in earlier.iterator(chunk_size=2000):
        key = (item.anomaly.device_id, item.anomaly.timestamp)
        if key in anomalies:
            latest[(*key, item.user_id)] = item  # later verdicts overwrite earlier ones
    copies = [AnomalyFeedback(anomaly_id=anomalies[(device, stamp)], user_id=user, verdict=item.verdict,
                              comment=item.comment, carried_from_id=item.carried_from_id or item.pk)  # the original
              for (device, stamp, user), item in latest.items()]
    AnomalyFeedback.objects.bulk_create(copies, batch_size=1000)
    return len(copies)


def _warm_run_aggregates(run: PipelineRun) -> None:
    """Compute the finished run's overview aggregates once, here, so the first page view after a run
    reads them from the cache (2-3 s for 100k results on SQLite otherwise). A failure only costs speed."""
    from . import selectors

    try:
        selectors.run_kpis(run=run)
        selectors.run_charts(run=run)
        selectors.run_anomaly_count(run=run)
    except Exception:
        logger.warning("could not pre-compute the aggregates of run %s", run.id, exc_info=True)


def _weighs_by_reviews(config: PipelineConfig) -> bool:
    from .ml.detectors import DETECTORS
    from .ml.suite import EnsembleDetector

    return issubclass(DETECTORS[config.algorithm], EnsembleDetector)


def reviewed_anomalies(fleet: Fleet) -> pd.DataFrame:
    """The fleet's reviewed anomalies, one verdict per (device, timestamp): rows x (device_id,
    timestamp [UTC], verdict), verdict "true_positive" or "false_positive". Every reviewer's own
    verdict counts once (copies carried to later runs do not), the majority decides, and a tie or
    "not sure" leaves the row out (baselines.engine.resolve_verdicts)."""
    from baselines.engine import resolve_verdicts

    rows = (AnomalyFeedback.objects.filter(anomaly__run__fleet=fleet, carried_from__isnull=True,
                                           verdict__in=[Verdict.TRUE_POSITIVE, Verdict.FALSE_POSITIVE])
            .values_list("anomaly__device_id", "anomaly__timestamp", "verdict"))
    frame = pd.DataFrame.from_records(list(rows), columns=["device_id", "timestamp", "verdict"])
    if frame.empty:
        return frame
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame["anomaly_id"] = frame.groupby(["device_id", "timestamp"]).ngroup()  # one id per (device, timestamp)
    verdicts = resolve_verdicts(frame)
    keys = frame.drop_duplicates("anomaly_id").set_index("anomaly_id")[["device_id", "timestamp"]]
    return keys.loc[verdicts.index].assign(verdict=verdicts.to_numpy()).reset_index(drop=True)


def _training_window(params: dict) -> TrainingWindow:
    try:
        until = pd.Timestamp(params["train_until"]) if params.get("train_until") else None
        if until is not None and until.tzinfo is None:
            until = until.tz_localize("UTC")
        rows = int(params["train_rows_per_device"]) if params.get("train_rows_per_device") else None
        return TrainingWindow(train_until=until, train_rows_per_device=rows, score=params.get("score", "all"))
    except (ValueError, TypeError) as exc:
        raise PipelineRunError(f"invalid training window {params}: {exc}") from None


def _given_baseline(fleet: Fleet, params: dict) -> BaselineVersion | None:
    """The baseline version params["baseline_version_id"] names, or None; PipelineRunError when it is
    not an id of one of fleet's baseline versions."""
    value = params.get("baseline_version_id")
    if value is None:
        return None
    try:
        return BaselineVersion.objects.get(fleet=fleet, id=int(value))
    except (TypeError, ValueError, BaselineVersion.DoesNotExist):
        raise PipelineRunError(f"baseline_version_id {value!r} is not a baseline version of {fleet.name}") from None


def _load_baseline_set(version: BaselineVersion):
    return load_artifact(version.artifact_path, kind="baselines", checksum=version.artifact_checksum or None)


def baseline_version_activate(*, version: BaselineVersion, actor=None, actor_label: str = "", reason: str = ""
                              ) -> BaselineVersion:
    """Make version its fleet's active baseline: the active one gets valid_to and is deactivated, and
    version is activated, in one transaction (the database allows one active version per fleet).
    Audited as BASELINE_ACTIVATED. A version that is already active is returned unchanged."""
    with transaction.atomic():
        version = BaselineVersion.objects.select_for_update().get(pk=version.pk)
        if version.is_active:
            return version
        now = timezone.now()
        previous = BaselineVersion.objects.filter(fleet_id=version.fleet_id, is_active=True).first()
        BaselineVersion.objects.filter(fleet_id=version.fleet_id, is_active=True).update(is_active=False, valid_to=now)
        BaselineVersion.objects.filter(pk=version.pk).update(is_active=True, valid_from=now, valid_to=None)
        version.refresh_from_db()
        audit_record(action=AuditAction.BASELINE_ACTIVATED, actor=actor, actor_label=actor_label,
                     fleet=version.fleet, target=version,
                     before={"active_version": previous.number if previous else None},
                     after={"active_version": version.number}, reason=reason or version.reason)
    return version


def baseline_version_create(*, fleet: Fleet, baselines, tag: str, source: str, reason: str, row_count: int,
                            created_by=None, run: PipelineRun | None = None) -> BaselineVersion:
    """A new, inactive baseline version of fleet (number = the highest + 1) holding `baselines` (a
    baselines.engine.BaselineSet): its artifact file (baseline-v<number>-<tag>.pkl, written atomically)
    and one BaselineStatistic row per (level, group, feature). Call inside the caller's transaction and
    activate with baseline_version_activate; if the caller's transaction fails afterwards, the caller
    removes version.artifact_path. If creating the rows fails here, the artifact is removed before the
    error propagates."""
    number = (BaselineVersion.objects.filter(fleet=fleet).aggregate(n=Max("number"))["n"] or 0) + 1
    path = Path(settings.VIGIL_ARTIFACT_DIR) / fleet.name / f"baseline-v{number}-{tag}.pkl"
    checksum = save_artifact(baselines, path, kind="baselines")
    try:
        version = BaselineVersion.objects.create(
            fleet=fleet, number=number, is_active=False, levels=list(baselines.levels),
            feature_list=list(baselines.features), min_rows=baselines.min_rows, row_count=row_count,
            artifact_path=str(path), artifact_checksum=checksum, format_version=FORMAT_VERSION, source=source,
            reason=reason[:5000], created_by=created_by, run=run)
        bulk_insert(BaselineStatistic, ["version_id", "level", "group_key", "feature", "median", "mad", "row_count",
                                        "fallback_level"],
                    ((version.id, *row) for row in baselines.stats[
                        ["level", "group_key", "feature", "median", "mad", "count", "fallback_level"]
                    ].itertuples(index=False, name=None)))
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return version


def _finish(run: PipelineRun, status: str, *, error: str = "") -> PipelineRun:
    run.status = status
    run.error = error
    run.finished_at = timezone.now()
    if status == RunStatus.SUCCEEDED:
        run.stage = RunStage.DONE
    run.save(update_fields=["status", "error", "finished_at", "stage", "warnings", "stage_timings", "row_counts",
                            "model_version", "baseline_version", "n_scored", "n_anomalies", "threshold"])
    transaction.on_commit(lambda: push_run_finished(run))
    return run


def _persist(run: PipelineRun, output: PipelineOutput, config: PipelineConfig) -> None:
    """Write baseline version, model version and every scoring decision in one transaction.

    Artifacts are written first (atomically, each to its own new file); if the transaction fails
    they are removed again, so a failed persist leaves nothing behind.
    """
    fleet = run.fleet
    artifact_dir = Path(settings.VIGIL_ARTIFACT_DIR) / fleet.name
    written: list[Path] = []
    try:
        with transaction.atomic():
            baseline = _given_baseline(fleet, run.params)
            if baseline is not None:
                baseline_version_activate(version=baseline, actor=run.started_by,
                                          reason=f"used by pipeline run {run.id}")
            elif output.baselines is not None:
                baseline = baseline_version_create(
                    fleet=fleet, baselines=output.baselines, tag=f"run{run.id}", source="pipeline",
                    reason=f"computed by pipeline run {run.id}", row_count=output.training_rows,
                    created_by=run.started_by, run=run)
                written.append(Path(baseline.artifact_path))
                # A candidate retrain's baselines wait, inactive, for its model's promotion
                # (model_version_promote activates them), so the pages and drift checks keep reading the
                # baselines of the model in production.
                if not run.params.get("candidate"):
                    baseline = baseline_version_activate(version=baseline, actor=run.started_by)
            version = (ModelVersion.objects.filter(fleet=fleet).aggregate(n=Max("version"))["n"] or 0) + 1
            path = artifact_dir / f"model-v{version}-run{run.id}.pkl"
            detector = output.detector
            checksum = save_artifact({"detector": detector, "config": output.config,
                                      "model_features": output.model_features},
                                     path, kind="model")
            written.append(path)
            candidate = bool(run.params.get("candidate"))  # a retrain's model waits for promotion
            if not candidate:
                ModelVersion.objects.filter(fleet=fleet, status=ModelStatus.PRODUCTION).update(status=ModelStatus.RETIRED)
            model = ModelVersion.objects.create(
                fleet=fleet, version=version, algorithm=config.algorithm, params=_jsonable(detector.params()),
                feature_list=detector.features_, feature_domain_weights=detector.weights_,
                training_rows=output.training_rows, training_seconds=output.timings.get("train", 0.0),
                metrics=_model_metrics(output), status=ModelStatus.CANDIDATE if candidate else ModelStatus.PRODUCTION,
                baseline_version=baseline, run=run,
                artifact_path=str(path), artifact_checksum=checksum, format_version=FORMAT_VERSION)
            result = output.result
            scored = output.scored
            bulk_insert_columns(AnomalyResult, {
                "run_id": run.id, "fleet_id": fleet.id, "device_id": scored["device_id"].to_numpy(),
                "timestamp": scored["timestamp"], "anomaly_score": result.scores, "label": result.labels,
                "threshold": result.threshold, "severity": result.severity, "model_version_id": model.id,
                "baseline_version_id": baseline.id if baseline else None, "top_metrics": result.top_metrics,
                "votes": result.votes, "agreement": result.anomaly_agreement(),  # None: a single detector
            })
            run.model_version, run.baseline_version = model, baseline
            run.n_scored, run.n_anomalies, run.threshold = len(scored), result.n_anomalies, result.threshold
            feedback_carry_over(run=run)
            from alerts.services import run_persisted  # alerts from the results, or a retrain's promotion
            transaction.on_commit(lambda: run_persisted(run=run), robust=True)
    except Exception:
        for path in written:
            path.unlink(missing_ok=True)
        run.model_version = run.baseline_version = None
        run.n_scored = run.n_anomalies = 0
        run.threshold = None
        raise


def _model_metrics(output: PipelineOutput) -> dict:
    scores = output.result.scores
    return {
        "threshold": output.result.threshold,
        "anomaly_rate": round(output.result.n_anomalies / max(len(scores), 1), 5),
        "score_quantiles": {q: round(float(pd.Series(scores).quantile(q)), 5) for q in (0.5, 0.9, 0.99)},
        "dropped_features": getattr(output.detector, "dropped_", {}),
        "training_seconds": output.timings.get("train"),
    }


def _jsonable(params: dict) -> dict:
    """A detector's params as JSON: dicts, lists and tuples (as lists) kept as structures, numpy
    scalars as Python numbers, NaN and infinities as None (PostgreSQL's jsonb refuses them),
    anything else as its str()."""
    def plain(v):
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, (bool, int, str, type(None))):
            return v
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v)

    return {str(k): plain(v) for k, v in params.items()}



def fleet_delete(*, fleet: Fleet) -> None:
    """Delete a fleet with everything it owns. Results go first: they protect their model and
    baseline versions, and deleting them in one statement spares Django collecting them row by row."""
    with transaction.atomic():
        AnomalyResult.objects.filter(fleet=fleet).delete()
        fleet.delete()


# --- review feedback and model versions ------------------------------------------------------------

class FeedbackError(InputError):
    """A verdict that cannot be recorded; field names the input at fault. Nothing was saved."""


FEEDBACK_COMMENT_MAX = 2000


def feedback_give(*, anomaly: AnomalyResult, user, verdict: str, comment: str = "",
                  client_id: str | uuid.UUID | None = None) -> AnomalyFeedback:
    """Record user's verdict (true_positive, false_positive, not_sure) on an anomaly (label -1).

    One current verdict per (anomaly, user): a re-submit updates it. client_id (a UUID, optional)
    de-duplicates replays from an offline client: a known client_id returns the stored feedback
    untouched. Raises FeedbackError naming the field (anomaly, verdict, comment, client_id).
    """
    if anomaly.label != Label.ANOMALY:
        raise FeedbackError("anomaly", f"result {anomaly.pk} is not an anomaly; only anomalies take feedback")
    comment = _checked_comment(verdict, comment)
    if client_id not in (None, ""):
        try:
            client_id = client_id if isinstance(client_id, uuid.UUID) else uuid.UUID(str(client_id))
        except ValueError:
            raise FeedbackError("client_id", f"{client_id!r} is not a UUID") from None
    else:
        client_id = None
    with transaction.atomic():
        if client_id is not None:
            seen = AnomalyFeedback.objects.filter(client_id=client_id).first()
            if seen is not None:
                if (seen.anomaly_id, seen.user_id) != (anomaly.pk, user.pk):
                    raise FeedbackError("client_id", f"{client_id} was already used for another verdict")
                return seen
        feedback, _ = AnomalyFeedback.objects.update_or_create(
            anomaly=anomaly, user=user, defaults={"verdict": verdict, "comment": comment, "client_id": client_id,
                                                  "carried_from": None})  # now given on this anomaly
        transaction.on_commit(lambda: push_feedback(feedback))
        from alerts.services import alerts_on_feedback  # false positives suppress their alert
        transaction.on_commit(lambda: alerts_on_feedback(feedback=feedback), robust=True)
    return feedback


def _checked_comment(verdict: str, comment: str) -> str:
    """The comment stripped, once verdict is one of Verdict and the comment within FEEDBACK_COMMENT_MAX;
    else FeedbackError("verdict") or FeedbackError("comment")."""
    if verdict not in Verdict.values:
        raise FeedbackError("verdict", f"{verdict!r} is not one of {', '.join(Verdict.values)}")
    comment = (comment or "").strip()
    if len(comment) > FEEDBACK_COMMENT_MAX:
        raise FeedbackError("comment", f"at most {FEEDBACK_COMMENT_MAX} characters, got {len(comment)}")
    return comment


FEEDBACK_BULK_MAX = 500


def feedback_give_many(*, anomalies, user, verdict: str, comment: str = "") -> list[AnomalyFeedback]:
    """Record one verdict on several anomalies at once (a reviewer's selection on the anomaly list, or
    the anomalies of one alert), each as feedback_give would: one current verdict per (anomaly, user).

    anomalies: 1 .. FEEDBACK_BULK_MAX AnomalyResult rows (label -1). All or nothing: every row is
    checked before any is written, and the writes share one transaction, so a failure leaves no
    verdict of the batch behind. Returns the feedback rows in the order given. Raises FeedbackError
    naming the field: "anomalies" (none, too many, or results that are not anomalies, by id),
    "verdict", "comment".
    """
    anomalies = list(dict.fromkeys(anomalies))  # a result named twice is reviewed once
    if not anomalies:
        raise FeedbackError("anomalies", "select at least one anomaly")
    if len(anomalies) > FEEDBACK_BULK_MAX:
        raise FeedbackError("anomalies", f"at most {FEEDBACK_BULK_MAX} at a time, got {len(anomalies)}")
    normal = [a.pk for a in anomalies if a.label != Label.ANOMALY]
    if normal:
        raise FeedbackError("anomalies",
                            f"result(s) {ids_text(normal)} are not anomalies; only anomalies take feedback")
    comment = _checked_comment(verdict, comment)
    with transaction.atomic():
        # One upsert on (anomaly, user) instead of an update_or_create per row: the same verdict,
        # comment, cleared client_id and carried_from as feedback_give writes, created_at kept on update.
        written = AnomalyFeedback.objects.bulk_create(
            [AnomalyFeedback(anomaly=a, user=user, verdict=verdict, comment=comment) for a in anomalies],
            update_conflicts=True, unique_fields=["anomaly", "user"],
            update_fields=["verdict", "comment", "client_id", "carried_from", "updated_at"])
        by_pk = AnomalyFeedback.objects.select_related("anomaly__fleet", "user").in_bulk([f.pk for f in written])
        feedback = [by_pk[f.pk] for f in written]  # as stored (an updated row keeps its created_at)
        for item in feedback:
            transaction.on_commit(lambda item=item: push_feedback(item))
        from alerts.services import alerts_on_feedback_many  # false positives suppress their alerts
        transaction.on_commit(lambda: alerts_on_feedback_many(feedback=feedback), robust=True)
    return feedback


def feedback_give_many_by_id(*, ids: list[int], user, verdict: str, comment: str = "",
                             fleet: Fleet | None = None) -> list[AnomalyFeedback]:
    """feedback_give_many on the results with these ids (of fleet, when given). Raises FeedbackError
    ("anomalies") naming the ids that are no result (of that fleet), and as feedback_give_many."""
    from .selectors import results_by_id

    found = results_by_id(ids=ids, fleet=fleet)
    missing = [i for i in dict.fromkeys(ids) if i not in found]
    if missing:
        where = f" in fleet {fleet.name}" if fleet else ""
        raise FeedbackError("anomalies", f"no result {ids_text(missing)}{where}")
    return feedback_give_many(anomalies=[found[i] for i in ids], user=user, verdict=verdict, comment=comment)


def ids_text(ids: list[int], shown: int = 10) -> str:
    """Ids for a message: the first `shown`, comma-separated, then " ..." when there are more."""
    return ", ".join(map(str, ids[:shown])) + (" ..." if len(ids) > shown else "")


class ModelVersionError(InputError):
    """A promotion or rollback that cannot happen; field names what is at fault. Nothing changed."""


ROLLED_BACK = "rolled back"


def _set_status(version: ModelVersion, status: str, user, reason: str = "") -> None:
    version.status = status
    version._history_user = user  # simple_history records who made the change, and why
    version._change_reason = reason or f"set to {status}"
    version.save(update_fields=["status"])


def model_version_promote(*, version: ModelVersion, user) -> ModelVersion:
    """Make a candidate model version its fleet's production model; the current production one is retired,
    and the candidate's baseline version becomes the active one.

    Both changes are audited by simple_history with user. Raises ModelVersionError("version") when the
    version is not a candidate.
    """
    with transaction.atomic():
        version = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if version.status != ModelStatus.CANDIDATE:
            raise ModelVersionError(
                "version", f"v{version.version} is {version.status}; only a candidate can be promoted")
        for current in ModelVersion.objects.select_for_update().filter(fleet_id=version.fleet_id,
                                                                        status=ModelStatus.PRODUCTION):
            _set_status(current, ModelStatus.RETIRED, user)
        _set_status(version, ModelStatus.PRODUCTION, user)
        if version.baseline_version_id is not None:  # a candidate's baselines go live with it
            baseline_version_activate(version=version.baseline_version, actor=user,
                                      reason=f"baselines of promoted model v{version.version}")
        audit_record(action=AuditAction.MODEL_PROMOTED, actor=user, fleet=version.fleet, target=version,
                     before={"status": ModelStatus.CANDIDATE}, after={"status": ModelStatus.PRODUCTION})
        transaction.on_commit(lambda: push_versions_changed(version.fleet))
    return version


def model_version_rollback(*, fleet: Fleet, user) -> ModelVersion:
    """Retire the fleet's production model and restore the retired version that was production before it.

    "Before" is read from the history: the newest record of another version in production, skipping
    versions that were themselves rolled back, so repeated rollbacks walk back in time instead of
    toggling. Returns the restored version. Raises ModelVersionError("fleet") when there is no
    production model or none to go back to.
    """
    with transaction.atomic():
        current = ModelVersion.objects.select_for_update().filter(fleet=fleet, status=ModelStatus.PRODUCTION).first()
        if current is None:
            raise ModelVersionError("fleet", f"{fleet.name} has no production model to roll back")
        earlier = (ModelVersion.history.filter(fleet_id=fleet.pk, status=ModelStatus.PRODUCTION)
                   .exclude(id=current.pk).order_by("-history_date", "-history_id").values_list("id", flat=True))
        retired = ModelVersion.objects.select_for_update().filter(fleet=fleet, status=ModelStatus.RETIRED).in_bulk()
        previous = next((retired[pk] for pk in dict.fromkeys(earlier) if pk in retired
                         and retired[pk].history.first().history_change_reason != ROLLED_BACK), None)
        if previous is None:
            raise ModelVersionError("fleet", f"{fleet.name} has no earlier production model to roll back to")
        _set_status(current, ModelStatus.RETIRED, user, reason=ROLLED_BACK)
        _set_status(previous, ModelStatus.PRODUCTION, user)
        if previous.baseline_version_id is not None:
            baseline_version_activate(version=previous.baseline_version, actor=user,
                                      reason=f"baselines of restored model v{previous.version}")
        audit_record(action=AuditAction.MODEL_ROLLED_BACK, actor=user, fleet=fleet, target=previous,
                     before={"production_version": current.version}, after={"production_version": previous.version},
                     reason=f"v{current.version} rolled back to v{previous.version}")
        transaction.on_commit(lambda: push_versions_changed(fleet))
    return previous


def audit_record(*, action: str, actor=None, actor_label: str = "", fleet: Fleet | None = None, target=None,
                 before: dict | None = None, after: dict | None = None, reason: str = "") -> AuditEvent:
    """Record one audited step (see AuditEvent) inside the caller's transaction, so it commits or rolls
    back with the change it describes.

    actor: the user who acted, or None for the system; actor_label then names the system actor
    ("celery-beat", "simulate_review"), default "system". target: any model instance (its class name,
    pk and str are stored). before/after: JSON-serialisable dicts of the values that changed.
    """
    label = actor_label or (actor.get_username() if actor is not None else "system")
    return AuditEvent.objects.create(
        action=str(action), actor=actor, actor_label=label[:150], fleet=fleet,
        fleet_name=fleet.name if fleet is not None else "",
        target_type=type(target).__name__ if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        target_label=str(target)[:200] if target is not None else "",
        before=before or {}, after=after or {}, reason=reason)
