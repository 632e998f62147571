"""Stored explanations of anomalies: attributions, the narrative, its validation and what was shown.

One row per generation. The newest ready row of an anomaly (for a provider) is its cached explanation;
regenerating adds a row, so earlier narratives stay for comparison. At most one row per anomaly is
pending or running at a time (a database constraint), which makes a double click or a task delivered
twice harmless.
"""
from __future__ import annotations

from django.conf import settings
from django.db import models

from .choices import AttributionMethod, ExplanationStatus, Provider, Verdict

OPEN_STATUSES = (ExplanationStatus.PENDING, ExplanationStatus.RUNNING)


class Explanation(models.Model):
    """An anomaly's explanation.

    provider/model: who was asked to write (model: the LLM's name, or builtin-writer-1). prompt: what an
    LLM was sent. text: what the provider answered ("" when it failed). verdict: accepted, rejected
    (validation failed, reasons in validation) or failed (no answer, reason in error). fallback_text: the
    built-in writer's narrative, shown when the verdict is not accepted. payload: the facts the narrative
    was written from (explanations.payload.ExplanationPayload.as_dict()). attributions: the per-metric
    and per-feature contributions (explanations.attribution.Attribution.as_dict(), plus "reproduced":
    the rebuilt score against the stored one). latency_ms: the provider's time (retries included);
    attribution_ms: rebuilding rows and SHAP.
    """

    anomaly = models.ForeignKey("detection.AnomalyResult", on_delete=models.CASCADE, related_name="explanations",
                                db_index=False)  # leads the index below
    status = models.CharField(max_length=10, choices=ExplanationStatus.choices, default=ExplanationStatus.PENDING)
    provider = models.CharField(max_length=20, choices=Provider.choices, default=Provider.BUILTIN)
    model = models.CharField(max_length=200, blank=True)
    prompt = models.TextField(blank=True)
    text = models.TextField(blank=True)
    verdict = models.CharField(max_length=10, choices=Verdict.choices, blank=True)
    validation = models.JSONField(default=dict, blank=True)
    fallback_text = models.TextField(blank=True)
    error = models.TextField(blank=True)
    payload = models.JSONField(default=dict, blank=True)
    attributions = models.JSONField(default=dict, blank=True)
    attribution_method = models.CharField(max_length=20, choices=AttributionMethod.choices, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    attribution_ms = models.FloatField(null=True, blank=True)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["anomaly", "provider", "status"], name="explanation_anomaly")]
        constraints = [
            models.UniqueConstraint(fields=["anomaly"], condition=models.Q(status__in=OPEN_STATUSES),
                                    name="one_open_explanation_per_anomaly"),
        ]

    def __str__(self) -> str:
        return f"explanation {self.pk} of anomaly {self.anomaly_id} ({self.provider}, {self.status})"

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def shown_text(self) -> str:
        """What a reviewer reads: the provider's text when validated, else the built-in writer's."""
        return self.text if self.verdict == Verdict.ACCEPTED else (self.fallback_text or self.text)

    @property
    def shown_provider(self) -> str:
        return self.provider if self.verdict == Verdict.ACCEPTED else Provider.BUILTIN

    @property
    def provider_short(self) -> str:
        """The asked provider in two words: "LLM" or "built-in writer"."""
        return "LLM" if self.provider == Provider.LLM else "built-in writer"

    @property
    def shown_provider_label(self) -> str:
        label = Provider(self.shown_provider).label
        return f"{label} · {self.model}" if self.shown_provider == Provider.LLM and self.model else label
