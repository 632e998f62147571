"""Alerts: dedup and cohort aggregation, rate-limit budget and digests, false-positive suppression,
webhook signature, retries and dead letter against a local HTTP server, email routing, reviewer actions."""
from __future__ import annotations

import datetime as dt
import json
import random
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.core import mail
from django.utils import timezone

from alerts import notifiers, services
from alerts.choices import AlertEventKind, AlertScope, AlertStatus, DeliveryKind, DeliveryStatus
from alerts.models import Alert, AlertAnomaly, AlertDelivery, AlertRule
from detection.choices import Label, Severity, Verdict
from detection.models import AuditEvent
from detection.services import feedback_give, feedback_give_many
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


def metrics(domain: str) -> list[dict]:
    return [{"metric": f"{domain}_x", "domain": domain, "value": 1.0, "typical": 0.0, "z": 5.0}]


@pytest.fixture(autouse=True)
def _commit_hooks_run(monkeypatch, django_capture_on_commit_callbacks):
    """Tests run inside a transaction; run what ingest and digests queue for after commit at once."""
    for name in ("alerts_ingest", "digests_send"):
        original = getattr(services, name)

        def run_and_commit(*args, _original=original, **kwargs):
            with django_capture_on_commit_callbacks(execute=True):
                return _original(*args, **kwargs)
        monkeypatch.setattr(services, name, run_and_commit)


@pytest.fixture
def world():
    """A fleet with one run/model and factories for anomalies at chosen minutes."""
    fleet = FleetFactory(name="shops")
    model = ModelVersionFactory(fleet=fleet)
    run = PipelineRunFactory(fleet=fleet, model_version=model)

    def anomaly(device, minute: int, domain: str = "battery", severity: str = Severity.HIGH, **kw):
        return AnomalyResultFactory(run=run, model_version=model, device=device,
                                    timestamp=T0 + dt.timedelta(minutes=minute), severity=severity,
                                    top_metrics=metrics(domain), **kw)
    return fleet, anomaly


def test_anomalies_of_one_device_and_domain_within_window_join_one_alert(world, settings):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "dedup_window_minutes": 60}
    fleet, anomaly = world
    device = DeviceFactory(fleet=fleet)
    first = services.alerts_ingest(anomalies=[anomaly(device, 0), anomaly(device, 30)])
    assert len(first) == 1 and first[0].count == 2
    again = services.alerts_ingest(anomalies=[anomaly(device, 80)])  # 50 min after last_seen: joins
    assert [a.pk for a in again] == [first[0].pk]
    later = services.alerts_ingest(anomalies=[anomaly(device, 200)])  # 120 min later: a new alert
    assert later[0].pk != first[0].pk
    other_domain = services.alerts_ingest(anomalies=[anomaly(device, 201, domain="thermal")])
    assert other_domain[0].pk not in {first[0].pk, later[0].pk}
    alert = Alert.objects.get(pk=first[0].pk)
    assert (alert.count, alert.first_seen, alert.last_seen) == (3, T0, T0 + dt.timedelta(minutes=80))
    assert alert.scope == AlertScope.DEVICE and alert.domain == "battery"
    assert list(alert.events.order_by("pk").values_list("message", flat=True)) == [
        "2 anomalies, severity high", "1 more anomaly (now 3)"]
    assert later[0].events.get().message == "1 anomaly, severity high"


def test_ingest_is_idempotent_and_skips_rescored_moments(world):
    fleet, anomaly = world
    device = DeviceFactory(fleet=fleet)
    a = anomaly(device, 0)
    services.alerts_ingest(anomalies=[a])
    assert services.alerts_ingest(anomalies=[a]) == []
    # the same (device, timestamp) scored again by a later run is not news
    rerun = PipelineRunFactory(fleet=fleet)
    again = AnomalyResultFactory(run=rerun, model_version=a.model_version, device=device, timestamp=a.timestamp,
                                 top_metrics=metrics("battery"))
    assert services.alerts_ingest(anomalies=[again]) == []
    assert Alert.objects.get().count == 1


def test_normal_results_never_make_alerts(world):
    fleet, anomaly = world
    normal = anomaly(DeviceFactory(fleet=fleet), 0, label=Label.NORMAL)
    assert services.alerts_ingest(anomalies=[normal]) == []


def test_many_devices_of_one_cohort_become_one_cohort_alert(world, settings):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "cohort_min_devices": 5}
    fleet, anomaly = world
    s21 = [DeviceFactory(fleet=fleet, manufacturer="Samsung", model="Galaxy S21", os_version="Android 14",
                         store=f"store-{i % 5}") for i in range(32)]
    zebra = DeviceFactory(fleet=fleet)  # another cohort, alone: its own device alert
    alerts = services.alerts_ingest(anomalies=[anomaly(d, i % 20) for i, d in enumerate(s21)] + [anomaly(zebra, 3)])
    cohort = [a for a in alerts if a.scope == AlertScope.COHORT]
    assert len(alerts) == 2 and len(cohort) == 1
    assert cohort[0].title == "32 Samsung Galaxy S21 devices on Android 14 in 5 stores"
    assert (cohort[0].count, cohort[0].device_count, cohort[0].store_count) == (32, 32, 5)
    # a straggler of the same cohort later in the window joins the cohort alert
    straggler = services.alerts_ingest(anomalies=[anomaly(s21[0], 90)])
    assert [a.pk for a in straggler] == [cohort[0].pk]


def test_few_devices_of_a_cohort_stay_device_alerts(world, settings):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "cohort_min_devices": 5}
    fleet, anomaly = world
    devices = DeviceFactory.create_batch(4, fleet=fleet)
    alerts = services.alerts_ingest(anomalies=[anomaly(d, 0) for d in devices])
    assert len(alerts) == 4 and {a.scope for a in alerts} == {AlertScope.DEVICE}


def test_a_large_batch_groups_as_worked_out_by_hand(world, settings):
    """One shuffled batch of 218 results over four cohorts, on top of an earlier batch's alerts: which
    alert each anomaly joins, each alert's counts, severity, title and timeline, and routing."""
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "dedup_window_minutes": 60, "cohort_min_devices": 3}
    fleet, anomaly = world

    def devices(n, manufacturer, model, stores=("",)):
        return [DeviceFactory(fleet=fleet, manufacturer=manufacturer, model=model, os_version="14",
                              store=stores[i % len(stores)]) for i in range(n)]
    a = devices(4, "Samsung", "S21", stores=("s1", "s1", "s2", ""))
    b = devices(2, "Zebra", "TC52")
    c = devices(3, "Honeywell", "CT40")
    d = devices(40, "Apple", "iPad", stores=[f"store-{i}" for i in range(8)])
    # the earlier batch: b[1]'s battery (medium) and thermal device alerts, cohort C's alert
    p1, p2 = [anomaly(b[1], -20, severity=Severity.MEDIUM)], [anomaly(b[1], -5, domain="thermal")]
    p3 = [anomaly(device, -30) for device in c]
    services.alerts_ingest(anomalies=p1 + p2 + p3)
    P1, P2, P3 = (AlertAnomaly.objects.get(anomaly=rows[0]).alert for rows in (p1, p2, p3))
    assert (P1.scope, P2.scope, P3.scope) == (AlertScope.DEVICE, AlertScope.DEVICE, AlertScope.COHORT)
    Alert.objects.filter(pk=P2.pk).update(status=AlertStatus.RESOLVED)
    email_rule(fleet)  # min severity high

    groups = {  # name -> (anomalies of this batch, anomalies it already had)
        # 4 devices within one window: a cohort alert; a[0] at 50 is critical
        "A": ([anomaly(device, 5 * i) for i, device in enumerate(a)]
              + [anomaly(a[0], 50, severity=Severity.CRITICAL)], []),
        # 2 devices of A 150 minutes after its alert: too few for a cohort, too late to join it
        "a0 battery": ([anomaly(a[0], 200)], []),
        "a1 battery": ([anomaly(a[1], 210)], []),
        # 40 devices x 5 within one window, then 2 stragglers within the window of its last_seen (40)
        "D": ([anomaly(device, m) for device in d for m in (0, 10, 20, 30, 40)]
              + [anomaly(device, 70) for device in d[:2]], []),
        # cohort B has 2 devices: device alerts by domain and window
        "b0 battery": ([anomaly(b[0], 0), anomaly(b[0], 30)], []),
        "b0 battery later": ([anomaly(b[0], 100)], []),  # 70 minutes after 30
        "b0 thermal": ([anomaly(b[0], 5, domain="thermal")], []),
        "P1": ([anomaly(b[1], 10)], p1),  # joins the earlier alert (last_seen -20) and escalates it
        "b1 thermal": ([anomaly(b[1], 20, domain="thermal")], []),  # P2 is resolved: a new alert
        "P3": ([anomaly(c[0], 20)], p3),  # one device joins the earlier cohort alert (last_seen -30)
    }
    rescored = AnomalyResultFactory(run=PipelineRunFactory(fleet=fleet), model_version=p3[1].model_version,
                                    device=c[1], timestamp=p3[1].timestamp, top_metrics=metrics("battery"))
    normal = anomaly(a[2], 30, label=Label.NORMAL)
    batch = [row for rows, _ in groups.values() for row in rows] + [rescored, normal]
    random.Random(8).shuffle(batch)
    assert len(batch) == 218

    touched = services.alerts_ingest(anomalies=batch)

    members = defaultdict(set)
    for alert_id, anomaly_id in AlertAnomaly.objects.values_list("alert_id", "anomaly_id"):
        members[alert_id].add(anomaly_id)
    alert_of = {name: AlertAnomaly.objects.get(anomaly=rows[0]).alert for name, (rows, _) in groups.items()}
    for name, (rows, before) in groups.items():
        assert members[alert_of[name].pk] == {r.pk for r in rows + before}, name
    assert (alert_of["P1"].pk, alert_of["P3"].pk) == (P1.pk, P3.pk)
    assert len({alert.pk for alert in alert_of.values()}) == len(groups) == len(touched)
    assert {alert.pk for alert in touched} == {alert.pk for alert in alert_of.values()}
    assert Alert.objects.count() == 3 + len(groups) - 2
    assert not AlertAnomaly.objects.filter(anomaly__in=[rescored, normal]).exists()
    assert [(x.last_seen, x.pk) for x in touched] == sorted(((x.last_seen, x.pk) for x in touched), reverse=True)

    def facts(name):
        x = Alert.objects.get(pk=alert_of[name].pk)
        return (x.scope, x.count, x.device_count, x.store_count, x.severity, x.first_seen, x.last_seen, x.title,
                x.domain, [e.kind for e in x.events.all()])
    at = lambda minute: T0 + dt.timedelta(minutes=minute)
    cohort, device = AlertScope.COHORT, AlertScope.DEVICE
    new, crit, high = ["opened", "notified"], Severity.CRITICAL, Severity.HIGH
    assert facts("A") == (cohort, 5, 4, 2, crit, at(0), at(50),
                          "4 Samsung S21 devices on 14 in 2 stores", "", new)
    assert facts("D") == (cohort, 202, 40, 8, high, at(0), at(70), "40 Apple iPad devices on 14 in 8 stores",
                          "", new)
    assert facts("P3") == (cohort, 4, 3, 0, high, at(-30), at(20), "3 Honeywell CT40 devices on 14", "",
                           ["opened", "grew"])
    b0, b1 = b[0].external_id, b[1].external_id
    assert facts("b0 battery") == (device, 2, 1, 0, high, at(0), at(30), f"Battery anomalies on {b0}",
                                   "battery", new)
    assert facts("b0 battery later")[1:] == (1, 1, 0, high, at(100), at(100), f"Battery anomalies on {b0}",
                                             "battery", new)
    assert facts("b0 thermal")[7:] == (f"Thermal anomalies on {b0}", "thermal", new)
    assert facts("b1 thermal")[7:] == (f"Thermal anomalies on {b1}", "thermal", new)
    assert facts("a0 battery")[7:] == (f"Battery anomalies on {a[0].external_id}", "battery", new)
    assert facts("P1") == (device, 2, 1, 0, high, at(-20), at(10), f"Battery anomalies on {b1}", "battery",
                           ["opened", "grew", "escalated", "notified"])
    assert Alert.objects.get(pk=alert_of["b0 thermal"].pk).cohort == {
        "manufacturer": "Zebra", "model": "TC52", "os_version": "14"}
    assert AlertDelivery.objects.filter(kind=DeliveryKind.SINGLE, status=DeliveryStatus.SENT).count() == 9
    assert services.alerts_ingest(anomalies=batch) == []  # all of it is in alerts now


# --- routing, budget, digest -------------------------------------------------------------------------

def email_rule(fleet, **kw) -> AlertRule:
    kw = {"name": "ops", "min_severity": Severity.HIGH, **kw}
    return AlertRule.objects.create(fleet=fleet, email_to="ops@example.com", **kw)


def test_email_routing_by_severity(world):
    fleet, anomaly = world
    email_rule(fleet)
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0, severity=Severity.MEDIUM)])
    assert mail.outbox == []  # below the rule's minimum severity
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet, external_id="scan-7"), 0,
                                              severity=Severity.CRITICAL)])
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["ops@example.com"]
    assert "CRITICAL" in mail.outbox[0].subject and "scan-7" in mail.outbox[0].subject
    assert AlertDelivery.objects.get().status == DeliveryStatus.SENT


def test_rule_scope_filters_cohort_and_store(world):
    fleet, anomaly = world
    email_rule(fleet, model="TC57")
    email_rule(fleet, name="store-9", store="store-9")
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet, model="TC52", store="store-1"), 0)])
    assert mail.outbox == []
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet, model="TC57", store="store-9"), 0)])
    assert len(mail.outbox) == 2


def test_budget_spent_holds_alerts_for_one_digest(world):
    fleet, anomaly = world
    rule = email_rule(fleet, budget=2, budget_window_minutes=60)
    for i in range(5):
        services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), i)])
    assert len(mail.outbox) == 2
    held = AlertDelivery.objects.filter(rule=rule, status=DeliveryStatus.HELD)
    assert held.count() == 3
    digests = services.digests_send()
    assert len(digests) == 1 and digests[0].alerts.count() == 3
    assert len(mail.outbox) == 3 and mail.outbox[-1].subject == "[Vigil] 3 alerts on shops"
    assert not AlertDelivery.objects.filter(status=DeliveryStatus.HELD).exists()
    assert services.digests_send() == []  # nothing twice


def test_budget_frees_up_after_the_window(world):
    fleet, anomaly = world
    rule = email_rule(fleet, budget=1, budget_window_minutes=60)
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0)])
    AlertDelivery.objects.filter(rule=rule).update(created_at=timezone.now() - dt.timedelta(minutes=61))
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0)])
    assert len(mail.outbox) == 2


def test_quiet_hours_hold_then_digest_after(world):
    fleet, anomaly = world
    now = timezone.now()
    start = (now - dt.timedelta(hours=1)).time()
    end = (now + dt.timedelta(hours=1)).time()
    rule = email_rule(fleet, quiet_start=start, quiet_end=end)
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0)])
    assert mail.outbox == [] and AlertDelivery.objects.get().status == DeliveryStatus.HELD
    assert services.digests_send(now=now) == []  # still quiet
    assert len(services.digests_send(now=now + dt.timedelta(hours=2))) == 1
    assert rule.in_quiet_hours(now) and not rule.in_quiet_hours(now + dt.timedelta(hours=2))


# --- false positives ------------------------------------------------------------------------------------

def test_false_positive_verdicts_suppress_the_alert_and_later_anomalies_stay_quiet(world, django_capture_on_commit_callbacks):
    fleet, anomaly = world
    email_rule(fleet)
    device = DeviceFactory(fleet=fleet)
    a1, a2 = anomaly(device, 0), anomaly(device, 10)
    alert = services.alerts_ingest(anomalies=[a1, a2])[0]
    assert len(mail.outbox) == 1
    reviewer = user_with_role("rita", "reviewer")
    with django_capture_on_commit_callbacks(execute=True):
        feedback_give(anomaly=a1, user=reviewer, verdict=Verdict.FALSE_POSITIVE)
    alert.refresh_from_db()
    assert alert.status == AlertStatus.SUPPRESSED
    assert AuditEvent.objects.filter(action="alert_suppressed", target_id=str(alert.pk)).exists()
    grown = services.alerts_ingest(anomalies=[anomaly(device, 20)])
    assert [a.pk for a in grown] == [alert.pk] and grown[0].status == AlertStatus.SUPPRESSED
    assert len(mail.outbox) == 1  # nothing more sent


def test_a_confirmed_anomaly_reopens_a_suppressed_alert(world, django_capture_on_commit_callbacks):
    fleet, anomaly = world
    a1 = anomaly(DeviceFactory(fleet=fleet), 0)
    alert = services.alerts_ingest(anomalies=[a1])[0]
    with django_capture_on_commit_callbacks(execute=True):
        feedback_give(anomaly=a1, user=user_with_role("x", "reviewer"), verdict=Verdict.FALSE_POSITIVE)
    alert.refresh_from_db()
    assert alert.status == AlertStatus.SUPPRESSED
    with django_capture_on_commit_callbacks(execute=True):
        feedback_give(anomaly=a1, user=user_with_role("y", "reviewer"), verdict=Verdict.TRUE_POSITIVE)
    alert.refresh_from_db()
    assert alert.status == AlertStatus.OPEN
    assert AuditEvent.objects.filter(action="alert_reopened", target_id=str(alert.pk)).exists()


def test_one_bulk_verdict_checks_every_alert_it_touches_once(world, django_capture_on_commit_callbacks):
    fleet, anomaly = world
    first, second = DeviceFactory(fleet=fleet), DeviceFactory(fleet=fleet)
    a1, a2, b1 = anomaly(first, 0), anomaly(first, 10), anomaly(second, 0)
    alert_a, alert_b = services.alerts_ingest(anomalies=[a1, a2, b1])
    outside = anomaly(DeviceFactory(fleet=fleet), 30)  # in no alert
    rita = user_with_role("rita", "reviewer")
    with django_capture_on_commit_callbacks(execute=True):
        feedback_give_many(anomalies=[a1, a2, b1, outside], user=rita, verdict=Verdict.FALSE_POSITIVE)
    alert_a.refresh_from_db(), alert_b.refresh_from_db()
    assert (alert_a.status, alert_b.status) == (AlertStatus.SUPPRESSED, AlertStatus.SUPPRESSED)
    # One suppression event and audit record per alert, not one per verdict.
    for alert in (alert_a, alert_b):
        assert alert.events.filter(kind=AlertEventKind.SUPPRESSED).count() == 1
        assert AuditEvent.objects.filter(action="alert_suppressed", target_id=str(alert.pk)).count() == 1
    with django_capture_on_commit_callbacks(execute=True):
        feedback_give_many(anomalies=[b1], user=user_with_role("tom", "reviewer"), verdict=Verdict.TRUE_POSITIVE)
    alert_a.refresh_from_db(), alert_b.refresh_from_db()
    assert (alert_a.status, alert_b.status) == (AlertStatus.SUPPRESSED, AlertStatus.OPEN)


def test_a_true_positive_keeps_the_alert_open(world, django_capture_on_commit_callbacks):
    fleet, anomaly = world
    device = DeviceFactory(fleet=fleet)
    a1, a2 = anomaly(device, 0), anomaly(device, 10)
    alert = services.alerts_ingest(anomalies=[a1, a2])[0]
    with django_capture_on_commit_callbacks(execute=True):
        feedback_give(anomaly=a1, user=user_with_role("tom", "reviewer"), verdict=Verdict.TRUE_POSITIVE)
        feedback_give(anomaly=a2, user=user_with_role("fay", "reviewer"), verdict=Verdict.FALSE_POSITIVE)
    alert.refresh_from_db()
    assert alert.status == AlertStatus.OPEN


# --- webhooks -------------------------------------------------------------------------------------------

class _Receiver(BaseHTTPRequestHandler):
    answers: list[int] = []
    seen: list[tuple[dict, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((dict(self.headers), body))
        code = type(self).answers.pop(0) if type(self).answers else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.answers, _Receiver.seen = [], []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, _Receiver
    server.shutdown()
    server.server_close()


def webhook_rule(fleet, server) -> AlertRule:
    return AlertRule.objects.create(fleet=fleet, name="hook", min_severity=Severity.LOW, webhook_secret="s3cret",
                                    webhook_url=f"http://127.0.0.1:{server.server_address[1]}/vigil")


def test_webhook_is_signed_json(world, receiver):
    fleet, anomaly = world
    server, handler = receiver
    webhook_rule(fleet, server)
    alert = services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet, external_id="dev-x"), 0)])[0]
    headers, body = handler.seen[0]
    assert json.loads(body)["alert"]["id"] == alert.pk and json.loads(body)["alert"]["device"] == "dev-x"
    timestamp, signature = headers["X-Vigil-Timestamp"], headers["X-Vigil-Signature"]
    assert notifiers.verify_signature("s3cret", timestamp, body, signature)
    assert not notifiers.verify_signature("wrong", timestamp, body, signature)
    assert not notifiers.verify_signature("s3cret", timestamp, body + b" ", signature)
    assert not notifiers.verify_signature("s3cret", str(int(timestamp) - 3600), body, signature)


def test_webhook_retries_then_succeeds(world, receiver):
    fleet, anomaly = world
    server, handler = receiver
    handler.answers = [500, 503]
    webhook_rule(fleet, server)
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0)])
    delivery = AlertDelivery.objects.get()
    assert (delivery.status, delivery.attempts, len(handler.seen)) == (DeliveryStatus.SENT, 3, 3)


def test_webhook_dead_letter_after_max_attempts(world, receiver, settings):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "max_attempts": 3}
    fleet, anomaly = world
    server, handler = receiver
    handler.answers = [500] * 10
    webhook_rule(fleet, server)
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0)])
    delivery = AlertDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.response_status) == (DeliveryStatus.DEAD, 3, 500)
    assert "500" in delivery.last_error and len(handler.seen) == 3


def test_unreachable_webhook_is_recorded(world, settings):
    settings.VIGIL_ALERTS = {**settings.VIGIL_ALERTS, "max_attempts": 1, "webhook_timeout": 1.0}
    fleet, anomaly = world
    AlertRule.objects.create(fleet=fleet, name="gone", webhook_url="http://127.0.0.1:9/nothing", webhook_secret="x")
    services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0)])
    delivery = AlertDelivery.objects.get()
    assert delivery.status == DeliveryStatus.DEAD and "unreachable" in delivery.last_error


def test_digest_webhook_lists_alerts(world, receiver):
    fleet, anomaly = world
    server, handler = receiver
    rule = webhook_rule(fleet, server)
    rule.budget = 1
    rule.save()
    for _ in range(3):
        services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0)])
    services.digests_send()
    body = json.loads(handler.seen[-1][1])
    assert body["kind"] == "digest" and body["count"] == 2
    assert AlertDelivery.objects.filter(kind=DeliveryKind.DIGEST, status=DeliveryStatus.SENT).count() == 1


# --- reviewer actions -----------------------------------------------------------------------------------

def test_acknowledge_resolve_snooze_are_audited_and_checked(world):
    fleet, anomaly = world
    alert = services.alerts_ingest(anomalies=[anomaly(DeviceFactory(fleet=fleet), 0)])[0]
    user = user_with_role("rev", "reviewer")
    alert = services.alert_acknowledge(alert=alert, user=user)
    assert (alert.status, alert.acknowledged_by) == (AlertStatus.ACKNOWLEDGED, user)
    with pytest.raises(services.AlertActionError, match="status"):
        services.alert_acknowledge(alert=alert, user=user)
    with pytest.raises(services.AlertActionError, match="minutes"):
        services.alert_snooze(alert=alert, user=user, minutes=0)
    alert = services.alert_snooze(alert=alert, user=user, minutes=60)
    assert alert.snoozed_now
    alert = services.alert_resolve(alert=alert, user=user, reason="battery swapped")
    assert alert.status == AlertStatus.RESOLVED
    actions = list(AuditEvent.objects.filter(target_id=str(alert.pk)).values_list("action", flat=True))
    assert sorted(actions) == ["alert_acknowledged", "alert_resolved", "alert_snoozed"]
    assert [e.kind for e in alert.events.all()] == ["opened", "acknowledged", "snoozed", "resolved"]


def test_snoozed_alert_is_not_routed_on_escalation(world):
    fleet, anomaly = world
    email_rule(fleet, min_severity=Severity.LOW)
    device = DeviceFactory(fleet=fleet)
    alert = services.alerts_ingest(anomalies=[anomaly(device, 0, severity=Severity.LOW)])[0]
    assert len(mail.outbox) == 1
    services.alert_snooze(alert=alert, user=user_with_role("s", "reviewer"), minutes=120)
    services.alerts_ingest(anomalies=[anomaly(device, 5, severity=Severity.CRITICAL)])
    alert.refresh_from_db()
    assert alert.severity == Severity.CRITICAL and len(mail.outbox) == 1


def test_escalation_routes_again(world):
    fleet, anomaly = world
    email_rule(fleet, min_severity=Severity.HIGH)
    device = DeviceFactory(fleet=fleet)
    services.alerts_ingest(anomalies=[anomaly(device, 0, severity=Severity.LOW)])
    assert mail.outbox == []
    services.alerts_ingest(anomalies=[anomaly(device, 5, severity=Severity.CRITICAL)])
    assert len(mail.outbox) == 1 and "escalated" in [e.kind for e in Alert.objects.get().events.all()]


def test_a_sample_judged_a_false_positive_raises_no_alert_when_a_later_run_flags_it_again(world):
    """The earlier anomaly was never alerted (reviewed from the anomaly list), then a later run
    re-scores the sample and the verdict is carried onto the new anomaly (feedback_carry_over)."""
    fleet, anomaly = world
    device = DeviceFactory(fleet=fleet)
    reviewer = user_with_role("rita", "reviewer")
    earlier, confirmed = anomaly(device, 0), anomaly(device, 400)
    feedback_give(anomaly=earlier, user=reviewer, verdict=Verdict.FALSE_POSITIVE)
    feedback_give(anomaly=confirmed, user=reviewer, verdict=Verdict.FALSE_POSITIVE)
    feedback_give(anomaly=confirmed, user=user_with_role("sam", "reviewer"), verdict=Verdict.TRUE_POSITIVE)
    rerun = PipelineRunFactory(fleet=fleet)
    again = AnomalyResultFactory(run=rerun, model_version=earlier.model_version, device=device,
                                 timestamp=earlier.timestamp, top_metrics=metrics("battery"))
    from detection.services import feedback_carry_over

    assert feedback_carry_over(run=rerun) == 1
    assert services.alerts_ingest(anomalies=[again]) == []
    # A false positive that another reviewer confirmed as true is still news.
    assert len(services.alerts_ingest(anomalies=[confirmed])) == 1
    # A new, unreviewed anomaly still alerts.
    assert len(services.alerts_ingest(anomalies=[anomaly(device, 800)])) == 1
