"""The review app: roles, feedback, filters, keyboard navigation, the fleet overview, runs and model versions."""
from __future__ import annotations

import datetime as dt
import json
import uuid

import factory
import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from detection.choices import Label, ModelStatus, Severity, Trigger, Verdict
from detection.models import AnomalyFeedback, ModelVersion, PipelineRun
from detection.permissions import user_has_role
from detection.services import (
    FeedbackError, ModelVersionError, feedback_carry_over, feedback_give, feedback_give_many, model_version_promote,
    model_version_rollback,
)
from tests.factories import (
    AnomalyResultFactory, DeviceFactory, FleetFactory, ModelVersionFactory, PipelineRunFactory, T0, user_with_role,
)

pytestmark = pytest.mark.django_db
ROLES = [None, "viewer", "reviewer", "approver", "admin"]


@pytest.fixture
def scored():
    fleet = FleetFactory(name="demo")
    zebra = DeviceFactory.create_batch(2, fleet=fleet, store="north")
    honey = DeviceFactory.create_batch(2, fleet=fleet, manufacturer="Honeywell", model="CT40", os_version="10",
                                       store="south")
    model = ModelVersionFactory(fleet=fleet, version=2, status=ModelStatus.PRODUCTION,
                                params={"n_estimators": 200, "contamination": 0.01}, feature_list=["a", "b", "c"])
    run = PipelineRunFactory(fleet=fleet, model_version=model, n_anomalies=20)
    common = {"run": run, "model_version": model, "device": factory.Iterator(zebra + honey)}
    anomalies = AnomalyResultFactory.create_batch(
        20, severity=factory.Iterator([Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW, Severity.HIGH]),
        **common)
    AnomalyResultFactory.create_batch(10, label=Label.NORMAL, severity="", anomaly_score=0.2, **common)
    return fleet, run, anomalies


def login(client, role, name=None):
    if role is not None or name:
        client.force_login(user_with_role(name or f"user-{role}", role))
    return client


# --- roles -----------------------------------------------------------------------------------------

def test_data_migration_created_the_four_groups():
    assert set(Group.objects.values_list("name", flat=True)) >= {"viewer", "reviewer", "approver", "admin"}


@pytest.mark.parametrize("group, expected", [
    (None, set()), ("viewer", {"viewer"}), ("reviewer", {"viewer", "reviewer"}),
    ("approver", {"viewer", "reviewer", "approver"}), ("admin", {"viewer", "reviewer", "approver", "admin"}),
])
def test_roles_are_cumulative(group, expected):
    user = user_with_role("u", group)
    assert {r for r in ROLES[1:] if user_has_role(user, r)} == expected


def test_superuser_has_every_role(django_user_model):
    user = django_user_model.objects.create_superuser("root", password="x")
    assert all(user_has_role(user, r) for r in ROLES[1:])


PAGES = [
    ("detection:home", []), ("detection:run_list", []), ("detection:fleet_overview", ["demo"]),
    ("detection:fleet_run_list", ["demo"]), ("detection:anomaly_list", ["demo"]),
    ("detection:model_versions", ["demo"]),
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name, args", PAGES)
def test_every_page_needs_the_viewer_role(client, scored, role, name, args):
    response = login(client, role, name=None).get(reverse(name, args=args))
    if role is None:
        assert response.status_code == 302 and response.url.startswith(reverse("login"))
    else:
        assert response.status_code == 200


@pytest.mark.parametrize("name, args", PAGES)
def test_outsider_without_a_role_gets_a_rendered_403(client, scored, name, args):
    response = login(client, None, name="outsider").get(reverse(name, args=args))
    assert response.status_code == 403
    assert b"Not allowed" in response.content and b"viewer" in response.content


def test_outsider_gets_403_on_detail_and_progress(client, scored):
    _, run, anomalies = scored
    login(client, None, name="outsider")
    assert client.get(reverse("detection:anomaly_detail", args=[anomalies[0].pk])).status_code == 403
    assert client.get(reverse("detection:run_progress", args=[run.pk])).status_code == 403


def test_create_demo_user_stays_superuser(django_user_model):
    from django.core.management import call_command
    call_command("create_demo_user")
    assert django_user_model.objects.get(username="demo").is_superuser


# --- feedback --------------------------------------------------------------------------------------

def test_feedback_updates_instead_of_duplicating(scored):
    anomaly = scored[2][0]
    user = user_with_role("r", "reviewer")
    first = feedback_give(anomaly=anomaly, user=user, verdict=Verdict.TRUE_POSITIVE, comment="battery")
    second = feedback_give(anomaly=anomaly, user=user, verdict=Verdict.FALSE_POSITIVE)
    assert first.pk == second.pk and AnomalyFeedback.objects.count() == 1
    assert second.verdict == Verdict.FALSE_POSITIVE and second.comment == ""


def test_a_rescoring_run_carries_each_reviewers_latest_verdict_to_the_same_sample(scored, client):
    fleet, run, anomalies = scored
    anna, bob = user_with_role("anna", "reviewer"), user_with_role("bob", "reviewer")
    feedback_give(anomaly=anomalies[0], user=anna, verdict=Verdict.TRUE_POSITIVE, comment="real")
    feedback_give(anomaly=anomalies[0], user=bob, verdict=Verdict.FALSE_POSITIVE)
    feedback_give(anomaly=anomalies[1], user=anna, verdict=Verdict.TRUE_POSITIVE)
    feedback_give(anomaly=anomalies[1], user=anna, verdict=Verdict.FALSE_POSITIVE)  # changed her mind
    feedback_give(anomaly=anomalies[2], user=anna, verdict=Verdict.FALSE_POSITIVE)  # cleared by the re-score
    rescored = PipelineRunFactory(fleet=fleet, model_version=run.model_version)
    again = [AnomalyResultFactory(run=rescored, model_version=run.model_version, device=a.device,
                                  timestamp=a.timestamp) for a in anomalies[:2]]
    AnomalyResultFactory(run=rescored, model_version=run.model_version, device=anomalies[2].device,
                         timestamp=anomalies[2].timestamp, label=Label.NORMAL, severity="")
    AnomalyResultFactory(run=rescored, model_version=run.model_version, device=anomalies[3].device,
                         timestamp=anomalies[3].timestamp + dt.timedelta(minutes=7))  # another time: nothing to carry

    assert feedback_carry_over(run=rescored) == 3
    carried = {(f.anomaly_id, f.user.username): f for f in AnomalyFeedback.objects.filter(anomaly__run=rescored)}
    assert set(carried) == {(again[0].pk, "anna"), (again[0].pk, "bob"), (again[1].pk, "anna")}
    assert carried[(again[0].pk, "anna")].verdict == Verdict.TRUE_POSITIVE
    assert carried[(again[0].pk, "anna")].comment == "real"
    assert carried[(again[1].pk, "anna")].verdict == Verdict.FALSE_POSITIVE  # her latest verdict
    assert carried[(again[0].pk, "bob")].carried_from.anomaly_id == anomalies[0].pk
    # A third run points at the original verdicts, not at the copies.
    third = PipelineRunFactory(fleet=fleet, model_version=run.model_version)
    AnomalyResultFactory(run=third, model_version=run.model_version, device=anomalies[0].device,
                         timestamp=anomalies[0].timestamp)
    assert feedback_carry_over(run=third) == 2
    assert {f.carried_from.anomaly_id for f in AnomalyFeedback.objects.filter(anomaly__run=third)} == {anomalies[0].pk}
    # The page says where a carried verdict came from; a verdict given again replaces the copy.
    client.force_login(anna)
    page = client.get(reverse("detection:anomaly_detail", args=[again[0].pk])).content.decode()
    assert "from an earlier run of this sample" in page
    renewed = feedback_give(anomaly=again[0], user=anna, verdict=Verdict.FALSE_POSITIVE)
    assert renewed.carried_from_id is None and AnomalyFeedback.objects.filter(anomaly=again[0]).count() == 2


def test_a_real_rescore_keeps_the_reviews_of_samples_still_flagged():
    """Two pipeline runs on the same data: the second run's anomalies at reviewed samples arrive reviewed."""
    from detection.ingest.loader import ingest_batch
    from detection.ingest.synthetic import generate_fleet
    from detection.models import AnomalyResult, Fleet
    from detection.services import pipeline_run_create, pipeline_run_execute

    ingest_batch(batch=generate_fleet(devices=12, days=4, seed=5), fleet_name="carry")
    fleet = Fleet.objects.get(name="carry")
    first = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    reviewer = user_with_role("rita", "reviewer")
    reviewed = list(AnomalyResult.objects.filter(run=first, label=Label.ANOMALY).order_by("id")[:10])
    for item in reviewed:
        feedback_give(anomaly=item, user=reviewer, verdict=Verdict.FALSE_POSITIVE)
    second = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    assert second.status == "succeeded", second.error
    still = AnomalyResult.objects.filter(run=second, label=Label.ANOMALY,
                                         device__in=[r.device_id for r in reviewed])
    keys = {(r.device_id, r.timestamp) for r in reviewed}
    expected = {r.pk for r in still if (r.device_id, r.timestamp) in keys}
    assert expected  # the same data and settings flag the same samples again
    assert set(AnomalyFeedback.objects.filter(anomaly__run=second).values_list("anomaly_id", flat=True)) == expected


def test_client_id_deduplicates_replayed_feedback(scored):
    anomaly, other = scored[2][:2]
    user = user_with_role("r", "reviewer")
    client_id = uuid.uuid4()
    first = feedback_give(anomaly=anomaly, user=user, verdict=Verdict.TRUE_POSITIVE, client_id=str(client_id))
    replay = feedback_give(anomaly=anomaly, user=user, verdict=Verdict.TRUE_POSITIVE, client_id=client_id)
    assert replay.pk == first.pk and AnomalyFeedback.objects.count() == 1
    with pytest.raises(FeedbackError, match="client_id"):
        feedback_give(anomaly=other, user=user, verdict=Verdict.TRUE_POSITIVE, client_id=client_id)


@pytest.mark.parametrize("kwargs, field", [
    ({"verdict": "maybe"}, "verdict"), ({"verdict": "not_sure", "comment": "x" * 2001}, "comment"),
    ({"verdict": "not_sure", "client_id": "nope"}, "client_id"),
])
def test_feedback_errors_name_the_field(scored, kwargs, field):
    with pytest.raises(FeedbackError) as caught:
        feedback_give(anomaly=scored[2][0], user=user_with_role("r", "reviewer"), **kwargs)
    assert caught.value.field == field and not AnomalyFeedback.objects.exists()


def test_normal_results_take_no_feedback(scored):
    normal = scored[1].results.filter(label=Label.NORMAL).first()
    with pytest.raises(FeedbackError, match="anomaly"):
        feedback_give(anomaly=normal, user=user_with_role("r", "reviewer"), verdict=Verdict.TRUE_POSITIVE)


@pytest.mark.parametrize("role, status", [(None, 302), ("viewer", 403), ("reviewer", 200), ("approver", 200),
                                          ("admin", 200)])
def test_feedback_post_needs_the_reviewer_role(client, scored, role, status):
    anomaly = scored[2][0]
    response = login(client, role).post(reverse("detection:anomaly_feedback", args=[anomaly.pk]),
                                        {"verdict": "false_positive", "comment": "known maintenance"},
                                        headers={"HX-Request": "true"})
    assert response.status_code == status
    assert AnomalyFeedback.objects.filter(anomaly=anomaly).exists() is (status == 200)
    if status == 200:
        content = response.content.decode()
        assert content.lstrip().startswith('<section class="card feedback" id="feedback"')
        assert "known maintenance" in content and "False positive · 1" in content


def test_feedback_post_with_a_bad_verdict_shows_the_message(client, scored):
    url = reverse("detection:anomaly_feedback", args=[scored[2][0].pk])
    login(client, "reviewer")
    assert client.post(url, {"verdict": "bogus"}).status_code == 400
    response = client.post(url, {"verdict": "bogus"}, headers={"HX-Request": "true"})
    assert response.status_code == 200 and b"verdict: &#x27;bogus&#x27;" in response.content
    assert client.get(url).status_code == 405
    assert client.post(reverse("detection:anomaly_feedback", args=[999999]), {"verdict": "not_sure"}).status_code == 404


def test_viewer_sees_verdicts_but_no_buttons_and_reviewer_sees_buttons(client, scored):
    anomaly = scored[2][0]
    feedback_give(anomaly=anomaly, user=user_with_role("rita", "reviewer"), verdict=Verdict.TRUE_POSITIVE,
                  comment="real overheating")
    url = reverse("detection:anomaly_detail", args=[anomaly.pk])
    content = login(client, "viewer").get(url).content.decode()
    assert "real overheating" in content and "rita" in content and 'data-shortcut="t"' not in content
    content = login(client, "reviewer").get(url).content.decode()
    assert 'data-shortcut="t"' in content and 'data-shortcut="f"' in content and "vigil/shortcuts.js" in content
    assert 'id="explanation-panel"' in content  # the explanation panel stays


def test_detail_links_next_and_previous_in_list_order(client, scored):
    anomalies = sorted(scored[2], key=lambda a: (a.timestamp, a.pk), reverse=True)  # newest first
    login(client, "viewer")
    middle = client.get(reverse("detection:anomaly_detail", args=[anomalies[5].pk]))
    assert (middle.context["previous_id"], middle.context["next_id"]) == (anomalies[4].pk, anomalies[6].pk)
    first = client.get(reverse("detection:anomaly_detail", args=[anomalies[0].pk]))
    assert first.context["previous_id"] is None and 'data-shortcut="j"' in first.content.decode()


# --- bulk review on the list ------------------------------------------------------------------------

def test_one_verdict_on_many_anomalies_is_all_or_none(scored, django_capture_on_commit_callbacks):
    fleet, run, found = scored
    reviewer = user_with_role("r", "reviewer")
    normal = run.results.filter(label=Label.NORMAL).first()
    with pytest.raises(FeedbackError, match=f"anomalies: result\\(s\\) {normal.pk} are not anomalies"):
        feedback_give_many(anomalies=[found[0], normal], user=reviewer, verdict=Verdict.TRUE_POSITIVE)
    with pytest.raises(FeedbackError, match="verdict"):
        feedback_give_many(anomalies=found[:3], user=reviewer, verdict="maybe")
    with pytest.raises(FeedbackError, match="anomalies: select at least one"):
        feedback_give_many(anomalies=[], user=reviewer, verdict=Verdict.TRUE_POSITIVE)
    assert not AnomalyFeedback.objects.exists()
    earlier = feedback_give(anomaly=found[1], user=reviewer, verdict=Verdict.TRUE_POSITIVE)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        done = feedback_give_many(anomalies=found[:4], user=reviewer, verdict=Verdict.FALSE_POSITIVE, comment="test rig")
    assert [f.anomaly_id for f in done] == [a.pk for a in found[:4]]
    # One current verdict per (anomaly, reviewer): the earlier true positive is now a false positive.
    assert AnomalyFeedback.objects.filter(user=reviewer).count() == 4
    assert set(AnomalyFeedback.objects.values_list("verdict", flat=True)) == {Verdict.FALSE_POSITIVE}
    assert all(f.comment == "test rig" and f.verdict == Verdict.FALSE_POSITIVE for f in done)
    updated = next(f for f in done if f.anomaly_id == found[1].pk)
    assert (updated.pk, updated.created_at) == (earlier.pk, earlier.created_at)  # updated, not a new row
    assert updated.updated_at > earlier.updated_at
    # After the commit: one live push per verdict, and one alert check for the whole batch.
    assert len(callbacks) == 5


def _bulk(client, ids, verdict="false_positive", htmx=True, **extra):
    headers = {"HX-Request": "true"} if htmx else {}
    return client.post(reverse("detection:anomaly_feedback_bulk", args=["demo"]),
                       {"anomaly": [str(i) for i in ids], "verdict": verdict, **extra}, headers=headers)


def test_reviewer_marks_the_selected_rows_and_the_list_comes_back_with_its_filters(client, scored):
    fleet, run, found = scored
    login(client, "reviewer")
    page = anomalies(client, severity="high", review="open").content.decode()
    assert 'id="bulk-review"' in page and 'form="bulk-review"' in page and "vigil/bulk.js" in page
    high = [a for a in found if a.severity == "high"][:3]
    response = _bulk(client, [a.pk for a in high], comment="charging cradle fault", query="severity=high&review=open")
    assert response.status_code == 200
    location = json.loads(response["HX-Location"])
    assert location["path"] == reverse("detection:anomaly_list", args=["demo"]) + "?severity=high&review=open"
    assert location["target"] == "#anomaly-table"
    assert set(AnomalyFeedback.objects.values_list("anomaly_id", "verdict", "comment")) == {
        (a.pk, "false_positive", "charging cradle fault") for a in high}
    listed = client.get(location["path"], headers={"HX-Request": "true"})
    content = listed.content.decode()
    assert "Marked 3 anomalies as false positive." in content
    assert not {a.pk for a in high} & {r.pk for r in listed.context["page"]}  # reviewed: no longer open
    # Without htmx: back to the list, where the message shows.
    response = _bulk(client, [found[0].pk], verdict="not_sure", htmx=False, query="sort=-score")
    assert response.status_code == 302 and response["Location"].endswith("/fleets/demo/anomalies/?sort=-score")
    assert "Marked 1 anomaly as not sure." in client.get(response["Location"]).content.decode()
    # The query string goes back re-encoded: a line break cannot reach the Location header.
    response = _bulk(client, [found[0].pk], htmx=False, query="sort=-score\r\nSet-Cookie: x=1")
    assert response.status_code == 302 and "\n" not in response["Location"] and "%0D%0A" in response["Location"]


@pytest.mark.parametrize("ids, verdict, message", [
    ([], "true_positive", "anomalies: select at least one anomaly"),
    (["abc"], "true_positive", "anomalies: ids must be whole numbers"),
    ([999999999], "true_positive", "anomalies: no result 999999999 in fleet demo"),
    (None, "bogus", "verdict: &#x27;bogus&#x27; is not one of"),
])
def test_bulk_review_refusals_name_the_field_and_save_nothing(client, scored, ids, verdict, message):
    login(client, "reviewer")
    ids = [scored[2][0].pk] if ids is None else ids
    response = _bulk(client, ids, verdict=verdict)
    assert response.status_code == 200 and message in response.content.decode()
    assert "HX-Location" not in response
    assert not AnomalyFeedback.objects.exists()
    response = _bulk(client, ids, verdict=verdict, htmx=False)
    assert response.status_code == 303 and message in client.get(response["Location"]).content.decode()


def test_bulk_review_stays_within_the_fleet_and_needs_the_reviewer_role(client, scored):
    other = AnomalyResultFactory()  # another fleet's anomaly
    login(client, "reviewer")
    assert f"no result {other.pk} in fleet demo" in _bulk(client, [scored[2][0].pk, other.pk]).content.decode()
    assert not AnomalyFeedback.objects.exists()
    login(client, "viewer", name="v")
    assert _bulk(client, [scored[2][0].pk]).status_code == 403
    assert 'id="bulk-review"' not in anomalies(client).content.decode()
    assert not AnomalyFeedback.objects.exists()
    assert client.get(reverse("detection:anomaly_feedback_bulk", args=["demo"])).status_code in (403, 405)


# --- anomaly list filters --------------------------------------------------------------------------

def anomalies(client, **params):
    return client.get(reverse("detection:anomaly_list", args=["demo"]), params)


def test_filters_combine(client, scored):
    login(client, "viewer")
    reviewer = user_with_role("r", "reviewer")
    honey_critical = [a for a in scored[2] if a.device.manufacturer == "Honeywell" and a.severity == "critical"]
    feedback_give(anomaly=honey_critical[0], user=reviewer, verdict=Verdict.FALSE_POSITIVE)
    response = anomalies(client, cohort="Honeywell|CT40|10", severity="critical")
    assert {r.pk for r in response.context["page"]} == {a.pk for a in honey_critical}
    response = anomalies(client, cohort="Honeywell|CT40|10", severity="critical", review="false_positive")
    assert [r.pk for r in response.context["page"]] == [honey_critical[0].pk]
    response = anomalies(client, store="south", review="open", sort="-score")
    assert all(r.device.store == "south" and r.n_false_positive == 0 for r in response.context["page"])
    assert response.context["page"].paginator.count == 9
    assert anomalies(client, review="reviewed").context["page"].paginator.count == 1
    device = scored[2][0].device.external_id
    assert {r.device.external_id for r in anomalies(client, device=device).context["page"]} == {device}
    days = sorted(a.timestamp.date() for a in scored[2])
    first, last = days[0].isoformat(), days[-1].isoformat()
    assert anomalies(client, date_from=first, date_to=last).context["page"].paginator.count == 20
    assert anomalies(client, date_to=first).context["page"].paginator.count == days.count(days[0])
    assert anomalies(client, date_from="2030-01-01").context["page"].paginator.count == 0
    assert "No anomalies match these filters" in anomalies(client, date_from="2030-01-01").content.decode()


def test_list_shows_review_status_column(client, scored):
    feedback_give(anomaly=scored[2][0], user=user_with_role("r", "reviewer"), verdict=Verdict.TRUE_POSITIVE)
    content = anomalies(login(client, "viewer")).content.decode()
    assert "badge-reviewed" in content and "1 TP · 0 FP · 0 ?" in content and ">Open<" in content


@pytest.mark.parametrize("params", [
    {"severity": "huge"}, {"review": "maybe"}, {"cohort": "x|y"}, {"cohort": "a|b|c|d"}, {"store": "mars"},
    {"date_from": "yesterday"}, {"date_to": "9999-99-99"}, {"date_from": "9999-12-31"}, {"device": "\x00"},
    {"page": "abc", "severity": "?", "sort": "z"},
])
def test_bad_filter_values_never_fail(client, scored, params):
    assert anomalies(login(client, "viewer"), **params).status_code == 200


def test_filtered_htmx_request_keeps_the_filters_in_the_links(client, scored):
    response = anomalies(login(client, "viewer"), severity="high", sort="-score", page=1)
    content = response.content.decode()
    assert 'hx-push-url="true"' in content and 'name="sort" value="-score"' in content
    partial = client.get(reverse("detection:anomaly_list", args=["demo"]), {"severity": "low"},
                         headers={"HX-Request": "true"}).content.decode()
    assert partial.lstrip().startswith('<div id="anomaly-table"') and "severity=low" in partial


def test_anomaly_list_query_count(client, scored, django_assert_max_num_queries):
    login(client, "viewer")
    with django_assert_max_num_queries(10):  # +1: the page's ids, then its rows (selectors.anomalies_in_order)
        assert anomalies(client, severity="high", review="open", cohort="Zebra|TC52|11").status_code == 200


# --- overview --------------------------------------------------------------------------------------

def test_overview_shows_kpis_model_run_and_chart_data(client, scored):
    fleet, run, items = scored
    feedback_give(anomaly=items[0], user=user_with_role("r", "reviewer"), verdict=Verdict.TRUE_POSITIVE)
    response = login(client, "viewer").get(reverse("detection:fleet_overview", args=["demo"]))
    assert response.status_code == 200
    kpis = response.context["kpis"]
    # 20 anomalies 15 min apart: all within 24 h of the newest sample (the wall clock plays no part)
    assert (kpis["day"], kpis["week"], kpis["total"], kpis["reviewed"], kpis["open"]) == (20, 20, 20, 1, 19)
    histogram = response.context["charts"]["histogram"]
    assert sum(histogram["normal"]) == 10 and sum(histogram["anomaly"]) == 20
    assert len(histogram["edges"]) == len(histogram["normal"]) + 1 and histogram["threshold"] == 0.62
    assert sum(sum(v) for v in response.context["charts"]["trend"]["series"].values()) == 20
    content = response.content.decode()
    assert 'id="overview-charts"' in content and "vigil/vendor/echarts-5.6.0.min.js" in content
    assert "cdn" not in content.lower() and ">200<" in content and f'id="run-{run.pk}"' in content
    assert "Run pipeline" not in content  # viewers cannot start runs


def test_overview_kpis_window_is_measured_from_the_latest_sample(scored):
    from detection.selectors import run_kpis
    fleet, run, _ = scored
    AnomalyResultFactory(run=run, model_version=run.model_version, timestamp=T0.replace(month=6))
    kpis = run_kpis(run=run)
    assert (kpis["day"], kpis["week"], kpis["total"]) == (1, 1, 21)


def test_overview_of_a_fleet_without_runs_renders(client):
    FleetFactory(name="fresh")
    response = login(client, "viewer").get(reverse("detection:fleet_overview", args=["fresh"]))
    assert response.status_code == 200 and b"No runs yet" in response.content
    assert client.get(reverse("detection:fleet_overview", args=["nope"])).status_code == 404


def test_overview_query_count(client, scored, django_assert_max_num_queries):
    login(client, "viewer")
    # 13 + the nav's fleet list and open-alert count (context processors of the other apps) + the reviewed
    # count, now its own query so the rest can be cached per finished run.
    with django_assert_max_num_queries(15):
        assert client.get(reverse("detection:fleet_overview", args=["demo"])).status_code == 200


def test_overview_aggregates_are_cached_per_finished_run_but_reviews_stay_live(client, scored):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    fleet, run, items = scored
    login(client, "viewer")
    url = reverse("detection:fleet_overview", args=["demo"])
    with CaptureQueriesContext(connection) as cold:
        client.get(url)
    feedback_give(anomaly=items[0], user=user_with_role("r", "reviewer"), verdict=Verdict.TRUE_POSITIVE)
    with CaptureQueriesContext(connection) as warm:
        response = client.get(url)
    assert len(cold) - len(warm) == 5  # MAX(end), severity counts, MIN/MAX score, histogram, trend
    kpis = response.context["kpis"]
    assert (kpis["reviewed"], kpis["open"], kpis["total"]) == (1, 19, 20)
    assert sum(response.context["charts"]["histogram"]["anomaly"]) == 20


# --- runs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("role, status", [(None, 302), ("viewer", 403), ("reviewer", 403), ("approver", 200),
                                          ("admin", 200)])
def test_run_pipeline_needs_the_approver_role(client, scored, role, status, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = login(client, role).post(reverse("detection:run_start", args=["demo"]),
                                            headers={"HX-Request": "true"})
    assert response.status_code == status
    started = PipelineRun.objects.filter(trigger=Trigger.UI)
    assert started.exists() is (status == 200)
    if status == 200:
        run = started.get()
        assert run.started_by.username == f"user-{role}" and run.is_finished  # eager Celery ran it (no telemetry)
        assert f'id="run-{run.pk}"' in response.content.decode()


def test_approver_sees_the_run_button(client, scored):
    content = login(client, "approver").get(reverse("detection:fleet_overview", args=["demo"])).content.decode()
    assert "Run pipeline" in content


# --- model versions --------------------------------------------------------------------------------

@pytest.fixture
def versions(scored):
    fleet = scored[0]
    old = ModelVersionFactory(fleet=fleet, version=1, status=ModelStatus.PRODUCTION)
    ModelVersion.objects.filter(pk=old.pk).update(status=ModelStatus.RETIRED)  # as the pipeline retires
    candidate = ModelVersionFactory(fleet=fleet, version=3, status=ModelStatus.CANDIDATE,
                                    metrics={"threshold": 0.6, "anomaly_rate": 0.0123})
    production = ModelVersion.objects.get(fleet=fleet, version=2)
    production.save()  # v2 went to production after v1: its history record is the newer one
    return fleet, ModelVersion.objects.get(pk=old.pk), production, candidate


def test_promote_retires_the_production_model_and_is_audited(versions):
    fleet, _, production, candidate = versions
    approver = user_with_role("ann", "approver")
    model_version_promote(version=candidate, user=approver)
    production.refresh_from_db(), candidate.refresh_from_db()
    assert (production.status, candidate.status) == (ModelStatus.RETIRED, ModelStatus.PRODUCTION)
    for version in (production, candidate):
        assert version.history.latest().history_user == approver
    with pytest.raises(ModelVersionError, match="only a candidate"):
        model_version_promote(version=candidate, user=approver)


def test_rollback_restores_the_previous_production_model_and_is_audited(versions):
    fleet, old, production, candidate = versions
    approver = user_with_role("ann", "approver")
    model_version_promote(version=candidate, user=approver)
    restored = model_version_rollback(fleet=fleet, user=approver)
    assert restored.pk == production.pk
    assert ModelVersion.objects.get(pk=candidate.pk).status == ModelStatus.RETIRED
    assert restored.history.latest().history_user == approver
    assert model_version_rollback(fleet=fleet, user=approver).pk == old.pk


def test_rollback_button_shows_only_when_there_is_a_model_to_go_back_to(client, scored):
    """One production model and nothing retired: no button, which would only lead to an error."""
    url = reverse("detection:model_versions", args=["demo"])
    content = login(client, "approver").get(url).content.decode()
    assert "Production" in content and "Roll back" not in content
    ModelVersionFactory(fleet=scored[0], version=9, status=ModelStatus.RETIRED)
    assert "Roll back" in client.get(url).content.decode()


def test_rollback_without_production_says_so(scored):
    ModelVersion.objects.update(status=ModelStatus.RETIRED)
    with pytest.raises(ModelVersionError, match="no production model"):
        model_version_rollback(fleet=scored[0], user=user_with_role("ann", "approver"))


def test_model_versions_page_lists_metrics_and_buttons_for_approvers(client, versions):
    content = login(client, "viewer").get(reverse("detection:model_versions", args=["demo"])).content.decode()
    assert "v3" in content and "1.23 %" in content and "Promote" not in content and "Roll back" not in content
    content = login(client, "approver").get(reverse("detection:model_versions", args=["demo"])).content.decode()
    assert "Promote" in content and "Roll back" in content


@pytest.mark.parametrize("role, status", [(None, 302), ("viewer", 403), ("reviewer", 403), ("approver", 302),
                                          ("admin", 302)])
def test_promote_and_rollback_need_the_approver_role(client, versions, role, status):
    fleet, _, production, candidate = versions
    login(client, role)
    response = client.post(reverse("detection:model_version_promote", args=["demo", 3]))
    assert response.status_code == status
    promoted = ModelVersion.objects.get(pk=candidate.pk).status == ModelStatus.PRODUCTION
    assert promoted is (status == 302 and role is not None)
    response = client.post(reverse("detection:model_version_rollback", args=["demo"]))
    assert response.status_code == status
    if role in ("approver", "admin"):
        assert ModelVersion.objects.get(pk=production.pk).status == ModelStatus.PRODUCTION


def test_promote_errors_are_400_with_the_message(client, versions):
    login(client, "approver")
    response = client.post(reverse("detection:model_version_promote", args=["demo", 2]))
    assert response.status_code == 400 and b"only a candidate" in response.content
    assert client.post(reverse("detection:model_version_promote", args=["demo", 99])).status_code == 404
    assert client.post(reverse("detection:model_version_promote", args=["demo", 10**12])).status_code == 404
    assert client.get(reverse("detection:model_version_rollback", args=["demo"])).status_code == 405
