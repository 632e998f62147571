"""Writes for the alerts app: turning anomalies into alerts (dedup, cohort aggregation), routing them to
rules and channels under a budget, digests, delivery with retries, reviewer actions, rule changes.

Entry points called from elsewhere:
- alerts_ingest(anomalies=...): the pipeline (via run_persisted) and the live stream consumer.
- alerts_on_feedback(feedback=...): detection.services.feedback_give, after its transaction commits.
- run_persisted(run=...): detection.services._persist, after the run's results commit.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Exists, F, OuterRef
from django.utils import timezone
from django.utils.translation import ngettext

from detection.choices import AuditAction, Label, Verdict
from detection.errors import InputError
from detection.ingest.bulk import bulk_insert
from detection.models import DEFAULT_COHORT_COLUMNS, AnomalyFeedback, AnomalyResult, Device, Fleet
from detection.services import audit_record

from .choices import (
    ACTIVE_STATUSES,
    AlertEventKind,
    AlertScope,
    AlertStatus,
    DeliveryKind,
    DeliveryStatus,
    severity_rank,
)
from .models import Alert, AlertAnomaly, AlertDelivery, AlertEvent, AlertRule

logger = logging.getLogger(__name__)


class AlertActionError(InputError):
    """An alert action that cannot happen (wrong status, bad snooze time); field names the input at fault."""


def _config() -> dict:
    return settings.VIGIL_ALERTS


def _cohort_key(fleet: Fleet, device) -> tuple[tuple[str, str], ...]:
    columns = fleet.cohort_columns or DEFAULT_COHORT_COLUMNS
    return tuple((c, str(getattr(device, c, "") or "")) for c in columns)


def _cohort_title(cohort: dict, n_devices: int, n_stores: int) -> str:
    if {"manufacturer", "model", "os_version"} <= cohort.keys():
        what = f"{n_devices} {cohort['manufacturer']} {cohort['model']} devices on {cohort['os_version']}"
    else:
        what = f"{n_devices} devices of cohort {' '.join(v for v in cohort.values() if v) or 'unknown'}"
    if n_stores:
        what += f" in {n_stores} {ngettext('store', 'stores', n_stores)}"
    return what


def _device_title(device, domain: str) -> str:
    return f"{domain.replace('_', ' ').capitalize()} anomalies on {device.external_id}"


# --- ingest ------------------------------------------------------------------------------------------

class _Row:
    """The columns of one anomaly (AnomalyResult, label -1) that ingest reads: no model instance, and
    no device or fleet row per anomaly."""

    __slots__ = ("device_id", "fleet_id", "pk", "severity", "timestamp", "top_metrics")

    def __init__(self, pk, fleet_id, device_id, timestamp, severity, top_metrics):
        self.pk, self.fleet_id, self.device_id = pk, fleet_id, device_id
        self.timestamp, self.severity, self.top_metrics = timestamp, severity, top_metrics


def alerts_ingest(*, anomalies: list[AnomalyResult], now: dt.datetime | None = None) -> list[Alert]:
    """Group anomalies (AnomalyResult rows with label -1; others are ignored) into alerts; return the
    alerts that were opened or grew, newest activity first.

    Dedup: an anomaly joins the active (or suppressed) alert of its device and metric domain
    (top_metrics[0].domain) whose last_seen is within VIGIL_ALERTS["dedup_window_minutes"] of it.
    Aggregation: when at least VIGIL_ALERTS["cohort_min_devices"] devices of one cohort (the fleet's
    cohort_columns) have anomalies within one window, they become one cohort-level alert, and later
    anomalies of that cohort within the window join it. An anomaly joins at most one alert, and a
    (device, timestamp) already in an alert (the same moment re-scored by a later run) is skipped, so
    calling this twice is harmless. An anomaly that already carries a false-positive verdict and no
    true-positive one (a reviewed sample re-scored by a later run) raises no alert. New and escalated
    alerts are routed to the matching rules (route_alert) after commit; every touched alert is pushed
    to open pages.

    Cost: the anomalies are read as plain columns (one query), their devices and fleets once each, before
    the transaction; inside it, one query per fleet for the rescored moments and one per scope for the
    candidate alerts (locked), then bulk inserts (new alerts, memberships, events) and one UPDATE per
    grown alert, so a batch of thousands of anomalies holds the database's write lock for a few queries,
    not one per anomaly.
    """
    now = now or timezone.now()
    ids = [a.pk for a in anomalies if a.pk is not None and a.label == Label.ANOMALY]
    if not ids:
        return []
    window = dt.timedelta(minutes=_config()["dedup_window_minutes"])
    min_devices = max(2, _config()["cohort_min_devices"])
    rows = [_Row(*values) for values in
            AnomalyResult.objects.filter(pk__in=ids, label=Label.ANOMALY, alert_membership__isnull=True)
            .exclude(_judged_false_positive())
            .order_by("timestamp", "id")
            .values_list("pk", "fleet_id", "device_id", "timestamp", "severity", "top_metrics")]
    if not rows:
        return []
    by_fleet: dict[int, list[_Row]] = defaultdict(list)
    for row in rows:
        by_fleet[row.fleet_id].append(row)
    fleets = Fleet.objects.in_bulk(list(by_fleet))
    devices = Device.objects.in_bulk(sorted({row.device_id for row in rows}))
    touched: dict[int, Alert] = {}
    with transaction.atomic():
        for fleet_id, fleet_rows in by_fleet.items():
            fleet = fleets[fleet_id]
            fleet_rows = _drop_rescored(fleet, fleet_rows)
            _ingest_fleet(fleet, fleet_rows, devices, window, min_devices, touched)
    return sorted(touched.values(), key=lambda a: (a.last_seen, a.pk), reverse=True)


def _judged_false_positive():
    """An AnomalyResult filter: reviewers already called it a false positive and nobody a true one.
    A run that re-scores a reviewed sample carries the verdicts onto the new anomaly in the same
    transaction (detection.services.feedback_carry_over), so a sample judged a false positive in an
    earlier run raises no alert when a later run flags it again."""
    verdicts = AnomalyFeedback.objects.filter(anomaly=OuterRef("pk"))
    return Exists(verdicts.filter(verdict=Verdict.FALSE_POSITIVE)) & ~Exists(
        verdicts.filter(verdict=Verdict.TRUE_POSITIVE))


def _drop_rescored(fleet: Fleet, rows: list[_Row]) -> list[_Row]:
    if not rows:
        return rows
    seen = set(AlertAnomaly.objects.filter(alert__fleet=fleet, anomaly__timestamp__gte=rows[0].timestamp,
                                           anomaly__timestamp__lte=rows[-1].timestamp)
               .values_list("anomaly__device_id", "anomaly__timestamp"))
    return [r for r in rows if (r.device_id, r.timestamp) not in seen]


class _Growth:
    """What one ingest call adds to one alert (new or existing)."""

    def __init__(self, alert: Alert, created: bool):
        self.alert, self.created = alert, created
        self.severity_before = alert.severity if not created else ""
        self.anomalies: list[_Row] = []

    def add(self, anomaly: _Row) -> None:
        self.anomalies.append(anomaly)
        alert = self.alert
        alert.first_seen = min(alert.first_seen, anomaly.timestamp)
        alert.last_seen = max(alert.last_seen, anomaly.timestamp)
        # the higher-ranked of the two non-blank severities, the alert's on a tie, "low" when both are blank
        if anomaly.severity and (not alert.severity
                                 or severity_rank(anomaly.severity) > severity_rank(alert.severity)):
            alert.severity = anomaly.severity
        elif not alert.severity:
            alert.severity = "low"


def _ingest_fleet(fleet: Fleet, rows: list[_Row], devices: dict, window: dt.timedelta, min_devices: int,
                  touched: dict[int, Alert]) -> None:
    """Plan one fleet's growth in memory against its candidate alerts (locked), then write it in bulk."""
    if not rows:
        return
    growths: list[_Growth] = []  # in the order the alerts are opened or first grown
    growth_of: dict[int, _Growth] = {}  # id(alert) -> its growth
    statuses = (*ACTIVE_STATUSES, AlertStatus.SUPPRESSED)
    cohort_keys: dict[int, tuple] = {}  # device pk -> cohort key, read once per device

    def cohort_key(device_id: int) -> tuple:
        key = cohort_keys.get(device_id)
        if key is None:
            key = cohort_keys[device_id] = _cohort_key(fleet, devices[device_id])
        return key

    def grow(alert: Alert, created: bool) -> _Growth:
        g = growth_of.get(id(alert))
        if g is None:
            g = growth_of[id(alert)] = _Growth(alert, created=created)
            growths.append(g)
        return g

    # 1. cohorts firing together: sweep each cohort's anomalies in windows from the first one's time.
    # A cohort's candidate is its active alert of latest last_seen; one older than the first anomaly's
    # window can join no chunk, so only those within it are read.
    by_cohort: dict[tuple, list[_Row]] = defaultdict(list)
    for row in rows:
        by_cohort[cohort_key(row.device_id)].append(row)
    cohort_alerts = list(Alert.objects.select_for_update()
                         .filter(fleet=fleet, scope=AlertScope.COHORT, status__in=statuses,
                                 last_seen__gte=rows[0].timestamp - window).order_by("-last_seen", "-id"))
    leftover: list[_Row] = []
    for key, cohort_rows in by_cohort.items():
        cohort = dict(key)
        existing = next((a for a in cohort_alerts if a.cohort == cohort), None)
        start = 0
        while start < len(cohort_rows):
            t0 = cohort_rows[start].timestamp
            end = start
            while end < len(cohort_rows) and cohort_rows[end].timestamp < t0 + window:
                end += 1
            chunk = cohort_rows[start:end]
            chunk_devices = {r.device_id for r in chunk}
            joins_existing = existing is not None and existing.last_seen >= t0 - window
            if joins_existing or len(chunk_devices) >= min_devices:
                if not joins_existing:
                    existing = Alert(fleet=fleet, scope=AlertScope.COHORT, cohort=cohort, severity="low",
                                     first_seen=t0, last_seen=t0, count=0, title="")
                    g = grow(existing, created=True)
                else:
                    g = grow(existing, created=False)
                for r in chunk:
                    g.add(r)
            else:
                leftover.extend(chunk)
            start = end

    # 2. the rest by device and metric domain. A (device, domain)'s candidate is its active alert of
    # latest last_seen (as stored) within the window of the anomaly; the anomalies of one device come
    # in time order, so once it is passed, no other stored alert of that key can qualify.
    candidates: dict[tuple, tuple[Alert, dt.datetime]] = {}
    if leftover:
        for alert in (Alert.objects.select_for_update()
                      .filter(fleet=fleet, scope=AlertScope.DEVICE, status__in=statuses,
                              device_id__in=sorted({r.device_id for r in leftover}),
                              last_seen__gte=min(r.timestamp for r in leftover) - window)
                      .order_by("-last_seen", "-id")):
            candidates.setdefault((alert.device_id, alert.domain), (alert, alert.last_seen))
    current: dict[tuple, _Growth] = {}
    for row in leftover:
        domain = _domain_of(row.top_metrics)
        key = (row.device_id, domain)
        g = current.get(key)
        if g is None or g.alert.last_seen < row.timestamp - window:
            found = candidates.get(key)
            if found is not None and found[1] >= row.timestamp - window:
                g = grow(found[0], created=False)
            else:
                device = devices[row.device_id]
                alert = Alert(fleet=fleet, scope=AlertScope.DEVICE, device=device, domain=domain,
                              cohort=dict(cohort_key(row.device_id)), severity="low",
                              first_seen=row.timestamp, last_seen=row.timestamp, count=0,
                              title=_device_title(device, domain))
                g = grow(alert, created=True)
            current[key] = g
        g.add(row)

    _apply_growth(fleet, growths, devices)
    for g in growths:
        touched[g.alert.pk] = g.alert


def _domain_of(top_metrics) -> str:
    top = top_metrics or []
    if top and isinstance(top[0], dict):
        return str(top[0].get("domain") or top[0].get("metric") or "other")[:50]
    return "other"


def _apply_growth(fleet: Fleet, growths: list[_Growth], devices: dict) -> None:
    """Write one fleet's growth: new alerts and memberships in bulk, counts, cohort device and store counts
    and titles, then the grown alerts' changed columns in one update, the timeline events, routing and
    pushes (after commit)."""
    if not growths:
        return
    new = [g for g in growths if g.created]
    grown = [g for g in growths if not g.created]
    for g in new:
        alert = g.alert
        alert.count = len(g.anomalies)
        if alert.scope == AlertScope.COHORT:
            pairs = {(r.device_id, devices[r.device_id].store) for r in g.anomalies}
            _set_cohort_counts(alert, pairs)
    Alert.objects.bulk_create([g.alert for g in new])
    added_at = timezone.now()  # memberships: plain rows (COPY / executemany), no instance per anomaly
    bulk_insert(AlertAnomaly, ["alert_id", "anomaly_id", "added_at"],
                ((g.alert.pk, r.pk, added_at) for g in growths for r in g.anomalies))
    if grown:
        grown_ids = [g.alert.pk for g in grown]
        counts = dict(AlertAnomaly.objects.filter(alert_id__in=grown_ids).order_by()
                      .values_list("alert_id").annotate(n=Count("id")))
        cohort_ids = [g.alert.pk for g in grown if g.alert.scope == AlertScope.COHORT]
        members: dict[int, set] = defaultdict(set)
        if cohort_ids:
            for alert_id, device_id, store in (AlertAnomaly.objects.filter(alert_id__in=cohort_ids).order_by()
                                               .values_list("alert_id", "anomaly__device_id",
                                                            "anomaly__device__store").distinct()):
                members[alert_id].add((device_id, store))
        updated_at = timezone.now()
        for g in grown:
            alert = g.alert
            alert.count = counts.get(alert.pk, 0)
            if alert.scope == AlertScope.COHORT:
                _set_cohort_counts(alert, members[alert.pk])
            alert.updated_at = updated_at
        # one UPDATE of the changed columns per grown alert: bulk_update's CASE WHEN per column took ~30 ms
        # for 5-7 alerts on SQLite in benchmarks/stream.py, these took ~0.5 ms each
        for g in grown:
            alert = g.alert
            Alert.objects.filter(pk=alert.pk).update(
                first_seen=alert.first_seen, last_seen=alert.last_seen, severity=alert.severity, count=alert.count,
                device_count=alert.device_count, store_count=alert.store_count, title=alert.title,
                updated_at=alert.updated_at)
    events, to_route = [], []
    for g in growths:
        alert = g.alert
        if g.created:
            events.append(_new_event(alert, AlertEventKind.OPENED,
                                     f"{len(g.anomalies)} {_noun(len(g.anomalies))}, severity {alert.severity}"))
        else:
            events.append(_new_event(alert, AlertEventKind.GREW,
                                     f"{len(g.anomalies)} more {_noun(len(g.anomalies))} (now {alert.count})"))
        escalated = not g.created and severity_rank(alert.severity) > severity_rank(g.severity_before)
        if escalated:
            events.append(_new_event(alert, AlertEventKind.ESCALATED, f"{g.severity_before} -> {alert.severity}"))
        if (g.created or escalated) and alert.status == AlertStatus.OPEN:
            to_route.append(alert)
    AlertEvent.objects.bulk_create(events)
    if to_route and AlertRule.objects.filter(fleet=fleet, enabled=True).exists():
        for alert in to_route:
            route_alert(alert=alert)
    for g in growths:
        _push_on_commit(g.alert)


def _set_cohort_counts(alert: Alert, members: set[tuple[int, str]]) -> None:
    """device_count, store_count and title of a cohort alert from its (device pk, store) pairs."""
    alert.device_count = len({device_id for device_id, _ in members})
    alert.store_count = len({store for _, store in members if store})
    alert.title = _cohort_title(alert.cohort, alert.device_count, alert.store_count)


def _new_event(alert: Alert, kind: str, message: str = "", actor_label: str = "system") -> AlertEvent:
    return AlertEvent(alert=alert, kind=kind, message=message[:500], actor_label=actor_label[:150])


def _noun(count: int) -> str:
    return ngettext("anomaly", "anomalies", count)


def _event(alert: Alert, kind: str, message: str = "", actor_label: str = "system") -> AlertEvent:
    return AlertEvent.objects.create(alert=alert, kind=kind, message=message[:500],
                                     actor_label=actor_label[:150])


def _push_on_commit(alert: Alert) -> None:
    from detection.push import push_alert

    transaction.on_commit(lambda: push_alert(alert))


# --- routing, budget, digests ------------------------------------------------------------------------

def rule_matches(rule: AlertRule, alert: Alert) -> bool:
    """Whether rule covers alert: enabled, severity at least min_severity, and every scope filter set on the
    rule matches (cohort fields against the alert's cohort; store and device against its devices)."""
    if not rule.enabled or severity_rank(alert.severity) < severity_rank(rule.min_severity):
        return False
    for column in ("manufacturer", "model", "os_version"):
        wanted = getattr(rule, column)
        if wanted and alert.cohort.get(column) != wanted:
            return False
    members = AlertAnomaly.objects.filter(alert=alert)
    if rule.store and not members.filter(anomaly__device__store=rule.store).exists():
        return False
    if rule.device_external_id and not members.filter(
            anomaly__device__external_id=rule.device_external_id).exists():
        return False
    return True


def budget_used(*, rule: AlertRule, channel: str, now: dt.datetime) -> int:
    """Single messages of rule on channel queued or sent within the rule's budget window before now."""
    since = now - dt.timedelta(minutes=rule.budget_window_minutes)
    spent = AlertDelivery.objects.filter(rule=rule, channel=channel, kind=DeliveryKind.SINGLE, created_at__gt=since)
    return spent.exclude(status__in=[DeliveryStatus.HELD, DeliveryStatus.DIGESTED]).count()


def route_alert(*, alert: Alert, now: dt.datetime | None = None) -> list[AlertDelivery]:
    """Queue one delivery per matching rule and channel. Within budget and outside quiet hours it is sent
    (Celery, after commit); otherwise it is held for the next digest. A snoozed alert is not routed.
    Rules are locked while counting, so two concurrent ingests cannot both spend the last message."""
    now = now or timezone.now()
    if alert.is_snoozed(now) or alert.status != AlertStatus.OPEN:
        return []
    deliveries = []
    with transaction.atomic():
        for rule in AlertRule.objects.select_for_update().filter(fleet_id=alert.fleet_id, enabled=True):
            if not rule_matches(rule, alert):
                continue
            for channel in rule.channels:
                quiet = rule.in_quiet_hours(now)
                held = quiet or budget_used(rule=rule, channel=channel, now=now) >= rule.budget
                delivery = AlertDelivery.objects.create(
                    rule=rule, alert=alert, channel=channel, kind=DeliveryKind.SINGLE,
                    status=DeliveryStatus.HELD if held else DeliveryStatus.PENDING)
                why = "quiet hours" if quiet else "budget spent"
                _event(alert, AlertEventKind.HELD if held else AlertEventKind.NOTIFIED,
                       f"{channel} via rule {rule.name}" + (f" ({why})" if held else ""))
                if not held:
                    _enqueue_delivery(delivery)
                deliveries.append(delivery)
    return deliveries


def _enqueue_delivery(delivery: AlertDelivery) -> None:
    from .tasks import send_delivery_task

    transaction.on_commit(lambda: send_delivery_task.delay(delivery.pk))


def digests_send(*, now: dt.datetime | None = None) -> list[AlertDelivery]:
    """Turn each (rule, channel)'s held deliveries into one digest delivery (sent after commit), unless the
    rule is in quiet hours. Held deliveries are claimed with a conditional update, so two digest runs never
    send the same alert twice. Returns the digests created."""
    now = now or timezone.now()
    digests = []
    pairs = (AlertDelivery.objects.filter(status=DeliveryStatus.HELD).values_list("rule_id", "channel")
             .distinct().order_by())
    for rule_id, channel in set(pairs):
        rule = AlertRule.objects.filter(pk=rule_id, enabled=True).first()
        if rule is None or rule.in_quiet_hours(now):
            continue
        with transaction.atomic():
            held = list(AlertDelivery.objects.filter(rule=rule, channel=channel, status=DeliveryStatus.HELD)
                        .values_list("pk", "alert_id"))
            claimed = AlertDelivery.objects.filter(pk__in=[pk for pk, _ in held], status=DeliveryStatus.HELD
                                                   ).update(status=DeliveryStatus.DIGESTED)
            if not claimed:
                continue
            alert_ids = {a for _, a in held if a is not None}
            live = list(Alert.objects.filter(pk__in=alert_ids).exclude(status=AlertStatus.SUPPRESSED)
                        .values_list("pk", flat=True))
            if not live:
                continue
            digest = AlertDelivery.objects.create(rule=rule, channel=channel, kind=DeliveryKind.DIGEST)
            digest.alerts.set(live)
            _enqueue_delivery(digest)
            digests.append(digest)
    return digests


def delivery_send(*, delivery_id: int) -> AlertDelivery:
    """One attempt to send a pending or failed delivery (claimed by a conditional update, so a duplicate
    task does nothing). Success -> sent; failure -> failed, or dead (the dead letter) once
    VIGIL_ALERTS["max_attempts"] attempts have failed; the error is kept in last_error."""
    from . import notifiers

    sendable = [DeliveryStatus.PENDING, DeliveryStatus.FAILED]
    claimed = AlertDelivery.objects.filter(pk=delivery_id, status__in=sendable).update(
        status=DeliveryStatus.SENDING, attempts=F("attempts") + 1)
    delivery = AlertDelivery.objects.select_related("rule__fleet", "alert").get(pk=delivery_id)
    if claimed != 1:
        return delivery
    try:
        delivery.response_status = notifiers.send(delivery)
    except notifiers.DeliveryError as exc:
        dead = delivery.attempts >= _config()["max_attempts"]
        delivery.status = DeliveryStatus.DEAD if dead else DeliveryStatus.FAILED
        delivery.last_error = str(exc)[:2000]
        delivery.response_status = exc.status
        delivery.save(update_fields=["status", "last_error", "response_status"])
        if dead:
            logger.warning("delivery %s is dead after %s attempts: %s", delivery.pk, delivery.attempts, exc)
        return delivery
    delivery.status = DeliveryStatus.SENT
    delivery.sent_at = timezone.now()
    delivery.last_error = ""
    delivery.save(update_fields=["status", "sent_at", "last_error", "response_status"])
    return delivery


# --- hooks from detection ----------------------------------------------------------------------------

def run_persisted(*, run) -> None:
    """After a pipeline run's results commit: a production run's recent anomalies become alerts (a Celery
    task, by run id); a candidate made by a retrain is promoted when the fleet's config says auto_promote."""
    from .tasks import ingest_run_task

    if run.params.get("candidate"):
        from .health import retrain_finished

        retrain_finished(run=run)
        return
    ingest_run_task.delay(run.pk)


def alerts_ingest_run(*, run_id: int) -> list[Alert]:
    """alerts_ingest on a run's anomalies within VIGIL_ALERTS["run_lookback_hours"] of its newest scored
    sample (older ones are history, not news)."""
    from django.db.models import Max

    newest = AnomalyResult.objects.filter(run_id=run_id).aggregate(t=Max("timestamp"))["t"]
    if newest is None:
        return []
    since = newest - dt.timedelta(hours=_config().get("run_lookback_hours", 24))
    anomalies = list(AnomalyResult.objects.filter(run_id=run_id, label=Label.ANOMALY, timestamp__gte=since))
    return alerts_ingest(anomalies=anomalies)


def alerts_on_feedback(*, feedback: AnomalyFeedback) -> Alert | None:
    """Suppress the feedback's alert once reviewers call its anomalies false positives: at least one false
    positive, no true positive, and false positives make up at least VIGIL_ALERTS["fp_suppress_share"] of
    the reviewed anomalies; a suppressed alert reopens when one of its anomalies is confirmed a true
    positive. Returns the alert (None when the anomaly is in none)."""
    membership = AlertAnomaly.objects.filter(anomaly_id=feedback.anomaly_id).select_related("alert").first()
    if membership is None:
        return None
    alert = membership.alert
    if alert.status not in (*ACTIVE_STATUSES, AlertStatus.SUPPRESSED):
        return alert
    verdicts = defaultdict(set)
    for anomaly_id, verdict in AnomalyFeedback.objects.filter(anomaly__alert_membership__alert=alert
                                                              ).values_list("anomaly_id", "verdict"):
        verdicts[anomaly_id].add(verdict)
    true_pos = sum(Verdict.TRUE_POSITIVE in v for v in verdicts.values())
    false_pos = sum(Verdict.FALSE_POSITIVE in v and Verdict.TRUE_POSITIVE not in v for v in verdicts.values())
    if alert.status == AlertStatus.SUPPRESSED:
        if true_pos:  # a reviewer confirmed one: the alert is real after all
            _reopen(alert, feedback)
        return alert
    if true_pos or not false_pos or false_pos < _config()["fp_suppress_share"] * len(verdicts):
        return alert
    with transaction.atomic():
        updated = Alert.objects.filter(pk=alert.pk, status__in=ACTIVE_STATUSES).update(
            status=AlertStatus.SUPPRESSED, updated_at=timezone.now())
        if updated:
            alert.status = AlertStatus.SUPPRESSED
            _event(alert, AlertEventKind.SUPPRESSED,
                   f"{false_pos} of {len(verdicts)} reviewed anomalies are false positives",
                   actor_label=feedback.user.get_username())
            audit_record(action="alert_suppressed", actor=feedback.user, fleet=alert.fleet, target=alert,
                         before={"status": "open"}, after={"status": AlertStatus.SUPPRESSED},
                         reason=f"{false_pos} false positive verdicts, no true positive")
            AlertDelivery.objects.filter(alert=alert, status=DeliveryStatus.HELD).update(
                status=DeliveryStatus.DIGESTED)
            _push_on_commit(alert)
    return alert


def alerts_on_feedback_many(*, feedback: list[AnomalyFeedback]) -> list[Alert]:
    """alerts_on_feedback once per alert for a batch of verdicts (detection.services.feedback_give_many):
    one membership query for the batch, then one check per distinct alert with the batch's verdicts all
    counted. Returns the alerts checked, in the order their first anomaly appears in feedback."""
    alert_of = dict(AlertAnomaly.objects.filter(anomaly_id__in=[f.anomaly_id for f in feedback]
                                                ).values_list("anomaly_id", "alert_id"))
    first: dict[int, AnomalyFeedback] = {}
    for item in feedback:
        if item.anomaly_id in alert_of:
            first.setdefault(alert_of[item.anomaly_id], item)
    checked = []
    for item in first.values():
        alert = alerts_on_feedback(feedback=item)
        if alert is not None:
            checked.append(alert)
    return checked


def _reopen(alert: Alert, feedback: AnomalyFeedback) -> None:
    with transaction.atomic():
        if Alert.objects.filter(pk=alert.pk, status=AlertStatus.SUPPRESSED).update(
                status=AlertStatus.OPEN, updated_at=timezone.now()):
            alert.status = AlertStatus.OPEN
            _event(alert, AlertEventKind.OPENED, "reopened: a reviewer marked an anomaly a true positive",
                   actor_label=feedback.user.get_username())
            audit_record(action="alert_reopened", actor=feedback.user, fleet=alert.fleet, target=alert,
                         before={"status": AlertStatus.SUPPRESSED}, after={"status": AlertStatus.OPEN},
                         reason=f"true positive verdict on anomaly {feedback.anomaly_id}")
            _push_on_commit(alert)


# --- reviewer actions ----------------------------------------------------------------------------------

def alert_acknowledge(*, alert: Alert, user) -> Alert:
    """Open -> acknowledged (who and when kept). Raises AlertActionError("status") otherwise."""
    return _transition(alert, user, frm=(AlertStatus.OPEN,), to=AlertStatus.ACKNOWLEDGED,
                       action=AuditAction.ALERT_ACKNOWLEDGED, kind=AlertEventKind.ACKNOWLEDGED)


def alert_resolve(*, alert: Alert, user, reason: str = "") -> Alert:
    """Open, acknowledged or suppressed -> resolved. Later anomalies open a new alert."""
    return _transition(alert, user, frm=(*ACTIVE_STATUSES, AlertStatus.SUPPRESSED), to=AlertStatus.RESOLVED,
                       action=AuditAction.ALERT_RESOLVED, kind=AlertEventKind.RESOLVED, reason=reason)


SNOOZE_MAX = dt.timedelta(days=30)


def alert_snooze(*, alert: Alert, user, until: dt.datetime | None = None, minutes: int | None = None) -> Alert:
    """Mute an active alert's notifications until a time (aware datetime) or for minutes (1 .. 30 days).
    Raises AlertActionError naming "until"/"minutes" for a time in the past or too far ahead, "status" when
    the alert is not open or acknowledged."""
    now = timezone.now()
    if until is None:
        if minutes is None:
            raise AlertActionError("minutes", "give minutes or until")
        try:
            minutes = int(minutes)
        except (TypeError, ValueError):
            raise AlertActionError("minutes", f"{minutes!r} is not a whole number") from None
        if not 0 < minutes <= SNOOZE_MAX.total_seconds() / 60:
            raise AlertActionError("minutes", f"must be between 1 and {int(SNOOZE_MAX.total_seconds() // 60)}")
        until = now + dt.timedelta(minutes=minutes)
    elif timezone.is_naive(until):
        raise AlertActionError("until", "needs a time zone")
    if until <= now or until - now > SNOOZE_MAX:
        raise AlertActionError("until" if minutes is None else "minutes",
                               "must lie between now and 30 days ahead")
    with transaction.atomic():
        locked = Alert.objects.select_for_update().get(pk=alert.pk)
        if locked.status not in ACTIVE_STATUSES:
            raise AlertActionError("status", f"alert {alert.pk} is {locked.status}; only an active one can be "
                                              "snoozed")
        before = locked.snoozed_until.isoformat() if locked.snoozed_until else None
        locked.snoozed_until = until
        locked.save(update_fields=["snoozed_until", "updated_at"])
        _event(locked, AlertEventKind.SNOOZED, f"until {until:%Y-%m-%d %H:%M} UTC",
               actor_label=user.get_username())
        audit_record(action=AuditAction.ALERT_SNOOZED, actor=user, fleet=locked.fleet, target=locked,
                     before={"snoozed_until": before}, after={"snoozed_until": until.isoformat()})
        _push_on_commit(locked)
    return locked


def alert_review(*, alert: Alert, user, verdict: str, comment: str = "") -> int:
    """One verdict on every anomaly of the alert (detection.services.feedback_give_many: all or none),
    with a timeline event and an audit record in the same transaction. Returns the number of anomalies
    reviewed. The verdicts then act as any others (alerts_on_feedback: false positives suppress the alert,
    a true positive reopens a suppressed one). Raises AlertActionError naming the field ("anomalies" past
    detection.services.FEEDBACK_BULK_MAX, "verdict", "comment")."""
    from detection.services import FeedbackError, feedback_give_many

    anomalies = list(alert.anomalies.select_related("fleet", "device").order_by("timestamp", "id"))
    try:
        with transaction.atomic():
            done = feedback_give_many(anomalies=anomalies, user=user, verdict=verdict, comment=comment)
            label = Verdict(verdict).label.lower()
            _event(alert, AlertEventKind.REVIEWED, f"{len(done)} {_noun(len(done))} marked {label}"
                   + (f": {comment.strip()}" if comment.strip() else ""), actor_label=user.get_username())
            audit_record(action=AuditAction.ALERT_REVIEWED, actor=user, fleet=alert.fleet, target=alert,
                         after={"verdict": verdict, "anomalies": len(done)}, reason=comment.strip()[:500])
    except FeedbackError as exc:
        raise AlertActionError(exc.field, exc.message) from None
    return len(done)


def _transition(alert: Alert, user, *, frm: tuple, to: str, action: str, kind: str, reason: str = "") -> Alert:
    now = timezone.now()
    with transaction.atomic():
        locked = Alert.objects.select_for_update().get(pk=alert.pk)
        if locked.status not in frm:
            raise AlertActionError("status", f"alert {alert.pk} is {locked.status}; cannot change it to {to}")
        before = locked.status
        locked.status = to
        if to == AlertStatus.ACKNOWLEDGED:
            locked.acknowledged_by, locked.acknowledged_at = user, now
        if to == AlertStatus.RESOLVED:
            locked.resolved_by, locked.resolved_at = user, now
        locked.save()
        if to == AlertStatus.RESOLVED:  # a resolved alert has nothing left to say in a digest
            AlertDelivery.objects.filter(alert=locked, status=DeliveryStatus.HELD).update(
                status=DeliveryStatus.DIGESTED)
        _event(locked, kind, reason, actor_label=user.get_username())
        audit_record(action=action, actor=user, fleet=locked.fleet, target=locked, before={"status": before},
                     after={"status": to}, reason=reason)
        _push_on_commit(locked)
    return locked


# --- rules -------------------------------------------------------------------------------------------------

RULE_FIELDS = ("name", "enabled", "min_severity", "manufacturer", "model", "os_version", "store",
               "device_external_id", "email_to", "webhook_url", "webhook_secret", "quiet_start", "quiet_end",
               "budget", "budget_window_minutes")


def _rule_values(rule: AlertRule) -> dict:
    values = {f: getattr(rule, f) for f in RULE_FIELDS if f != "webhook_secret"}
    values["webhook_secret"] = "***" if rule.webhook_secret else ""
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in values.items()}


def alert_rule_save(*, rule: AlertRule, user) -> AlertRule:
    """Create or update a (validated) rule, audited as alert_rule_changed with before and after values
    (the webhook secret masked)."""
    with transaction.atomic():
        before = _rule_values(AlertRule.objects.get(pk=rule.pk)) if rule.pk else {}
        rule.save()
        audit_record(action=AuditAction.ALERT_RULE_CHANGED, actor=user, fleet=rule.fleet, target=rule,
                     before=before, after=_rule_values(rule), reason="created" if not before else "edited")
    return rule


def alert_rule_delete(*, rule: AlertRule, user) -> None:
    """Delete a rule (its deliveries go with it), audited as alert_rule_changed."""
    with transaction.atomic():
        audit_record(action=AuditAction.ALERT_RULE_CHANGED, actor=user, fleet=rule.fleet, target=rule,
                     before=_rule_values(rule), after={}, reason="deleted")
        rule.delete()
