"""The installable app on the server side: the web app manifest, the root-scoped service worker with its
precache list, the offline page, and the JSON replay of verdicts queued offline (exactly once per client_id)."""
from __future__ import annotations

import json
import re
import uuid

import pytest
from django.contrib.staticfiles import finders
from django.urls import reverse

from detection.choices import Label
from detection.models import AnomalyFeedback
from tests.factories import AnomalyResultFactory, user_with_role

pytestmark = pytest.mark.django_db


def test_manifest_meets_the_installability_fields(client):
    response = client.get("/manifest.webmanifest")
    assert response.status_code == 200 and response["Content-Type"] == "application/manifest+json"
    manifest = json.loads(response.content)
    assert manifest["display"] == "standalone" and manifest["start_url"].startswith("/")
    assert manifest["name"] and manifest["short_name"] and manifest["theme_color"] == "#1c2430"
    sizes = {(icon["sizes"], icon["purpose"]) for icon in manifest["icons"]}
    assert {("192x192", "any"), ("512x512", "any"), ("512x512", "maskable")} <= sizes
    for icon in manifest["icons"]:
        name = icon["src"].removeprefix("/static/")
        path = finders.find(name)
        assert path, icon["src"]
        with open(path, "rb") as f:
            head = f.read(24)
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and f"{width}x{height}" == icon["sizes"]


def test_service_worker_is_served_from_the_root_with_its_precache_list(client):
    response = client.get("/sw.js")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/javascript")
    assert response["Service-Worker-Allowed"] == "/" and response["Cache-Control"] == "no-cache"
    body = response.content.decode()
    precache = json.loads(re.search(r"const PRECACHE = (\[.*?\]);", body).group(1))
    assert reverse("detection:offline") in precache and "&quot;" not in body
    for url in precache[1:]:
        assert finders.find(url.removeprefix("/static/")), url


def test_service_worker_precaches_the_hashed_names_in_production(client, settings, tmp_path):
    # What collectstatic leaves for WhiteNoise's manifest storage: a staticfiles.json of hashed names.
    settings.STATIC_ROOT = tmp_path
    settings.STORAGES = {**settings.STORAGES, "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"}}
    names = ["vigil/app.css", "vigil/pwa.js", "vigil/focus.js", "vigil/shortcuts.js", "vigil/charts.js", "vigil/explanations.css",
              "vigil/vendor/echarts-5.6.0.min.js", "vigil/icons/icon-192.png", "vigil/icons/icon-512.png",
              "vigil/icons/icon-maskable-512.png", "django_htmx/htmx-2.min.js", "django_htmx/ext/hx-ws-2.min.js"]
    hashed = {n: re.sub(r"(\.[a-z]+)$", r".0123456789ab\1", n) for n in names}
    (tmp_path / "staticfiles.json").write_text(json.dumps({"paths": hashed, "version": "1.1", "hash": "x"}))
    body = client.get("/sw.js").content.decode()
    precache = json.loads(re.search(r"const PRECACHE = (\[.*?\]);", body).group(1))
    assert "/static/vigil/app.0123456789ab.css" in precache
    assert all(re.search(r"\.0123456789ab\.[a-z]+$", url) for url in precache[1:]), precache
    manifest = json.loads(client.get("/manifest.webmanifest").content)
    assert re.fullmatch(r"/static/vigil/icons/icon-192\.[0-9a-f]{12}\.png", manifest["icons"][0]["src"])


def test_offline_page_needs_no_login_and_pages_link_the_manifest(client):
    assert "You are offline" in client.get("/offline/").content.decode()
    client.force_login(user_with_role("vera", "viewer"))
    offline = client.get("/offline/").content.decode()
    assert "data-user" not in offline and "vera" not in offline  # precached once, shared by every user
    html = client.get("/").content.decode()
    assert '<link rel="manifest" href="/manifest.webmanifest">' in html and "vigil/pwa.js" in html
    assert 'data-user="vera"' in html


def _post_json(client, anomaly, payload):
    return client.post(reverse("detection:anomaly_feedback", args=[anomaly.pk]), data=json.dumps(payload)
                       if not isinstance(payload, str) else payload, content_type="application/json")


def test_offline_verdict_replayed_twice_is_recorded_once(client):
    anomaly = AnomalyResultFactory()
    client.force_login(user_with_role("rita", "reviewer"))
    client_id = str(uuid.uuid4())
    payload = {"verdict": "false_positive", "comment": "given offline", "client_id": client_id}
    first = _post_json(client, anomaly, payload)
    second = _post_json(client, anomaly, payload)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"] and first.json()["client_id"] == client_id
    assert 'id="feedback"' in first.json()["html"] and "given offline" in first.json()["html"]
    assert AnomalyFeedback.objects.filter(anomaly=anomaly).count() == 1
    assert AnomalyFeedback.objects.get(anomaly=anomaly).verdict == "false_positive"


@pytest.mark.parametrize("payload, field", [
    ("{not json", "body"),
    ("[1, 2]", "body"),
    ({"verdict": "maybe"}, "verdict"),
    ({"verdict": "true_positive", "client_id": "not-a-uuid"}, "client_id"),
    ({"verdict": ["true_positive"]}, "verdict"),
    ({"verdict": "true_positive", "comment": "x" * 5000}, "comment"),
])
def test_bad_offline_replay_is_a_400_naming_the_field(client, payload, field):
    anomaly = AnomalyResultFactory()
    client.force_login(user_with_role("rita", "reviewer"))
    response = _post_json(client, anomaly, payload)
    assert response.status_code == 400 and response.json()["field"] == field
    assert not AnomalyFeedback.objects.exists()


def test_replay_on_a_normal_result_is_refused(client):
    normal = AnomalyResultFactory(label=Label.NORMAL, severity="")
    client.force_login(user_with_role("rita", "reviewer"))
    response = _post_json(client, normal, {"verdict": "true_positive", "client_id": str(uuid.uuid4())})
    assert response.status_code == 400 and response.json()["field"] == "anomaly"


def test_outsider_and_viewer_cannot_replay_verdicts(client):
    anomaly = AnomalyResultFactory()
    payload = {"verdict": "true_positive", "client_id": str(uuid.uuid4())}
    assert _post_json(client, anomaly, payload).status_code == 302  # anonymous: to the login page
    for name, role in (("olga", None), ("vera", "viewer")):
        client.force_login(user_with_role(name, role))
        assert _post_json(client, anomaly, payload).status_code == 403
    assert not AnomalyFeedback.objects.exists()
