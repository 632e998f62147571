"""Pages of the feedback loop: baselines per fleet (statistics, version history, diff, rollback), the
proposal queue and one proposal (evidence, impact preview, approve / reject, result), and the audit log
(with a streaming CSV export).

Views parse input, call a selector or one service (baselines.services) and render. Every page needs the
viewer role; previewing an impact needs reviewer; deciding, suggesting and rolling back need approver
(the services check it again). For htmx requests the paged tables render only their partial.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.translation import ngettext
from django.views.decorators.http import require_POST
from django_htmx.http import HTMX_STOP_POLLING
from django_htmx.middleware import HtmxDetails

from detection.choices import Role
from detection.models import Fleet
from detection.permissions import role_required, user_has_role
from detection.selection import back_url, posted_ids, see_other

from . import selectors, services
from .choices import ProposalStatus
from .filters import AuditEventFilterSet, BaselineProposalFilterSet, BaselineStatisticFilterSet
from .forms import DecisionForm, DiffForm, RollbackForm, SuggestForm
from .models import BaselineProposal

STATISTICS_PER_PAGE = 50
DIFF_ROWS_PER_PAGE = 50
PROPOSALS_PER_PAGE = 25
AUDIT_EVENTS_PER_PAGE = 50
CSV_COLUMNS = ["time_utc", "actor", "action", "fleet", "target", "before", "after", "reason"]


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def _wants_partial(request: HtmxHttpRequest) -> bool:
    # A history restore (cache miss after Back) needs the whole page, not the fragment.
    return bool(request.htmx) and not request.htmx.history_restore_request


def _render(
    request: HtmxHttpRequest, page: str, partial: str, context: dict, status: int = 200
) -> HttpResponse:
    response = render(request, partial if _wants_partial(request) else page, context, status=status)
    patch_vary_headers(response, ("HX-Request",))
    return response


def _fleet_or_404(name: str) -> Fleet:
    fleet = Fleet.objects.filter(name=name).first()
    if fleet is None:
        raise Http404(f"No fleet named {name!r}")
    return fleet


def _proposal_or_404(pk: int) -> BaselineProposal:
    proposal = selectors.proposal_get(pk=pk)
    if proposal is None:
        raise Http404(f"No proposal {pk}")
    return proposal


def _error_message(exc: Exception) -> str:
    """A service error as the sentence a user reads: ProposalError's text without its "field: " prefix; an
    OSError is a baseline version's artifact file that is missing or unreadable."""
    if isinstance(exc, OSError):
        return f"The baseline version's statistics file cannot be read ({exc})."
    message = str(exc) or type(exc).__name__
    field = getattr(exc, "field", None)
    if field and message.startswith(f"{field}: "):
        message = message[len(field) + 2 :]
    return message[:1].upper() + message[1:]


def _error_status(exc: Exception) -> int:
    """403 when the service refused the user (role, same-approver rule), else 400."""
    return 403 if isinstance(exc, PermissionDenied) or getattr(exc, "field", None) == "user" else 400


# --- baselines ---------------------------------------------------------------------------------------


@role_required(Role.VIEWER)
def baseline_index(request: HtmxHttpRequest) -> HttpResponse:
    """Every fleet with its active baseline version, number of versions and pending proposals."""
    return render(request, "baselines/baseline_index.html", {"fleets": selectors.fleet_baseline_summaries()})


def _diff_context(request: HtmxHttpRequest, fleet: Fleet, versions: list) -> dict:
    """The diff between ?from= and ?to= (default: the version before the active one -> the active one)."""
    choices = [(v.number, f"v{v.number}{' (active)' if v.is_active else ''}") for v in versions]
    by_number = {v.number: v for v in versions}
    if len(versions) < 2:
        return {"diff_form": DiffForm(choices=choices), "diff": None}
    active = next((v for v in versions if v.is_active), versions[0])
    older = [v for v in versions if v.number < active.number]
    default = {"from": (older[0] if older else versions[1]).number, "to": active.number}
    form = DiffForm(
        {**default, **{k: request.GET[k] for k in ("from", "to") if k in request.GET}}, choices=choices
    )
    error = ""
    if not form.is_valid():
        error = "Pick two versions of this fleet to compare."
        form = DiffForm(default, choices=choices)
        form.is_valid()
    old, new = by_number[form.cleaned_data["from"]], by_number[form.cleaned_data["to"]]
    diff = selectors.baseline_version_diff(old=old, new=new)
    page = Paginator(diff.rows, DIFF_ROWS_PER_PAGE).get_page(request.GET.get("diff_page"))
    return {"diff_form": form, "diff": diff, "diff_page": page, "diff_error": error}


def _baseline_page(
    request: HtmxHttpRequest,
    fleet: Fleet,
    *,
    error: str = "",
    status: int = 200,
    rollback_form: RollbackForm | None = None,
    rollback_number: int | None = None,
) -> HttpResponse:
    versions = selectors.baseline_version_list(fleet=fleet)
    active = next((v for v in versions if v.is_active), None)
    context: dict = {
        "fleet": fleet,
        "versions": versions,
        "active": active,
        "error": error,
        "rollback_form": rollback_form or RollbackForm(),
        "rollback_number": rollback_number,
        "pending": selectors.proposal_status_counts(fleet=fleet)[ProposalStatus.PENDING],
    }
    if active is not None:
        filterset = BaselineStatisticFilterSet(
            request.GET,
            queryset=selectors.baseline_statistics(version=active),
            facets=selectors.baseline_facets(version=active),
        )
        context.update(
            filterset=filterset,
            page=Paginator(filterset.qs, STATISTICS_PER_PAGE).get_page(request.GET.get("page")),
        )
    context.update(_diff_context(request, fleet, versions))
    return _render(
        request,
        "baselines/baseline_detail.html",
        "baselines/partials/statistics.html",
        context,
        status=status,
    )


@role_required(Role.VIEWER)
def baseline_detail(request: HtmxHttpRequest, name: str) -> HttpResponse:
    """The active version's statistics (filter by level and feature, 50 per page), the version history,
    a diff between any two versions and, for approvers, rollback to an earlier version."""
    return _baseline_page(request, _fleet_or_404(name))


@role_required(Role.VIEWER)
def baseline_diff(request: HtmxHttpRequest, name: str) -> HttpResponse:
    """The diff section alone (htmx swaps it when the versions or the page change); the full baseline page
    without htmx."""
    fleet = _fleet_or_404(name)
    if not _wants_partial(request):
        return _baseline_page(request, fleet)
    versions = selectors.baseline_version_list(fleet=fleet)
    response = render(
        request, "baselines/partials/diff.html", {"fleet": fleet, **_diff_context(request, fleet, versions)}
    )
    patch_vary_headers(response, ("HX-Request",))
    return response


@role_required(Role.APPROVER)
@require_POST
def baseline_rollback(request: HtmxHttpRequest, name: str, number: int) -> HttpResponse:
    """Make a new active version carrying version number's statistics (history is never rewritten)."""
    fleet = _fleet_or_404(name)
    version = selectors.baseline_version_get(fleet=fleet, number=number)
    if version is None:
        raise Http404(f"No baseline version {number} of {fleet.name}")
    form = RollbackForm(request.POST)
    if not form.is_valid():
        return _baseline_page(
            request,
            fleet,
            error="Give a reason for the rollback; it goes into the audit log.",
            status=400,
            rollback_form=form,
            rollback_number=number,
        )
    try:
        new = services.baseline_version_rollback(
            fleet=fleet, to_version=version, user=request.user, reason=form.cleaned_data["reason"]
        )
    except (services.ProposalError, PermissionDenied, ValueError, OSError) as exc:
        return _baseline_page(
            request,
            fleet,
            error=_error_message(exc),
            status=_error_status(exc),
            rollback_form=form,
            rollback_number=number,
        )
    messages.success(request, f"Baseline rolled back: v{new.number} now carries the statistics of v{number}.")
    return redirect("baselines:baseline_detail", name=fleet.name)


# --- proposals -----------------------------------------------------------------------------------------


@role_required(Role.VIEWER)
def proposal_list(request: HtmxHttpRequest) -> HttpResponse:
    """The proposal queue, newest first: filter by fleet, status and kind; 25 per page."""
    filterset = BaselineProposalFilterSet(request.GET, queryset=selectors.proposal_list())
    page = Paginator(filterset.qs, PROPOSALS_PER_PAGE).get_page(request.GET.get("page"))
    filterset.form.is_valid()  # an invalid field is dropped; the others still filter
    fleet = filterset.form.cleaned_data.get("fleet")
    context = {
        "filterset": filterset,
        "page": page,
        "fleet": fleet,
        "counts": selectors.proposal_status_counts(fleet=fleet),
        "fleets": Fleet.objects.order_by("name").values_list("name", flat=True),
        # Approvers can select the pending proposals of this page and decide them together.
        "selectable": user_has_role(request.user, Role.APPROVER)
        and any(p.status == ProposalStatus.PENDING for p in page.object_list),
    }
    return _render(request, "baselines/proposal_list.html", "baselines/partials/proposal_table.html", context)


def _decision_block(proposal: BaselineProposal, user) -> str:
    """Why user cannot approve or reject proposal now, or "" when they can."""
    if proposal.status != ProposalStatus.PENDING:
        status = proposal.get_status_display().lower()
        return f"This proposal is {status}; only pending proposals can be decided."
    if not user_has_role(user, Role.APPROVER):
        return "Only approvers can approve or reject adjustments."
    distinct = services.feedback_settings(proposal.fleet)["require_distinct_approver"]
    if distinct and proposal.proposed_by_id == user.pk:
        return f"You proposed this adjustment; {proposal.fleet.name} needs another approver to decide it."
    return ""


def _proposal_page(
    request: HtmxHttpRequest,
    proposal: BaselineProposal,
    *,
    error: str = "",
    status: int = 200,
    form: DecisionForm | None = None,
) -> HttpResponse:
    context = {
        "proposal": proposal,
        "fleet": proposal.fleet,
        "decision_error": error,
        "decision_form": form or DecisionForm(),
        "decision_block": _decision_block(proposal, request.user),
        # Made against a baseline version that is no longer active: it can be rejected, not approved.
        "stale": services.proposal_staleness(proposal) if proposal.status == ProposalStatus.PENDING else "",
        "impact": proposal.impact or None,
        "can_preview": user_has_role(request.user, Role.REVIEWER)
        and proposal.status == ProposalStatus.PENDING,
    }
    return render(request, "baselines/proposal_detail.html", context, status=status)


@role_required(Role.VIEWER)
def proposal_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """One proposal: what it changes, its evidence, its impact preview, the decision and the result."""
    return _proposal_page(request, _proposal_or_404(pk))


@role_required(Role.VIEWER)
def proposal_status(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The proposal's status and result block; polled every 3 s while an approved proposal is being applied,
    286 stops the polling once it is applied or failed."""
    proposal = _proposal_or_404(pk)
    status = 200 if proposal.status == ProposalStatus.APPROVED else HTMX_STOP_POLLING
    return render(request, "baselines/partials/proposal_status.html", {"proposal": proposal}, status=status)


@role_required(Role.REVIEWER)
@require_POST
def proposal_preview(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Re-score the affected data with the adjusted baselines (nothing persisted but proposal.impact) and
    answer the impact partial. An error answers the partial with the message (200 for htmx, else 400)."""
    proposal = _proposal_or_404(pk)
    error = ""
    try:
        impact = services.proposal_preview_impact(proposal=proposal)
    except (services.ProposalError, PermissionDenied, ValueError, OSError) as exc:
        impact, error = proposal.impact or None, _error_message(exc)
    if not request.htmx:
        if error:
            return _proposal_page(request, proposal, error=error, status=400)
        return redirect(reverse("baselines:proposal_detail", args=[proposal.pk]) + "#impact")
    proposal.impact = impact or {}
    return render(
        request,
        "baselines/partials/impact.html",
        {"proposal": proposal, "impact": impact, "impact_error": error, "can_preview": True},
    )


def _decide(request: HtmxHttpRequest, pk: int, *, approve: bool) -> HttpResponse:
    proposal = _proposal_or_404(pk)
    form = DecisionForm(request.POST)
    if not form.is_valid():
        return _proposal_page(
            request, proposal, error="; ".join(form.errors.get("comment", [])), status=400, form=form
        )
    decide = services.proposal_approve if approve else services.proposal_reject
    try:
        decide(proposal=proposal, user=request.user, comment=form.cleaned_data["comment"])
    except (services.ProposalError, PermissionDenied, ValueError) as exc:
        return _proposal_page(
            request, _proposal_or_404(pk), error=_error_message(exc), status=_error_status(exc), form=form
        )
    proposal.refresh_from_db(fields=["status"])
    messages.success(
        request,
        f"Proposal {proposal.pk} {'approved' if approve else 'rejected'}"
        f"{'; applying it now' if proposal.status == ProposalStatus.APPROVED else ''}.",
    )
    return redirect("baselines:proposal_detail", pk=proposal.pk)


@role_required(Role.APPROVER)
@require_POST
def proposals_decide(request: HtmxHttpRequest) -> HttpResponse:
    """Approve or reject the proposals selected on the queue (form fields proposal, repeated; decision:
    approve or reject; comment; query, the queue's query string) via services.proposals_decide: all or
    none, and approved ones are applied together. Back to the queue with a message either way."""
    back = back_url(request, reverse("baselines:proposal_list"))
    decision = request.POST.get("decision", "")
    form = DecisionForm(request.POST)
    try:
        ids = posted_ids(request, "proposal")
    except ValueError as exc:
        messages.error(request, f"proposals: {exc}")
    else:
        if decision not in ("approve", "reject"):
            messages.error(request, f"decision: {decision!r} is not approve or reject")
        elif not form.is_valid():
            messages.error(request, "comment: " + "; ".join(form.errors.get("comment", [])))
        else:
            try:
                done = services.proposals_decide(ids=ids, user=request.user, approve=decision == "approve",
                                                 comment=form.cleaned_data["comment"])
            except (services.ProposalError, PermissionDenied, ValueError) as exc:
                messages.error(request, f"Nothing was decided. {_error_message(exc)}")
            else:
                n, fleet = len(done), done[0].fleet.name
                if decision == "reject":
                    messages.success(request, f"Rejected {n} {ngettext('proposal', 'proposals', n)} of {fleet}.")
                elif n == 1:
                    messages.success(request, f"Approved 1 proposal of {fleet}; applying it now.")
                else:
                    messages.success(request, f"Approved {n} proposals of {fleet}; they are applied together "
                                              f"(one new baseline version, one retrain, one re-score).")
                return redirect(back)
    return see_other(back)


@role_required(Role.APPROVER)
@require_POST
def proposal_approve(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Approve (form field comment): a new baseline version is made, the model retrained, data re-scored."""
    return _decide(request, pk, approve=True)


@role_required(Role.APPROVER)
@require_POST
def proposal_reject(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    return _decide(request, pk, approve=False)


@role_required(Role.APPROVER)
@require_POST
def proposals_suggest(request: HtmxHttpRequest) -> HttpResponse:
    """Ask the engine for adjustments of one fleet now (form field fleet); back to its pending queue."""
    form = SuggestForm(request.POST)
    fleet = Fleet.objects.filter(name=form.cleaned_data["fleet"]).first() if form.is_valid() else None
    if fleet is None:
        messages.error(request, "Pick a fleet to suggest adjustments for.")
        return redirect("baselines:proposal_list")
    try:
        # actor_label: the audit names the user who asked, not the system actor the service defaults to
        created = services.proposals_suggest(
            fleet=fleet, user=request.user, actor_label=request.user.get_username()
        )
    except (services.ProposalError, PermissionDenied, ValueError, OSError) as exc:
        messages.error(request, f"No adjustments suggested for {fleet.name}: {_error_message(exc)}")
    else:
        if created:
            messages.success(
                request, f"{len(created)} new {ngettext('proposal', 'proposals', len(created))} for {fleet.name}."
            )
        else:
            messages.info(
                request,
                f"No new adjustment for {fleet.name}: the reviewed anomalies do not support one "
                f"(or it is already pending).",
            )
    return redirect(
        reverse("baselines:proposal_list") + f"?fleet={fleet.name}&status={ProposalStatus.PENDING}"
    )


# --- audit log -----------------------------------------------------------------------------------------


def _audit_filterset(request: HtmxHttpRequest) -> AuditEventFilterSet:
    return AuditEventFilterSet(
        request.GET, queryset=selectors.audit_event_list(), facets=selectors.audit_facets()
    )


@role_required(Role.VIEWER)
def audit_list(request: HtmxHttpRequest) -> HttpResponse:
    """Every audited step of every app, newest first: filter by fleet, action, actor and UTC date range;
    50 per page; the CSV export carries the same filters."""
    filterset = _audit_filterset(request)
    page = Paginator(filterset.qs, AUDIT_EVENTS_PER_PAGE).get_page(request.GET.get("page"))
    export_query = request.GET.copy()
    export_query.pop("page", None)
    context = {"filterset": filterset, "page": page, "export_query": export_query.urlencode()}
    return _render(request, "baselines/audit_list.html", "baselines/partials/audit_table.html", context)


class _Echo:
    """A file-like object whose write returns the line, so csv.writer can feed a streaming response."""

    def write(self, value: str) -> str:
        return value


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str) -> str:
    # A cell starting with a formula character would be run by spreadsheets (CSV injection, OWASP).
    return "'" + value if value.startswith(_FORMULA_START) else value


def audit_csv_rows(events) -> Iterator[list[str]]:
    """The CSV rows (header first) of an AuditEvent queryset, read in chunks of 2,000 rows.

    Columns CSV_COLUMNS: ISO 8601 UTC time, actor label, action, fleet name, target ("Type #id label"),
    before and after as compact JSON, reason. Text cells that a spreadsheet would read as a formula get a
    leading apostrophe."""
    yield CSV_COLUMNS
    for event in events.iterator(chunk_size=2000):
        target = " ".join(
            p
            for p in (event.target_type, f"#{event.target_id}" if event.target_id else "", event.target_label)
            if p
        )
        yield [
            event.created_at.astimezone(dt.UTC).isoformat(),
            _cell(event.actor_label),
            _cell(event.action),
            _cell(event.fleet_name),
            _cell(target),
            json.dumps(event.before, sort_keys=True, separators=(",", ":"), default=str),
            json.dumps(event.after, sort_keys=True, separators=(",", ":"), default=str),
            _cell(event.reason),
        ]


@role_required(Role.VIEWER)
def audit_export(request: HtmxHttpRequest) -> StreamingHttpResponse:
    """The filtered audit log as CSV (a compliance report), streamed row by row so that a long log never
    sits in memory."""
    writer = csv.writer(_Echo())
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response = StreamingHttpResponse(
        (writer.writerow(row) for row in audit_csv_rows(_audit_filterset(request).qs)),
        content_type="text/csv; charset=utf-8",
    )
    response["Content-Disposition"] = f'attachment; filename="vigil-audit-{stamp}.csv"'
    return response
