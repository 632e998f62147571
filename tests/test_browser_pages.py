"""The pages in headless Chromium: log in through the form, browse, sort, page, watch a run finish.

Screenshots at 1280 and 360 px go to $VIGIL_SCREENSHOT_DIR (default var/screenshots/).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import factory
import pytest
from django.core.management import call_command

from detection.choices import Label, RunStage, RunStatus, Severity
from detection.models import PipelineRun
from tests.factories import (
    AnomalyResultFactory,
    DeviceFactory,
    FleetFactory,
    ModelVersionFactory,
    PipelineRunFactory,
    user_with_role,
)

# Playwright's sync API runs an event loop in this thread; the ORM calls below are still synchronous.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTHS = (1280, 360)


@pytest.fixture
def demo_data():
    fleet = FleetFactory(name="demo", description="Synthetic warehouse scanners, 14 days")
    devices = [DeviceFactory(fleet=fleet, external_id=f"scanner-{i:03d}", model=m)
               for i, m in enumerate(["TC52", "TC57", "MC33"] * 4)]
    model_version = ModelVersionFactory(fleet=fleet, version=2, baseline_version__number=1)
    versions = {"model_version": model_version, "baseline_version": model_version.baseline_version}
    PipelineRunFactory(fleet=fleet, status=RunStatus.FAILED, stage=RunStage.TRAIN, n_scored=0,
                       row_counts={"ingest": 900}, stage_timings={"ingest": 0.4, "features": 1.2},
                       error="Too few training rows: 900 < 1000")
    scored = PipelineRunFactory(fleet=fleet, n_anomalies=60, warnings=["3 devices sent nothing"], **versions)
    severities = factory.Iterator([Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW])
    AnomalyResultFactory.create_batch(60, run=scored, device=factory.Iterator(devices), severity=severities,
                                      model_version=model_version)
    AnomalyResultFactory.create_batch(10, run=scored, device=factory.Iterator(devices), label=Label.NORMAL,
                                      model_version=model_version)
    running = PipelineRunFactory(fleet=fleet, status=RunStatus.RUNNING, stage=RunStage.TRAIN,
                                 finished_at=None, n_scored=0, stage_timings={"ingest": 0.9, "features": 2.2},
                                 row_counts={"ingest": 20160})
    return fleet, scored, running


def _shoot(page, folder: Path, name: str) -> None:
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(folder / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_user_logs_in_and_browses_fleets_runs_and_anomalies(live_server, browser, demo_data, screenshot_dir):
    expect = pytest.importorskip("playwright.sync_api").expect
    _, scored, running = demo_data
    call_command("create_demo_user")
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    page.goto(f"{live_server.url}/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    _shoot(page, screenshot_dir, "login")
    page.get_by_label("Username").fill("demo")
    page.get_by_label("Password").fill("demo")
    page.get_by_role("button", name="Log in").click()

    expect(page.get_by_role("heading", name="Fleets")).to_be_visible()
    row = page.locator("tbody tr", has_text="demo")
    expect(row).to_contain_text("12")  # devices
    expect(row).to_contain_text("Running")  # the latest run
    expect(row).to_contain_text("60")  # anomalies of the latest scored run
    _shoot(page, screenshot_dir, "home")

    page.get_by_role("link", name="Runs", exact=True).first.click()
    expect(page.get_by_role("heading", name="Pipeline runs")).to_be_visible()
    expect(page.locator(f"#run-{scored.pk}")).to_contain_text("Succeeded")
    expect(page.get_by_text("Too few training rows")).to_be_visible()
    _shoot(page, screenshot_dir, "runs")

    # The running row polls its fragment; once the run finishes the fragment answers 286 and shows the result.
    PipelineRun.objects.filter(pk=running.pk).update(status=RunStatus.SUCCEEDED, stage=RunStage.DONE)
    expect(page.locator(f"#run-{running.pk} .badge")).to_have_text("Succeeded", timeout=20_000)
    expect(page.locator(f"#run-{running.pk}")).not_to_have_attribute("hx-trigger", "every 2s")

    page.goto(f"{live_server.url}/fleets/demo/anomalies/?run={scored.pk}")
    table = page.locator("#anomaly-table")
    expect(table.locator("tbody tr")).to_have_count(50)
    expect(table).to_contain_text("scanner-")
    expect(table).to_contain_text("battery_level")
    expect(table).to_contain_text("1–50 of 60 anomalies")
    _shoot(page, screenshot_dir, "anomalies")

    table.get_by_role("link", name="Highest score").click()
    expect(page).to_have_url(re.compile(r"sort=-score"))
    expect(table.get_by_role("link", name="Highest score")).to_have_attribute("aria-current", "true")
    table.get_by_role("link", name="Next").click()
    expect(page).to_have_url(re.compile(r"page=2"))
    expect(table.locator("tbody tr")).to_have_count(10)
    assert "sort=-score" in page.url and f"run={scored.pk}" in page.url

    # Searching devices: the search box is not swapped out under the typist. The first pause sends
    # "scanner-00"; typing goes on while that answer arrives, and the box keeps every key.
    page.goto(f"{live_server.url}/fleets/demo/devices/")
    devices = page.locator("#device-table")
    expect(devices).to_contain_text("1–12 of 12 devices")
    search = devices.get_by_label("Search")
    devices.locator("form").evaluate("form => { form.dataset.kept = 'yes'; }")
    search.press_sequentially("scanner-00")
    expect(devices).to_contain_text("of 10 devices")
    search.press_sequentially("1", delay=0)
    expect(devices).to_contain_text("1–1 of 1 device")
    expect(devices).not_to_contain_text("1 devices")
    expect(search).to_have_value("scanner-001")
    expect(search).to_be_focused()
    expect(devices.locator("form[data-kept=yes]")).to_have_count(1)  # only the results were swapped
    expect(page).to_have_url(re.compile(r"q=scanner-001"))

    page.goto(f"{live_server.url}/fleets/demo/anomalies/?page=abc&run=xyz&sort=bogus")
    expect(page.locator("#anomaly-table tbody tr")).to_have_count(50)

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in to Vigil")).to_be_visible()


def test_empty_states_in_the_browser(live_server, browser, screenshot_dir, django_user_model):
    expect = pytest.importorskip("playwright.sync_api").expect
    user_with_role("eve", "viewer", password="pw-eve")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("Username").fill("eve")
    page.get_by_label("Password").fill("pw-eve")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_text("No fleets yet")).to_be_visible()
    expect(page.get_by_text("python manage.py run_pipeline --fleet demo")).to_be_visible()
    _shoot(page, screenshot_dir, "home-empty")
    FleetFactory(name="fresh")
    page.goto(f"{live_server.url}/fleets/fresh/anomalies/")
    expect(page.get_by_text("No scored run yet")).to_be_visible()
    _shoot(page, screenshot_dir, "anomalies-empty")
