"""The REST API (/api/v1/): health, online scoring, resources, roles, errors and the OpenAPI schema."""
from __future__ import annotations

import math
import time
from unittest.mock import ANY

import numpy as np
import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from detection import serving
from detection.api import health
from detection.choices import ModelStatus
from detection.ingest.loader import ingest_batch, load_telemetry_frame
from detection.ingest.synthetic import generate_fleet
from detection.models import AnomalyResult, Device, Fleet, ModelVersion, PipelineRun
from detection.services import pipeline_run_create, pipeline_run_execute
from detection.views import ANOMALIES_PER_PAGE

from factories import DeviceFactory, FleetFactory, user_with_role

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    serving.model_cache_clear()
    yield
    serving.model_cache_clear()


@pytest.fixture
def trained():
    """A small synthetic fleet after one pipeline run: (fleet, run)."""
    ingest_batch(batch=generate_fleet(devices=24, days=5, seed=3), fleet_name="demo")
    fleet = Fleet.objects.get(name="demo")
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert run.model_version_id, run.error
    return fleet, run


def _observation(fleet, result: AnomalyResult, frame) -> dict:
    row = frame[(frame.device_id == result.device_id) & (frame.timestamp == result.timestamp)].iloc[0]
    return {"fleet": fleet.name, "device_id": result.device.external_id, "timestamp": result.timestamp.isoformat(),
            "metrics": {m: (None if np.isnan(row[m]) else float(row[m])) for m in fleet.metric_names}}


# --- health ----------------------------------------------------------------------------------------

def test_health_reports_every_dependency_without_auth():
    response = APIClient().get("/api/v1/health")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ok" and body["version"]
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["broker"]["mode"] == "in-process"
    assert body["checks"]["channel_layer"]["status"] == "ok"
    assert body["checks"]["models"]["fleets"] == {}


def test_health_is_503_when_a_dependency_is_down(monkeypatch):
    def broken():
        return health._timed(lambda: (_ for _ in ()).throw(ConnectionError("redis refused")))

    monkeypatch.setattr(health, "check_channel_layer", broken)
    response = APIClient().get("/api/v1/health")
    assert response.status_code == 503
    assert response.json()["checks"]["channel_layer"] == {**response.json()["checks"]["channel_layer"],
                                                          "status": "down"}
    assert "redis refused" in response.json()["checks"]["channel_layer"]["error"]


def test_liveness_and_readiness():
    assert APIClient().get("/api/v1/health/live").status_code == 200
    ready = APIClient().get("/api/v1/health/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["migrations"]["pending"] == 0


def test_readiness_is_503_with_pending_migrations(monkeypatch):
    monkeypatch.setattr(health, "migrations_pending", lambda: 2)
    response = APIClient().get("/api/v1/health/ready")
    assert response.status_code == 503 and response.json()["checks"]["migrations"]["pending"] == 2


def test_health_lists_the_production_model_and_whether_it_is_loaded(trained, viewer):
    fleet, run = trained
    assert APIClient().get("/api/v1/health").json()["checks"]["models"]["fleets"]["demo"]["loaded"] is False
    serving.model_load(fleet=fleet)
    models = APIClient().get("/api/v1/health").json()["checks"]["models"]["fleets"]
    assert models["demo"] == {"model_version": run.model_version.version, "algorithm": run.model_version.algorithm,
                              "loaded": True}


# --- detect ----------------------------------------------------------------------------------------

def test_detect_scores_a_stored_sample_exactly_as_the_pipeline_did(trained, viewer):
    fleet, run = trained
    frame = load_telemetry_frame(fleet)
    results = list(AnomalyResult.objects.filter(run=run, label=-1).select_related("device")[:5]) + \
        list(AnomalyResult.objects.filter(run=run, label=1).select_related("device").order_by("?")[:5])
    for result in results:
        response = viewer.post("/api/v1/detect", _observation(fleet, result, frame), format="json")
        assert response.status_code == 200, response.json()
        body = response.json()
        assert math.isclose(body["anomaly_score"], result.anomaly_score, abs_tol=1e-6)
        assert body["is_anomaly"] == result.is_anomaly
        assert body["severity"] == (result.severity or None)
        assert body["top_metrics"] == result.top_metrics
        assert body["model_version"] == run.model_version.version
        assert body["baseline_version"] == run.baseline_version.number
        assert 0 <= body["confidence"] <= 1 and body["processing_time_ms"] > 0
    assert AnomalyResult.objects.count() == run.n_scored  # detect persists nothing


def test_detect_batch_matches_the_pipeline_and_keeps_the_order(trained, viewer):
    fleet, run = trained
    frame = load_telemetry_frame(fleet)
    results = list(AnomalyResult.objects.filter(run=run).select_related("device").order_by("?")[:30])
    response = viewer.post("/api/v1/detect/batch", [_observation(fleet, r, frame) for r in results], format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["total_processed"] == 30
    for got, want in zip(body["results"], results):
        assert got["device_id"] == want.device.external_id
        assert math.isclose(got["anomaly_score"], want.anomaly_score, abs_tol=1e-6)


def test_an_ensembles_votes_and_agreement_are_persisted_shown_and_served(viewer, client):
    """An ensemble model keeps its members' votes on every anomaly; confidence is their agreement."""
    ingest_batch(batch=generate_fleet(devices=24, days=5, seed=3), fleet_name="demo")
    fleet = Fleet.objects.get(name="demo")
    fleet.config = {"algorithm": "ensemble", "ensemble_members": ["robust_z", "iqr", "lof"],
                    "ensemble_weights": {"lof": 2.0}}
    fleet.save()
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert run.model_version_id, run.error
    anomalies = list(AnomalyResult.objects.filter(run=run, label=-1).select_related("device"))
    assert anomalies and not AnomalyResult.objects.filter(run=run, label=1, votes__isnull=False).exists()
    assert not AnomalyResult.objects.filter(run=run, label=1, agreement__isnull=False).exists()
    weights = {"robust_z": 1.0, "iqr": 1.0, "lof": 2.0}
    for a in anomalies:
        assert set(a.votes) == set(weights)
        assert a.agreement == pytest.approx(sum(weights[m] for m, v in a.votes.items() if v) / 4, abs=1e-4)
    # Not a constant: the synthetic fleet's anomalies split the members (measured: several patterns).
    assert len({tuple(sorted(a.votes.items())) for a in anomalies}) > 1

    frame = load_telemetry_frame(fleet)
    normal = list(AnomalyResult.objects.filter(run=run, label=1).select_related("device").order_by("?")[:3])
    for result in anomalies[:4] + normal:
        body = viewer.post("/api/v1/detect", _observation(fleet, result, frame), format="json").json()
        assert body["is_anomaly"] == result.is_anomaly
        if result.is_anomaly:
            assert body["agreement"] == pytest.approx(result.agreement)
            assert body["confidence"] == body["agreement"]
        else:
            assert body["confidence"] == pytest.approx(1 - body["agreement"])
    listed = viewer.get("/api/v1/anomalies/", {"run": run.pk, "label": -1}).json()["results"][0]
    stored = AnomalyResult.objects.get(pk=listed["id"])
    assert listed["votes"] == stored.votes and listed["agreement"] == stored.agreement
    # Triage by agreement: the anomalies that split the detectors.
    split = viewer.get("/api/v1/anomalies/",
                       {"run": run.pk, "min_agreement": 0.3, "max_agreement": 0.7}).json()
    assert split["count"] == sum(0.3 <= a.agreement <= 0.7 for a in anomalies) > 0
    assert viewer.get("/api/v1/anomalies/", {"min_agreement": "most"}).status_code == 400

    # The anomaly list says how many detectors agree on each row.
    client.force_login(user_with_role("lena", "viewer"))
    listing = client.get(f"/fleets/{fleet.name}/anomalies/?run={run.pk}").content.decode()
    assert listing.count(" of 3 agree</div>") == min(len(anomalies), ANOMALIES_PER_PAGE)

    # The anomaly page names who flagged it.
    client.force_login(user_with_role("rita", "reviewer"))
    a = max(anomalies, key=lambda r: (0 < r.agreement < 1, r.anomaly_score))
    page = client.get(f"/anomalies/{a.pk}/").content.decode()
    flagged = sum(a.votes.values())
    assert f"{flagged} of 3</span>" in page and f"{a.agreement * 100:.0f} % by weight" in page
    for member, vote in a.votes.items():
        assert f'badge-vote-{"yes" if vote else "no"}">{member} ' in page


def test_a_single_detectors_results_have_no_votes(trained, viewer, client):
    fleet, run = trained
    assert not AnomalyResult.objects.filter(run=run, votes__isnull=False).exists()
    anomaly = AnomalyResult.objects.filter(run=run, label=-1).select_related("device").first()
    body = viewer.post("/api/v1/detect", _observation(fleet, anomaly, load_telemetry_frame(fleet)),
                       format="json").json()
    assert body["agreement"] is None and 0 <= body["confidence"] <= 1
    client.force_login(user_with_role("rita", "reviewer"))
    assert "Detectors agree" not in client.get(f"/anomalies/{anomaly.pk}/").content.decode()


def test_a_new_production_version_is_loaded_on_the_next_request(trained, viewer):
    fleet, run = trained
    frame = load_telemetry_frame(fleet)
    obs = _observation(fleet, AnomalyResult.objects.filter(run=run).select_related("device").first(), frame)
    assert viewer.post("/api/v1/detect", obs, format="json").json()["model_version"] == 1
    second = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert viewer.post("/api/v1/detect", obs, format="json").json()["model_version"] == second.model_version.version
    assert serving.model_cache_info()[fleet.pk]["model_version_id"] == second.model_version_id


def test_a_promotion_made_elsewhere_is_seen_within_the_production_cache_time(trained, viewer, monkeypatch,
                                                                             settings):
    """Another process's promotion sends no signal here: the production pointer read at most
    VIGIL_SERVING_PRODUCTION_CACHE_SECONDS ago is used until then, and the next request after that
    reloads."""
    settings.VIGIL_SERVING_PRODUCTION_CACHE_SECONDS = 30
    fleet, run = trained
    frame = load_telemetry_frame(fleet)
    obs = _observation(fleet, AnomalyResult.objects.filter(run=run).select_related("device").first(), frame)
    second = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id).model_version
    assert viewer.post("/api/v1/detect", obs, format="json").json()["model_version"] == second.version
    # as another process would: no save(), so no post_save in this one
    ModelVersion.objects.filter(pk=second.pk).update(status=ModelStatus.RETIRED)
    ModelVersion.objects.filter(pk=run.model_version_id).update(status=ModelStatus.PRODUCTION)
    assert viewer.post("/api/v1/detect", obs, format="json").json()["model_version"] == second.version
    later = time.monotonic() + 30.01
    monkeypatch.setattr(serving.time, "monotonic", lambda: later)
    assert viewer.post("/api/v1/detect", obs, format="json").json()["model_version"] == 1


def test_known_devices_cost_one_query_and_a_new_device_scores_at_once(trained, viewer, monkeypatch):
    fleet, run = trained
    frame = load_telemetry_frame(fleet)
    obs = _observation(fleet, AnomalyResult.objects.filter(run=run).select_related("device").first(), frame)
    queries = []
    fetch = serving._fetch
    monkeypatch.setattr(serving, "_fetch", lambda c, sql, params: queries.append(sql) or fetch(c, sql, params))
    first = viewer.post("/api/v1/detect", obs, format="json").json()
    assert len(queries) == 2  # devices and production pointer, then the history
    queries.clear()
    assert viewer.post("/api/v1/detect", obs, format="json").json() == {**first, "processing_time_ms": ANY}
    assert len(queries) == 1  # the history only
    # a device added without a signal in this process (bulk ingest, another process) is looked up
    template = Device.objects.get(fleet=fleet, external_id=obs["device_id"])
    Device.objects.bulk_create([Device(fleet=fleet, external_id="brand-new", manufacturer=template.manufacturer,
                                       model=template.model, os_version=template.os_version)])
    response = viewer.post("/api/v1/detect", {**obs, "device_id": "brand-new"}, format="json")
    assert response.status_code == 200 and response.json()["device_id"] == "brand-new"


def test_batch_size_is_limited(trained, viewer, settings):
    settings.MAX_BATCH_SIZE = 3
    fleet, run = trained
    obs = {"fleet": "demo", "device_id": "dev-0001", "timestamp": "2026-10-30T00:00:00Z", "metrics": {}}
    response = viewer.post("/api/v1/detect/batch", {"observations": [obs] * 4}, format="json")
    assert response.status_code == 400 and "observations" in response.json()
    empty = viewer.post("/api/v1/detect/batch", [], format="json")
    assert empty.status_code == 400 and "observations" in empty.json()


@pytest.mark.parametrize("change, field", [
    ({"fleet": "nope"}, "fleet"),
    ({"device_id": "dev-9999"}, "device_id"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"metrics": {"battery_level": "NaN"}}, "metrics"),
    ({"metrics": {"battery_level": "Infinity"}}, "metrics"),
    ({"metrics": {"battery_level": "high"}}, "metrics"),
    ({"metrics": {"battery_level": True}}, "metrics"),
    ({"metrics": {"no_such_metric": 1.0}}, "metrics"),
    ({"metrics": {}}, "metrics"),
    ({"metrics": [1, 2]}, "metrics"),
    ({"fleet": None}, "fleet"),
])
def test_every_bad_detect_input_is_a_400_naming_the_field(trained, viewer, change, field):
    obs = {"fleet": "demo", "device_id": "dev-0001", "timestamp": "2026-10-30T00:00:00Z",
           "metrics": {"battery_level": 50.0}, **change}
    response = viewer.post("/api/v1/detect", obs, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    batch = viewer.post("/api/v1/detect/batch", {"observations": [{**obs, **{}} for _ in range(2)]}, format="json")
    assert batch.status_code == 400 and "observations" in batch.json()
    assert field in str(batch.json()["observations"])


def test_missing_fields_and_malformed_json_are_400s(viewer):
    response = viewer.post("/api/v1/detect", {}, format="json")
    assert response.status_code == 400
    assert {"fleet", "device_id", "timestamp", "metrics"} <= set(response.json())
    garbled = viewer.post("/api/v1/detect", "{not json", content_type="application/json")
    assert garbled.status_code == 400 and "body" in garbled.json()


def test_a_fleet_without_a_production_model_is_a_409(viewer):
    fleet = FleetFactory(name="fresh")
    DeviceFactory(fleet=fleet, external_id="d1")
    obs = {"fleet": "fresh", "device_id": "d1", "timestamp": "2026-10-30T00:00:00Z", "metrics": {"cpu_temp": 40}}
    response = viewer.post("/api/v1/detect", obs, format="json")
    assert response.status_code == 409 and "production model" in response.json()["fleet"][0]


# --- auth and roles --------------------------------------------------------------------------------

def test_anonymous_is_401(db):
    for url in ("/api/v1/fleets/", "/api/v1/anomalies/", "/api/v1/runs/"):
        assert APIClient().get(url).status_code == 401
    assert APIClient().post("/api/v1/detect", {}, format="json").status_code == 401


def test_outsider_without_a_role_is_403(outsider):
    assert outsider.get("/api/v1/fleets/").status_code == 403
    assert outsider.post("/api/v1/detect", {}, format="json").status_code == 403


def test_viewer_cannot_start_a_run_or_promote(trained, viewer):
    assert viewer.post("/api/v1/runs/", {"fleet": "demo"}, format="json").status_code == 403
    version = ModelVersion.objects.get(fleet__name="demo")
    assert viewer.post(f"/api/v1/model-versions/{version.pk}/promote/").status_code == 403


def test_token_authentication_works(trained):
    token = Token.objects.create(user=user_with_role("client", "viewer"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    assert client.get("/api/v1/fleets/").json()["results"][0]["name"] == "demo"
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    assert client.get("/api/v1/fleets/").status_code == 401


# --- resources -------------------------------------------------------------------------------------

def test_approver_starts_a_run_and_polls_it(trained, approver, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = approver.post("/api/v1/runs/", {"fleet": "demo", "params": {"score": "all"}}, format="json")
    assert response.status_code == 202, response.json()
    run = PipelineRun.objects.get(pk=response.json()["id"])
    assert run.trigger == "api"
    polled = approver.get(f"/api/v1/runs/{run.pk}/").json()
    assert polled["status"] == "succeeded" and polled["model_version"] == 2


def test_run_with_bad_params_names_the_field(trained, approver):
    response = approver.post("/api/v1/runs/", {"fleet": "demo", "params": {"score": "sometimes"}}, format="json")
    assert response.status_code == 400 and "params" in response.json()
    assert "fleet" in approver.post("/api/v1/runs/", {"fleet": "nope"}, format="json").json()


def test_anomaly_filters(trained, viewer):
    fleet, run = trained
    anomalies = viewer.get("/api/v1/anomalies/", {"fleet": "demo", "run": run.pk, "label": -1}).json()
    assert anomalies["count"] == run.n_anomalies
    assert all(r["is_anomaly"] for r in anomalies["results"])
    first = AnomalyResult.objects.filter(run=run).order_by("timestamp").first()
    window = viewer.get("/api/v1/anomalies/", {"device": first.device.external_id,
                                              "timestamp_before": first.timestamp.isoformat()}).json()
    assert window["count"] == 1
    bad = viewer.get("/api/v1/anomalies/", {"severity": "apocalyptic", "run": "x"})
    assert bad.status_code == 400 and {"severity", "run"} <= set(bad.json())


def test_model_versions_promote_and_rollback(trained, approver):
    fleet, run = trained
    second = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    rolled = approver.post("/api/v1/model-versions/rollback/", {"fleet": "demo"}, format="json")
    assert rolled.status_code == 200, rolled.json()
    assert rolled.json()["version"] == run.model_version.version
    again = approver.post(f"/api/v1/model-versions/{run.model_version_id}/promote/")
    assert again.status_code == 400 and "version" in again.json()
    ModelVersion.objects.filter(pk=second.model_version_id).update(status=ModelStatus.CANDIDATE)
    promoted = approver.post(f"/api/v1/model-versions/{second.model_version_id}/promote/")
    assert promoted.status_code == 200 and promoted.json()["status"] == "production"
    listed = approver.get("/api/v1/model-versions/", {"fleet": "demo"}).json()
    assert listed["count"] == 2
    assert approver.get("/api/v1/baseline-versions/", {"fleet": "demo"}).json()["count"] == 2


def test_devices_and_fleets_are_listed(trained, viewer):
    assert viewer.get("/api/v1/devices/", {"fleet": "demo"}).json()["count"] == 24
    assert viewer.get("/api/v1/fleets/demo/").json()["name"] == "demo"
    assert viewer.get("/api/v1/fleets/nope/").status_code == 404


# --- schema ----------------------------------------------------------------------------------------

def test_schema_is_valid_openapi_and_docs_load_without_a_cdn(viewer):
    from drf_spectacular.validation import validate_schema

    response = viewer.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = response.json()
    validate_schema(schema)
    assert "/api/v1/detect" in schema["paths"] and "/api/v1/detect/batch" in schema["paths"]
    docs = viewer.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "cdn" not in html.lower() and "swagger-ui" in html


def test_detectors_lists_every_registered_detector_with_its_metadata(viewer, outsider):
    from detection.ml import suite  # noqa: F401  (registers the detectors)
    from detection.ml.detectors import DETECTORS

    response = viewer.get("/api/v1/detectors")
    assert response.status_code == 200
    body = response.json()
    assert [d["name"] for d in body] == sorted(DETECTORS) and len(body) >= 15
    by_name = {d["name"]: d for d in body}
    assert by_name["patchtst"]["experimental"] is True and by_name["ensemble"]["experimental"] is False
    assert by_name["robust_z"]["hyperparameters"]["spread_floor"] == {"default": "mean_ad",
                                                                      "choices": ["mean_ad", "none"]}
    assert by_name["lstm_ae"]["family"] == "deep learning" and by_name["lstm_ae"]["multivariate"] is True
    assert APIClient().get("/api/v1/detectors").status_code == 401
    assert outsider.get("/api/v1/detectors").status_code == 403
