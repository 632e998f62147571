"""Live updates of a fleet's pages over a websocket (Channels).

Pages of a fleet (run list, overview, anomaly list, anomaly detail) connect to ws/fleets/<name>/;
detection.push sends the fleet's group HTML rendered from the pages' own partials (stable ids,
hx-swap-oob), which this consumer forwards and the htmx ws extension swaps in. The user needs the
viewer role on connect (else close 4403) and is checked again, from the database, on every event.
An anomaly detail page adds ?anomaly=<pk> and then also receives that anomaly's review partial,
rendered here for the connected user. Polling stays as the fallback when the socket is down.
"""
from __future__ import annotations

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from .choices import Role
from .push import group_name

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


class FleetConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.group = None
        if not await self._allowed():
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.fleet_id = await self._fleet_id(self.scope["url_route"]["kwargs"]["name"])
        if self.fleet_id is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.anomaly_id = _anomaly_param(self.scope.get("query_string", b""))
        self.group = group_name(self.fleet_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.group = None

    async def receive(self, text_data=None, bytes_data=None):
        """Clients have nothing to say; htmx may send form values, which are ignored."""

    async def fleet_html(self, event):
        if await self._cut_off():
            return
        await self.send(text_data=event["html"])

    async def fleet_feedback(self, event):
        if self.anomaly_id != event["anomaly_id"]:
            return  # this page does not show that anomaly's review
        if await self._cut_off():
            return
        html = await self._feedback(event["anomaly_id"])
        if html:
            await self.send(text_data=html)

    async def _cut_off(self) -> bool:
        if await self._allowed():
            return False
        await self.disconnect(CLOSE_FORBIDDEN)
        await self.close(code=CLOSE_FORBIDDEN)
        return True

    @database_sync_to_async
    def _allowed(self) -> bool:
        from django.contrib.auth import get_user_model

        from .permissions import user_has_role

        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return False
        # A fresh user: roles are cached on the object, and a role removed after connecting must count.
        fresh = get_user_model().objects.filter(pk=user.pk).first()
        return fresh is not None and user_has_role(fresh, Role.VIEWER)

    @database_sync_to_async
    def _fleet_id(self, name: str) -> int | None:
        from .models import Fleet

        return Fleet.objects.filter(name=name).values_list("pk", flat=True).first()

    @database_sync_to_async
    def _feedback(self, anomaly_id: int) -> str:
        from django.contrib.auth import get_user_model

        from .push import render_feedback

        user = get_user_model().objects.get(pk=self.scope["user"].pk)
        return render_feedback(anomaly_id=anomaly_id, user=user)


def _anomaly_param(query_string: bytes) -> int | None:
    try:
        value = int(parse_qs(query_string.decode("latin-1")).get("anomaly", [""])[0])
    except ValueError:
        return None
    return value if 0 < value < 2**63 else None
