"""The review app live, in headless Chromium against a real ASGI server (daphne), so pages get their
websocket updates: (a) a second browser session sees a verdict arrive, (b) a pipeline run's new anomalies
appear as rows without a reload, (c) the app is installable (manifest, root-scoped service worker,
Chromium's own installability check), (d) a verdict given offline is queued in IndexedDB and synced
exactly once when the connection returns. Screenshots at 1280 and 360 px of the device pages and the
anomaly detail with its charts go to $VIGIL_SCREENSHOT_DIR (default var/screenshots/).

Daphne runs in a thread of the test process (like Django's live_server): it shares the in-memory SQLite
test database and the in-memory channel layer, and the Twisted reactor can start only once per process,
so the server lives for the session.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time

import factory
import pytest
from django.core.management import call_command

from baselines.models import BaselineStatistic
from detection.choices import Label, ModelStatus, Severity
from detection.models import AnomalyFeedback, AnomalyResult, Telemetry
from tests.factories import (
    T0, AnomalyResultFactory, DeviceFactory, FleetFactory, ModelVersionFactory, PipelineRunFactory, user_with_role,
)
from tests.test_browser_pages import WIDTHS

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _application():
    """The project's ASGI app, with static files served from the finders (as live_server does)."""
    from channels.routing import ProtocolTypeRouter
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
    from django.core.asgi import get_asgi_application

    from anomaly_project import asgi

    return ProtocolTypeRouter({"http": ASGIStaticFilesHandler(get_asgi_application()),
                               "websocket": asgi.application.application_mapping["websocket"]})


@pytest.fixture(scope="session")
def asgi_url():
    pytest.importorskip("playwright.sync_api")
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server
    from twisted.internet import reactor

    server = Server(application=_application(), endpoints=build_endpoint_description_strings(host="127.0.0.1", port=0),
                    signal_handlers=False, verbosity=0)
    thread = threading.Thread(target=server.run, name="daphne", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.listening_addresses:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("daphne did not start listening")
        time.sleep(0.05)
    host, port = server.listening_addresses[0]
    yield f"http://{host}:{port}"
    reactor.callFromThread(reactor.stop)
    thread.join(timeout=10)


def _login(context, url: str, username: str, password: str):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
    page.goto(f"{url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")
    page.errors = errors
    return page


def _socket_open(page) -> None:
    """Wait until the page's htmx websocket is connected (pushes before that are not replayed)."""
    page.wait_for_function("window.__wsOpen === true", timeout=20_000)


WS_SPY = "document.addEventListener('htmx:wsOpen', function () { window.__wsOpen = true; });"


def _shoot(page, folder, name: str) -> None:
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(400)
        assert page.evaluate("document.documentElement.scrollWidth") <= width, f"{name} overflows at {width} px"
        small = page.evaluate("""() => [...document.querySelectorAll(
              'main a.button, main button, .nav a, .segmented a, .filters select, .filters input, textarea')]
            .filter(e => e.offsetParent !== null && e.type !== 'hidden')
            .map(e => [e.name || e.textContent.trim(), e.getBoundingClientRect().height]).filter(([t, h]) => h < 44)""")
        assert not small, f"{name}: touch targets under 44 px at {width} px: {small}"
        page.screenshot(path=str(folder / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


@pytest.fixture
def review_fleet():
    """A fleet with one scored run of 12 anomalies, telemetry around them and a baseline version."""
    fleet = FleetFactory(name="demo", description="Warehouse scanners")
    devices = [DeviceFactory(fleet=fleet, external_id=f"scanner-{i:03d}", model=m, store=s, customer="acme")
               for i, (m, s) in enumerate([("TC52", "north"), ("TC57", "south"), ("MC33", "north")])]
    model = ModelVersionFactory(fleet=fleet, version=1, status=ModelStatus.PRODUCTION)
    run = PipelineRunFactory(fleet=fleet, model_version=model, baseline_version=model.baseline_version,
                             n_anomalies=12)
    step = dt.timedelta(minutes=15)
    Telemetry.objects.bulk_create([
        Telemetry(fleet=fleet, device=d, timestamp=T0 + i * step,
                  values={"battery_level": 80 - (i % 24) * 1.5 - (45 if i == 150 else 0), "cpu_temp": 40 + (i % 7)})
        for d in devices for i in range(300)])
    BaselineStatistic.objects.bulk_create([
        BaselineStatistic(version=model.baseline_version, level="cohort", feature=f, median=med, mad=mad,
                          group_key=json.dumps({"manufacturer": d.manufacturer, "model": d.model,
                                                "os_version": d.os_version}))
        for d in devices for f, med, mad in (("battery_level", 63.0, 9.0), ("cpu_temp", 43.0, 1.5))])
    top = [{"metric": "battery_level", "feature": "battery_level", "kind": "value", "value": 18.0,
            "typical": 63.0, "mad": 9.0, "z": -3.4, "level": "cohort"}]
    AnomalyResultFactory.create_batch(
        12, run=run, model_version=model, device=factory.Iterator(devices), top_metrics=top,
        timestamp=factory.Iterator([T0 + (150 + 5 * i) * step for i in range(12)]),
        severity=factory.Iterator([Severity.HIGH, Severity.MEDIUM, Severity.CRITICAL]))
    AnomalyResultFactory.create_batch(60, run=run, model_version=model, device=factory.Iterator(devices), label=Label.NORMAL,
                                      severity="", anomaly_score=0.3, top_metrics=[],
                                      timestamp=factory.Iterator([T0 + (120 + i) * step + dt.timedelta(minutes=7) for i in range(60)]))
    return fleet, run


def test_installable_manifest_and_service_worker(asgi_url, browser, review_fleet, tmp_path):
    from tests.conftest import CHROMIUM, CHROMIUM_ARGS

    user_with_role("vera", "viewer", password="pw")
    # A persistent profile: Chromium never offers to install from an incognito context (what new_context is).
    context = browser.browser_type.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
    page = _login(context, asgi_url, "vera", "pw")
    _wait_until_controlled(page)
    scope = page.evaluate("navigator.serviceWorker.ready.then(r => r.scope)")
    assert scope == f"{asgi_url}/"
    cdp = context.new_cdp_session(page)
    manifest = cdp.send("Page.getAppManifest")
    assert manifest["url"] == f"{asgi_url}/manifest.webmanifest" and not manifest["errors"]
    assert cdp.send("Page.getInstallabilityErrors")["installabilityErrors"] == []
    cached = page.evaluate("caches.keys().then(keys => Promise.all(keys.map(k => caches.open(k).then(c => c.keys()))))"
                           ".then(lists => lists.flat().map(r => new URL(r.url).pathname))")
    assert "/offline/" in cached and "/static/vigil/app.css" in cached
    assert not page.errors
    context.close()


def _wait_until_controlled(page, attempts: int = 3) -> None:
    """Wait until the service worker controls `page`. Its install precaches the app shell (about 1.3 MB,
    served by daphne in this process) and its activation claims open pages. Under CI's load that once took
    over 15 s, and a failed precache fetch fails the whole install until the next page load registers the
    worker again, so each attempt waits 20 s and then reloads. Fails after `attempts`."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        try:
            page.wait_for_function("navigator.serviceWorker.controller !== null", timeout=20_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                state = page.evaluate("navigator.serviceWorker.getRegistration().then(r => r ? "
                                      "[r.installing, r.waiting, r.active].map(w => w && w.state) : 'none')")
                pytest.fail(f"the service worker never controlled {page.url} (installing, waiting, active: {state})")
            page.reload()


def _anomaly(fleet, **filters) -> AnomalyResult:
    return AnomalyResult.objects.filter(fleet=fleet, label=Label.ANOMALY, **filters).order_by("-timestamp").first()


def test_verdict_given_offline_is_synced_exactly_once(asgi_url, browser, review_fleet):
    expect = pytest.importorskip("playwright.sync_api").expect
    fleet, _ = review_fleet
    anomaly = _anomaly(fleet)
    user_with_role("rita", "reviewer", password="pw")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = _login(context, asgi_url, "rita", "pw")
    _wait_until_controlled(page)
    page.goto(f"{asgi_url}/fleets/demo/anomalies/")  # both pages are now in the service worker's cache
    page.goto(f"{asgi_url}/anomalies/{anomaly.pk}/")

    context.set_offline(True)
    expect(page.locator("#offline-status")).to_contain_text("Offline")
    page.keyboard.press("f")
    expect(page.locator("#offline-status")).to_contain_text("1 verdict saved on this device")
    expect(page.locator('button[value="false_positive"]')).to_have_attribute("aria-pressed", "true")
    assert not AnomalyFeedback.objects.exists()
    queued = page.evaluate("window.vigilOffline.queued()")
    assert [(q["verdict"], q["anomaly"]) for q in queued] == [("false_positive", str(anomaly.pk))]

    # Offline navigation: visited pages come from the cache, others get the offline page.
    page.goto(f"{asgi_url}/fleets/demo/anomalies/")
    expect(page.locator(f"#anomaly-{anomaly.pk}")).to_be_visible()
    page.goto(f"{asgi_url}/runs/")
    expect(page.locator("h1")).to_have_text("You are offline")
    page.goto(f"{asgi_url}/anomalies/{anomaly.pk}/")
    expect(page.locator("#offline-status")).to_contain_text("1 verdict saved on this device")

    context.set_offline(False)
    expect(page.locator("#offline-status")).to_contain_text("1 verdict synced", timeout=20_000)
    expect(page.locator("#feedback .feedback-list")).to_contain_text("rita")
    page.evaluate("window.vigilOffline.sync()")  # a second flush finds nothing left to send
    page.reload()
    assert page.evaluate("window.vigilOffline.queued()") == []
    feedback = list(AnomalyFeedback.objects.all())
    assert [(f.anomaly_id, f.verdict, str(f.client_id)) for f in feedback] == [
        (anomaly.pk, "false_positive", queued[0]["client_id"])]
    assert not page.errors
    context.close()


def test_second_session_sees_a_verdict_arrive_live(asgi_url, browser, review_fleet):
    expect = pytest.importorskip("playwright.sync_api").expect
    fleet, _ = review_fleet
    anomaly = _anomaly(fleet)
    user_with_role("rita", "reviewer", password="pw")
    user_with_role("vera", "viewer", password="pw")
    watcher_context = browser.new_context(viewport={"width": 1280, "height": 900})
    watcher_context.add_init_script(WS_SPY)
    watcher = _login(watcher_context, asgi_url, "vera", "pw")
    watcher.goto(f"{asgi_url}/anomalies/{anomaly.pk}/")
    _socket_open(watcher)
    watcher.evaluate("window.__samePage = true")
    reviewer = _login(browser.new_context(viewport={"width": 1280, "height": 900}), asgi_url, "rita", "pw")
    reviewer.goto(f"{asgi_url}/anomalies/{anomaly.pk}/")
    reviewer.keyboard.press("t")
    expect(reviewer.locator("#feedback .feedback-list")).to_contain_text("rita")
    expect(watcher.locator("#feedback .verdict-counts")).to_contain_text("True positive · 1", timeout=20_000)
    expect(watcher.locator("#feedback .feedback-list")).to_contain_text("rita")
    assert watcher.evaluate("window.__samePage") is True  # swapped in, not reloaded
    assert watcher.locator("#feedback form").count() == 0  # rendered for the viewer, who cannot review
    assert not watcher.errors and not reviewer.errors


def test_new_anomalies_appear_as_rows_when_a_run_finishes(asgi_url, browser):
    expect = pytest.importorskip("playwright.sync_api").expect
    call_command("generate_fleet", "--fleet", "live", "--devices", "3", "--days", "2", "--seed", "7", verbosity=0)
    call_command("run_pipeline", "--fleet", "live", verbosity=0)
    user_with_role("vera", "viewer", password="pw")
    user_with_role("ana", "approver", password="pw")
    watcher_context = browser.new_context(viewport={"width": 1280, "height": 900})
    watcher_context.add_init_script(WS_SPY)
    watcher = _login(watcher_context, asgi_url, "vera", "pw")
    watcher.goto(f"{asgi_url}/fleets/live/anomalies/")
    _socket_open(watcher)
    watcher.evaluate("window.__samePage = true")
    before = watcher.locator("#anomaly-rows tr").count()
    assert before > 0 and watcher.locator("tr.row-new").count() == 0

    approver = _login(browser.new_context(viewport={"width": 1280, "height": 900}), asgi_url, "ana", "pw")
    approver.goto(f"{asgi_url}/fleets/live/")
    approver.get_by_role("button", name="Run pipeline").click()
    expect(watcher.locator("#new-anomalies .notice")).to_contain_text("new anomal", timeout=60_000)
    expect(watcher.locator("tr.row-new").first).to_be_visible()
    from detection.models import PipelineRun

    newest = PipelineRun.objects.filter(fleet__name="live").order_by("-id").first()
    expected = min(newest.n_anomalies, 50)
    assert watcher.locator("tr.row-new").count() == expected
    first_new = AnomalyResult.objects.filter(run=newest, label=Label.ANOMALY).order_by("-timestamp", "-id").first()
    assert watcher.locator("#anomaly-rows tr").first.get_attribute("id") == f"anomaly-{first_new.pk}"
    assert watcher.evaluate("window.__samePage") is True
    assert not watcher.errors and not approver.errors


def test_device_pages_and_anomaly_charts_render(asgi_url, browser, review_fleet, screenshot_dir):
    expect = pytest.importorskip("playwright.sync_api").expect
    fleet, _ = review_fleet
    anomaly = _anomaly(fleet)
    user_with_role("rita", "reviewer", password="pw")
    page = _login(browser.new_context(viewport={"width": 1280, "height": 900}), asgi_url, "rita", "pw")

    page.goto(f"{asgi_url}/fleets/demo/devices/")
    expect(page.locator("table.devices tbody tr")).to_have_count(3)
    page.select_option("select[name=store]", "south")
    expect(page.locator("table.devices tbody tr")).to_have_count(1)
    assert "store=south" in page.url
    page.goto(f"{asgi_url}/fleets/demo/devices/")
    _shoot(page, screenshot_dir, "device-list")

    page.locator("table.devices a", has_text=anomaly.device.external_id).click()
    expect(page.locator("h1")).to_contain_text(anomaly.device.external_id)
    expect(page.locator(".chart-card svg")).to_have_count(2)  # one ECharts SVG per metric
    _shoot(page, screenshot_dir, "device-detail")

    page.goto(f"{asgi_url}/anomalies/{anomaly.pk}/")
    expect(page.locator(".chart-card svg")).to_have_count(3)  # score timeline + two metrics
    _shoot(page, screenshot_dir, "anomaly-detail-charts")
    page.goto(f"{asgi_url}/offline/")
    _shoot(page, screenshot_dir, "offline")
    assert not page.errors
