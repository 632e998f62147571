"""The one helper that pushes live fleet updates to open pages (run list, fleet overview, anomaly list,
anomaly detail). Producers (detection.services) call these typed functions; they never touch the channel
layer themselves.

Each function renders the same partials the views render, with their stable element ids and
hx-swap-oob="true", and sends the HTML to the fleet's group; detection.consumers.FleetConsumer re-checks
the user's role and forwards it, and the htmx ws extension swaps it in. The review partial is the
exception: it holds per-user state (the user's own verdict, the reviewer form), so its event carries ids
and each consumer renders it for its own user (render_feedback).

Pushing is best effort: with settings.VIGIL_LIVE_PUSH off nothing is sent, and a failure (rendering,
channel layer down) is logged, never raised into the caller. Polling stays as the fallback.
"""
from __future__ import annotations

import logging
from typing import Literal, TypedDict

from django.conf import settings
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

RUN_ROW_TEMPLATE = "detection/partials/run_row.html"
LATEST_RUN_TEMPLATE = "detection/partials/latest_run.html"
NEW_ANOMALIES_TEMPLATE = "detection/partials/new_anomalies.html"
PRODUCTION_MODEL_TEMPLATE = "detection/partials/production_model.html"
FEEDBACK_TEMPLATE = "detection/partials/feedback.html"
NEW_ROWS_TEMPLATE = "detection/partials/new_anomaly_rows.html"
NEW_ROWS_LIMIT = 50  # one page of the anomaly list (views.ANOMALIES_PER_PAGE)

HtmlKind = Literal["run_progress", "run_finished", "versions_changed", "alert_changed"]


class FleetHtmlEvent(TypedDict):
    type: Literal["fleet.html"]
    fleet_id: int
    kind: HtmlKind
    html: str


class FleetFeedbackEvent(TypedDict):
    type: Literal["fleet.feedback"]
    fleet_id: int
    anomaly_id: int
    feedback_id: int


def group_name(fleet_id: int) -> str:
    return f"fleet-{int(fleet_id)}"


def live_push_enabled() -> bool:
    return bool(getattr(settings, "VIGIL_LIVE_PUSH", True))


def _send(fleet_id: int, event: FleetHtmlEvent | FleetFeedbackEvent) -> None:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(group_name(fleet_id), event)


def _run_html(run) -> list[str]:
    """The run's row and the latest-run card as separate fragments: each becomes its own message,
    because a browser parses a lone <tr> fine but a <tr> followed by a <div> in one fragment drops
    the div's table (HTML's in-table parsing rules)."""
    from . import selectors

    latest = selectors.run_list(fleet=run.fleet).first() or run
    row = render_to_string(RUN_ROW_TEMPLATE, {"run": run, "oob": True})
    card = render_to_string(LATEST_RUN_TEMPLATE, {"latest_run": latest, "fleet": run.fleet, "oob": True})
    return [row, card]


def push_run_progress(run) -> None:
    """The run's row (id run-<pk>) and the overview's latest-run card (id latest-run), after a stage."""
    if not live_push_enabled():
        return
    try:
        for html in _run_html(run):
            _send(run.fleet_id, {"type": "fleet.html", "fleet_id": run.fleet_id, "kind": "run_progress",
                                 "html": html})
    except Exception:  # best effort; the row keeps polling
        logger.warning("could not push progress of run %s", getattr(run, "pk", None), exc_info=True)


def push_run_finished(run) -> None:
    """The finished run's row and latest-run card, and on the anomaly list a "N new anomalies" banner
    (id new-anomalies) and the run's newest anomalies as rows (anomaly_row.html, prepended to the tbody
    id anomaly-rows, which only the list's default view has) when the run wrote any."""
    if not live_push_enabled():
        return
    try:
        fragments = _run_html(run)
        if run.n_anomalies:
            context = {"fleet": run.fleet, "new_run": run, "oob": True}
            fragments.append(render_to_string(NEW_ANOMALIES_TEMPLATE, context))
            rows = _new_rows_html(run)
            if rows:
                fragments.append(rows)
        for html in fragments:
            _send(run.fleet_id, {"type": "fleet.html", "fleet_id": run.fleet_id, "kind": "run_finished",
                                 "html": html})
    except Exception:
        logger.warning("could not push the end of run %s", getattr(run, "pk", None), exc_info=True)


def _new_rows_html(run) -> str:
    """The run's newest NEW_ROWS_LIMIT anomalies as list rows inside one oob <tbody> (a lone <tr> list
    would not survive parsing outside a table; htmx parses fragments in a <template>)."""
    from . import selectors

    rows = list(selectors.anomaly_list(fleet=run.fleet, run=run)[:NEW_ROWS_LIMIT])
    return render_to_string(NEW_ROWS_TEMPLATE, {"results": rows, "new": True}).strip() if rows else ""


def push_feedback(feedback) -> None:
    """Tell pages showing the feedback's anomaly that its review changed; each consumer renders the
    review partial (id feedback) for its own user."""
    if not live_push_enabled():
        return
    try:
        anomaly = feedback.anomaly
        event: FleetFeedbackEvent = {"type": "fleet.feedback", "fleet_id": anomaly.fleet_id,
                                     "anomaly_id": anomaly.pk, "feedback_id": feedback.pk}
        _send(anomaly.fleet_id, event)
    except Exception:
        logger.warning("could not push feedback %s", getattr(feedback, "pk", None), exc_info=True)


def push_versions_changed(fleet) -> None:
    """The overview's production-model card (id production-model) after a promotion or rollback."""
    if not live_push_enabled():
        return
    try:
        from . import selectors

        model = selectors.production_model(fleet=fleet)
        context = {"fleet": fleet, "model": model, "oob": True}
        html = render_to_string(PRODUCTION_MODEL_TEMPLATE, context)
        _send(fleet.pk, {"type": "fleet.html", "fleet_id": fleet.pk, "kind": "versions_changed", "html": html})
    except Exception:
        logger.warning("could not push model versions of fleet %s", getattr(fleet, "pk", None),
                       exc_info=True)


def push_alert(alert) -> None:
    """A new or changed alert: its row on the alert list (id alert-<pk>, alerts/partials/alert_row.html)."""
    if not live_push_enabled():
        return
    try:
        html = render_to_string("alerts/partials/alert_row.html", {"alert": alert, "oob": True})
        _send(alert.fleet_id, {"type": "fleet.html", "fleet_id": alert.fleet_id, "kind": "alert_changed",
                               "html": html})
    except Exception:
        logger.warning("could not push alert %s", getattr(alert, "pk", None), exc_info=True)


def render_feedback(*, anomaly_id: int, user) -> str:
    """The review partial of one anomaly as user sees it, swapped out of band; "" when it is gone."""
    from explanations.selectors import anomaly_get

    from .views import _feedback_context

    anomaly = anomaly_get(pk=anomaly_id)
    if anomaly is None:
        return ""
    context = {**_feedback_context(anomaly, user), "user": user, "oob": True}
    return render_to_string(FEEDBACK_TEMPLATE, context)
