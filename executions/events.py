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
from django.conf import settings
from redis import Redis
from redis.commands.core import Script
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


# --- The live events of a job (or a workflow run): one source, numbered, kept for a while ---
#
# Each event gets the next sequence number of its topic (``seq``: 1, 2, 3 …), is appended to
# the topic's Redis Stream under the id ``<seq>-0`` and published on its pub/sub channel, in
# one script: one round trip, and no listener can see an event without its number or a number
# out of order. A listener subscribes first and then reads the stream, so what it replays and
# what it is sent live overlap rather than miss (it drops what it has seen by ``seq``). The
# stream keeps about TOOLEXEC_EVENT_STREAM_MAXLEN events and expires
# TOOLEXEC_EVENT_RETENTION_SECONDS after the topic's terminal event (a day after its last one
# otherwise, so an abandoned topic does not stay forever).

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT", "SUCCEEDED"})
UNFINISHED_TTL = 24 * 3600

_PUBLISH = """
local seq = redis.call('INCR', KEYS[1])
local rest = string.sub(ARGV[1], 2)
local message = '{"seq":' .. seq .. (rest == '}' and '' or ',') .. rest
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'e', message)
redis.call('PUBLISH', KEYS[3], message)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
"""
# Run with each caller's client (EVALSHA, loading it once per server).
PUBLISH_SCRIPT = Script(None, _PUBLISH.encode())  # type: ignore[arg-type]


class Topic:
    """What a live event is about: a job (``Topic.job``) or a workflow run (``Topic.run``)."""

    def __init__(self, kind: str, ident: Any) -> None:
        self.kind, self.ident = kind, str(ident)
        self.channel = f"toolexec:{kind}:{ident}:events"
        self.stream = f"toolexec:{kind}:{ident}:stream"
        self.seq_key = f"toolexec:{kind}:{ident}:seq"

    @classmethod
    def job(cls, job_id: Any) -> Topic:
        return cls("job", job_id)

    @classmethod
    def run(cls, run_id: Any) -> Topic:
        return cls("workflow-run", run_id)

    @classmethod
    def of_channel(cls, channel: str) -> Topic | None:
        """The topic whose pub/sub channel this is, or None for another channel."""
        prefix, kind, ident, suffix = (channel.split(":") + ["", "", "", ""])[:4]
        return cls(kind, ident) if (prefix, suffix) == ("toolexec", "events") and kind and ident else None


def channel(job_id: str) -> str:
    return Topic.job(job_id).channel


def cancel_key(job_id: str) -> str:
    return f"toolexec:job:{job_id}:cancel"


def publish(job_id: str, event: dict[str, Any]) -> int | None:
    """Tell live listeners of the job; a Redis hiccup must never fail the job, the database has
    the truth. Returns the event's ``seq`` (None when Redis did not take it)."""
    return publish_to(Topic.job(job_id), event)


def publish_to(topic: Topic, event: dict[str, Any]) -> int | None:
    terminal = event.get("status") in TERMINAL_STATUSES and event.get("event") in ("state", "run")
    ttl = settings.TOOLEXEC_EVENT_RETENTION_SECONDS if terminal else UNFINISHED_TTL
    data = json.dumps({key: value for key, value in event.items() if key != "seq"}, default=str)
    try:
        return int(
            PUBLISH_SCRIPT(
                keys=[topic.seq_key, topic.stream, topic.channel],
                args=[data, settings.TOOLEXEC_EVENT_STREAM_MAXLEN, ttl],
                client=redis(),
            )
        )
    except RedisError:
        return None


def replay(topic: Topic, *, after: int) -> tuple[list[dict[str, Any]], bool]:
    """The topic's events after ``seq`` ``after``, in order, and whether the stream still holds
    every one of them (False: it expired or was trimmed past ``after``; the caller then sends
    the current state from the database instead)."""
    pipe = redis().pipeline(transaction=True)  # both read at one moment
    pipe.xrange(topic.stream, min=f"{after + 1}-0")
    pipe.get(topic.seq_key)
    entries, last = pipe.execute()
    last = int(last or 0)
    events = [json.loads(fields[b"e"]) for _, fields in entries]
    complete = (events[0]["seq"] if events else last + 1) == after + 1 or last == after
    return events, complete and last >= after


def last_event(topic: Topic) -> dict[str, Any] | None:
    """The topic's newest event still in its stream, or None."""
    entries = redis().xrevrange(topic.stream, count=1)
    return json.loads(entries[0][1][b"e"]) if entries else None


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
