"""Redis side of async jobs: the queue, the live event channel and the cancel flag.

The database is the record of a job; Redis carries what must be fast: the RQ queue, a
pub/sub channel per job that the events stream follows, and a flag a running job polls to
learn it was cancelled.
"""

from __future__ import annotations

import json
import time
from typing import Any

import django_rq
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, get_current_job

from core.redis import QUEUE_NAME
from core.redis import redis as shared_redis

CANCEL_FLAG_TTL = 24 * 3600


def redis() -> Redis:
    """One client (and connection pool) per process and queue URL: progress publishes and
    cancel checks happen thousands of times a run, and a new connection each time is slow.
    In an RQ work-horse, the worker's own client: it is connected already, and a second
    connection would cost every job a TCP handshake and the client's greeting."""
    job = get_current_job()
    if job is not None:
        return job.connection
    return shared_redis()


def queue() -> Queue:
    # "auto": our callers already wait for the transaction to commit.
    return django_rq.get_queue(QUEUE_NAME, commit_mode="auto", connection=redis())


def channel(job_id: str) -> str:
    return f"toolexec:job:{job_id}:events"


def cancel_key(job_id: str) -> str:
    return f"toolexec:job:{job_id}:cancel"


def publish(job_id: str, event: dict[str, Any]) -> None:
    """Tell live listeners; a Redis hiccup must never fail the job, the database has the truth."""
    try:
        redis().publish(channel(job_id), json.dumps(event, default=str))
    except RedisError:
        pass


def cancel_flag_set(job_id: str) -> None:
    redis().set(cancel_key(job_id), "1", ex=CANCEL_FLAG_TTL)


class CancelProbe:
    """Asks Redis whether a job was cancelled, at most every ``interval`` seconds, so a tool
    may check as often as it likes."""

    def __init__(self, job_id: str, interval: float = 0.25) -> None:
        self.key = cancel_key(job_id)
        self.interval = interval
        self._next = 0.0
        self._cancelled = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now >= self._next:
            self._next = now + self.interval
            try:
                self._cancelled = bool(redis().exists(self.key))
            except RedisError:
                pass
        return self._cancelled
