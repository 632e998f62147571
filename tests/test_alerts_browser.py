"""Alert list, alert detail (acknowledge), rules and model health in headless Chromium, at 1280 and 360 px.

Screenshots go to $VIGIL_SCREENSHOT_DIR (default var/screenshots/), named alerts-*.png.
"""
from __future__ import annotations

import datetime as dt
import os

import factory
import pytest

from alerts import services
from alerts.models import AlertRule, DriftReport
from detection.choices import Severity
from tests.factories import (
    AnomalyResultFactory,
    DeviceFactory,
    FleetFactory,
    ModelVersionFactory,
    PipelineRunFactory,
    user_with_role,
)

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


@pytest.fixture
def alert_data():
    fleet = FleetFactory(name="demo", config={"contamination": 0.03})
    model = ModelVersionFactory(fleet=fleet, status="production", metrics={"threshold": 0.8})
    training = PipelineRunFactory(fleet=fleet, model_version=model, n_scored=2000, n_anomalies=60)
    model.run = training
    model.save()
    AnomalyResultFactory.create_batch(40, run=training, model_version=model, label=1, severity="",
                                      anomaly_score=factory.Iterator([0.2, 0.3, 0.4, 0.5, 0.6]))
    run = PipelineRunFactory(fleet=fleet, model_version=model, n_scored=2000, n_anomalies=140)
    s21 = [DeviceFactory(fleet=fleet, manufacturer="Samsung", model="Galaxy S21", os_version="Android 14",
                         store=f"store-{i % 5:03d}") for i in range(32)]
    other = DeviceFactory(fleet=fleet, external_id="scanner-007")
    anomalies = [AnomalyResultFactory(run=run, model_version=model, device=d, severity=Severity.CRITICAL,
                                      timestamp=T0 + dt.timedelta(minutes=i),
                                      top_metrics=[{"metric": "battery_temp", "domain": "battery", "z": 7.1}])
                 for i, d in enumerate(s21)]
    anomalies += [AnomalyResultFactory(run=run, model_version=model, device=other, severity=Severity.HIGH,
                                       timestamp=T0 + dt.timedelta(minutes=10 * i),
                                       top_metrics=[{"metric": "wifi_rssi", "domain": "network", "z": -5}])
                  for i in range(4)]
    AlertRule.objects.create(fleet=fleet, name="on-call", email_to="oncall@example.com", min_severity="critical",
                             budget=5, quiet_start=dt.time(22), quiet_end=dt.time(6))
    alerts = services.alerts_ingest(anomalies=anomalies)
    DriftReport.objects.create(
        fleet=fleet, status="drift", summary="3 of 11 features drifting: battery_level, battery_temp, cpu_pct",
        windows={"reference": ["2024-02-15T00:00:00+00:00", "2024-02-28T00:00:00+00:00"],
                 "current": ["2024-02-29T00:00:00+00:00", "2024-03-01T00:00:00+00:00"]},
        features=[{"feature": f, "test": "ks", "effect": e, "p_value": p, "psi": psi, "status": s, "note": ""}
                  for f, e, p, psi, s in [("battery_level", 0.41, 1e-30, 0.72, "drift"),
                                          ("battery_temp", 0.33, 1e-22, 0.41, "drift"),
                                          ("cpu_pct", 0.22, 1e-9, 0.27, "drift"),
                                          ("wifi_rssi", 0.03, 0.4, 0.01, "ok")]])
    user = user_with_role("rita", "approver")
    user.set_password("pw-rita-1")
    user.save()
    return alerts


def _shoot(page, folder, name):
    for width in (1280, 360):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(folder / f"alerts-{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_alert_pages_in_the_browser(live_server, browser, alert_data, screenshot_dir):
    expect = pytest.importorskip("playwright.sync_api").expect
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/accounts/login/?next=/alerts/")
    page.get_by_label("Username").fill("rita")
    page.get_by_label("Password").fill("pw-rita-1")
    page.get_by_role("button", name="Log in").click()

    expect(page.get_by_role("heading", name="Alerts")).to_be_visible()
    expect(page.locator("#alert-badge")).to_have_text("2")
    expect(page.locator("#alert-table")).to_contain_text("32 Samsung Galaxy S21 devices on Android 14 in 5 stores")
    page.get_by_label("Severity").select_option("high")  # htmx swaps the table and pushes the URL
    expect(page.locator("#alert-table tbody tr")).to_have_count(1)
    expect(page).to_have_url(f"{live_server.url}/alerts/?fleet=&status=&severity=high")
    page.get_by_label("Severity").select_option("")
    expect(page.locator("#alert-table tbody tr")).to_have_count(2)
    _shoot(page, screenshot_dir, "list")

    page.get_by_role("link", name="32 Samsung Galaxy S21").click()
    expect(page.get_by_role("heading", name="Timeline")).to_be_visible()
    page.get_by_role("button", name="Acknowledge").click()
    expect(page.locator(".summary")).to_contain_text("Acknowledged")
    expect(page.locator(".timeline")).to_contain_text("rita")
    _shoot(page, screenshot_dir, "detail")

    page.goto(f"{live_server.url}/alerts/rules/")
    expect(page.locator("tbody")).to_contain_text("on-call")
    _shoot(page, screenshot_dir, "rules")
    page.get_by_role("link", name="New rule").click()
    page.get_by_label("Fleet").select_option("demo")
    page.get_by_label("Name").fill("webhook")
    page.get_by_label("Webhook URL").fill("https://hooks.example.com/vigil")
    page.get_by_role("button", name="Save rule").click()
    expect(page.locator(".field-error")).to_contain_text("needs a secret")
    _shoot(page, screenshot_dir, "rule-form")

    page.goto(f"{live_server.url}/fleets/demo/health/")
    expect(page.locator("#score-drift svg")).to_be_visible()
    expect(page.locator("#rate-trend svg")).to_be_visible()
    expect(page.locator(".kpis")).to_contain_text("Drift")
    _shoot(page, screenshot_dir, "health")
