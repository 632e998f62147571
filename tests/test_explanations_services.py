"""Explanations end to end on a real (small) pipeline run: services, bulk, command, task, pages and API.

One synthetic fleet is ingested and scored once for the module (small_run); each test's own writes
(explanations) roll back with its transaction.
"""
from __future__ import annotations

import json
import re

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.urls import reverse

from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import generate_fleet
from detection.models import AnomalyResult, Fleet, ModelVersion
from detection.services import fleet_delete, pipeline_run_create, pipeline_run_execute
from explanations.choices import ExplanationStatus
from explanations.models import Explanation
from explanations.services import (
    ExplanationError,
    explanation_execute,
    explanation_generate,
    explanation_request,
    explanation_run_generate,
)
from explanations.tasks import explain_run_task
from tests.factories import AnomalyResultFactory, user_with_role

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def small_run(django_db_setup, django_db_blocker, tmp_path_factory):
    """A 24-device, 7-day synthetic fleet scored by the default (hybrid) pipeline."""
    with django_db_blocker.unblock(), override_settings(VIGIL_ARTIFACT_DIR=tmp_path_factory.mktemp("artifacts")):
        ingest_batch(batch=generate_fleet(devices=24, days=7, seed=7), fleet_name="explain-demo")
        fleet = Fleet.objects.get(name="explain-demo")
        run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
        assert run.n_anomalies > 20, run.error
    yield run
    with django_db_blocker.unblock():
        fleet_delete(fleet=fleet)


@pytest.fixture
def anomaly(small_run):
    return (AnomalyResult.objects.filter(run=small_run, label=-1).select_related("device", "run__fleet")
            .order_by("-anomaly_score").first())


@pytest.fixture
def user_client(client, django_user_model):
    client.force_login(user_with_role("alice", "viewer"))
    return client


# --- the service ----------------------------------------------------------------------------------

def test_explanation_holds_payload_attributions_narrative_and_validation(anomaly, small_run):
    explanation = explanation_generate(anomaly=anomaly)
    assert explanation.status == ExplanationStatus.READY and explanation.verdict == "accepted"
    assert explanation.provider == "builtin" and explanation.model == "builtin-writer-1"
    assert explanation.attribution_method == "tree_shap"

    attributions = explanation.attributions
    assert attributions["additivity"]["ok"] and attributions["additivity"]["native_error"] < 1e-8
    # the rebuilt rows reproduce the stored score: SHAP explains exactly the decision that was made
    assert attributions["reproduced"]["ok"], attributions["reproduced"]
    total = attributions["base_value"] + sum(m["contribution"] for m in attributions["metrics"])
    assert total == pytest.approx(anomaly.anomaly_score, abs=1e-6)
    assert {m["metric"] for m in attributions["metrics"]} <= set(small_run.fleet.metric_names)
    assert all("_z_" in f["column"] or f["column"].endswith("_resid") for f in attributions["features"])

    payload = explanation.payload
    assert payload["device"] == anomaly.device.external_id
    assert payload["anomaly_score"] == pytest.approx(anomaly.anomaly_score)
    assert payload["threshold"] == pytest.approx(anomaly.threshold)
    assert (payload["model_version"], payload["baseline_version"]) == (1, 1)
    assert 1 <= len(payload["top_metrics"]) <= 5
    top = payload["top_metrics"][0]
    assert {"value", "typical", "spread", "z", "level", "level_label"} <= set(top)
    assert top["level"] in ("device", "cohort", "global")
    assert abs(top["z"]) >= abs(payload["top_metrics"][-1]["z"])
    assert payload["attribution"]["method"] == "tree_shap" and "features" not in payload["attribution"]

    assert explanation.validation["valid"] and explanation.validation["reasons"] == []
    assert explanation.shown_text == explanation.text and explanation.text.startswith(
        f"Device {anomaly.device.external_id}")
    assert explanation.latency_ms is not None and explanation.attribution_ms is not None


def test_explanations_are_cached_until_regenerated(anomaly):
    first = explanation_generate(anomaly=anomaly)
    assert explanation_generate(anomaly=anomaly).pk == first.pk
    again = explanation_generate(anomaly=anomaly, regenerate=True)
    assert again.pk != first.pk and again.text == first.text  # deterministic writer
    assert Explanation.objects.filter(anomaly=anomaly).count() == 2


def test_a_double_request_opens_one_generation_and_a_second_delivery_changes_nothing(anomaly):
    first, created = explanation_request(anomaly=anomaly, enqueue=False)
    second, created_again = explanation_request(anomaly=anomaly, regenerate=True, enqueue=False)
    assert created and not created_again and second.pk == first.pk
    done = explanation_execute(explanation_id=first.pk)
    assert done.status == ExplanationStatus.READY
    finished_at = done.finished_at
    assert explanation_execute(explanation_id=first.pk).finished_at == finished_at


def test_a_missing_model_artifact_falls_back_to_robust_z_attribution(anomaly, small_run):
    model = small_run.model_version
    ModelVersion.objects.filter(pk=model.pk).update(artifact_path="/nonexistent/model.pkl")
    anomaly.model_version.artifact_path = "/nonexistent/model.pkl"
    explanation = explanation_generate(anomaly=anomaly, regenerate=True)
    assert explanation.status == ExplanationStatus.READY
    assert explanation.attribution_method == "robust_z"
    assert "cannot be read" in explanation.attributions["note"]
    assert explanation.verdict == "accepted"
    assert "robust z-scores, no model attribution" in explanation.text


def test_a_detector_without_a_tree_explainer_gets_kernel_shap_on_background_rows(anomaly, monkeypatch):
    monkeypatch.setattr("explanations.services.supports_tree_shap", lambda detector: False)
    explanation = explanation_generate(anomaly=anomaly, regenerate=True)
    attributions = explanation.attributions
    assert explanation.attribution_method == "kernel_shap" and "background rows" in attributions["note"]
    assert attributions["additivity"]["ok"]
    assert attributions["output_value"] == pytest.approx(anomaly.anomaly_score, rel=1e-6)
    assert attributions["metrics"][0]["metric"] == explanation.payload["attribution"]["metrics"][0]["metric"]
    assert "SHAP KernelExplainer" in explanation.text


def test_only_anomalies_are_explained_and_providers_must_be_known(small_run, settings):
    normal = AnomalyResult.objects.filter(run=small_run, label=1).first()
    with pytest.raises(ExplanationError, match="not an anomaly"):
        explanation_generate(anomaly=normal)
    anomaly = AnomalyResult.objects.filter(run=small_run, label=-1).first()
    with pytest.raises(ExplanationError, match="unknown narrative provider"):
        explanation_generate(anomaly=anomaly, provider="gpt-oracle")
    settings.VIGIL_LLM = {"base_url": "", "model": ""}
    with pytest.raises(ExplanationError, match="not configured"):
        explanation_generate(anomaly=anomaly, provider="llm")


def test_factory_anomalies_without_artifacts_or_telemetry_still_get_an_explanation():
    anomaly = AnomalyResultFactory()
    explanation = explanation_generate(anomaly=anomaly)
    assert explanation.status == ExplanationStatus.READY and explanation.attribution_method == "robust_z"
    assert explanation.verdict == "accepted", explanation.validation


# --- a whole run ----------------------------------------------------------------------------------

def test_run_bulk_explains_every_anomaly_once_and_reuses_them(small_run):
    seen = []
    result = explanation_run_generate(run=small_run, progress=lambda done, total, msg: seen.append((done, total)))
    assert len(result.explanations) == result.generated == small_run.n_anomalies
    assert seen[-1] == (small_run.n_anomalies, small_run.n_anomalies) and len(seen) > 2  # per cohort
    assert all(e.status == "ready" and e.verdict == "accepted" for e in result.explanations)
    assert all(e.attributions["reproduced"]["ok"] for e in result.explanations)
    assert all(e.attribution_method == "tree_shap" for e in result.explanations)
    again = explanation_run_generate(run=small_run)
    assert (again.generated, again.reused) == (0, small_run.n_anomalies)
    # the task calls the same service
    assert explain_run_task.delay(small_run.pk).get() == {"run": small_run.pk, "generated": 0,
                                                          "reused": small_run.n_anomalies,
                                                          "seconds": pytest.approx(0, abs=30)}


def test_explain_command_writes_payload_narrative_provider_and_validation_per_anomaly(small_run, tmp_path, capsys):
    target = tmp_path / "out" / "explanations.json"
    call_command("explain", "--run", "latest", "--fleet", small_run.fleet.name, "--json", str(target))
    out = capsys.readouterr().out
    assert f"/{small_run.n_anomalies}" in out and "[##############################]" in out
    assert f"{small_run.n_anomalies} generated" in out
    document = json.loads(target.read_text())
    assert document["run"] == small_run.pk and len(document["anomalies"]) == small_run.n_anomalies
    entry = document["anomalies"][0]
    assert {"payload", "narrative", "provider", "validation"} <= set(entry)
    assert entry["provider"] == "builtin" and entry["validation"]["valid"]
    assert entry["payload"]["top_metrics"] and entry["narrative"].startswith("Device ")
    call_command("explain", "--run", str(small_run.pk))
    assert f"0 generated, {small_run.n_anomalies} cached" in capsys.readouterr().out


def test_explain_command_top_explains_the_highest_scoring_anomalies_only(small_run, tmp_path, capsys):
    target = tmp_path / "top.json"
    call_command("explain", "--run", str(small_run.pk), "--top", "3", "--regenerate", "--json", str(target))
    assert f"explaining the 3 highest-scoring of the {small_run.n_anomalies} anomalies" in capsys.readouterr().out
    highest = list(AnomalyResult.objects.filter(run=small_run, label=-1).order_by("-anomaly_score", "pk")
                   .values_list("pk", flat=True)[:3])
    assert sorted(e["anomaly_id"] for e in json.loads(target.read_text())["anomalies"]) == sorted(highest)
    call_command("explain", "--run", str(small_run.pk), "--top", "2")
    assert "(0 generated, 2 cached)" in capsys.readouterr().out  # the selection's, not every cached one of the run


@pytest.mark.parametrize("args,message", [
    (["--run", "latest", "--top", "0"], "--top must be at least 1, not 0"),
    (["--run", "999999"], "no pipeline run 999999"),
    (["--run", "abc"], "--run must be a run id or 'latest'"),
    (["--run", "latest", "--fleet", "nope"], "unknown fleet 'nope'"),
    (["--run", "99999999999999999999999"], "no pipeline run"),
])
def test_explain_command_refuses_bad_input_with_a_message(small_run, args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("explain", *args)


def test_explain_command_refuses_an_unconfigured_llm(small_run, settings):
    settings.VIGIL_LLM = {}
    with pytest.raises(CommandError, match="not configured"):
        call_command("explain", "--run", str(small_run.pk), "--provider", "llm")


# --- pages ----------------------------------------------------------------------------------------

def test_anonymous_users_are_sent_to_login_and_refused_by_the_api(client, anomaly):
    for url in (reverse("detection:anomaly_detail", args=[anomaly.pk]),
                reverse("explanations:panel", args=[anomaly.pk])):
        response = client.get(url)
        assert response.status_code == 302 and response.url.startswith(reverse("login"))
    response = client.post(reverse("explanations:create", args=[anomaly.pk]))
    assert response.status_code == 302 and not Explanation.objects.exists()
    assert client.get("/api/explanations/").status_code == 403
    assert client.post("/api/explanations/generate/", {"anomaly": anomaly.pk}).status_code == 403
    assert not Explanation.objects.exists()


def test_detail_page_shows_the_anomaly_its_top_metrics_and_an_explain_button(user_client, anomaly):
    response = user_client.get(reverse("detection:anomaly_detail", args=[anomaly.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert anomaly.device.external_id in html and f"{anomaly.anomaly_score:.3f}" in html
    assert f"{anomaly.threshold:.3f}" in html and anomaly.get_severity_display() in html
    assert 'id="explanation-panel"' in html and ">Explain</button>" in html
    assert html.count('data-label="Robust z"') == len(anomaly.top_metrics)


def test_explain_button_queues_the_task_and_the_panel_shows_narrative_chart_and_badge(
        user_client, anomaly, django_capture_on_commit_callbacks):
    url = reverse("explanations:create", args=[anomaly.pk])
    with django_capture_on_commit_callbacks(execute=True) as callbacks:  # the task is queued on commit
        response = user_client.post(url, HTTP_HX_REQUEST="true")
        assert response.status_code == 200
        html = response.content.decode()
        assert html.lstrip().startswith('<section id="explanation-panel"') and "Generating the explanation" in html
    assert len(callbacks) == 1  # ran eagerly once the request committed
    response = user_client.get(reverse("explanations:panel", args=[anomaly.pk]), HTTP_HX_REQUEST="true")
    assert response.status_code == 286
    html = response.content.decode()
    assert "Validated" in html and "Written by Built-in writer" in html
    assert html.count('class="bar-row"') >= 3 and "SHAP TreeExplainer" in html
    assert "additivity checked" in html and ">Regenerate</button>" in html
    assert Explanation.objects.filter(anomaly=anomaly, status="ready").count() == 1
    # Regenerate adds a generation; a plain form post redirects back to the page
    with django_capture_on_commit_callbacks(execute=True):
        response = user_client.post(url, {"regenerate": "1"})
    assert response.status_code == 302 and response.url.endswith(f"/anomalies/{anomaly.pk}/#explanation-panel")
    assert Explanation.objects.filter(anomaly=anomaly, status="ready").count() == 2


def test_panel_polls_while_pending_and_stops_with_286(user_client, anomaly):
    pending, _ = explanation_request(anomaly=anomaly, enqueue=False)
    url = reverse("explanations:panel", args=[anomaly.pk])
    response = user_client.get(url, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and 'hx-trigger="every 2s"' in response.content.decode()
    assert "Generating the explanation" in response.content.decode()
    explanation_execute(explanation_id=pending.pk)
    response = user_client.get(url, HTTP_HX_REQUEST="true")
    assert response.status_code == 286 and "every 2s" not in response.content.decode()


def test_bad_input_never_gives_a_500(user_client, anomaly, small_run):
    huge = 10**20
    assert user_client.get(f"/anomalies/{huge}/").status_code == 404
    assert user_client.get(f"/anomalies/{huge}/explanation/").status_code == 404
    assert user_client.post(f"/anomalies/{huge}/explanation/generate/").status_code == 404
    assert user_client.get(reverse("explanations:create", args=[anomaly.pk])).status_code == 405
    response = user_client.post(reverse("explanations:create", args=[anomaly.pk]), {"provider": "oracle"})
    assert response.status_code == 400 and "unknown narrative provider" in response.content.decode()
    response = user_client.post(reverse("explanations:create", args=[anomaly.pk]), {"provider": "oracle"},
                                HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and "unknown narrative provider" in response.content.decode()
    normal = AnomalyResult.objects.filter(run=small_run, label=1).first()
    page = user_client.get(reverse("detection:anomaly_detail", args=[normal.pk])).content.decode()
    assert "only anomalies are explained" in page and ">Explain</button>" not in page
    assert user_client.post(reverse("explanations:create", args=[normal.pk])).status_code == 400


def test_anomaly_table_links_each_time_to_its_detail_page(user_client, small_run):
    response = user_client.get(reverse("detection:anomaly_list", args=[small_run.fleet.name]))
    first = response.context["page"].object_list[0]
    assert f'href="/anomalies/{first.pk}/"' in response.content.decode()


# --- API ------------------------------------------------------------------------------------------

def test_api_generates_caches_and_lists_explanations(user_client, anomaly, small_run,
                                                   django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = user_client.post("/api/explanations/generate/", {"anomaly": anomaly.pk},
                                    content_type="application/json")
    assert response.status_code == 202, response.content  # queued; the task ran once the request committed
    body = user_client.get(f"/api/explanations/{response.json()['id']}/").json()
    assert body["status"] == "ready" and body["verdict"] == "accepted" and body["narrative"]
    assert body["payload"]["device"] == anomaly.device.external_id and body["attribution_method"] == "tree_shap"
    cached = user_client.post("/api/explanations/generate/", {"anomaly": anomaly.pk}, content_type="application/json")
    assert cached.status_code == 200 and cached.json()["id"] == body["id"]
    listed = user_client.get(f"/api/explanations/?anomaly={anomaly.pk}").json()
    assert listed["count"] == 1 and listed["results"][0]["id"] == body["id"]
    assert user_client.get(f"/api/explanations/{body['id']}/").json()["narrative"] == body["narrative"]
    progress = user_client.get(f"/api/explanations/progress/?run={small_run.pk}").json()
    assert progress == {"run": small_run.pk, "explained": 1, "total": small_run.n_anomalies}


def test_api_explains_a_run_in_the_background(user_client, small_run, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = user_client.post("/api/explanations/explain-run/", {"run": small_run.pk},
                                    content_type="application/json")
    assert response.status_code == 202
    # tasks run eagerly in the embedded default, so the run is explained once the request committed
    progress = user_client.get(f"/api/explanations/progress/?run={small_run.pk}").json()
    assert progress["explained"] == progress["total"] == small_run.n_anomalies


@pytest.mark.parametrize("method,url,data,status", [
    ("post", "/api/explanations/generate/", {"anomaly": 10**20}, 400),
    ("post", "/api/explanations/generate/", {"anomaly": "x"}, 400),
    ("post", "/api/explanations/generate/", {"anomaly": 999_999_999}, 404),
    ("post", "/api/explanations/generate/", {"provider": "builtin"}, 400),
    ("post", "/api/explanations/explain-run/", {"run": 999_999_999}, 404),
    ("get", "/api/explanations/?anomaly=abc", None, 400),
    ("get", "/api/explanations/?run=-3", None, 400),
    ("get", "/api/explanations/progress/", None, 400),
    ("get", "/api/explanations/999999999/", None, 404),
])
def test_api_answers_bad_input_with_4xx(user_client, small_run, method, url, data, status):
    call = getattr(user_client, method)
    response = call(url, data, content_type="application/json") if data is not None else call(url)
    assert response.status_code == status, response.content


def test_api_refuses_to_explain_a_normal_result(user_client, small_run):
    normal = AnomalyResult.objects.filter(run=small_run, label=1).first()
    response = user_client.post("/api/explanations/generate/", {"anomaly": normal.pk}, content_type="application/json")
    assert response.status_code == 400 and "not an anomaly" in response.json()["anomaly"]


@pytest.mark.django_db
def test_user_without_a_role_cannot_read_or_request_explanations(client):
    from tests.factories import AnomalyResultFactory, user_with_role

    anomaly = AnomalyResultFactory(label=-1)
    client.force_login(user_with_role("outsider", None))
    assert client.get(f"/anomalies/{anomaly.pk}/explanation/").status_code == 403
    assert client.post(f"/anomalies/{anomaly.pk}/explanation/generate/").status_code == 403
    client.force_login(user_with_role("vera", "viewer"))
    assert client.get(f"/anomalies/{anomaly.pk}/explanation/").status_code == 200


def test_panel_says_when_the_attribution_does_not_reproduce_the_stored_score(user_client, anomaly):
    # A sequential detector (nn_novelty, windowed_gaussian...) scores a row against its device's earlier
    # rows; Kernel SHAP scores the row on its own, so base + contributions can differ from the stored score.
    pending, _ = explanation_request(anomaly=anomaly, enqueue=False)
    explanation_execute(explanation_id=pending.pk)
    explanation = Explanation.objects.get(pk=pending.pk)
    url = reverse("explanations:panel", args=[anomaly.pk])
    html = user_client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert ", the anomaly score" in html and "not the stored score" not in html
    explanation.attributions = {**explanation.attributions, "output_value": 15.4,
                                "reproduced": {"score": 15.4, "stored": 825.82, "error": 810.42, "ok": False}}
    explanation.save(update_fields=["attributions"])
    html = user_client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "= 15.4: the score of this row as the attribution rebuilt it, not the stored score 826" in html
    assert ", the anomaly score" not in html and "Read the bars as a ranking" in html


@pytest.mark.django_db
def test_a_sequential_detectors_anomaly_is_attributed_in_its_devices_sequence(shared_data, monkeypatch):
    # Two NAB traffic series as a fleet of one metric, under auto (nn_novelty: a sequential detector).
    for name in ("speed_7578.csv", "TravelTime_451.csv"):
        call_command("ingest", str(shared_data / "nab" / "data" / "realTraffic" / name), "--format", "nab",
                     "--fleet", "nab-traffic", verbosity=0)
    fleet = Fleet.objects.get(name="nab-traffic")
    fleet.config = {"algorithm": "auto"}
    fleet.save()
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet, params={"train_rows_per_device": 300}).id)
    anomalies = list(AnomalyResult.objects.filter(run=run, label=-1).order_by("-anomaly_score")[:3])
    assert anomalies and run.model_version.params["selected_members"] == "nn_novelty"
    for anomaly in anomalies:
        pending, _ = explanation_request(anomaly=anomaly, enqueue=False)
        explanation_execute(explanation_id=pending.pk)
        explanation = Explanation.objects.get(pk=pending.pk)
        attributions = explanation.attributions
        assert explanation.attribution_method == "context_shap" and attributions["reproduced"]["ok"]
        total = attributions["base_value"] + sum(m["contribution"] for m in attributions["metrics"])
        assert total == pytest.approx(anomaly.anomaly_score, rel=1e-9)
        assert [m["metric"] for m in attributions["metrics"]] == ["value"]
    # Past the limit (here: no metric allowed), Kernel SHAP scores the row on its own: the sum misses
    # the stored score, and the explanation records that it does.
    monkeypatch.setattr("explanations.services.context_metric_limit", lambda detector: 0)
    pending, _ = explanation_request(anomaly=anomalies[0], regenerate=True, enqueue=False)
    explanation_execute(explanation_id=pending.pk)
    explanation = Explanation.objects.get(pk=pending.pk)
    assert explanation.attribution_method == "kernel_shap" and not explanation.attributions["reproduced"]["ok"]


@pytest.mark.django_db
def test_a_skab_ensemble_anomaly_is_attributed_over_its_persistence_window(shared_data, tmp_path, monkeypatch):
    """SKAB's ensemble (hybrid, robust_z, lof; a median over 20 rows) on 8 sensors. The hybrid member reads
    residual features the ensemble's own feature list does not name: before they were rebuilt too, the
    member failed on the rebuilt rows, was dropped, and the attribution summed to about 1.5x the stored score."""
    from detection.evaluation import evaluate_skab
    from explanations.services import _context

    folder = tmp_path / "skab"
    folder.mkdir()
    for k in (1, 2, 3):
        (folder / f"{k}.csv").write_bytes((shared_data / "skab" / "data" / "valve1" / f"{k}.csv").read_bytes())
    with override_settings(VIGIL_ARTIFACT_DIR=tmp_path / "artifacts"):
        result = evaluate_skab(path=folder, keep=True, config={"algorithm": "ensemble"})
        anomalies = list(AnomalyResult.objects.filter(run_id=result.run_id, label=-1).order_by("-anomaly_score")[:2])
        assert result.detector == "ensemble" and anomalies
        for anomaly in anomalies:
            pending, _ = explanation_request(anomaly=anomaly, enqueue=False)
            explanation_execute(explanation_id=pending.pk)
            explanation = Explanation.objects.get(pk=pending.pk)
            attributions = explanation.attributions
            assert explanation.attribution_method == "context_shap", attributions.get("note")
            assert "last 20 rows" in attributions["note"] and attributions["reproduced"]["ok"]
            total = attributions["base_value"] + sum(m["contribution"] for m in attributions["metrics"])
            assert total == pytest.approx(anomaly.anomaly_score, rel=1e-9)
            assert len(attributions["metrics"]) == 8
        detector = _context(anomalies[0]).detector
        assert list(detector.members_) == ["hybrid", "robust_z", "lof"] and not detector.excluded_
        # A member that fails on the rebuilt rows is dropped for that explanation only: the cached
        # detector keeps it for the next one.
        with monkeypatch.context() as patch:
            patch.setattr(detector.members_["hybrid"], "score_samples", lambda X: 1 / 0)
            pending, _ = explanation_request(anomaly=anomalies[0], regenerate=True, enqueue=False)
            explanation_execute(explanation_id=pending.pk)
            assert not Explanation.objects.get(pk=pending.pk).attributions["reproduced"]["ok"]
        assert list(_context(anomalies[0]).detector.members_) == ["hybrid", "robust_z", "lof"]
        assert not _context(anomalies[0]).detector.excluded_
