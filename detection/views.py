"""Pages: fleets, the fleet overview, pipeline runs (with a polling progress fragment), the anomaly
list and detail (with review feedback and charts), devices, model versions, and the installable app's
manifest, service worker (/sw.js) and offline page.

Each view parses its input, calls selectors or one service and renders. For htmx requests the anomaly
list renders only its table partial, so filtering, paging and sorting swap the table and push the URL.
Every page needs the viewer role; feedback needs reviewer; runs, promotion and rollback need approver.
The manifest, the service worker and the offline page need no login (the browser fetches them alone).
"""
from __future__ import annotations

import json

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.templatetags.static import static
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.utils.translation import ngettext
from django.views.decorators.http import require_POST
from django_htmx.http import HTMX_STOP_POLLING, HttpResponseLocation
from django_htmx.middleware import HtmxDetails

from . import selectors, services
from .choices import ModelStatus, Role, Trigger, Verdict
from .filters import AnomalyResultFilterSet, DeviceFilterSet
from .models import Fleet, ModelVersion
from .permissions import role_required
from .selection import back_url, posted_ids, see_other

RUNS_PER_PAGE = 25
ANOMALIES_PER_PAGE = 50
DEVICES_PER_PAGE = 50
DETAIL_CHART_SAMPLES = 144  # telemetry samples drawn either side of an anomaly (12 h at 5-minute sampling)
DEVICE_ANOMALY_LIMIT = 100
DEVICE_CHART_SAMPLES = 2016  # newest samples on a device page (7 days at 5-minute sampling)
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
    paginator = Paginator(filterset.qs.values_list("pk", flat=True), ANOMALIES_PER_PAGE)
    if run is not None and not filterset.active:
        paginator.count = selectors.run_anomaly_count(run=run)  # COUNT(*) of 100k rows, cached per run
    page = paginator.get_page(request.GET.get("page"))
    page.object_list = selectors.anomalies_in_order(queryset=results, ids=list(page.object_list))
    context = {
        "fleet": fleet,
        "filterset": filterset,
        "run": run,
        "page": page,
        "sort": sort,
        "sort_options": ANOMALY_SORT_OPTIONS,
        "requested_run": requested_run if run_not_found else None,
        "live_push": _live_push(),
        # New anomalies are pushed as rows (detection.push.push_run_finished) only into the default view:
        # the latest run, newest first, no filter, first page; elsewhere they would not belong.
        "live_rows": _live_push() and requested_run is None and sort == selectors.DEFAULT_ANOMALY_SORT
        and not filterset.active and page.number == 1,
    }
    partial = _wants_partial(request)
    template = "detection/partials/anomaly_table.html" if partial else "detection/anomaly_list.html"
    response = render(request, template, context)
    patch_vary_headers(response, ("HX-Request",))
    return response


@role_required(Role.REVIEWER)
@require_POST
def anomaly_feedback_bulk(request: HtmxHttpRequest, name: str) -> HttpResponse:
    """One verdict on the anomalies selected on the list (form fields anomaly, repeated; verdict; comment;
    query, the list's query string to go back to), via services.feedback_give_many: all or none.

    Done: the list is shown again with a message (htmx: HX-Location swaps the table; else a redirect).
    A bad value (no selection, an id outside the fleet or not an anomaly, an unknown verdict) answers the
    message alone, for the form's status line (status 200: htmx swaps only 2xx); without htmx, back to the
    list with the message. Nothing is saved then.
    """
    fleet = _fleet_or_404(name)
    back = back_url(request, reverse("detection:anomaly_list", args=[fleet.name]))
    try:
        ids = posted_ids(request, "anomaly")
    except ValueError as exc:
        error = f"anomalies: {exc}"
    else:
        try:
            done = services.feedback_give_many_by_id(ids=ids, fleet=fleet, user=request.user,
                                                     verdict=request.POST.get("verdict", ""),
                                                     comment=request.POST.get("comment", ""))
        except services.FeedbackError as exc:
            error = str(exc)
        else:
            label = Verdict(done[0].verdict).label.lower()
            noun = ngettext("anomaly", "anomalies", len(done))
            messages.success(request, f"Marked {len(done)} {noun} as {label}.")
            if request.htmx:
                return HttpResponseLocation(back, target="#anomaly-table", swap="outerHTML")
            return redirect(back)
    if request.htmx:
        return render(request, "detection/partials/bulk_review_status.html", {"error": error})
    messages.error(request, error)
    return see_other(back)


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
               "previous_id": previous_id, "next_id": next_id, "fleet_push": _live_push(),
               "charts": selectors.anomaly_charts(anomaly=anomaly, samples=DETAIL_CHART_SAMPLES)}
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
    A JSON body ({"verdict", "comment", "client_id"}, Content-Type application/json) is how the offline
    queue (static/vigil/pwa.js) replays verdicts: it answers JSON, see _feedback_json.
    """
    from explanations.selectors import anomaly_get

    anomaly = anomaly_get(pk=pk) if 0 < pk < 2**63 else None
    if anomaly is None:
        raise Http404(f"No scored result {pk}")
    if _wants_json(request):
        return _feedback_json(request, anomaly)
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
        "charts": selectors.run_charts(run=run) if run else None,
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
    versions = selectors.model_version_list(fleet=fleet)
    # Rolling back needs a production model and a retired one to go back to; without them the button
    # would only lead to an error.
    statuses = {v.status for v in versions}
    context = {"fleet": fleet, "versions": versions, "error": error,
               "can_roll_back": {ModelStatus.PRODUCTION, ModelStatus.RETIRED} <= statuses}
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


# --- offline review: the JSON side of anomaly_feedback ---------------------------------------------

def _wants_json(request: HttpRequest) -> bool:
    return request.content_type == "application/json"


def _feedback_json(request: HttpRequest, anomaly) -> JsonResponse:
    """Replay of a verdict queued offline: {"verdict", "comment", "client_id"} in, JSON out.

    200 {"id", "anomaly", "verdict", "client_id", "html"} (html: the review partial for this user, to swap
    in); a replay of a known client_id answers the stored verdict untouched (services.feedback_give), so a
    queue flushed twice records once. 400 {"field", "error"} for a bad body or value: nothing is saved.
    """
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return JsonResponse({"field": "body", "error": "the body is not valid JSON"}, status=400)
    if not isinstance(body, dict):
        return JsonResponse({"field": "body", "error": "expected a JSON object"}, status=400)
    fields = {name: body.get(name) for name in ("verdict", "comment", "client_id")}
    bad = next((k for k, v in fields.items() if v is not None and not isinstance(v, str)), None)
    if bad:
        return JsonResponse({"field": bad, "error": f"{bad} must be a string"}, status=400)
    try:
        feedback = services.feedback_give(anomaly=anomaly, user=request.user, verdict=fields["verdict"] or "",
                                          comment=fields["comment"] or "", client_id=fields["client_id"] or None)
    except services.FeedbackError as exc:
        return JsonResponse({"field": exc.field, "error": str(exc)}, status=400)
    html = render_to_string("detection/partials/feedback.html", _feedback_context(anomaly, request.user),
                            request=request)
    return JsonResponse({"id": feedback.pk, "anomaly": anomaly.pk, "verdict": feedback.verdict,
                         "client_id": str(feedback.client_id) if feedback.client_id else None, "html": html})


# --- devices ---------------------------------------------------------------------------------------

@role_required(Role.VIEWER)
def device_list(request: HtmxHttpRequest, name: str) -> HttpResponse:
    """The fleet's devices, filtered and paged, with their anomaly counts in the latest scored run."""
    fleet = _fleet_or_404(name)
    run = selectors.latest_scored_run(fleet=fleet)
    facets = selectors.device_facets(fleet=fleet)
    facets["customer"] = [(c, c) for c in selectors.device_customers(fleet=fleet)]
    filterset = DeviceFilterSet(request.GET, queryset=selectors.device_list(fleet=fleet, run=run), facets=facets)
    page = Paginator(filterset.qs, DEVICES_PER_PAGE).get_page(request.GET.get("page"))
    context = {"fleet": fleet, "run": run, "filterset": filterset, "page": page}
    template = "detection/partials/device_table.html" if _wants_partial(request) else "detection/device_list.html"
    response = render(request, template, context)
    patch_vary_headers(response, ("HX-Request",))
    return response


@role_required(Role.VIEWER)
def device_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """One device: its facts, a telemetry chart per metric with its anomalies marked, and its anomaly
    history (every run, newest first)."""
    device = selectors.device_get(pk=pk)
    if device is None:
        raise Http404(f"No device {pk}")
    context = {"device": device, "fleet": device.fleet,
               "charts": selectors.device_charts(device=device, samples=DEVICE_CHART_SAMPLES),
               "anomalies": selectors.device_anomalies(device=device, limit=DEVICE_ANOMALY_LIMIT),
               "anomaly_limit": DEVICE_ANOMALY_LIMIT}
    return render(request, "detection/device_detail.html", context)


# --- installable app: manifest, service worker, offline page ---------------------------------------

PWA_THEME = "#1c2430"
PWA_BACKGROUND = "#f6f7f9"


def web_manifest(request: HttpRequest) -> JsonResponse:
    """The web app manifest (W3C Web Application Manifest); icon URLs are the hashed static names."""
    icons = [
        {"src": static("vigil/icons/icon-192.png"), "sizes": "192x192", "type": "image/png", "purpose": "any"},
        {"src": static("vigil/icons/icon-512.png"), "sizes": "512x512", "type": "image/png", "purpose": "any"},
        {"src": static("vigil/icons/icon-maskable-512.png"), "sizes": "512x512", "type": "image/png",
         "purpose": "maskable"},
    ]
    manifest = {
        "id": "/", "name": "Vigil anomaly review", "short_name": "Vigil",
        "description": "Review anomalies of device fleets, online or offline.",
        "start_url": "/?source=pwa", "scope": "/", "display": "standalone",
        "theme_color": PWA_THEME, "background_color": PWA_BACKGROUND, "icons": icons,
    }
    response = JsonResponse(manifest, content_type="application/manifest+json")
    response["Cache-Control"] = "no-cache"
    return response


def _precache_urls() -> list[str]:
    """The app shell the service worker stores at install: the offline page and the hashed static files
    every page needs (WhiteNoise's manifest names in production, plain names in development)."""
    from django.templatetags.static import static as static_url

    files = ["vigil/app.css", "vigil/pwa.js", "vigil/focus.js", "vigil/shortcuts.js", "vigil/charts.js",
             "vigil/explanations.css", "vigil/vendor/echarts-5.6.0.min.js", "vigil/icons/icon-192.png",
             "django_htmx/htmx-2.min.js", "django_htmx/ext/hx-ws-2.min.js"]
    return [reverse("detection:offline"), *(static_url(f) for f in files)]


def service_worker(request: HttpRequest) -> HttpResponse:
    """/sw.js, served from the site root so its scope is the whole site. The cache name carries a hash of
    the precached URLs, so a deploy with new static files installs a new worker and drops old caches."""
    import hashlib

    precache = _precache_urls()
    version = hashlib.sha256("\n".join(precache).encode()).hexdigest()[:12]
    context = {"precache_json": json.dumps(precache), "version": version, "offline_url": reverse("detection:offline"),
               "static_prefix": settings.STATIC_URL}
    response = render(request, "detection/sw.js", context, content_type="application/javascript")
    response["Service-Worker-Allowed"] = "/"
    response["Cache-Control"] = "no-cache"
    return response


def offline(request: HttpRequest) -> HttpResponse:
    """What the service worker shows for a page it has neither fetched nor cached; no login needed.

    Rendered as for an anonymous visitor whoever asks: the worker precaches it once, and a saved copy
    naming the user (nav, data-user) would outlive a logout and replay another user's queued verdicts.
    """
    from django.contrib.auth.models import AnonymousUser

    return render(request, "detection/offline.html", {"user": AnonymousUser()})
