"""Narratives: plain-language explanations of one anomaly, written from its payload. Django-free.

Two providers share one interface (NarrativeProvider.write(payload) -> Narrative):

- BuiltinWriter ("builtin", the default): deterministic English from the payload alone, no network. Per
  metric domain it says what the deviation means in business terms and what to do next; every number
  it prints is a payload number, formatted by fmt().
- LLMWriter ("llm"): an OpenAI-compatible chat API (explanations.llm) given build_prompt(payload).

narrate() runs a provider, validates its text (explanations.validation) and decides what is shown: the
provider's text when it passes, else the built-in writer's, with the reason kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

from .llm import ChatClient, LLMConfig, LLMError
from .payload import ExplanationPayload, MetricFinding
from .validation import ValidationResult, validate_narrative

BUILTIN_MODEL = "builtin-writer-1"


@dataclass
class Narrative:
    """What a provider wrote. error: why it wrote nothing (text is then ""). attempts: HTTP attempts."""

    text: str
    provider: str
    model: str
    prompt: str = ""
    latency_ms: float = 0.0
    error: str = ""
    error_kind: str = ""
    attempts: int = 0


@dataclass
class NarrativeResult:
    """The outcome of narrate().

    verdict: "accepted" (the provider's text passed validation), "rejected" (it failed; validation says
    why) or "failed" (the provider gave no text; narrative.error says why). shown_text is what a reviewer
    reads: the provider's text when accepted, else the built-in writer's (fallback).
    """

    narrative: Narrative
    validation: ValidationResult
    verdict: str
    fallback: Narrative | None = None

    @property
    def shown_text(self) -> str:
        return self.narrative.text if self.verdict == "accepted" else (self.fallback.text if self.fallback else "")

    @property
    def shown_provider(self) -> str:
        return self.narrative.provider if self.verdict == "accepted" else BuiltinWriter.name


class NarrativeProvider(Protocol):
    name: str

    def write(self, payload: ExplanationPayload) -> Narrative: ...


# --- numbers ---------------------------------------------------------------------------------------

def fmt(value: float | None) -> str:
    """A number as narratives print it: three significant digits, no exponent, no trailing zeros
    (-95, 22.1, 1.97, 0.0271, 1234). The validator accepts it against the unrounded payload number."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def with_unit(value: float | None, unit: str) -> str:
    if not unit:
        return fmt(value)
    return f"{fmt(value)}{unit}" if unit == "%" else f"{fmt(value)} {unit}"


# --- the built-in writer ---------------------------------------------------------------------------

# (domain, direction) -> what it means for the business; "{label}" is the metric's label.
_MEANING = {
    ("battery", "below"): "the battery holds less charge than it should at this point, so the device may "
                          "not last the shift",
    ("battery", "above"): "the battery holds more charge than usual, as when a device sits unused in its cradle",
    ("battery_temp", "above"): "the battery is running hot, which ages it quickly and can point to a failing "
                               "cell, a demanding app or a hot charging spot",
    ("battery_temp", "below"): "the battery is cooler than usual, which usually means the device is idle",
    ("storage", "below"): "free storage is running out, so apps may soon fail to save work or install updates",
    ("storage", "above"): "storage was freed unexpectedly, as after a wipe, a reinstall or a cleared cache",
    ("compute", "above"): "the device is working much harder than its peers, which shortens its runtime and "
                          "slows it down",
    ("compute", "below"): "the device is unusually idle: it may be unused, or an app has stopped",
    ("memory", "above"): "memory is filling up, the usual sign of an app that leaks memory",
    ("network", "below"): "the device moved far less data than usual: it may have lost its connection or "
                          "stopped syncing",
    ("network", "above"): "the device moved far more data than usual: a large sync, an update or a "
                          "misbehaving app",
    ("wifi", "below"): "the Wi-Fi signal is weak: the device is out of coverage, in a dead spot, or its radio "
                       "is failing",
    ("wifi", "above"): "the Wi-Fi signal is unusually strong, as when a device sits next to an access point",
    ("vibration", "above"): "the equipment vibrates more than normal, a sign of imbalance, misalignment, "
                            "cavitation or bearing wear",
    ("vibration", "below"): "the equipment vibrates less than normal: it may have slowed down or stopped",
    ("hydraulic", "above"): "the hydraulic circuit runs above its normal band: look at valves, the pump and "
                            "blockages downstream",
    ("hydraulic", "below"): "the hydraulic circuit runs below its normal band: look for a leak, a closing "
                            "valve or a weakening pump",
    ("electrical", "above"): "the drive draws more than its normal band: extra mechanical load or a failing "
                             "component",
    ("electrical", "below"): "the supply sits below its normal band: a supply problem or a load that dropped",
    ("thermal", "above"): "it runs hotter than normal: cooling or load should be checked",
    ("thermal", "below"): "it runs cooler than normal: the equipment may be idle or a sensor may be off",
}
_ASPECT_MEANING = {
    "_roll_std": {"below": "the reading barely moved, which points to a stuck sensor or frozen reporting",
                  "above": "the reading swung far more than usual, which points to an unstable device or sensor"},
    "_cohort_norm": {"below": "it sits well below its cohort peers at the same time, so the cause is this "
                              "device rather than the whole fleet",
                     "above": "it sits well above its cohort peers at the same time, so the cause is this "
                              "device rather than the whole fleet"},
    "_resid": {"below": "the drop came suddenly, against the device's own previous readings",
               "above": "the rise came suddenly, against the device's own previous readings"},
}
_NEXT_STEPS = {
    "battery": ["Check the battery's health and charge cycles in the device management console.",
                "Ask the store whether the device missed its cradle or was used beyond its shift.",
                "Swap the battery if the device drains fast again on its next shift."],
    "battery_temp": ["Look for an app keeping the device busy and for a hot charging spot.",
                     "Take the device out of service if its battery keeps running hot: swollen cells are a "
                     "safety risk."],
    "storage": ["Look for runaway logs or cached media on the device and clear them.",
                "Check that the device hands its work over to the server, so files do not pile up locally."],
    "compute": ["Find the app behind the load in the device management console.",
                "Restart the device and watch whether the load returns; update or roll back the app that "
                "causes it."],
    "network": ["Check whether the device still checks in and syncs.",
                "Compare with the other devices in the same store to rule out a store outage."],
    "wifi": ["Check Wi-Fi coverage where the device is used, and whether nearby devices see the same drop.",
             "If only this device is affected, test its radio and plan a replacement."],
    "vibration": ["Inspect the pump and motor for imbalance, misalignment or loose mountings.",
                  "Check the bearings and listen for cavitation."],
    "hydraulic": ["Check the valve positions and look for leaks or blockages in the line.",
                  "Compare the pump's output with its setpoints."],
    "electrical": ["Check the motor's mechanical load and the supply.",
                   "Look for a failing component before it trips the drive."],
    "thermal": ["Check the cooling and whether the equipment runs at unusual load.",
                "Confirm the reading with a second sensor or a handheld thermometer."],
    "other": ["Check what changed on the device recently: apps, configuration, location.",
              "Compare it with its peers in the same cohort."],
}
_CLOSING_STEP = "Record your verdict (true or false positive) so the baselines learn from it."


def _topic(finding: MetricFinding) -> str:
    """The _MEANING / _NEXT_STEPS key: the domain, refined for battery temperature and memory."""
    name = finding.metric.lower()
    if finding.domain == "battery" and ("temp" in name or finding.unit in ("°C", "°F", "C", "F")):
        return "battery_temp"
    if finding.domain == "compute" and ("mem" in name or "ram" in name):
        return "memory"
    return finding.domain if finding.domain in _NEXT_STEPS or any(k[0] == finding.domain for k in _MEANING) \
        else "other"


def describe(finding: MetricFinding) -> str:
    """One sentence about one metric, every number from the finding."""
    label = finding.label[0].upper() + finding.label[1:]
    what = f"{label} ({finding.aspect})" if finding.aspect != "reading" else label
    sentence = f"{what} was {with_unit(finding.value, finding.unit)}"
    if finding.typical is not None:
        band = f" ± {fmt(finding.spread)}" if finding.spread else ""
        sentence += (f", {finding.direction} the typical {with_unit(finding.typical, finding.unit)}{band} "
                     f"for {finding.level_label}")
    if finding.z is not None:
        sentence += f" (robust z-score {fmt(finding.z)})"
    return sentence


def meaning(finding: MetricFinding) -> str:
    """What the deviation means in business terms (no numbers except the ratio)."""
    direction = finding.direction if finding.direction != "at" else "above"
    aspect = _ASPECT_MEANING.get(finding.suffix, {}).get(direction)
    if aspect:
        return aspect
    topic = _topic(finding)
    if topic == "battery" and finding.suffix == "_delta" and direction == "below" and (finding.ratio or 0) >= 1.5:
        return f"the battery drained {fmt(finding.ratio)}x faster than usual for {finding.level_label}"
    if finding.ratio is not None and finding.ratio >= 1.5 and direction == "above":
        return (_MEANING.get((topic, direction)) or _MEANING.get((finding.domain, direction)) or
                "it is far outside its usual range") + f", at {fmt(finding.ratio)}x the usual level"
    return (_MEANING.get((topic, direction)) or _MEANING.get((finding.domain, direction))
            or f"{finding.label} left its usual range")


class BuiltinWriter:
    """The default narrative provider: deterministic, no network, numbers only from the payload."""

    name = "builtin"
    model = BUILTIN_MODEL

    def write(self, payload: ExplanationPayload) -> Narrative:
        started = time.perf_counter()
        text = self.text(payload)
        return Narrative(text, self.name, self.model, "", (time.perf_counter() - started) * 1000)

    def text(self, payload: ExplanationPayload) -> str:
        paragraphs = [self._headline(payload)]
        if payload.top_metrics:
            top = payload.top_metrics[0]
            paragraphs.append(f"Most abnormal: {describe(top)}. In short, {meaning(top)}.")
            others = [f"{describe(m)}." for m in payload.top_metrics[1:]]
            if others:
                paragraphs.append("Also unusual:\n" + "\n".join(f"- {o}" for o in others))
        attribution = self._attribution(payload)
        if attribution:
            paragraphs.append(attribution)
        paragraphs.append("Next steps:\n" + "\n".join(f"- {s}" for s in self._steps(payload)))
        return "\n\n".join(paragraphs)

    def _headline(self, payload: ExplanationPayload) -> str:
        where = ", ".join(p for p in (payload.cohort_label, payload.device_attributes.get("store")) if p)
        versions = f"model v{payload.model_version}" if payload.model_version is not None else ""
        if payload.baseline_version is not None:
            versions += f", baseline v{payload.baseline_version}"
        severity = f"{payload.severity} severity " if payload.severity else ""
        agreement = f" {payload.agreement_text}." if payload.votes else ""  # "2 of 3 detectors ..."
        return (f"Device {payload.device}{f' ({where})' if where else ''} was flagged at {payload.when} as a "
                f"{severity}anomaly, with a score of {fmt(payload.anomaly_score)} against a threshold of "
                f"{fmt(payload.threshold)} ({payload.algorithm_label}{'; ' + versions if versions else ''})."
                + agreement)

    def _attribution(self, payload: ExplanationPayload) -> str:
        attribution = payload.attribution or {}
        entries = [c for c in payload.contributions(3) if c.get("contribution", 0) > 0]
        if not entries:
            return ""
        names = ", ".join(f"{payload.label_of(c['metric'])} {fmt(100 * c['share'])}%" for c in entries)
        if attribution.get("method") == "robust_z":
            return f"Share of the deviation by metric (robust z-scores, no model attribution): {names}."
        method = attribution.get("label") or attribution.get("method", "")
        return f"Share of the score by metric ({method}): {names}."

    def _steps(self, payload: ExplanationPayload) -> list[str]:
        steps: list[str] = []
        # The top metric's steps, and the runner-up's when it is clearly abnormal too (|z| >= 3).
        relevant = payload.top_metrics[:1] + [m for m in payload.top_metrics[1:2] if m.z is not None and abs(m.z) >= 3]
        for finding in relevant:
            for step in _NEXT_STEPS.get(_topic(finding), _NEXT_STEPS["other"]):
                if step not in steps:
                    steps.append(step)
        return steps[:4] + [_CLOSING_STEP]


# --- the LLM writer --------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You explain anomalies in device-fleet telemetry to the operations staff who review them. Be concrete "
    "and brief. Use only the metrics and numbers you are given, rounded as given; never introduce other "
    "metrics or numbers. Name the first metric listed."
)


def build_prompt(payload: ExplanationPayload) -> str:
    """The user message, in the shape the issue fixes:
    "You are explaining an anomaly detected by Isolation Forest (score: {score}). Device {device_id} at
    {timestamp} showed unusual behavior: - Metric X: {value} (typical: {median} +/- {spread}, z-score: {z})
    ... Explain what this means in business terms and suggest next steps.", with the threshold, whose
    normal the typical values are, the attribution and, for an ensemble, its detectors' agreement added."""
    lines = [f"You are explaining an anomaly detected by {payload.algorithm_label} "
             f"(score: {fmt(payload.anomaly_score)}, alert threshold: {fmt(payload.threshold)}). "
             f"Device {payload.device}" + (f" ({payload.cohort_label})" if payload.cohort_label else "")
             + f" at {payload.when} showed unusual behavior:"]
    for m in payload.top_metrics:
        unit = f" {m.unit}" if m.unit else ""
        lines.append(f"- {m.metric} ({m.label}, {m.aspect}): {fmt(m.value)}{unit} (typical: {fmt(m.typical)} "
                     f"+/- {fmt(m.spread)} for {m.level_label}, z-score: {fmt(m.z)})")
    contributions = [c for c in payload.contributions() if c.get("contribution", 0) > 0]
    if contributions:
        method = payload.attribution.get("label") or payload.attribution.get("method", "")
        shares = ", ".join(f"{c['metric']} {fmt(100 * c['share'])}%" for c in contributions)
        lines.append(f"Share of the score by metric ({method}): {shares}.")
    if payload.votes:
        lines.append(f"Detector agreement: {payload.agreement_text}.")
    lines.append("Explain what this means in business terms and suggest next steps.")
    return "\n".join(lines)


class LLMWriter:
    """Narratives from an OpenAI-compatible chat API; errors come back in Narrative.error, never raised."""

    name = "llm"

    def __init__(self, config: LLMConfig, *, client: ChatClient | None = None):
        self.config = config
        self.client = client or ChatClient(config)
        self.model = config.model

    def write(self, payload: ExplanationPayload) -> Narrative:
        prompt = build_prompt(payload)
        started = time.perf_counter()
        try:
            answer = self.client.chat([{"role": "system", "content": SYSTEM_PROMPT},
                                       {"role": "user", "content": prompt}])
        except LLMError as exc:
            return Narrative("", self.name, self.model, prompt, (time.perf_counter() - started) * 1000,
                             error=str(exc), error_kind=exc.kind)
        return Narrative(answer.text, self.name, self.model, prompt, answer.latency_ms, attempts=answer.attempts)


PROVIDERS = ("builtin", "llm")


class UnknownProvider(ValueError):
    """A provider name that is not one of PROVIDERS."""


def make_provider(name: str, llm_config: LLMConfig | None = None) -> NarrativeProvider:
    """The provider called `name` ("builtin" or "llm"); raises UnknownProvider for any other name."""
    if name == "builtin":
        return BuiltinWriter()
    if name == "llm":
        return LLMWriter(llm_config or LLMConfig())
    raise UnknownProvider(f"unknown narrative provider {name!r}; known: {', '.join(PROVIDERS)}")


def narrate(payload: ExplanationPayload, provider: NarrativeProvider, *, fallback: BuiltinWriter | None = None
            ) -> NarrativeResult:
    """Write, validate and pick what is shown. Never raises for provider failures."""
    fallback = fallback or BuiltinWriter()
    narrative = provider.write(payload)
    if narrative.error or not narrative.text:
        validation = ValidationResult(False, [f"the provider failed: {narrative.error or 'no text'}"])
        return NarrativeResult(narrative, validation, "failed", fallback.write(payload))
    validation = validate_narrative(narrative.text, payload)
    if validation.valid:
        return NarrativeResult(narrative, validation, "accepted")
    return NarrativeResult(narrative, validation, "rejected",
                           fallback.write(payload) if provider.name != fallback.name else narrative)
