"""Celery tasks: thin wrappers that take ids and call one service."""
from celery import shared_task

from . import services


@shared_task(name="detection.tasks.run_pipeline_task", acks_late=True)
def run_pipeline_task(run_id: int) -> str:
    """Execute a pending pipeline run (ml queue). Safe to deliver twice: the service claims the run."""
    return services.pipeline_run_execute(run_id=run_id).status
