"""The device list (filters, search, paging, anomaly counts without N+1) and the device page (telemetry
charts, anomaly history), plus the anomaly detail's charts (telemetry window, baseline band, scores)."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from baselines.models import BaselineStatistic
from detection import selectors
from detection.choices import Label
from detection.models import Telemetry
from tests.factories import (
    T0, AnomalyResultFactory, DeviceFactory, FleetFactory, ModelVersionFactory, PipelineRunFactory, user_with_role,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer(client):
    client.force_login(user_with_role("vera", "viewer"))
    return client


@pytest.fixture
def fleet_with_devices():
    fleet = FleetFactory(name="demo")
    a = DeviceFactory(fleet=fleet, external_id="scanner-001", model="TC52", store="north", customer="acme")
    b = DeviceFactory(fleet=fleet, external_id="scanner-002", model="TC57", store="south", customer="globex")
    c = DeviceFactory(fleet=fleet, external_id="kiosk-003", model="TC52", store="north", customer="acme")
    mv = ModelVersionFactory(fleet=fleet)
    run = PipelineRunFactory(fleet=fleet, model_version=mv, baseline_version=mv.baseline_version)
    AnomalyResultFactory.create_batch(3, run=run, model_version=mv, device=a)
    AnomalyResultFactory.create_batch(1, run=run, model_version=mv, device=b)
    AnomalyResultFactory.create_batch(4, run=run, model_version=mv, device=b, label=Label.NORMAL, severity="")
    return fleet, run, (a, b, c)


def _rows(response) -> list[str]:
    import re
    return re.findall(r'<tr id="device-\d+">.*?<strong>([^<]+)</strong>', response.content.decode(), re.S)


def test_device_list_counts_anomalies_of_the_latest_run(viewer, fleet_with_devices):
    fleet, run, (a, b, c) = fleet_with_devices
    counts = {d.external_id: d.n_anomalies for d in selectors.device_list(fleet=fleet)}
    assert counts == {"scanner-001": 3, "scanner-002": 1, "kiosk-003": 0}
    response = viewer.get(reverse("detection:device_list", args=["demo"]))
    assert response.status_code == 200
    assert _rows(response) == ["kiosk-003", "scanner-001", "scanner-002"]


def test_device_list_filters_and_searches(viewer, fleet_with_devices):
    url = reverse("detection:device_list", args=["demo"])
    assert _rows(viewer.get(url, {"store": "north"})) == ["kiosk-003", "scanner-001"]
    assert _rows(viewer.get(url, {"customer": "globex"})) == ["scanner-002"]
    assert _rows(viewer.get(url, {"cohort": "Zebra|TC57|11"})) == ["scanner-002"]
    assert _rows(viewer.get(url, {"q": "SCANNER"})) == ["scanner-001", "scanner-002"]
    empty = viewer.get(url, {"q": "nothing-like-this"})
    assert "No devices match these filters" in empty.content.decode()


def test_device_list_ignores_bad_filter_values_and_pages(viewer, fleet_with_devices):
    url = reverse("detection:device_list", args=["demo"])
    response = viewer.get(url, {"store": "<script>", "cohort": "x", "page": "999999"})
    assert response.status_code == 200
    assert "<script>" not in response.content.decode().split("<main", 1)[1].split("json", 1)[0]


def test_device_list_query_count_does_not_grow_with_devices(viewer, fleet_with_devices):
    fleet, run, _ = fleet_with_devices
    url = reverse("detection:device_list", args=["demo"])
    with CaptureQueriesContext(connection) as few:
        viewer.get(url)
    for i in range(30):
        d = DeviceFactory(fleet=fleet, external_id=f"extra-{i:02d}")
        AnomalyResultFactory(run=run, model_version=run.model_version, device=d)
    with CaptureQueriesContext(connection) as many:
        response = viewer.get(url)
    assert len(_rows(response)) == 33
    assert len(many) == len(few)


def test_htmx_filter_answers_only_the_table(viewer, fleet_with_devices):
    response = viewer.get(reverse("detection:device_list", args=["demo"]), {"store": "south"}, HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert body.lstrip().startswith("<div id=\"device-table\"") and "<html" not in body
    assert response["Vary"].count("HX-Request") == 1


def test_outsider_and_anonymous_cannot_see_devices(client, fleet_with_devices):
    _, _, (a, _, _) = fleet_with_devices
    urls = [reverse("detection:device_list", args=["demo"]), reverse("detection:device_detail", args=[a.pk])]
    for url in urls:
        assert client.get(url).status_code == 302
    client.force_login(user_with_role("olga", None))
    for url in urls:
        assert client.get(url).status_code == 403


def test_unknown_fleet_and_device_are_404(viewer):
    assert viewer.get(reverse("detection:device_list", args=["nope"])).status_code == 404
    assert viewer.get(reverse("detection:device_detail", args=[999999])).status_code == 404
    assert viewer.get("/devices/99999999999999999999/").status_code == 404


def _telemetry(device, n: int, start=T0, step=dt.timedelta(minutes=15), spike_at: int | None = None):
    rows = []
    for i in range(n):
        battery = 80.0 - (i % 10)
        rows.append(Telemetry(fleet=device.fleet, device=device, timestamp=start + i * step,
                              values={"battery_level": 5.0 if i == spike_at else battery, "cpu_temp": 40.0 + i % 3}))
    Telemetry.objects.bulk_create(rows)


def test_device_page_draws_each_metric_and_lists_its_anomalies(viewer, fleet_with_devices):
    _, run, (a, _, _) = fleet_with_devices
    _telemetry(a, 50)
    response = viewer.get(reverse("detection:device_detail", args=[a.pk]))
    assert response.status_code == 200
    charts = response.context["charts"]
    assert [m["name"] for m in charts["metrics"]] == ["battery_level", "cpu_temp"]
    assert len(charts["metrics"][0]["points"]) == 50
    assert charts["metrics"][0]["points"][0] == [T0.isoformat(), 80.0]
    body = response.content.decode()
    assert 'id="device-charts"' in body and body.count('data-metric="') == 2
    assert body.count('<tr id="anomaly-') == 3  # scanner-001's three anomalies, no normal result


def test_device_chart_is_bounded_to_the_newest_samples(fleet_with_devices):
    _, _, (a, _, _) = fleet_with_devices
    _telemetry(a, 30)
    charts = selectors.device_charts(device=a, samples=10)
    points = charts["metrics"][0]["points"]
    assert len(points) == 10 and points[-1][0] == (T0 + 29 * dt.timedelta(minutes=15)).isoformat()


def test_anomaly_charts_window_band_and_scores(viewer, fleet_with_devices):
    fleet, run, (a, _, _) = fleet_with_devices
    later = T0 + dt.timedelta(days=60)  # clear of the fixture's anomalies of this device
    _telemetry(a, 200, start=later, spike_at=100)
    event_time = later + 100 * dt.timedelta(minutes=15)
    anomaly = AnomalyResultFactory(run=run, model_version=run.model_version, device=a, timestamp=event_time,
                                   top_metrics=[{"metric": "battery_level", "value": 5.0, "typical": 75.5,
                                                 "mad": 2.0, "z": -23.8, "level": "device"}])
    for i in (98, 99, 101):
        AnomalyResultFactory(run=run, model_version=run.model_version, device=a, label=Label.NORMAL, severity="",
                             timestamp=later + i * dt.timedelta(minutes=15), anomaly_score=0.1)
    bv = anomaly.baseline_version
    BaselineStatistic.objects.bulk_create([
        BaselineStatistic(version=bv, level="device", group_key=json.dumps({"external_id": a.external_id}),
                          feature="battery_level", median=75.5, mad=2.0),
        BaselineStatistic(version=bv, level="device", group_key=json.dumps({"external_id": "someone-else"}),
                          feature="battery_level", median=10.0, mad=1.0),
        BaselineStatistic(version=bv, level="device", group_key=json.dumps({"external_id": a.external_id}),
                          feature="cpu_temp", median=41.0, mad=0.5),
    ])
    charts = selectors.anomaly_charts(anomaly=anomaly, samples=20)
    battery = charts["metrics"][0]
    assert battery["name"] == "battery_level" and battery["top"] is True
    assert len(battery["points"]) == 40  # 20 before the event, 20 from it on
    assert battery["points"][20] == [event_time.isoformat(), 5.0]
    assert battery["band"]["median"] == 75.5 and battery["band"]["level"] == "device"
    assert battery["band"]["high"] == pytest.approx(75.5 + 3 * 1.4826 * 2.0)
    assert charts["metrics"][1]["band"]["low"] == pytest.approx(41.0 - 3 * 1.4826 * 0.5)
    # Scores of the same device and run inside the window only, oldest first.
    # The chart rounds scores to 5 decimals; the factory's scores (0.7 + k / 100) are not exact floats.
    assert [p[1] for p in charts["scores"]["points"]] == [0.1, 0.1, round(anomaly.anomaly_score, 5), 0.1]
    response = viewer.get(reverse("detection:anomaly_detail", args=[anomaly.pk]))
    body = response.content.decode()
    assert 'id="anomaly-charts"' in body and 'id="score-timeline"' in body


def test_anomaly_charts_without_baseline_or_telemetry(fleet_with_devices):
    _, run, (_, _, c) = fleet_with_devices
    anomaly = AnomalyResultFactory(run=run, model_version=run.model_version, device=c, baseline_version=None)
    charts = selectors.anomaly_charts(anomaly=anomaly)
    assert all(m["band"] is None and m["points"] == [] for m in charts["metrics"])
    assert charts["scores"]["points"] == []


def test_anomaly_detail_query_count_is_bounded_by_the_window(viewer, fleet_with_devices):
    _, run, (a, _, _) = fleet_with_devices
    _telemetry(a, 400)
    anomaly = AnomalyResultFactory(run=run, model_version=run.model_version, device=a,
                                   timestamp=T0 + 200 * dt.timedelta(minutes=15))
    with CaptureQueriesContext(connection) as queries:
        response = viewer.get(reverse("detection:anomaly_detail", args=[anomaly.pk]))
    points = response.context["charts"]["metrics"][0]["points"]
    assert len(points) == 2 * 144
    assert len(queries) < 40
