"""Reads for the baseline, proposal and audit pages and API: statistics of a baseline version, the diff
between two versions, version history, the proposal queue and the audit log."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from django.db.models import Case, Count, IntegerField, OuterRef, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce

from detection.models import DEVICE_ATTRIBUTE_COLUMNS, AuditEvent, Fleet

from .choices import ProposalStatus
from .engine import LEVELS
from .models import BaselineProposal, BaselineStatistic, BaselineVersion

# Levels in the engine's order (global first); a level the engine does not know sorts last.
_LEVEL_ORDER = Case(
    *(When(level=lv, then=Value(i)) for i, lv in enumerate(LEVELS)),
    default=Value(len(LEVELS)),
    output_field=IntegerField(),
)

# Two statistics are "the same" when they differ by less than this relative amount (float noise from
# re-serialising a version must not show up as a change).
DIFF_REL_TOLERANCE = 1e-9


def level_sort_key(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else len(LEVELS)


def group_label(group_key: str) -> str:
    """A BaselineStatistic.group_key (JSON object text) as "Samsung · Galaxy S21 · 14"; "all devices" for {}.

    A key that is not JSON is shown as stored."""
    try:
        parts = json.loads(group_key)
    except (TypeError, ValueError):
        return str(group_key)
    if not isinstance(parts, dict):
        return str(group_key)
    # Device attributes in their natural order (PostgreSQL's jsonb does not keep the order keys came in).
    order = {column: i for i, column in enumerate([*DEVICE_ATTRIBUTE_COLUMNS, "external_id"])}
    keys = sorted(parts, key=lambda k: (order.get(k, len(order)), k))
    return " · ".join(str(parts[k]) for k in keys) or "all devices"


# --- baseline versions -------------------------------------------------------------------------------


def active_baseline(*, fleet: Fleet) -> BaselineVersion | None:
    """The fleet's active baseline version, or None."""
    return BaselineVersion.objects.filter(fleet=fleet, is_active=True).select_related("created_by").first()


def baseline_version_list(*, fleet: Fleet) -> list[BaselineVersion]:
    """The fleet's baseline versions, newest first, with their creators and statistic counts (one query)."""
    return list(
        BaselineVersion.objects.filter(fleet=fleet)
        .select_related("created_by")
        .annotate(n_statistics=Count("statistics"))
        .order_by("-number")
    )


def baseline_version_get(*, fleet: Fleet, number: int) -> BaselineVersion | None:
    """Version number of fleet, or None (also for a number outside the database's range)."""
    if not 0 < number < 2**31:
        return None
    return BaselineVersion.objects.filter(fleet=fleet, number=number).select_related("created_by").first()


def baseline_statistics(
    *, version: BaselineVersion, level: str = "", feature: str = ""
) -> QuerySet[BaselineStatistic]:
    """The statistics of version, optionally of one level and/or one feature, ordered by level (global
    first), group and feature. Lazy: paginate it (a version holds levels x groups x features rows)."""
    rows = BaselineStatistic.objects.filter(version=version)
    if level:
        rows = rows.filter(level=level)
    if feature:
        rows = rows.filter(feature=feature)
    return rows.annotate(level_order=_LEVEL_ORDER).order_by("level_order", "group_key", "feature", "id")


def baseline_facets(*, version: BaselineVersion) -> dict[str, list[str]]:
    """The levels (engine order) and features (sorted) that version holds statistics for: two queries on
    the (version, level, feature) index."""
    stats = BaselineStatistic.objects.filter(version=version).order_by()
    levels = sorted(stats.values_list("level", flat=True).distinct(), key=lambda lv: (level_sort_key(lv), lv))
    features = sorted(stats.values_list("feature", flat=True).distinct())
    return {"level": levels, "feature": features}


@dataclass
class DiffRow:
    """One (level, group, feature) whose statistics differ between two versions. A row only in the new
    version has no *_before values; a row only in the old one no *_after values."""

    level: str
    group_key: str
    feature: str
    median_before: float | None
    median_after: float | None
    mad_before: float | None
    mad_after: float | None
    status: str  # "changed", "added" or "removed"

    @property
    def group(self) -> str:
        return group_label(self.group_key)

    @property
    def median_change(self) -> float | None:
        if self.median_before is None or self.median_after is None:
            return None
        return self.median_after - self.median_before

    @property
    def mad_change(self) -> float | None:
        if self.mad_before is None or self.mad_after is None:
            return None
        return self.mad_after - self.mad_before

    @property
    def mad_ratio(self) -> float | None:
        """MAD after / before (how much the spread was scaled); None when before is 0 or missing."""
        if not self.mad_before or self.mad_after is None:
            return None
        return self.mad_after / self.mad_before


@dataclass
class BaselineDiff:
    """What changed from version old to version new: rows (changed, added and removed only, in level,
    group, feature order) and counts {"changed", "added", "removed", "unchanged", "compared"}."""

    old: BaselineVersion
    new: BaselineVersion
    rows: list[DiffRow] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=DIFF_REL_TOLERANCE, abs_tol=1e-12)


def baseline_version_diff(
    *, old: BaselineVersion, new: BaselineVersion, level: str = "", feature: str = ""
) -> BaselineDiff:
    """Compare the statistics of two versions of one fleet row by row, keyed by (level, group_key, feature).

    A row is "changed" when its median or MAD differs by more than DIFF_REL_TOLERANCE (relative), "added"
    when only new has it, "removed" when only old has it. level / feature restrict the comparison.
    Two queries (one per version), O(rows) memory: 5 levels x 1,000 groups x 30 features is 150k rows
    per version, a few hundred ms. Raises ValueError when the versions belong to different fleets.
    """
    if old.fleet_id != new.fleet_id:
        raise ValueError(f"versions of different fleets: v{old.number} and v{new.number}")

    def load(version: BaselineVersion) -> dict[tuple[str, str, str], tuple[float | None, float | None]]:
        rows = BaselineStatistic.objects.filter(version=version).order_by()
        if level:
            rows = rows.filter(level=level)
        if feature:
            rows = rows.filter(feature=feature)
        return {
            (lv, g, f): (med, mad)
            for lv, g, f, med, mad in rows.values_list(
                "level", "group_key", "feature", "median", "mad"
            ).iterator(chunk_size=5000)
        }

    before, after = load(old), load(new)
    rows: list[DiffRow] = []
    unchanged = 0
    for key in before.keys() | after.keys():
        b, a = before.get(key), after.get(key)
        if b is not None and a is not None:
            if _same(b[0], a[0]) and _same(b[1], a[1]):
                unchanged += 1
                continue
            status = "changed"
        else:
            status = "added" if b is None else "removed"
        b, a = b or (None, None), a or (None, None)
        rows.append(
            DiffRow(
                *key, median_before=b[0], median_after=a[0], mad_before=b[1], mad_after=a[1], status=status
            )
        )
    rows.sort(key=lambda r: (level_sort_key(r.level), r.level, r.group_key, r.feature))
    counts = {s: sum(r.status == s for r in rows) for s in ("changed", "added", "removed")}
    counts.update(unchanged=unchanged, compared=len(before.keys() | after.keys()))
    return BaselineDiff(old=old, new=new, rows=rows, counts=counts)


# --- proposals ---------------------------------------------------------------------------------------


def proposal_list(*, fleet: Fleet | None = None, status: str = "") -> QuerySet[BaselineProposal]:
    """Proposals, newest first, optionally of one fleet and status, with everything a list row shows:
    active_number is the number of the fleet's active baseline version (None without one), so a row can
    say that its proposal was made against an earlier one (baselines.services.proposal_staleness)."""
    active = BaselineVersion.objects.filter(fleet=OuterRef("fleet"), is_active=True).values("number")[:1]
    proposals = BaselineProposal.objects.select_related(
        "fleet",
        "baseline_version",
        "proposed_by",
        "decided_by",
        "result_baseline_version",
        "result_model_version",
    ).annotate(active_number=Subquery(active))
    if fleet is not None:
        proposals = proposals.filter(fleet=fleet)
    if status:
        proposals = proposals.filter(status=status)
    return proposals


def proposal_get(*, pk: int) -> BaselineProposal | None:
    """One proposal with its relations, or None (also for an id outside the database's range)."""
    if not 0 < pk < 2**63:
        return None
    return proposal_list().filter(pk=pk).first()


def proposal_status_counts(*, fleet: Fleet | None = None) -> dict[str, int]:
    """{status: count} for every ProposalStatus (zeros included), one query."""
    rows = BaselineProposal.objects.filter(**({"fleet": fleet} if fleet is not None else {})).order_by()
    counted = dict(rows.values_list("status").annotate(n=Count("pk")))
    return {value: counted.get(value, 0) for value in ProposalStatus.values}


def fleet_baseline_summaries() -> list[Fleet]:
    """Every fleet with active_version (its active baseline version number, or None), n_versions and
    n_pending (pending proposals); one query whatever the number of fleets."""

    def count(queryset: QuerySet) -> Coalesce:
        counted = queryset.order_by().values("fleet").annotate(n=Count("pk")).values("n")
        return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))

    versions = BaselineVersion.objects.filter(fleet=OuterRef("pk"))
    return list(
        Fleet.objects.annotate(
            active_version=Subquery(versions.filter(is_active=True).values("number")[:1]),
            n_versions=count(versions),
            n_pending=count(
                BaselineProposal.objects.filter(fleet=OuterRef("pk"), status=ProposalStatus.PENDING)
            ),
        ).order_by("name")
    )


# --- audit log ---------------------------------------------------------------------------------------


def audit_event_list() -> QuerySet[AuditEvent]:
    """Every audit event of every app, newest first. Rows carry their own fleet_name and actor_label
    copies, so no join is needed to show them."""
    return AuditEvent.objects.order_by("-created_at", "-id")


def audit_facets() -> dict[str, list[str]]:
    """Choices for the audit filters: the fleet names and actions that occur in the log (two queries)."""
    events = AuditEvent.objects.order_by()
    fleets = sorted(n for n in events.values_list("fleet_name", flat=True).distinct() if n)
    actions = sorted(events.values_list("action", flat=True).distinct())
    return {"fleet": fleets, "action": actions}
