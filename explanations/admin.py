from django.contrib import admin

from .models import Explanation


@admin.register(Explanation)
class ExplanationAdmin(admin.ModelAdmin):
    list_display = ("id", "anomaly", "status", "provider", "model", "verdict", "attribution_method", "latency_ms",
                    "created_at")
    list_filter = ("status", "provider", "verdict", "attribution_method")
    raw_id_fields = ("anomaly", "requested_by")
    readonly_fields = ("created_at", "started_at", "finished_at")
    search_fields = ("anomaly__device__external_id",)
