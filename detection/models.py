"""Fleets, devices, telemetry, pipeline runs, model versions and anomaly results.

Telemetry keeps a fleet's metric values in one JSON object per (device, timestamp), because each
fleet has its own metric schema. Bulk paths (detection.ingest.loader) write it with COPY on
PostgreSQL and executemany on SQLite, and read it back with the database's own JSON extraction.
"""
from __future__ import annotations

from django.conf import settings
from django.db import models
from simple_history.models import HistoricalRecords

from .choices import Label, ModelStatus, RunStage, RunStatus, Severity, Trigger, Verdict

DEFAULT_COHORT_COLUMNS = ["manufacturer", "model", "os_version"]
DEVICE_ATTRIBUTE_COLUMNS = ["manufacturer", "model", "os_version", "store", "customer"]


class Fleet(models.Model):
    """A named set of devices sharing one metric schema.

    metric_schema: list of {"name": str, "unit": str, "domain": str}, e.g.
    {"name": "battery_level", "unit": "%", "domain": "battery"}.
    config: per-fleet overrides of settings.VIGIL_DETECTION (algorithm, contamination, windows...).
    """

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    metric_schema = models.JSONField(default=list)
    cohort_columns = models.JSONField(default=list)
    config = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def metric_names(self) -> list[str]:
        return [m["name"] for m in self.metric_schema]

    @property
    def metric_domains(self) -> dict[str, str]:
        return {m["name"]: m.get("domain", "other") for m in self.metric_schema}

    def detection_config(self) -> dict:
        """settings.VIGIL_DETECTION with this fleet's overrides applied."""
        return {**settings.VIGIL_DETECTION, **(self.config or {})}


class Device(models.Model):
    fleet = models.ForeignKey(Fleet, on_delete=models.CASCADE, related_name="devices")
    external_id = models.CharField(max_length=200)
    manufacturer = models.CharField(max_length=100, blank=True)
    model = models.CharField(max_length=100, blank=True)
    os_version = models.CharField(max_length=50, blank=True)
    store = models.CharField(max_length=100, blank=True)
    customer = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["fleet", "external_id"]
        constraints = [
            models.UniqueConstraint(fields=["fleet", "external_id"], name="uniq_device_per_fleet"),
        ]

    def __str__(self) -> str:
        return self.external_id

    @property
    def cohort_label(self) -> str:
        return " ".join(p for p in (self.manufacturer, self.model, self.os_version) if p)


class Telemetry(models.Model):
    """One sample of a device: the fleet's metric values at a timestamp ({metric: float|null})."""

    # Telemetry is the one table that grows by millions of rows at a time, so it carries a single
    # index, the unique (device, timestamp) one, and no database-level foreign keys (each would be
    # a deferred check per row at commit). Rows are only written by detection.ingest.loader with
    # ids from the same transaction, Django still cascades deletes, and the fleet is read through
    # its devices.
    fleet = models.ForeignKey(Fleet, on_delete=models.CASCADE, related_name="+", db_index=False,
                              db_constraint=False)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="telemetry", db_index=False,
                               db_constraint=False)
    timestamp = models.DateTimeField()
    values = models.JSONField()

    class Meta:
        verbose_name_plural = "telemetry"
        constraints = [
            models.UniqueConstraint(fields=["device", "timestamp"], name="uniq_telemetry_sample"),
        ]


class GroundTruthLabel(models.Model):
    """A labelled anomaly window that came with the data (NAB, SKAB, synthetic injections).

    Kept apart from telemetry and used for evaluation only: the detector never reads it.
    """

    fleet = models.ForeignKey(Fleet, on_delete=models.CASCADE, related_name="ground_truth")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="ground_truth")
    start = models.DateTimeField()
    end = models.DateTimeField()
    kind = models.CharField(max_length=50, blank=True)
    metric = models.CharField(max_length=100, blank=True)
    source = models.CharField(max_length=50, blank=True)

    class Meta:
        indexes = [models.Index(fields=["fleet", "device", "start"], name="truth_fleet_device")]


class PipelineRun(models.Model):
    fleet = models.ForeignKey(Fleet, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=20, choices=RunStatus.choices, default=RunStatus.PENDING)
    stage = models.CharField(max_length=20, choices=RunStage.choices, default=RunStage.QUEUED)
    trigger = models.CharField(max_length=20, choices=Trigger.choices, default=Trigger.CLI)
    params = models.JSONField(default=dict, blank=True)
    stage_timings = models.JSONField(default=dict, blank=True)
    row_counts = models.JSONField(default=dict, blank=True)
    warnings = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    model_version = models.ForeignKey(
        "ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    baseline_version = models.ForeignKey(
        "baselines.BaselineVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    n_scored = models.IntegerField(default=0)
    n_anomalies = models.IntegerField(default=0)
    threshold = models.FloatField(null=True, blank=True)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["fleet", "status"], name="run_fleet_status")]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.fleet_id} ({self.status})"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None

    @property
    def is_finished(self) -> bool:
        return self.status in {RunStatus.SUCCEEDED, RunStatus.DEGRADED, RunStatus.FAILED}


class ModelVersion(models.Model):
    fleet = models.ForeignKey(Fleet, on_delete=models.CASCADE, related_name="model_versions")
    version = models.PositiveIntegerField()
    algorithm = models.CharField(max_length=50)
    params = models.JSONField(default=dict)
    feature_list = models.JSONField(default=list)
    feature_domain_weights = models.JSONField(default=dict)
    training_rows = models.IntegerField(default=0)
    training_seconds = models.FloatField(default=0.0)
    metrics = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=ModelStatus.choices, default=ModelStatus.CANDIDATE)
    baseline_version = models.ForeignKey(
        "baselines.BaselineVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    run = models.ForeignKey(PipelineRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    artifact_path = models.CharField(max_length=500, blank=True)
    artifact_checksum = models.CharField(max_length=64, blank=True)
    format_version = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    history = HistoricalRecords()

    class Meta:
        ordering = ["fleet", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["fleet", "version"], name="uniq_model_version_per_fleet"),
        ]

    def __str__(self) -> str:
        return f"{self.fleet.name} model v{self.version} ({self.algorithm}, {self.status})"


class AnomalyResult(models.Model):
    """One scoring decision: a (device, timestamp) scored by a model version on a baseline version.

    top_metrics: list of {"metric", "feature", "domain", "value", "typical", "mad", "z", "level"}
    ordered by |z| (robust z-score against the baseline level that applied).
    votes, agreement: for an anomaly an ensemble (or auto) model scored, {member detector: whether
    its own threshold flags the row} and the weighted share of members that do, 0..1 (the
    confidence that comes from the detectors' agreement); null for normal rows and single detectors.
    """

    # A run persists up to millions of rows in one go, so every index costs: the foreign keys rely
    # on the composite indexes below (run, fleet, device lead one each), and model and baseline
    # versions are only looked up from results when one is deleted, which is rare.
    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="results", db_index=False)
    fleet = models.ForeignKey(Fleet, on_delete=models.CASCADE, related_name="+", db_index=False,
                              db_constraint=False)  # implied by the run
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="results", db_index=False)
    timestamp = models.DateTimeField()
    anomaly_score = models.FloatField()
    label = models.SmallIntegerField(choices=Label.choices)
    threshold = models.FloatField()
    severity = models.CharField(max_length=10, choices=Severity.choices, blank=True)
    # Written in the same transaction as the versions they point to; Django enforces PROTECT, and
    # leaving out the database constraints spares two deferred checks per row at commit.
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="results",
                                      db_index=False, db_constraint=False)
    baseline_version = models.ForeignKey(
        "baselines.BaselineVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="results",
        db_index=False, db_constraint=False,
    )
    top_metrics = models.JSONField(default=list, blank=True)
    votes = models.JSONField(null=True, blank=True)
    agreement = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-timestamp", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "device", "timestamp"], name="uniq_result_per_run"),
        ]
        indexes = [
            models.Index(fields=["fleet", "label", "-timestamp"], name="result_fleet_label_ts"),
            models.Index(fields=["run", "label"], name="result_run_label"),
            models.Index(fields=["device", "timestamp"], name="result_device_ts"),
            # The review list pages through one run's anomalies, newest first or by score. Partial
            # (label = anomaly): a few percent of a run's rows, so bulk inserts of normal rows skip them.
            models.Index(fields=["run", "anomaly_score", "timestamp", "id"], name="result_run_anomaly_score",
                         condition=models.Q(label=-1)),
            models.Index(fields=["run", "timestamp", "id"], name="result_run_anomaly_ts",
                         condition=models.Q(label=-1)),
        ]

    @property
    def is_anomaly(self) -> bool:
        return self.label == Label.ANOMALY


class AnomalyFeedback(models.Model):
    """A reviewer's verdict on one anomaly: one current verdict per (anomaly, user), updated on re-submit.
    A run that scores the same (device, timestamp) again gets a copy of each reviewer's latest verdict
    on it (carried_from), so re-scoring after a baseline change does not reopen what was reviewed.

    client_id: set by a client that may submit the same verdict twice (offline queue); unique when set.
    """

    anomaly = models.ForeignKey(AnomalyResult, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="anomaly_feedback")
    verdict = models.CharField(max_length=20, choices=Verdict.choices)
    comment = models.TextField(blank=True)
    client_id = models.UUIDField(null=True, blank=True)
    # A verdict copied from an earlier run's anomaly at the same (device, timestamp) when a new run
    # scored it again (detection.services.feedback_carry_over); None for a verdict given on this anomaly.
    carried_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                                     db_constraint=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["anomaly", "user"], name="uniq_feedback_per_user"),
            models.UniqueConstraint(fields=["client_id"], condition=models.Q(client_id__isnull=False),
                                    name="uniq_feedback_client_id"),
        ]

    def __str__(self) -> str:
        return f"{self.get_verdict_display()} on result {self.anomaly_id} by {self.user_id}"


class AuditEvent(models.Model):
    """One audited step: who (a user, or a named system actor such as "celery-beat"), when, what changed
    (before and after values, JSON) and why. Written by detection.services.audit_record only.

    fleet_name and actor_label are copies, so an event stays readable after its fleet or user is deleted.
    """

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    fleet = models.ForeignKey(Fleet, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit_events")
    fleet_name = models.CharField(max_length=100, blank=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    actor_label = models.CharField(max_length=150)
    action = models.CharField(max_length=50, db_index=True)  # detection.choices.AuditAction, open-ended
    target_type = models.CharField(max_length=50, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_label = models.CharField(max_length=200, blank=True)
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["fleet", "-created_at"], name="audit_fleet_time")]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M} {self.actor_label} {self.action} {self.target_label}"

    @property
    def action_label(self) -> str:
        from .choices import AuditAction

        return dict(AuditAction.choices).get(self.action, self.action.replace("_", " "))
