"""The fleet, run and anomaly pages: access, content, empty states, htmx partials, bad input."""
from __future__ import annotations

import re

import factory
import pytest
from django.urls import reverse

from detection.choices import Label, RunStage, RunStatus, Severity
from tests.factories import (
    AnomalyResultFactory,
    DeviceFactory,
    FleetFactory,
    ModelVersionFactory,
    PipelineRunFactory,
    user_with_role,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def user_client(client, django_user_model):
    client.force_login(user_with_role("alice", "viewer"))
    return client


@pytest.fixture
def scored_fleet():
    """A fleet with 6 devices and a succeeded run holding 60 anomalies and 5 normal results."""
    fleet = FleetFactory(name="demo", description="Warehouse scanners")
    devices = DeviceFactory.create_batch(6, fleet=fleet)
    model_version = ModelVersionFactory(fleet=fleet, version=3, baseline_version__number=2)
    run = PipelineRunFactory(fleet=fleet, model_version=model_version,
                             baseline_version=model_version.baseline_version, n_anomalies=60)
    common = {"run": run, "model_version": model_version, "device": factory.Iterator(devices)}
    AnomalyResultFactory.create_batch(60, **common)
    AnomalyResultFactory.create_batch(5, label=Label.NORMAL, severity="", anomaly_score=0.1, **common)
    return fleet, run


def text(response) -> str:
    """The response body without tags, so commands split into spans read as typed."""
    return re.sub(r"<[^>]+>", "", response.content.decode())


def anomalies_url(name="demo"):
    return reverse("detection:anomaly_list", args=[name])


@pytest.mark.parametrize("url", [
    reverse("detection:home"),
    reverse("detection:run_list"),
    reverse("detection:fleet_run_list", args=["demo"]),
    reverse("detection:anomaly_list", args=["demo"]),
    reverse("detection:run_progress", args=[1]),
])
def test_anonymous_user_is_redirected_to_login(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response.url.startswith(reverse("login") + "?next=")


def test_login_page_renders(client):
    response = client.get(reverse("login"))
    assert response.status_code == 200
    assert b'name="password"' in response.content


# --- home ------------------------------------------------------------------------------------------

def test_home_lists_fleet_with_devices_latest_run_and_anomaly_count(user_client, scored_fleet):
    fleet, run = scored_fleet
    PipelineRunFactory(fleet=fleet, status=RunStatus.FAILED, error="boom")  # newer, but not scored
    response = user_client.get(reverse("detection:home"))
    assert response.status_code == 200
    fleet_row = response.context["fleets"][0]
    assert (fleet_row.device_count, fleet_row.anomaly_count) == (6, 60)
    assert fleet_row.latest_run.status == RunStatus.FAILED
    assert fleet_row.latest_scored_run_id == run.pk
    assert b"Warehouse scanners" in response.content


def test_home_without_fleets_shows_the_commands_that_create_one(user_client):
    response = user_client.get(reverse("detection:home"))
    assert response.status_code == 200
    content = text(response)
    assert "No fleets yet" in content
    assert "python manage.py generate_fleet --fleet demo --devices 60 --days 14 --seed 7" in content
    assert "python manage.py run_pipeline --fleet demo" in content


def test_home_query_count_does_not_grow_with_fleets(user_client, django_assert_max_num_queries):
    for _ in range(5):
        PipelineRunFactory(fleet=FleetFactory())
    with django_assert_max_num_queries(6):  # session + user + roles + fleets + runs
        assert user_client.get(reverse("detection:home")).status_code == 200


def test_nav_has_a_logout_post_form_and_htmx_without_cdn(user_client):
    content = user_client.get(reverse("detection:home")).content.decode()
    assert f'method="post" action="{reverse("logout")}"' in content
    assert "hx-headers='{\"x-csrftoken\":" in content
    assert "/static/django_htmx/htmx" in content and "unpkg" not in content


# --- runs ------------------------------------------------------------------------------------------

def test_run_list_shows_status_stages_versions_and_error(user_client, scored_fleet):
    PipelineRunFactory(fleet=scored_fleet[0], status=RunStatus.FAILED, stage=RunStage.TRAIN,
                       error="Not enough training rows", warnings=["w1", "w2"])
    response = user_client.get(reverse("detection:run_list"))
    content = response.content.decode()
    assert response.status_code == 200
    assert "badge-succeeded" in content and "badge-failed" in content
    assert "Not enough training rows" in content
    assert "12.5 s" in content  # train stage timing
    assert "20,160 rows" in content
    assert "model v3" in content and "baseline v2" in content


def test_fleet_run_list_shows_only_that_fleets_runs(user_client, scored_fleet):
    other = PipelineRunFactory(fleet=FleetFactory(name="other"))
    response = user_client.get(reverse("detection:fleet_run_list", args=["demo"]))
    assert response.status_code == 200
    assert [r.pk for r in response.context["page"]] == [scored_fleet[1].pk]
    assert f'id="run-{other.pk}"' not in response.content.decode()


def test_run_list_is_paginated_by_25(user_client):
    PipelineRunFactory.create_batch(30, fleet=FleetFactory(name="demo"))
    response = user_client.get(reverse("detection:run_list"), {"page": 2})
    assert len(response.context["page"].object_list) == 5


def test_run_list_without_runs_shows_the_commands(user_client):
    FleetFactory(name="empty")
    content = text(user_client.get(reverse("detection:run_list")))
    assert "No runs yet" in content and "python manage.py run_pipeline --fleet demo" in content
    content = text(user_client.get(reverse("detection:fleet_run_list", args=["empty"])))
    assert "python manage.py run_pipeline --fleet empty" in content


def test_running_run_polls_itself_and_finished_run_does_not(user_client):
    running = PipelineRunFactory(status=RunStatus.RUNNING, stage=RunStage.TRAIN, finished_at=None)
    finished = PipelineRunFactory(fleet=running.fleet)
    content = user_client.get(reverse("detection:run_list")).content.decode()
    progress = reverse("detection:run_progress", args=[running.pk])
    assert f'id="run-{running.pk}" hx-get="{progress}" hx-trigger="every 2s"' in content
    assert f'id="run-{finished.pk}">' in content


@pytest.mark.parametrize("status, expected", [
    (RunStatus.PENDING, 200), (RunStatus.RUNNING, 200),
    (RunStatus.SUCCEEDED, 286), (RunStatus.DEGRADED, 286), (RunStatus.FAILED, 286),
])
def test_progress_fragment_stops_polling_with_286_once_finished(user_client, status, expected):
    run = PipelineRunFactory(status=status)
    url = reverse("detection:run_progress", args=[run.pk])
    response = user_client.get(url, headers={"HX-Request": "true"})
    assert response.status_code == expected
    content = response.content.decode()
    assert content.lstrip().startswith("<tr")
    assert "<html" not in content and f'id="run-{run.pk}"' in content
    assert ('hx-trigger="every 2s"' in content) is (expected == 200)


def test_progress_of_unknown_run_is_404(user_client):
    assert user_client.get(reverse("detection:run_progress", args=[999])).status_code == 404


# --- anomalies -------------------------------------------------------------------------------------

def test_anomaly_list_shows_the_latest_scored_runs_anomalies(user_client, scored_fleet):
    fleet, run = scored_fleet
    PipelineRunFactory(fleet=fleet, status=RunStatus.RUNNING, finished_at=None)  # newer, no results yet
    response = user_client.get(anomalies_url())
    assert response.status_code == 200
    assert response.context["run"] == run
    page = response.context["page"]
    assert page.paginator.count == 60 and len(page.object_list) == 50
    assert all(r.label == Label.ANOMALY for r in page.object_list)
    timestamps = [r.timestamp for r in page.object_list]
    assert timestamps == sorted(timestamps, reverse=True)
    content = response.content.decode()
    assert "Zebra TC52 11" in content  # cohort
    assert "badge-sev-high" in content
    assert "battery_level" in content and "wifi_rssi" in content
    assert "storage_free" not in content  # only the top 3 metrics
    assert "v3" in content and "v2" in content


def test_anomaly_list_second_page_has_the_rest(user_client, scored_fleet):
    response = user_client.get(anomalies_url(), {"page": 2})
    assert len(response.context["page"].object_list) == 10


@pytest.mark.parametrize("sort, key, reverse_order", [
    ("score", "anomaly_score", False), ("-score", "anomaly_score", True),
    ("time", "timestamp", False), ("-time", "timestamp", True),
])
def test_anomaly_list_sorts_by_score_or_time(user_client, scored_fleet, sort, key, reverse_order):
    response = user_client.get(anomalies_url(), {"sort": sort})
    values = [getattr(r, key) for r in response.context["page"].object_list]
    assert values == sorted(values, reverse=reverse_order)
    assert response.context["sort"] == sort


def test_anomaly_list_for_a_given_run(user_client, scored_fleet):
    fleet, run = scored_fleet
    newer = PipelineRunFactory(fleet=fleet)
    AnomalyResultFactory(run=newer, severity=Severity.CRITICAL)
    assert user_client.get(anomalies_url()).context["run"] == newer
    response = user_client.get(anomalies_url(), {"run": run.pk})
    assert response.context["run"] == run and response.context["page"].paginator.count == 60


def test_anomaly_list_for_another_fleets_run_falls_back_with_a_notice(user_client, scored_fleet):
    other = PipelineRunFactory(fleet=FleetFactory(name="other"))
    response = user_client.get(anomalies_url(), {"run": other.pk})
    assert response.context["run"] == scored_fleet[1]
    assert f"Run {other.pk} is not a run of demo" in response.content.decode()


@pytest.mark.parametrize("params", [
    {"page": "abc"}, {"page": "999"}, {"page": "-1"}, {"page": ""}, {"run": "xyz"}, {"run": "99999"},
    {"run": ""}, {"run": "1e9"}, {"run": "-3"}, {"run": "9" * 20}, {"page": "9" * 20}, {"sort": "bogus"},
    {"sort": ""}, {"page": "abc", "run": "xyz", "sort": "x"},
])
def test_bad_query_params_fall_back_instead_of_failing(user_client, scored_fleet, params):
    response = user_client.get(anomalies_url(), params)
    assert response.status_code == 200
    assert response.context["run"] == scored_fleet[1]
    assert response.context["sort"] in {"-time", "time", "-score", "score"}
    for url in (reverse("detection:run_list"), reverse("detection:fleet_run_list", args=["demo"])):
        assert user_client.get(url, params).status_code == 200


def test_htmx_request_returns_only_the_table_partial(user_client, scored_fleet):
    response = user_client.get(anomalies_url(), {"page": 2}, headers={"HX-Request": "true"})
    content = response.content.decode()
    assert response.status_code == 200
    assert content.lstrip().startswith('<div id="anomaly-table"')
    assert "<html" not in content and "<nav class=\"nav\"" not in content
    assert 'hx-push-url="true"' in content
    assert "HX-Request" in response["Vary"]


def test_htmx_history_restore_gets_the_full_page(user_client, scored_fleet):
    headers = {"HX-Request": "true", "HX-History-Restore-Request": "true"}
    assert b"<html" in user_client.get(anomalies_url(), headers=headers).content


def test_anomaly_list_without_a_scored_run_says_how_to_score(user_client):
    fleet = FleetFactory(name="fresh")
    PipelineRunFactory(fleet=fleet, status=RunStatus.FAILED)
    response = user_client.get(anomalies_url("fresh"))
    content = text(response)
    assert response.status_code == 200 and response.context["run"] is None
    assert "No scored run yet" in content and "python manage.py run_pipeline --fleet fresh" in content


def test_anomaly_list_of_a_run_without_anomalies_says_so(user_client):
    run = PipelineRunFactory(fleet=FleetFactory(name="quiet"), n_scored=5)
    AnomalyResultFactory.create_batch(5, run=run, label=Label.NORMAL)
    content = user_client.get(anomalies_url("quiet")).content.decode()
    assert "No anomalies" in content and f"Run #{run.pk}" in content


@pytest.mark.parametrize("name", ["detection:anomaly_list", "detection:fleet_run_list"])
def test_unknown_fleet_is_404(user_client, name):
    assert user_client.get(reverse(name, args=["nope"])).status_code == 404


def test_anomaly_list_query_count_is_bounded(user_client, scored_fleet, django_assert_max_num_queries):
    # session + user + roles + fleet + latest scored run + filter choices + count + one page of results
    with django_assert_max_num_queries(10):  # +1: the page's ids, then its rows (selectors.anomalies_in_order)
        response = user_client.get(anomalies_url())
    assert len(response.context["page"].object_list) == 50


def test_run_list_query_count_is_bounded(user_client, scored_fleet, django_assert_max_num_queries):
    PipelineRunFactory.create_batch(20, fleet=scored_fleet[0], model_version=scored_fleet[1].model_version)
    with django_assert_max_num_queries(6):  # session + user + roles + count + runs
        assert user_client.get(reverse("detection:run_list")).status_code == 200


def test_login_with_a_wrong_password_says_so(client, django_user_model):
    django_user_model.objects.create_user("bob", password="right-password")
    response = client.post(reverse("login"), {"username": "bob", "password": "wrong"})
    assert response.status_code == 200
    assert b"correct username and password" in response.content


def test_production_model_card_shows_members_and_settings_and_trees_only_for_a_forest(user_client):
    from detection.choices import ModelStatus

    fleet = FleetFactory(name="demo")
    ModelVersionFactory(fleet=fleet, algorithm="ensemble", status=ModelStatus.PRODUCTION, params={
        "algorithm": "ensemble", "members": "hybrid,robust_z,lof", "n_estimators": 300, "contamination": 0.03,
        "detector_params": [["lof", [["n_neighbors", 100]]], ["lstm_ae", [["window", 60]]]]})
    page = text(user_client.get("/fleets/demo/"))
    assert "Membershybrid · robust_z · lof" in page.replace("\n", "")
    assert "lof: n_neighbors 100" in page and "lstm_ae" not in page and "Trees" in page
    other = FleetFactory(name="plain")
    ModelVersionFactory(fleet=other, algorithm="robust_z", status=ModelStatus.PRODUCTION,
                        params={"algorithm": "robust_z", "n_estimators": 300, "contamination": 0.01})
    page = text(user_client.get("/fleets/plain/"))
    assert "Trees" not in page and "Members" not in page and "Settings" not in page and "0.01" in page
    assert "Chosen because" not in page


def test_production_model_card_says_why_auto_chose_its_members(user_client):
    from detection.choices import ModelStatus

    fleet = FleetFactory(name="pumps")
    ModelVersionFactory(fleet=fleet, algorithm="auto", status=ModelStatus.PRODUCTION, params={
        "algorithm": "auto", "members": "nn_novelty", "contamination": 0.03,
        "selection_reason": "one metric, complete enough for a sequential model: nearest-neighbour novelty alone"})
    page = text(user_client.get("/fleets/pumps/")).replace("\n", "")
    assert "Membersnn_novelty" in page and "Chosen becauseone metric, complete enough" in page


def test_member_weights_are_shown_only_for_an_ensemble_of_several_members():
    from detection.templatetags.vigil import member_weights

    assert member_weights({"weight_nn_novelty": 1.0, "weights_source": "priors"}) is None  # auto on one metric
    assert member_weights({"algorithm": "robust_z"}) is None
    both = member_weights({"weight_robust_z": 1.0, "weight_lof": 0.5})
    assert both == {"weights": [("robust_z", 1.0), ("lof", 0.5)], "source": "priors"}
