"""Validation of narratives against their payload. Django-free.

A narrative passes when
1. every metric it names is one of the payload's metrics (its top metrics and largest contributions):
   another metric of the fleet, a snake_case identifier that is no payload name, or a common telemetry
   term (GPS, bluetooth, humidity...) that no payload metric covers is an invented metric;
2. every number it states matches a payload number within the rounding it was written with (a number
   written with d decimals may differ by half a unit in the d-th decimal; the sign is not compared,
   since "fell by 44.4 MB" states -44.4 as 44.4; a percentage may state a share); and
3. it mentions the top metric (the most abnormal one by |robust z|).
Numbers inside the payload's own names (device ids, "Galaxy S21", "Android 14", the timestamp) are
not numbers the narrative states, and list markers ("1.") are not either.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .payload import ExplanationPayload

# Telemetry terms that name a metric without being one of the fleet's: term -> the payload domains that
# may use it (empty: only a payload metric whose own name or label contains the term).
GENERIC_METRIC_TERMS = {
    "gps": (), "location accuracy": (), "bluetooth": (), "screen brightness": (), "brightness": (),
    "display": (), "camera": (), "humidity": (), "fan speed": (), "rpm": (), "disk i/o": (), "packet loss": (),
    "latency": ("network",), "bandwidth": ("network",), "cpu": ("compute",), "processor": ("compute",),
    "memory": ("compute",), "ram": ("compute",), "storage": ("storage",), "disk": ("storage",),
    "battery": ("battery",), "temperature": ("thermal", "battery"), "wi-fi": ("wifi",), "wifi": ("wifi",),
    "signal strength": ("wifi",), "rssi": ("wifi",), "network": ("network", "wifi"), "traffic": ("network",),
    "voltage": ("electrical",), "pressure": ("hydraulic",), "flow rate": ("hydraulic",),
    "vibration": ("vibration",), "accelerometer": ("vibration",),
}
# Extra ways to say a metric's name, by metric name (beyond its name, label and their spacings).
METRIC_ALIASES = {
    "battery_level": ("battery charge", "charge level"),
    "battery_temp": ("battery temperature", "battery temp"),
    "storage_free": ("free storage", "storage space", "free space", "storage"),
    "cpu_pct": ("cpu load", "cpu usage", "cpu", "processor load", "processor"),
    "memory_pct": ("memory usage", "memory use", "memory", "ram"),
    "network_rx_mb": ("download traffic", "downloaded data", "data received", "received data", "download"),
    "network_tx_mb": ("upload traffic", "uploaded data", "data sent", "sent data", "upload"),
    "wifi_rssi": ("wi-fi signal", "wifi signal", "wi-fi signal strength", "signal strength", "rssi", "wi-fi"),
    "volume_flow_rate_rms": ("volume flow rate", "flow rate", "flow"),
    "accelerometer1_rms": ("accelerometer 1",),
    "accelerometer2_rms": ("accelerometer 2",),
}
_NUMBER = re.compile(r"(?<![\w.])([-+\u2212]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
_SNAKE = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")
_LIST_MARKER = re.compile(r"(?m)^\s*\d+[.)]\s")


@dataclass
class ValidationResult:
    """valid: all checks passed; reasons: one sentence per failure; numbers: [{"text", "value",
    "matched"}] for every number found; metrics: the payload and fleet metrics the text names."""

    valid: bool
    reasons: list[str] = field(default_factory=list)
    numbers: list[dict] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"valid": self.valid, "reasons": list(self.reasons), "numbers": list(self.numbers),
                "metrics": list(self.metrics)}

    @property
    def summary(self) -> str:
        return "valid" if self.valid else "; ".join(self.reasons)


def validate_narrative(text: str, payload: ExplanationPayload) -> ValidationResult:
    """Check `text` against `payload` (see the module docstring). Never raises for any text."""
    if not text or not text.strip():
        return ValidationResult(False, ["the narrative is empty"])
    reasons: list[str] = []
    lowered = text.lower().replace("\u2011", "-")
    allowed_metrics = set(payload.metrics())

    # 1. Metrics: the fleet's metrics by their aliases (at each position the longest alias wins).
    pattern, owner = _alias_pattern(tuple(sorted(payload.metric_labels.items())), tuple(sorted(allowed_metrics)))
    named: list[str] = []
    for match in pattern.finditer(lowered):
        metric = owner[match.group(0)]
        if metric not in named:
            named.append(metric)
    # The payload's own names (device, fleet, cohort, device attributes) are not metrics, even when
    # they look like one: a device "realTraffic/TravelTime_451" holds the snake_case "traveltime_451",
    # a fleet "traffic" the telemetry term "traffic".
    masked = _blank_out(pattern.sub(" ", lowered), _own_names(payload))
    for metric in named:
        if metric not in allowed_metrics:
            reasons.append(f"names {payload.label_of(metric)} ({metric}), which is not among this anomaly's metrics")
    known_names = {*payload.metric_labels, *(m.feature for m in payload.top_metrics),
                   *(f.get("column", "") for f in payload.attribution.get("features", [])),
                   *(f.get("feature", "") for f in payload.attribution.get("features", []))}
    for token in dict.fromkeys(_SNAKE.findall(masked)):
        if token not in known_names:
            reasons.append(f"names {token!r}, which is not a metric of this anomaly")
    payload_domains = {m.domain for m in payload.top_metrics} | {
        c.get("domain", "") for c in payload.contributions()}
    payload_words = " ".join(f"{m} {payload.label_of(m)}".lower().replace("_", " ") for m in allowed_metrics)
    for term in dict.fromkeys(m.group(0) for m in _GENERIC_PATTERN.finditer(masked)):
        if term in payload_words or payload_domains.intersection(GENERIC_METRIC_TERMS[term]):
            continue
        reasons.append(f"names {term}, which is not a metric of this anomaly")

    # 2. Numbers, outside the payload's own names and the timestamp.
    scrubbed = _scrub(text, payload)
    allowed = np.abs(np.asarray(payload_numbers(payload), dtype="float64"))
    numbers = []
    for match in _NUMBER.finditer(scrubbed):
        sign, whole, fraction = match.groups()
        value = float(whole.replace(",", "") + (fraction or ""))
        value = -value if sign in ("-", "\u2212") else value
        decimals = len(fraction) - 1 if fraction else 0
        matched = _match(value, decimals, allowed)
        numbers.append({"text": match.group(0), "value": value, "matched": matched})
        if matched is None:
            reasons.append(f"states {match.group(0).strip()}, which matches no number of the payload")

    # 3. The top metric.
    top = payload.top_metric
    if top is not None and top.metric not in named:
        reasons.append(f"does not mention the top metric, {top.label} ({top.metric})")
    return ValidationResult(not reasons, reasons, numbers, named)


def payload_numbers(payload: ExplanationPayload) -> list[float]:
    """Every number a narrative may state: scores, threshold, each top metric's value, typical, spread,
    z-score, ratio, the typical band's ends and the gap to typical, contributions and their shares in
    per cent, versions, the feature windows, the timestamp's parts and, for an ensemble, how many of
    its detectors flagged the row and how many there are."""
    out = [payload.anomaly_score, payload.threshold, payload.model_version, payload.baseline_version,
           len(payload.top_metrics)]
    if payload.votes:
        out += [sum(bool(v) for v in payload.votes.values()), len(payload.votes)]
    for m in payload.top_metrics:
        out += [m.value, m.typical, m.spread, m.z, m.ratio]
        if m.typical is not None and m.spread is not None:
            out += [m.typical - m.spread, m.typical + m.spread]
        if m.value is not None and m.typical is not None:
            out.append(m.value - m.typical)
    attribution = payload.attribution or {}
    out += [attribution.get("base_value"), attribution.get("output_value")]
    for c in attribution.get("metrics", []):
        out += [c.get("contribution"), 100 * c.get("share", 0.0)]
    for part in (attribution.get("components") or {}).values():
        out += [part.get("score"), part.get("contribution")]
    for words in (payload.windows or {}).values():
        out += _durations(words)
    ts = pd.Timestamp(payload.timestamp)
    out += [ts.year, ts.month, ts.day, ts.hour, ts.minute, ts.second]
    return [float(v) for v in out if v is not None and math.isfinite(float(v))]


_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}


def _durations(words: str) -> list[float]:
    """A window in words ("12-hour", "1 day", "hour") in every unit a text may use: 12 hours is 0.5 days,
    720 minutes and 43200 seconds."""
    match = re.search(r"(\d+(?:\.\d+)?)?[ -]?(second|minute|hour|day|week)", words)
    if not match:
        return []
    seconds = float(match.group(1) or 1) * _UNIT_SECONDS[match.group(2)]
    return [seconds / size for size in _UNIT_SECONDS.values()]


def metric_aliases(metric: str, label: str) -> list[str]:
    """Lower-case ways to name a metric: its name, spaced name, label, label with digits split off."""
    spaced = metric.replace("_", " ")
    aliases = {metric.lower(), spaced.lower(), label.lower(), label.lower().replace("_", " "),
               re.sub(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])", " ", spaced.lower()),
               re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label).lower(), *METRIC_ALIASES.get(metric, ())}
    return sorted((a for a in aliases if a), key=len, reverse=True)


_GENERIC_PATTERN = re.compile(r"(?<![\w-])(?:" + "|".join(
    re.escape(t) for t in sorted(GENERIC_METRIC_TERMS, key=len, reverse=True)) + r")(?![\w-])")


@functools.lru_cache(maxsize=64)
def _alias_pattern(metric_labels: tuple, allowed: tuple) -> tuple[re.Pattern, dict[str, str]]:
    """One pattern matching every alias of a fleet's metrics (longest first) and {alias: metric};
    cached per fleet and payload metric set."""
    table = _alias_table(dict(metric_labels), set(allowed))
    owner = {alias: metric for alias, metric in table}
    alternatives = "|".join(re.escape(a) for a in sorted(owner, key=len, reverse=True)) or r"(?!x)x"
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])"), owner


def _alias_table(metric_labels: dict, allowed: set) -> list[tuple[str, str]]:
    table = [(alias, metric) for metric, label in metric_labels.items()
             for alias in metric_aliases(metric, label)]
    # An alias two metrics share ("battery" for level and temperature) names neither for sure: keep the
    # payload's, or drop it.
    owners: dict[str, set[str]] = {}
    for alias, metric in table:
        owners.setdefault(alias, set()).add(metric)
    result = []
    for alias, metric in table:
        if len(owners[alias]) > 1:
            in_payload = owners[alias] & allowed
            if len(in_payload) != 1 or metric not in in_payload:
                continue
        result.append((alias, metric))
    return sorted(set(result), key=lambda item: -len(item[0]))


def _own_names(payload: ExplanationPayload) -> list[str]:
    """The payload's names that are not metrics (device, fleet, cohort, device attributes, an
    ensemble's detectors), longest first."""
    names = [payload.device, payload.fleet, payload.cohort_label,
             *[str(v) for v in (payload.device_attributes or {}).values() if v], *(payload.votes or {})]
    return sorted({n for n in names if n}, key=len, reverse=True)


def _scrub(text: str, payload: ExplanationPayload) -> str:
    """The text without list markers, the payload's names and the anomaly's timestamp."""
    ts = pd.Timestamp(payload.timestamp)
    names = [*_own_names(payload), payload.when, payload.timestamp,
             ts.strftime("%Y-%m-%d %H:%M:%S"), ts.strftime("%Y-%m-%d %H:%M"), ts.strftime("%Y-%m-%dT%H:%M"),
             ts.strftime("%Y-%m-%d"), ts.strftime("%H:%M:%S"), ts.strftime("%H:%M"),
             *[m.level_label for m in payload.top_metrics], *[m.aspect for m in payload.top_metrics],
             *[label for label in payload.metric_labels.values()], *payload.metric_labels,
             *[m.feature for m in payload.top_metrics],
             *[f.get("column", "") for f in payload.attribution.get("features", [])]]
    return _blank_out(_LIST_MARKER.sub(" ", text), sorted({n for n in names if n}, key=len, reverse=True))


def _blank_out(text: str, names: list[str]) -> str:
    """text with every whole occurrence of each name (case-insensitive) replaced by spaces. A name counts
    where it is not glued to a word character (or a decimal point) on either side."""
    lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)  # same length as text
    chars = list(text)
    for name in names:
        needle = name.lower()
        start = lowered.find(needle)
        while start >= 0:
            end = start + len(needle)
            before = lowered[start - 1] if start else " "
            after = lowered[end] if end < len(lowered) else " "
            glued_after = after.isalnum() or after == "_" or (after == "." and lowered[end + 1:end + 2].isdigit())
            if not (before.isalnum() or before in "_.") and not glued_after:
                chars[start:end] = " " * (end - start)
                lowered = lowered[:start] + " " * (end - start) + lowered[end:]
            start = lowered.find(needle, start + 1)
    return "".join(chars)


def _match(value: float, decimals: int, allowed: np.ndarray) -> float | None:
    """The payload number (absolute) closest to |value|, if within half a unit of the last written decimal."""
    if not len(allowed):
        return None
    gaps = np.abs(allowed - abs(value))
    best = int(np.argmin(gaps))
    return float(allowed[best]) if gaps[best] <= 0.5 * 10 ** -decimals + 1e-9 else None
