"""Throttles: fixed-window counters in Redis, with rates read at request time so settings (and
tests) can change them.

DRF's own throttles keep a list of every request's timestamp for the whole window under one
cache key, read and written whole on each request: two round trips, and more bytes the higher
the rate (1,200 timestamps at 1200/min). A counter per window is one round trip (INCR and
EXPIRE, pipelined) of a few bytes at any rate. The price is the known one of fixed windows: a
client may fit up to twice the rate into the seconds around a window's edge.

Kept apart from the views: DRF imports these while it builds APIView.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from redis.exceptions import RedisError
from rest_framework.settings import api_settings
from rest_framework.throttling import AnonRateThrottle, ScopedRateThrottle, UserRateThrottle

from .redis import redis

logger = logging.getLogger(__name__)


class _FixedWindowMixin:
    """Counts requests per identity in windows of the rate's duration, aligned to the clock."""

    scope: str
    rate: str | None
    num_requests: int
    duration: int
    key: str | None

    def get_rate(self) -> str | None:
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)

    def allow_request(self, request: Any, view: Any) -> bool:
        if self.rate is None:
            return True
        self.key = self.get_cache_key(request, view)  # type: ignore[attr-defined]
        if self.key is None:
            return True
        now = time.time()
        window = int(now // self.duration)
        key = f"toolexec:{self.key}:{window}"
        try:
            with redis().pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, self.duration + 1)
                count, _ = pipe.execute()
        except RedisError:
            # Rate limits protect the service; they must not take it down with Redis.
            logger.warning("throttle %s not applied: Redis is unreachable", self.scope, exc_info=True)
            return True
        self._wait = (window + 1) * self.duration - now
        return count <= self.num_requests

    def wait(self) -> float:
        return max(1, math.ceil(self._wait))


class AnonThrottle(_FixedWindowMixin, AnonRateThrottle):
    pass


class UserThrottle(_FixedWindowMixin, UserRateThrottle):
    pass


class ScopedThrottle(_FixedWindowMixin, ScopedRateThrottle):
    def allow_request(self, request: Any, view: Any) -> bool:
        # As ScopedRateThrottle: the scope, so the rate, is known only once a view calls.
        self.scope = getattr(view, self.scope_attr, None)
        if not self.scope:
            return True
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)
