"""Filters (django-filter) of the baseline statistics, the proposal queue and the audit log; shared by
the pages and the API. An invalid value is dropped by the form (the page then shows every row), never a 500.
"""

from __future__ import annotations

import django_filters
from django import forms

from detection.choices import AuditAction
from detection.filters import ActiveFilterMixin
from detection.models import AuditEvent, Fleet

from .choices import ProposalKind, ProposalStatus
from .models import BaselineProposal, BaselineStatistic


class BaselineStatisticFilterSet(ActiveFilterMixin, django_filters.FilterSet):
    """Level and feature of one version's statistics; pass facets=selectors.baseline_facets(version=...)."""

    level = django_filters.ChoiceFilter(label="Level", empty_label="Every level")
    feature = django_filters.ChoiceFilter(label="Feature", empty_label="Every feature")

    class Meta:
        model = BaselineStatistic
        fields: list[str] = []

    def __init__(self, *args, facets: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        facets = facets or {}
        self.filters["level"].extra["choices"] = [(v, v) for v in facets.get("level", [])]
        self.filters["feature"].extra["choices"] = [(v, v) for v in facets.get("feature", [])]


class BaselineProposalFilterSet(ActiveFilterMixin, django_filters.FilterSet):
    """The proposal queue: fleet (by name), status, kind."""

    fleet = django_filters.ModelChoiceFilter(
        label="Fleet",
        queryset=Fleet.objects.order_by("name"),
        to_field_name="name",
        empty_label="Every fleet",
    )
    status = django_filters.ChoiceFilter(
        label="Status", choices=ProposalStatus.choices, empty_label="Any status"
    )
    kind = django_filters.ChoiceFilter(label="Kind", choices=ProposalKind.choices, empty_label="Any kind")

    class Meta:
        model = BaselineProposal
        fields: list[str] = []


def _action_choices(seen: list[str]) -> list[tuple[str, str]]:
    """Every known AuditAction plus any other action that occurs in the log (the field is open-ended)."""
    known = dict(AuditAction.choices)
    extra = [(a, a.replace("_", " ").capitalize()) for a in seen if a not in known]
    return sorted([*known.items(), *extra], key=lambda c: c[1])


class AuditEventFilterSet(ActiveFilterMixin, django_filters.FilterSet):
    """The audit log: fleet name (kept after a fleet is deleted), action, actor (user name or system actor,
    contains, case-insensitive), and a date range in UTC days, both ends inclusive.

    Pass facets=selectors.audit_facets() for the fleet and action choices."""

    fleet = django_filters.ChoiceFilter(label="Fleet", field_name="fleet_name", empty_label="Every fleet")
    action = django_filters.ChoiceFilter(label="Action", empty_label="Every action")
    actor = django_filters.CharFilter(
        label="Actor", field_name="actor_label", lookup_expr="icontains", max_length=150
    )
    date_from = django_filters.DateFilter(
        label="From",
        field_name="created_at",
        lookup_expr="date__gte",
        widget=forms.DateInput(attrs={"type": "date"}),
    )
    date_to = django_filters.DateFilter(
        label="To",
        field_name="created_at",
        lookup_expr="date__lte",
        widget=forms.DateInput(attrs={"type": "date"}),
    )

    class Meta:
        model = AuditEvent
        fields: list[str] = []

    def __init__(self, *args, facets: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        facets = facets or {}
        self.filters["fleet"].extra["choices"] = [(n, n) for n in facets.get("fleet", [])]
        self.filters["action"].extra["choices"] = _action_choices(facets.get("action", []))
