"""Reads for explanation pages and the API."""
from __future__ import annotations

from django.db.models import QuerySet

from detection.choices import Label
from detection.models import AnomalyResult

from .choices import ExplanationStatus
from .models import OPEN_STATUSES, Explanation


def anomaly_get(*, pk: int) -> AnomalyResult | None:
    """One scored result with its device, run, fleet and versions, or None."""
    return (AnomalyResult.objects.select_related("device", "run__fleet", "fleet", "model_version",
                                                 "baseline_version").filter(pk=pk).first())


def explanation_latest(*, anomaly: AnomalyResult) -> Explanation | None:
    """The newest finished (ready or failed) explanation of the anomaly, or None."""
    return (Explanation.objects.filter(anomaly=anomaly, status__in=(ExplanationStatus.READY, ExplanationStatus.FAILED))
            .order_by("-created_at", "-id").first())


def explanation_open(*, anomaly: AnomalyResult) -> Explanation | None:
    """The anomaly's pending or running explanation, or None."""
    return Explanation.objects.filter(anomaly=anomaly, status__in=OPEN_STATUSES).first()


def explanation_list(*, anomaly_id: int | None = None, run_id: int | None = None) -> QuerySet[Explanation]:
    """Explanations, newest first, optionally of one anomaly or of one run's anomalies."""
    qs = Explanation.objects.select_related("anomaly__device", "anomaly__run").order_by("-created_at", "-id")
    if anomaly_id is not None:
        qs = qs.filter(anomaly_id=anomaly_id)
    if run_id is not None:
        qs = qs.filter(anomaly__run_id=run_id)
    return qs


def run_explanation_progress(*, run_id: int) -> dict:
    """{"explained", "total"}: the run's anomalies with a ready explanation, and all its anomalies."""
    total = AnomalyResult.objects.filter(run_id=run_id, label=Label.ANOMALY).count()
    explained = (Explanation.objects.filter(anomaly__run_id=run_id, status=ExplanationStatus.READY)
                 .values("anomaly_id").distinct().count())
    return {"explained": explained, "total": total}
