"""Celery tasks: thin wrappers that take ids and call one service (heavy ML work: the ml queue)."""
from celery import shared_task

from detection.models import PipelineRun

from . import services


@shared_task(name="explanations.tasks.explain_anomaly_task", acks_late=True, queue="ml")
def explain_anomaly_task(explanation_id: int) -> str:
    """Generate a pending explanation. Safe to deliver twice: the service claims the row."""
    return services.explanation_execute(explanation_id=explanation_id).status


@shared_task(name="explanations.tasks.explain_run_task", acks_late=True, queue="ml")
def explain_run_task(run_id: int, provider: str | None = None, regenerate: bool = False) -> dict:
    """Explain every anomaly of a run. Safe to deliver twice: explained anomalies are skipped unless
    regenerate is set. Progress goes to the task's state (PROGRESS, {"done", "total"}) and the log."""
    run = PipelineRun.objects.select_related("fleet").get(pk=run_id)

    def progress(done: int, total: int, message: str) -> None:
        services.logger.info("explain run %s: %s/%s (%s)", run_id, done, total, message)
        if explain_run_task.request.id and not explain_run_task.request.is_eager:
            explain_run_task.update_state(state="PROGRESS", meta={"done": done, "total": total})

    result = services.explanation_run_generate(run=run, provider=provider, regenerate=regenerate,
                                               progress=progress)
    return {"run": run_id, "generated": result.generated, "reused": result.reused,
            "seconds": round(result.seconds, 2)}
