from django.contrib import admin

from .models import Alert, AlertDelivery, AlertRule, DriftReport


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = ["name", "fleet", "enabled", "min_severity", "budget", "budget_window_minutes"]
    list_filter = ["enabled", "fleet"]


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["title", "fleet", "status", "severity", "scope", "count", "last_seen"]
    list_filter = ["status", "severity", "scope", "fleet"]
    raw_id_fields = ["device", "acknowledged_by", "resolved_by"]
    readonly_fields = ["first_seen", "last_seen", "count"]


@admin.register(AlertDelivery)
class AlertDeliveryAdmin(admin.ModelAdmin):
    list_display = ["pk", "rule", "channel", "kind", "status", "attempts", "created_at", "sent_at"]
    list_filter = ["status", "channel", "kind"]
    raw_id_fields = ["alert", "alerts"]


@admin.register(DriftReport)
class DriftReportAdmin(admin.ModelAdmin):
    list_display = ["fleet", "status", "summary", "created_at"]
    list_filter = ["status", "fleet"]
