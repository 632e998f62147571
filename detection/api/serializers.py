from __future__ import annotations

import math

from django.conf import settings
from rest_framework import serializers

from baselines.models import BaselineVersion
from detection.choices import Severity, Verdict
from detection.models import AnomalyFeedback, AnomalyResult, Device, Fleet, ModelVersion, PipelineRun
from detection.services import FEEDBACK_BULK_MAX, FEEDBACK_COMMENT_MAX


class FleetSerializer(serializers.ModelSerializer):
    class Meta:
        model = Fleet
        fields = ["id", "name", "description", "metric_schema", "cohort_columns", "config", "created_at"]
        read_only_fields = fields


class DeviceSerializer(serializers.ModelSerializer):
    fleet = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = Device
        fields = ["id", "fleet", "external_id", "manufacturer", "model", "os_version", "store", "customer"]
        read_only_fields = fields


class PipelineRunSerializer(serializers.ModelSerializer):
    fleet = serializers.SlugRelatedField(slug_field="name", read_only=True)
    model_version = serializers.SlugRelatedField(slug_field="version", read_only=True)
    baseline_version = serializers.SlugRelatedField(slug_field="number", read_only=True)
    duration_seconds = serializers.FloatField(read_only=True, allow_null=True)

    class Meta:
        model = PipelineRun
        fields = ["id", "fleet", "status", "stage", "trigger", "params", "stage_timings", "row_counts", "warnings",
                  "error", "model_version", "baseline_version", "n_scored", "n_anomalies", "threshold",
                  "created_at", "started_at", "finished_at", "duration_seconds"]
        read_only_fields = fields


class PipelineRunCreateSerializer(serializers.Serializer):
    """POST /runs/: start a pipeline run of a fleet. params: train_until (ISO timestamp),
    train_rows_per_device (int), score ("all" or "after_training")."""

    fleet = serializers.SlugRelatedField(slug_field="name", queryset=Fleet.objects.all())
    params = serializers.DictField(required=False, default=dict)


class AnomalyResultSerializer(serializers.ModelSerializer):
    fleet = serializers.SlugRelatedField(slug_field="name", read_only=True)
    device = serializers.SlugRelatedField(slug_field="external_id", read_only=True)
    model_version = serializers.SlugRelatedField(slug_field="version", read_only=True)
    baseline_version = serializers.SlugRelatedField(slug_field="number", read_only=True)
    is_anomaly = serializers.BooleanField(read_only=True)
    severity = serializers.ChoiceField(choices=Severity.choices, allow_blank=True, read_only=True,
                                       help_text="blank for normal results")

    class Meta:
        model = AnomalyResult
        fields = ["id", "run", "fleet", "device", "timestamp", "anomaly_score", "label", "is_anomaly", "threshold",
                  "severity", "model_version", "baseline_version", "top_metrics", "votes", "agreement"]
        read_only_fields = fields


class ModelVersionSerializer(serializers.ModelSerializer):
    fleet = serializers.SlugRelatedField(slug_field="name", read_only=True)
    baseline_version = serializers.SlugRelatedField(slug_field="number", read_only=True)

    class Meta:
        model = ModelVersion
        fields = ["id", "fleet", "version", "algorithm", "status", "params", "feature_list",
                  "feature_domain_weights", "training_rows", "training_seconds", "metrics", "baseline_version",
                  "run", "artifact_checksum", "format_version", "created_at"]
        read_only_fields = fields


class ModelVersionRollbackSerializer(serializers.Serializer):
    fleet = serializers.SlugRelatedField(slug_field="name", queryset=Fleet.objects.all())


class BaselineVersionSerializer(serializers.ModelSerializer):
    fleet = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = BaselineVersion
        fields = ["id", "fleet", "number", "is_active", "levels", "feature_list", "min_rows", "row_count",
                  "source", "reason", "run", "artifact_checksum", "format_version", "valid_from", "valid_to"]
        read_only_fields = fields


class MetricValueField(serializers.FloatField):
    """A finite number or null (a missing value); booleans and NaN/inf are refused."""

    default_error_messages = {"finite": "must be a finite number, not {value}.",
                              "invalid": "must be a number or null."}

    def __init__(self, **kwargs):
        kwargs.setdefault("allow_null", True)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float, str)):
            self.fail("invalid")
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("finite", value=data)
        return value


class ObservationSerializer(serializers.Serializer):
    """One observation to score. fleet and device_id are checked against the database by the
    serving service (detection.serving), which names the field it refuses."""

    fleet = serializers.CharField(max_length=100)
    device_id = serializers.CharField(max_length=200)
    timestamp = serializers.DateTimeField()
    metrics = serializers.DictField(child=MetricValueField(), allow_empty=False)


class DetectionSerializer(serializers.Serializer):
    """What detect answers for each observation (see detection.serving.detect_observations)."""

    device_id = serializers.CharField()
    timestamp = serializers.DateTimeField()
    anomaly_score = serializers.FloatField()
    is_anomaly = serializers.BooleanField()
    severity = serializers.CharField(allow_null=True)
    confidence = serializers.FloatField(
        help_text="0..1. Ensemble or auto model: the detectors' agreement with the label (agreement for an "
                  "anomaly, 1 - agreement for a normal row). Single detector: |score - threshold| / "
                  "(training score q0.99 - q0.5), clipped")
    agreement = serializers.FloatField(
        allow_null=True, help_text="ensemble or auto model: the weighted share of member detectors whose own "
                                   "threshold flags the row, 0..1; null for a single detector")
    top_metrics = serializers.ListField(child=serializers.DictField())
    model_version = serializers.IntegerField()
    baseline_version = serializers.IntegerField(allow_null=True)
    processing_time_ms = serializers.FloatField()


class DetectionBatchSerializer(serializers.Serializer):
    results = DetectionSerializer(many=True)
    total_processed = serializers.IntegerField()


class ObservationBatchSerializer(serializers.Serializer):
    """POST /detect/batch: {"observations": [...]} (a bare JSON list is accepted too)."""

    observations = ObservationSerializer(many=True, allow_empty=False)

    def validate_observations(self, value):
        limit = settings.MAX_BATCH_SIZE
        if len(value) > limit:
            raise serializers.ValidationError(f"at most {limit} observations per batch (MAX_BATCH_SIZE), "
                                              f"got {len(value)}")
        return value


class TelemetryIngestSerializer(serializers.Serializer):
    """POST /fleets/{name}/telemetry/ as JSON: rows are objects with device_id, timestamp (ISO 8601),
    the fleet's metrics (number or null; one left out is missing) and optionally device attributes.
    A multipart upload sends the same columns as a CSV file in `file` instead of rows."""

    rows = serializers.ListField(child=serializers.JSONField(), required=False,
                                 help_text="one object per sample (JSON requests)")
    file = serializers.FileField(required=False, help_text="a CSV file (multipart requests)")
    create_devices = serializers.BooleanField(default=False,
                                              help_text="add devices the fleet does not have yet")

    def validate(self, attrs):
        if ("rows" in attrs) == ("file" in attrs):
            raise serializers.ValidationError({"rows": ["give either rows (JSON) or file (a CSV upload)"]})
        return attrs


class TelemetryIngestResultSerializer(serializers.Serializer):
    fleet = serializers.CharField()
    rows = serializers.IntegerField()
    devices_created = serializers.IntegerField()
    devices_existing = serializers.IntegerField()
    seconds = serializers.FloatField()


class AnomalyFeedbackSerializer(serializers.ModelSerializer):
    fleet = serializers.CharField(source="anomaly.fleet.name", read_only=True)
    user = serializers.CharField(source="user.get_username", read_only=True)

    class Meta:
        model = AnomalyFeedback
        fields = ["id", "anomaly", "fleet", "user", "verdict", "comment", "client_id", "carried_from", "created_at",
                  "updated_at"]
        read_only_fields = fields


class AnomalyFeedbackBulkSerializer(serializers.Serializer):
    """POST /feedback/bulk/: one verdict on several anomalies (label -1), all or none."""

    anomalies = serializers.ListField(child=serializers.IntegerField(min_value=1, max_value=2**63 - 1),
                                      min_length=1, max_length=FEEDBACK_BULK_MAX,
                                      help_text=f"result ids, 1 to {FEEDBACK_BULK_MAX}")
    verdict = serializers.ChoiceField(choices=Verdict.choices)
    comment = serializers.CharField(required=False, allow_blank=True, default="",
                                    max_length=FEEDBACK_COMMENT_MAX)


class AnomalyFeedbackCreateSerializer(serializers.Serializer):
    """POST /feedback/: a verdict on an anomaly (label -1). One per (anomaly, user): a re-submit
    updates it; a known client_id returns the stored verdict (offline replays)."""

    anomaly = serializers.PrimaryKeyRelatedField(queryset=AnomalyResult.objects.select_related("fleet"))
    verdict = serializers.ChoiceField(choices=Verdict.choices)
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=FEEDBACK_COMMENT_MAX)
    client_id = serializers.UUIDField(required=False, allow_null=True, default=None)
