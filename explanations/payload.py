"""The explanation payload: every fact a narrative may state about one anomaly. Django-free.

The built-in writer, the LLM prompt and the validator all read this one structure, so a narrative can be
checked against exactly what its writer was given: the metrics it names must be the payload's metrics,
and the numbers it states must be payload numbers (within rounding).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

from detection.ml.scoring import split_votes

MAD_TO_SIGMA = 1.4826
# Engineered-feature suffix -> what the feature measures, in a reviewer's words ({window}/{lag} filled in).
ASPECTS = {
    "": "reading",
    "_roll_mean": "{window} average",
    "_roll_std": "{window} variability",
    "_delta": "change over {lag}",
    "_cohort_norm": "gap to its cohort's median in the same {bucket}",
    "_resid": "jump from its previous {window}",
}
# Labels for metric names that carry no label in their fleet's schema (the synthetic demo fleet's).
DEFAULT_LABELS = {
    "battery_level": "battery level", "battery_temp": "battery temperature", "storage_free": "free storage",
    "cpu_pct": "CPU load", "memory_pct": "memory use", "network_rx_mb": "data received",
    "network_tx_mb": "data sent", "wifi_rssi": "Wi-Fi signal",
}
ALGORITHM_LABELS = {
    "isolation_forest": "Isolation Forest",
    "hybrid": "Isolation Forest with a per-device temporal check",
}


@dataclass(frozen=True)
class MetricFinding:
    """One of the top abnormal metrics (by |robust z|) of an anomaly.

    feature: the engineered feature that was most abnormal (``wifi_rssi_roll_mean``); aspect: what it
    measures in words ("12-hour average"); value and typical in the metric's unit (typical is the
    baseline median at `level`, spread = 1.4826 x MAD, so typical +/- spread covers about 68 % of normal
    samples); z: the robust z-score (value - typical) / spread; ratio: value / typical when both have
    the same sign and typical is not near zero (the "drained 3.1x faster" number), else None.
    """

    metric: str
    label: str
    unit: str
    domain: str
    feature: str
    aspect: str
    value: float | None
    typical: float | None
    spread: float | None
    z: float | None
    level: str
    level_label: str
    ratio: float | None = None

    @property
    def direction(self) -> str:
        if self.z is None or self.z == 0:
            return "at"
        return "above" if self.z > 0 else "below"

    @property
    def suffix(self) -> str:
        return self.feature[len(self.metric):] if self.feature.startswith(self.metric) else ""


@dataclass
class ExplanationPayload:
    """What is known about one anomaly (see the module docstring).

    timestamp: ISO 8601 in UTC. attribution: explanations.attribution.Attribution.as_dict().
    metric_labels: {metric: label} for every metric of the fleet, so validation can tell a payload
    metric from another fleet metric a narrative should not name. windows: the feature windows
    ({"window": "12-hour", "lag": "1 day", "bucket": "hour"}). votes: an ensemble's members'
    votes on the row ({member: flags it}, AnomalyResult.votes); {} for a single detector.
    """

    anomaly_id: int | None
    fleet: str
    device: str
    device_attributes: dict
    cohort_label: str
    timestamp: str
    anomaly_score: float
    threshold: float
    severity: str
    algorithm: str
    model_version: int | None
    baseline_version: int | None
    top_metrics: list[MetricFinding]
    attribution: dict
    metric_labels: dict = field(default_factory=dict)
    windows: dict = field(default_factory=dict)
    run_id: int | None = None
    votes: dict = field(default_factory=dict)

    @property
    def agreement_text(self) -> str:
        """The ensemble's members' agreement in words ("2 of 3 detectors flagged it (lof, robust_z;
        not hybrid)"); "" for a single detector."""
        if not self.votes:
            return ""
        flagged, others = split_votes(self.votes)
        names = "; ".join(p for p in (", ".join(flagged), f"not {', '.join(others)}" if others else "") if p)
        return f"{len(flagged)} of {len(self.votes)} detectors flagged it ({names})"

    @property
    def algorithm_label(self) -> str:
        return ALGORITHM_LABELS.get(self.algorithm, self.algorithm.replace("_", " "))

    @property
    def top_metric(self) -> MetricFinding | None:
        return self.top_metrics[0] if self.top_metrics else None

    @property
    def when(self) -> str:
        """The timestamp as the writer and the prompt print it: 2026-10-24 13:00 UTC."""
        ts = pd.Timestamp(self.timestamp)
        ts = ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")
        return ts.strftime("%Y-%m-%d %H:%M:%S UTC" if ts.second else "%Y-%m-%d %H:%M UTC")

    def contributions(self, limit: int = 5) -> list[dict]:
        """The largest attribution entries by metric ({metric, domain, contribution, share})."""
        return list(self.attribution.get("metrics", []))[:limit]

    def metrics(self) -> list[str]:
        """The metrics a narrative may name: the top metrics and the largest contributions."""
        names = [m.metric for m in self.top_metrics] + [c["metric"] for c in self.contributions()]
        return list(dict.fromkeys(names))

    def label_of(self, metric: str) -> str:
        return self.metric_labels.get(metric) or metric.replace("_", " ")

    def as_dict(self) -> dict:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["top_metrics"] = [dict(vars(m)) for m in self.top_metrics]
        data["algorithm_label"] = self.algorithm_label
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ExplanationPayload":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["top_metrics"] = [MetricFinding(**m) for m in data.get("top_metrics", [])]
        return cls(**known)


def build_payload(*, anomaly_id, fleet: str, device: str, device_attributes: dict, cohort_label: str, timestamp,
                  anomaly_score: float, threshold: float, severity: str, algorithm: str, model_version,
                  baseline_version, top_metrics: list[dict], attribution: dict, metric_schema: list[dict],
                  feature_config=None, run_id=None, top_k: int = 5, votes: dict | None = None
                  ) -> ExplanationPayload:
    """Assemble a payload from an anomaly's stored facts.

    top_metrics: AnomalyResult.top_metrics entries ({metric, feature, domain, value, typical, mad, z,
        level}; kind optional), |z| descending; the first top_k are kept.
    metric_schema: the fleet's [{name, unit, domain, label?}].
    feature_config: the run's detection.ml.features.FeatureConfig, for the window words (defaults if None).
    """
    schema = {m["name"]: m for m in metric_schema}
    windows = feature_windows(feature_config)
    findings = []
    for entry in top_metrics[:top_k]:
        metric = entry["metric"]
        info = schema.get(metric, {})
        feature = entry.get("feature") or metric
        suffix = feature[len(metric):] if feature.startswith(metric) else ""
        mad = entry.get("mad")
        spread = _round(MAD_TO_SIGMA * mad) if mad is not None else None
        value, typical = entry.get("value"), entry.get("typical")
        findings.append(MetricFinding(
            metric=metric, label=metric_label(metric, info), unit=info.get("unit", ""),
            domain=entry.get("domain") or info.get("domain", "other"), feature=feature,
            aspect=ASPECTS.get(suffix, "reading").format(**windows),
            value=value, typical=typical, spread=spread, z=entry.get("z"), level=entry.get("level", ""),
            level_label=level_label(entry.get("level", ""), device_attributes, cohort_label),
            ratio=_ratio(value, typical, spread)))
    ts = pd.Timestamp(timestamp)
    ts = ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")
    return ExplanationPayload(
        anomaly_id=anomaly_id, fleet=fleet, device=device, device_attributes=dict(device_attributes),
        cohort_label=cohort_label, timestamp=ts.isoformat(), anomaly_score=_round(anomaly_score),
        threshold=_round(threshold), severity=severity or "", algorithm=algorithm, model_version=model_version,
        baseline_version=baseline_version, top_metrics=findings, attribution=attribution,
        metric_labels={**{f.metric: f.label for f in findings},
                       **{name: metric_label(name, m) for name, m in schema.items()}},
        windows=windows, run_id=run_id, votes=dict(votes or {}))


def metric_label(name: str, schema_entry: dict | None = None) -> str:
    """The schema's label, else DEFAULT_LABELS', else the name with spaces."""
    label = (schema_entry or {}).get("label")
    if label:  # "Volume Flow RateRMS" -> "Volume Flow Rate RMS", "Accelerometer1RMS" -> "Accelerometer 1 RMS"
        return re.sub(r"(?<=[a-z])(?=[A-Z0-9])|(?<=[0-9])(?=[A-Za-z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", label)
    return DEFAULT_LABELS.get(name) or name.replace("_", " ")


def level_label(level: str, attributes: dict, cohort_label: str) -> str:
    """Whose normal the typical value is: "this device", "Samsung Galaxy S21 on Android 14 devices"..."""
    if level == "device":
        return "this device's own history"
    if level == "cohort":
        make = " ".join(p for p in (attributes.get("manufacturer"), attributes.get("model")) if p)
        os_version = attributes.get("os_version")
        if make and os_version:
            return f"{make} on {os_version} devices"
        return f"{make or cohort_label} devices" if (make or cohort_label) else "devices of its cohort"
    if level == "store":
        return f"devices in store {attributes['store']}" if attributes.get("store") else "devices in its store"
    if level == "customer":
        return f"{attributes['customer']} devices" if attributes.get("customer") else "devices of its customer"
    if level == "training":
        return "the training data"
    return "the whole fleet"


def feature_windows(config) -> dict:
    """{"window": "12-hour", "lag": "1 day", "bucket": "hour"} from a FeatureConfig (or the defaults)."""
    window = getattr(config, "rolling_window", "12h")
    lag = getattr(config, "delta_lag", "1D")
    bucket = getattr(config, "cohort_bucket", "1h")
    return {"window": duration_words(window, adjective=True), "lag": duration_words(lag),
            "bucket": duration_words(bucket, article=False)}


def duration_words(offset: str, *, adjective: bool = False, article: bool = True) -> str:
    """'12h' -> '12 hours' ('12-hour' as an adjective), '1D' -> '1 day', '1h' -> 'hour' without article."""
    seconds = pd.Timedelta(offset).total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            break
    else:
        n, unit = int(seconds), "second"
    if n == 1 and not article:
        return unit
    if adjective:
        return f"{n}-{unit}"
    return f"{n} {unit}" + ("s" if n != 1 else "")


def _ratio(value, typical, spread) -> float | None:
    """value / typical, when it reads as "x times the usual": same sign, typical well away from zero."""
    if value is None or typical is None or typical == 0 or value * typical <= 0:
        return None
    if spread is not None and abs(typical) < 0.5 * spread:
        return None
    ratio = value / typical
    return _round(ratio, 2) if 0.05 <= ratio <= 1000 else None


def _round(value, digits: int = 6):
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None
