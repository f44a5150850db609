"""The process's Redis client, shared by all that talks to Redis beside RQ: throttles, live
events, cancel flags, credential-refresh locks. One client (and connection pool) per process
and configuration: these calls happen thousands of times a run, and a new connection each
time is slow. The configuration is RQ's default queue's (the project has one Redis), read at
each call, so settings (and tests) can change it."""

from __future__ import annotations

import json
import os
from functools import lru_cache

import django_rq
from django.conf import settings
from redis import Redis

QUEUE_NAME = "default"


def redis() -> Redis:
    return _client(os.getpid(), json.dumps(settings.RQ_QUEUES[QUEUE_NAME], sort_keys=True, default=str))


@lru_cache(maxsize=8)
def _client(pid: int, config: str) -> Redis:
    # pid: a forked child must not share its parent's sockets; config: the cache key.
    return django_rq.get_connection(QUEUE_NAME)
