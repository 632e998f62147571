"""Property-based API tests: schemathesis generates requests from the OpenAPI schema that the app itself
generates (drf-spectacular) and calls every /api/v1/ operation through the WSGI app, as an admin with a
token, on a trained demo fleet. No answer may be a 5xx, and every answer must match the schema
(content type and body). Bounded: a few examples per operation and a deadline per test.
"""
from __future__ import annotations

import json

import pytest
import schemathesis
from django.core.cache import cache
from django.core.wsgi import get_wsgi_application
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings as hypothesis_settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from detection import serving
from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import generate_fleet

MAX_EXAMPLES = 8
CHECKS = (not_a_server_error, content_type_conformance, response_schema_conformance)


def _schema_dict() -> dict:
    # The schema the app serves at /api/schema/, as JSON types (dates and enums become plain values).
    raw = SchemaGenerator().get_schema(request=None, public=True)
    return json.loads(json.dumps(raw, default=str))


schema = schemathesis.from_dict(_schema_dict(), app=get_wsgi_application(), base_url="/",
                                endpoint="^/api/v1/")


@pytest.fixture(scope="module")
def demo(django_db_setup, django_db_blocker):
    """A trained demo fleet and an admin token, committed for the module (and removed after it)."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from detection.models import Fleet
    from detection.services import fleet_delete, pipeline_run_create, pipeline_run_execute

    with django_db_blocker.unblock():
        ingest_batch(batch=generate_fleet(devices=12, days=4, seed=5), fleet_name="fuzz")
        fleet = Fleet.objects.get(name="fuzz")
        run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
        assert run.model_version_id, run.error
        user = get_user_model().objects.create_superuser("fuzzer", "fuzz@example.com", "pw-fuzz-123")
        token = Token.objects.create(user=user)
        yield token.key
        serving.model_cache_clear()
        fleet_delete(fleet=Fleet.objects.get(name="fuzz"))
        user.delete()


@pytest.fixture
def keep_db_connection():
    """Django's test client stops each request from closing the test's database connection at its end
    (close_old_connections); schemathesis calls the WSGI handler itself, so do the same here."""
    from django.core import signals
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def unthrottled(settings):
    rates = dict.fromkeys(settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "100000/min")
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    cache.clear()


@pytest.mark.timeout(120)
@pytest.mark.django_db
@schema.parametrize()
@hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
def test_api_answers_within_its_schema_and_never_5xx(case, demo, unthrottled, keep_db_connection):
    response = case.call_wsgi(headers={"Authorization": f"Token {demo}"})
    case.validate_response(response, checks=CHECKS)
