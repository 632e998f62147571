"""Baseline versions: numbered, complete sets of robust statistics (median, MAD) per level."""
from __future__ import annotations

from django.conf import settings
from django.db import models
from simple_history.models import HistoricalRecords

from .choices import ProposalKind, ProposalSource, ProposalStatus


class BaselineVersion(models.Model):
    """One complete baseline set for a fleet.

    The statistics live in BaselineStatistic rows (for pages and diffs) and in an artifact file
    (read by scoring and drift checks), written atomically with a FORMAT_VERSION and checksum.
    """

    fleet = models.ForeignKey("detection.Fleet", on_delete=models.CASCADE, related_name="baseline_versions")
    number = models.PositiveIntegerField()
    is_active = models.BooleanField(default=False)
    levels = models.JSONField(default=list)
    feature_list = models.JSONField(default=list)
    min_rows = models.PositiveIntegerField(default=25)
    row_count = models.IntegerField(default=0)
    artifact_path = models.CharField(max_length=500, blank=True)
    artifact_checksum = models.CharField(max_length=64, blank=True)
    format_version = models.PositiveIntegerField(default=1)
    source = models.CharField(max_length=30, default="pipeline")
    reason = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    run = models.ForeignKey(
        "detection.PipelineRun", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    valid_from = models.DateTimeField(auto_now_add=True)
    valid_to = models.DateTimeField(null=True, blank=True)
    history = HistoricalRecords()

    class Meta:
        ordering = ["fleet", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["fleet", "number"], name="uniq_baseline_number_per_fleet"),
            models.UniqueConstraint(
                fields=["fleet"], condition=models.Q(is_active=True), name="one_active_baseline_per_fleet"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.fleet.name} baseline v{self.number}"


class BaselineStatistic(models.Model):
    """Median and MAD of one feature for one group at one level (after fall-back)."""

    version = models.ForeignKey(BaselineVersion, on_delete=models.CASCADE, related_name="statistics",
                                db_index=False)  # leads the lookup index below
    level = models.CharField(max_length=20)
    group_key = models.CharField(max_length=300)
    feature = models.CharField(max_length=200)
    median = models.FloatField(null=True)
    mad = models.FloatField(null=True)
    row_count = models.IntegerField(default=0)
    fallback_level = models.CharField(max_length=20, blank=True)

    class Meta:
        indexes = [models.Index(fields=["version", "level", "feature"], name="baseline_stat_lookup")]


class BaselineProposal(models.Model):
    """A proposed change to what "normal" means for one (level, group, feature), made from reviewers'
    false positives (baselines.engine.suggest_baseline_adjustments, or a validated LLM proposal).

    group_key: {column: value} of the group at level, e.g. {"manufacturer": "Samsung", "model": "Galaxy S21",
    "os_version": "14"}; {} at the global level. adjustment: for kind "shift", the change of the median in
    the feature's units; for "mad_scale" the MAD factor; for "contamination" the new contamination; for
    "domain_weight" the new weight of the domain named in feature. evidence: the counts behind it
    (n_reviewed, n_false_positive, share, typical deviation). impact: the last impact preview.
    """

    fleet = models.ForeignKey("detection.Fleet", on_delete=models.CASCADE, related_name="baseline_proposals")
    baseline_version = models.ForeignKey(BaselineVersion, on_delete=models.CASCADE, related_name="proposals")
    status = models.CharField(max_length=20, choices=ProposalStatus.choices, default=ProposalStatus.PENDING)
    kind = models.CharField(max_length=20, choices=ProposalKind.choices, default=ProposalKind.SHIFT)
    level = models.CharField(max_length=20, blank=True)
    group_key = models.JSONField(default=dict, blank=True)
    feature = models.CharField(max_length=200, blank=True)
    adjustment = models.FloatField()
    learning_rate = models.FloatField(default=0.35)
    reason = models.TextField()
    evidence = models.JSONField(default=dict, blank=True)
    impact = models.JSONField(default=dict, blank=True)
    source = models.CharField(max_length=20, choices=ProposalSource.choices, default=ProposalSource.RULES)
    proposed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_comment = models.TextField(blank=True)
    result_baseline_version = models.ForeignKey(BaselineVersion, null=True, blank=True, on_delete=models.SET_NULL,
                                                related_name="+")
    result_model_version = models.ForeignKey("detection.ModelVersion", null=True, blank=True,
                                             on_delete=models.SET_NULL, related_name="+")
    result_run = models.ForeignKey("detection.PipelineRun", null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["fleet", "status"], name="proposal_fleet_status")]

    def __str__(self) -> str:
        where = f"{self.level} {self.group_key or ''} {self.feature}".strip()
        return f"{self.get_kind_display()} {self.adjustment:+g} on {where} ({self.status})"
