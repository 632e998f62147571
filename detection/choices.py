from django.db import models


class RunStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    DEGRADED = "degraded", "Degraded"
    FAILED = "failed", "Failed"


class RunStage(models.TextChoices):
    QUEUED = "queued", "Queued"
    INGEST = "ingest", "Ingest"
    FEATURES = "features", "Features"
    BASELINES = "baselines", "Baselines"
    TRAIN = "train", "Train"
    SCORE = "score", "Score"
    PERSIST = "persist", "Persist"
    DONE = "done", "Done"


class ModelStatus(models.TextChoices):
    CANDIDATE = "candidate", "Candidate"
    PRODUCTION = "production", "Production"
    RETIRED = "retired", "Retired"


class Severity(models.TextChoices):
    CRITICAL = "critical", "Critical"
    HIGH = "high", "High"
    MEDIUM = "medium", "Medium"
    LOW = "low", "Low"


class Label(models.IntegerChoices):
    ANOMALY = -1, "Anomaly"
    NORMAL = 1, "Normal"


class Trigger(models.TextChoices):
    CLI = "cli", "Command line"
    UI = "ui", "Web app"
    API = "api", "API"
    SCHEDULE = "schedule", "Schedule"
    EVALUATION = "evaluation", "Evaluation"
    STREAM = "stream", "Live stream"


class Verdict(models.TextChoices):
    TRUE_POSITIVE = "true_positive", "True positive"
    FALSE_POSITIVE = "false_positive", "False positive"
    NOT_SURE = "not_sure", "Not sure"


class ReviewStatus(models.TextChoices):
    """The anomaly list's review filter: open (no verdict yet), reviewed (any), or with a given verdict."""

    OPEN = "open", "Open"
    REVIEWED = "reviewed", "Reviewed"
    TRUE_POSITIVE = "true_positive", "True positive"
    FALSE_POSITIVE = "false_positive", "False positive"


class Role(models.TextChoices):
    """Cumulative roles, weakest first: each includes the ones before it (see detection.permissions)."""

    VIEWER = "viewer", "Viewer"
    REVIEWER = "reviewer", "Reviewer"
    APPROVER = "approver", "Approver"
    ADMIN = "admin", "Admin"


class AuditAction(models.TextChoices):
    """What an audit event records. The field has no database choices, so apps may add actions freely."""

    MODEL_TRAINED = "model_trained", "Model trained"
    MODEL_PROMOTED = "model_promoted", "Model promoted"
    MODEL_ROLLED_BACK = "model_rolled_back", "Model rolled back"
    BASELINE_ACTIVATED = "baseline_activated", "Baseline version activated"
    BASELINE_ROLLED_BACK = "baseline_rolled_back", "Baseline rolled back"
    PROPOSAL_CREATED = "proposal_created", "Adjustment proposed"
    PROPOSAL_APPROVED = "proposal_approved", "Adjustment approved"
    PROPOSAL_REJECTED = "proposal_rejected", "Adjustment rejected"
    PROPOSAL_APPLIED = "proposal_applied", "Adjustment applied"
    PROPOSAL_FAILED = "proposal_failed", "Adjustment failed"
    RETRAIN_TRIGGERED = "retrain_triggered", "Retrain triggered"
    ALERT_ACKNOWLEDGED = "alert_acknowledged", "Alert acknowledged"
    ALERT_RESOLVED = "alert_resolved", "Alert resolved"
    ALERT_SNOOZED = "alert_snoozed", "Alert snoozed"
    ALERT_REVIEWED = "alert_reviewed", "Alert's anomalies reviewed"
    ALERT_RULE_CHANGED = "alert_rule_changed", "Alert rule changed"
    FLEET_TUNED = "fleet_tuned", "Detection settings tuned"
