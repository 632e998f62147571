"""The Explain flow in headless Chromium: from the anomaly list to the detail page, Explain, the panel
filling in (eagerly, and by polling while a worker generates), Regenerate.

Screenshots at 1280 and 360 px go to $VIGIL_SCREENSHOT_DIR (default var/screenshots/).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from django.core.management import call_command

from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import generate_fleet
from detection.models import AnomalyResult, Fleet
from detection.services import pipeline_run_create, pipeline_run_execute
from explanations.models import Explanation
from explanations.services import explanation_execute

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # Playwright's sync API runs an event loop in this thread

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

@pytest.fixture
def scored_run():
    ingest_batch(batch=generate_fleet(devices=24, days=7, seed=7), fleet_name="demo")
    return pipeline_run_execute(run_id=pipeline_run_create(fleet=Fleet.objects.get(name="demo")).id)


def _login(page, url):
    call_command("create_demo_user")
    page.goto(f"{url}/accounts/login/")
    page.get_by_label("Username").fill("demo")
    page.get_by_label("Password").fill("demo")
    page.get_by_role("button", name="Log in").click()


def _shoot(page, folder: Path, name: str) -> None:
    for width in (1280, 360):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(folder / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_reviewer_explains_an_anomaly_from_the_list(live_server, browser, scored_run, screenshot_dir):
    expect = pytest.importorskip("playwright.sync_api").expect
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _login(page, live_server.url)
    page.goto(f"{live_server.url}/fleets/demo/anomalies/?sort=-score")
    first = page.locator("#anomaly-table tbody tr").first
    device = first.locator("td[data-label=Device] strong").inner_text()
    first.locator("td[data-label=Time] a").click()

    expect(page).to_have_url(re.compile(r"/anomalies/\d+/$"))
    expect(page.get_by_role("heading", level=1)).to_contain_text(device)
    expect(page.locator(".top-metrics tbody tr").first).to_be_visible()
    panel = page.locator("#explanation-panel")
    expect(panel).to_contain_text("No explanation yet")
    _shoot(page, screenshot_dir, "anomaly-detail-unexplained")

    panel.get_by_role("button", name="Explain").click()
    expect(panel.locator(".badge")).to_have_text("Validated", timeout=15000)
    expect(panel).to_contain_text(f"Device {device}")
    expect(panel).to_contain_text("Next steps:")
    expect(panel).to_contain_text("Written by Built-in writer")
    expect(panel.locator(".bar-row").first).to_be_visible()
    expect(panel).to_contain_text("additivity checked")
    _shoot(page, screenshot_dir, "anomaly-detail-explained")

    panel.get_by_role("button", name="Regenerate").click()
    expect(panel.get_by_role("button", name="Regenerate")).to_be_enabled()
    anomaly_id = int(re.search(r"/anomalies/(\d+)/", page.url).group(1))
    assert Explanation.objects.filter(anomaly_id=anomaly_id, status="ready").count() == 2


def test_panel_polls_until_a_worker_finishes(live_server, browser, scored_run, monkeypatch):
    expect = pytest.importorskip("playwright.sync_api").expect
    # No worker: the Explain button leaves a pending explanation behind, as with a real broker.
    monkeypatch.setattr("explanations.tasks.explain_anomaly_task.delay", lambda *args, **kwargs: None)
    anomaly = AnomalyResult.objects.filter(run=scored_run, label=-1).order_by("-anomaly_score").first()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _login(page, live_server.url)
    page.goto(f"{live_server.url}/anomalies/{anomaly.pk}/")
    panel = page.locator("#explanation-panel")
    panel.get_by_role("button", name="Explain").click()
    expect(panel).to_contain_text("Generating the explanation")
    expect(panel).to_have_attribute("hx-trigger", "every 2s")

    pending = Explanation.objects.get(anomaly=anomaly, status="pending")
    explanation_execute(explanation_id=pending.pk)  # the "worker"
    expect(panel.locator(".badge")).to_have_text("Validated", timeout=20_000)
    expect(panel).not_to_have_attribute("hx-trigger", "every 2s")
