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
