"""Template filters for the explanation panel: data for templates to render, never HTML."""
from __future__ import annotations

import math
import re

from django import template

from explanations.narrative import fmt

register = template.Library()

MAD_TO_SIGMA = 1.4826


@register.filter
def num(value) -> str:
    """A number as narratives print it (explanations.narrative.fmt): 22.1, -95, 0.0271."""
    try:
        return fmt(float(value))
    except (TypeError, ValueError):
        return "–"


@register.filter
def narrative_blocks(text: str) -> list[dict]:
    """A narrative as blocks: {"kind": "p", "text"} or {"kind": "list", "title", "items"}. Paragraphs are
    separated by blank lines; a paragraph whose lines start with "- " (after an optional title line
    ending in ":") is a list."""
    blocks = []
    for chunk in re.split(r"\n\s*\n", (text or "").strip()):
        lines = [line.strip() for line in chunk.splitlines() if line.strip()]
        if not lines:
            continue
        title = lines[0] if lines[0].endswith(":") and len(lines) > 1 else ""
        body = lines[1:] if title else lines
        items = [re.sub(r"^([-*\u2022]|\d+[.)])\s+", "", line) for line in body]
        if all(re.match(r"^([-*\u2022]|\d+[.)])\s+", line) for line in body):
            blocks.append({"kind": "list", "title": title, "items": items})
        else:
            blocks.append({"kind": "p", "text": " ".join(lines)})
    return blocks


@register.filter
def contribution_bars(explanation, limit: int = 8) -> list[dict]:
    """The largest per-metric contributions as bars: {metric, label, contribution, share, width (0-100, of
    the largest |contribution|), up (pushes the score up)}; at most `limit`, |contribution| descending."""
    attributions = getattr(explanation, "attributions", None) or {}
    labels = (getattr(explanation, "payload", None) or {}).get("metric_labels", {})
    entries = [m for m in attributions.get("metrics", []) if _finite(m.get("contribution"))][:int(limit)]
    largest = max((abs(m["contribution"]) for m in entries), default=0.0) or 1.0
    return [{"metric": m["metric"], "label": labels.get(m["metric"], m["metric"].replace("_", " ")),
             "contribution": m["contribution"], "share": m.get("share", 0.0),
             "width": round(100 * abs(m["contribution"]) / largest, 1), "up": m["contribution"] >= 0}
            for m in entries]


@register.filter
def metric_rows(anomaly) -> list[dict]:
    """The anomaly's top metrics for a table: {metric, label, aspect, value, typical, spread, z, level, unit}."""
    schema = {m["name"]: m for m in anomaly.fleet.metric_schema} if getattr(anomaly, "fleet", None) else {}
    from explanations.payload import ASPECTS, metric_label

    rows = []
    for entry in anomaly.top_metrics or []:
        if not isinstance(entry, dict) or not entry.get("metric"):
            continue
        metric = entry["metric"]
        feature = entry.get("feature") or metric
        suffix = feature[len(metric):] if feature.startswith(metric) else ""
        mad = entry.get("mad")
        rows.append({
            "metric": metric, "label": metric_label(metric, schema.get(metric)),
            "aspect": entry.get("kind") or ASPECTS.get(suffix, "reading").format(window="rolling", lag="a day",
                                                                                  bucket="hour"),
            "value": entry.get("value"), "typical": entry.get("typical"),
            "spread": MAD_TO_SIGMA * mad if _finite(mad) else None, "z": entry.get("z"),
            "level": entry.get("level", ""), "unit": schema.get(metric, {}).get("unit", ""),
        })
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
