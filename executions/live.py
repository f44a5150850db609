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
import contextlib
import json
import logging
import time
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
from .models import Job
from .selectors import job_state

logger = logging.getLogger(__name__)

# The fields of a job's live event that are fresher than its row (progress is written to the
# row at most once a second): they are laid over the row's state in the first message.
LIVE_FIELDS = ("status", "progress", "current_step", "step_index", "steps_total")

SUBSCRIBE_TIMEOUT_SECONDS = 10.0  # how long a listener waits for Redis to confirm its channel


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


def jobs_ended(job_ids: list[str]) -> set[str]:
    """Which of these jobs have ended (one query)."""
    ended = Job.objects.filter(pk__in=job_ids, status__in=TERMINAL_STATUSES).values_list("pk", flat=True)
    return {str(pk) for pk in ended}


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
    feed = Feed()
    pubsub = None
    try:
        try:
            pubsub = events.redis().pubsub()
            pubsub.subscribe(topic.channel)
            # Redis answers in order: the first message is the confirmation. Once it is here,
            # what ``opening`` reads next cannot miss an event that is not sent live.
            confirmation = pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT_SECONDS)
            if confirmation is None or confirmation.get("type") != "subscribe":
                raise RedisError(f"Redis did not confirm the subscription to {topic.channel}")
        except RedisError:
            if pubsub is not None:
                with contextlib.suppress(RedisError):
                    pubsub.close()
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


RESYNC = {"event": "_resync"}  # put in a listener's queue once the hub has subscribed again
ENDED = {"event": "_ended"}  # put in a quiet listener's queue when its topic ended in the database
Queue = asyncio.Queue  # of (channel, event)

# For each kind of topic, how to tell which of some topics have ended (a query): the hub asks
# for the topics of channels that stayed quiet, because a terminal event Redis did not take (the
# publisher's Redis call failed, the database has the truth) would otherwise leave their
# listeners waiting for ever. Filled by the apps whose topics they are (executions: jobs, here;
# workflows: runs, in its AppConfig.ready).
ENDED_LOOKUPS: dict[str, Callable[[list[str]], set[str]]] = {"job": jobs_ended}

HUB_CLIENT_NAME = "toolexec-live"  # the hub's connection in Redis's CLIENT LIST


class Hub:
    """One Redis pub/sub connection for every listener of this event loop: a channel is
    subscribed while someone listens to it, and each message goes to its listeners' queues.

    A listener is let go only once Redis has confirmed its channel's subscription: whatever it
    reads next (the current state, a replay) was read after Redis started sending it the
    channel's events, so no event falls between the two. When the connection drops, the hub
    connects again, subscribes again and, as each channel's subscription is confirmed, tells
    its listeners to fill the gap from the stream (``RESYNC``).

    Every TOOLEXEC_LIVE_QUIET_CHECK_SECONDS, the channels that carried nothing for that long
    are looked up (``ENDED_LOOKUPS``, one query per kind of topic, whatever their number), and
    the listeners of those that ended are told (``ENDED``): they send the state the database
    has. An idle listener costs no query of its own."""

    def __init__(self) -> None:
        self.queues: dict[str, set[Queue]] = {}
        self.client: aioredis.Redis | None = None
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.listening = asyncio.Event()  # set while anyone listens: the reader waits on it
        self.confirming: dict[str, asyncio.Future[None]] = {}  # channel → its subscription's confirmation
        self.resyncing: set[str] = set()  # channels subscribed again, whose listeners get RESYNC once confirmed
        self.heard: dict[str, float] = {}  # channel → when it was subscribed or last carried a message
        self.sweeper: asyncio.Task[None] | None = None

    async def listen(self, channel: str, queue: Queue | None = None) -> Queue:
        """Put ``(channel, event)`` in ``queue`` (a new one by default) for each of its events,
        from the moment this returns. Raises RedisError when Redis does not confirm it."""
        queue = queue if queue is not None else asyncio.Queue()
        async with self.lock:
            await self._connect()
            # Subscribed before the channel shows in ``queues``: the reader reads once there is a
            # listener, and reading a pub/sub that has no connection yet raises (RuntimeError).
            if not self.queues.get(channel):
                self.confirming.setdefault(channel, asyncio.get_running_loop().create_future())
                await self.pubsub.subscribe(channel)
                self.heard[channel] = time.monotonic()
            confirmed = self.confirming.get(channel)  # None: confirmed for an earlier listener
            self.queues.setdefault(channel, set()).add(queue)
            self.listening.set()
        if confirmed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT_SECONDS)
            except TimeoutError:
                await self.unlisten(channel, queue)
                raise RedisError(f"Redis did not confirm the subscription to {channel}") from None
        return queue

    async def unlisten(self, channel: str, queue: Queue) -> None:
        async with self.lock:
            listeners = self.queues.get(channel)
            if listeners is None:
                return
            listeners.discard(queue)
            if not listeners:
                del self.queues[channel]
                self.heard.pop(channel, None)
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
        self.client = aioredis.Redis.from_url(settings.REDIS_URL, client_name=HUB_CLIENT_NAME)
        self.pubsub = self.client.pubsub()  # with the subscriptions' confirmations: the reader wants them
        if self.queues:
            await self.pubsub.subscribe(*self.queues)
        if self.reader is None or self.reader.done():
            self.reader = asyncio.get_running_loop().create_task(self._read())
        if self.sweeper is None or self.sweeper.done():
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

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
            if message is None:
                continue
            if message.get("type") == "subscribe":
                self._confirmed(message["channel"].decode())
            if message.get("type") != "message":
                continue
            channel = message["channel"].decode()
            event = LiveEvent.of(message["data"].decode())
            self.heard[channel] = time.monotonic()
            for queue in list(self.queues.get(channel, ())):
                queue.put_nowait((channel, event))

    async def _sweep(self) -> None:
        while True:
            interval = settings.TOOLEXEC_LIVE_QUIET_CHECK_SECONDS
            await asyncio.sleep(interval)
            if not self.queues:
                await self.listening.wait()
                continue
            try:
                await self.sweep(quiet_for=interval)
            except Exception:  # a database that does not answer: the next round asks again
                logger.warning("Could not look up the quiet live topics", exc_info=True)

    async def sweep(self, *, quiet_for: float) -> None:
        """Tell the listeners of each channel quiet for ``quiet_for`` seconds whose topic has
        ended that it did (``ENDED``)."""
        since = time.monotonic() - quiet_for
        quiet: dict[str, list[str]] = {}
        for channel in [channel for channel, heard in self.heard.items() if heard <= since]:
            topic = events.Topic.of_channel(channel)
            if topic is not None and topic.kind in ENDED_LOOKUPS:
                quiet.setdefault(topic.kind, []).append(topic.ident)
        for kind, idents in quiet.items():
            for ident in await database_sync_to_async(ENDED_LOOKUPS[kind])(idents):
                channel = events.Topic(kind, ident).channel
                for queue in self.queues.get(channel, ()):
                    queue.put_nowait((channel, ENDED))

    def _confirmed(self, channel: str) -> None:
        """Redis confirmed a subscription to ``channel``: its waiting listeners go on, and after
        a reconnect its listeners fill the gap from the stream."""
        waiting = self.confirming.pop(channel, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        if channel in self.resyncing:
            self.resyncing.discard(channel)
            for queue in self.queues.get(channel, ()):
                queue.put_nowait((channel, RESYNC))

    async def _reconnect(self) -> None:
        await asyncio.sleep(0.5)
        async with self.lock:
            old, self.pubsub = self.pubsub, None
            try:
                if old is not None:
                    await old.aclose()
            except (RedisError, OSError):
                pass
            # Set first: the reader (this task) reads the confirmations only after this returns.
            # A listener still waiting for its confirmation from the old connection gets this one's.
            self.resyncing = set(self.queues)
            try:
                await self._connect()
            except (RedisError, OSError):
                self.pubsub = None
                return


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
            if event is ENDED:  # its terminal event never came: the database's state, as a picture of now
                state = await database_sync_to_async(current)()
                if is_terminal(state):
                    yield {**state, "replayed": False}
                    return
                continue
            if feed.take(event):
                yield event
                if is_terminal(event):
                    return
    finally:
        await hub().unlisten(topic.channel, queue)
