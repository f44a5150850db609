"""The live event stream of a job: Server-Sent Events fed by Redis pub/sub."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from django.db import close_old_connections
from redis.exceptions import RedisError

from . import events
from .models import Job
from .selectors import job_state

KEEPALIVE_SECONDS = 15.0
MAX_STREAM_SECONDS = 3600.0


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event.get('event', 'state')}\ndata: {json.dumps(event, default=str)}\n\n"


def job_event_stream(*, job_id: str, keepalive: float = KEEPALIVE_SECONDS) -> Iterator[str]:
    """The job's current state first (a late listener misses nothing), then every progress and
    state event until the terminal one. The database is re-read at every keep-alive, so a lost
    pub/sub message (or Redis going away) cannot leave the stream waiting forever."""
    pubsub = None
    try:
        try:
            pubsub = events.redis().pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(events.channel(job_id))
        except RedisError:
            pubsub = None
        state = job_state(job_id=job_id)
        yield _sse(state)
        if state["status"] in Job.TERMINAL:
            return
        deadline = time.monotonic() + MAX_STREAM_SECONDS
        while time.monotonic() < deadline:
            message = None
            if pubsub is not None:
                try:
                    message = pubsub.get_message(timeout=keepalive)
                except RedisError:
                    pubsub = None
            else:
                time.sleep(min(keepalive, 1.0))
            if message and message.get("type") == "message":
                event = json.loads(message["data"])
                if event.get("status") in Job.TERMINAL:
                    # Terminal: send the full recorded state, then end.
                    yield _sse(job_state(job_id=job_id))
                    return
                yield _sse(event)
                continue
            state = job_state(job_id=job_id)
            if state["status"] in Job.TERMINAL:
                yield _sse(state)
                return
            yield ": keep-alive\n\n"
    finally:
        if pubsub is not None:
            try:
                pubsub.close()
            except RedisError:
                pass
        close_old_connections()
