from django.db import models

from detection.choices import Severity

# Weakest first: an alert rule's min_severity lets through this severity and every later one.
SEVERITY_ORDER: tuple[str, ...] = (Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL)


def severity_rank(severity: str) -> int:
    """0 (low) .. 3 (critical); -1 for a blank or unknown severity."""
    return SEVERITY_ORDER.index(severity) if severity in SEVERITY_ORDER else -1


class AlertStatus(models.TextChoices):
    OPEN = "open", "Open"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"
    SUPPRESSED = "suppressed", "Suppressed"


ACTIVE_STATUSES = (AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED)


class AlertScope(models.TextChoices):
    DEVICE = "device", "Device"
    COHORT = "cohort", "Cohort"


class Channel(models.TextChoices):
    EMAIL = "email", "Email"
    WEBHOOK = "webhook", "Webhook"


class DeliveryKind(models.TextChoices):
    SINGLE = "single", "Single alert"
    DIGEST = "digest", "Digest"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed, will retry"
    DEAD = "dead", "Dead letter"
    HELD = "held", "Held for the digest"
    DIGESTED = "digested", "Sent in a digest"


class AlertEventKind(models.TextChoices):
    OPENED = "opened", "Opened"
    GREW = "grew", "New anomalies joined"
    ESCALATED = "escalated", "Severity rose"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"
    SNOOZED = "snoozed", "Snoozed"
    SUPPRESSED = "suppressed", "Suppressed (false positives)"
    NOTIFIED = "notified", "Notification queued"
    HELD = "held", "Notification held for the digest"
    REVIEWED = "reviewed", "Anomalies reviewed"


class DriftStatus(models.TextChoices):
    OK = "ok", "OK"
    WARNING = "warning", "Warning"
    DRIFT = "drift", "Drift"
