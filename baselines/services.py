"""Writes for the feedback loop: reviewers' false positives -> proposed baseline adjustments -> approval ->
a new baseline version, a retrained model and re-scored data, all audited (detection.services.audit_record).

The numbers come from baselines.engine (Django-free): suggest_baseline_adjustments, apply_feedback,
validate_llm_proposal. proposal_apply is what the Celery chain in baselines.tasks runs, one idempotent
step per task; the embedded default runs it eagerly.

Settings (FEEDBACK_DEFAULTS, overridden by settings.VIGIL_FEEDBACK and then by a fleet's config, keys
prefixed "feedback_"): levels, min_count, min_share, z_min, learning_rate, max_shift_mad, auto_apply,
auto_max_shift_mad, auto_mad_factor_bounds, require_distinct_approver.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from detection.choices import AuditAction, Label, Role, RunStatus, Trigger
from detection.errors import InputError
from detection.ingest.loader import load_telemetry_frame
from detection.ml.artifacts import ArtifactError, load_artifact
from detection.ml.detectors import DETECTORS
from detection.ml.features import build_features
from detection.ml.pipeline import PipelineConfig, StageError, run_core
from detection.models import AnomalyFeedback, AnomalyResult, Fleet, PipelineRun
from detection.permissions import user_has_role
from detection.services import (
    audit_record,
    baseline_version_activate,
    baseline_version_create,
    ids_text,
    pipeline_run_create,
    pipeline_run_execute,
)

from . import engine
from .choices import ProposalSource, ProposalStatus
from .models import BaselineProposal, BaselineVersion

logger = logging.getLogger(__name__)

FEEDBACK_DEFAULTS = {
    "levels": ["cohort", "device"],
    "min_count": 5,
    "min_share": 0.7,
    "z_min": 3.0,
    "learning_rate": 0.35,
    "max_shift_mad": 1.5,
    "mad_factor_bounds": [0.5, 2.0],
    "auto_apply": False,
    "auto_max_shift_mad": 0.5,
    "auto_mad_factor_bounds": [0.8, 1.25],
    "require_distinct_approver": False,
}
SYSTEM_ACTOR = "feedback-loop"


class ProposalError(InputError):
    """A proposal action that cannot happen; field names the input at fault. Nothing was saved."""


def feedback_settings(fleet: Fleet) -> dict:
    """FEEDBACK_DEFAULTS, then settings.VIGIL_FEEDBACK, then the fleet's "feedback_*" config keys."""
    values = {**FEEDBACK_DEFAULTS, **getattr(settings, "VIGIL_FEEDBACK", {})}
    for key, value in (fleet.config or {}).items():
        if key.startswith("feedback_"):
            values[key.removeprefix("feedback_")] = value
    return values


# --- reading what reviewers said -------------------------------------------------------------------

def _active_version(fleet: Fleet) -> BaselineVersion:
    version = BaselineVersion.objects.filter(fleet=fleet, is_active=True).first()
    if version is None:
        raise ProposalError("fleet", f"{fleet.name} has no active baseline version; run the pipeline first")
    return version


def proposal_staleness(proposal: BaselineProposal) -> str:
    """Why proposal can no longer be approved because its fleet's baselines moved on, or "": a proposal
    is computed from one baseline version's statistics (its evidence, its adjustment); once another
    version is active, applying it there could count a change twice."""
    active = BaselineVersion.objects.filter(fleet_id=proposal.fleet_id, is_active=True).first()
    if active is None or active.pk == proposal.baseline_version_id:
        return ""
    made = proposal.baseline_version.number
    return (f"proposal {proposal.pk} was made against baseline v{made}; v{active.number} is active now: ask for "
            f"new suggestions, or reject it")


def _load_set(version: BaselineVersion) -> engine.BaselineSet:
    try:
        return load_artifact(version.artifact_path, kind="baselines", checksum=version.artifact_checksum or None)
    except ArtifactError as exc:
        raise ProposalError("baseline_version", str(exc)) from None


def _latest_run(fleet: Fleet) -> PipelineRun:
    run = (PipelineRun.objects.filter(fleet=fleet, status__in=[RunStatus.SUCCEEDED, RunStatus.DEGRADED],
                                      model_version__isnull=False)
           .select_related("model_version").order_by("-created_at", "-id").first())
    if run is None:
        raise ProposalError("fleet", f"{fleet.name} has no scored run; run the pipeline first")
    return run


def _pipeline_config(fleet: Fleet, run: PipelineRun) -> PipelineConfig:
    try:
        artifact = load_artifact(run.model_version.artifact_path, kind="model",
                                 checksum=run.model_version.artifact_checksum or None)
        return artifact["config"]
    except (ArtifactError, KeyError, TypeError):  # an older artifact: rebuild from the fleet's settings
        return PipelineConfig.from_settings(fleet.detection_config(), cohort_columns=fleet.cohort_columns)


def review_frames(*, fleet: Fleet, run: PipelineRun, config: PipelineConfig
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """The engine's inputs for run: (anomalies, feedback, feature_domain).

    anomalies: one row per anomaly (label -1) of run: anomaly_id, device_id, timestamp, external_id,
    the device attribute columns, top_feature (top_metrics[0].feature) and every engineered feature's
    value at that row (rebuilt from telemetry with the run's feature configuration). feedback: rows x
    (anomaly_id, verdict) of every reviewer's current verdict on those anomalies.
    """
    results = pd.DataFrame.from_records(
        AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).values_list("id", "device_id", "timestamp",
                                                                               "top_metrics"),
        columns=["anomaly_id", "device_id", "timestamp", "top_metrics"])
    feedback = pd.DataFrame.from_records(
        AnomalyFeedback.objects.filter(anomaly__run=run).values_list("anomaly_id", "verdict"),
        columns=["anomaly_id", "verdict"])
    frame = load_telemetry_frame(fleet)
    ff = build_features(frame, fleet.metric_names, config.features)
    feature_domain = {f: fleet.metric_domains.get(m, "other") for f, m in ff.feature_metric.items()}
    if results.empty:
        return results.assign(top_feature=[]), feedback, feature_domain
    results["timestamp"] = pd.to_datetime(results["timestamp"], utc=True)
    results["top_feature"] = results["top_metrics"].map(lambda t: t[0]["feature"] if t else "")
    features = ff.frame.copy()
    features["timestamp"] = pd.to_datetime(features["timestamp"], utc=True)
    anomalies = results.drop(columns="top_metrics").merge(features, on=["device_id", "timestamp"], how="left")
    return anomalies, feedback, feature_domain


def _temporal_features(config: PipelineConfig, baselines: engine.BaselineSet, metrics: list[str]) -> list[str]:
    """The baseline features whose device-level z-scores make the hybrid detector's temporal score
    (pipeline.model_inputs); [] when the model has no such score."""
    if not getattr(DETECTORS.get(config.algorithm), "uses_temporal", False) or config.temporal != "baseline":
        return []
    return [f"{m}_roll_mean" for m in metrics if f"{m}_roll_mean" in baselines.features]


def _current_contamination(fleet: Fleet, baselines: engine.BaselineSet) -> float:
    return float(engine.model_overrides(baselines).get("contamination",
                                                        fleet.detection_config().get("contamination", 0.03)))


# --- proposing -------------------------------------------------------------------------------------

def proposals_suggest(*, fleet: Fleet, user=None, actor_label: str = "") -> list[BaselineProposal]:
    """Create pending proposals from the reviewed anomalies of fleet's latest scored run.

    The rule engine proposes (baselines.engine.suggest_baseline_adjustments); when settings.VIGIL_LLM
    configures an LLM it is asked too, and each of its answers that validate_llm_proposal accepts is
    added (source "llm"). A proposal equal to a pending one (kind, level, group, feature) is skipped.
    Pending proposals made against an earlier baseline version are rejected first, as superseded (audited;
    they could no longer be approved).
    Each new proposal is audited (PROPOSAL_CREATED). With the fleet config feedback_auto_apply, those
    within the tighter auto bounds are approved by the system actor at once and applied together (one
    baseline version, one retrain). Returns the new proposals.
    Raises ProposalError("fleet") when there is no active baseline version or scored run.
    """
    opts = feedback_settings(fleet)
    version = _active_version(fleet)
    baselines = _load_set(version)
    run = _latest_run(fleet)
    config = _pipeline_config(fleet, run)
    anomalies, feedback, feature_domain = review_frames(fleet=fleet, run=run, config=config)
    if anomalies.empty or feedback.empty:
        return []
    levels = [lv for lv in opts["levels"] if lv in baselines.levels]
    bounds = tuple(opts["mad_factor_bounds"])
    suggestions = [(fb, ProposalSource.RULES) for fb in engine.suggest_baseline_adjustments(
        anomalies, feedback, baselines, levels, min_count=int(opts["min_count"]), min_share=float(opts["min_share"]),
        z_min=float(opts["z_min"]), learning_rate=float(opts["learning_rate"]),
        max_shift_mad=float(opts["max_shift_mad"]), mad_factor_bounds=bounds,
        contamination=_current_contamination(fleet, baselines), feature_domain=feature_domain,
        domain_weights=fleet.detection_config().get("domain_weights", {}),
        temporal_features=_temporal_features(config, baselines, fleet.metric_names))]
    suggestions += [(fb, ProposalSource.LLM) for fb in _llm_suggestions(
        anomalies, feedback, baselines, levels, opts)]

    created: list[BaselineProposal] = []
    with transaction.atomic():
        # Pending proposals made against an earlier baseline version can no longer be approved
        # (proposal_staleness); this round replaces them, so they are rejected as superseded.
        for stale in BaselineProposal.objects.filter(fleet=fleet, status=ProposalStatus.PENDING).exclude(
                baseline_version=version).select_related("baseline_version"):
            _supersede(stale, version)
        pending = {(p.kind, p.level, json.dumps(p.group_key, sort_keys=True, default=str), p.feature)
                   for p in BaselineProposal.objects.filter(fleet=fleet, status=ProposalStatus.PENDING)}
        for fb, source in suggestions:
            if fb.key() in pending:
                continue
            pending.add(fb.key())
            proposal = BaselineProposal.objects.create(
                fleet=fleet, baseline_version=version, kind=fb.kind, level=fb.level, group_key=fb.group_key,
                feature=fb.feature, adjustment=fb.adjustment, learning_rate=float(opts["learning_rate"]),
                reason=fb.reason, evidence=_jsonable(fb.evidence), source=source, proposed_by=user)
            audit_record(action=AuditAction.PROPOSAL_CREATED, actor=user, actor_label=actor_label or SYSTEM_ACTOR,
                         fleet=fleet, target=proposal, after=_proposal_state(proposal), reason=fb.reason)
            created.append(proposal)
    if opts["auto_apply"]:
        auto = [p for p in created if _within(p, baselines, max_shift_mad=float(opts["auto_max_shift_mad"]),
                                              mad_factor_bounds=tuple(opts["auto_mad_factor_bounds"]))]
        with transaction.atomic():
            for proposal in auto:
                _approve(proposal, user=None, actor_label=SYSTEM_ACTOR,
                         comment="approved automatically (within the auto bounds)", enqueue=False)
            if auto:  # applied together: one baseline version, one retrain
                from .tasks import enqueue_apply_chain

                ids = [p.pk for p in auto]
                transaction.on_commit(lambda: enqueue_apply_chain(ids))
    return created


def _supersede(proposal: BaselineProposal, version: BaselineVersion) -> None:
    """Reject a pending proposal of an earlier baseline version on the system actor's behalf (audited)."""
    reason = (f"superseded: made against baseline v{proposal.baseline_version.number}, and suggestions were "
              f"made again on v{version.number}")
    _decide_pending(proposal, ProposalStatus.REJECTED, user=None, actor_label=SYSTEM_ACTOR, comment=reason)


def _llm_suggestions(anomalies, feedback, baselines, levels, opts) -> list[engine.BaselineFeedback]:
    """Ask the configured LLM for shift / mad_scale proposals; keep those validate_llm_proposal accepts."""
    from explanations.llm import ChatClient, LLMConfig, LLMError

    values = getattr(settings, "VIGIL_LLM", {})
    config = LLMConfig.from_mapping(values)
    if values.get("provider", "builtin") == "builtin" or not config.configured:
        return []
    evidence = engine.feedback_evidence(anomalies, feedback, baselines, levels, z_min=float(opts["z_min"]))
    evidence = evidence[evidence["n_false_positive"] >= int(opts["min_count"])]
    if evidence.empty:
        return []
    table = evidence.sort_values("n_false_positive", ascending=False).head(20)
    messages = [
        {"role": "system", "content": (
            "You tune the robust baselines (median, MAD) of an anomaly detector from reviewers' verdicts. "
            "Answer with a JSON list only. Each item: {\"level\", \"group_key\" (object), \"feature\", \"kind\" "
            "(\"shift\" in feature units or \"mad_scale\" as a factor), \"adjustment\", \"reason\" citing the "
            "counts}. Propose only where most reviewed anomalies are false positives.")},
        {"role": "user", "content": json.dumps(table.to_dict(orient="records"), default=str)},
    ]
    try:
        answer = ChatClient(config).chat(messages)
        raw = json.loads(answer.text.strip().removeprefix("```json").removesuffix("```").strip())
    except (LLMError, ValueError) as exc:
        logger.warning("LLM proposals unavailable, using the rule engine only: %s", exc)
        return []
    accepted = []
    for item in raw if isinstance(raw, list) else [raw]:
        try:
            accepted.append(engine.validate_llm_proposal(
                item, baselines, evidence, learning_rate=float(opts["learning_rate"]),
                max_shift_mad=float(opts["max_shift_mad"]), mad_factor_bounds=tuple(opts["mad_factor_bounds"])))
        except engine.AdjustmentRefused as exc:
            logger.info("LLM proposal refused: %s", exc.reason)
    return accepted


def _feedback_of(proposal: BaselineProposal) -> engine.BaselineFeedback:
    return engine.BaselineFeedback(proposal.level, dict(proposal.group_key), proposal.feature, proposal.adjustment,
                                   proposal.reason, proposal.kind, dict(proposal.evidence))


def _within(proposal, baselines, *, max_shift_mad, mad_factor_bounds) -> bool:
    try:
        engine.apply_feedback(baselines, [_feedback_of(proposal)], proposal.learning_rate,
                              max_shift_mad=max_shift_mad, mad_factor_bounds=mad_factor_bounds)
        return True
    except engine.AdjustmentRefused:
        return False


# --- preview ---------------------------------------------------------------------------------------

def proposal_preview_impact(*, proposal: BaselineProposal) -> dict:
    """Re-score the fleet's data with the active baselines adjusted by proposal, persisting nothing but
    the summary, which is returned and stored in proposal.impact: before_anomalies / after_anomalies
    (flagged rows of the latest run / of the preview), cleared (flagged before, not after),
    cleared_true_positive (of those, confirmed true positive by a reviewer), new (flagged only after),
    scored_rows, computed_at (ISO). Raises ProposalError when the adjustment is refused or the re-score
    fails.
    """
    fleet = proposal.fleet
    opts = feedback_settings(fleet)
    adjusted = _adjusted_set(_load_set(_active_version(fleet)), [proposal], opts)
    run = _latest_run(fleet)
    config = _pipeline_config(fleet, run)
    frame = load_telemetry_frame(fleet)
    try:
        output = run_core(frame, metrics=fleet.metric_names, metric_domain=fleet.metric_domains,
                          config=_rerun_config(fleet, config), baselines=adjusted)
    except (StageError, ValueError) as exc:
        raise ProposalError("proposal", f"the preview re-score failed: {exc}") from None
    after = output.scored.loc[output.result.labels == Label.ANOMALY, ["device_id", "timestamp"]]
    before = pd.DataFrame.from_records(
        AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).values_list("id", "device_id", "timestamp"),
        columns=["id", "device_id", "timestamp"])
    confirmed = set(AnomalyFeedback.objects.filter(anomaly__run=run, verdict="true_positive")
                    .values_list("anomaly_id", flat=True))
    key = lambda df: set(zip(df["device_id"].astype(int), pd.to_datetime(df["timestamp"], utc=True)))  # noqa: E731
    before_keys, after_keys = key(before), key(after)
    cleared = before_keys - after_keys
    before["key"] = list(zip(before["device_id"].astype(int), pd.to_datetime(before["timestamp"], utc=True)))
    impact = {
        "before_anomalies": len(before_keys), "after_anomalies": len(after_keys), "cleared": len(cleared),
        "cleared_true_positive": int(before[before["key"].isin(cleared) & before["id"].isin(confirmed)].shape[0]),
        "new": len(after_keys - before_keys), "scored_rows": len(output.scored),
        "computed_at": timezone.now().isoformat(),
    }
    BaselineProposal.objects.filter(pk=proposal.pk).update(impact=impact, updated_at=timezone.now())
    proposal.impact = impact
    return impact


def _adjusted_set(baselines, proposals, opts) -> engine.BaselineSet:
    feedback = [_feedback_of(p) for p in proposals]
    rate = proposals[0].learning_rate if proposals else float(opts["learning_rate"])
    try:
        return engine.apply_feedback(baselines, feedback, rate, max_shift_mad=float(opts["max_shift_mad"]),
                                     mad_factor_bounds=tuple(opts["mad_factor_bounds"]))
    except engine.AdjustmentRefused as exc:
        raise ProposalError("adjustment", exc.reason) from None


def _rerun_config(fleet: Fleet, config: PipelineConfig) -> PipelineConfig:
    """The fleet's current pipeline settings with the latest run's training window (what a retrain runs)."""
    return PipelineConfig.from_settings(fleet.detection_config(), cohort_columns=fleet.cohort_columns,
                                        window=config.window)


# --- deciding --------------------------------------------------------------------------------------

def _check_approver(proposal: BaselineProposal, user) -> None:
    if user is None or not user_has_role(user, Role.APPROVER):
        raise ProposalError("user", "only an approver may decide on a baseline adjustment")


def proposal_approve(*, proposal: BaselineProposal, user, comment: str = "", enqueue: bool = True
                     ) -> BaselineProposal:
    """Approve a pending proposal (approver role; with the fleet config feedback_require_distinct_approver,
    someone other than its proposer) made against the fleet's active baseline version. Audited
    (PROPOSAL_APPROVED); once committed the Celery chain applies it (enqueue=False leaves that to the
    caller, e.g. to apply several at once). Raises ProposalError("user"), ProposalError("status") or
    ProposalError("baseline_version") (made against a version no longer active: proposal_staleness)."""
    _check_approver(proposal, user)
    if feedback_settings(proposal.fleet)["require_distinct_approver"] and proposal.proposed_by_id == user.pk:
        raise ProposalError("user", "this fleet requires an approver other than the one who proposed it")
    if proposal.status == ProposalStatus.PENDING and (stale := proposal_staleness(proposal)):
        raise ProposalError("baseline_version", stale)
    return _approve(proposal, user=user, actor_label="", comment=comment, enqueue=enqueue)


_DECISION_AUDIT = {ProposalStatus.APPROVED: AuditAction.PROPOSAL_APPROVED,
                   ProposalStatus.REJECTED: AuditAction.PROPOSAL_REJECTED}


def _decide_pending(proposal: BaselineProposal, status: str, *, user, actor_label: str = "", comment: str) -> bool:
    """Move a pending proposal to status (approved or rejected), decided by user (None: the system actor
    actor_label) with comment (stored stripped), and audit it, in one conditional update. proposal is
    refreshed from the database. Returns False, with nothing written, when it was no longer pending."""
    now = timezone.now()
    done = BaselineProposal.objects.filter(pk=proposal.pk, status=ProposalStatus.PENDING).update(
        status=status, decided_by=user, decided_at=now, decision_comment=comment.strip(), updated_at=now)
    proposal.refresh_from_db()
    if done == 1:
        audit_record(action=_DECISION_AUDIT[status], actor=user, actor_label=actor_label, fleet=proposal.fleet,
                     target=proposal, before={"status": ProposalStatus.PENDING}, after={"status": status},
                     reason=comment)
    return done == 1


def _approve(proposal, *, user, actor_label, comment, enqueue) -> BaselineProposal:
    with transaction.atomic():
        if not _decide_pending(proposal, ProposalStatus.APPROVED, user=user, actor_label=actor_label,
                               comment=comment):
            raise ProposalError("status", f"proposal {proposal.pk} is {proposal.status}; only a pending one can "
                                          f"be approved")
        if enqueue:
            from .tasks import enqueue_apply_chain

            pk = proposal.pk
            transaction.on_commit(lambda: enqueue_apply_chain([pk]))
    return proposal


PROPOSALS_DECIDE_MAX = 100


def proposals_decide(*, ids: list[int], user, approve: bool, comment: str = "", enqueue: bool = True
                     ) -> list[BaselineProposal]:
    """Approve (or reject) several pending proposals of one fleet at once, each as proposal_approve or
    proposal_reject would (role, same-approver rule, audit), all or none: one transaction, so a refusal
    leaves every proposal as it was. Approved ones are applied together once committed (proposals_apply:
    one baseline version, one retrain, one re-score), not one chain each. ids: 1 .. PROPOSALS_DECIDE_MAX
    proposal ids. Returns the proposals in the order given. Raises ProposalError naming the field:
    "proposals" (none, too many, unknown ids, several fleets), "user", "status"."""
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ProposalError("proposals", "select at least one proposal")
    if len(ids) > PROPOSALS_DECIDE_MAX:
        raise ProposalError("proposals", f"at most {PROPOSALS_DECIDE_MAX} at a time, got {len(ids)}")
    found = {p.pk: p for p in BaselineProposal.objects.filter(pk__in=ids).select_related("fleet")}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ProposalError("proposals", f"no proposal {ids_text(missing)}")
    if len({p.fleet_id for p in found.values()}) > 1:
        raise ProposalError("proposals", "proposals decided together must belong to one fleet")
    with transaction.atomic():
        if approve:
            done = [proposal_approve(proposal=found[i], user=user, comment=comment, enqueue=False) for i in ids]
            if enqueue:
                from .tasks import enqueue_apply_chain

                transaction.on_commit(lambda: enqueue_apply_chain(list(ids)))
        else:
            done = [proposal_reject(proposal=found[i], user=user, comment=comment) for i in ids]
    return done


def proposal_reject(*, proposal: BaselineProposal, user, comment: str = "") -> BaselineProposal:
    """Reject a pending proposal (approver role). Audited (PROPOSAL_REJECTED). Raises ProposalError."""
    _check_approver(proposal, user)
    with transaction.atomic():
        if not _decide_pending(proposal, ProposalStatus.REJECTED, user=user, comment=comment):
            raise ProposalError("status", f"proposal {proposal.pk} is {proposal.status}; only a pending one can "
                                          f"be rejected")
    return proposal


# --- applying: the steps of the Celery chain -------------------------------------------------------

def proposal_apply(*, proposal_id: int) -> BaselineProposal:
    """Apply one approved proposal: every step of the chain in order (what the eager chain amounts to)."""
    proposals_apply(proposal_ids=[proposal_id])
    return BaselineProposal.objects.get(pk=proposal_id)


def proposals_apply(*, proposal_ids: list[int]) -> list[BaselineProposal]:
    """Apply approved proposals of one fleet together (one baseline version, one retrain)."""
    apply_step_baseline(proposal_ids=proposal_ids)
    apply_step_retrain(proposal_ids=proposal_ids)
    apply_step_finish(proposal_ids=proposal_ids)
    return list(BaselineProposal.objects.filter(pk__in=proposal_ids))


def _approved(proposal_ids) -> list[BaselineProposal]:
    proposals = list(BaselineProposal.objects.filter(pk__in=proposal_ids, status=ProposalStatus.APPROVED)
                     .select_related("fleet").order_by("id"))
    if len({p.fleet_id for p in proposals}) > 1:
        raise ProposalError("proposal_ids", "proposals applied together must belong to one fleet")
    return proposals


def _fail(proposal_ids, reason: str) -> None:
    for proposal in BaselineProposal.objects.filter(pk__in=proposal_ids, status=ProposalStatus.APPROVED):
        with transaction.atomic():
            if BaselineProposal.objects.filter(pk=proposal.pk, status=ProposalStatus.APPROVED).update(
                    status=ProposalStatus.FAILED, error=reason[:5000], updated_at=timezone.now()) == 1:
                audit_record(action=AuditAction.PROPOSAL_FAILED, actor_label=SYSTEM_ACTOR, fleet=proposal.fleet,
                             target=proposal, before={"status": ProposalStatus.APPROVED},
                             after={"status": ProposalStatus.FAILED}, reason=reason)


def apply_step_baseline(*, proposal_ids: list[int]) -> BaselineVersion | None:
    """Step 1: a new, not yet active baseline version (number + 1) = the active one + apply_feedback, with
    its statistics rows and artifact (source "feedback"). Claimed with a conditional update of
    result_baseline_version, so a retried task never makes a second version. On failure the proposals
    are marked failed and None is returned."""
    proposals = [p for p in _approved(proposal_ids) if p.result_baseline_version_id is None]
    if not proposals:
        return None
    fleet = proposals[0].fleet
    version = None
    try:
        active = _active_version(fleet)
        adjusted = _adjusted_set(_load_set(active), proposals, feedback_settings(fleet))
        with transaction.atomic():
            reason = "; ".join(f"proposal {p.pk}: {p}" for p in proposals)
            version = baseline_version_create(
                fleet=fleet, baselines=adjusted, tag="feedback", source="feedback",
                reason=f"from v{active.number} by {reason}", row_count=active.row_count,
                created_by=proposals[0].decided_by)
            claimed = BaselineProposal.objects.filter(
                pk__in=[p.pk for p in proposals], status=ProposalStatus.APPROVED,
                result_baseline_version__isnull=True).update(result_baseline_version=version)
            if claimed != len(proposals):
                raise _AlreadyClaimed()
        return version
    except _AlreadyClaimed:
        Path(version.artifact_path).unlink(missing_ok=True)
        return None
    except Exception as exc:  # any failure: the old versions stay active
        logger.exception("building the baseline version for proposals %s failed", proposal_ids)
        if version is not None and not BaselineVersion.objects.filter(pk=version.pk).exists():
            Path(version.artifact_path).unlink(missing_ok=True)
        _fail(proposal_ids, f"baseline step failed: {exc}")
        return None


class _AlreadyClaimed(Exception):
    pass


def apply_step_retrain(*, proposal_ids: list[int]) -> PipelineRun | None:
    """Steps 2-4: a pipeline run on the new baseline version (params baseline_version_id): it retrains
    the model on the re-normalised features, re-scores and persists, activating the new baseline
    version and the new model version in its persist transaction. Claimed via result_run. A failed run
    marks the proposals failed with its error; the old versions then stay active."""
    proposals = [p for p in _approved(proposal_ids) if p.result_baseline_version_id and p.result_run_id is None]
    if not proposals:
        return None
    fleet = proposals[0].fleet
    version = proposals[0].result_baseline_version
    try:
        latest = _latest_run(fleet)
        params = {k: v for k, v in latest.params.items() if k in ("train_until", "train_rows_per_device", "score")}
        with transaction.atomic():
            run = pipeline_run_create(fleet=fleet, trigger=Trigger.SCHEDULE, user=proposals[0].decided_by,
                                      params={**params, "baseline_version_id": version.id})
            claimed = BaselineProposal.objects.filter(pk__in=[p.pk for p in proposals], result_run__isnull=True,
                                                      status=ProposalStatus.APPROVED).update(result_run=run)
            if claimed != len(proposals):
                raise _AlreadyClaimed()
            audit_record(action=AuditAction.RETRAIN_TRIGGERED, actor=proposals[0].decided_by, fleet=fleet,
                         target=run, after={"baseline_version": version.number},
                         reason=f"applying proposal(s) {', '.join(str(p.pk) for p in proposals)}")
        run = pipeline_run_execute(run_id=run.id)
    except _AlreadyClaimed:
        return None
    except Exception as exc:
        logger.exception("retraining for proposals %s failed", proposal_ids)
        _fail(proposal_ids, f"retrain failed: {exc}")
        return None
    if run.status != RunStatus.SUCCEEDED:
        _fail(proposal_ids, f"retrain run {run.id} {run.status}: {run.error}")
    return run


def apply_step_finish(*, proposal_ids: list[int]) -> list[BaselineProposal]:
    """Step 5: mark the proposals applied (result_* set, audited) and notify open pages over the
    websocket (detection.push). Only proposals whose run succeeded are touched."""
    from detection.push import push_versions_changed

    done = []
    for proposal in _approved(proposal_ids):
        run = proposal.result_run
        if run is None or run.status != RunStatus.SUCCEEDED:
            continue
        with transaction.atomic():
            if BaselineProposal.objects.filter(pk=proposal.pk, status=ProposalStatus.APPROVED).update(
                    status=ProposalStatus.APPLIED, result_model_version=run.model_version,
                    updated_at=timezone.now()) != 1:
                continue
            proposal.refresh_from_db()
            audit_record(action=AuditAction.PROPOSAL_APPLIED, actor_label=SYSTEM_ACTOR, fleet=proposal.fleet,
                         target=proposal, before={"status": ProposalStatus.APPROVED},
                         after={"status": ProposalStatus.APPLIED,
                                "baseline_version": proposal.result_baseline_version.number,
                                "model_version": run.model_version.version if run.model_version else None,
                                "run": run.id, "anomalies": run.n_anomalies})
            done.append(proposal)
    if done:
        fleet = done[0].fleet
        transaction.on_commit(lambda: push_versions_changed(fleet))
    return done


# --- rollback --------------------------------------------------------------------------------------

def baseline_version_rollback(*, fleet: Fleet, to_version: BaselineVersion, user, reason: str = ""
                              ) -> BaselineVersion:
    """A NEW version (number + 1, source "rollback") carrying to_version's statistics, activated
    atomically; history is never rewritten. Approver role. Audited (BASELINE_ROLLED_BACK and
    BASELINE_ACTIVATED). Raises ProposalError("user") or ProposalError("to_version")."""
    if user is None or not user_has_role(user, Role.APPROVER):
        raise ProposalError("user", "only an approver may roll baselines back")
    to_version = BaselineVersion.objects.get(pk=to_version.pk)  # the caller's copy may predate a switch
    if to_version.fleet_id != fleet.pk:
        raise ProposalError("to_version", f"v{to_version.number} is not a baseline version of {fleet.name}")
    if to_version.is_active:
        raise ProposalError("to_version", f"v{to_version.number} is already the active baseline version")
    baselines = _load_set(to_version)
    version = None
    try:
        with transaction.atomic():
            current = BaselineVersion.objects.filter(fleet=fleet, is_active=True).first()
            text = reason.strip() or f"rolled back to v{to_version.number}"
            version = baseline_version_create(
                fleet=fleet, baselines=baselines, tag="rollback", source="rollback",
                reason=f"copy of v{to_version.number}: {text}", row_count=to_version.row_count, created_by=user)
            audit_record(action=AuditAction.BASELINE_ROLLED_BACK, actor=user, fleet=fleet, target=version,
                         before={"active_version": current.number if current else None},
                         after={"active_version": version.number, "copy_of": to_version.number}, reason=text)
            version = baseline_version_activate(version=version, actor=user, reason=text)
    except Exception:
        if version is not None:
            Path(version.artifact_path).unlink(missing_ok=True)
        raise
    return version


# --- periodic --------------------------------------------------------------------------------------

def proposals_suggest_all(*, actor_label: str = "celery-beat") -> dict[str, int]:
    """proposals_suggest for every fleet that has an active baseline and a scored run; {fleet: created}."""
    created = {}
    for fleet in Fleet.objects.all():
        try:
            created[fleet.name] = len(proposals_suggest(fleet=fleet, actor_label=actor_label))
        except ProposalError as exc:
            logger.info("no proposals for %s: %s", fleet.name, exc)
    return created


def _proposal_state(proposal: BaselineProposal) -> dict:
    return {"status": proposal.status, "kind": proposal.kind, "level": proposal.level,
            "group_key": proposal.group_key, "feature": proposal.feature, "adjustment": proposal.adjustment,
            "source": proposal.source}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    return value
