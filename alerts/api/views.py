"""Alerts, alert rules and drift reports under /api/v1/. Reads need viewer; acknowledge, resolve and
snooze need reviewer; rule changes need approver (all audited by the services)."""
from __future__ import annotations

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from detection.api.errors import field_error
from detection.api.views import RoleViewSetMixin
from detection.choices import Severity

from .. import services
from ..choices import AlertScope, AlertStatus, DriftStatus
from ..models import Alert, AlertRule, DriftReport
from .serializers import (
    AlertResolveSerializer,
    AlertRuleSerializer,
    AlertSerializer,
    AlertSnoozeSerializer,
    DriftReportSerializer,
)


class AlertFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="fleet__name")
    status = django_filters.ChoiceFilter(choices=AlertStatus.choices)
    severity = django_filters.ChoiceFilter(choices=Severity.choices)
    scope = django_filters.ChoiceFilter(choices=AlertScope.choices)

    class Meta:
        model = Alert
        fields: list[str] = []


class AlertViewSet(RoleViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """Alerts, newest activity first. Filters: fleet, status, severity, scope."""

    serializer_class = AlertSerializer
    queryset = (Alert.objects.select_related("fleet", "device", "acknowledged_by")
                .prefetch_related("memberships"))
    filterset_class = AlertFilterSet
    action_roles = {"acknowledge": "reviewer", "resolve": "reviewer", "snooze": "reviewer"}

    @extend_schema(request=None, responses={200: AlertSerializer})
    @action(detail=True, methods=["post"])
    def acknowledge(self, request, pk=None):
        try:
            alert = services.alert_acknowledge(alert=self.get_object(), user=request.user)
        except services.AlertActionError as exc:
            raise field_error(exc) from None
        return Response(AlertSerializer(alert).data)

    @extend_schema(request=AlertResolveSerializer, responses={200: AlertSerializer})
    @action(detail=True, methods=["post"])
    def resolve(self, request, pk=None):
        params = AlertResolveSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            alert = services.alert_resolve(alert=self.get_object(), user=request.user,
                                           reason=params.validated_data.get("reason", ""))
        except services.AlertActionError as exc:
            raise field_error(exc) from None
        return Response(AlertSerializer(alert).data)

    @extend_schema(request=AlertSnoozeSerializer, responses={200: AlertSerializer})
    @action(detail=True, methods=["post"])
    def snooze(self, request, pk=None):
        params = AlertSnoozeSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            alert = services.alert_snooze(alert=self.get_object(), user=request.user, **params.validated_data)
        except services.AlertActionError as exc:
            raise field_error(exc) from None
        return Response(AlertSerializer(alert).data)


class AlertRuleFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="fleet__name")

    class Meta:
        model = AlertRule
        fields: list[str] = []


class AlertRuleViewSet(RoleViewSetMixin, viewsets.ModelViewSet):
    """Alert rules (approver for every method, reads included: rules hold addresses and endpoints)."""

    serializer_class = AlertRuleSerializer
    queryset = AlertRule.objects.select_related("fleet")
    filterset_class = AlertRuleFilterSet
    read_role = "approver"

    def perform_create(self, serializer):
        serializer.instance = services.alert_rule_save(rule=AlertRule(**serializer.validated_data),
                                                       user=self.request.user)

    def perform_update(self, serializer):
        rule = serializer.instance
        for key, value in serializer.validated_data.items():
            setattr(rule, key, value)
        serializer.instance = services.alert_rule_save(rule=rule, user=self.request.user)

    def perform_destroy(self, instance):
        services.alert_rule_delete(rule=instance, user=self.request.user)


class DriftReportFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="fleet__name")
    status = django_filters.ChoiceFilter(choices=DriftStatus.choices)

    class Meta:
        model = DriftReport
        fields: list[str] = []


class DriftReportViewSet(RoleViewSetMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = DriftReportSerializer
    queryset = DriftReport.objects.select_related("fleet")
    filterset_class = DriftReportFilterSet
