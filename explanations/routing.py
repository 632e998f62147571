"""Websocket routes of the explanations app; anomaly_project.asgi adds them to its URLRouter:

    from explanations.routing import websocket_urlpatterns as explanation_routes
    websocket_urlpatterns = [*explanation_routes]

and settings.VIGIL_EXPLANATION_PUSH = True makes the anomaly page connect.
"""
from django.urls import path

from .consumers import ExplanationConsumer

websocket_urlpatterns = [
    path("ws/anomalies/<int:pk>/explanation/", ExplanationConsumer.as_asgi()),
]
