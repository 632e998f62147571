"""The feedback-loop pages in headless Chromium: an approver filters a fleet's baseline statistics,
compares two versions, rolls back, opens a proposal and rejects it, then filters the audit log and exports
it. Screenshots at 1280 and 360 px go to $VIGIL_SCREENSHOT_DIR (default var/screenshots/); none may
scroll sideways.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import urllib.request

import pytest

from baselines.choices import ProposalKind, ProposalStatus
from baselines.models import BaselineProposal, BaselineVersion
from detection.models import AuditEvent
from detection.services import audit_record
from tests.browsing import signed_in
from tests.factories import BaselineVersionFactory, FleetFactory, user_with_role
from tests.test_baselines_pages import COHORT_A, COHORT_B, _stats, with_artifact

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTHS = (1280, 360)


def _shoot(page, folder, name: str) -> None:
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(150)
        assert page.evaluate("document.documentElement.scrollWidth") <= width, (
            f"{name} overflows at {width} px"
        )
        page.screenshot(path=str(folder / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


@pytest.fixture
def loop_data():
    fleet = FleetFactory(name="demo")
    v1 = BaselineVersionFactory(
        fleet=fleet,
        number=1,
        is_active=False,
        source="pipeline",
        reason="computed by pipeline run 1",
        levels=["global", "cohort", "device"],
    )
    v2 = BaselineVersionFactory(
        fleet=fleet,
        number=2,
        is_active=True,
        source="feedback",
        reason="from v1 by proposal 1: Median shift -4.5 on cohort battery_level",
        levels=["global", "cohort", "device"],
        feature_list=["battery_level", "cpu_temp"],
        row_count=20160,
    )
    devices = [
        ("device", json.dumps({"external_id": f"scanner-{i:03d}"}), f, 50.0 + i, 2.0 + i / 10)
        for i in range(40)
        for f in ("battery_level", "cpu_temp")
    ]
    common = [
        ("global", "{}", "battery_level", 70.0, 8.0),
        ("global", "{}", "cpu_temp", 40.0, 3.0),
        ("cohort", COHORT_B, "battery_level", 80.0, 6.0),
        *devices,
    ]
    _stats(
        v1,
        [
            *common,
            ("cohort", COHORT_A, "battery_level", 60.0, 5.0),
            ("cohort", COHORT_A, "cpu_temp", 45.0, 2.0),
        ],
    )
    _stats(
        v2,
        [
            *common,
            ("cohort", COHORT_A, "battery_level", 64.5, 5.0),
            ("cohort", COHORT_A, "cpu_temp", 45.0, 3.1),
        ],
    )
    with_artifact(v1)
    paula = user_with_role("paula", "approver")
    proposal = BaselineProposal.objects.create(
        fleet=fleet,
        baseline_version=v2,
        kind=ProposalKind.SHIFT,
        level="cohort",
        group_key=json.loads(COHORT_A),
        feature="cpu_temp",
        adjustment=2.4,
        proposed_by=paula,
        reason="11 of 12 reviewed anomalies of Samsung Galaxy S21 (14) on cpu_temp were false positives, "
        "typically 2.4 °C above the cohort median",
        evidence={
            "n_reviewed": 12,
            "n_false_positive": 11,
            "share": 0.917,
            "typical_deviation": 2.4,
            "typical_z": 3.8,
        },
        impact={
            "before_anomalies": 412,
            "after_anomalies": 398,
            "cleared": 16,
            "cleared_true_positive": 1,
            "new": 2,
            "scored_rows": 20160,
            "computed_at": "2024-03-14T09:30:00+00:00",
        },
    )
    BaselineProposal.objects.create(
        fleet=fleet,
        baseline_version=v1,
        status=ProposalStatus.APPLIED,
        kind=ProposalKind.SHIFT,
        level="cohort",
        group_key=json.loads(COHORT_A),
        feature="battery_level",
        adjustment=-4.5,
        reason="earlier",
        decided_by=paula,
        result_baseline_version=v2,
        evidence={"n_reviewed": 20, "n_false_positive": 18, "share": 0.9},
    )
    for i in range(3):
        audit_record(
            action="proposal_created",
            actor=paula,
            fleet=fleet,
            target=proposal,
            after={"status": "pending", "feature": "cpu_temp"},
            reason=proposal.reason,
        )
    audit_record(
        action="model_promoted",
        actor_label="celery-beat",
        fleet=fleet,
        before={"status": "candidate"},
        after={"status": "production"},
    )
    return fleet, v1, v2, proposal


def test_approver_reviews_baselines_rolls_back_rejects_and_exports_the_audit_log(
    live_server, browser, loop_data, screenshot_dir
):
    expect = pytest.importorskip("playwright.sync_api").expect
    fleet, v1, v2, proposal = loop_data
    user_with_role("ada", "approver", password="pw-ada")
    page, errors = signed_in(browser, live_server, "ada", "pw-ada", "/baselines/")

    expect(page.get_by_role("heading", name="Baselines")).to_be_visible()
    page.get_by_role("link", name="demo").click()
    expect(page.get_by_role("heading", name="Active version v2")).to_be_visible()
    stats = page.locator("#baseline-stats")
    expect(stats).to_contain_text("1–50 of 85 statistics")
    stats.locator("select[name=level]").select_option("cohort")
    expect(page).to_have_url(re.compile(r"level=cohort"))
    expect(stats).to_contain_text("of 3 statistics")
    diff = page.locator("#baseline-diff")
    expect(diff).to_contain_text("v1 → v2")
    expect(diff).to_contain_text("2 changed")
    expect(diff.locator("tbody tr")).to_have_count(2)
    _shoot(page, screenshot_dir, "baselines")

    # Two picks in a row: the form is not swapped out between them (only the diff below it is), so the
    # second pick is never lost to the first one's response.
    diff.locator("form").evaluate("form => { form.dataset.kept = 'yes'; }")
    diff.locator("select[name=from]").select_option("2")
    diff.locator("select[name=to]").select_option("1")
    expect(diff).to_contain_text("v2 → v1")
    expect(diff.locator("form[data-kept=yes]")).to_have_count(1)

    page.locator("#baseline-v1 summary").click()
    page.locator("#baseline-v1 textarea[name=reason]").fill("v2 flags too little on the S21")
    page.locator("#baseline-v1").get_by_role("button", name="Make a new version from v1").click()
    expect(page.get_by_role("heading", name="Active version v3")).to_be_visible()
    expect(page.locator(".flash")).to_contain_text("v3 now carries the statistics of v1")
    assert BaselineVersion.objects.get(fleet=fleet, is_active=True).number == 3

    page.get_by_role("link", name="Proposals", exact=True).first.click()
    table = page.locator("#proposal-table")
    expect(table).to_contain_text("11 FP of 12 reviewed")
    table.get_by_role("link", name=re.compile(r"Pending · 1")).click()
    expect(page).to_have_url(re.compile(r"status=pending"))
    expect(table.locator("tbody tr")).to_have_count(1)
    _shoot(page, screenshot_dir, "proposals")

    table.get_by_role("link", name=f"#{proposal.pk} Median shift").click()
    expect(page.locator("#impact")).to_contain_text("412 → 398")
    # Made against v2, and the rollback made v3: it can still be rejected, no longer approved.
    expect(page.locator(".decision-buttons")).to_be_visible()
    expect(page.get_by_text(f"Proposal {proposal.pk} was made against baseline v2; v3 is active now")).to_be_visible()
    expect(page.get_by_role("button", name="Approve and apply")).to_have_count(0)
    _shoot(page, screenshot_dir, "proposal")
    page.locator("#decision-comment").fill("The S21 runs warm by design; keep flagging it.")
    page.get_by_role("button", name="Reject").click()
    expect(page.locator("#proposal-status")).to_contain_text("Rejected")
    expect(page.get_by_role("button", name="Approve and apply")).to_have_count(0)
    proposal.refresh_from_db()
    assert proposal.status == ProposalStatus.REJECTED

    page.get_by_role("link", name="Audit", exact=True).click()
    audit = page.locator("#audit-table")
    expect(audit).to_contain_text("Adjustment rejected")
    audit.locator("input[name=actor]").fill("celery")
    audit.locator("input[name=actor]").press("Enter")
    expect(page).to_have_url(re.compile(r"actor=celery"))
    expect(audit.locator("tbody tr")).to_have_count(1)
    audit.locator("input[name=actor]").fill("")
    audit.locator("input[name=actor]").press("Enter")
    expect(audit.locator("tbody tr")).to_have_count(AuditEvent.objects.count())
    _shoot(page, screenshot_dir, "audit")

    audit.locator("select[name=action]").select_option("proposal_rejected")
    expect(audit.locator("tbody tr")).to_have_count(1)
    href = audit.get_by_role("link", name="Export CSV").get_attribute("href")
    assert "action=proposal_rejected" in href
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    request = urllib.request.Request(f"{live_server.url}{href}", headers={"Cookie": cookies})
    with urllib.request.urlopen(request) as answer:
        rows = list(csv.reader(io.StringIO(answer.read().decode())))
    assert len(rows) == 2 and rows[1][1:4] == ["ada", "proposal_rejected", "demo"]
    assert rows[1][7] == "The S21 runs warm by design; keep flagging it."
    assert not errors, errors
