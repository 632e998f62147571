"""The explanation panel's websocket: authenticated on connect, re-checked on every event, pushes the panel."""
from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from explanations.consumers import CLOSE_NOT_FOUND, CLOSE_UNAUTHENTICATED
from explanations.models import Explanation
from explanations.push import explanation_push
from explanations.routing import websocket_urlpatterns
from tests.factories import AnomalyResultFactory

pytestmark = pytest.mark.django_db(transaction=True)


def _communicator(pk: int, user) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/anomalies/{pk}/explanation/")
    communicator.scope["user"] = user
    return communicator


def test_anonymous_users_and_unknown_anomalies_are_refused():
    anomaly = AnomalyResultFactory()

    async def scenario():
        connected, code = await _communicator(anomaly.pk, AnonymousUser()).connect()
        assert (connected, code) == (False, CLOSE_UNAUTHENTICATED)

    async_to_sync(scenario)()


def test_unknown_anomaly_is_refused(django_user_model):
    user = django_user_model.objects.create_user("bob")

    async def scenario():
        connected, code = await _communicator(999_999, user).connect()
        assert (connected, code) == (False, CLOSE_NOT_FOUND)

    async_to_sync(scenario)()


def test_an_update_pushes_the_panel_and_a_deactivated_user_is_cut_off(django_user_model):
    user = django_user_model.objects.create_user("carol")
    anomaly = AnomalyResultFactory()
    explanation = Explanation.objects.create(anomaly=anomaly, status="ready", verdict="accepted",
                                             text="Battery level fell to 12.", provider="builtin")

    async def scenario():
        communicator = _communicator(anomaly.pk, user)
        connected, _ = await communicator.connect()
        assert connected
        await sync_to_async(explanation_push)(explanation=explanation)
        html = await communicator.receive_from(timeout=5)
        assert html.lstrip().startswith('<section id="explanation-panel"') and "Battery level fell to 12." in html
        user.is_active = False
        await sync_to_async(user.save)()
        await sync_to_async(explanation_push)(explanation=explanation)
        assert (await communicator.receive_output(timeout=5))["type"] == "websocket.close"
        await communicator.disconnect()

    async_to_sync(scenario)()
