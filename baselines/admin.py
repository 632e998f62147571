from django.contrib import admin
from simple_history.admin import SimpleHistoryAdmin

from .models import BaselineStatistic, BaselineVersion


@admin.register(BaselineVersion)
class BaselineVersionAdmin(SimpleHistoryAdmin):
    list_display = ["__str__", "fleet", "number", "is_active", "row_count", "source", "valid_from",
                    "valid_to"]
    list_filter = ["is_active", "source", "fleet"]
    list_select_related = ["fleet"]
    raw_id_fields = ["created_by", "run"]


@admin.register(BaselineStatistic)
class BaselineStatisticAdmin(admin.ModelAdmin):
    list_display = ["version", "level", "group_key", "feature", "median", "mad", "row_count",
                    "fallback_level"]
    list_filter = ["level"]
    list_select_related = ["version__fleet"]
    raw_id_fields = ["version"]
    search_fields = ["feature", "group_key"]
    show_full_result_count = False
