"""Reads for the detection pages and API: fleets, pipeline runs and anomaly results."""
from __future__ import annotations

from django.db.models import Count, Exists, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from .choices import Label, RunStatus
from .models import AnomalyResult, Device, Fleet, PipelineRun

SCORED_STATUSES = (RunStatus.SUCCEEDED, RunStatus.DEGRADED)

# ?sort= values of the anomaly list -> ORDER BY; "-time" (newest first) is the default.
ANOMALY_SORTS: dict[str, tuple[str, ...]] = {
    "-time": ("-timestamp", "-id"),
    "time": ("timestamp", "id"),
    "-score": ("-anomaly_score", "-timestamp", "-id"),
    "score": ("anomaly_score", "-timestamp", "-id"),
}
DEFAULT_ANOMALY_SORT = "-time"


def _count(queryset: QuerySet, group_by: str) -> Coalesce:
    """A correlated COUNT(*) subquery; queryset must already be filtered on an OuterRef."""
    counted = queryset.order_by().values(group_by).annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def _scored_runs() -> QuerySet[PipelineRun]:
    """Runs that finished well enough to read results from, and wrote some."""
    return PipelineRun.objects.filter(
        Exists(AnomalyResult.objects.filter(run=OuterRef("pk"))), status__in=SCORED_STATUSES
    )


def fleet_get(*, name: str) -> Fleet:
    """The fleet called name; raises Fleet.DoesNotExist."""
    return Fleet.objects.get(name=name)


def fleet_list() -> list[Fleet]:
    """Every fleet, each with device_count, latest_run (or None), latest_scored_run_id and anomaly_count.

    anomaly_count counts the anomalies of the latest scored run (see latest_scored_run). Two queries
    whatever the number of fleets.
    """
    latest_run = PipelineRun.objects.filter(fleet=OuterRef("pk")).order_by("-created_at", "-id")
    latest_scored = _scored_runs().filter(fleet=OuterRef("pk")).order_by("-created_at", "-id")
    fleets = list(
        Fleet.objects.annotate(
            device_count=_count(Device.objects.filter(fleet=OuterRef("pk")), "fleet"),
            latest_run_id=Subquery(latest_run.values("pk")[:1]),
            latest_scored_run_id=Subquery(latest_scored.values("pk")[:1]),
        ).annotate(
            anomaly_count=_count(
                AnomalyResult.objects.filter(run=OuterRef("latest_scored_run_id"), label=Label.ANOMALY), "run"
            )
        )
    )
    runs = PipelineRun.objects.select_related("model_version", "baseline_version").in_bulk(
        [f.latest_run_id for f in fleets if f.latest_run_id]
    )
    for fleet in fleets:
        fleet.latest_run = runs.get(fleet.latest_run_id)
    return fleets


def run_list(*, fleet: Fleet | None = None) -> QuerySet[PipelineRun]:
    """Pipeline runs, newest first, with their fleet, model version and baseline version."""
    runs = PipelineRun.objects.select_related("fleet", "model_version", "baseline_version")
    return runs.filter(fleet=fleet) if fleet is not None else runs


def run_get(*, pk: int, fleet: Fleet | None = None) -> PipelineRun | None:
    """One run (of fleet, when given) or None."""
    return run_list(fleet=fleet).filter(pk=pk).first()


def latest_scored_run(*, fleet: Fleet) -> PipelineRun | None:
    """The newest run of fleet that succeeded or degraded and wrote results, or None."""
    return _scored_runs().filter(fleet=fleet).order_by("-created_at", "-id").first()


def anomaly_list(
    *, fleet: Fleet, run: PipelineRun | None = None, sort: str = DEFAULT_ANOMALY_SORT
) -> QuerySet[AnomalyResult]:
    """The anomalies (label -1) of run, by default the fleet's latest scored run; empty if it has none.

    sort is a key of ANOMALY_SORTS; an unknown key falls back to newest first.
    """
    run = run or latest_scored_run(fleet=fleet)
    if run is None:
        return AnomalyResult.objects.none()
    return (
        AnomalyResult.objects.filter(fleet=fleet, run=run, label=Label.ANOMALY)
        .select_related("device", "model_version", "baseline_version")
        .order_by(*ANOMALY_SORTS.get(sort, ANOMALY_SORTS[DEFAULT_ANOMALY_SORT]))
    )
