"""Pages: fleets, pipeline runs (with a polling progress fragment) and the anomaly list.

Each view parses its input, calls selectors and renders. For htmx requests the anomaly list renders
only its table partial, so paging and sorting swap the table and push the URL.
"""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.cache import patch_vary_headers
from django_htmx.http import HTMX_STOP_POLLING
from django_htmx.middleware import HtmxDetails

from . import selectors
from .models import Fleet

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


def _wants_partial(request: HtmxHttpRequest) -> bool:
    # A history restore (cache miss after Back) needs the whole page, not the fragment.
    return bool(request.htmx) and not request.htmx.history_restore_request


@login_required
def home(request: HtmxHttpRequest) -> HttpResponse:
    return render(request, "detection/fleet_list.html", {"fleets": selectors.fleet_list()})


@login_required
def run_list(request: HtmxHttpRequest, name: str | None = None) -> HttpResponse:
    fleet = _fleet_or_404(name) if name is not None else None
    page = Paginator(selectors.run_list(fleet=fleet), RUNS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "detection/run_list.html", {"fleet": fleet, "page": page})


@login_required
def run_progress(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """One run's table row; polled every 2 s while the run is pending or running, 286 stops the polling."""
    run = selectors.run_get(pk=pk)
    if run is None:
        raise Http404(f"No pipeline run {pk}")
    status = HTMX_STOP_POLLING if run.is_finished else 200
    return render(request, "detection/partials/run_row.html", {"run": run}, status=status)


@login_required
def anomaly_list(request: HtmxHttpRequest, name: str) -> HttpResponse:
    fleet = _fleet_or_404(name)
    requested_run = _id_or_none(request.GET.get("run"))
    run = selectors.run_get(pk=requested_run, fleet=fleet) if requested_run is not None else None
    run_not_found = requested_run is not None and run is None
    run = run or selectors.latest_scored_run(fleet=fleet)
    sort = request.GET.get("sort", "")
    sort = sort if sort in selectors.ANOMALY_SORTS else selectors.DEFAULT_ANOMALY_SORT
    results = selectors.anomaly_list(fleet=fleet, run=run, sort=sort)
    page = Paginator(results, ANOMALIES_PER_PAGE).get_page(request.GET.get("page"))
    context = {
        "fleet": fleet,
        "run": run,
        "page": page,
        "sort": sort,
        "sort_options": ANOMALY_SORT_OPTIONS,
        "requested_run": requested_run if run_not_found else None,
    }
    partial = _wants_partial(request)
    template = "detection/partials/anomaly_table.html" if partial else "detection/anomaly_list.html"
    response = render(request, template, context)
    patch_vary_headers(response, ("HX-Request",))
    return response


@login_required
def anomaly_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """One scored result: device, time, score, threshold, severity, top metrics, and the explanation panel."""
    from explanations.selectors import anomaly_get
    from explanations.views import panel_context

    anomaly = anomaly_get(pk=pk) if 0 < pk < 2**63 else None
    if anomaly is None:
        raise Http404(f"No scored result {pk}")
    return render(request, "detection/anomaly_detail.html", panel_context(anomaly))
