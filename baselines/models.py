"""Baseline versions: numbered, complete sets of robust statistics (median, MAD) per level."""
from __future__ import annotations

from django.conf import settings
from django.db import models
from simple_history.models import HistoricalRecords


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
