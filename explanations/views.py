"""The explanation panel of the anomaly detail page: show it (polled while a generation runs) and ask for
one (the Explain and Regenerate buttons). The anomaly detail page itself is detection.views.anomaly_detail.

One view renders the panel for htmx and plain requests alike; without htmx, a POST redirects back to the
detail page. In the embedded default (Celery eager) the POST answers with the finished explanation; with
workers it answers with a pending panel that polls every 2 s (286 stops the polling) and takes the
websocket push (explanations.consumers) where the page has one.
"""
from __future__ import annotations

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HTMX_STOP_POLLING

from detection.choices import Label
from detection.permissions import role_required

from . import selectors, services
from .narrative import PROVIDERS

PANEL_TEMPLATE = "explanations/partials/explanation_panel.html"


def _anomaly_or_404(pk: int):
    anomaly = selectors.anomaly_get(pk=pk) if 0 < pk < 2**63 else None
    if anomaly is None:
        raise Http404(f"No scored result {pk}")
    return anomaly


def panel_context(anomaly, *, error: str = "") -> dict:
    """What the panel template needs; the anomaly detail page includes the panel with it."""
    open_explanation = selectors.explanation_open(anomaly=anomaly)
    latest = selectors.explanation_latest(anomaly=anomaly)
    llm_ready = services.llm_config().configured
    return {
        "anomaly": anomaly,
        "explainable": anomaly.label == Label.ANOMALY,
        "explanation": latest,
        "pending": open_explanation,
        "providers": [p for p in PROVIDERS if p != "llm" or llm_ready],
        "default_provider": services.default_provider(),
        "panel_error": error,
        "live_push": bool(getattr(settings, "VIGIL_EXPLANATION_PUSH", False)),
    }


@role_required("viewer")
@require_GET
def explanation_panel(request: HttpRequest, pk: int) -> HttpResponse:
    """The panel alone. While a generation is open the panel polls this view; once it is not, 286."""
    anomaly = _anomaly_or_404(pk)
    context = panel_context(anomaly)
    status = 200 if context["pending"] else HTMX_STOP_POLLING if request.htmx else 200
    return render(request, PANEL_TEMPLATE, context, status=status)


@role_required("viewer")
@require_POST
def explanation_create(request: HttpRequest, pk: int) -> HttpResponse:
    """Explain (or with regenerate=1, explain again). Form fields: provider (builtin | llm), regenerate."""
    anomaly = _anomaly_or_404(pk)
    provider = request.POST.get("provider") or None
    regenerate = request.POST.get("regenerate") in ("1", "true", "on")
    try:
        services.explanation_request(anomaly=anomaly, provider=provider, regenerate=regenerate, user=request.user)
    except services.ExplanationError as exc:
        if not request.htmx:
            return render(request, PANEL_TEMPLATE, panel_context(anomaly, error=str(exc)), status=400)
        # htmx swaps only 2xx answers: the message goes in the panel.
        return render(request, PANEL_TEMPLATE, panel_context(anomaly, error=str(exc)))
    if not request.htmx:
        return redirect(reverse("detection:anomaly_detail", args=[anomaly.pk]) + "#explanation-panel")
    return render(request, PANEL_TEMPLATE, panel_context(anomaly))
