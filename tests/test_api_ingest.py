"""API telemetry ingest, review feedback and rate limits (/api/v1/)."""
from __future__ import annotations

import datetime as dt

import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from detection.choices import Label
from detection.models import AnomalyFeedback, AuditEvent, Device, Telemetry

from conftest import worker_redis_db
from factories import AnomalyResultFactory, DeviceFactory, FleetFactory, user_with_role

pytestmark = pytest.mark.django_db
T0 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


def _client(role: str | None, name: str | None = None) -> APIClient:
    client = APIClient()
    client.force_authenticate(user_with_role(name or f"u-{role}", role))
    return client


@pytest.fixture
def fleet():
    fleet = FleetFactory(name="plant")
    DeviceFactory(fleet=fleet, external_id="d1")
    DeviceFactory(fleet=fleet, external_id="d2")
    return fleet


def _rows(n: int = 4) -> list[dict]:
    return [{"device_id": f"d{1 + i % 2}", "timestamp": (T0 + dt.timedelta(minutes=15 * i)).isoformat(),
             "battery_level": 80.0 - i, "cpu_temp": 40 + i} for i in range(n)]


URL = "/api/v1/fleets/plant/telemetry/"


# --- ingest ----------------------------------------------------------------------------------------

def test_approver_ingests_json_rows_and_the_step_is_audited(fleet):
    response = _client("approver").post(URL, {"rows": _rows(6)}, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["rows"] == 6 and response.json()["devices_created"] == 0
    stored = Telemetry.objects.filter(device__fleet=fleet).order_by("timestamp")
    assert stored.count() == 6
    assert stored.first().values == {"battery_level": 80.0, "cpu_temp": 40.0}
    event = AuditEvent.objects.get(action="telemetry_ingested")
    assert event.fleet == fleet and event.after["rows"] == 6 and event.actor_label == "u-approver"


def test_a_metric_left_out_is_a_missing_value(fleet):
    rows = [{k: v for k, v in r.items() if k != "cpu_temp"} for r in _rows(2)]
    rows[0]["cpu_temp"] = 41.5
    response = _client("approver").post(URL, {"rows": rows}, format="json")
    assert response.status_code == 201, response.json()
    values = [t.values for t in Telemetry.objects.order_by("timestamp")]
    assert values[0]["cpu_temp"] == 41.5 and values[1].get("cpu_temp") is None


@pytest.mark.parametrize("change, needle", [
    ({"battery_level": "abc"}, "row 3, column 'battery_level': 'abc' is not a number"),
    ({"timestamp": "yesterday"}, "row 3, column 'timestamp': 'yesterday' is not a timestamp"),
    ({"humidity": 3}, "row 3, column 'humidity': unknown column"),
    ({"cpu_temp": {"nested": 1}}, "row 3, column 'cpu_temp': must be a single value"),
    ({"cpu_temp": True}, "row 3, column 'cpu_temp': 'True' is not a number"),
    ({"device_id": "ghost"}, "row 3, column 'device_id': device 'ghost' is not a device of fleet 'plant'"),
    ({"timestamp": None}, "row 3, column 'timestamp': timestamp is empty"),
])
def test_a_bad_row_is_refused_naming_row_and_column_and_nothing_is_saved(fleet, change, needle):
    rows = _rows(5)
    rows[2].update(change)
    response = _client("approver").post(URL, {"rows": rows}, format="json")
    assert response.status_code == 400
    messages = response.json()["rows"]
    assert any(needle in m for m in messages), messages
    assert Telemetry.objects.count() == 0 and not AuditEvent.objects.filter(action="telemetry_ingested").exists()


def test_nan_is_refused_without_a_500(fleet):
    body = '{"rows": [{"device_id": "d1", "timestamp": "2024-05-01T00:00:00Z", "cpu_temp": NaN}]}'
    response = _client("approver").post(URL, body, content_type="application/json")
    assert response.status_code == 400
    assert "NaN" in response.json()["body"][0]  # DRF's strict JSON parser refuses it before the reader
    assert Telemetry.objects.count() == 0


def test_a_duplicate_sample_and_a_sample_already_stored_are_refused(fleet):
    client = _client("approver")
    rows = _rows(3) + [_rows(1)[0]]
    response = client.post(URL, {"rows": rows}, format="json")
    assert response.status_code == 400 and "row 4" in str(response.json()) and "duplicate" in str(response.json())
    assert client.post(URL, {"rows": _rows(2)}, format="json").status_code == 201
    again = client.post(URL, {"rows": _rows(2)}, format="json")
    assert again.status_code == 400 and "already has" in str(again.json())
    assert Telemetry.objects.count() == 2


def test_unknown_devices_are_created_only_when_asked(fleet):
    rows = [{"device_id": "d9", "timestamp": T0.isoformat(), "battery_level": 50, "cpu_temp": 30,
             "manufacturer": "Honeywell"}]
    response = _client("approver").post(URL, {"rows": rows, "create_devices": True}, format="json")
    assert response.status_code == 201 and response.json()["devices_created"] == 1
    assert Device.objects.get(fleet=fleet, external_id="d9").manufacturer == "Honeywell"


def test_an_oversized_batch_is_refused_before_parsing(fleet, settings):
    settings.VIGIL_MAX_INGEST_ROWS = 3
    response = _client("approver").post(URL, {"rows": _rows(4)}, format="json")
    assert response.status_code == 400 and "at most 3 rows" in response.json()["rows"][0]


def test_csv_upload_goes_through_the_cli_reader(fleet):
    text = "device_id,timestamp,battery_level,cpu_temp\nd1,2024-05-01 00:00,80,40\nd2,2024-05-01 00:00,NA,41\n"
    upload = SimpleUploadedFile("t.csv", text.encode(), content_type="text/csv")
    response = _client("approver").post(URL, {"file": upload}, format="multipart")
    assert response.status_code == 201, response.json()
    assert Telemetry.objects.count() == 2

    bad = "device_id,timestamp,battery_level,cpu_temp,extra\nd1,2024-05-02 00:00,80,40,1\n"
    response = _client("approver", "a2").post(
        URL, {"file": SimpleUploadedFile("b.csv", bad.encode())}, format="multipart")
    assert response.status_code == 400 and response.json()["file"] == [
        "column 'extra': unknown column; fleet 'plant' takes battery_level, cpu_temp, customer, device_id, "
        "manufacturer, model, os_version, store, timestamp"]
    bad = "device_id,timestamp,battery_level,cpu_temp\nd1,2024-05-02 00:00,80,40\nd1,2024-05-02 00:15,inf,40\n"
    response = _client("approver", "a3").post(
        URL, {"file": SimpleUploadedFile("c.csv", bad.encode())}, format="multipart")
    assert response.status_code == 400
    assert any(m.startswith("row 2, column 'battery_level'") for m in response.json()["file"]), response.json()
    assert Telemetry.objects.count() == 2


def test_rows_and_file_are_exclusive_and_one_is_needed(fleet):
    client = _client("approver")
    assert "rows" in client.post(URL, {}, format="json").json()


@pytest.mark.parametrize("role, expected", [(None, 403), ("viewer", 403), ("reviewer", 403)])
def test_ingest_needs_the_approver_role(fleet, role, expected):
    assert _client(role).post(URL, {"rows": _rows(1)}, format="json").status_code == expected
    assert APIClient().post(URL, {"rows": _rows(1)}, format="json").status_code == 401
    assert Telemetry.objects.count() == 0


def test_ingest_into_an_unknown_fleet_is_404(fleet):
    assert _client("approver").post("/api/v1/fleets/nope/telemetry/", {"rows": _rows(1)},
                                    format="json").status_code == 404


# --- feedback --------------------------------------------------------------------------------------

def test_reviewer_gives_feedback_and_a_resubmit_updates_it():
    anomaly = AnomalyResultFactory()
    client = _client("reviewer")
    response = client.post("/api/v1/feedback/", {"anomaly": anomaly.pk, "verdict": "false_positive",
                                                 "comment": "maintenance"}, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["fleet"] == anomaly.fleet.name and response.json()["user"] == "u-reviewer"
    response = client.post("/api/v1/feedback/", {"anomaly": anomaly.pk, "verdict": "true_positive"}, format="json")
    assert response.status_code == 201
    assert AnomalyFeedback.objects.get().verdict == "true_positive"
    listing = _client("viewer").get(f"/api/v1/feedback/?fleet={anomaly.fleet.name}&verdict=true_positive")
    assert listing.status_code == 200 and listing.json()["count"] == 1


def test_feedback_refuses_bad_input_naming_the_field():
    normal = AnomalyResultFactory(label=Label.NORMAL)
    anomaly = AnomalyResultFactory()
    client = _client("reviewer")
    assert "anomaly" in client.post("/api/v1/feedback/", {"anomaly": normal.pk, "verdict": "not_sure"},
                                    format="json").json()
    assert "verdict" in client.post("/api/v1/feedback/", {"anomaly": anomaly.pk, "verdict": "maybe"},
                                    format="json").json()
    assert "client_id" in client.post("/api/v1/feedback/", {"anomaly": anomaly.pk, "verdict": "not_sure",
                                                            "client_id": "x"}, format="json").json()
    assert "anomaly" in client.post("/api/v1/feedback/", {"anomaly": 10 ** 9, "verdict": "not_sure"},
                                    format="json").json()
    assert AnomalyFeedback.objects.count() == 0


def test_outsider_and_viewer_cannot_give_feedback():
    anomaly = AnomalyResultFactory()
    body = {"anomaly": anomaly.pk, "verdict": "not_sure"}
    assert _client(None).post("/api/v1/feedback/", body, format="json").status_code == 403
    assert _client(None, "o2").get("/api/v1/feedback/").status_code == 403
    assert _client("viewer").post("/api/v1/feedback/", body, format="json").status_code == 403
    assert APIClient().get("/api/v1/feedback/").status_code == 401
    assert AnomalyFeedback.objects.count() == 0


def test_reviewer_gives_one_verdict_on_several_anomalies_at_once():
    first = AnomalyResultFactory()
    others = AnomalyResultFactory.create_batch(2, fleet=first.fleet, run=first.run, model_version=first.model_version)
    ids = [first.pk, *(a.pk for a in others)]
    client = _client("reviewer")
    response = client.post("/api/v1/feedback/bulk/", {"anomalies": [*ids, first.pk], "verdict": "false_positive",
                                                      "comment": "planned maintenance"}, format="json")
    assert response.status_code == 201, response.json()
    assert [row["anomaly"] for row in response.json()] == ids  # a repeated id is reviewed once
    assert {row["verdict"] for row in response.json()} == {"false_positive"}
    assert set(AnomalyFeedback.objects.values_list("anomaly_id", "comment")) == {(i, "planned maintenance") for i in ids}


def test_bulk_feedback_is_all_or_none_and_names_the_ids_at_fault():
    anomaly = AnomalyResultFactory()
    normal = AnomalyResultFactory(label=Label.NORMAL, fleet=anomaly.fleet)
    client = _client("reviewer")

    def refused(body):
        response = client.post("/api/v1/feedback/bulk/", body, format="json")
        assert response.status_code == 400
        return response.json()

    assert f"result(s) {normal.pk} are not anomalies" in refused(
        {"anomalies": [anomaly.pk, normal.pk], "verdict": "true_positive"})["anomalies"][0]
    assert "no result 999999999" in refused({"anomalies": [anomaly.pk, 999999999], "verdict": "true_positive"})[
        "anomalies"][0]
    assert "anomalies" in refused({"anomalies": [], "verdict": "true_positive"})
    assert "anomalies" in refused({"anomalies": list(range(1, 502)), "verdict": "true_positive"})
    assert "anomalies" in refused({"anomalies": ["x"], "verdict": "true_positive"})
    assert "verdict" in refused({"anomalies": [anomaly.pk], "verdict": "maybe"})
    assert AnomalyFeedback.objects.count() == 0
    assert _client("viewer").post("/api/v1/feedback/bulk/", {"anomalies": [anomaly.pk], "verdict": "not_sure"},
                                  format="json").status_code == 403
    assert AnomalyFeedback.objects.count() == 0


# --- throttling ------------------------------------------------------------------------------------

@pytest.fixture
def rates(settings):
    cache.clear()
    yield settings
    cache.clear()


def test_user_rate_limit_answers_429_with_retry_after(rates):
    rates.REST_FRAMEWORK = {**rates.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **rates.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "3/min"}}
    client = _client("viewer")
    codes = [client.get("/api/v1/fleets/").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    response = client.get("/api/v1/fleets/")
    assert response.json()["code"] == "throttled" and int(response["Retry-After"]) > 0
    assert _client("viewer", "other").get("/api/v1/fleets/").status_code == 200  # per user


def test_rate_limits_keep_one_counter_per_client_not_a_list_of_request_times(rates):
    """Each request costs one increment, whatever the rate (DRF's throttles rewrite a list of every
    request time in the period); the period starts at the client's first request."""
    rates.REST_FRAMEWORK = {**rates.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **rates.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "5/hour"}}
    user = user_with_role("counted", "viewer")
    client = APIClient()
    client.force_authenticate(user)
    for _ in range(3):
        assert client.get("/api/v1/fleets/").status_code == 200
    assert cache.get(f"throttle_user_{user.pk}:n") == 3
    for _ in range(2):
        client.get("/api/v1/fleets/")
    refused = client.get("/api/v1/fleets/")
    assert refused.status_code == 429 and 3500 < int(refused["Retry-After"]) <= 3600


def test_token_rate_limit_counts_each_token_on_its_own(rates):
    rates.REST_FRAMEWORK = {**rates.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **rates.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "token": "2/min"}}
    user = user_with_role("svc", "viewer")
    token = Token.objects.create(user=user)
    client = APIClient(HTTP_AUTHORIZATION=f"Token {token.key}")
    assert [client.get("/api/v1/fleets/").status_code for _ in range(3)] == [200, 200, 429]
    session = APIClient()
    session.force_login(user)
    assert session.get("/api/v1/fleets/").status_code == 200  # the session is not that token


def test_ingest_scope_has_its_own_rate(rates, fleet):
    rates.REST_FRAMEWORK = {**rates.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **rates.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "ingest": "1/min"}}
    client = _client("approver")
    assert client.post(URL, {"rows": _rows(1)}, format="json").status_code == 201
    assert client.post(URL, {"rows": _rows(1)}, format="json").status_code == 429
    assert client.get("/api/v1/fleets/plant/").status_code == 200


# --- filters -----------------------------------------------------------------------------------------

def test_result_filters_refuse_or_normalise_out_of_range_values():
    anomaly = AnomalyResultFactory()
    client = _client("viewer")
    # an id the database cannot hold is a 400, not an integer overflow
    assert client.get("/api/v1/anomalies/?run=9223372036854775808").status_code == 400
    assert client.get("/api/v1/feedback/?anomaly=9.2e18").status_code == 400
    # a UTC offset PostgreSQL cannot store (> 15:59) is converted to UTC first
    response = client.get("/api/v1/anomalies/?timestamp_after=2000-01-01T00:00:00-18:58")
    assert response.status_code == 200 and response.json()["count"] == 1
    assert anomaly.timestamp.year > 2000


@pytest.fixture
def redis_cache(settings):
    """The default cache on Redis db 7 at 127.0.0.1 (9 in a second test process: conftest.worker_redis_db),
    emptied before and after: the client. With CI=true a missing Redis fails the test, elsewhere it
    skips it."""
    import os

    import redis

    url = f"redis://127.0.0.1:6379/{worker_redis_db(7)}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        (pytest.fail if os.environ.get("CI", "").lower() in ("1", "true") else pytest.skip)(f"no Redis: {exc}")
    client.flushdb()
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}}
    yield client
    client.flushdb()


def test_rate_limits_count_in_redis_with_one_key_per_client_and_period(settings, redis_cache):
    """Production counts in Redis (one pipelined SET NX + INCR per limit); needs Redis on 127.0.0.1."""
    client = redis_cache
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "3/hour"}}
    user = user_with_role("redis-counted", "viewer")
    api = APIClient()
    api.force_authenticate(user)
    assert [api.get("/api/v1/fleets/").status_code for _ in range(4)] == [200, 200, 200, 429]
    key = f"vigil:throttle:throttle_user_{user.pk}"
    assert int(client.get(key)) == 4 and 3500 < client.ttl(key) <= 3600
    refused = api.get("/api/v1/fleets/")
    assert refused.status_code == 429 and 3500 < int(refused["Retry-After"]) <= 3600


def test_all_rate_limits_of_a_request_are_counted_in_one_redis_round_trip(settings, monkeypatch, redis_cache):
    """The user and token limits of a token request: both counters in one pipeline; the tighter limit
    refuses with its own Retry-After. Needs Redis on 127.0.0.1."""
    import redis

    client = redis_cache
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "10/hour", "token": "2/min"}}
    user = user_with_role("one-trip", "viewer")
    token = Token.objects.create(user=user)
    api = APIClient(HTTP_AUTHORIZATION=f"Token {token.key}")
    executed = []
    original = redis.client.Pipeline.execute
    monkeypatch.setattr(redis.client.Pipeline, "execute",
                        lambda self, *a, **k: executed.append(len(self.command_stack)) or original(self, *a, **k))
    assert [api.get("/api/v1/fleets/").status_code for _ in range(2)] == [200, 200]
    assert executed == [4, 4]  # SET NX + INCR for each of the two limits, one round trip
    refused = api.get("/api/v1/fleets/")
    assert refused.status_code == 429 and 0 < int(refused["Retry-After"]) <= 60  # the token's minute
    assert int(client.get(f"vigil:throttle:throttle_user_{user.pk}")) == 3
    assert int(client.get(f"vigil:throttle:throttle_token_{token.pk}")) == 3
