"""Alert pages (list, detail with acknowledge/resolve/snooze), alert rule management and the model
health page. Every page needs the viewer role; alert actions need reviewer; rules need approver."""
from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.cache import patch_vary_headers
from django.utils.translation import ngettext
from django.views.decorators.http import require_POST

from detection.choices import Role, Severity, Verdict
from detection.models import Fleet
from detection.permissions import role_required
from detection.push import live_push_enabled

from . import health, selectors, services
from .choices import AlertStatus
from .forms import AlertRuleForm, SnoozeForm
from .models import AlertRule

ALERTS_PER_PAGE = 25


def _pk_or_404(pk: int):
    alert = selectors.alert_get(pk=pk)
    if alert is None:
        raise Http404(f"No alert {pk}")
    return alert


@role_required(Role.VIEWER)
def alert_list(request: HttpRequest) -> HttpResponse:
    """Alerts filtered by fleet, status and severity (unknown values are ignored), 25 per page; htmx
    requests get the table partial only."""
    fleets = list(Fleet.objects.values_list("name", flat=True))
    fleet_name = request.GET.get("fleet", "")
    fleet = Fleet.objects.filter(name=fleet_name).first() if fleet_name in fleets else None
    status = request.GET.get("status", "")
    status = status if status in AlertStatus.values else ""
    severity = request.GET.get("severity", "")
    severity = severity if severity in Severity.values else ""
    alerts = selectors.alert_list(fleet=fleet, status=status, severity=severity)
    page = Paginator(alerts, ALERTS_PER_PAGE).get_page(request.GET.get("page"))
    context = {"page": page, "fleets": fleets, "fleet": fleet.name if fleet else "", "status": status,
               "severity": severity, "statuses": AlertStatus.choices, "severities": Severity.choices,
               "live_push": live_push_enabled()}
    partial = bool(request.htmx) and not request.htmx.history_restore_request
    template = "alerts/partials/alert_table.html" if partial else "alerts/alert_list.html"
    response = render(request, template, context)
    patch_vary_headers(response, ("HX-Request",))
    return response


def _detail(request, alert, *, error: str = "", status: int = 200) -> HttpResponse:
    context = {"alert": alert, "anomalies": selectors.alert_anomalies(alert=alert),
               "events": list(alert.events.all()),
               "deliveries": list(alert.deliveries.select_related("rule")[:20]),
               "snooze_form": SnoozeForm(), "error": error}
    return render(request, "alerts/alert_detail.html", context, status=status)


@role_required(Role.VIEWER)
def alert_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return _detail(request, _pk_or_404(pk))


def _act(request, pk: int, do) -> HttpResponse:
    alert = _pk_or_404(pk)
    try:
        do(alert)
    except services.AlertActionError as exc:
        return _detail(request, alert, error=str(exc), status=400)
    return redirect("alerts:alert_detail", pk=alert.pk)


@role_required(Role.REVIEWER)
@require_POST
def alert_acknowledge(request: HttpRequest, pk: int) -> HttpResponse:
    return _act(request, pk, lambda a: services.alert_acknowledge(alert=a, user=request.user))


@role_required(Role.REVIEWER)
@require_POST
def alert_review(request: HttpRequest, pk: int) -> HttpResponse:
    """One verdict (form fields verdict, comment) on every anomaly of the alert; errors show on the page
    (status 400)."""
    alert = _pk_or_404(pk)
    try:
        n = services.alert_review(alert=alert, user=request.user, verdict=request.POST.get("verdict", ""),
                                  comment=request.POST.get("comment", ""))
    except services.AlertActionError as exc:
        return _detail(request, alert, error=str(exc), status=400)
    messages.success(request, f"Marked {n} {ngettext('anomaly', 'anomalies', n)} of this alert as "
                              f"{Verdict(request.POST['verdict']).label.lower()}.")
    return redirect("alerts:alert_detail", pk=alert.pk)


@role_required(Role.REVIEWER)
@require_POST
def alert_resolve(request: HttpRequest, pk: int) -> HttpResponse:
    return _act(request, pk, lambda a: services.alert_resolve(alert=a, user=request.user,
                                                              reason=request.POST.get("reason", "")[:500]))


@role_required(Role.REVIEWER)
@require_POST
def alert_snooze(request: HttpRequest, pk: int) -> HttpResponse:
    form = SnoozeForm(request.POST)
    if not form.is_valid():
        return _detail(request, _pk_or_404(pk), error="minutes: choose one of the offered snooze times",
                       status=400)
    return _act(request, pk, lambda a: services.alert_snooze(alert=a, user=request.user,
                                                             minutes=form.cleaned_data["minutes"]))


@role_required(Role.APPROVER)
def rule_list(request: HttpRequest) -> HttpResponse:
    return render(request, "alerts/rule_list.html", {"rules": selectors.rule_list()})


def _rule_form(request, rule: AlertRule | None) -> HttpResponse:
    form = AlertRuleForm(request.POST or None, instance=rule)
    if request.method == "POST" and form.is_valid():
        services.alert_rule_save(rule=form.save(commit=False), user=request.user)
        return redirect("alerts:rule_list")
    status = 400 if request.method == "POST" else 200
    return render(request, "alerts/rule_form.html", {"form": form, "rule": rule}, status=status)


@role_required(Role.APPROVER)
def rule_create(request: HttpRequest) -> HttpResponse:
    return _rule_form(request, None)


def _rule_or_404(pk: int) -> AlertRule:
    rule = AlertRule.objects.select_related("fleet").filter(pk=pk).first() if 0 < pk < 2**63 else None
    if rule is None:
        raise Http404(f"No alert rule {pk}")
    return rule


@role_required(Role.APPROVER)
def rule_edit(request: HttpRequest, pk: int) -> HttpResponse:
    return _rule_form(request, _rule_or_404(pk))


@role_required(Role.APPROVER)
@require_POST
def rule_delete(request: HttpRequest, pk: int) -> HttpResponse:
    services.alert_rule_delete(rule=_rule_or_404(pk), user=request.user)
    return redirect("alerts:rule_list")


@role_required(Role.VIEWER)
def model_health(request: HttpRequest, name: str) -> HttpResponse:
    """Drift status, score distribution against training, anomaly rate over runs, precision from feedback
    and recall against labelled windows, the production model's age and the retraining triggers."""
    fleet = Fleet.objects.filter(name=name).first()
    if fleet is None:
        raise Http404(f"No fleet named {name!r}")
    summary = health.model_health(fleet=fleet)
    run = health._latest_scored_run(fleet)
    context = {
        "fleet": fleet, "summary": summary, "reports": selectors.drift_reports(fleet=fleet),
        "triggers": health.retrain_triggers(fleet=fleet),
        "recall": health.ground_truth_recall(run=run) if run else None, "run": run,
        "charts": {"scores": health.score_distribution(fleet=fleet),
                   "rate": health.anomaly_rate_series(fleet=fleet)},
    }
    context["report"] = context["reports"][0] if context["reports"] else None
    return render(request, "alerts/model_health.html", context)
