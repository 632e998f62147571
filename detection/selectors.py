"""Reads for the detection pages and API: fleets, pipeline runs, anomaly results, review feedback,
the fleet overview (KPIs, score histogram, trend) and model versions."""
from __future__ import annotations

import datetime as dt
import json

from django.core.cache import cache
from django.db import connection, models
from django.db.models import (
    CharField, Count, Exists, F, Func, IntegerField, Max, Min, OuterRef, Q, QuerySet, Subquery, Value,
)
from django.db.models.functions import Cast, Coalesce, Floor, Least, TruncDate

from .choices import Label, ModelStatus, RunStatus, Severity, Verdict
from .models import AnomalyFeedback, AnomalyResult, Device, Fleet, ModelVersion, PipelineRun, Telemetry

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
        with_verdict_counts(AnomalyResult.objects.filter(fleet=fleet, run=run, label=Label.ANOMALY))
        .select_related("device", "model_version", "baseline_version")
        .order_by(*ANOMALY_SORTS.get(sort, ANOMALY_SORTS[DEFAULT_ANOMALY_SORT]))
    )


def with_verdict_counts(results: QuerySet[AnomalyResult]) -> QuerySet[AnomalyResult]:
    """results annotated with n_true_positive, n_false_positive and n_not_sure: its reviewers' current verdicts."""
    feedback = AnomalyFeedback.objects.filter(anomaly=OuterRef("pk"))
    return results.annotate(n_true_positive=_count(feedback.filter(verdict=Verdict.TRUE_POSITIVE), "anomaly"),
                            n_false_positive=_count(feedback.filter(verdict=Verdict.FALSE_POSITIVE), "anomaly"),
                            n_not_sure=_count(feedback.filter(verdict=Verdict.NOT_SURE), "anomaly"))


def anomalies_in_order(*, queryset: QuerySet[AnomalyResult], ids: list[int]) -> list[AnomalyResult]:
    """The rows of queryset (an anomaly_list) with these ids, in the ids' order.

    The anomaly list pages over bare ids first and loads the annotated rows of one page after: SQLite
    (and Postgres without a matching index) would otherwise compute the review-count subqueries of every
    row it sorts, not only of the 50 it shows (0.4 s per 10k rows sorted by score).
    """
    rows = {row.pk: row for row in queryset.filter(pk__in=ids).order_by()}
    return [rows[pk] for pk in ids if pk in rows]


def results_by_id(*, ids: list[int], fleet: Fleet | None = None) -> dict[int, AnomalyResult]:
    """{id: scored result} of the results among ids (any run, any label), of fleet when given, with
    fleet and device loaded; ids of no result (or of another fleet) are left out."""
    rows = AnomalyResult.objects.filter(pk__in=set(ids)).select_related("fleet", "device")
    if fleet is not None:
        rows = rows.filter(fleet=fleet)
    return {row.pk: row for row in rows}


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


RUN_CACHE_SECONDS = 7 * 24 * 3600


def _for_finished_run(run: PipelineRun, what: str, compute):
    """compute(), cached per finished run: a finished run's results never change, so its aggregates are
    computed once (1-2 s for 100k results on SQLite) instead of on every render. Unfinished runs are not
    cached. The key carries finished_at and the counts, so a re-used id never reads a stale entry."""
    if not run.is_finished or run.finished_at is None:
        return compute()
    key = f"vigil:run:{run.pk}:{run.finished_at.timestamp()}:{run.n_scored}:{run.n_anomalies}:{what}"
    value = cache.get(key)
    if value is None:
        value = compute()
        cache.set(key, value, RUN_CACHE_SECONDS)
    return value


def run_kpis(*, run: PipelineRun) -> dict:
    """Anomaly counts of run by severity over its last 24 h and 7 d, plus open and reviewed counts.

    The windows end at the run's latest scored timestamp, not the wall clock (data can be historical).
    The counts by severity are cached per finished run (_for_finished_run); the reviewed count, which
    changes with every verdict, is one query over the run's feedback. Returns {"end", "rows": [{"severity",
    "label", "day", "week", "total"}], "day", "week", "total", "reviewed", "open"}.
    """
    def by_severity() -> dict:
        end = AnomalyResult.objects.filter(run=run).aggregate(end=Max("timestamp"))["end"]
        if end is None:
            return {"end": None, "counted": {}}
        counted = {
            row["severity"]: {k: row[k] for k in ("day", "week", "total")} for row in
            AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).order_by().values("severity").annotate(
                day=Count("pk", filter=Q(timestamp__gt=end - dt.timedelta(hours=24))),
                week=Count("pk", filter=Q(timestamp__gt=end - dt.timedelta(days=7))),
                total=Count("pk"))
        }
        return {"end": end, "counted": counted}

    fixed = _for_finished_run(run, "kpis", by_severity)
    end, counted = fixed["end"], fixed["counted"]
    if end is None:
        return {"end": None, "rows": [], "day": 0, "week": 0, "total": 0, "reviewed": 0, "open": 0}
    reviewed = (AnomalyFeedback.objects.filter(anomaly__run=run, anomaly__label=Label.ANOMALY)
                .values("anomaly_id").distinct().count())
    rows = [{"severity": value, "label": label,
             **{k: counted.get(value, {}).get(k, 0) for k in ("day", "week", "total")}}
            for value, label in Severity.choices]
    totals = {k: sum(r[k] for r in counted.values()) for k in ("day", "week", "total")}
    return {"end": end, "rows": rows, **totals, "reviewed": reviewed, "open": totals["total"] - reviewed}


def run_anomaly_count(*, run: PipelineRun) -> int:
    """How many anomalies (label -1) run wrote, cached per finished run (the unfiltered list's count)."""
    return _for_finished_run(run, "anomaly_count",
                             lambda: AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).count())


def run_charts(*, run: PipelineRun) -> dict:
    """{"histogram": score_histogram, "trend": anomaly_trend} of run, cached per finished run."""
    return _for_finished_run(run, "charts", lambda: {"histogram": score_histogram(run=run),
                                                     "trend": anomaly_trend(run=run)})


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


def _utc_day(field: str):
    """The UTC calendar day of a datetime column. On SQLite, whose datetimes are stored as UTC text, the
    native date() function: Django's TruncDate calls a Python function per row there (2.5 s for 100k rows)."""
    if connection.vendor == "sqlite":
        return Func(F(field), function="date", output_field=CharField())
    return TruncDate(field, tzinfo=dt.UTC)


def anomaly_trend(*, run: PipelineRun) -> dict:
    """Anomalies of run per day (UTC) and severity: {"days": [ISO dates], "series": {severity: [counts]}}."""
    rows = (AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).order_by()
            .annotate(day=_utc_day("timestamp")).values("day", "severity").annotate(n=Count("pk")))
    table: dict = {}
    for row in rows:
        day = row["day"] if isinstance(row["day"], str) else row["day"].isoformat()
        table.setdefault(day, {})[row["severity"] or "none"] = row["n"]
    days = sorted(table)
    return {"days": days,
            "series": {value: [table[d].get(value, 0) for d in days] for value in Severity.values}}


def model_version_list(*, fleet: Fleet) -> list[ModelVersion]:
    """The fleet's model versions, newest first, with their baseline versions."""
    return list(ModelVersion.objects.filter(fleet=fleet).select_related("baseline_version").order_by("-version"))


# --- devices ---------------------------------------------------------------------------------------

def device_list(*, fleet: Fleet, run: PipelineRun | None = None) -> QuerySet[Device]:
    """The fleet's devices by external id, each with n_anomalies (anomalies of run, by default the
    fleet's latest scored run; 0 without one) and last_anomaly_at (their newest timestamp or None).
    Both are correlated subqueries, so a page of devices is one query (no N+1).
    """
    run = run or latest_scored_run(fleet=fleet)
    devices = Device.objects.filter(fleet=fleet).order_by("external_id", "id")
    if run is None:
        return devices.annotate(n_anomalies=Value(0, output_field=IntegerField()),
                                last_anomaly_at=Value(None, output_field=models.DateTimeField()))
    anomalies = AnomalyResult.objects.filter(run=run, device=OuterRef("pk"), label=Label.ANOMALY)
    return devices.annotate(
        n_anomalies=_count(anomalies, "device"),
        last_anomaly_at=Subquery(anomalies.order_by("-timestamp").values("timestamp")[:1]),
    )


def device_get(*, pk: int) -> Device | None:
    """One device with its fleet, or None."""
    return Device.objects.select_related("fleet").filter(pk=pk).first() if 0 < pk < 2**63 else None


def device_telemetry(*, device: Device, limit: int = 2000) -> list[Telemetry]:
    """The device's newest `limit` samples, oldest first (one indexed query on (device, timestamp))."""
    rows = list(Telemetry.objects.filter(device=device).order_by("-timestamp")[:limit])
    rows.reverse()
    return rows


def device_anomalies(*, device: Device, limit: int = 100) -> list[AnomalyResult]:
    """The device's anomalies (label -1) of every run, newest first, at most `limit`, with their runs'
    model versions."""
    return list(AnomalyResult.objects.filter(device=device, label=Label.ANOMALY)
                .select_related("model_version", "baseline_version").order_by("-timestamp", "-id")[:limit])


def telemetry_around(*, anomaly: AnomalyResult, samples: int = 144) -> list[Telemetry]:
    """At most `samples` telemetry rows of the anomaly's device before its timestamp and `samples` from it
    on, oldest first: two bounded queries on the (device, timestamp) index."""
    own = Telemetry.objects.filter(device_id=anomaly.device_id)
    before = list(own.filter(timestamp__lt=anomaly.timestamp).order_by("-timestamp")[:samples])
    after = list(own.filter(timestamp__gte=anomaly.timestamp).order_by("timestamp")[:samples])
    return before[::-1] + after


def scores_between(*, anomaly: AnomalyResult, start: dt.datetime, end: dt.datetime, limit: int = 1000
                   ) -> list[tuple[dt.datetime, float, int]]:
    """(timestamp, anomaly_score, label) of the anomaly's device in its run between start and end
    (inclusive), oldest first; one query on the (device, timestamp) index."""
    return list(AnomalyResult.objects.filter(device_id=anomaly.device_id, run_id=anomaly.run_id,
                                             timestamp__gte=start, timestamp__lte=end)
                .order_by("timestamp").values_list("timestamp", "anomaly_score", "label")[:limit])


def baseline_bands(*, device: Device, baseline_version_id: int | None, levels: dict[str, str],
                   metrics: list[str]) -> dict[str, dict]:
    """{metric: {"median", "mad", "level"}} of each metric's raw-value feature for device's group at the
    level that applied (levels: {metric: level} from top_metrics; the rest take the most common level,
    else "cohort"), read from baselines.models.BaselineStatistic of baseline_version_id. One query.

    The statistics are stored after fall-back, so the device's own group row holds what scoring used.
    A metric with no row (new group, feature not in the baseline) is left out.
    """
    from baselines.engine import level_columns
    from baselines.models import BaselineStatistic

    if baseline_version_id is None or not metrics:
        return {}
    default = max(set(levels.values()), key=list(levels.values()).count) if levels else "cohort"
    wanted = {m: levels.get(m, default) for m in metrics}
    columns = level_columns(device.fleet.cohort_columns or ["manufacturer", "model", "os_version"])
    attrs = {"external_id": device.external_id, "manufacturer": device.manufacturer, "model": device.model,
             "os_version": device.os_version, "store": device.store, "customer": device.customer}

    def key(level: str) -> str:
        cols = columns.get(level, [])
        return json.dumps({c: attrs.get(c, "") for c in cols}, default=str) if cols else "{}"

    pairs = Q()
    for level in set(wanted.values()):
        pairs |= Q(level=level, group_key=key(level))
    rows = BaselineStatistic.objects.filter(pairs, version_id=baseline_version_id, feature__in=metrics)
    found = {(r.level, r.feature): r for r in rows}
    bands = {}
    for metric, level in wanted.items():
        row = found.get((level, metric))
        if row is not None and row.median is not None and row.mad is not None:
            bands[metric] = {"median": row.median, "mad": row.mad, "level": level}
    return bands


# --- charts (anomaly detail, device page) ----------------------------------------------------------

BAND_Z = 3.0  # the band drawn is median +- BAND_Z * 1.4826 * MAD, i.e. robust z-scores within +-3


def _series(rows: list[Telemetry], metrics: list[str]) -> dict[str, list]:
    out: dict[str, list] = {m: [] for m in metrics}
    for row in rows:
        stamp = row.timestamp.isoformat()
        values = row.values or {}
        for m in metrics:
            v = values.get(m)
            out[m].append([stamp, v if isinstance(v, (int, float)) and v == v else None])
    return out


def _schema(fleet: Fleet, rows: list[Telemetry]) -> list[dict]:
    schema = [m for m in (fleet.metric_schema or []) if isinstance(m, dict) and m.get("name")]
    if schema:
        return schema
    seen: dict[str, None] = {}
    for row in rows[:50]:
        seen.update(dict.fromkeys(row.values or {}))
    return [{"name": name} for name in seen]


def anomaly_charts(*, anomaly: AnomalyResult, samples: int = 144) -> dict:
    """Chart data for one anomaly: the device's telemetry around it, one series per metric, with the
    baseline band of the baseline version that scored it, and the scores of its run over the same window.

    At most 2 * samples telemetry rows (before / from the event). Four queries. Returns
    {"event": ISO time, "band_z", "metrics": [{"name", "label", "unit", "points": [[ISO, value|null]],
    "band": {"median", "low", "high", "level"} | null, "top": bool}], "scores": {"points": [[ISO, score]],
    "threshold"}}. Band: median +- BAND_Z * 1.4826 * MAD (robust z-score, Hampel / Rousseeuw & Croux).
    """
    from baselines.engine import MAD_TO_SIGMA

    rows = telemetry_around(anomaly=anomaly, samples=samples)
    schema = _schema(anomaly.fleet, rows)
    names = [m["name"] for m in schema]
    top = {e.get("metric"): e.get("level", "") for e in (anomaly.top_metrics or []) if isinstance(e, dict)}
    levels = {m: lv for m, lv in top.items() if m in names and lv and lv != "training"}
    bands = baseline_bands(device=anomaly.device, baseline_version_id=anomaly.baseline_version_id,
                           levels=levels, metrics=names)
    series = _series(rows, names)
    metrics = []
    for m in sorted(schema, key=lambda m: (m["name"] not in top, names.index(m["name"]))):
        name, band = m["name"], bands.get(m["name"])
        width = BAND_Z * MAD_TO_SIGMA * band["mad"] if band else None
        metrics.append({
            "name": name, "label": m.get("label") or name.replace("_", " "), "unit": m.get("unit", ""),
            "points": series[name], "top": name in top,
            "band": {"median": band["median"], "low": band["median"] - width, "high": band["median"] + width,
                     "level": band["level"]} if band else None,
        })
    scores = scores_between(anomaly=anomaly, start=rows[0].timestamp, end=rows[-1].timestamp) if rows else []
    return {"event": anomaly.timestamp.isoformat(), "band_z": BAND_Z, "metrics": metrics,
            "scores": {"points": [[t.isoformat(), round(s, 5)] for t, s, _ in scores],
                       "threshold": anomaly.threshold}}


def device_charts(*, device: Device, samples: int = 2000) -> dict:
    """Chart data for a device page: its newest `samples` telemetry rows, one series per metric, and
    its anomalies (every run) inside that window as markers. Two queries.

    Returns {"metrics": [{"name", "label", "unit", "points": [[ISO, value|null]]}], "anomalies":
    [[ISO, severity]]}.
    """
    rows = device_telemetry(device=device, limit=samples)
    schema = _schema(device.fleet, rows)
    names = [m["name"] for m in schema]
    series = _series(rows, names)
    marks = []
    if rows:
        marks = [[t.isoformat(), sev or "low"] for t, sev in
                 AnomalyResult.objects.filter(device=device, label=Label.ANOMALY, timestamp__gte=rows[0].timestamp,
                                              timestamp__lte=rows[-1].timestamp)
                 .order_by("timestamp").values_list("timestamp", "severity").distinct()[:500]]
    return {"metrics": [{"name": m["name"], "label": m.get("label") or m["name"].replace("_", " "),
                         "unit": m.get("unit", ""), "points": series[m["name"]]} for m in schema],
            "anomalies": marks}


def device_customers(*, fleet: Fleet) -> list[str]:
    """The fleet's non-empty customer names, sorted (choices of the device list's customer filter)."""
    return list(Device.objects.filter(fleet=fleet).exclude(customer="").order_by("customer")
                .values_list("customer", flat=True).distinct())
