"""Celery tasks: thin wrappers that take ids and call one service."""
import logging

from celery import shared_task
from django.db.models import Exists, OuterRef

from . import services
from .choices import RunStage, RunStatus
from .models import AnomalyResult, PipelineRun

logger = logging.getLogger(__name__)


@shared_task(bind=True, name="detection.tasks.run_pipeline_task", acks_late=True)
def run_pipeline_task(self, run_id: int) -> str:
    """Execute a pending pipeline run (ml queue). Safe to deliver twice: the service claims the run.

    A redelivered message means the worker that held it died (acks_late: the broker gives an
    unacknowledged task out again after its visibility timeout), leaving the run "running" with
    nothing persisted; that run is handed back as pending first, so the new worker completes it.
    """
    if (self.request.delivery_info or {}).get("redelivered"):
        pipeline_run_reclaim(run_id=run_id)
    return services.pipeline_run_execute(run_id=run_id).status


def pipeline_run_reclaim(*, run_id: int) -> bool:
    """Put a run whose worker died back to pending, with a conditional update: only a run still
    "running" that has persisted nothing (no model version, no result) is reclaimed, so a run that
    committed its results is never run twice. Returns whether the run was reclaimed."""
    results = AnomalyResult.objects.filter(run_id=OuterRef("pk"))
    reclaimed = (PipelineRun.objects.filter(id=run_id, status=RunStatus.RUNNING, model_version__isnull=True)
                 .exclude(Exists(results))
                 .update(status=RunStatus.PENDING, stage=RunStage.QUEUED, started_at=None, stage_timings={},
                         row_counts={})) == 1
    if reclaimed:
        logger.warning("run %s was redelivered after its worker died; running it again", run_id)
    return reclaimed


@shared_task(name="detection.tasks.score_shard_task")
def score_shard_task(fleet_id: int, device_ids: list[int], start: str | None = None, end: str | None = None
                     ) -> list[list]:
    """Score one device shard of a fleet with its production model (ml queue; see detection.sharding).
    Reads only; safe to run twice."""
    from .models import Fleet
    from .sharding import score_devices, scores_to_rows

    fleet = Fleet.objects.get(pk=fleet_id)
    return scores_to_rows(score_devices(fleet=fleet, device_ids=device_ids, start=start, end=end))


@shared_task(name="detection.tasks.merge_shard_scores_task")
def merge_shard_scores_task(parts: list[list[list]]) -> dict:
    """The chord's callback: every shard's rows in (device, time) order, and the anomaly count."""
    from .sharding import rows_to_scores, scores_to_rows

    rows = [row for part in parts for row in part]
    merged = scores_to_rows(rows_to_scores(rows)) if rows else []
    return {"rows": merged, "shards": len(parts), "n_anomalies": sum(1 for r in merged if r[3] == -1)}
