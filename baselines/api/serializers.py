"""Serializers of the feedback-loop API: baseline proposals, their decisions and impact previews, audit
events, and baseline rollback. Baseline versions themselves use detection.api's BaselineVersionSerializer."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from rest_framework import serializers

from detection.models import AuditEvent, Fleet

from ..forms import COMMENT_MAX
from ..models import BaselineProposal


class BaselineProposalSerializer(serializers.ModelSerializer):
    fleet = serializers.SlugRelatedField(slug_field="name", read_only=True)
    baseline_version = serializers.SlugRelatedField(slug_field="number", read_only=True)
    proposed_by = serializers.SlugRelatedField(slug_field=get_user_model().USERNAME_FIELD, read_only=True)
    decided_by = serializers.SlugRelatedField(slug_field=get_user_model().USERNAME_FIELD, read_only=True)
    result_baseline_version = serializers.SlugRelatedField(slug_field="number", read_only=True)
    result_model_version = serializers.SlugRelatedField(slug_field="version", read_only=True)

    class Meta:
        model = BaselineProposal
        fields = [
            "id",
            "fleet",
            "baseline_version",
            "status",
            "kind",
            "level",
            "group_key",
            "feature",
            "adjustment",
            "learning_rate",
            "reason",
            "evidence",
            "impact",
            "source",
            "proposed_by",
            "decided_by",
            "decided_at",
            "decision_comment",
            "result_baseline_version",
            "result_model_version",
            "result_run",
            "error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class ProposalDecisionSerializer(serializers.Serializer):
    """POST /proposals/{id}/approve/ or /reject/: an optional comment (audited)."""

    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=COMMENT_MAX)


class ProposalsDecideSerializer(serializers.Serializer):
    """POST /proposals/decide/: approve or reject several pending proposals of one fleet, all or none."""

    proposals = serializers.ListField(child=serializers.IntegerField(min_value=1, max_value=2**63 - 1),
                                      min_length=1, max_length=100, help_text="proposal ids, 1 to 100")
    decision = serializers.ChoiceField(choices=["approve", "reject"])
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=COMMENT_MAX)


class ProposalSuggestSerializer(serializers.Serializer):
    """POST /proposals/suggest/: ask the engine for adjustments of one fleet now."""

    fleet = serializers.SlugRelatedField(slug_field="name", queryset=Fleet.objects.all())


class ProposalImpactSerializer(serializers.Serializer):
    """What approving would change, from re-scoring the affected data without persisting anything."""

    before_anomalies = serializers.IntegerField(help_text="anomalies among the re-scored rows now")
    after_anomalies = serializers.IntegerField(help_text="anomalies among them with the adjusted baseline")
    cleared = serializers.IntegerField(help_text="anomalies that would become normal")
    cleared_true_positive = serializers.IntegerField(help_text="of the cleared, those a reviewer confirmed")
    new = serializers.IntegerField(help_text="normal rows that would become anomalies")
    scored_rows = serializers.IntegerField()
    computed_at = serializers.CharField(help_text="ISO 8601 time of the preview")


class AuditEventSerializer(serializers.ModelSerializer):
    fleet = serializers.CharField(source="fleet_name", read_only=True)
    actor = serializers.CharField(source="actor_label", read_only=True)
    action_label = serializers.CharField(read_only=True)

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "fleet",
            "actor",
            "action",
            "action_label",
            "target_type",
            "target_id",
            "target_label",
            "before",
            "after",
            "reason",
        ]
        read_only_fields = fields


class BaselineRollbackSerializer(serializers.Serializer):
    """POST /baseline-versions/{id}/rollback/: make a new active version carrying version id's statistics."""

    reason = serializers.CharField(max_length=COMMENT_MAX, help_text="why; goes into the audit log")
