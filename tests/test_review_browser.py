"""The review app in headless Chromium: a reviewer filters the list, opens an anomaly and marks it a false
positive with the "f" key; j moves to the next anomaly. Screenshots at 1280 and 360 px of the overview,
the list and the detail page go to $VIGIL_SCREENSHOT_DIR (default var/screenshots/).
"""
from __future__ import annotations

import os
import re

import factory
import pytest

from detection.choices import Label, ModelStatus, Severity, Verdict
from detection.models import AnomalyFeedback
from tests.factories import (
    AnomalyResultFactory, DeviceFactory, FleetFactory, ModelVersionFactory, PipelineRunFactory, user_with_role,
)
from tests.browsing import signed_in
from tests.test_browser_pages import WIDTHS

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _shoot(page, folder, name: str) -> None:
    """Full-page screenshots at each width, once the charts have redrawn for it."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(300)
        assert page.evaluate("document.documentElement.scrollWidth") <= width, f"{name} overflows at {width} px"
        small = page.evaluate("""() => [...document.querySelectorAll(
              'main a.button, main button, .nav a, .segmented a, .filters select, .filters input, textarea')]
            .filter(e => e.offsetParent !== null && e.type !== 'hidden')
            .map(e => [e.name || e.textContent.trim(), e.getBoundingClientRect().height]).filter(([t, h]) => h < 44)""")
        assert not small, f"{name}: touch targets under 44 px at {width} px: {small}"
        page.screenshot(path=str(folder / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


@pytest.fixture
def review_data():
    fleet = FleetFactory(name="demo", description="Synthetic warehouse scanners, 14 days")
    devices = [DeviceFactory(fleet=fleet, external_id=f"scanner-{i:03d}", model=m, store=s)
               for i, (m, s) in enumerate([("TC52", "north"), ("TC57", "south"), ("MC33", "north")] * 4)]
    model = ModelVersionFactory(fleet=fleet, version=2, status=ModelStatus.PRODUCTION, training_rows=20160,
                                training_seconds=12.5, feature_list=["a"] * 24,
                                params={"n_estimators": 200, "contamination": 0.01})
    run = PipelineRunFactory(fleet=fleet, model_version=model, baseline_version=model.baseline_version,
                             n_anomalies=60)
    severities = factory.Iterator([Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW, Severity.HIGH])
    common = {"run": run, "model_version": model, "device": factory.Iterator(devices)}
    AnomalyResultFactory.create_batch(60, severity=severities, **common)
    scores = factory.Iterator([0.1 + i / 200 for i in range(100)])
    AnomalyResultFactory.create_batch(300, label=Label.NORMAL, severity="", anomaly_score=scores, **common)
    return fleet, run


def test_reviewer_filters_opens_an_anomaly_and_marks_it_false_positive(live_server, browser, review_data,
                                                                       screenshot_dir):
    expect = pytest.importorskip("playwright.sync_api").expect
    user_with_role("rita", "reviewer", password="pw-rita")
    page, errors = signed_in(browser, live_server, "rita", "pw-rita", "/fleets/demo/")

    expect(page.get_by_role("heading", name="demo · overview")).to_be_visible()
    expect(page.locator("#score-histogram svg")).to_be_visible()
    expect(page.locator("#anomaly-trend svg")).to_be_visible()
    expect(page.get_by_role("button", name="Run pipeline")).to_have_count(0)  # reviewers cannot start runs
    _shoot(page, screenshot_dir, "review-overview")

    page.goto(f"{live_server.url}/fleets/demo/anomalies/")
    table = page.locator("#anomaly-table")
    expect(table).to_contain_text("1–50 of 60 anomalies")
    table.get_by_label("Severity").select_option("critical")
    expect(page).to_have_url(re.compile(r"severity=critical"))
    expect(table).to_contain_text("of 12 anomalies")
    table.get_by_label("Store").select_option("south")
    expect(page).to_have_url(re.compile(r"store=south"))
    expect(table).to_contain_text("of 4 anomalies")
    table.get_by_label("Review").select_option("open")
    expect(table.locator("tbody tr")).to_have_count(4)
    _shoot(page, screenshot_dir, "review-list")

    table.locator("tbody tr").first.get_by_role("link").first.click()
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    detail_url = page.url
    page.wait_for_load_state("load")  # the shortcut script is deferred: let it bind before typing
    page.keyboard.press("f")
    expect(page.locator('#feedback button[data-shortcut="f"]')).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#feedback")).to_contain_text("False positive · 1")
    expect(page.locator("#feedback")).to_contain_text("rita")
    assert AnomalyFeedback.objects.get().verdict == Verdict.FALSE_POSITIVE
    _shoot(page, screenshot_dir, "review-detail")

    page.keyboard.press("j")  # the next (older) anomaly of the run
    expect(page).not_to_have_url(detail_url)
    expect(page.locator("#feedback")).to_contain_text("No verdict yet")

    page.goto(f"{live_server.url}/fleets/demo/anomalies/?severity=critical&store=south&review=open")
    expect(page.locator("#anomaly-table tbody tr")).to_have_count(3)  # the reviewed one left the open list
    assert not errors, errors


def test_reviewer_selects_rows_and_gives_them_one_verdict(live_server, browser, review_data, screenshot_dir):
    expect = pytest.importorskip("playwright.sync_api").expect
    user_with_role("rita", "reviewer", password="pw-rita")
    page, errors = signed_in(browser, live_server, "rita", "pw-rita",
                             "/fleets/demo/anomalies/%3Fseverity%3Dhigh%26review%3Dopen")
    table = page.locator("#anomaly-table")
    expect(table).to_contain_text("of 24 anomalies")
    bar = page.locator("#bulk-review")
    expect(bar.get_by_role("button", name="False positive")).to_be_disabled()  # nothing selected yet
    rows = table.locator('tbody input[name="anomaly"]')
    rows.nth(0).check()
    rows.nth(2).check()
    expect(bar).to_contain_text("2 of 24 on this page selected")
    bar.get_by_placeholder("Comment (optional)").fill("docking station fault")
    bar.get_by_role("button", name="True positive").click()
    expect(bar).to_contain_text("Marked 2 anomalies as true positive.")
    expect(table).to_contain_text("of 22 anomalies")  # the list still filters on open ones
    expect(page).to_have_url(re.compile(r"severity=high&review=open"))
    assert set(AnomalyFeedback.objects.values_list("verdict", "comment")) == {(Verdict.TRUE_POSITIVE,
                                                                               "docking station fault")}
    _shoot(page, screenshot_dir, "review-bulk")

    page.context.set_offline(True)  # a bulk verdict is not queued offline: the bar says it was not saved
    rows.nth(0).check()
    bar.get_by_role("button", name="Not sure").click()
    expect(bar).to_contain_text("No connection: nothing was saved")
    page.context.set_offline(False)
    rows.nth(0).uncheck()
    assert not AnomalyFeedback.objects.filter(verdict=Verdict.NOT_SURE).exists()

    page.get_by_label("All on this page").check()
    expect(page.locator("#bulk-review")).to_contain_text("22 of 22 on this page selected")
    page.locator("#bulk-review").get_by_role("button", name="False positive").click()
    expect(table).to_contain_text("Marked 22 anomalies as false positive.")  # above the now empty list
    expect(table).to_contain_text("No anomalies match these filters")
    assert AnomalyFeedback.objects.filter(verdict=Verdict.FALSE_POSITIVE).count() == 22
    assert not errors, errors


def test_the_bulk_bar_follows_a_phone_reader_only_once_a_row_is_picked(live_server, browser, review_data):
    expect = pytest.importorskip("playwright.sync_api").expect
    user_with_role("rita", "reviewer", password="pw-rita")
    page, errors = signed_in(browser, live_server, "rita", "pw-rita", "/fleets/demo/anomalies/")
    bar, rows = page.locator("#bulk-review"), page.locator('#anomaly-table tbody input[name="anomaly"]')
    expect(rows).to_have_count(50)

    def bar_top_after_scrolling_to(row: int) -> float:
        rows.nth(row).scroll_into_view_if_needed()
        page.evaluate("window.scrollBy(0, 400)")
        return page.evaluate("document.getElementById('bulk-review').getBoundingClientRect().top")

    page.set_viewport_size({"width": 390, "height": 844})
    assert bar_top_after_scrolling_to(20) < -100  # nothing picked: the bar scrolls away with the page
    rows.nth(20).check()
    expect(bar).to_contain_text("1 of 50 on this page selected")
    assert abs(bar_top_after_scrolling_to(30)) < 1  # a row picked: the verdict stays at the top
    rows.nth(20).uncheck()
    page.set_viewport_size({"width": 1280, "height": 900})
    assert abs(bar_top_after_scrolling_to(30)) < 1  # a wide screen has room for it always
    assert not errors, errors


def test_baseline_band_of_a_negative_metric_sits_around_its_median(live_server, browser, screenshot_dir):
    """The detail chart's band is median +- 3 * 1.4826 * MAD, also for a metric below zero (Wi-Fi dBm):
    ECharts' default stacking put the band's width on 0 instead of on its negative lower edge."""
    import datetime as dt
    import json

    from baselines.models import BaselineStatistic
    from detection.models import Telemetry
    from tests.factories import BaselineVersionFactory, T0

    fleet = FleetFactory(name="wifi", metric_schema=[{"name": "wifi_rssi", "unit": "dBm", "domain": "network"}])
    device = DeviceFactory(fleet=fleet, external_id="scanner-001")
    baseline = BaselineVersionFactory(fleet=fleet, number=1, is_active=True)
    BaselineStatistic.objects.create(version=baseline, level="cohort", feature="wifi_rssi", median=-60.0, mad=3.0,
                                     row_count=500, group_key=json.dumps(
                                         {"manufacturer": "Zebra", "model": "TC52", "os_version": "11"}))
    Telemetry.objects.bulk_create(Telemetry(fleet=fleet, device=device, timestamp=T0 + dt.timedelta(hours=h),
                                            values={"wifi_rssi": -60.0 + (h % 5) - (30 if h == 24 else 0)})
                                  for h in range(48))
    model = ModelVersionFactory(fleet=fleet, baseline_version=baseline, status=ModelStatus.PRODUCTION)
    anomaly = AnomalyResultFactory(
        run=PipelineRunFactory(fleet=fleet, model_version=model), device=device, model_version=model,
        timestamp=T0 + dt.timedelta(hours=24),
        top_metrics=[{"metric": "wifi_rssi", "value": -86.0, "typical": -60.0, "z": -5.8, "level": "cohort"}])
    user_with_role("vera", "viewer", password="pw-vera")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/accounts/login/?next=/anomalies/{anomaly.pk}/")
    page.get_by_label("Username").fill("vera")
    page.get_by_label("Password").fill("pw-vera")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector('[data-metric="wifi_rssi"] svg')
    # The band's edges as ECharts stacked them: the lower edge series, then lower + width on top of it.
    edges = page.evaluate("""() => {
        const chart = echarts.getInstanceByDom(document.querySelector('[data-metric="wifi_rssi"]'));
        return chart.getModel().getSeries().filter(s => s.get('stack') === 'band').map(s => {
            const data = s.getData();
            return data.get(data.getCalculationInfo('stackResultDimension') || 'y', 0);
        });
    }""")
    width = 3 * 1.4826 * 3.0
    assert edges == pytest.approx([-60.0 - width, -60.0 + width], abs=1e-6)
    page.screenshot(path=str(screenshot_dir / "anomaly-band-negative-metric.png"), full_page=True)
