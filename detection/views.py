"""Pages: fleets, the fleet overview, pipeline runs (with a polling progress fragment), the anomaly
list and detail (with review feedback) and model versions.

Each view parses its input, calls selectors or one service and renders. For htmx requests the anomaly
list renders only its table partial, so filtering, paging and sorting swap the table and push the URL.
Every page needs the viewer role; feedback needs reviewer; runs, promotion and rollback need approver.
"""
from __future__ import annotations

from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_POST
from django_htmx.http import HTMX_STOP_POLLING
from django_htmx.middleware import HtmxDetails

from . import selectors, services
from .choices import Role, Trigger, Verdict
from .filters import AnomalyResultFilterSet
from .models import Fleet, ModelVersion
from .permissions import role_required

RUNS_PER_PAGE = 25
ANOMALIES_PER_PAGE = 50
ANOMALY_SORT_OPTIONS = [
    ("-time", "Newest"), ("time", "Oldest"), ("-score", "Highest score"), ("score", "Lowest score"),
]


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def _fleet_or_404(name: str) -> Fleet:
    try:
        return selectors.fleet_get(name=name)
    except Fleet.DoesNotExist:
        raise Http404(f"No fleet named {name!r}") from None


def _id_or_none(raw: str | None) -> int | None:
    """A positive 64-bit id from a query parameter, or None (a bigger one would overflow the database)."""
    try:
        value = int(raw or "")
    except ValueError:
        return None
    return value if 0 < value < 2**63 else None


def _live_push() -> bool:
    """Whether fleet pages connect to ws/fleets/<name>/ for live updates (detection.push)."""
    from .push import live_push_enabled

    return live_push_enabled()


def _wants_partial(request: HtmxHttpRequest) -> bool:
    # A history restore (cache miss after Back) needs the whole page, not the fragment.
    return bool(request.htmx) and not request.htmx.history_restore_request


@role_required(Role.VIEWER)
def home(request: HtmxHttpRequest) -> HttpResponse:
    return render(request, "detection/fleet_list.html", {"fleets": selectors.fleet_list()})


@role_required(Role.VIEWER)
def run_list(request: HtmxHttpRequest, name: str | None = None) -> HttpResponse:
    fleet = _fleet_or_404(name) if name is not None else None
    page = Paginator(selectors.run_list(fleet=fleet), RUNS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "detection/run_list.html", {"fleet": fleet, "page": page, "live_push": _live_push()})


@role_required(Role.VIEWER)
def run_progress(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """One run's table row; polled every 2 s while the run is pending or running, 286 stops the polling."""
    run = selectors.run_get(pk=pk)
    if run is None:
        raise Http404(f"No pipeline run {pk}")
    status = HTMX_STOP_POLLING if run.is_finished else 200
    return render(request, "detection/partials/run_row.html", {"run": run}, status=status)


@role_required(Role.VIEWER)
def anomaly_list(request: HtmxHttpRequest, name: str) -> HttpResponse:
    fleet = _fleet_or_404(name)
    requested_run = _id_or_none(request.GET.get("run"))
    run = selectors.run_get(pk=requested_run, fleet=fleet) if requested_run is not None else None
    run_not_found = requested_run is not None and run is None
    run = run or selectors.latest_scored_run(fleet=fleet)
    sort = request.GET.get("sort", "")
    sort = sort if sort in selectors.ANOMALY_SORTS else selectors.DEFAULT_ANOMALY_SORT
    results = selectors.anomaly_list(fleet=fleet, run=run, sort=sort)
    filterset = AnomalyResultFilterSet(request.GET, queryset=results, facets=selectors.device_facets(fleet=fleet))
    page = Paginator(filterset.qs, ANOMALIES_PER_PAGE).get_page(request.GET.get("page"))
    context = {
        "fleet": fleet,
        "filterset": filterset,
        "run": run,
        "page": page,
        "sort": sort,
        "sort_options": ANOMALY_SORT_OPTIONS,
        "requested_run": requested_run if run_not_found else None,
        "live_push": _live_push(),
    }
    partial = _wants_partial(request)
    template = "detection/partials/anomaly_table.html" if partial else "detection/anomaly_list.html"
    response = render(request, template, context)
    patch_vary_headers(response, ("HX-Request",))
    return response


@role_required(Role.VIEWER)
def anomaly_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """One scored result: device, time, score, threshold, severity, top metrics, and the explanation panel."""
    from explanations.selectors import anomaly_get
    from explanations.views import panel_context

    anomaly = anomaly_get(pk=pk) if 0 < pk < 2**63 else None
    if anomaly is None:
        raise Http404(f"No scored result {pk}")
    previous_id, next_id = selectors.anomaly_neighbours(anomaly=anomaly) if anomaly.is_anomaly else (None, None)
    context = {**panel_context(anomaly), **_feedback_context(anomaly, request.user),
               "previous_id": previous_id, "next_id": next_id, "fleet_push": _live_push()}
    return render(request, "detection/anomaly_detail.html", context)


def _feedback_context(anomaly, user, *, error: str = "", comment: str | None = None) -> dict:
    feedback = selectors.feedback_for_anomaly(anomaly=anomaly)
    mine = next((f for f in feedback if f.user_id == user.pk), None)
    counts = selectors.feedback_counts(feedback)
    return {"anomaly": anomaly, "feedback": feedback, "my_feedback": mine, "feedback_error": error,
            "verdict_counts": [(value, label, counts[value]) for value, label in Verdict.choices],
            "comment": comment if comment is not None else (mine.comment if mine else "")}


@role_required(Role.REVIEWER)
@require_POST
def anomaly_feedback(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Give a verdict (form fields verdict, comment, client_id); answers the feedback partial.

    A bad value answers the partial with the message: status 200 for htmx (it swaps only 2xx), else 400.
    """
    from explanations.selectors import anomaly_get

    anomaly = anomaly_get(pk=pk) if 0 < pk < 2**63 else None
    if anomaly is None:
        raise Http404(f"No scored result {pk}")
    comment = request.POST.get("comment", "")
    try:
        services.feedback_give(anomaly=anomaly, user=request.user, verdict=request.POST.get("verdict", ""),
                               comment=comment, client_id=request.POST.get("client_id") or None)
    except services.FeedbackError as exc:
        context = _feedback_context(anomaly, request.user, error=str(exc), comment=comment)
        return render(request, "detection/partials/feedback.html", context, status=200 if request.htmx else 400)
    if not request.htmx:
        return redirect(reverse("detection:anomaly_detail", args=[anomaly.pk]) + "#feedback")
    return render(request, "detection/partials/feedback.html", _feedback_context(anomaly, request.user))


@role_required(Role.VIEWER)
def fleet_overview(request: HtmxHttpRequest, name: str) -> HttpResponse:
    """KPIs, the latest run, the production model, the score histogram and the anomaly trend of a fleet."""
    fleet = _fleet_or_404(name)
    run = selectors.latest_scored_run(fleet=fleet)
    context = {
        "fleet": fleet,
        "device_count": fleet.devices.count(),
        "latest_run": selectors.run_list(fleet=fleet).first(),
        "run": run,
        "model": selectors.production_model(fleet=fleet),
        "kpis": selectors.run_kpis(run=run) if run else None,
        "charts": {"histogram": selectors.score_histogram(run=run), "trend": selectors.anomaly_trend(run=run)}
        if run else None,
        "live_push": _live_push(),
    }
    return render(request, "detection/fleet_overview.html", context)


@role_required(Role.APPROVER)
@require_POST
def run_start(request: HtmxHttpRequest, name: str) -> HttpResponse:
    """Create a pipeline run (trigger ui) and hand it to Celery; answers the run's polling row for htmx."""
    fleet = _fleet_or_404(name)
    run = services.pipeline_run_create(fleet=fleet, trigger=Trigger.UI, user=request.user)
    services.pipeline_run_enqueue(run=run)
    if not request.htmx:
        return redirect("detection:fleet_overview", name=fleet.name)
    return render(request, "detection/partials/latest_run.html", {"latest_run": run, "fleet": fleet})


def _model_versions_page(request: HtmxHttpRequest, fleet: Fleet, *, error: str = "", status: int = 200
                         ) -> HttpResponse:
    context = {"fleet": fleet, "versions": selectors.model_version_list(fleet=fleet), "error": error}
    return render(request, "detection/model_versions.html", context, status=status)


@role_required(Role.VIEWER)
def model_version_list(request: HtmxHttpRequest, name: str) -> HttpResponse:
    """The fleet's model versions with their metrics; approvers can promote a candidate or roll back."""
    return _model_versions_page(request, _fleet_or_404(name))


@role_required(Role.APPROVER)
@require_POST
def model_version_promote(request: HtmxHttpRequest, name: str, version: int) -> HttpResponse:
    fleet = _fleet_or_404(name)
    model = ModelVersion.objects.filter(fleet=fleet, version=version).first() if 0 < version < 2**31 else None
    if model is None:
        raise Http404(f"No model version {version} of {fleet.name}")
    try:
        services.model_version_promote(version=model, user=request.user)
    except services.ModelVersionError as exc:
        return _model_versions_page(request, fleet, error=str(exc), status=400)
    return redirect("detection:model_versions", name=fleet.name)


@role_required(Role.APPROVER)
@require_POST
def model_version_rollback(request: HtmxHttpRequest, name: str) -> HttpResponse:
    fleet = _fleet_or_404(name)
    try:
        services.model_version_rollback(fleet=fleet, user=request.user)
    except services.ModelVersionError as exc:
        return _model_versions_page(request, fleet, error=str(exc), status=400)
    return redirect("detection:model_versions", name=fleet.name)
