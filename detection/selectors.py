"""Reads for the detection pages and API: fleets, pipeline runs, anomaly results, review feedback,
the fleet overview (KPIs, score histogram, trend) and model versions."""
from __future__ import annotations

import datetime as dt

from django.db.models import (
    Count, Exists, F, IntegerField, Max, Min, OuterRef, Q, QuerySet, Subquery, Value,
)
from django.db.models.functions import Cast, Coalesce, Floor, Least, TruncDate

from .choices import Label, ModelStatus, RunStatus, Severity, Verdict
from .models import AnomalyFeedback, AnomalyResult, Device, Fleet, ModelVersion, PipelineRun

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
    feedback = AnomalyFeedback.objects.filter(anomaly=OuterRef("pk"))
    return (
        AnomalyResult.objects.filter(fleet=fleet, run=run, label=Label.ANOMALY)
        .select_related("device", "model_version", "baseline_version")
        .annotate(n_true_positive=_count(feedback.filter(verdict=Verdict.TRUE_POSITIVE), "anomaly"),
                  n_false_positive=_count(feedback.filter(verdict=Verdict.FALSE_POSITIVE), "anomaly"),
                  n_not_sure=_count(feedback.filter(verdict=Verdict.NOT_SURE), "anomaly"))
        .order_by(*ANOMALY_SORTS.get(sort, ANOMALY_SORTS[DEFAULT_ANOMALY_SORT]))
    )


def device_facets(*, fleet: Fleet) -> dict[str, list[tuple[str, str]]]:
    """Choices for the anomaly filters, in one query: {"cohort": [(value, label)], "store": [...]}.

    A cohort value is "manufacturer|model|os_version" (see detection.filters.AnomalyResultFilterSet).
    """
    rows = Device.objects.filter(fleet=fleet).values_list("manufacturer", "model", "os_version", "store").distinct()
    cohorts, stores = set(), set()
    for manufacturer, model, os_version, store in rows:
        cohorts.add((manufacturer, model, os_version))
        if store:
            stores.add(store)
    return {
        "cohort": [("|".join(c), " ".join(p for p in c if p) or "(none)") for c in sorted(cohorts)],
        "store": [(s, s) for s in sorted(stores)],
    }


def anomaly_neighbours(*, anomaly: AnomalyResult) -> tuple[int | None, int | None]:
    """(previous, next) anomaly ids of anomaly's run in the list order (newest first), None at either end."""
    same_run = AnomalyResult.objects.filter(run_id=anomaly.run_id, label=Label.ANOMALY)
    ts, pk = anomaly.timestamp, anomaly.pk
    newer = same_run.filter(Q(timestamp__gt=ts) | Q(timestamp=ts, id__gt=pk)).order_by("timestamp", "id")
    older = same_run.filter(Q(timestamp__lt=ts) | Q(timestamp=ts, id__lt=pk)).order_by("-timestamp", "-id")
    return newer.values_list("id", flat=True).first(), older.values_list("id", flat=True).first()


def feedback_for_anomaly(*, anomaly: AnomalyResult) -> list[AnomalyFeedback]:
    """The current verdict of every user on anomaly, newest first, with the users."""
    return list(AnomalyFeedback.objects.filter(anomaly=anomaly).select_related("user"))


def feedback_counts(feedback: list[AnomalyFeedback]) -> dict[str, int]:
    """{verdict: count} for every verdict (zeros included)."""
    counts = dict.fromkeys(Verdict.values, 0)
    for item in feedback:
        counts[item.verdict] += 1
    return counts


# --- fleet overview --------------------------------------------------------------------------------

HISTOGRAM_BINS = 40


def production_model(*, fleet: Fleet) -> ModelVersion | None:
    """The fleet's production model version, or None."""
    return ModelVersion.objects.filter(fleet=fleet, status=ModelStatus.PRODUCTION).order_by("-version").first()


def run_kpis(*, run: PipelineRun) -> dict:
    """Anomaly counts of run by severity over its last 24 h and 7 d, plus open and reviewed counts.

    The windows end at the run's latest scored timestamp, not the wall clock (data can be historical).
    Two queries. Returns {"end", "rows": [{"severity", "label", "day", "week", "total"}], "day", "week",
    "total", "reviewed", "open"}.
    """
    end = AnomalyResult.objects.filter(run=run).aggregate(end=Max("timestamp"))["end"]
    if end is None:
        return {"end": None, "rows": [], "day": 0, "week": 0, "total": 0, "reviewed": 0, "open": 0}
    reviewed = Exists(AnomalyFeedback.objects.filter(anomaly=OuterRef("pk")))
    counted = {
        row["severity"]: row for row in
        AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).order_by().values("severity").annotate(
            day=Count("pk", filter=Q(timestamp__gt=end - dt.timedelta(hours=24))),
            week=Count("pk", filter=Q(timestamp__gt=end - dt.timedelta(days=7))),
            total=Count("pk"), reviewed=Count("pk", filter=Q(reviewed)))
    }
    rows = [{"severity": value, "label": label,
             **{k: counted.get(value, {}).get(k, 0) for k in ("day", "week", "total")}}
            for value, label in Severity.choices]
    totals = {k: sum(r[k] for r in counted.values()) for k in ("day", "week", "total", "reviewed")}
    return {"end": end, "rows": rows, **totals, "open": totals["total"] - totals["reviewed"]}


def score_histogram(*, run: PipelineRun, bins: int = HISTOGRAM_BINS) -> dict:
    """Scores of run binned in the database: {"edges": [bins + 1 floats], "normal": [counts],
    "anomaly": [counts], "threshold"}. Two queries whatever the number of results."""
    bounds = AnomalyResult.objects.filter(run=run).aggregate(low=Min("anomaly_score"), high=Max("anomaly_score"))
    low, high = bounds["low"], bounds["high"]
    if low is None:
        return {"edges": [], "normal": [], "anomaly": [], "threshold": run.threshold}
    width = (high - low) / bins or 1.0
    bucket = Least(Cast(Floor((F("anomaly_score") - Value(low)) / Value(width)), IntegerField()), Value(bins - 1))
    normal, anomaly = [0] * bins, [0] * bins
    for row in (AnomalyResult.objects.filter(run=run).order_by().annotate(bucket=bucket)
                .values("bucket", "label").annotate(n=Count("pk"))):
        (anomaly if row["label"] == Label.ANOMALY else normal)[int(row["bucket"])] += row["n"]
    return {"edges": [round(low + i * width, 6) for i in range(bins + 1)], "normal": normal, "anomaly": anomaly,
            "threshold": run.threshold}


def anomaly_trend(*, run: PipelineRun) -> dict:
    """Anomalies of run per day (UTC) and severity: {"days": [ISO dates], "series": {severity: [counts]}}."""
    rows = (AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).order_by()
            .annotate(day=TruncDate("timestamp")).values("day", "severity").annotate(n=Count("pk")))
    table: dict = {}
    for row in rows:
        table.setdefault(row["day"], {})[row["severity"] or "none"] = row["n"]
    days = sorted(table)
    return {"days": [d.isoformat() for d in days],
            "series": {value: [table[d].get(value, 0) for d in days] for value in Severity.values}}


def model_version_list(*, fleet: Fleet) -> list[ModelVersion]:
    """The fleet's model versions, newest first, with their baseline versions."""
    return list(ModelVersion.objects.filter(fleet=fleet).select_related("baseline_version").order_by("-version"))
