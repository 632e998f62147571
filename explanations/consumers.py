"""Live updates of the explanation panel over a websocket (Channels).

A page showing an anomaly connects to ws/anomalies/<pk>/explanation/; when the anomaly's explanation
changes, explanations.push sends an event to the anomaly's group and this consumer answers with the
panel's HTML (the same partial the views render, stable id "explanation-panel"), which the htmx ws
extension swaps in. The user is authenticated on connect and checked again on every event. Polling
stays as the fallback when the socket is down.
"""
from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from .push import group_name

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404


class ExplanationConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.group = None
        if not await self._allowed():
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.anomaly_id = int(self.scope["url_route"]["kwargs"]["pk"])
        if not await self._exists():
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.group = group_name(self.anomaly_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        """Clients have nothing to say; htmx may send form values, which are ignored."""

    async def explanation_updated(self, event):
        if not await self._allowed():
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        html = await self._panel()
        if html:
            await self.send(text_data=html)

    @database_sync_to_async
    def _allowed(self) -> bool:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return False
        user.refresh_from_db(fields=["is_active"])
        return user.is_active

    @database_sync_to_async
    def _exists(self) -> bool:
        from . import selectors

        return 0 < self.anomaly_id < 2**63 and selectors.anomaly_get(pk=self.anomaly_id) is not None

    @database_sync_to_async
    def _panel(self) -> str:
        from . import selectors
        from .views import PANEL_TEMPLATE, panel_context

        anomaly = selectors.anomaly_get(pk=self.anomaly_id)
        if anomaly is None:
            return ""
        return render_to_string(PANEL_TEMPLATE, panel_context(anomaly))
