"""The baseline, proposal and audit pages: roles (outsider refused everywhere), statistics filters and pages,
the diff on two crafted versions, rollback, the proposal queue and decisions, the audit log and its CSV."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from django.conf import settings
from django.urls import reverse

from baselines import selectors
from baselines.choices import ProposalKind, ProposalStatus
from baselines.engine import LEVELS, STAT_COLUMNS, BaselineSet, level_columns
from baselines.models import BaselineProposal, BaselineStatistic, BaselineVersion
from detection.ml.artifacts import save_artifact
from detection.models import AuditEvent
from detection.services import audit_record
from tests.factories import BaselineVersionFactory, FleetFactory, user_with_role

pytestmark = pytest.mark.django_db

COHORT_A = json.dumps({"manufacturer": "Samsung", "model": "Galaxy S21", "os_version": "14"})
COHORT_B = json.dumps({"manufacturer": "Zebra", "model": "TC52", "os_version": "11"})


def _stats(version, rows):
    BaselineStatistic.objects.bulk_create(
        BaselineStatistic(
            version=version,
            level=level,
            group_key=group,
            feature=feature,
            median=median,
            mad=mad,
            row_count=100,
        )
        for level, group, feature, median, mad in rows
    )


@pytest.fixture
def versions():
    """Fleet demo with v1 (retired) and v2 (active). From v1 to v2: battery of cohort A shifted (+5 median),
    cpu_temp of cohort A rescaled (MAD x2), global rows unchanged, cohort B wifi added, cohort B storage
    removed."""
    fleet = FleetFactory(name="demo")
    v1 = BaselineVersionFactory(
        fleet=fleet,
        number=1,
        is_active=False,
        source="pipeline",
        reason="computed by run 1",
        valid_to=dt.datetime(2024, 3, 2, tzinfo=dt.UTC),
    )
    v2 = BaselineVersionFactory(
        fleet=fleet,
        number=2,
        is_active=True,
        source="feedback",
        reason="proposal 7",
        feature_list=["battery_level", "cpu_temp"],
    )
    common = [
        ("global", "{}", "battery_level", 70.0, 8.0),
        ("global", "{}", "cpu_temp", 40.0, 3.0),
        ("cohort", COHORT_B, "battery_level", 80.0, 6.0),
    ]
    _stats(
        v1,
        [
            *common,
            ("cohort", COHORT_A, "battery_level", 60.0, 5.0),
            ("cohort", COHORT_A, "cpu_temp", 45.0, 2.0),
            ("cohort", COHORT_B, "storage_free", 4.0, 1.0),
        ],
    )
    _stats(
        v2,
        [
            *common,
            ("cohort", COHORT_A, "battery_level", 65.0, 5.0),
            ("cohort", COHORT_A, "cpu_temp", 45.0, 4.0),
            ("cohort", COHORT_B, "wifi_rssi", -60.0, 4.0),
        ],
    )
    return fleet, v1, v2


@pytest.fixture
def proposal(versions):
    fleet, _, v2 = versions
    proposer = user_with_role("paula", "approver")
    return BaselineProposal.objects.create(
        fleet=fleet,
        baseline_version=v2,
        kind=ProposalKind.SHIFT,
        level="cohort",
        group_key=json.loads(COHORT_A),
        feature="battery_level",
        adjustment=-4.5,
        reason="9 of 10 reviewed anomalies were false positives",
        evidence={"n_reviewed": 10, "n_false_positive": 9, "share": 0.9, "typical_deviation": -4.5},
        proposed_by=proposer,
    )


def with_artifact(version: BaselineVersion) -> BaselineVersion:
    """Write version's statistics as its baseline artifact (what the services load), like a pipeline run."""
    stats = pd.DataFrame(
        list(
            version.statistics.values_list(
                "level", "group_key", "feature", "median", "mad", "row_count", "fallback_level"
            )
        ),
        columns=STAT_COLUMNS,
    )
    levels = tuple(sorted(set(stats["level"]), key=LEVELS.index))
    baselines = BaselineSet(
        levels,
        sorted(set(stats["feature"])),
        25,
        level_columns(["manufacturer", "model", "os_version"]),
        stats,
    )
    path = Path(settings.VIGIL_ARTIFACT_DIR) / version.fleet.name / f"baseline-v{version.number}.pkl"
    version.artifact_checksum = save_artifact(baselines, path, kind="baselines")
    version.artifact_path = str(path)
    version.save(update_fields=["artifact_path", "artifact_checksum"])
    return version


def _client(client, role):
    user = user_with_role(f"user-{role or 'none'}", role)
    client.force_login(user)
    return client


@pytest.fixture
def viewer(client):
    return _client(client, "viewer")


@pytest.fixture
def reviewer(client):
    return _client(client, "reviewer")


@pytest.fixture
def approver(client):
    return _client(client, "approver")


@pytest.fixture
def outsider(client):
    return _client(client, None)


def _urls(proposal_pk: int) -> list[tuple[str, str]]:
    return [
        ("get", reverse("baselines:baseline_index")),
        ("get", reverse("baselines:baseline_detail", args=["demo"])),
        ("get", reverse("baselines:baseline_diff", args=["demo"])),
        ("post", reverse("baselines:baseline_rollback", args=["demo", 1])),
        ("get", reverse("baselines:proposal_list")),
        ("post", reverse("baselines:proposals_suggest")),
        ("get", reverse("baselines:proposal_detail", args=[proposal_pk])),
        ("get", reverse("baselines:proposal_status", args=[proposal_pk])),
        ("post", reverse("baselines:proposal_preview", args=[proposal_pk])),
        ("post", reverse("baselines:proposal_approve", args=[proposal_pk])),
        ("post", reverse("baselines:proposal_reject", args=[proposal_pk])),
        ("get", reverse("baselines:audit_list")),
        ("get", reverse("baselines:audit_export")),
    ]


def test_outsider_is_refused_by_every_view_and_nothing_changes(outsider, proposal):
    for method, url in _urls(proposal.pk):
        response = getattr(outsider, method)(url, {"reason": "x", "comment": "x", "fleet": "demo"})
        assert response.status_code == 403, url
        assert b"This needs the" in response.content
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.PENDING
    assert BaselineVersion.objects.count() == 2 and not AuditEvent.objects.exists()


def test_anonymous_user_is_sent_to_login_by_every_view(client, proposal):
    for method, url in _urls(proposal.pk):
        response = getattr(client, method)(url)
        assert response.status_code == 302 and response.url.startswith(reverse("login")), url


@pytest.mark.parametrize(
    "role, name",
    [
        ("viewer", "baseline_rollback"),
        ("reviewer", "baseline_rollback"),
        ("viewer", "proposal_approve"),
        ("reviewer", "proposal_approve"),
        ("viewer", "proposal_reject"),
        ("reviewer", "proposal_reject"),
        ("viewer", "proposals_suggest"),
        ("reviewer", "proposals_suggest"),
        ("viewer", "proposal_preview"),
    ],
)
def test_weaker_roles_cannot_write(client, proposal, role, name):
    args = {"baseline_rollback": ["demo", 1], "proposals_suggest": []}.get(name, [proposal.pk])
    response = _client(client, role).post(
        reverse(f"baselines:{name}", args=args), {"reason": "x", "comment": "x", "fleet": "demo"}
    )
    assert response.status_code == 403
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.PENDING and proposal.impact == {}
    assert BaselineVersion.objects.count() == 2


# --- baselines -----------------------------------------------------------------------------------------


def test_index_lists_fleets_with_active_version_and_pending_count(
    viewer, proposal, django_assert_max_num_queries
):
    FleetFactory(name="empty")
    with django_assert_max_num_queries(7):  # session, user, roles, fleets; the rest is the nav
        response = viewer.get(reverse("baselines:baseline_index"))
    rows = {f.name: (f.active_version, f.n_versions, f.n_pending) for f in response.context["fleets"]}
    assert rows == {"demo": (2, 2, 1), "empty": (None, 0, 0)}


def test_baseline_page_shows_active_statistics_history_and_default_diff(viewer, versions):
    response = viewer.get(reverse("baselines:baseline_detail", args=["demo"]))
    assert response.status_code == 200
    content = response.content.decode()
    assert "Active version v2" in content
    assert [s.level for s in response.context["page"]] == [
        "global",
        "global",
        "cohort",
        "cohort",
        "cohort",
        "cohort",
    ]  # engine order, global first
    assert "Samsung · Galaxy S21 · 14" in content and "all devices" in content
    assert 'id="baseline-v1"' in content and "computed by run 1" in content
    diff = response.context["diff"]
    assert (diff.old.number, diff.new.number) == (1, 2)
    assert "Only approvers can roll a baseline back" in content and "Roll back to v1" not in content


def test_statistics_filter_by_level_and_feature_and_htmx_partial(viewer, versions):
    url = reverse("baselines:baseline_detail", args=["demo"])
    response = viewer.get(url, {"level": "cohort", "feature": "battery_level"})
    assert [(s.group_key, s.median) for s in response.context["page"]] == [(COHORT_A, 65.0), (COHORT_B, 80.0)]
    partial = viewer.get(url, {"level": "global"}, headers={"HX-Request": "true"})
    content = partial.content.decode()
    assert (
        content.lstrip().startswith("{") is False
        and 'id="baseline-stats"' in content
        and "<html" not in content
    )
    assert len(partial.context["page"].object_list) == 2
    bad = viewer.get(url, {"level": "nope", "page": "x"})  # unknown values fall back, never a 500
    assert bad.status_code == 200 and bad.context["page"].paginator.count == 6


def test_statistics_are_paginated_with_bounded_queries(viewer, versions, django_assert_max_num_queries):
    _, _, v2 = versions
    _stats(
        v2,
        [
            ("device", json.dumps({"external_id": f"dev-{i:04d}"}), "battery_level", 50.0 + i, 2.0)
            for i in range(120)
        ],
    )
    url = reverse("baselines:baseline_detail", args=["demo"])
    with django_assert_max_num_queries(14):  # 13 measured: auth 3, fleet, versions, counts, facets 2, diff 2,
        response = viewer.get(url, {"page": 3})  # page count + rows, nav
    page = response.context["page"]
    assert page.paginator.count == 126 and len(page.object_list) == 26
    assert list(page.object_list)[-1].group_key == json.dumps({"external_id": "dev-0119"})


def test_diff_of_two_crafted_versions(versions):
    _, v1, v2 = versions
    diff = selectors.baseline_version_diff(old=v1, new=v2)
    assert diff.counts == {"changed": 2, "added": 1, "removed": 1, "unchanged": 3, "compared": 7}
    rows = {(r.group_key, r.feature): r for r in diff.rows}
    battery = rows[(COHORT_A, "battery_level")]
    assert (battery.status, battery.median_before, battery.median_after, battery.median_change) == (
        "changed",
        60.0,
        65.0,
        5.0,
    )
    assert battery.mad_change == 0.0 and battery.mad_ratio == 1.0
    cpu = rows[(COHORT_A, "cpu_temp")]
    assert (cpu.median_change, cpu.mad_before, cpu.mad_after, cpu.mad_ratio) == (0.0, 2.0, 4.0, 2.0)
    added, removed = rows[(COHORT_B, "wifi_rssi")], rows[(COHORT_B, "storage_free")]
    assert (added.status, added.median_before, added.median_after, added.median_change) == (
        "added",
        None,
        -60.0,
        None,
    )
    assert (removed.status, removed.mad_before, removed.mad_after) == ("removed", 1.0, None)
    reverse_diff = selectors.baseline_version_diff(old=v2, new=v1)
    assert (
        reverse_diff.counts["added"] == 1
        and rows[(COHORT_A, "battery_level")].group == "Samsung · Galaxy S21 · 14"
    )
    assert {(r.feature, r.status) for r in reverse_diff.rows} >= {
        ("wifi_rssi", "removed"),
        ("storage_free", "added"),
    }


def test_diff_ignores_float_noise_and_refuses_versions_of_two_fleets(versions):
    fleet, v1, _ = versions
    v3 = BaselineVersionFactory(fleet=fleet, number=3)
    _stats(
        v3, [(s.level, s.group_key, s.feature, s.median * (1 + 1e-12), s.mad) for s in v1.statistics.all()]
    )
    assert selectors.baseline_version_diff(old=v1, new=v3).counts["changed"] == 0
    with pytest.raises(ValueError, match="different fleets"):
        selectors.baseline_version_diff(old=v1, new=BaselineVersionFactory(fleet=FleetFactory(name="other")))


def test_diff_page_renders_only_changed_rows_and_falls_back_on_bad_versions(viewer, versions):
    url = reverse("baselines:baseline_diff", args=["demo"])
    response = viewer.get(url, {"from": 2, "to": 1}, headers={"HX-Request": "true"})
    content = response.content.decode()
    assert response.status_code == 200 and "<html" not in content and 'id="baseline-diff"' in content
    assert "v2 → v1" in content and "2 changed" in content and "3 unchanged of 7" in content
    assert "−5" in content  # battery median went back down by 5, with a real minus sign
    bad = viewer.get(url, {"from": 99, "to": "x"}, headers={"HX-Request": "true"})
    assert bad.status_code == 200 and "Pick two versions" in bad.content.decode()
    assert (bad.context["diff"].old.number, bad.context["diff"].new.number) == (1, 2)
    full = viewer.get(url, {"from": 1, "to": 2})  # without htmx: the whole baseline page
    assert "Version history" in full.content.decode()


def test_baseline_page_of_a_fleet_without_versions_and_of_an_unknown_fleet(viewer):
    FleetFactory(name="empty")
    content = viewer.get(reverse("baselines:baseline_detail", args=["empty"])).content.decode()
    assert "No baseline version yet" in content
    assert viewer.get(reverse("baselines:baseline_detail", args=["nope"])).status_code == 404


def test_approver_decides_selected_proposals_from_the_queue(client, proposal, monkeypatch,
                                                            django_capture_on_commit_callbacks):
    fleet, v2 = proposal.fleet, proposal.baseline_version
    second = BaselineProposal.objects.create(fleet=fleet, baseline_version=v2, kind=ProposalKind.CONTAMINATION,
                                             level="model", feature="contamination", adjustment=0.02, reason="t",
                                             evidence={})
    chains = []
    monkeypatch.setattr("baselines.tasks.enqueue_apply_chain", chains.append)
    _client(client, "viewer")
    assert 'id="bulk-decide"' not in client.get(reverse("baselines:proposal_list")).content.decode()
    assert client.post(reverse("baselines:proposals_decide"), {"proposal": [proposal.pk]}).status_code == 403
    _client(client, "approver")
    page = client.get(reverse("baselines:proposal_list"), {"status": "pending"}).content.decode()
    assert 'id="bulk-decide"' in page and f'name="proposal" value="{second.pk}" form="bulk-decide"' in page
    url = reverse("baselines:proposals_decide")
    refused = client.post(url, {"proposal": [proposal.pk, 999999], "decision": "approve", "query": "status=pending"})
    assert refused.status_code == 303 and refused["Location"].endswith("/proposals/?status=pending")
    assert "Nothing was decided. No proposal 999999" in client.get(refused["Location"]).content.decode()
    assert client.post(url, {"proposal": [proposal.pk], "decision": "maybe"}).status_code == 303
    assert set(BaselineProposal.objects.values_list("status", flat=True)) == {"pending"}
    with django_capture_on_commit_callbacks(execute=True):
        done = client.post(url, {"proposal": [proposal.pk, second.pk], "decision": "approve", "comment": "ok",
                                 "query": "status=pending"})
    assert done.status_code == 302 and chains == [[proposal.pk, second.pk]]
    assert "Approved 2 proposals of demo; they are applied together" in client.get(done["Location"]).content.decode()
    assert set(BaselineProposal.objects.values_list("status", flat=True)) == {"approved"}


def test_a_proposal_of_an_earlier_version_can_be_rejected_not_approved(approver, versions):
    fleet, v1, _ = versions
    old = BaselineProposal.objects.create(fleet=fleet, baseline_version=v1, kind=ProposalKind.CONTAMINATION,
                                          level="model", feature="contamination", adjustment=0.02, reason="t",
                                          evidence={})
    page = approver.get(reverse("baselines:proposal_detail", args=[old.pk])).content.decode()
    assert f"Proposal {old.pk} was made against baseline v1; v2 is active now" in page
    queue = approver.get(reverse("baselines:proposal_list"), {"status": "pending"}).content.decode()
    assert queue.count("stale: v2 active") == 1  # the queue marks it; the current proposal is not marked
    assert "Approve and apply" not in page and ">Reject</button>" in page
    refused = approver.post(reverse("baselines:proposal_approve", args=[old.pk]), {"comment": ""})
    assert refused.status_code == 400 and "v2 is active now" in refused.content.decode()
    old.refresh_from_db()
    assert old.status == "pending"
    assert approver.post(reverse("baselines:proposal_reject", args=[old.pk]), {"comment": "stale"}).status_code == 302


def test_approver_sees_rollback_for_earlier_versions_only(approver, versions):
    content = approver.get(reverse("baselines:baseline_detail", args=["demo"])).content.decode()
    assert "Roll back to v1" in content and "Roll back to v2" not in content


def test_rollback_without_reason_is_refused_and_changes_nothing(approver, versions):
    response = approver.post(reverse("baselines:baseline_rollback", args=["demo", 1]), {"reason": ""})
    assert response.status_code == 400
    assert "Give a reason" in response.content.decode()
    assert BaselineVersion.objects.count() == 2 and not AuditEvent.objects.exists()


def test_rollback_to_a_version_whose_artifact_is_gone_says_so(approver, versions):
    response = approver.post(reverse("baselines:baseline_rollback", args=["demo", 1]), {"reason": "try"})
    assert response.status_code == 400 and "notice-error" in response.content.decode()
    assert BaselineVersion.objects.count() == 2 and not AuditEvent.objects.exists()


def test_rollback_to_unknown_version_is_404(approver, versions):
    assert (
        approver.post(reverse("baselines:baseline_rollback", args=["demo", 9]), {"reason": "x"}).status_code
        == 404
    )


def test_approver_rolls_back_to_an_earlier_version(approver, versions):
    fleet, v1, v2 = versions
    with_artifact(v1)
    response = approver.post(
        reverse("baselines:baseline_rollback", args=["demo", 1]), {"reason": "v2 too loose"}
    )
    assert response.status_code == 302
    active = BaselineVersion.objects.get(fleet=fleet, is_active=True)
    assert active.number == 3  # a new version: history is never rewritten
    assert selectors.baseline_version_diff(old=v1, new=active).rows == []
    v2.refresh_from_db()
    assert v2.valid_to is not None
    event = AuditEvent.objects.filter(fleet=fleet).order_by("-id").first()
    assert event.actor_label == "user-approver" and "v2 too loose" in event.reason
    page = approver.get(response.url)
    assert "Active version v3" in page.content.decode()


# --- proposals -----------------------------------------------------------------------------------------


def test_proposal_list_filters_by_status_and_fleet(viewer, proposal):
    other = FleetFactory(name="other")
    BaselineProposal.objects.create(
        fleet=other,
        baseline_version=BaselineVersionFactory(fleet=other),
        status=ProposalStatus.REJECTED,
        adjustment=1.0,
        reason="r",
    )
    url = reverse("baselines:proposal_list")
    assert [p.pk for p in viewer.get(url, {"status": "pending"}).context["page"]] == [proposal.pk]
    assert viewer.get(url, {"fleet": "other"}).context["page"].paginator.count == 1
    response = viewer.get(url, {"fleet": "demo", "status": "rejected"})
    assert response.context["page"].paginator.count == 0 and "No proposals match" in response.content.decode()
    assert viewer.get(url, {"fleet": "nope"}).status_code == 200  # an unknown fleet is dropped, not a 500
    content = viewer.get(url).content.decode()
    assert "9 FP of 10 reviewed" in content and "(90 %)" in content and "−4.5" in content
    assert "Suggest adjustments now" not in content  # viewers cannot


def test_proposal_list_query_count_does_not_grow(viewer, proposal, django_assert_max_num_queries):
    fleet, version = proposal.fleet, proposal.baseline_version
    for i in range(30):
        BaselineProposal.objects.create(
            fleet=fleet,
            baseline_version=version,
            adjustment=i,
            reason="r",
            proposed_by=proposal.proposed_by,
            decided_by=proposal.proposed_by,
        )
    with django_assert_max_num_queries(9):  # 8 measured whatever the number of proposals
        response = viewer.get(reverse("baselines:proposal_list"), {"status": "pending"})
    assert len(response.context["page"].object_list) == 25


def test_proposal_list_htmx_renders_only_the_table(viewer, proposal):
    response = viewer.get(
        reverse("baselines:proposal_list"), {"status": "pending"}, headers={"HX-Request": "true"}
    )
    content = response.content.decode()
    assert 'id="proposal-table"' in content and "<html" not in content


def test_proposal_page_shows_evidence_and_tells_non_approvers_why_they_cannot_decide(reviewer, proposal):
    proposal.impact = {
        "before_anomalies": 40,
        "after_anomalies": 31,
        "cleared": 10,
        "cleared_true_positive": 1,
        "new": 1,
        "scored_rows": 2000,
        "computed_at": "2024-03-01T12:00:00+00:00",
    }
    proposal.save()
    content = reviewer.get(reverse("baselines:proposal_detail", args=[proposal.pk])).content.decode()
    assert "False-positive share" in content and "90 %" in content and "Reviewed anomalies" in content
    assert "Samsung · Galaxy S21 · 14" in content and "battery_level" in content
    assert "Anomalies cleared" in content and "of which confirmed true positives" in content
    assert "40 → 31" in content
    assert "Only approvers can approve or reject" in content and "Approve and apply" not in content
    assert "Preview again" in content  # reviewers may re-run the preview


def test_approver_sees_the_decision_form(approver, proposal):
    content = approver.get(reverse("baselines:proposal_detail", args=[proposal.pk])).content.decode()
    assert "Approve and apply" in content and "Reject" in content and "Not previewed yet" in content


def test_proposer_is_told_when_a_distinct_approver_is_required(client, proposal):
    fleet = proposal.fleet
    fleet.config = {"feedback_require_distinct_approver": True}
    fleet.save()
    client.force_login(proposal.proposed_by)
    content = client.get(reverse("baselines:proposal_detail", args=[proposal.pk])).content.decode()
    assert "needs another approver" in content and "Approve and apply" not in content


def test_decided_proposal_shows_status_and_no_form(approver, proposal):
    proposal.status = ProposalStatus.FAILED
    proposal.error = "retrain: not enough rows"
    proposal.save()
    content = approver.get(reverse("baselines:proposal_detail", args=[proposal.pk])).content.decode()
    assert "Applying failed" in content and "retrain: not enough rows" in content
    assert "Approve and apply" not in content


@pytest.mark.parametrize(
    "status, code",
    [
        (ProposalStatus.APPROVED, 200),
        (ProposalStatus.APPLIED, 286),
        (ProposalStatus.FAILED, 286),
        (ProposalStatus.PENDING, 286),
    ],
)
def test_status_fragment_polls_only_while_applying(viewer, proposal, status, code):
    BaselineProposal.objects.filter(pk=proposal.pk).update(status=status)
    response = viewer.get(
        reverse("baselines:proposal_status", args=[proposal.pk]), headers={"HX-Request": "true"}
    )
    assert response.status_code == code
    assert ('hx-trigger="every 3s"' in response.content.decode()) is (code == 200)


def test_unknown_proposal_is_404(viewer):
    assert viewer.get(reverse("baselines:proposal_detail", args=[999])).status_code == 404


def test_reject_with_comment_is_audited(approver, proposal):
    response = approver.post(
        reverse("baselines:proposal_reject", args=[proposal.pk]), {"comment": "seasonal"}
    )
    assert response.status_code == 302
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.REJECTED and proposal.decided_by.username == "user-approver"
    assert proposal.decision_comment == "seasonal"
    assert AuditEvent.objects.filter(action="proposal_rejected", target_id=str(proposal.pk)).exists()
    content = approver.get(response.url).content.decode()
    assert "Rejected" in content and "seasonal" in content and "Approve and apply" not in content


def test_deciding_twice_is_refused_with_the_reason(approver, proposal):
    approver.post(reverse("baselines:proposal_reject", args=[proposal.pk]), {"comment": ""})
    response = approver.post(reverse("baselines:proposal_approve", args=[proposal.pk]), {"comment": ""})
    assert response.status_code in (400, 409)
    assert "notice-error" in response.content.decode()
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.REJECTED


def test_too_long_comment_is_refused(approver, proposal):
    response = approver.post(
        reverse("baselines:proposal_reject", args=[proposal.pk]), {"comment": "x" * 2001}
    )
    assert response.status_code == 400
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.PENDING


def test_suggest_without_a_valid_fleet_says_so(approver):
    response = approver.post(reverse("baselines:proposals_suggest"), {"fleet": "nope"}, follow=True)
    assert "Pick a fleet" in response.content.decode()


# --- audit log -----------------------------------------------------------------------------------------


@pytest.fixture
def events(versions):
    fleet = versions[0]
    other = FleetFactory(name="other")
    alice = user_with_role("alice", "approver")
    made = [
        audit_record(
            action="proposal_approved",
            actor=alice,
            fleet=fleet,
            target=versions[2],
            before={"status": "pending"},
            after={"status": "approved"},
            reason='=HYPERLINK("x")',
        ),
        audit_record(
            action="model_promoted",
            actor=None,
            actor_label="celery-beat",
            fleet=other,
            before={"status": "candidate"},
            after={"status": "production"},
        ),
        audit_record(action="custom_thing", actor=alice, fleet=fleet, reason="free-form action"),
    ]
    AuditEvent.objects.filter(pk=made[1].pk).update(created_at=dt.datetime(2024, 1, 5, 10, tzinfo=dt.UTC))
    return made


def test_audit_log_lists_and_filters(viewer, events):
    url = reverse("baselines:audit_list")
    response = viewer.get(url)
    assert response.status_code == 200 and response.context["page"].paginator.count == 3
    content = response.content.decode()
    assert "Adjustment approved" in content and "celery-beat" in content and "Custom thing" in content
    assert viewer.get(url, {"fleet": "other"}).context["page"].paginator.count == 1
    assert viewer.get(url, {"action": "custom_thing"}).context["page"].paginator.count == 1
    assert viewer.get(url, {"actor": "ALI"}).context["page"].paginator.count == 2
    assert viewer.get(url, {"date_to": "2024-01-05"}).context["page"].paginator.count == 1
    assert viewer.get(url, {"date_from": "2024-01-06"}).context["page"].paginator.count == 2
    bad = viewer.get(url, {"date_from": "not-a-date", "action": "nope"})
    assert bad.status_code == 200 and bad.context["page"].paginator.count == 3
    partial = viewer.get(url, {"fleet": "demo"}, headers={"HX-Request": "true"}).content.decode()
    assert 'id="audit-table"' in partial and "<html" not in partial
    assert "audit/export.csv?fleet=demo" in partial


def test_audit_log_query_count_does_not_grow(viewer, versions, django_assert_max_num_queries):
    for i in range(80):
        audit_record(action="model_promoted", actor_label=f"system-{i}", fleet=versions[0])
    with django_assert_max_num_queries(9):  # 8 measured whatever the number of events
        response = viewer.get(reverse("baselines:audit_list"))
    assert len(response.context["page"].object_list) == 50


def test_csv_export_streams_the_filtered_log(viewer, events):
    response = viewer.get(reverse("baselines:audit_export"), {"fleet": "demo"})
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["time_utc", "actor", "action", "fleet", "target", "before", "after", "reason"]
    assert len(rows) == 3 and {r[3] for r in rows[1:]} == {"demo"}
    approved = next(r for r in rows[1:] if r[2] == "proposal_approved")
    assert approved[1] == "alice" and approved[4].startswith("BaselineVersion #")
    assert json.loads(approved[5]) == {"status": "pending"} and json.loads(approved[6]) == {
        "status": "approved"
    }
    assert approved[7] == '\'=HYPERLINK("x")'  # a formula is neutralised for spreadsheets
    assert approved[0].endswith("+00:00")


def test_csv_export_of_everything_has_one_row_per_event(viewer, events):
    response = viewer.get(reverse("baselines:audit_export"))
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(rows) == 1 + AuditEvent.objects.count()
    assert rows[-1][1] == "celery-beat"  # oldest last


def test_nav_links_to_baselines_proposals_and_audit(viewer):
    content = viewer.get(reverse("baselines:baseline_index")).content.decode()
    for name in ("baseline_index", "proposal_list", "audit_list"):
        assert f'href="{reverse(f"baselines:{name}")}"' in content


def test_proposals_are_read_mostly_in_the_admin(client, proposal, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", password="pw"))
    assert client.get(reverse("admin:baselines_baselineproposal_changelist")).status_code == 200
    view = client.get(reverse("admin:baselines_baselineproposal_change", args=[proposal.pk]))
    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()  # a read-only view
    assert client.get(reverse("admin:baselines_baselineproposal_add")).status_code == 403


def test_preview_error_answers_the_impact_partial_with_the_message(reviewer, proposal):
    url = reverse("baselines:proposal_preview", args=[proposal.pk])
    partial = reviewer.post(url, headers={"HX-Request": "true"})  # no artifact, no scored run: refused
    content = partial.content.decode()
    assert partial.status_code == 200 and 'id="impact"' in content and "<html" not in content
    assert "notice-error" in content
    full = reviewer.post(url)
    assert full.status_code == 400 and "notice-error" in full.content.decode()
    proposal.refresh_from_db()
    assert proposal.impact == {}


def test_suggest_that_cannot_run_says_why(approver, proposal):
    response = approver.post(reverse("baselines:proposals_suggest"), {"fleet": "demo"}, follow=True)
    assert response.redirect_chain[-1][0].endswith("?fleet=demo&status=pending")
    assert "No adjustments suggested for demo" in response.content.decode()
    assert BaselineProposal.objects.count() == 1
