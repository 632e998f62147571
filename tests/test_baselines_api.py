"""The feedback loop's API (/api/v1/): proposals (list, filters, approve, reject, preview, suggest), audit
events (read-only, filters), baseline rollback; roles (outsider refused everywhere), errors naming their
field, and the OpenAPI schema of these endpoints without warnings."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from rest_framework.test import APIClient

from baselines.choices import ProposalKind, ProposalStatus
from baselines.models import BaselineProposal, BaselineStatistic, BaselineVersion
from detection.choices import Label, Verdict
from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import generate_fleet
from detection.models import AnomalyResult, AuditEvent, Fleet
from detection.services import audit_record, feedback_give, pipeline_run_create, pipeline_run_execute
from tests.factories import BaselineVersionFactory, FleetFactory, api_client, user_with_role
from tests.test_baselines_pages import COHORT_A, _stats, with_artifact

pytestmark = pytest.mark.django_db














@pytest.fixture
def crafted():
    """Fleet demo with v1 (with artifact) and v2 (active), a pending proposal, and a rejected one of
    another fleet."""
    fleet = FleetFactory(name="demo")
    v1 = BaselineVersionFactory(fleet=fleet, number=1, is_active=False)
    v2 = BaselineVersionFactory(fleet=fleet, number=2, is_active=True)
    _stats(
        v1, [("global", "{}", "battery_level", 70.0, 8.0), ("cohort", COHORT_A, "battery_level", 60.0, 5.0)]
    )
    _stats(
        v2, [("global", "{}", "battery_level", 70.0, 8.0), ("cohort", COHORT_A, "battery_level", 65.0, 5.0)]
    )
    with_artifact(v1)
    pending = BaselineProposal.objects.create(
        fleet=fleet,
        baseline_version=v2,
        level="cohort",
        group_key=json.loads(COHORT_A),
        feature="battery_level",
        adjustment=-2.0,
        reason="8 of 9 false positives",
        evidence={"n_reviewed": 9, "n_false_positive": 8},
    )
    other = FleetFactory(name="other")
    BaselineProposal.objects.create(
        fleet=other,
        baseline_version=BaselineVersionFactory(fleet=other, number=1),
        status=ProposalStatus.REJECTED,
        adjustment=1.0,
        reason="r",
    )
    return fleet, v1, v2, pending


def _endpoints(crafted) -> list[tuple[str, str, dict]]:
    fleet, v1, _, pending = crafted
    return [
        ("get", "/api/v1/proposals/", {}),
        ("get", f"/api/v1/proposals/{pending.pk}/", {}),
        ("post", f"/api/v1/proposals/{pending.pk}/approve/", {"comment": "x"}),
        ("post", f"/api/v1/proposals/{pending.pk}/reject/", {"comment": "x"}),
        ("post", f"/api/v1/proposals/{pending.pk}/preview/", {}),
        ("post", "/api/v1/proposals/suggest/", {"fleet": "demo"}),
        ("get", "/api/v1/audit-events/", {}),
        ("post", f"/api/v1/baseline-versions/{v1.pk}/rollback/", {"reason": "x"}),
    ]


def test_outsider_is_refused_everywhere_and_anonymous_gets_401(outsider, crafted):
    for method, url, data in _endpoints(crafted):
        assert getattr(outsider, method)(url, data, format="json").status_code == 403, url
        assert getattr(APIClient(), method)(url, data, format="json").status_code == 401, url
    crafted[3].refresh_from_db()
    assert crafted[3].status == ProposalStatus.PENDING and BaselineVersion.objects.count() == 3


def test_viewer_reads_but_cannot_act(viewer, crafted):
    for method, url, data in _endpoints(crafted):
        expected = 200 if method == "get" else 403
        assert getattr(viewer, method)(url, data, format="json").status_code == expected, url


def test_reviewer_cannot_approve_reject_suggest_or_roll_back(reviewer, crafted):
    for method, url, data in _endpoints(crafted):
        if method == "post" and "preview" not in url:
            assert reviewer.post(url, data, format="json").status_code == 403, url


def test_proposals_are_filtered_by_fleet_and_status(viewer, crafted):
    assert viewer.get("/api/v1/proposals/").json()["count"] == 2
    body = viewer.get("/api/v1/proposals/", {"fleet": "demo", "status": "pending"}).json()
    assert body["count"] == 1
    item = body["results"][0]
    assert (item["fleet"], item["baseline_version"], item["feature"], item["adjustment"]) == (
        "demo",
        2,
        "battery_level",
        -2.0,
    )
    assert item["group_key"] == json.loads(COHORT_A) and item["evidence"]["n_false_positive"] == 8
    assert viewer.get("/api/v1/proposals/", {"status": "rejected"}).json()["results"][0]["fleet"] == "other"
    bad = viewer.get("/api/v1/proposals/", {"fleet": "nope", "status": "maybe"})
    assert bad.status_code == 400 and {"fleet", "status"} <= set(bad.json())
    assert viewer.get("/api/v1/proposals/999/").status_code == 404


def test_approver_rejects_then_a_second_decision_is_a_409_naming_status(approver, crafted):
    pending = crafted[3]
    response = approver.post(
        f"/api/v1/proposals/{pending.pk}/reject/", {"comment": "seasonal"}, format="json"
    )
    assert response.status_code == 200
    assert (
        response.json()["status"],
        response.json()["decided_by"],
        response.json()["decision_comment"],
    ) == ("rejected", "approver", "seasonal")
    again = approver.post(f"/api/v1/proposals/{pending.pk}/approve/", {}, format="json")
    assert again.status_code == 409 and "status" in again.json()
    assert AuditEvent.objects.filter(action="proposal_rejected").count() == 1


def test_approve_sets_approved_and_audits(approver, crafted, django_capture_on_commit_callbacks):
    pending = crafted[3]
    with django_capture_on_commit_callbacks(execute=False) as callbacks:  # the apply chain is not run here
        response = approver.post(f"/api/v1/proposals/{pending.pk}/approve/", {"comment": "ok"}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "approved"
    assert len(callbacks) >= 1  # the chain is enqueued on commit
    event = AuditEvent.objects.get(action="proposal_approved")
    assert (event.actor_label, event.target_id, event.reason) == ("approver", str(pending.pk), "ok")


def test_several_proposals_are_decided_in_one_call_and_applied_by_one_chain(approver, crafted, monkeypatch,
                                                                             django_capture_on_commit_callbacks):
    fleet, _, v2, pending = crafted
    second = BaselineProposal.objects.create(fleet=fleet, baseline_version=v2, kind="contamination", level="model",
                                             feature="contamination", adjustment=0.02, reason="test", evidence={})
    chains = []
    monkeypatch.setattr("baselines.tasks.enqueue_apply_chain", chains.append)
    with django_capture_on_commit_callbacks(execute=True):
        response = approver.post("/api/v1/proposals/decide/", {"proposals": [pending.pk, second.pk],
                                                               "decision": "approve", "comment": "both"}, format="json")
    assert response.status_code == 200, response.json()
    assert [(p["id"], p["status"]) for p in response.json()] == [(pending.pk, "approved"), (second.pk, "approved")]
    assert chains == [[pending.pk, second.pk]]  # one chain for both: one baseline version, one retrain
    again = approver.post("/api/v1/proposals/decide/", {"proposals": [second.pk], "decision": "reject"}, format="json")
    assert again.status_code == 409 and "status" in again.json()
    assert approver.post("/api/v1/proposals/decide/", {"proposals": [second.pk], "decision": "maybe"},
                         format="json").json().keys() == {"decision"}
    assert approver.post("/api/v1/proposals/decide/", {"proposals": [], "decision": "reject"},
                         format="json").status_code == 400


def test_approving_a_proposal_of_an_earlier_version_is_a_400_naming_baseline_version(approver, crafted):
    fleet, v1, _, _ = crafted
    old = BaselineProposal.objects.create(fleet=fleet, baseline_version=v1, kind="contamination", level="model",
                                          feature="contamination", adjustment=0.02, reason="t", evidence={})
    response = approver.post(f"/api/v1/proposals/{old.pk}/approve/", {}, format="json")
    assert response.status_code == 400 and "v2 is active now" in response.json()["baseline_version"][0]
    assert approver.post(f"/api/v1/proposals/{old.pk}/reject/", {}, format="json").status_code == 200


def test_same_approver_rule_is_a_403_naming_user(crafted):
    fleet, _, _, pending = crafted
    fleet.config = {"feedback_require_distinct_approver": True}
    fleet.save()
    proposer = user_with_role("paula", "approver")
    BaselineProposal.objects.filter(pk=pending.pk).update(proposed_by=proposer)
    response = api_client(proposer).post(f"/api/v1/proposals/{pending.pk}/approve/", {}, format="json")
    assert response.status_code == 403 and "user" in response.json()
    pending.refresh_from_db()
    assert pending.status == ProposalStatus.PENDING


def test_bad_decision_input_names_the_field(approver, crafted):
    pending = crafted[3]
    response = approver.post(
        f"/api/v1/proposals/{pending.pk}/reject/", {"comment": "x" * 2001}, format="json"
    )
    assert response.status_code == 400 and "comment" in response.json()
    response = approver.post(
        f"/api/v1/proposals/{pending.pk}/reject/", "not json", content_type="application/json"
    )
    assert response.status_code == 400 and "body" in response.json()
    pending.refresh_from_db()
    assert pending.status == ProposalStatus.PENDING


def test_suggest_names_the_field_when_the_fleet_is_unknown_or_has_no_usable_baseline(approver, crafted):
    response = approver.post("/api/v1/proposals/suggest/", {"fleet": "nope"}, format="json")
    assert response.status_code == 400 and "fleet" in response.json()
    response = approver.post("/api/v1/proposals/suggest/", {"fleet": "demo"}, format="json")
    assert response.status_code == 400 and set(response.json()) <= {"fleet", "baseline_version"}
    assert (
        not BaselineProposal.objects.filter(status=ProposalStatus.PENDING).exclude(pk=crafted[3].pk).exists()
    )


def test_preview_without_data_is_a_clear_400(reviewer, crafted):
    response = reviewer.post(f"/api/v1/proposals/{crafted[3].pk}/preview/", {}, format="json")
    assert response.status_code == 400
    ((field, messages),) = response.json().items()
    assert field in ("baseline_version", "fleet") and messages


def test_rollback_makes_a_new_active_version(approver, crafted):
    fleet, v1, v2, _ = crafted
    response = approver.post(
        f"/api/v1/baseline-versions/{v1.pk}/rollback/", {"reason": "v2 too loose"}, format="json"
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["number"], body["is_active"], body["source"]) == (3, True, "rollback")
    new = BaselineVersion.objects.get(pk=body["id"])
    assert sorted(new.statistics.values_list("group_key", "median")) == sorted(
        v1.statistics.values_list("group_key", "median")
    )
    assert BaselineVersion.objects.filter(fleet=fleet, is_active=True).get() == new
    assert AuditEvent.objects.filter(action="baseline_rolled_back", reason="v2 too loose").exists()


def test_rollback_errors_name_their_field(approver, crafted):
    _, v1, v2, _ = crafted
    response = approver.post(f"/api/v1/baseline-versions/{v1.pk}/rollback/", {}, format="json")
    assert response.status_code == 400 and "reason" in response.json()
    response = approver.post(f"/api/v1/baseline-versions/{v2.pk}/rollback/", {"reason": "x"}, format="json")
    assert response.status_code == 400 and "to_version" in response.json()  # already active
    assert (
        approver.post("/api/v1/baseline-versions/999/rollback/", {"reason": "x"}, format="json").status_code
        == 404
    )
    assert BaselineVersion.objects.count() == 3


def test_existing_baseline_version_endpoints_still_answer(viewer, crafted):
    assert viewer.get("/api/v1/baseline-versions/", {"fleet": "demo"}).json()["count"] == 2
    assert viewer.get(f"/api/v1/baseline-versions/{crafted[1].pk}/").json()["number"] == 1


def test_audit_events_are_read_only_and_filtered(viewer, approver, crafted):
    fleet = crafted[0]
    audit_record(
        action="model_promoted", actor_label="celery-beat", fleet=fleet, before={"status": "candidate"}
    )
    audit_record(
        action="proposal_created",
        actor=User.objects.get(username="approver"),
        fleet=fleet,
        target=crafted[3],
        reason="from feedback",
    )
    audit_record(action="alert_acknowledged", actor_label="system")
    body = viewer.get("/api/v1/audit-events/").json()
    assert body["count"] == 3 and body["results"][0]["action"] == "alert_acknowledged"  # newest first
    created = viewer.get("/api/v1/audit-events/", {"action": "proposal_created"}).json()["results"]
    assert [
        (e["actor"], e["fleet"], e["target_type"], e["target_id"], e["action_label"]) for e in created
    ] == [("approver", "demo", "BaselineProposal", str(crafted[3].pk), "Adjustment proposed")]
    assert viewer.get("/api/v1/audit-events/", {"fleet": "demo"}).json()["count"] == 2
    assert viewer.get("/api/v1/audit-events/", {"actor": "BEAT"}).json()["count"] == 1
    assert viewer.get("/api/v1/audit-events/", {"created_after": "2999-01-01T00:00:00Z"}).json()["count"] == 0
    assert viewer.get("/api/v1/audit-events/", {"created_after": "soon"}).status_code == 400
    assert approver.post("/api/v1/audit-events/", {}, format="json").status_code == 405
    event = AuditEvent.objects.first()
    assert approver.delete(f"/api/v1/audit-events/{event.pk}/").status_code == 405


def test_schema_of_these_endpoints_generates_without_warnings():
    from django.urls import include, path
    from drf_spectacular.drainage import GENERATOR_STATS
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.validation import validate_schema

    GENERATOR_STATS.reset()
    generator = SchemaGenerator(patterns=[path("api/v1/", include("baselines.api.urls"))])
    schema = generator.get_schema(request=None, public=True)
    validate_schema(schema)
    assert not GENERATOR_STATS, "drf-spectacular warned; see the captured output"
    paths = schema["paths"]
    assert {
        "/api/v1/proposals/{id}/approve/",
        "/api/v1/proposals/{id}/preview/",
        "/api/v1/proposals/suggest/",
        "/api/v1/audit-events/",
        "/api/v1/baseline-versions/{id}/rollback/",
    } <= set(paths)
    assert "409" in paths["/api/v1/proposals/{id}/approve/"]["post"]["responses"]


# --- end to end on a small trained fleet ---------------------------------------------------------------


@pytest.fixture
def trained():
    """A small synthetic fleet after one pipeline run, and a pending proposal on a real cohort statistic."""
    ingest_batch(batch=generate_fleet(devices=12, days=3, seed=3), fleet_name="tiny")
    fleet = Fleet.objects.get(name="tiny")
    fleet.config = {"n_estimators": 50}  # small forest: this fixture is about the loop, not the model
    fleet.save()
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert run.baseline_version_id, run.error
    stat = (
        BaselineStatistic.objects.filter(version=run.baseline_version, level="cohort").order_by("id").first()
    )
    proposal = BaselineProposal.objects.create(
        fleet=fleet,
        baseline_version=run.baseline_version,
        kind=ProposalKind.SHIFT,
        level="cohort",
        group_key=json.loads(stat.group_key),
        feature=stat.feature,
        adjustment=round(0.5 * stat.mad, 6),
        reason="test",
        evidence={"n_reviewed": 6, "n_false_positive": 6, "share": 1.0},
    )
    return fleet, run, proposal


def test_preview_then_approve_applies_and_the_pages_show_the_result(
    client, reviewer, trained, django_capture_on_commit_callbacks
):
    """Preview (API, reviewer) -> approve (page, approver; the eager chain runs on commit) -> applied with
    a new baseline version, model version and run, which the proposal, baseline and audit pages show."""
    fleet, run, proposal = trained
    response = reviewer.post(f"/api/v1/proposals/{proposal.pk}/preview/", {}, format="json")
    assert response.status_code == 200, response.json()
    impact = response.json()
    assert impact["before_anomalies"] == run.n_anomalies and impact["scored_rows"] == run.n_scored
    assert impact["after_anomalies"] == impact["before_anomalies"] - impact["cleared"] + impact["new"]
    assert 0 <= impact["cleared_true_positive"] <= impact["cleared"]
    proposal.refresh_from_db()
    assert proposal.impact["computed_at"] == impact["computed_at"]

    client.force_login(user_with_role("anna", "approver"))
    page = client.get(reverse("baselines:proposal_detail", args=[proposal.pk])).content.decode()
    assert (
        "Anomalies cleared" in page and f"{impact['before_anomalies']} → {impact['after_anomalies']}" in page
    )
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("baselines:proposal_approve", args=[proposal.pk]), {"comment": "go"})
    assert response.status_code == 302
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.APPLIED, proposal.error
    new_version = proposal.result_baseline_version
    assert new_version.number == 2 and new_version.is_active and new_version.source == "feedback"
    page = client.get(response.url).content.decode()
    assert "Applied" in page and f"v{new_version.number}</a>" in page
    assert (
        f"v{proposal.result_model_version.version}</a>" in page and f"#{proposal.result_run_id}</a>" in page
    )

    baselines = client.get(reverse("baselines:baseline_detail", args=[fleet.name])).content.decode()
    assert "Active version v2" in baselines and "v1 → v2" in baselines and "1 changed" in baselines
    audit = client.get(reverse("baselines:audit_list"), {"fleet": fleet.name}).content.decode()
    for label in ("Adjustment approved", "Adjustment applied", "Retrain triggered"):
        assert label in audit

    # Reviewers call every anomaly of the new run a false positive; the approver asks for suggestions.
    reviewer_user = User.objects.get(username="reviewer")
    for anomaly in AnomalyResult.objects.filter(run_id=proposal.result_run_id, label=Label.ANOMALY):
        feedback_give(anomaly=anomaly, user=reviewer_user, verdict=Verdict.FALSE_POSITIVE)
    anna = api_client(User.objects.get(username="anna"))
    response = anna.post("/api/v1/proposals/suggest/", {"fleet": fleet.name}, format="json")
    assert response.status_code == 201, response.json()
    created = response.json()
    assert created and all(p["status"] == "pending" and p["proposed_by"] == "anna" for p in created)
    assert {e.actor_label for e in AuditEvent.objects.filter(action="proposal_created")} == {"anna"}
