"""Sending one AlertDelivery: email through Django's email backend, webhook as a signed JSON POST.

Webhook signature: the header X-Vigil-Signature is "sha256=" + hex HMAC-SHA256 of
"<X-Vigil-Timestamp>.<raw body>" keyed with the rule's webhook_secret (the Stripe/GitHub scheme: the
timestamp in the signed text lets a receiver refuse replays). verify_signature is the receiver's check.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

from django.conf import settings
from django.core.mail import send_mail
from django.template.loader import render_to_string

from .choices import Channel, DeliveryKind

SIGNATURE_HEADER = "X-Vigil-Signature"
TIMESTAMP_HEADER = "X-Vigil-Timestamp"


class DeliveryError(Exception):
    """A send failed (network error, non-2xx answer, email backend error); status: the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Vigil-Signature value for body sent at timestamp (Unix seconds, as a string)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str, *, max_age: float = 300.0,
                     now: float | None = None) -> bool:
    """A receiver's check: the signature matches (constant-time) and timestamp is at most max_age s old."""
    try:
        age = (now if now is not None else time.time()) - float(timestamp)
    except (TypeError, ValueError):
        return False
    return abs(age) <= max_age and hmac.compare_digest(sign(secret, timestamp, body), signature or "")


def alert_payload(alert) -> dict:
    base = settings.VIGIL_ALERTS["base_url"].rstrip("/")
    return {
        "id": alert.pk, "fleet": alert.fleet.name, "status": alert.status, "severity": alert.severity,
        "scope": alert.scope, "title": alert.title, "count": alert.count, "domain": alert.domain,
        "device": alert.device.external_id if alert.device_id else None, "cohort": alert.cohort,
        "device_count": alert.device_count, "store_count": alert.store_count,
        "first_seen": alert.first_seen.isoformat(), "last_seen": alert.last_seen.isoformat(),
        "url": f"{base}/alerts/{alert.pk}/",
    }


def payload(delivery) -> dict:
    """The JSON body of a delivery: {"kind": "alert", "alert": {...}} or {"kind": "digest", "alerts": [...]}."""
    if delivery.kind == DeliveryKind.DIGEST:
        alerts = list(delivery.alerts.select_related("fleet", "device").order_by("-last_seen"))
        return {"kind": "digest", "rule": delivery.rule.name, "fleet": delivery.rule.fleet.name,
                "count": len(alerts), "alerts": [alert_payload(a) for a in alerts]}
    return {"kind": "alert", "rule": delivery.rule.name, "alert": alert_payload(delivery.alert)}


def send(delivery) -> int | None:
    """Send delivery on its channel; returns the HTTP status (webhook) or None (email). Raises DeliveryError."""
    body = payload(delivery)
    if delivery.channel == Channel.EMAIL:
        return _send_email(delivery, body)
    if delivery.channel == Channel.WEBHOOK:
        return _send_webhook(delivery, body)
    raise DeliveryError(f"unknown channel {delivery.channel!r}")


def _send_email(delivery, body: dict) -> None:
    recipients = delivery.rule.email_recipients
    if not recipients:
        raise DeliveryError(f"rule {delivery.rule.name!r} has no email recipients")
    if body["kind"] == "digest":
        subject = f"[Vigil] {body['count']} alerts on {body['fleet']}"
    else:
        alert = body["alert"]
        subject = f"[Vigil] {alert['severity'].upper()} {alert['title']}"
    text = render_to_string("alerts/email/delivery.txt", {"body": body})
    try:
        send_mail(subject[:200], text, settings.VIGIL_ALERTS["email_from"], recipients)
    except Exception as exc:  # SMTP and backend errors come in many types
        raise DeliveryError(f"email failed: {type(exc).__name__}: {exc}") from None
    return None


def _send_webhook(delivery, body: dict) -> int:
    rule = delivery.rule
    data = json.dumps(body, sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "Vigil-Alerts/1", TIMESTAMP_HEADER: timestamp,
               "X-Vigil-Delivery": str(delivery.pk)}
    if rule.webhook_secret:
        headers[SIGNATURE_HEADER] = sign(rule.webhook_secret, timestamp, data)
    request = urllib.request.Request(rule.webhook_url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=settings.VIGIL_ALERTS["webhook_timeout"]) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"webhook answered {exc.code} {exc.reason}", status=exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(f"webhook unreachable: {getattr(exc, 'reason', exc)}") from None
