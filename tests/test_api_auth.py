"""Token authentication with the per-process cache of verified tokens (detection.api.authentication)."""
from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from factories import FleetFactory, user_with_role

pytestmark = pytest.mark.django_db


def _token_queries(queries) -> int:
    return sum("authtoken_token" in q["sql"] for q in queries)


def _get(client, path="/api/v1/fleets/"):
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    return response, queries.captured_queries


def test_a_verified_token_is_not_read_again_within_the_cache_time(settings):
    settings.VIGIL_API_TOKEN_CACHE_SECONDS = 60
    FleetFactory(name="demo")
    token = Token.objects.create(user=user_with_role("client", "viewer"))
    client = APIClient(HTTP_AUTHORIZATION=f"Token {token.key}")
    first, queries = _get(client)
    assert first.status_code == 200 and _token_queries(queries) == 1
    second, queries = _get(client)
    assert second.status_code == 200 and second.json() == first.json()
    assert _token_queries(queries) == 0
    assert not any("auth_user_groups" in q["sql"] for q in queries)  # the role came with the cached user


def test_cache_time_zero_reads_the_token_every_time(settings):
    settings.VIGIL_API_TOKEN_CACHE_SECONDS = 0
    token = Token.objects.create(user=user_with_role("client", "viewer"))
    client = APIClient(HTTP_AUTHORIZATION=f"Token {token.key}")
    for _ in range(2):
        response, queries = _get(client)
        assert response.status_code == 200 and _token_queries(queries) == 1


def test_a_deleted_token_is_refused_at_once_in_the_same_process(settings):
    settings.VIGIL_API_TOKEN_CACHE_SECONDS = 60
    token = Token.objects.create(user=user_with_role("client", "viewer"))
    client = APIClient(HTTP_AUTHORIZATION=f"Token {token.key}")
    assert client.get("/api/v1/fleets/").status_code == 200
    token.delete()
    response = client.get("/api/v1/fleets/")
    assert response.status_code == 401 and "Invalid token" in response.json()["detail"]


def test_unknown_keys_are_never_cached(settings):
    settings.VIGIL_API_TOKEN_CACHE_SECONDS = 60
    client = APIClient(HTTP_AUTHORIZATION="Token " + "0" * 40)
    for _ in range(2):
        response, queries = _get(client)
        assert response.status_code == 401 and _token_queries(queries) == 1


def test_requests_get_their_own_copy_of_the_cached_user(settings):
    """A view that sets an attribute on request.user cannot leak it into the next request."""
    from detection.api.authentication import CachedTokenAuthentication

    settings.VIGIL_API_TOKEN_CACHE_SECONDS = 60
    token = Token.objects.create(user=user_with_role("client", "viewer"))
    auth = CachedTokenAuthentication()
    first, _ = auth.authenticate_credentials(token.key)
    first.marker = "set by a view"
    second, same_token = auth.authenticate_credentials(token.key)
    assert second.pk == first.pk and same_token == token and not hasattr(second, "marker")


def test_scoring_reads_a_fleet_once_and_forgets_it_when_it_is_saved():
    from detection import serving

    fleet = FleetFactory(name="demo")
    with CaptureQueriesContext(connection) as queries:
        assert serving.fleets_by_name(["demo", "nope"])["demo"].pk == fleet.pk
    assert sum("detection_fleet" in q["sql"] for q in queries.captured_queries) == 1
    with CaptureQueriesContext(connection) as queries:
        assert set(serving.fleets_by_name(["demo"])) == {"demo"}
    assert not queries.captured_queries
    fleet.name = "renamed"
    fleet.save()
    assert serving.fleets_by_name(["demo"]) == {}  # not served under its old name
    assert serving.fleets_by_name(["renamed"])["renamed"].pk == fleet.pk
