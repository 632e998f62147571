"""Request rate limits for /api/v1/ (counters in the default cache: Redis in production).

Three limits apply together, each a DRF rate like "1200/min" from settings (env VIGIL_API_THROTTLE_*):
- "user": every authenticated user across all their tokens and sessions (UserRateThrottle);
- "token": each API token on its own, so one leaked or runaway client token cannot use a user's
  whole allowance in one place (TokenRateThrottle; session requests are not counted here);
- a scope per costly endpoint ("detect", "ingest"): ScopedRateThrottle on the view's throttle_scope.
A refused request gets 429 with Retry-After and {"detail", "code": "throttled"}.

Counting: one counter per client and limit, which lives for the rate's period from the client's first
request in it (cache.add, then an atomic cache.incr: INCR on Redis). DRF's own throttles keep the
list of every request time in the period and read, filter and write it back whole on each request,
which costs in proportion to the rate: at 300 requests/s under a raised limit that list was the
largest single cost of a /api/v1/detect call. The counter is O(1); the difference is that a period
starts at the first request rather than sliding (a client can send up to the limit, wait for the
period to end, and send the limit again).

When the default cache is Redis (production), the counters are one pipelined round trip on a client of
this module's own (SET key 0 EX period NX; INCR key, for each limit that applies: ThrottledViewMixin
counts all three at once): Django's RedisCache spent three round trips per limit (add, then EXISTS
and INCRBY for incr) and built a client object for each, which made the three limits 40 % of a
/api/v1/detect call on PostgreSQL + Redis.
"""
from __future__ import annotations

import threading

from django.conf import settings
from rest_framework.authtoken.models import Token
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle, SimpleRateThrottle, UserRateThrottle

REDIS_KEY_PREFIX = "vigil:throttle:"
_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


def _redis_client():
    """A redis-py client on the default cache's Redis (its first LOCATION), or None for another backend."""
    cache = settings.CACHES.get("default", {})
    if not cache.get("BACKEND", "").endswith("RedisCache"):
        return None
    location = cache["LOCATION"]
    location = location[0] if isinstance(location, (list, tuple)) else str(location).split(",")[0]
    client = _clients.get(location)
    if client is None:
        import redis

        with _clients_lock:
            client = _clients.setdefault(location, redis.Redis.from_url(location))
    return client


class _LiveRates:
    """Read the rates when a request comes in, not at import, so that settings overrides apply; count
    with a counter per period (see the module docstring) instead of DRF's list of request times."""

    def get_rate(self):
        self.THROTTLE_RATES = api_settings.DEFAULT_THROTTLE_RATES
        return super().get_rate()

    def allow_request(self, request, view):
        if not self.prepare(request, view):
            return True
        client = _redis_client()
        if client is not None:
            return self.decide(client, _count_redis(client, [self])[0])
        now = self.timer()
        count_key, start_key = f"{self.key}:n", f"{self.key}:t0"
        if self.cache.add(count_key, 0, self.duration):  # a new period starts with this request
            self.cache.set(start_key, now, self.duration)
        try:
            count = self.cache.incr(count_key)
        except ValueError:  # expired between add and incr
            self.cache.set(count_key, 1, self.duration)
            self.cache.set(start_key, now, self.duration)
            count = 1
        if count <= self.num_requests:
            return True
        started = self.cache.get(start_key, now)
        self._wait = max(self.duration - (now - started), 1.0)
        return False

    def prepare(self, request, view) -> bool:
        """Set rate, num_requests, duration and key for this request; False when this limit does not
        apply to it (no rate, no scope on the view, no key: e.g. the token limit on a session)."""
        if isinstance(self, ScopedRateThrottle):  # its rate depends on the view (ScopedRateThrottle's own code)
            self.scope = getattr(view, self.scope_attr, None)
            if not self.scope:
                return False
            self.rate = self.get_rate()
            self.num_requests, self.duration = self.parse_rate(self.rate)
        if self.rate is None:
            return False
        self.key = self.get_cache_key(request, view)
        return self.key is not None

    def decide(self, client, count: int) -> bool:
        """Whether a request counted `count` in its period (Redis) is allowed; sets wait() if not."""
        if count <= self.num_requests:
            return True
        ttl = client.ttl(f"{REDIS_KEY_PREFIX}{self.key}")  # only for a refused request: Retry-After
        self._wait = float(ttl) if ttl and ttl > 0 else float(self.duration)
        return False

    def wait(self):
        return getattr(self, "_wait", None)


def _count_redis(client, throttles: list[_LiveRates]) -> list[int]:
    """Count one request against each prepared throttle, all in one pipelined round trip (per key:
    SET key 0 EX period NX, which starts a period with this request; INCR key). Returns the counts."""
    pipe = client.pipeline(transaction=False)
    for throttle in throttles:
        key = f"{REDIS_KEY_PREFIX}{throttle.key}"
        pipe.set(key, 0, ex=throttle.duration, nx=True)
        pipe.incr(key)
    return pipe.execute()[1::2]


class ThrottledViewMixin:
    """check_throttles for the API views: the same limits as DRF's (each throttle of get_throttles, a
    429 with the longest wait of those refused), counted in one Redis round trip for all of them
    instead of one each (three on /api/v1/detect); the cache-based count when Redis is not the cache."""

    def check_throttles(self, request):
        client = _redis_client()
        throttles = self.get_throttles()
        if client is None or not all(isinstance(t, _LiveRates) for t in throttles):
            return super().check_throttles(request)
        live = [t for t in throttles if t.prepare(request, self)]
        if not live:
            return None
        waits = [t.wait() for t, count in zip(live, _count_redis(client, live)) if not t.decide(client, count)]
        if waits:
            self.throttled(request, max((w for w in waits if w is not None), default=None))
        return None


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
