from django.contrib import admin
from simple_history.admin import SimpleHistoryAdmin

from .models import BaselineProposal, BaselineStatistic, BaselineVersion


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


@admin.register(BaselineProposal)
class BaselineProposalAdmin(admin.ModelAdmin):
    """Read-mostly: proposals are created, decided and applied by baselines.services (audited), never edited
    here; decide them on the proposal page or with the API. Only deleting a stray proposal is allowed."""

    list_display = ["__str__", "fleet", "status", "kind", "level", "feature", "adjustment", "source",
                    "created_at", "decided_by"]
    list_filter = ["status", "kind", "source", "fleet"]
    list_select_related = ["fleet", "decided_by"]
    search_fields = ["feature", "reason", "decision_comment"]
    date_hierarchy = "created_at"
    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
