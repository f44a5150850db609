"""Following a topic's live events (executions/events.py), the same for every listener: SSE
under WSGI (a thread, redis-py) and under ASGI, and WebSockets (asyncio, redis.asyncio).

A listener gets the current state first, carrying the ``seq`` of the last event it reflects
(0 before any), or, resuming after a ``seq`` it saw, every event after it from the topic's
stream (the current state from the database, marked ``"replayed": false``, when the stream no
longer holds them); then each live event once, in order, until the terminal one.

It subscribes before it reads anything, so an event is either replayed or sent live (both,
at worst: ``Feed`` drops what was sent already). Under asyncio, one Redis connection per process
carries every listener's subscriptions (``Hub``), and an idle listener costs nothing but its
channel's place in that subscription: no query, no Redis command.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import close_old_connections
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from . import events
from .events import TERMINAL_STATUSES, Topic
from .selectors import job_state

logger = logging.getLogger(__name__)

# The fields of a job's live event that are fresher than its row (progress is written to the
# row at most once a second): they are laid over the row's state in the first message.
LIVE_FIELDS = ("status", "progress", "current_step", "step_index", "steps_total")


def is_terminal(event: dict[str, Any]) -> bool:
    return event.get("event") in ("state", "run") and event.get("status") in TERMINAL_STATUSES


@dataclass
class Feed:
    """What one listener of one topic was sent: an event goes out once, in order."""

    last: int = 0

    def take(self, event: dict[str, Any]) -> bool:
        seq = int(event.get("seq") or 0)
        if seq and seq <= self.last:
            return False
        self.last = max(self.last, seq)
        return True


def job_current(job_id: str) -> dict[str, Any]:
    """The job's state now, with the ``seq`` of the last event it reflects: its row, with the
    live fields of its newest event laid over unless the row has already ended. The event is
    read first, so whatever comes after it reaches a subscribed listener live."""
    topic = Topic.job(job_id)
    try:
        last = events.last_event(topic)
    except RedisError:
        last = None
    state = job_state(job_id=job_id)
    if last is not None and not is_terminal(state) and "status" in last:
        state.update({name: last[name] for name in LIVE_FIELDS if name in last})
    return {**state, "seq": last["seq"] if last else 0}


def opening(
    topic: Topic, *, current: Callable[[], dict[str, Any]], after: int | None, feed: Feed
) -> list[dict[str, Any]]:
    """What a listener is sent before live events: the current state, or the replay after
    ``after`` (the current state, ``replayed: false``, when the stream lost part of it)."""
    if after is not None:
        try:
            replayed, complete = events.replay(topic, after=after)
        except RedisError:
            replayed, complete = [], False
        if complete:
            feed.last = after
            return [event for event in replayed if feed.take(event)]
    state = current()
    if after is not None:
        state["replayed"] = False
    feed.last = int(state.get("seq") or 0)
    return [state]


# --- Threads (SSE under WSGI) ----------------------------------------------------------------


def follow_sync(
    topic: Topic,
    *,
    current: Callable[[], dict[str, Any]],
    after: int | None = None,
    keepalive: float = 15.0,
    lifetime: float = 3600.0,
) -> Iterator[dict[str, Any] | None]:
    """The topic's events for a thread: what ``opening`` gives, then live ones until the
    terminal event; None at each ``keepalive`` with nothing to say (the stream's comment
    line). Without Redis, the current state at each keep-alive, until it is terminal."""
    import time

    feed = Feed()
    pubsub = None
    try:
        try:
            pubsub = events.redis().pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(topic.channel)
        except RedisError:
            pubsub = None
        for event in opening(topic, current=current, after=after, feed=feed):
            yield event
            if is_terminal(event):
                return
        deadline = time.monotonic() + lifetime
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
                if feed.take(event):
                    yield event
                    if is_terminal(event):
                        return
                continue
            state = current()  # a lost message, or no Redis: the database decides
            if is_terminal(state):
                yield state
                return
            yield None
    finally:
        if pubsub is not None:
            try:
                pubsub.close()
            except RedisError:
                pass
        close_old_connections()


# --- asyncio (SSE under ASGI, WebSockets) ----------------------------------------------------


class LiveEvent(dict):
    """A live event as Redis carried it, with its JSON ``text``: the hub decodes it once for
    every listener, and a listener that sends it as it is sends that text rather than encoding
    it again (a job followed by a hundred sockets would be encoded a hundred times)."""

    __slots__ = ("text",)

    @classmethod
    def of(cls, text: str) -> LiveEvent:
        event = cls(json.loads(text))
        event.text = text
        return event


def event_text(event: dict[str, Any]) -> str:
    """The event's JSON: as it came, for one the hub decoded, else encoded now."""
    return event.text if isinstance(event, LiveEvent) else json.dumps(event, default=str)


RESYNC = {"event": "_resync"}  # put in every queue when the hub had to reconnect
Queue = asyncio.Queue  # of (channel, event)


class Hub:
    """One Redis pub/sub connection for every listener of this event loop: a channel is
    subscribed while someone listens to it, and each message goes to its listeners' queues.
    When the connection drops, the hub connects again, subscribes again and tells every
    listener to fill the gap from the stream (``RESYNC``)."""

    def __init__(self) -> None:
        self.queues: dict[str, set[Queue]] = {}
        self.client: aioredis.Redis | None = None
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.listening = asyncio.Event()  # set while anyone listens: the reader waits on it

    async def listen(self, channel: str, queue: Queue | None = None) -> Queue:
        """Put ``(channel, event)`` in ``queue`` (a new one by default) for each of its events."""
        queue = queue if queue is not None else asyncio.Queue()
        async with self.lock:
            await self._connect()
            # Subscribed before the channel shows in ``queues``: the reader reads once there is a
            # listener, and reading a pub/sub that has no connection yet raises (RuntimeError).
            if not self.queues.get(channel):
                await self.pubsub.subscribe(channel)
            self.queues.setdefault(channel, set()).add(queue)
            self.listening.set()
        return queue

    async def unlisten(self, channel: str, queue: Queue) -> None:
        async with self.lock:
            listeners = self.queues.get(channel)
            if listeners is None:
                return
            listeners.discard(queue)
            if not listeners:
                del self.queues[channel]
                if not self.queues:
                    self.listening.clear()
                if self.pubsub is not None:
                    try:
                        await self.pubsub.unsubscribe(channel)
                    except RedisError:
                        pass

    async def _connect(self) -> None:
        if self.pubsub is not None:
            return
        self.client = aioredis.Redis.from_url(settings.REDIS_URL)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        if self.queues:
            await self.pubsub.subscribe(*self.queues)
        if self.reader is None or self.reader.done():
            self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                if not self.queues:
                    await self.listening.wait()
                    continue
                message = await self.pubsub.get_message(timeout=1.0)
            except (RedisError, OSError, AttributeError):
                logger.warning("Live events lost Redis; connecting again", exc_info=True)
                await self._reconnect()
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"].decode()
            event = LiveEvent.of(message["data"].decode())
            for queue in list(self.queues.get(channel, ())):
                queue.put_nowait((channel, event))

    async def _reconnect(self) -> None:
        await asyncio.sleep(0.5)
        async with self.lock:
            old, self.pubsub = self.pubsub, None
            try:
                if old is not None:
                    await old.aclose()
            except (RedisError, OSError):
                pass
            try:
                await self._connect()
            except (RedisError, OSError):
                self.pubsub = None
                return
            for channel, listeners in self.queues.items():
                for queue in listeners:
                    queue.put_nowait((channel, RESYNC))


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}


def hub() -> Hub:
    """This event loop's hub."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(loop)
    if found is None:
        for stale in [other for other in _hubs if other.is_closed()]:
            del _hubs[stale]
        found = _hubs[loop] = Hub()
    return found


async def follow(
    topic: Topic,
    *,
    current: Callable[[], dict[str, Any]],
    after: int | None = None,
    keepalive: float | None = None,
) -> AsyncIterator[dict[str, Any] | None]:
    """The topic's events under asyncio: what ``opening`` gives, then live ones until the
    terminal event; with ``keepalive``, None after that many quiet seconds (SSE's comment
    line). ``current`` reads the database; it runs in a thread (database_sync_to_async)."""
    feed = Feed()
    queue = await hub().listen(topic.channel)
    try:
        for event in await database_sync_to_async(opening)(topic, current=current, after=after, feed=feed):
            yield event
            if is_terminal(event):
                return
        while True:
            try:
                _, event = await asyncio.wait_for(queue.get(), keepalive) if keepalive else await queue.get()
            except TimeoutError:
                yield None
                continue
            if event is RESYNC:
                for missed in await database_sync_to_async(opening)(topic, current=current, after=feed.last, feed=feed):
                    yield missed
                    if is_terminal(missed):
                        return
                continue
            if feed.take(event):
                yield event
                if is_terminal(event):
                    return
    finally:
        await hub().unlisten(topic.channel, queue)
