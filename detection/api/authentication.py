"""Token authentication for API clients, with the token -> user lookup kept per process for a few seconds.

DRF's TokenAuthentication reads the token and its user from the database on every request: one query
(two with the role check that follows), which on a 2-core machine was a large share of what a
/api/v1/detect call costs. CachedTokenAuthentication keeps (user, token) for each key it has verified
for settings.VIGIL_API_TOKEN_CACHE_SECONDS (default 10; 0 turns the cache off). The price: a token
deleted, or a user deactivated or moved to another role, in another process (the admin, another
gunicorn worker) is still accepted by this process until its entry expires. A token deleted in this
process is dropped at once (post_delete signal).
"""
from __future__ import annotations

import copy
import threading
import time

from django.conf import settings
from django.db.models.signals import post_delete
from django.dispatch import receiver
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token

from ..permissions import user_roles

MAX_ENTRIES = 10_000  # a flood of distinct valid keys cannot grow the cache without bound

_verified: dict[str, tuple[float, object, Token]] = {}  # key -> (expires at, user, token)
_lock = threading.Lock()


def token_cache_clear() -> None:
    with _lock:
        _verified.clear()


class CachedTokenAuthentication(TokenAuthentication):
    """TokenAuthentication (header ``Authorization: Token <key>``) whose verified keys are remembered
    for VIGIL_API_TOKEN_CACHE_SECONDS. Each request gets its own shallow copy of the cached user, so
    nothing a view sets on request.user leaks into another request; the copy keeps the roles cached on
    the user object (detection.permissions.user_roles). Invalid keys are never cached: each is
    checked against the database and answered 401, as by DRF."""

    def authenticate_credentials(self, key):
        ttl = float(getattr(settings, "VIGIL_API_TOKEN_CACHE_SECONDS", 10))
        now = time.monotonic()
        hit = _verified.get(key)
        if hit is not None and hit[0] > now:
            return copy.copy(hit[1]), hit[2]
        user, token = super().authenticate_credentials(key)
        if ttl > 0:
            user_roles(user)  # read the roles once, onto the cached object, so its copies carry them
            with _lock:
                if len(_verified) >= MAX_ENTRIES:
                    _verified.clear()
                _verified[key] = (now + ttl, user, token)
        return copy.copy(user), token


@receiver(post_delete, sender=Token)
def _forget_deleted_token(sender, instance: Token, **kwargs) -> None:
    with _lock:
        _verified.pop(instance.key, None)
