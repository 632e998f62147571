"""Reads for the alerts app: alert lists and details, rules, drift reports."""
from __future__ import annotations

from django.db.models import QuerySet

from .choices import AlertStatus
from .models import Alert, AlertRule, DriftReport


def alert_list(*, fleet=None, status: str = "", severity: str = "") -> QuerySet[Alert]:
    """Alerts newest activity first, filtered by fleet, status and severity (blank = any)."""
    alerts = Alert.objects.select_related("fleet", "device", "acknowledged_by")
    if fleet is not None:
        alerts = alerts.filter(fleet=fleet)
    if status:
        alerts = alerts.filter(status=status)
    if severity:
        alerts = alerts.filter(severity=severity)
    return alerts.order_by("-last_seen", "-id")


def alert_get(*, pk: int) -> Alert | None:
    if not 0 < pk < 2**63:
        return None
    alerts = Alert.objects.select_related("fleet", "device", "acknowledged_by", "resolved_by")
    return alerts.filter(pk=pk).first()


def alert_anomalies(*, alert: Alert, limit: int = 100) -> list:
    """The alert's anomalies, newest first, with their devices and verdict counts
    (detection.selectors.with_verdict_counts; at most limit)."""
    from detection.selectors import with_verdict_counts

    return list(with_verdict_counts(alert.anomalies.select_related("device")).order_by("-timestamp", "-id")[:limit])


def open_alert_count() -> int:
    return Alert.objects.filter(status=AlertStatus.OPEN).count()


def rule_list(*, fleet=None) -> QuerySet[AlertRule]:
    rules = AlertRule.objects.select_related("fleet")
    return rules.filter(fleet=fleet) if fleet is not None else rules


def drift_reports(*, fleet, limit: int = 10) -> list[DriftReport]:
    return list(DriftReport.objects.filter(fleet=fleet).select_related("baseline_version")[:limit])
