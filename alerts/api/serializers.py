from __future__ import annotations

from rest_framework import serializers

from detection.models import Fleet

from ..forms import AlertRuleForm
from ..models import Alert, AlertRule, DriftReport


class AlertSerializer(serializers.ModelSerializer):
    fleet = serializers.SlugRelatedField(slug_field="name", read_only=True)
    device = serializers.SlugRelatedField(slug_field="external_id", read_only=True)
    acknowledged_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    anomaly_ids = serializers.SerializerMethodField()

    class Meta:
        model = Alert
        fields = ["id", "fleet", "status", "scope", "device", "cohort", "domain", "severity", "title", "count",
                  "device_count", "store_count", "first_seen", "last_seen", "acknowledged_by", "acknowledged_at",
                  "resolved_at", "snoozed_until", "anomaly_ids", "created_at", "updated_at"]
        read_only_fields = fields

    def get_anomaly_ids(self, alert) -> list[int]:
        return [m.anomaly_id for m in alert.memberships.all()][:500]


class AlertSnoozeSerializer(serializers.Serializer):
    minutes = serializers.IntegerField(required=False, min_value=1, max_value=30 * 24 * 60)
    until = serializers.DateTimeField(required=False)

    def validate(self, data):
        if ("minutes" in data) == ("until" in data):
            raise serializers.ValidationError({"minutes": ["give exactly one of minutes or until"]})
        return data


class AlertResolveSerializer(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500)


class AlertRuleSerializer(serializers.ModelSerializer):
    """An alert rule; validated by the same form as the web page. webhook_secret is write-only."""

    fleet = serializers.SlugRelatedField(slug_field="name", queryset=Fleet.objects.all())
    webhook_secret = serializers.CharField(write_only=True, required=False, allow_blank=True, max_length=200)
    channels = serializers.ListField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = AlertRule
        fields = ["id", "fleet", "name", "enabled", "min_severity", "manufacturer", "model", "os_version", "store",
                  "device_external_id", "email_to", "webhook_url", "webhook_secret", "quiet_start", "quiet_end",
                  "budget", "budget_window_minutes", "channels", "created_at", "updated_at"]
        read_only_fields = ["id", "channels", "created_at", "updated_at"]

    def validate(self, data):
        source = self.instance or AlertRule()  # a new rule starts from the model's defaults
        merged = {f: getattr(source, f) if f != "fleet" or source.fleet_id else None
                  for f in AlertRuleForm.Meta.fields}
        merged.update(data)
        merged["fleet"] = merged["fleet"].name if merged.get("fleet") else ""
        form = AlertRuleForm({k: ("" if v is None else v) for k, v in merged.items()
                              if not (k == "enabled" and v is False)}, instance=self.instance)
        if not form.is_valid():
            raise serializers.ValidationError({k: [str(e) for e in v] for k, v in form.errors.items()})
        return data


class DriftReportSerializer(serializers.ModelSerializer):
    fleet = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = DriftReport
        fields = ["id", "fleet", "baseline_version", "status", "summary", "features", "windows", "created_at"]
        read_only_fields = fields
