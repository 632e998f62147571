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
