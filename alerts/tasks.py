"""Celery tasks of the alerts app: thin wrappers that take ids and call one service.

The beat schedule (anomaly_project/celery.py) runs score_fleets_task hourly, drift_check_task daily,
retrain_check_task nightly and send_digests_task every 30 minutes.
"""
from __future__ import annotations

from celery import shared_task
from django.conf import settings


@shared_task(name="alerts.tasks.send_delivery_task", bind=True, acks_late=True, max_retries=None)
def send_delivery_task(self, delivery_id: int) -> str:
    """One attempt; a failed one is retried with exponential backoff (retry_backoff_seconds * 2^(n-1)) until
    the service marks it dead after max_attempts. Run eagerly (no broker), the retries follow at once."""
    from .choices import DeliveryStatus
    from .services import delivery_send

    delivery = delivery_send(delivery_id=delivery_id)
    # In-process (eager, the embedded default) there is no worker to come back later: retry at once.
    while delivery.status == DeliveryStatus.FAILED and self.request.is_eager:
        delivery = delivery_send(delivery_id=delivery_id)
    if delivery.status == DeliveryStatus.FAILED:
        countdown = settings.VIGIL_ALERTS["retry_backoff_seconds"] * 2 ** max(delivery.attempts - 1, 0)
        raise self.retry(countdown=countdown)
    return delivery.status


@shared_task(name="alerts.tasks.ingest_run_task", acks_late=True)
def ingest_run_task(run_id: int) -> int:
    """Group a finished run's recent anomalies into alerts; returns how many alerts were opened or grew."""
    from .services import alerts_ingest_run

    return len(alerts_ingest_run(run_id=run_id))


@shared_task(name="alerts.tasks.send_digests_task")
def send_digests_task() -> int:
    from .services import digests_send

    return len(digests_send())


@shared_task(name="alerts.tasks.drift_check_task")
def drift_check_task() -> dict:
    """A drift report for every fleet with an active baseline version: {fleet: status}."""
    from .health import drift_check_all

    return drift_check_all()


@shared_task(name="alerts.tasks.retrain_check_task")
def retrain_check_task() -> dict:
    """Evaluate the retraining triggers of every fleet and start a candidate run where one fires."""
    from .health import retrain_check_all

    return retrain_check_all()


@shared_task(name="alerts.tasks.score_fleets_task")
def score_fleets_task() -> dict:
    """Hourly scoring: a scheduled pipeline run per fleet (when VIGIL_ALERTS["hourly_scoring"] is on or the
    fleet's config sets hourly_scoring), skipping fleets with a run still pending or running."""
    from .health import score_fleets

    return score_fleets()
