"""The list pages' filters (django-filter). Invalid values are dropped by the form, never a 500."""
from __future__ import annotations

import django_filters
from django import forms
from django.db.models import Exists, OuterRef, QuerySet

from .choices import ReviewStatus, Severity
from .models import AnomalyFeedback, AnomalyResult, Device


class ActiveFilterMixin:
    """For a FilterSet: `active` says whether any valid filter is set, so a page can say "nothing
    matches" instead of "nothing yet"."""

    @property
    def active(self) -> bool:
        if not self.is_bound:
            return False
        self.form.is_valid()
        return any(v not in (None, "") for v in self.form.cleaned_data.values())


class AnomalyResultFilterSet(ActiveFilterMixin, django_filters.FilterSet):
    """Filters for one fleet's anomalies; pass facets=selectors.device_facets(fleet=...) for the choices.

    cohort: "manufacturer|model|os_version"; review: open (no verdict), reviewed (any verdict),
    true_positive / false_positive (at least one such verdict); date_from/date_to: UTC days, inclusive.
    """

    cohort = django_filters.ChoiceFilter(label="Cohort", method="filter_cohort", empty_label="Any cohort")
    store = django_filters.ChoiceFilter(label="Store", field_name="device__store", empty_label="Any store")
    device = django_filters.CharFilter(label="Device", field_name="device__external_id", lookup_expr="icontains")
    severity = django_filters.ChoiceFilter(label="Severity", choices=Severity.choices, empty_label="Any severity")
    review = django_filters.ChoiceFilter(label="Review", choices=ReviewStatus.choices, method="filter_review",
                                         empty_label="Any review status")
    date_from = django_filters.DateFilter(label="From", field_name="timestamp", lookup_expr="date__gte",
                                          widget=forms.DateInput(attrs={"type": "date"}))
    date_to = django_filters.DateFilter(label="To", field_name="timestamp", lookup_expr="date__lte",
                                        widget=forms.DateInput(attrs={"type": "date"}))

    class Meta:
        model = AnomalyResult
        fields: list[str] = []

    def __init__(self, *args, facets: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        facets = facets or {}
        self.filters["cohort"].extra["choices"] = facets.get("cohort", [])
        self.filters["store"].extra["choices"] = facets.get("store", [])

    def filter_cohort(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        parts = value.split("|")
        if len(parts) != 3:
            return queryset
        manufacturer, model, os_version = parts
        return queryset.filter(device__manufacturer=manufacturer, device__model=model,
                               device__os_version=os_version)

    def filter_review(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        feedback = AnomalyFeedback.objects.filter(anomaly=OuterRef("pk"))
        if value == ReviewStatus.OPEN:
            return queryset.filter(~Exists(feedback))
        if value == ReviewStatus.REVIEWED:
            return queryset.filter(Exists(feedback))
        return queryset.filter(Exists(feedback.filter(verdict=value)))


class DeviceFilterSet(ActiveFilterMixin, django_filters.FilterSet):
    """Filters of the device list: cohort ("manufacturer|model|os_version"), store, customer, and q, a
    case-insensitive search in the external id. Pass facets=selectors.device_facets(fleet=...)."""

    q = django_filters.CharFilter(label="Search", field_name="external_id", lookup_expr="icontains")
    cohort = django_filters.ChoiceFilter(label="Cohort", method="filter_cohort", empty_label="Any cohort")
    store = django_filters.ChoiceFilter(label="Store", empty_label="Any store")
    customer = django_filters.ChoiceFilter(label="Customer", empty_label="Any customer")

    class Meta:
        model = Device
        fields: list[str] = []

    def __init__(self, *args, facets: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        facets = facets or {}
        for name in ("cohort", "store", "customer"):
            self.filters[name].extra["choices"] = facets.get(name, [])

    def filter_cohort(self, queryset, name: str, value: str):
        parts = value.split("|")
        if len(parts) != 3:
            return queryset
        return queryset.filter(manufacturer=parts[0], model=parts[1], os_version=parts[2])
