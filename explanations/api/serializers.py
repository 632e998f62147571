from rest_framework import serializers

from explanations.choices import Provider
from explanations.models import Explanation


class ExplanationSerializer(serializers.ModelSerializer):
    """An explanation as stored, plus what a reviewer reads (narrative, shown_provider)."""

    narrative = serializers.CharField(source="shown_text", read_only=True)
    shown_provider = serializers.CharField(read_only=True)

    class Meta:
        model = Explanation
        fields = ["id", "anomaly", "status", "provider", "model", "narrative", "shown_provider", "verdict",
                  "validation", "text", "fallback_text", "error", "prompt", "payload", "attributions",
                  "attribution_method", "latency_ms", "attribution_ms", "created_at", "finished_at"]
        read_only_fields = fields


class ExplanationGenerateSerializer(serializers.Serializer):
    anomaly = serializers.IntegerField(min_value=1, max_value=2**63 - 1)
    provider = serializers.ChoiceField(choices=Provider.choices, required=False, allow_null=True)
    regenerate = serializers.BooleanField(default=False)


class RunExplainSerializer(serializers.Serializer):
    run = serializers.IntegerField(min_value=1, max_value=2**63 - 1)
    provider = serializers.ChoiceField(choices=Provider.choices, required=False, allow_null=True)
    regenerate = serializers.BooleanField(default=False)
