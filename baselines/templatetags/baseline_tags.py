"""Template filters for the baseline, proposal and audit pages."""

from __future__ import annotations

import datetime as dt
import json
import math

from django import template
from django.utils.html import escape
from django.utils.safestring import mark_safe

from baselines.selectors import group_label as _group_label

register = template.Library()


def _number(value) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@register.filter
def stat(value) -> str:
    """A statistic with 4 significant digits ("12.35", "0.003142", "1.2e+05"); "–" when missing."""
    number = _number(value)
    return "–" if number is None else f"{number:.4g}"


@register.filter
def signed(value) -> str:
    """A change with its sign and 4 significant digits ("+1.25", "−0.5" with a real minus, "0");
    "–" when missing."""
    number = _number(value)
    if number is None:
        return "–"
    if number == 0:
        return "0"
    return f"{number:+.4g}".replace("-", "−")


@register.filter
def share(value) -> str:
    """A fraction as a whole percentage ("83 %"); "–" when missing."""
    number = _number(value)
    return "–" if number is None else f"{number * 100:.0f} %"


@register.filter
def breakable(value) -> str:
    """An identifier such as "battery_level_cohort_norm" that may wrap after its underscores (<wbr>) instead
    of in the middle of a word."""
    return mark_safe(escape(value).replace("_", "_<wbr>"))


@register.filter
def group_label(value) -> str:
    """A group key (dict, or JSON text as stored on statistics) as "Samsung · Galaxy S21 · 14"."""
    if isinstance(value, dict):
        value = json.dumps(value)
    return _group_label(value)


@register.filter
def iso_time(value) -> str:
    """An ISO 8601 time (as stored in JSON) as "2024-03-14 09:30 UTC"; the text itself when it is not one."""
    if not value:
        return "–"
    try:
        moment = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return f"{moment:%Y-%m-%d %H:%M} UTC"


@register.filter
def changes(event) -> list[tuple[str, str, str]]:
    """[(key, before, after)] of an audit event's before/after dicts, one row per key either side names,
    values as compact JSON ("–" where a side lacks the key)."""
    before = event.before if isinstance(event.before, dict) else {}
    after = event.after if isinstance(event.after, dict) else {}
    keys = list(dict.fromkeys([*before, *after]))

    def show(side: dict, key: str) -> str:
        if key not in side:
            return "–"
        value = side[key]
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)

    return [(key, show(before, key), show(after, key)) for key in keys]


@register.filter
def compact_json(value) -> str:
    """A JSON value on one line ("{}" shown as "–"), for before/after cells."""
    if value in (None, {}, []):
        return "–"
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


# Evidence keys the engine writes, in the order a reader wants them; other keys follow, labelled by name.
_EVIDENCE_LABELS = {
    "n_reviewed": "Reviewed anomalies",
    "n_false_positive": "False positives",
    "n_true_positive": "True positives",
    "n_not_sure": "Not sure",
    "share": "False-positive share",
    "false_positive_share": "False-positive share",
    "typical_deviation": "Typical deviation",
    "median_deviation": "Typical deviation",
    "typical_abs_z": "Typical |robust z|",
    "typical_z": "Typical robust z",
    "direction_share": "Same direction",
    "direction": "Direction",
    "median": "Baseline median",
    "mad": "Baseline MAD",
    "current": "Current value",
}


def _evidence_value(key: str, value) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else ("yes" if value else "no")
    if isinstance(value, (int, float)):
        if "share" in key or key.endswith("_rate"):
            return share(value)
        return f"{value:,}" if isinstance(value, int) else stat(value)
    if isinstance(value, (dict, list)):
        return compact_json(value)
    return str(value)


@register.filter
def evidence_rows(evidence) -> list[tuple[str, str]]:
    """[(label, formatted value)] of a proposal's evidence dict: known counts first, then any other key."""
    if not isinstance(evidence, dict):
        return []
    keys = [k for k in _EVIDENCE_LABELS if k in evidence] + sorted(
        k for k in evidence if k not in _EVIDENCE_LABELS
    )
    return [
        (_EVIDENCE_LABELS.get(k) or k.replace("_", " ").capitalize(), _evidence_value(k, evidence[k]))
        for k in keys
    ]
