"""Writes for explanations: generate one anomaly's explanation, or every anomaly's of a run.

explanation_generate (synchronous) and explanation_request + explanation_execute (the Explain button:
a pending row, then a Celery task) share one path: rebuild the detector's input rows from telemetry
(explanations.rows), attribute the score (explanations.attribution), assemble the payload, write and
validate the narrative (explanations.narrative), store it. explanation_run_generate does the same for a
whole run, vectorised per cohort; `manage.py explain` and explain_run_task call it.

Settings, read with getattr so that the embedded default needs none: VIGIL_LLM (a dict over
LLM_DEFAULTS: provider, base_url, model, api_key, timeout, max_retries, backoff, breaker_failures,
breaker_reset_seconds, temperature, max_tokens) and VIGIL_EXPLANATION_PUSH (bool, the page's websocket).
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pandas as pd
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from detection.choices import Label
from detection.ingest.loader import load_telemetry_frame
from detection.ml.artifacts import ArtifactError, load_artifact
from detection.models import AnomalyResult, Device, PipelineRun

from .attribution import (
    Attribution,
    AttributionError,
    attribute_in_context,
    attribute_kernel,
    attribute_robust_z,
    attribute_tree,
    context_metric_limit,
    head_label,
    is_sequential,
    supports_tree_shap,
)
from .choices import ExplanationStatus, Provider
from .llm import LLMConfig
from .models import OPEN_STATUSES, Explanation
from .narrative import PROVIDERS, NarrativeResult, make_provider, narrate
from .payload import ExplanationPayload, build_payload
from .rows import RowsError, detector_columns, history_margin, model_rows

logger = logging.getLogger(__name__)

LLM_DEFAULTS = {
    "provider": "builtin", "base_url": "", "model": "", "api_key": "", "timeout": 20.0, "max_retries": 2,
    "backoff": 0.5, "breaker_failures": 3, "breaker_reset_seconds": 60.0, "temperature": 0.2, "max_tokens": 400,
}
# A pending or running explanation older than this is taken as abandoned (its worker died).
STALE_AFTER = dt.timedelta(minutes=10)
SCORE_TOLERANCE = 1e-6
BULK_BATCH = 500

Progress = Callable[[int, int, str], None]


class ExplanationError(Exception):
    """The explanation cannot be asked for as given (not an anomaly, unknown provider); the message says why."""


def llm_settings() -> dict:
    """settings.VIGIL_LLM over LLM_DEFAULTS."""
    return {**LLM_DEFAULTS, **(getattr(settings, "VIGIL_LLM", None) or {})}


def llm_config() -> LLMConfig:
    return LLMConfig.from_mapping(llm_settings())


def default_provider() -> str:
    return llm_settings()["provider"] or Provider.BUILTIN


def provider_resolve(provider: str | None) -> str:
    """The provider to use for `provider` (None: the configured default). Raises ExplanationError for an
    unknown provider, or the LLM one when no base URL and model are configured."""
    name = (provider or default_provider()).strip().lower()
    if name not in PROVIDERS:
        raise ExplanationError(f"unknown narrative provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    if name == Provider.LLM and not llm_config().configured:
        raise ExplanationError("the LLM provider is not configured: set VIGIL_LLM_BASE_URL and VIGIL_LLM_MODEL")
    return name


# --- one anomaly -----------------------------------------------------------------------------------

def explanation_request(*, anomaly: AnomalyResult, provider: str | None = None, regenerate: bool = False,
                        user=None, enqueue: bool = True) -> tuple[Explanation, bool]:
    """The anomaly's cached explanation, or a new pending one handed to the Celery task (after commit).

    Returns (explanation, created). An explanation already pending or running is returned as it is
    (created False), so a double click starts one generation. Raises ExplanationError for a result that
    is not an anomaly or an unknown or unconfigured provider.
    """
    name = provider_resolve(provider)
    if anomaly.label != Label.ANOMALY:
        raise ExplanationError(f"result {anomaly.pk} is not an anomaly; only anomalies are explained")
    if not regenerate:
        cached = _cached(anomaly, name)
        if cached is not None:
            return cached, False
    _abandon_stale(anomaly)
    try:
        with transaction.atomic():
            explanation = Explanation.objects.create(anomaly=anomaly, provider=name, requested_by=user)
    except IntegrityError:  # one is already open (the constraint): hand that one back
        return Explanation.objects.filter(anomaly=anomaly, status__in=OPEN_STATUSES).first(), False
    if enqueue:
        from .tasks import explain_anomaly_task

        transaction.on_commit(lambda: explain_anomaly_task.delay(explanation.pk))
    return explanation, True


def explanation_execute(*, explanation_id: int) -> Explanation:
    """Generate a pending explanation. Idempotent: one that another worker claimed is returned untouched.
    Never raises for generation failures: the row is marked failed with the error."""
    claimed = Explanation.objects.filter(id=explanation_id, status=ExplanationStatus.PENDING).update(
        status=ExplanationStatus.RUNNING, started_at=timezone.now())
    explanation = Explanation.objects.select_related(*(f"anomaly__{r}" for r in _RESULT_RELATED)).get(
        id=explanation_id)
    if claimed != 1:
        return explanation
    try:
        outcome = _explain([explanation.anomaly], explanation.provider)[explanation.anomaly.pk]
        _apply(explanation, outcome)
        explanation.status = ExplanationStatus.READY
    except Exception as exc:  # a bug must still end the row, not leave it running
        logger.exception("explanation %s failed", explanation_id)
        explanation.status = ExplanationStatus.FAILED
        explanation.error = f"{type(exc).__name__}: {exc}"
    explanation.finished_at = timezone.now()
    explanation.save()
    from .push import explanation_push

    explanation_push(explanation=explanation)
    return explanation


def explanation_generate(*, anomaly: AnomalyResult, provider: str | None = None, regenerate: bool = False,
                         user=None) -> Explanation:
    """The anomaly's explanation, generated now unless a cached one exists (or regenerate is set); one
    that a worker is generating at this moment is returned as it is (running). Raises ExplanationError
    as explanation_request does."""
    explanation, _ = explanation_request(anomaly=anomaly, provider=provider, regenerate=regenerate,
                                               user=user, enqueue=False)
    if explanation.status == ExplanationStatus.PENDING:
        return explanation_execute(explanation_id=explanation.pk)
    return explanation


def _cached(anomaly: AnomalyResult, provider: str) -> Explanation | None:
    return (Explanation.objects.filter(anomaly=anomaly, provider=provider, status=ExplanationStatus.READY)
            .order_by("-created_at", "-id").first())


def _abandon_stale(anomaly: AnomalyResult) -> None:
    Explanation.objects.filter(anomaly=anomaly, status__in=OPEN_STATUSES,
                               created_at__lt=timezone.now() - STALE_AFTER).update(
        status=ExplanationStatus.FAILED, error="abandoned: no worker finished it", finished_at=timezone.now())


# --- a whole run -----------------------------------------------------------------------------------

@dataclass
class RunExplanations:
    """What explanation_run_generate did: explanations (one per anomaly, new or cached, in anomaly order),
    how many were generated and how many reused, and the seconds taken."""

    run: PipelineRun
    explanations: list[Explanation]
    generated: int
    reused: int
    seconds: float


def explanation_run_generate(*, run: PipelineRun, provider: str | None = None, regenerate: bool = False,
                             user=None, progress: Progress | None = None,
                             anomaly_ids: Iterable[int] | None = None) -> RunExplanations:
    """Explain every anomaly of a run, per cohort (telemetry loaded once per cohort, SHAP on all its rows at
    once), saving as it goes: a run interrupted half-way keeps what it finished, and the next call skips
    anomalies that already have a ready explanation from this provider unless regenerate is set.

    progress(done, total, message) is called after each cohort. anomaly_ids limits the work to those
    anomalies of the run (a reviewer's selection). Raises ExplanationError for an unknown provider.
    """
    started = time.perf_counter()
    name = provider_resolve(provider)
    selected = AnomalyResult.objects.filter(run=run, label=Label.ANOMALY)
    if anomaly_ids is not None:
        selected = selected.filter(pk__in=list(anomaly_ids))
    anomalies = list(selected.select_related(*_RESULT_RELATED).order_by("device_id", "timestamp"))
    existing: dict[int, Explanation] = {}
    if not regenerate:
        for e in (Explanation.objects.filter(anomaly__run=run, provider=name, status=ExplanationStatus.READY)
                  .order_by("anomaly_id", "-created_at", "-id")):
            existing.setdefault(e.anomaly_id, e)
    todo = [a for a in anomalies if a.pk not in existing]
    total, done = len(anomalies), len(anomalies) - len(todo)
    if progress:
        progress(done, total, f"{done} already explained" if done else "starting")
    made: dict[int, Explanation] = {}
    for label, group in _cohort_groups(todo):
        outcomes = _explain(group, name, cohort_bulk=True)
        now = timezone.now()
        rows = []
        for anomaly in group:
            e = Explanation(anomaly=anomaly, provider=name, requested_by=user, status=ExplanationStatus.READY,
                            started_at=now, finished_at=now)
            _apply(e, outcomes[anomaly.pk])
            rows.append(e)
        with transaction.atomic():
            Explanation.objects.bulk_create(rows, batch_size=BULK_BATCH)
        made.update({e.anomaly_id: e for e in rows})
        done += len(group)
        if progress:
            progress(done, total, label)
    explanations = [made.get(a.pk) or existing[a.pk] for a in anomalies]
    return RunExplanations(run, explanations, len(made), len(anomalies) - len(todo), time.perf_counter() - started)


def _cohort_groups(anomalies: list[AnomalyResult]) -> Iterable[tuple[str, list[AnomalyResult]]]:
    if not anomalies:
        return
    context = _context(anomalies[0])
    if context.config is None or _needs_whole_fleet(context.detector, context.config):
        yield "whole fleet", anomalies
        return
    columns = list(context.config.features.cohort_columns)
    groups: dict[tuple, list[AnomalyResult]] = {}
    for a in anomalies:
        groups.setdefault(tuple(getattr(a.device, c, "") for c in columns), []).append(a)
    for key, group in groups.items():
        yield (" ".join(p for p in key if p) or "fleet"), group


# --- the shared path -------------------------------------------------------------------------------

_RESULT_RELATED = ("device", "run__fleet", "model_version", "baseline_version")


@dataclass
class _RunContext:
    """A run's model and baselines, loaded from their artifacts; error says why they could not be."""

    detector: object = None
    config: object = None
    baselines: object = None
    error: str = ""


@dataclass
class _Outcome:
    payload: ExplanationPayload
    attribution: Attribution
    reproduced: dict
    result: NarrativeResult
    attribution_ms: float
    extra: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _load_artifact(path: str, checksum: str, kind: str):
    return load_artifact(path, kind=kind, checksum=checksum or None)


def _context(anomaly: AnomalyResult) -> _RunContext:
    """The model and baselines that scored `anomaly` (those of its run)."""
    model, baseline = anomaly.model_version, anomaly.baseline_version
    if model is None or not model.artifact_path:
        return _RunContext(error="the run has no model artifact")
    try:
        saved = _load_artifact(model.artifact_path, model.artifact_checksum, "model")
        baselines = (_load_artifact(baseline.artifact_path, baseline.artifact_checksum, "baselines")
                     if baseline is not None and baseline.artifact_path else None)
    except (ArtifactError, OSError, EOFError, AttributeError, ImportError) as exc:
        return _RunContext(error=f"the model or baseline artifact cannot be read: {exc}")
    return _RunContext(saved["detector"], saved["config"], baselines)


def _explain(anomalies: list[AnomalyResult], provider_name: str, *, cohort_bulk: bool = False
             ) -> dict[int, _Outcome]:
    """Attribute, write and validate for anomalies of one run (bulk: one cohort of it)."""
    if not anomalies:
        return {}
    run = anomalies[0].run
    fleet = run.fleet
    context = _context(anomalies[0])
    started = time.perf_counter()
    attributions, reason = _attribute(anomalies, context, cohort_bulk=cohort_bulk)
    per_row_ms = (time.perf_counter() - started) * 1000 / len(anomalies)
    provider = make_provider(provider_name, llm_config())
    outcomes = {}
    for anomaly in anomalies:
        attribution = attributions.get(anomaly.pk)
        reproduced = {}
        if attribution is None:
            attribution = attribute_robust_z(anomaly.top_metrics or [], score=anomaly.anomaly_score,
                                             threshold=anomaly.threshold, reason=reason)
        elif attribution.output_value is not None:
            error = abs(attribution.output_value - anomaly.anomaly_score)
            reproduced = {"score": attribution.output_value, "stored": anomaly.anomaly_score, "error": error,
                          "ok": error <= SCORE_TOLERANCE * max(1.0, abs(anomaly.anomaly_score))}
        payload = _payload(anomaly, fleet, run, attribution, context)
        result = narrate(payload, provider)
        outcomes[anomaly.pk] = _Outcome(payload, attribution, reproduced, result, per_row_ms)
    return outcomes


def _attribute(anomalies: list[AnomalyResult], context: _RunContext, *, cohort_bulk: bool
               ) -> tuple[dict[int, Attribution], str]:
    """{anomaly id: Attribution} for the anomalies whose rows could be rebuilt, and why the others could not."""
    if context.error:
        return {}, context.error
    # An ensemble drops a member that fails to score (suite.EnsembleDetector.component_scores). The
    # detector is cached across explanations (_load_artifact), so a failure on rebuilt rows must not
    # leave it without the member for the next anomaly: its members are put back afterwards.
    members = dict(getattr(context.detector, "members_", None) or {})
    excluded = dict(getattr(context.detector, "excluded_", None) or {})
    try:
        return _attribute_rows(anomalies, context, cohort_bulk=cohort_bulk)
    finally:
        if members:
            context.detector.members_, context.detector.excluded_ = members, excluded


def _attribute_rows(anomalies: list[AnomalyResult], context: _RunContext, *, cohort_bulk: bool
                    ) -> tuple[dict[int, Attribution], str]:
    detector, config, baselines = context.detector, context.config, context.baselines
    tree = supports_tree_shap(detector)
    fleet = anomalies[0].run.fleet
    if not tree and is_sequential(detector) and len(fleet.metric_names) <= context_metric_limit(detector):
        in_context = _attribute_in_context(anomalies, context)
        if in_context is not None:
            return in_context
    try:
        telemetry = (load_telemetry_frame(fleet) if _needs_whole_fleet(detector, config)
                     else _telemetry(anomalies, fleet, config, cohort_bulk=cohort_bulk))
        keys = pd.DataFrame({"device_id": [a.device_id for a in anomalies],
                             "timestamp": pd.to_datetime([a.timestamp for a in anomalies], utc=True)})
        rows = model_rows(telemetry, keys, metrics=fleet.metric_names, config=config, baselines=baselines,
                          detector=detector, background_rows=0 if tree else 200, seed=config.detector.random_state)
    except (RowsError, KeyError, ValueError) as exc:
        logger.warning("cannot rebuild the model rows of run %s: %s", anomalies[0].run_id, exc)
        return {}, f"the detector's input could not be rebuilt: {exc}"
    found = rows.found
    if not found.any():
        return {}, "the anomaly's telemetry is no longer stored"
    X = rows.frame.loc[found, [c for c in rows.frame.columns if c not in ("device_id", "timestamp")]]
    levels = tuple(baselines.levels) if baselines is not None else ()
    try:
        if tree:
            results = attribute_tree(detector, X, feature_metric=rows.feature_metric,
                                     metric_domain=fleet.metric_domains, levels=levels)
        else:
            results = attribute_kernel(detector, X, rows.background, feature_metric=rows.feature_metric,
                                       metric_domain=fleet.metric_domains, levels=levels)
    except AttributionError as exc:
        return {}, str(exc)
    ids = [a.pk for a, ok in zip(anomalies, found) if ok]
    reason = "" if found.all() else "the anomaly's telemetry is no longer stored"
    return dict(zip(ids, results)), reason


def _attribute_in_context(anomalies: list[AnomalyResult], context: _RunContext
                          ) -> tuple[dict[int, Attribution], str] | None:
    """attribution.attribute_in_context for each anomaly: its device's rows from the device's first sample
    on are rebuilt (with their cohort peers', which the cohort features read) and indexed as the
    pipeline's frame was, so the detector scores them as it did. None when they cannot be rebuilt that
    way (a device whose first training row has no integer label, or rows that do not rebuild): the
    caller then uses Kernel SHAP."""
    detector, config, baselines = context.detector, context.config, context.baselines
    fleet = anomalies[0].run.fleet
    devices = sorted({a.device_id for a in anomalies})
    last = {d: max(a.timestamp for a in anomalies if a.device_id == d) for d in devices}
    try:
        # The anomalies share one cohort (one anomaly, or one cohort of a run: explanation_run_generate).
        telemetry = (load_telemetry_frame(fleet) if _needs_whole_fleet(detector, config)
                     else _telemetry(anomalies, fleet, config, cohort_bulk=True, whole_history=True))
        stamps = pd.to_datetime(telemetry["timestamp"], utc=True)
        cutoff = pd.to_datetime(telemetry["device_id"].map({d: pd.Timestamp(t) for d, t in last.items()}), utc=True)
        own = (telemetry["device_id"].isin(devices) & (stamps <= cutoff)).to_numpy()
        keys = pd.DataFrame({"device_id": telemetry.loc[own, "device_id"].to_numpy(),
                             "timestamp": stamps[own].to_numpy()})
        rows = model_rows(telemetry, keys, metrics=fleet.metric_names, config=config, baselines=baselines,
                          detector=detector)
    except (RowsError, KeyError, ValueError) as exc:
        logger.warning("cannot rebuild the device rows of run %s: %s", anomalies[0].run_id, exc)
        return None
    columns = [c for c in rows.frame.columns if c not in ("device_id", "timestamp")]
    levels = tuple(baselines.levels) if baselines is not None else ()
    blocks = {}
    for device, block in rows.frame.groupby("device_id", sort=False):
        label = head_label(detector, device)
        if label is not None and not isinstance(label, numbers.Integral):
            return None
        block = block.sort_values("timestamp", kind="stable")
        start = label if label is not None else 0
        blocks[device] = block.set_index(pd.RangeIndex(start, start + len(block)))
    results, missing = {}, False
    for anomaly in anomalies:
        block = blocks.get(anomaly.device_id)
        stamp = pd.Timestamp(anomaly.timestamp)
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        if block is None or not (block["timestamp"] == stamp).any():
            missing = True
            continue
        prefix = block[block["timestamp"] <= stamp]
        try:
            results[anomaly.pk] = attribute_in_context(
                detector, prefix[columns + ["device_id"]], feature_metric=rows.feature_metric,
                metric_domain=fleet.metric_domains, levels=levels)
        except AttributionError:
            return None
    return results, "the anomaly's telemetry is no longer stored" if missing else ""


def _needs_whole_fleet(detector, config) -> bool:
    """The residual features (m_resid) floor their denominator with a spread per metric. Artifacts that
    carry it (FeatureConfig.resid_scale, from the training rows) reproduce from any slice of telemetry;
    older ones took it from the whole frame the pipeline saw, so only the whole fleet reproduces them."""
    if detector is None or getattr(getattr(config, "features", None), "resid_scale", ()):
        return False
    return any(c.endswith("_resid") for c in detector_columns(detector))


def _telemetry(anomalies: list[AnomalyResult], fleet, config, *, cohort_bulk: bool,
               whole_history: bool = False) -> pd.DataFrame:
    """What explanations.rows needs: the devices' history before their anomalies and their cohort peers'
    samples of the same bucket (bulk: the whole cohort over the anomalies' span, which covers both;
    whole_history: the whole cohort from its first sample to the anomalies' last bucket, for the
    in-context attribution)."""
    margin = history_margin(config).to_pytimedelta()
    bucket = pd.Timedelta(config.features.cohort_bucket)
    first, last = min(a.timestamp for a in anomalies), max(a.timestamp for a in anomalies)
    cohort_columns = [c for c in config.features.cohort_columns if hasattr(Device, c)]
    device = anomalies[0].device
    peers = Device.objects.filter(fleet=fleet, **{c: getattr(device, c) for c in cohort_columns})
    end = pd.Timestamp(last).floor(bucket) + bucket
    if cohort_bulk or whole_history:
        return load_telemetry_frame(fleet, start=None if whole_history else first - margin,
                                    end=end.to_pydatetime(), device_ids=list(peers.values_list("pk", flat=True)))
    own = load_telemetry_frame(fleet, start=first - margin, end=end.to_pydatetime(),
                               device_ids=sorted({a.device_id for a in anomalies}))
    others = load_telemetry_frame(fleet, start=pd.Timestamp(first).floor(bucket).to_pydatetime(),
                                  end=end.to_pydatetime(),
                                  device_ids=list(peers.exclude(pk__in=[a.device_id for a in anomalies])
                                                  .values_list("pk", flat=True)))
    frame = pd.concat([own, others], ignore_index=True)
    return frame.sort_values(["device_id", "timestamp"], kind="stable", ignore_index=True)


def _payload(anomaly: AnomalyResult, fleet, run, attribution: Attribution, context: _RunContext
             ) -> ExplanationPayload:
    device = anomaly.device
    summary = attribution.as_dict()
    summary.pop("features", None)  # the per-column detail stays in Explanation.attributions
    return build_payload(
        anomaly_id=anomaly.pk, fleet=fleet.name, device=device.external_id,
        device_attributes={a: getattr(device, a) for a in ("manufacturer", "model", "os_version", "store",
                                                           "customer")},
        cohort_label=device.cohort_label, timestamp=anomaly.timestamp, anomaly_score=anomaly.anomaly_score,
        threshold=anomaly.threshold, severity=anomaly.severity,
        algorithm=anomaly.model_version.algorithm if anomaly.model_version_id else "",
        model_version=anomaly.model_version.version if anomaly.model_version_id else None,
        baseline_version=anomaly.baseline_version.number if anomaly.baseline_version_id else None,
        top_metrics=_entries(anomaly.top_metrics), attribution=summary, metric_schema=fleet.metric_schema,
        feature_config=context.config.features if context.config is not None else None, run_id=run.pk,
        top_k=getattr(context.config, "top_k", 5) or 5, votes=anomaly.votes)


def _entries(top_metrics) -> list[dict]:
    """AnomalyResult.top_metrics entries that name a metric, |z| descending."""
    entries = [m for m in (top_metrics or []) if isinstance(m, dict) and m.get("metric")]
    return sorted(entries, key=lambda m: -abs(m["z"]) if isinstance(m.get("z"), (int, float))
                  and math.isfinite(m["z"]) else 0.0)


def _apply(explanation: Explanation, outcome: _Outcome) -> None:
    result = outcome.result
    explanation.model = result.narrative.model
    explanation.prompt = result.narrative.prompt
    explanation.text = result.narrative.text
    explanation.verdict = result.verdict
    explanation.validation = result.validation.as_dict()
    explanation.fallback_text = result.fallback.text if result.fallback and result.verdict != "accepted" else ""
    explanation.error = result.narrative.error
    explanation.payload = outcome.payload.as_dict()
    explanation.attributions = {**outcome.attribution.as_dict(), "reproduced": outcome.reproduced}
    explanation.attribution_method = outcome.attribution.method
    explanation.latency_ms = round(result.narrative.latency_ms, 3)
    explanation.attribution_ms = round(outcome.attribution_ms, 3)


def explanation_record(explanation: Explanation) -> dict:
    """One anomaly's entry of `manage.py explain --json`: payload, narrative, provider, validation."""
    return {
        "anomaly_id": explanation.anomaly_id, "explanation_id": explanation.pk, "payload": explanation.payload,
        "narrative": explanation.shown_text, "provider": explanation.shown_provider,
        "requested_provider": explanation.provider, "model": explanation.model, "verdict": explanation.verdict,
        "validation": {k: v for k, v in (explanation.validation or {}).items() if k != "numbers"},
        "provider_text": explanation.text, "error": explanation.error,
        "additivity": (explanation.attributions or {}).get("additivity", {}),
        "reproduced": (explanation.attributions or {}).get("reproduced", {}), "latency_ms": explanation.latency_ms,
    }

