"""Alert rules, alerts (grouped anomalies), their timeline, notification deliveries, and drift reports.

An Alert groups anomalies (detection.AnomalyResult) of one device and metric domain, or of one cohort
when many of its devices fire together (alerts.services.alerts_ingest). AlertRule decides who hears about
which alerts, over which channels, and how many single messages a window may carry before the rest go
into a digest. AlertDelivery is one message on one channel: its attempts, its last error, and a dead
letter when it ran out of retries.
"""
from __future__ import annotations

from django.conf import settings
from django.db import models

from detection.choices import Severity

from .choices import (
    AlertEventKind,
    AlertScope,
    AlertStatus,
    Channel,
    DeliveryKind,
    DeliveryStatus,
    DriftStatus,
)


class AlertRule(models.Model):
    """Who hears about a fleet's alerts, and how.

    Scope filters (all optional, blank = any): manufacturer, model, os_version (a cohort), store,
    device_external_id. Channels: email (email_to, comma-separated addresses) and webhook (webhook_url,
    signed with webhook_secret, HMAC-SHA256). quiet_start/quiet_end (UTC): deliveries in that span are
    held for the digest. budget: at most that many single messages per channel per budget_window_minutes;
    beyond it, alerts are held and sent as one digest.
    """

    fleet = models.ForeignKey("detection.Fleet", on_delete=models.CASCADE, related_name="alert_rules")
    name = models.CharField(max_length=100)
    enabled = models.BooleanField(default=True)
    min_severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.HIGH)
    manufacturer = models.CharField(max_length=100, blank=True)
    model = models.CharField(max_length=100, blank=True)
    os_version = models.CharField(max_length=50, blank=True)
    store = models.CharField(max_length=100, blank=True)
    device_external_id = models.CharField(max_length=200, blank=True)
    email_to = models.TextField(blank=True, help_text="Comma-separated addresses; blank = no email")
    webhook_url = models.URLField(max_length=500, blank=True, help_text="Blank = no webhook")
    webhook_secret = models.CharField(max_length=200, blank=True)
    quiet_start = models.TimeField(null=True, blank=True, help_text="UTC")
    quiet_end = models.TimeField(null=True, blank=True, help_text="UTC")
    budget = models.PositiveIntegerField(default=10)
    budget_window_minutes = models.PositiveIntegerField(default=60)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["fleet", "name"]
        constraints = [models.UniqueConstraint(fields=["fleet", "name"], name="uniq_alert_rule_name_per_fleet")]

    def __str__(self) -> str:
        return f"{self.name} ({self.fleet.name})"

    @property
    def channels(self) -> list[str]:
        return [c for c, on in ((Channel.EMAIL, bool(self.email_to.strip())),
                                (Channel.WEBHOOK, bool(self.webhook_url))) if on]

    @property
    def email_recipients(self) -> list[str]:
        return [a.strip() for a in self.email_to.split(",") if a.strip()]

    @property
    def scope_label(self) -> str:
        parts = [p for p in (self.manufacturer, self.model, self.os_version) if p]
        if self.store:
            parts.append(f"store {self.store}")
        if self.device_external_id:
            parts.append(f"device {self.device_external_id}")
        return " · ".join(parts) or "whole fleet"

    def in_quiet_hours(self, moment) -> bool:
        """Whether moment (aware datetime) falls in the quiet span; a span may cross midnight."""
        if self.quiet_start is None or self.quiet_end is None or self.quiet_start == self.quiet_end:
            return False
        import datetime as dt

        t = moment.astimezone(dt.UTC).time()
        if self.quiet_start < self.quiet_end:
            return self.quiet_start <= t < self.quiet_end
        return t >= self.quiet_start or t < self.quiet_end


class Alert(models.Model):
    """Anomalies grouped into one thing to act on: a device's anomalies in one metric domain, or a
    cohort's when many of its devices fire at once. first_seen/last_seen are anomaly timestamps."""

    fleet = models.ForeignKey("detection.Fleet", on_delete=models.CASCADE, related_name="alerts")
    status = models.CharField(max_length=20, choices=AlertStatus.choices, default=AlertStatus.OPEN)
    scope = models.CharField(max_length=10, choices=AlertScope.choices, default=AlertScope.DEVICE)
    device = models.ForeignKey("detection.Device", null=True, blank=True, on_delete=models.CASCADE,
                               related_name="alerts")
    cohort = models.JSONField(default=dict, blank=True)  # {column: value} of the cohort
    domain = models.CharField(max_length=50, blank=True)  # top_metrics[0].domain
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.LOW)
    title = models.CharField(max_length=300)
    device_count = models.PositiveIntegerField(default=1)
    store_count = models.PositiveIntegerField(default=0)
    count = models.PositiveIntegerField(default=0)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField()
    anomalies = models.ManyToManyField("detection.AnomalyResult", through="AlertAnomaly", related_name="alerts")
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                        on_delete=models.SET_NULL, related_name="+")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                    on_delete=models.SET_NULL, related_name="+")
    resolved_at = models.DateTimeField(null=True, blank=True)
    snoozed_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-last_seen", "-id"]
        indexes = [
            models.Index(fields=["fleet", "status", "-last_seen"], name="alert_fleet_status_seen"),
            models.Index(fields=["device", "domain", "status"], name="alert_device_domain"),
        ]

    def __str__(self) -> str:
        return f"alert {self.pk}: {self.title}"

    @property
    def is_active(self) -> bool:
        return self.status in (AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED)

    def is_snoozed(self, now) -> bool:
        return self.snoozed_until is not None and self.snoozed_until > now

    @property
    def snoozed_now(self) -> bool:
        from django.utils import timezone

        return self.is_snoozed(timezone.now())


class AlertAnomaly(models.Model):
    """An anomaly's membership of an alert; each anomaly joins one alert at most (so ingest is idempotent)."""

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="memberships")
    anomaly = models.OneToOneField("detection.AnomalyResult", on_delete=models.CASCADE,
                                   related_name="alert_membership")
    added_at = models.DateTimeField(auto_now_add=True)


class AlertEvent(models.Model):
    """One entry of an alert's timeline (opened, grew, acknowledged, notified...)."""

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=20, choices=AlertEventKind.choices)
    actor_label = models.CharField(max_length=150, default="system")
    message = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]


class AlertDelivery(models.Model):
    """One message on one channel: a single alert, or a digest of the alerts in `alerts`.

    Status moves pending -> sending -> sent, or failed (retried with exponential backoff) -> dead after
    VIGIL_ALERTS["max_attempts"]; held deliveries wait for the next digest, which marks them digested.
    """

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="deliveries")
    alert = models.ForeignKey(Alert, null=True, blank=True, on_delete=models.CASCADE, related_name="deliveries")
    alerts = models.ManyToManyField(Alert, blank=True, related_name="digests")
    channel = models.CharField(max_length=10, choices=Channel.choices)
    kind = models.CharField(max_length=10, choices=DeliveryKind.choices, default=DeliveryKind.SINGLE)
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    response_status = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["rule", "channel", "kind", "created_at"], name="delivery_budget")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} by {self.channel} ({self.status})"


class DriftReport(models.Model):
    """A drift check of a fleet: recent telemetry against the active baseline version's training window.

    features: list of baselines.drift.FeatureDrift as dicts (feature, kind, test, statistic, p_value,
    psi, status, n_reference, n_current). windows: {"reference": [start, end], "current": [start, end]}.
    """

    fleet = models.ForeignKey("detection.Fleet", on_delete=models.CASCADE, related_name="drift_reports")
    baseline_version = models.ForeignKey("baselines.BaselineVersion", null=True, blank=True,
                                         on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=10, choices=DriftStatus.choices)
    features = models.JSONField(default=list)
    windows = models.JSONField(default=dict)
    summary = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["fleet", "-created_at"], name="drift_fleet_time")]

    def __str__(self) -> str:
        return f"drift {self.status} of {self.fleet_id} at {self.created_at:%Y-%m-%d %H:%M}"
