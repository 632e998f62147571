"""Request rate limits for /api/v1/ (counters in the default cache: Redis in production).

Three limits apply together, each a DRF rate like "1200/min" from settings (env VIGIL_API_THROTTLE_*):
- "user": every authenticated user across all their tokens and sessions (UserRateThrottle);
- "token": each API token on its own, so one leaked or runaway client token cannot use a user's
  whole allowance in one place (TokenRateThrottle; session requests are not counted here);
- a scope per costly endpoint ("detect", "ingest"): ScopedRateThrottle on the view's throttle_scope.
A refused request gets 429 with Retry-After and {"detail", "code": "throttled"}.
"""
from __future__ import annotations

from rest_framework.authtoken.models import Token
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle, SimpleRateThrottle, UserRateThrottle


class _LiveRates:
    """Read the rates when a request comes in, not at import, so that settings overrides apply."""

    def get_rate(self):
        self.THROTTLE_RATES = api_settings.DEFAULT_THROTTLE_RATES
        return super().get_rate()


class UserThrottle(_LiveRates, UserRateThrottle):
    scope = "user"


class TokenRateThrottle(_LiveRates, SimpleRateThrottle):
    """Counts the requests made with each token (request.auth is a Token for token authentication)."""

    scope = "token"

    def get_cache_key(self, request, view):
        if not isinstance(request.auth, Token):
            return None
        return self.cache_format % {"scope": self.scope, "ident": request.auth.pk}


class EndpointThrottle(_LiveRates, ScopedRateThrottle):
    """The view's throttle_scope ("detect", "ingest"), per user (or per client IP when anonymous)."""


API_THROTTLES = [UserThrottle, TokenRateThrottle, EndpointThrottle]
