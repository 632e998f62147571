"""Every page of the review app, filled by a real pipeline run, passes axe-core in headless Chromium.

axe-core (Deque; through axe-playwright-python, which bundles it) runs its default rule set: WCAG 2.0,
2.1 and 2.2 levels A and AA (labels, names of buttons and links, colour contrast, ARIA use, heading
and landmark structure, ...) plus Deque's best practices. A page passes with no violation; the
failure names the page, the rule and the elements. Review pages are checked at 1280 px and at phone
width (360 px), the others at 1280 px; error states (a failed login, an empty rule form) too.
"""
from __future__ import annotations

import os

import pytest
from django.core.management import call_command

from alerts.models import Alert
from baselines.models import BaselineProposal
from baselines.services import proposals_suggest
from detection.choices import Label, Verdict
from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import generate_fleet
from detection.models import AnomalyResult, Device, Fleet
from detection.services import feedback_give_many, pipeline_run_create, pipeline_run_execute
from explanations.services import explanation_generate
from tests.browsing import signed_in

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # Playwright's sync API runs an event loop in this thread

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PHONE = 360


@pytest.fixture
def reviewed_fleet(django_user_model):
    """A scored synthetic fleet (12 devices x 5 days hourly) with one explained anomaly, false-positive
    verdicts on one cohort's anomalies and the baseline proposals suggested from them."""
    ingest_batch(batch=generate_fleet(devices=12, days=5, seed=7), fleet_name="demo")
    fleet = Fleet.objects.get(name="demo")
    pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    call_command("create_demo_user")
    user = django_user_model.objects.get(username="demo")
    anomalies = AnomalyResult.objects.filter(fleet=fleet, label=Label.ANOMALY)
    explanation_generate(anomaly=anomalies.order_by("-anomaly_score").first())
    model = anomalies.values_list("device__model", flat=True).first()
    feedback_give_many(anomalies=list(anomalies.filter(device__model=model)), user=user,
                       verdict=Verdict.FALSE_POSITIVE)
    proposals_suggest(fleet=fleet, user=user)
    return fleet


def _violations(page) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    page.wait_for_load_state("networkidle")
    found = Axe().run(page).response["violations"]
    where = f"{page.url} ({page.viewport_size['width']} px)"
    # axe lets an aria-describedby name an id that is not there; a screen reader then reads nothing
    # (a form field's error or help text: Django's inputs point at <id>_error and <id>_helptext).
    dangling = page.evaluate("""() => [...document.querySelectorAll('[aria-describedby], [aria-labelledby]')]
        .flatMap(e => ['aria-describedby', 'aria-labelledby'].flatMap(a => (e.getAttribute(a) || '').split(/\\s+/)
        .filter(id => id && !document.getElementById(id)).map(id => `${e.id || e.tagName} ${a}=${id}`)))""")
    return [f"{where}: {v['id']} ({v['impact']}) {v['help']}: {', '.join(str(n['target']) for n in v['nodes'][:5])}"
            for v in found] + [f"{where}: no element with the id that {d} names" for d in dangling]


def test_every_page_passes_axe_core(live_server, browser, reviewed_fleet):
    pytest.importorskip("axe_playwright_python")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/accounts/login/")
    problems = _violations(page)
    page.get_by_label("Username").fill("demo")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector("[role=alert]")
    problems += _violations(page)

    page, errors = signed_in(browser, live_server, "demo", "demo")
    fleet = reviewed_fleet
    anomaly = AnomalyResult.objects.filter(fleet=fleet, label=Label.ANOMALY).order_by("-anomaly_score").first()
    proposal = BaselineProposal.objects.filter(fleet=fleet).first()
    alert = Alert.objects.filter(fleet=fleet).first()
    assert proposal is not None, "the false positives gave no proposal: the proposal pages go unchecked"
    review = ["/", f"/fleets/{fleet.name}/", f"/fleets/{fleet.name}/anomalies/", f"/anomalies/{anomaly.pk}/",
              "/alerts/", "/proposals/", f"/proposals/{proposal.pk}/"]
    other = [f"/fleets/{fleet.name}/devices/", f"/devices/{Device.objects.filter(fleet=fleet).first().pk}/",
             f"/fleets/{fleet.name}/models/", f"/fleets/{fleet.name}/health/", "/runs/", "/alerts/rules/",
             "/alerts/rules/new/", "/baselines/", f"/fleets/{fleet.name}/baselines/",
             f"/fleets/{fleet.name}/baselines/diff/", "/audit/"]
    if alert is not None:
        review.append(f"/alerts/{alert.pk}/")
    for path in review + other:
        page.goto(f"{live_server.url}{path}")
        problems += _violations(page)
        if path in review:
            page.set_viewport_size({"width": PHONE, "height": 800})
            problems += _violations(page)
            page.set_viewport_size({"width": 1280, "height": 900})
    # A form sent back with its errors (the browser's own checks off, so the server's answer).
    page.goto(f"{live_server.url}/alerts/rules/new/")
    page.locator("form.rule-form").evaluate("form => { form.noValidate = true; }")
    page.get_by_role("button", name="Save rule").click()
    page.wait_for_selector(".field-error")
    problems += _violations(page)
    assert not problems, "\n".join(problems)
    assert not errors, errors


def test_keyboard_focus_survives_a_verdict(live_server, browser, reviewed_fleet):
    """A verdict given from the keyboard keeps the focus where the reviewer is (static/vigil/focus.js):
    on the pressed button after its block is swapped (and pushed again over the websocket), on the
    bulk form once the reviewed rows leave an "open" list, not on <body> at the top of the page."""
    expect = pytest.importorskip("playwright.sync_api").expect
    fleet = reviewed_fleet
    anomaly = (AnomalyResult.objects.filter(fleet=fleet, label=Label.ANOMALY, feedback__isnull=True)
               .order_by("-anomaly_score").first())
    page, errors = signed_in(browser, live_server, "demo", "demo", f"/anomalies/{anomaly.pk}/")
    button = page.locator("#feedback").get_by_role("button", name="True positive")
    button.focus()
    page.keyboard.press("Enter")
    expect(button).to_have_attribute("aria-pressed", "true")
    expect(button).to_be_focused()
    page.wait_for_timeout(500)  # the websocket push of the same block comes after the response
    expect(button).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("#feedback").get_by_role("button", name="False positive")).to_be_focused()

    page.goto(f"{live_server.url}/fleets/{fleet.name}/anomalies/?review=open")
    page.locator("#anomaly-table tbody input[type=checkbox]").first.focus()
    page.keyboard.press("Space")
    bulk = page.locator("#bulk-review")
    bulk.get_by_role("button", name="False positive").focus()
    page.keyboard.press("Enter")
    expect(bulk).to_contain_text("1 anomaly")
    expect(page.locator("#bulk-review")).to_be_focused()
    assert not errors, errors
