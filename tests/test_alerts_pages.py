"""Alert pages, rule management, the model health page and the alerts API: roles (outsider, viewer,
reviewer, approver), content, bad input, audit."""
from __future__ import annotations

import datetime as dt

import pytest
from django.urls import reverse

from alerts import services
from alerts.choices import AlertStatus
from alerts.models import AlertRule, DriftReport
from detection.choices import AuditAction, Severity
from detection.models import AuditEvent
from tests.factories import (
    AnomalyResultFactory,
    DeviceFactory,
    FleetFactory,
    ModelVersionFactory,
    PipelineRunFactory,
    user_with_role,
)

pytestmark = pytest.mark.django_db
T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


@pytest.fixture
def alert():
    fleet = FleetFactory(name="demo")
    model = ModelVersionFactory(fleet=fleet, status="production")
    run = PipelineRunFactory(fleet=fleet, model_version=model, n_anomalies=3)
    device = DeviceFactory(fleet=fleet, external_id="scan-42")
    anomalies = [AnomalyResultFactory(run=run, model_version=model, device=device, severity=Severity.HIGH,
                                      timestamp=T0 + dt.timedelta(minutes=10 * i),
                                      top_metrics=[{"metric": "battery_level", "domain": "battery", "z": -6}])
                 for i in range(3)]
    return services.alerts_ingest(anomalies=anomalies)[0]


def login(client, role):
    user = user_with_role(f"u-{role}", role)
    client.force_login(user)
    return user


def detail(alert):
    return reverse("alerts:alert_detail", args=[alert.pk])


# --- who may see and do what ----------------------------------------------------------------------------

def page_urls(alert):
    return [reverse("alerts:alert_list"), detail(alert), reverse("alerts:model_health", args=["demo"])]


def test_anonymous_users_go_to_login(client, alert):
    for url in page_urls(alert) + [reverse("alerts:rule_list")]:
        response = client.get(url)
        assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_outsider_is_refused_every_page_and_action(client, alert):
    login(client, None)
    for url in page_urls(alert) + [reverse("alerts:rule_list"), reverse("alerts:rule_create")]:
        assert client.get(url).status_code == 403, url
    for name in ("alert_acknowledge", "alert_resolve", "alert_snooze"):
        assert client.post(reverse(f"alerts:{name}", args=[alert.pk]), {"minutes": 60}).status_code == 403
    rule = AlertRule.objects.create(fleet=alert.fleet, name="r")
    assert client.post(reverse("alerts:rule_delete", args=[rule.pk])).status_code == 403
    assert client.post(reverse("alerts:rule_edit", args=[rule.pk]), {"name": "x"}).status_code == 403
    alert.refresh_from_db()
    assert alert.status == AlertStatus.OPEN and AlertRule.objects.filter(pk=rule.pk).exists()


def test_viewer_reads_but_cannot_act_or_manage_rules(client, alert):
    login(client, "viewer")
    for url in page_urls(alert):
        assert client.get(url).status_code == 200, url
    assert client.post(reverse("alerts:alert_acknowledge", args=[alert.pk])).status_code == 403
    assert client.get(reverse("alerts:rule_list")).status_code == 403
    assert b"Acknowledge" not in client.get(detail(alert)).content


def test_list_filters_and_shows_the_alert(client, alert):
    login(client, "viewer")
    FleetFactory(name="other")
    page = client.get(reverse("alerts:alert_list"), {"fleet": "demo", "status": "open", "severity": "high"})
    assert alert.title.encode() in page.content and page.context["page"].paginator.count == 1
    assert client.get(reverse("alerts:alert_list"), {"fleet": "other"}).context["page"].paginator.count == 0
    assert client.get(reverse("alerts:alert_list"), {"status": "resolved"}).context["page"].paginator.count == 0
    junk = client.get(reverse("alerts:alert_list"), {"status": "bogus", "severity": "x", "page": "zz"})
    assert junk.status_code == 200 and junk.context["page"].paginator.count == 1  # unknown values ignored
    partial = client.get(reverse("alerts:alert_list"), HTTP_HX_REQUEST="true")
    assert b"<html" not in partial.content and b'id="alert-table"' in partial.content


def test_nav_badge_counts_open_alerts(client, alert):
    login(client, "viewer")
    assert b'id="alert-badge" aria-label="1 open"' in client.get(reverse("alerts:alert_list")).content


def test_detail_links_grouped_anomalies_and_shows_timeline(client, alert):
    login(client, "viewer")
    page = client.get(detail(alert))
    for anomaly in alert.anomalies.all():
        assert reverse("detection:anomaly_detail", args=[anomaly.pk]).encode() in page.content
    assert b"Opened" in page.content and b"scan-42" in page.content
    assert client.get(reverse("alerts:alert_detail", args=[99999])).status_code == 404


def test_reviewer_acknowledges_snoozes_and_resolves(client, alert):
    user = login(client, "reviewer")
    assert client.post(reverse("alerts:alert_acknowledge", args=[alert.pk])).status_code == 302
    alert.refresh_from_db()
    assert alert.status == AlertStatus.ACKNOWLEDGED and alert.acknowledged_by == user
    again = client.post(reverse("alerts:alert_acknowledge", args=[alert.pk]))
    assert again.status_code == 400 and b"status: alert" in again.content
    bad = client.post(reverse("alerts:alert_snooze", args=[alert.pk]), {"minutes": "17"})
    assert bad.status_code == 400 and b"minutes" in bad.content
    assert client.post(reverse("alerts:alert_snooze", args=[alert.pk]), {"minutes": "60"}).status_code == 302
    assert client.post(reverse("alerts:alert_resolve", args=[alert.pk])).status_code == 302
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED and alert.snoozed_until is not None
    assert AuditEvent.objects.filter(target_id=str(alert.pk)).count() == 3
    assert client.get(reverse("alerts:alert_acknowledge", args=[alert.pk])).status_code == 405


def test_reviewer_marks_every_anomaly_of_an_alert_at_once(client, alert, django_capture_on_commit_callbacks):
    from detection.models import AnomalyFeedback

    login(client, "viewer")
    assert b'class="alert-review"' not in client.get(detail(alert)).content
    assert client.post(reverse("alerts:alert_review", args=[alert.pk]), {"verdict": "false_positive"}).status_code == 403
    user = login(client, "reviewer")
    assert b'class="alert-review"' in client.get(detail(alert)).content
    bad = client.post(reverse("alerts:alert_review", args=[alert.pk]), {"verdict": "maybe"})
    assert bad.status_code == 400 and b"verdict: &#x27;maybe&#x27; is not one of" in bad.content
    assert not AnomalyFeedback.objects.exists()
    with django_capture_on_commit_callbacks(execute=True):
        done = client.post(reverse("alerts:alert_review", args=[alert.pk]),
                           {"verdict": "false_positive", "comment": "scanner left in the cold room"})
    assert done.status_code == 302
    assert set(AnomalyFeedback.objects.values_list("anomaly_id", "user_id", "verdict")) == {
        (a.pk, user.pk, "false_positive") for a in alert.anomalies.all()}
    alert.refresh_from_db()
    assert alert.status == AlertStatus.SUPPRESSED  # all false positives: alerts_on_feedback suppresses it
    page = client.get(detail(alert)).content.decode()
    assert "Marked 3 anomalies of this alert as false positive." in page
    assert "3 anomalies marked false positive: scanner left in the cold room" in page  # the timeline
    assert page.count("0 TP · 1 FP · 0 ?") == 3  # each listed anomaly shows its verdicts
    assert AuditEvent.objects.filter(action="alert_reviewed", target_id=str(alert.pk)).count() == 1


# --- rules ---------------------------------------------------------------------------------------------

RULE = {"fleet": "demo", "name": "night shift", "enabled": "on", "min_severity": "high", "email_to": "a@example.com",
        "budget": "5", "budget_window_minutes": "60", "quiet_start": "", "quiet_end": ""}


def test_approver_creates_edits_and_deletes_a_rule_audited(client, alert):
    login(client, "approver")
    assert client.get(reverse("alerts:rule_create")).status_code == 200
    assert client.post(reverse("alerts:rule_create"), RULE).status_code == 302
    rule = AlertRule.objects.get(name="night shift")
    assert rule.email_recipients == ["a@example.com"] and rule.budget == 5
    assert b"night shift" in client.get(reverse("alerts:rule_list")).content
    edit = {**RULE, "webhook_url": "https://hooks.example.com/x", "webhook_secret": "k", "quiet_start": "22:00",
            "quiet_end": "06:00"}
    assert client.post(reverse("alerts:rule_edit", args=[rule.pk]), edit).status_code == 302
    rule.refresh_from_db()
    assert rule.channels == ["email", "webhook"] and rule.in_quiet_hours(T0.replace(hour=23))
    assert client.post(reverse("alerts:rule_delete", args=[rule.pk])).status_code == 302
    assert not AlertRule.objects.exists()
    events = AuditEvent.objects.filter(action=AuditAction.ALERT_RULE_CHANGED).order_by("id")
    assert [e.reason for e in events] == ["created", "edited", "deleted"]
    assert events[1].after["webhook_secret"] == "***"  # the secret never lands in the audit log


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"email_to": "not-an-address"}, "email_to", "is not an email address"),
    ({"webhook_url": "https://x.example.com/h"}, "webhook_secret", "needs a secret"),
    ({"quiet_start": "22:00"}, "quiet_end", "both ends"),
    ({"budget": "0"}, "budget", "at least 1"),
    ({"fleet": "nope"}, "fleet", "Select a valid choice"),
])
def test_bad_rule_input_names_the_field_and_saves_nothing(client, alert, change, field, message):
    login(client, "approver")
    response = client.post(reverse("alerts:rule_create"), {**RULE, **change})
    assert response.status_code == 400
    assert message in " ".join(response.context["form"].errors[field])
    assert not AlertRule.objects.exists()


def test_duplicate_rule_name_is_refused(client, alert):
    login(client, "approver")
    client.post(reverse("alerts:rule_create"), RULE)
    response = client.post(reverse("alerts:rule_create"), RULE)
    assert response.status_code == 400 and "already has a rule" in str(response.context["form"].errors["name"])


# --- model health page ------------------------------------------------------------------------------------

def test_model_health_page_shows_drift_rate_and_triggers(client, alert):
    login(client, "viewer")
    DriftReport.objects.create(fleet=alert.fleet, status="drift", summary="3 of 11 features drifting",
                               features=[{"feature": "battery_level", "test": "ks", "statistic": 0.4, "p_value": 1e-9,
                                          "effect": 0.4, "psi": 0.61, "status": "drift", "note": ""}],
                               windows={"reference": ["2024-01-01T00:00", "2024-01-10T00:00"],
                                        "current": ["2024-01-10T00:00", "2024-01-11T00:00"]})
    page = client.get(reverse("alerts:model_health", args=["demo"]))
    content = page.content.decode()
    assert "battery_level" in content and "0.610" in content and "3 of 11 features drifting" in content
    assert page.context["summary"]["drift"] == "drift" and "drift" in [t.kind for t in page.context["triggers"]]
    assert 'id="health-charts"' in content
    # A fleet page: the navigation's Alerts item is not the current page here, as it is on the alert list.
    assert 'aria-current="page">Alerts' not in content
    assert 'aria-current="page">Alerts' in client.get(reverse("alerts:alert_list")).content.decode()
    assert client.get(reverse("alerts:model_health", args=["nope"])).status_code == 404


def test_model_health_page_of_an_empty_fleet(client):
    FleetFactory(name="bare")
    login(client, "viewer")
    page = client.get(reverse("alerts:model_health", args=["bare"]))
    assert page.status_code == 200 and b"No drift check yet" in page.content


# --- API -----------------------------------------------------------------------------------------------

def api_client(role):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user_with_role(f"api-{role}", role))
    return client


def test_api_alert_list_and_actions_by_role(alert):
    assert api_client(None).get("/api/v1/alerts/").status_code == 403
    from rest_framework.test import APIClient
    assert APIClient().get("/api/v1/alerts/").status_code == 401
    viewer = api_client("viewer")
    body = viewer.get("/api/v1/alerts/", {"fleet": "demo", "status": "open"}).json()
    assert body["count"] == 1 and body["results"][0]["device"] == "scan-42"
    assert len(body["results"][0]["anomaly_ids"]) == 3
    assert viewer.post(f"/api/v1/alerts/{alert.pk}/acknowledge/").status_code == 403
    reviewer = api_client("reviewer")
    assert reviewer.post(f"/api/v1/alerts/{alert.pk}/acknowledge/").json()["status"] == "acknowledged"
    again = reviewer.post(f"/api/v1/alerts/{alert.pk}/acknowledge/")
    assert again.status_code == 400 and "status" in again.json()
    bad = reviewer.post(f"/api/v1/alerts/{alert.pk}/snooze/", {"minutes": 0}, format="json")
    assert bad.status_code == 400 and "minutes" in bad.json()
    both = reviewer.post(f"/api/v1/alerts/{alert.pk}/snooze/", {}, format="json")
    assert both.status_code == 400
    assert reviewer.post(f"/api/v1/alerts/{alert.pk}/snooze/", {"minutes": 30}, format="json").status_code == 200
    assert reviewer.post(f"/api/v1/alerts/{alert.pk}/resolve/", {"reason": "fixed"}, format="json").json()["status"] \
        == "resolved"


def test_api_rules_need_approver_and_validate_like_the_form(alert):
    assert api_client("reviewer").get("/api/v1/alert-rules/").status_code == 403
    approver = api_client("approver")
    bad = approver.post("/api/v1/alert-rules/", {"fleet": "demo", "name": "hook", "webhook_url": "https://h.example.com"},
                        format="json")
    assert bad.status_code == 400 and "webhook_secret" in bad.json()
    created = approver.post("/api/v1/alert-rules/", {"fleet": "demo", "name": "hook", "min_severity": "critical",
                                                     "webhook_url": "https://h.example.com", "webhook_secret": "k"},
                            format="json")
    assert created.status_code == 201 and "webhook_secret" not in created.json()
    rule_id = created.json()["id"]
    patched = approver.patch(f"/api/v1/alert-rules/{rule_id}/", {"budget": 3}, format="json")
    assert patched.status_code == 200 and patched.json()["budget"] == 3
    assert AlertRule.objects.get(pk=rule_id).webhook_secret == "k"
    assert approver.delete(f"/api/v1/alert-rules/{rule_id}/").status_code == 204
    assert AuditEvent.objects.filter(action=AuditAction.ALERT_RULE_CHANGED).count() == 3


def test_api_drift_reports_are_readable_by_viewers(alert):
    DriftReport.objects.create(fleet=alert.fleet, status="ok", summary="fine")
    assert api_client(None).get("/api/v1/drift-reports/").status_code == 403
    body = api_client("viewer").get("/api/v1/drift-reports/", {"fleet": "demo"}).json()
    assert body["count"] == 1 and body["results"][0]["status"] == "ok"
