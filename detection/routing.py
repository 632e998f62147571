"""Websocket routes of the detection app; anomaly_project.asgi adds them to its URLRouter, and
settings.VIGIL_LIVE_PUSH = True makes the fleet pages connect."""
from django.urls import path

from .consumers import FleetConsumer

websocket_urlpatterns = [
    path("ws/fleets/<slug:name>/", FleetConsumer.as_asgi()),
]
