"""The feedback loop through its services, Celery chain and command, on a tiny generated fleet."""
import json

import pandas as pd
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command

from baselines import services
from baselines.choices import ProposalStatus
from baselines.engine import model_overrides
from baselines.models import BaselineProposal, BaselineStatistic, BaselineVersion
from detection.choices import AuditAction, Label, ModelStatus, RunStatus, Verdict
from detection.ingest.loader import ingest_batch, load_ground_truth
from detection.ingest.synthetic import generate_fleet
from detection.ml.artifacts import load_artifact
from detection.ml.detectors import HybridAnomalyDetector
from detection.ml.evaluation import in_windows
from detection.models import AnomalyResult, AuditEvent, Fleet, ModelVersion, PipelineRun
from detection.services import PipelineRunError, feedback_give, pipeline_run_create, pipeline_run_execute
from tests.factories import BaselineVersionFactory, FleetFactory

pytestmark = pytest.mark.django_db


def _user(name, role=None):
    user = get_user_model().objects.create_user(name, password="pw")
    if role:
        user.groups.add(Group.objects.get_or_create(name=role)[0])
    return user


@pytest.fixture
def fleet(settings):
    settings.VIGIL_DETECTION = {**settings.VIGIL_DETECTION, "n_estimators": 40, "n_jobs": 1}
    settings.VIGIL_LIVE_PUSH = False
    ingest_batch(batch=generate_fleet(devices=10, days=4, seed=3), fleet_name="tiny")
    fleet = Fleet.objects.get(name="tiny")
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert run.status == RunStatus.SUCCEEDED, run.error
    return fleet


@pytest.fixture
def bare_fleet():
    """A fleet with an active baseline version and nothing else: enough to decide on proposals."""
    fleet = FleetFactory(name="bare")
    BaselineVersionFactory(fleet=fleet, number=1, is_active=True)
    return fleet


@pytest.fixture
def people():
    return {"outsider": _user("outsider"), "reviewer": _user("rev", "reviewer"),
            "approver": _user("appr", "approver"), "approver2": _user("appr2", "approver")}


def _proposal(fleet, *, proposed_by=None, adjustment=0.02):
    return BaselineProposal.objects.create(
        fleet=fleet, baseline_version=BaselineVersion.objects.get(fleet=fleet, is_active=True),
        kind="contamination", level="model", feature="contamination", adjustment=adjustment,
        reason="test", evidence={"current": 0.03, "n_false_positive": 9, "n_reviewed": 10}, proposed_by=proposed_by)


def _actions(fleet):
    return list(AuditEvent.objects.filter(fleet=fleet).values_list("action", flat=True))


@pytest.mark.parametrize("who", ["outsider", "reviewer"])
def test_outsider_and_reviewer_cannot_approve_or_reject_an_adjustment(bare_fleet, people, who):
    proposal = _proposal(bare_fleet)
    for decide in (services.proposal_approve, services.proposal_reject):
        with pytest.raises(services.ProposalError) as caught:
            decide(proposal=proposal, user=people[who])
        assert caught.value.field == "user"
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.PENDING and proposal.decided_by is None


def test_distinct_approver_rule(bare_fleet, people):
    bare_fleet.config = {"feedback_require_distinct_approver": True}
    bare_fleet.save()
    proposal = _proposal(bare_fleet, proposed_by=people["approver"])
    with pytest.raises(services.ProposalError, match="other than the one who proposed"):
        services.proposal_approve(proposal=proposal, user=people["approver"], enqueue=False)
    services.proposal_approve(proposal=proposal, user=people["approver2"], enqueue=False)
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.APPROVED and proposal.decided_by == people["approver2"]


def test_only_a_pending_proposal_can_be_decided(bare_fleet, people):
    proposal = _proposal(bare_fleet)
    services.proposal_reject(proposal=proposal, user=people["approver"], comment="no")
    assert proposal.status == ProposalStatus.REJECTED
    with pytest.raises(services.ProposalError) as caught:
        services.proposal_approve(proposal=proposal, user=people["approver"])
    assert caught.value.field == "status"
    assert AuditAction.PROPOSAL_REJECTED in _actions(bare_fleet)


def test_approval_runs_the_chain_and_switches_versions_atomically(fleet, people, django_capture_on_commit_callbacks):
    old_baseline = BaselineVersion.objects.get(fleet=fleet, is_active=True)
    old_model = ModelVersion.objects.get(fleet=fleet, status=ModelStatus.PRODUCTION)
    proposal = _proposal(fleet)
    with django_capture_on_commit_callbacks(execute=True):
        services.proposal_approve(proposal=proposal, user=people["approver"], comment="ok")
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.APPLIED, proposal.error
    new = proposal.result_baseline_version
    assert BaselineVersion.objects.filter(fleet=fleet, is_active=True).get() == new
    assert (new.number, new.source) == (old_baseline.number + 1, "feedback")
    old_baseline.refresh_from_db()
    assert not old_baseline.is_active and old_baseline.valid_to is not None
    assert BaselineStatistic.objects.filter(version=new).count() == BaselineStatistic.objects.filter(
        version=old_baseline).count()
    adjusted = load_artifact(new.artifact_path, kind="baselines", checksum=new.artifact_checksum)
    assert model_overrides(adjusted)["contamination"] == pytest.approx(0.03 + 0.35 * (0.02 - 0.03))
    run = proposal.result_run
    assert run.status == RunStatus.SUCCEEDED and run.baseline_version == new
    assert proposal.result_model_version == run.model_version
    assert run.model_version.status == ModelStatus.PRODUCTION
    old_model.refresh_from_db()
    assert old_model.status == ModelStatus.RETIRED
    assert not AnomalyResult.objects.filter(run=run).exclude(baseline_version=new).exists()
    assert run.n_anomalies < PipelineRun.objects.get(id=old_model.run_id).n_anomalies  # contamination lowered
    actions = _actions(fleet)
    for action in (AuditAction.PROPOSAL_APPROVED, AuditAction.RETRAIN_TRIGGERED, AuditAction.BASELINE_ACTIVATED,
                   AuditAction.PROPOSAL_APPLIED):
        assert action in actions
    # a redelivered step finds its work claimed and does nothing
    assert services.apply_step_baseline(proposal_ids=[proposal.pk]) is None
    assert services.apply_step_retrain(proposal_ids=[proposal.pk]) is None
    assert BaselineVersion.objects.filter(fleet=fleet).count() == 2 and PipelineRun.objects.filter(
        fleet=fleet).count() == 2


def test_proposals_approved_together_make_one_baseline_version_and_one_retrain(fleet, people,
                                                                             django_capture_on_commit_callbacks):
    active = BaselineVersion.objects.get(fleet=fleet, is_active=True)
    stat = BaselineStatistic.objects.filter(version=active, level="cohort").order_by("pk").first()
    shift = BaselineProposal.objects.create(
        fleet=fleet, baseline_version=active, kind="shift", level="cohort", group_key=json.loads(stat.group_key),
        feature=stat.feature, adjustment=0.5 * stat.mad, reason="test",
        evidence={"n_false_positive": 9, "n_reviewed": 10}, proposed_by=None)
    contamination = _proposal(fleet)
    runs_before = PipelineRun.objects.filter(fleet=fleet).count()
    with django_capture_on_commit_callbacks(execute=True):
        done = services.proposals_decide(ids=[shift.pk, contamination.pk], user=people["approver"], approve=True,
                                         comment="both are consistent false positives")
    assert [p.pk for p in done] == [shift.pk, contamination.pk]
    shift.refresh_from_db()
    contamination.refresh_from_db()
    assert {shift.status, contamination.status} == {ProposalStatus.APPLIED}, (shift.error, contamination.error)
    new = shift.result_baseline_version
    assert contamination.result_baseline_version == new and new.number == active.number + 1
    assert shift.result_run == contamination.result_run  # one retrain, one re-score
    assert BaselineVersion.objects.filter(fleet=fleet).count() == 2
    assert PipelineRun.objects.filter(fleet=fleet).count() == runs_before + 1
    adjusted = load_artifact(new.artifact_path, kind="baselines", checksum=new.artifact_checksum)
    assert model_overrides(adjusted)["contamination"] == pytest.approx(0.03 + 0.35 * (0.02 - 0.03))
    moved = BaselineStatistic.objects.get(version=new, level="cohort", group_key=stat.group_key, feature=stat.feature)
    assert moved.median == pytest.approx(stat.median + 0.35 * 0.5 * stat.mad)
    assert _actions(fleet).count(AuditAction.PROPOSAL_APPROVED) == 2


def test_deciding_several_proposals_is_all_or_none(bare_fleet, people):
    first, second, third = (_proposal(bare_fleet) for _ in range(3))
    services.proposal_reject(proposal=third, user=people["approver"])
    with pytest.raises(services.ProposalError) as caught:
        services.proposals_decide(ids=[first.pk, second.pk, third.pk], user=people["approver"], approve=True)
    assert caught.value.field == "status" and f"proposal {third.pk} is rejected" in str(caught.value)
    assert set(BaselineProposal.objects.filter(pk__in=[first.pk, second.pk]).values_list("status", flat=True)) == {
        ProposalStatus.PENDING}
    assert _actions(bare_fleet).count(AuditAction.PROPOSAL_APPROVED) == 0
    other = FleetFactory(name="other")
    BaselineVersionFactory(fleet=other, number=1, is_active=True)
    for ids, message in (([], "select at least one"), ([first.pk, 10**9], f"no proposal {10**9}"),
                         ([first.pk, _proposal(other).pk], "must belong to one fleet"),
                         (list(range(1, 102)), "at most 100")):
        with pytest.raises(services.ProposalError, match=message) as caught:
            services.proposals_decide(ids=ids, user=people["approver"], approve=False)
        assert caught.value.field == "proposals"
    with pytest.raises(services.ProposalError) as caught:
        services.proposals_decide(ids=[first.pk, second.pk], user=people["reviewer"], approve=False)
    assert caught.value.field == "user"
    done = services.proposals_decide(ids=[first.pk, second.pk], user=people["approver"], approve=False, comment="no")
    assert {p.status for p in done} == {ProposalStatus.REJECTED}


def test_a_retrain_that_raises_leaves_the_old_versions_active(fleet, people, monkeypatch):
    old_baseline = BaselineVersion.objects.get(fleet=fleet, is_active=True)
    old_model = ModelVersion.objects.get(fleet=fleet, status=ModelStatus.PRODUCTION)

    def broken_fit(self, *args, **kwargs):
        raise RuntimeError("GPU on fire")

    monkeypatch.setattr(HybridAnomalyDetector, "fit", broken_fit)
    proposal = _proposal(fleet)
    services.proposal_approve(proposal=proposal, user=people["approver"], enqueue=False)
    services.proposal_apply(proposal_id=proposal.pk)
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.FAILED
    assert "retrain" in proposal.error and "GPU on fire" in proposal.error
    assert BaselineVersion.objects.get(fleet=fleet, is_active=True) == old_baseline
    assert ModelVersion.objects.get(fleet=fleet, status=ModelStatus.PRODUCTION) == old_model
    assert AuditAction.PROPOSAL_FAILED in _actions(fleet)


def test_rollback_creates_a_new_version_with_the_earlier_statistics(fleet, people, django_capture_on_commit_callbacks):
    first = BaselineVersion.objects.get(fleet=fleet, is_active=True)
    proposal = _proposal(fleet)
    with django_capture_on_commit_callbacks(execute=True):
        services.proposal_approve(proposal=proposal, user=people["approver"])
    with pytest.raises(services.ProposalError):
        services.baseline_version_rollback(fleet=fleet, to_version=first, user=people["reviewer"])
    back = services.baseline_version_rollback(fleet=fleet, to_version=first, user=people["approver"], reason="oops")
    assert back.number == 3 and back.source == "rollback" and back.is_active
    assert list(BaselineVersion.objects.filter(fleet=fleet, is_active=True)) == [back]
    stats = lambda v: sorted(BaselineStatistic.objects.filter(version=v).values_list(  # noqa: E731
        "level", "group_key", "feature", "median", "mad"))
    assert stats(back) == stats(first)
    first.refresh_from_db()
    assert not first.is_active and first.valid_to is not None  # history kept, not reactivated
    assert model_overrides(load_artifact(back.artifact_path, kind="baselines")) == {}
    assert AuditAction.BASELINE_ROLLED_BACK in _actions(fleet)


def _review_from_truth(fleet, reviewer):
    run = PipelineRun.objects.filter(fleet=fleet, status=RunStatus.SUCCEEDED).order_by("-id").first()
    anomalies = list(AnomalyResult.objects.filter(run=run, label=Label.ANOMALY))
    rows = pd.DataFrame({"device_id": [a.device_id for a in anomalies],
                         "timestamp": pd.to_datetime([a.timestamp for a in anomalies], utc=True)})
    for anomaly, hit in zip(anomalies, in_windows(rows, load_ground_truth(fleet))):
        feedback_give(anomaly=anomaly, user=reviewer, verdict=Verdict.TRUE_POSITIVE if hit else Verdict.FALSE_POSITIVE)
    return run


def test_suggest_creates_pending_audited_proposals_once(fleet, people):
    _review_from_truth(fleet, people["reviewer"])
    created = services.proposals_suggest(fleet=fleet, user=people["approver"])
    assert created and all(p.status == ProposalStatus.PENDING for p in created)
    assert {p.kind for p in created} & {"shift", "mad_scale", "contamination", "domain_weight"}
    assert all(p.evidence["n_false_positive"] >= 5 and str(p.evidence["n_false_positive"]) in p.reason
               for p in created if p.kind in ("shift", "mad_scale", "contamination"))
    assert _actions(fleet).count(AuditAction.PROPOSAL_CREATED) == len(created)
    assert services.proposals_suggest(fleet=fleet) == []  # duplicates of pending ones are skipped


def test_proposals_of_an_earlier_baseline_version_cannot_be_approved_and_a_new_round_supersedes_them(
        fleet, people, django_capture_on_commit_callbacks):
    _review_from_truth(fleet, people["reviewer"])
    first_round = services.proposals_suggest(fleet=fleet)
    stale = first_round[-1]
    with django_capture_on_commit_callbacks(execute=True):
        services.proposals_decide(ids=[first_round[0].pk], user=people["approver"], approve=True)
    assert BaselineVersion.objects.get(fleet=fleet, is_active=True).number == 2
    with pytest.raises(services.ProposalError) as caught:
        services.proposal_approve(proposal=stale, user=people["approver"])
    assert caught.value.field == "baseline_version"
    assert f"proposal {stale.pk} was made against baseline v1; v2 is active now" in str(caught.value)
    stale.refresh_from_db()
    assert stale.status == ProposalStatus.PENDING
    # The next round rejects what is left of the first as superseded (audited), so fresh proposals on v2
    # are not skipped as duplicates of stale ones.
    _review_from_truth(fleet, people["reviewer"])
    second_round = services.proposals_suggest(fleet=fleet)
    stale.refresh_from_db()
    assert stale.status == ProposalStatus.REJECTED and stale.decision_comment.startswith("superseded")
    assert not BaselineProposal.objects.filter(fleet=fleet, status=ProposalStatus.PENDING).exclude(
        baseline_version__number=2).exists()
    assert second_round and {p.baseline_version.number for p in second_round} == {2}
    assert AuditEvent.objects.filter(action=AuditAction.PROPOSAL_REJECTED, target_id=str(stale.pk),
                                     actor_label=services.SYSTEM_ACTOR).exists()


def test_suggest_without_reviews_or_baseline(fleet, people):
    assert services.proposals_suggest(fleet=fleet) == []
    empty = Fleet.objects.create(name="empty", metric_schema=fleet.metric_schema)
    with pytest.raises(services.ProposalError) as caught:
        services.proposals_suggest(fleet=empty)
    assert caught.value.field == "fleet"


def test_preview_impact_re_scores_without_persisting(fleet, people):
    run = _review_from_truth(fleet, people["reviewer"])
    proposal = _proposal(fleet)
    counts = (AnomalyResult.objects.count(), PipelineRun.objects.count(), BaselineVersion.objects.count())
    impact = services.proposal_preview_impact(proposal=proposal)
    assert (AnomalyResult.objects.count(), PipelineRun.objects.count(), BaselineVersion.objects.count()) == counts
    assert impact["before_anomalies"] == run.n_anomalies and impact["scored_rows"] == run.n_scored
    assert impact["after_anomalies"] < impact["before_anomalies"]  # contamination 0.03 -> 0.0265
    assert impact["before_anomalies"] - impact["cleared"] + impact["new"] == impact["after_anomalies"]
    assert 0 <= impact["cleared_true_positive"] <= impact["cleared"]
    proposal.refresh_from_db()
    assert proposal.impact == impact


def test_a_run_with_an_unknown_baseline_version_is_refused(fleet):
    with pytest.raises(PipelineRunError, match="baseline_version_id"):
        pipeline_run_create(fleet=fleet, params={"baseline_version_id": 999999})


def test_simulate_review_reports_rounds(fleet, tmp_path, capsys):
    out = tmp_path / "sim.json"
    call_command("simulate_review", fleet="tiny", rounds=1, json=str(out))
    report = json.loads(out.read_text())
    r0, r1 = report["rounds"]
    assert r1["proposals"] >= 1 and r1["applied"] == r1["proposals"]
    assert r1["anomalies"] < r0["anomalies"] and r1["fp"] < r0["fp"]
    assert r0["tp"] + r0["fp"] == r0["anomalies"]
    assert "precision" in capsys.readouterr().out
    assert Group.objects.get(name="approver").user_set.filter(username="simulated-approver").exists()


def test_auto_apply_approves_proposals_within_the_auto_bounds_as_the_system(fleet, people):
    fleet.config = {"feedback_auto_apply": True, "feedback_auto_max_shift_mad": 1.5,
                    "feedback_auto_mad_factor_bounds": [0.5, 2.0]}
    fleet.save()
    _review_from_truth(fleet, people["reviewer"])
    created = services.proposals_suggest(fleet=fleet)
    assert created
    statuses = set(BaselineProposal.objects.filter(pk__in=[p.pk for p in created]).values_list("status", flat=True))
    assert statuses == {ProposalStatus.APPROVED}
    approved = AuditEvent.objects.filter(fleet=fleet, action=AuditAction.PROPOSAL_APPROVED)
    assert approved.count() == len(created) and set(approved.values_list("actor_label", flat=True)) == {
        services.SYSTEM_ACTOR}


def test_auto_applied_proposals_share_one_chain(fleet, people, monkeypatch, django_capture_on_commit_callbacks):
    fleet.config = {"feedback_auto_apply": True, "feedback_auto_max_shift_mad": 1.5,
                    "feedback_auto_mad_factor_bounds": [0.5, 2.0]}
    fleet.save()
    _review_from_truth(fleet, people["reviewer"])
    chains = []
    monkeypatch.setattr("baselines.tasks.enqueue_apply_chain", chains.append)
    with django_capture_on_commit_callbacks(execute=True):
        created = services.proposals_suggest(fleet=fleet)
    assert len(created) > 1 and chains == [[p.pk for p in created]]  # one version, one retrain for all


class _FakeLLM:
    """An OpenAI-compatible server on 127.0.0.1 that answers with two proposals built from the evidence
    table in the prompt: one valid (cites the counts, a small shift) and one naming an unknown feature."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                row = json.loads(body["messages"][-1]["content"])[0]
                valid = {"level": row["level"], "group_key": json.loads(row["group_key"]), "feature": row["feature"],
                         "kind": "shift", "adjustment": 0.1 * row["mad"] * row["direction"],
                         "reason": f"{row['n_false_positive']} of {row['n_reviewed']} reviewed are false positives"}
                invented = {**valid, "feature": "gps_accuracy"}
                data = json.dumps({"choices": [{"index": 0, "message": {
                    "role": "assistant", "content": json.dumps([valid, invented])}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_llm_proposals_are_validated_and_only_grounded_ones_kept(fleet, people, settings):
    from explanations.llm import reset_breakers

    server = _FakeLLM()
    reset_breakers()
    settings.VIGIL_LLM = {"provider": "llm", "base_url": server.url, "model": "fake-7b", "timeout": 2,
                          "max_retries": 0}
    fleet.config = {"feedback_min_count": 2}
    fleet.save()
    try:
        _review_from_truth(fleet, people["reviewer"])
        created = services.proposals_suggest(fleet=fleet)
    finally:
        server.server.shutdown()
        server.server.server_close()
        reset_breakers()
    llm = [p for p in created if p.source == "llm"]
    assert len(llm) == 1 and llm[0].feature != "gps_accuracy"
    assert str(llm[0].evidence["n_false_positive"]) in llm[0].reason
