"""Admin for the detection models. List pages stay cheap: joins are selected up front, big tables
(telemetry, results) skip the full-table count, and foreign keys to them are raw ids, not dropdowns.
"""
from django.contrib import admin
from simple_history.admin import SimpleHistoryAdmin

from .models import (
    AnomalyFeedback, AnomalyResult, AuditEvent, Device, Fleet, GroundTruthLabel, ModelVersion, PipelineRun,
    Telemetry,
)


@admin.register(Fleet)
class FleetAdmin(admin.ModelAdmin):
    list_display = ["name", "description", "created_at"]
    search_fields = ["name", "description"]


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ["external_id", "fleet", "manufacturer", "model", "os_version", "store", "customer"]
    list_filter = ["fleet"]
    list_select_related = ["fleet"]
    search_fields = ["external_id", "store", "customer"]
    show_full_result_count = False


@admin.register(Telemetry)
class TelemetryAdmin(admin.ModelAdmin):
    list_display = ["device", "fleet", "timestamp"]
    list_select_related = ["device", "fleet"]
    raw_id_fields = ["fleet", "device"]
    search_fields = ["device__external_id"]
    show_full_result_count = False


@admin.register(GroundTruthLabel)
class GroundTruthLabelAdmin(admin.ModelAdmin):
    list_display = ["device", "fleet", "start", "end", "kind", "metric", "source"]
    list_filter = ["fleet", "kind", "source"]
    list_select_related = ["device", "fleet"]
    raw_id_fields = ["fleet", "device"]


@admin.register(PipelineRun)
class PipelineRunAdmin(admin.ModelAdmin):
    # Plain ModelAdmin: PipelineRun has no HistoricalRecords, so SimpleHistoryAdmin's history view would fail.
    list_display = ["id", "fleet", "status", "stage", "trigger", "n_scored", "n_anomalies", "created_at",
                    "finished_at"]
    list_filter = ["status", "trigger", "fleet"]
    list_select_related = ["fleet"]
    raw_id_fields = ["model_version", "baseline_version", "started_by"]


@admin.register(ModelVersion)
class ModelVersionAdmin(SimpleHistoryAdmin):
    list_display = ["__str__", "fleet", "version", "algorithm", "status", "training_rows", "created_at"]
    list_filter = ["status", "algorithm", "fleet"]
    list_select_related = ["fleet"]
    raw_id_fields = ["baseline_version", "run"]


@admin.register(AnomalyResult)
class AnomalyResultAdmin(admin.ModelAdmin):
    list_display = ["timestamp", "device", "fleet", "run", "label", "severity", "anomaly_score", "threshold"]
    list_filter = ["label", "severity"]
    list_select_related = ["device", "fleet", "run"]
    raw_id_fields = ["run", "fleet", "device", "model_version", "baseline_version"]
    search_fields = ["device__external_id"]
    show_full_result_count = False


@admin.register(AnomalyFeedback)
class AnomalyFeedbackAdmin(admin.ModelAdmin):
    list_display = ["anomaly", "user", "verdict", "updated_at"]
    list_filter = ["verdict"]
    list_select_related = ["anomaly", "user"]
    raw_id_fields = ["anomaly", "user"]
    search_fields = ["comment", "user__username"]


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: the audit log is written by services, never edited."""

    list_display = ["created_at", "actor_label", "action", "fleet_name", "target_label", "reason"]
    list_filter = ["action", "fleet_name"]
    search_fields = ["actor_label", "target_label", "reason"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
