"""The live sockets of jobs (DESIGN.md §11): ``/ws/v1/jobs/{job_id}/`` follows one job,
``/ws/v1/stream/`` as many as a client subscribes to.

Each feed is a task that sends what :func:`executions.live.follow` yields: the current state
first (or, resuming after a ``seq``, every event after it), then each live event once, in
order, until the terminal one. The frames are the events the SSE stream sends, with their
``seq``. Who may connect is core.ws_auth's; the close codes are its ``CloseCode``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from redis.exceptions import RedisError

from core.errors import ErrorCode
from core.ws_auth import CloseCode, accepted_subprotocol

from . import live
from .events import Topic
from .models import Job
from .page_selectors import jobs_visible

logger = logging.getLogger(__name__)

NOT_FOUND_WORDS = "Not found: nothing exists here, or it is not yours."


class MessageInvalid(ValueError):
    """A client's message that cannot be followed; its text says why, in words."""


@dataclass(frozen=True)
class Command:
    type: str
    ident: str | None
    after_seq: int | None


def command_parse(message: Any, *, types: tuple[str, ...], id_field: str, id_required: bool) -> Command:
    """A client's message as a Command, or MessageInvalid naming what is wrong with it."""
    if not isinstance(message, dict):
        raise MessageInvalid(f'A message is a JSON object, such as {{"type": "{types[0]}", "{id_field}": "…"}}.')
    kind = message.get("type")
    if kind not in types:
        raise MessageInvalid(f"type: must be one of {', '.join(types)}, not {json.dumps(kind)}.")
    ident = message.get(id_field)
    if ident is None and id_required:
        raise MessageInvalid(f"{id_field}: this field is required.")
    if ident is not None:
        try:
            ident = str(uuid.UUID(ident))
        except (TypeError, ValueError, AttributeError):
            raise MessageInvalid(f"{id_field}: must be an id (a UUID), not {json.dumps(ident)}.") from None
    after_seq = message.get("after_seq")
    if after_seq is None and kind == "resume":
        raise MessageInvalid("after_seq: this field is required to resume (the last seq you received).")
    if after_seq is not None and (isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0):
        raise MessageInvalid(f"after_seq: must be a whole number of at least 0, not {json.dumps(after_seq)}.")
    return Command(kind, ident, after_seq)


def query_after_seq(scope: dict[str, Any]) -> int | None:
    """``?after_seq=N`` of the handshake (a reconnecting client's last seq), or None; raises
    MessageInvalid for a value that is not a whole number."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("after_seq")
    if not values:
        return None
    if not values[-1].isdigit():
        raise MessageInvalid(f"after_seq: must be a whole number of at least 0, not {json.dumps(values[-1])}.")
    return int(values[-1])


def close_reason(words: str) -> str:
    """``words`` cut to the 123 bytes a close frame's reason may hold."""
    return words.encode()[:123].decode(errors="ignore")


def id_from_path(scope: dict[str, Any], name: str) -> str | None:
    """The id the socket's path names, or None when it is malformed (answered as unknown)."""
    try:
        return str(uuid.UUID(scope["url_route"]["kwargs"][name]))
    except (KeyError, ValueError):
        return None


def job_visible(*, user: AbstractBaseUser, job_id: str, signed_in_by: str | None) -> bool:
    """Whether ``user`` may follow the job: their own; any job for staff signed in with the
    session, as the status pages show them everyone's (a token or ticket is the API's: yours)."""
    jobs = jobs_visible(user=user) if signed_in_by == "session" else Job.objects.filter(owner_id=user.pk)
    return jobs.filter(pk=job_id).exists()


class LiveSocket(AsyncJsonWebsocketConsumer):
    """What every live socket shares: who may connect, feeds run as tasks, refusals as an
    error frame followed by a close code, and events sent once each per socket."""

    feeds: dict[str, asyncio.Task[None]]
    sent: dict[str, int]  # per feed: the highest seq of an event this socket sent
    refused = False

    async def connect(self) -> None:
        self.feeds, self.sent = {}, {}
        # Accepted first, whatever follows: a refusal before the handshake would reach the client
        # as a bare HTTP 403, without the close code that says why.
        await self.accept(subprotocol=accepted_subprotocol(self.scope))
        if self.scope.get("auth") is None:
            await self.refuse(
                CloseCode.NOT_AUTHENTICATED,
                ErrorCode.NOT_AUTHENTICATED,
                "Sign in first: send an API token as the subprotocols ['toolexec.token', '<token>'], "
                "a ticket from POST /api/v1/ws-tickets as ?ticket=…, or a session cookie.",
            )
            return
        try:
            await self.opened()
        except MessageInvalid as reason:
            await self.refuse(CloseCode.INPUT_INVALID, ErrorCode.INPUT_INVALID, str(reason))

    async def opened(self) -> None:
        """The socket is signed in: start what it follows from the outset."""

    async def disconnect(self, code: int) -> None:
        await self.feeds_stop(list(self.feeds))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        if self.refused:
            return
        try:
            if text_data is None:
                raise MessageInvalid("Messages are JSON text frames, not binary ones.")
            try:
                message = json.loads(text_data)
            except ValueError:
                raise MessageInvalid("A message is a JSON object; this one is not valid JSON.") from None
            await self.receive_json(message)
        except MessageInvalid as reason:
            await self.refuse(CloseCode.INPUT_INVALID, ErrorCode.INPUT_INVALID, str(reason))

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps(content, default=str)  # as the SSE stream writes its events

    async def refuse(self, code: CloseCode, error_code: ErrorCode, words: str, **about: Any) -> None:
        self.refused = True
        await self.feeds_stop(list(self.feeds))
        await self.send_json({"type": "error", **about, "error_code": error_code.value, "error_message": words})
        await self.close(code=int(code), reason=close_reason(words))

    # --- Feeds ----------------------------------------------------------------------------

    def feed_start(
        self, key: str, source: AsyncIterator[dict[str, Any] | None], *, after: int | None, tag: dict[str, Any]
    ) -> None:
        self.feeds[key] = asyncio.get_running_loop().create_task(self._feed(key, source, after=after, tag=tag))

    async def feeds_stop(self, keys: list[str]) -> None:
        tasks = [task for key in keys if (task := self.feeds.pop(key, None)) is not None]
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        waiting = [task for task in tasks if task is not current]
        if waiting:
            await asyncio.wait(waiting)

    async def _feed(
        self, key: str, source: AsyncIterator[dict[str, Any] | None], *, after: int | None, tag: dict[str, Any]
    ) -> None:
        first = True
        try:
            async with aclosing(source):
                async for event in source:
                    if event is None:
                        continue
                    # A state (the first message of a feed that does not resume, or one the
                    # stream could not replay) is a picture of now, not an event: always sent.
                    snapshot = (first and after is None) or event.get("replayed") is False
                    first = False
                    seq = int(event.get("seq") or 0)
                    if not snapshot and seq:
                        if seq <= self.sent.get(key, 0):
                            continue  # this socket sent it already (a resume overlapping its feed)
                        self.sent[key] = seq
                    # Tagged (the stream's job_id): a frame of its own; else the event as it came.
                    await self.send(text_data=live.event_text({**event, **tag} if tag else event))
                    if live.is_terminal(event):
                        if self.feeds.get(key) is asyncio.current_task():
                            del self.feeds[key]
                        await self.feed_ended(key)
                        return
        except (RedisError, OSError):
            logger.warning("A live socket's feed %s lost its event source", key, exc_info=True)
            await self.feed_failed(key)
        except Exception:
            # A task's error would otherwise only show when the task is collected, and leave
            # the client waiting on a feed that ended.
            logger.exception("A live socket's feed %s failed", key)
            await self.feed_failed(key)
        finally:
            if self.feeds.get(key) is asyncio.current_task():
                del self.feeds[key]

    async def feed_ended(self, key: str) -> None:
        """A feed sent its terminal event."""

    async def feed_failed(self, key: str) -> None:
        """A feed failed (it lost Redis, or a bug): the socket cannot promise every event any
        more, so it closes with 1011, and the client falls back to the SSE stream or polling."""
        if not self.refused:
            self.refused = True
            await self.feeds_stop(list(self.feeds))
            await self.close(code=int(CloseCode.SERVER_ERROR), reason=close_reason("Live events are unavailable."))


class SingleFeedSocket(LiveSocket):
    """A socket that follows one thing named in its path, until its terminal state (then it
    closes with 1000). ``?after_seq=N`` at the handshake, or ``{"type": "resume",
    "after_seq": N}`` later, (re)starts the feed after the ``seq`` N."""

    id_field = "job_id"

    async def visible(self, ident: str) -> bool:
        raise NotImplementedError

    def source(self, ident: str, after: int | None) -> AsyncIterator[dict[str, Any] | None]:
        raise NotImplementedError

    async def opened(self) -> None:
        ident = id_from_path(self.scope, self.id_field)
        if ident is None or not await self.visible(ident):
            await self.refuse(CloseCode.NOT_FOUND, ErrorCode.NOT_FOUND, NOT_FOUND_WORDS)
            return
        self.ident = ident
        after = query_after_seq(self.scope)
        self.feed_start(ident, self.source(ident, after), after=after, tag={})

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        command = command_parse(content, types=("resume",), id_field=self.id_field, id_required=False)
        if command.ident is not None and command.ident != self.ident:
            raise MessageInvalid(f"{self.id_field}: this socket follows {self.ident}; use /ws/v1/stream/ for others.")
        if self.ident not in self.feeds:
            return  # it ended already: its terminal state was sent, the socket is closing
        await self.feeds_stop([self.ident])
        self.feed_start(self.ident, self.source(self.ident, command.after_seq), after=command.after_seq, tag={})

    async def feed_ended(self, key: str) -> None:
        await self.close(code=int(CloseCode.NORMAL))


def job_feed(job_id: str, after: int | None) -> AsyncIterator[dict[str, Any] | None]:
    return live.follow(Topic.job(job_id), current=lambda: live.job_current(job_id), after=after)


class JobSocket(SingleFeedSocket):
    """``/ws/v1/jobs/{job_id}/``: one job's events."""

    async def visible(self, ident: str) -> bool:
        return await database_sync_to_async(job_visible)(
            user=self.scope["user"], job_id=ident, signed_in_by=self.scope.get("auth")
        )

    def source(self, ident: str, after: int | None) -> AsyncIterator[dict[str, Any] | None]:
        return job_feed(ident, after)


class StreamSocket(LiveSocket):
    """``/ws/v1/stream/``: many jobs on one socket. ``{"type": "subscribe", "job_id": …,
    "after_seq"?: N}`` starts following a job (from its current state, or after N),
    ``{"type": "resume", "job_id": …, "after_seq": N}`` (re)starts it after N and
    ``{"type": "unsubscribe", "job_id": …}`` stops it (answered ``{"type": "unsubscribed"}``).
    Every frame carries its ``job_id``. A job's feed ends with its terminal state; the socket
    stays. A job that is not yours (or does not exist) answers an error frame (NOT_FOUND) and
    leaves the socket and its other feeds as they were."""

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        command = command_parse(
            content, types=("subscribe", "unsubscribe", "resume"), id_field="job_id", id_required=True
        )
        job_id = str(command.ident)  # required: command_parse says so when it is missing
        if command.type == "unsubscribe":
            await self.feeds_stop([job_id])
            self.sent.pop(job_id, None)  # a later subscription starts afresh
            await self.send_json({"type": "unsubscribed", "job_id": job_id})
            return
        if job_id in self.feeds:
            if command.after_seq is None:
                return  # followed already
            await self.feeds_stop([job_id])
        elif len(self.feeds) >= settings.TOOLEXEC_WS_MAX_SUBSCRIPTIONS:
            limit = settings.TOOLEXEC_WS_MAX_SUBSCRIPTIONS
            await self.refuse(
                CloseCode.TOO_MANY_SUBSCRIPTIONS,
                ErrorCode.THROTTLED,
                f"A socket follows at most {limit} jobs at once: unsubscribe from one first, or open another socket.",
            )
            return
        visible = await database_sync_to_async(job_visible)(
            user=self.scope["user"], job_id=job_id, signed_in_by=self.scope.get("auth")
        )
        if not visible:
            await self.send_json(
                {
                    "type": "error",
                    "job_id": job_id,
                    "error_code": ErrorCode.NOT_FOUND.value,
                    "error_message": NOT_FOUND_WORDS,
                }
            )
            return
        self.feed_start(job_id, job_feed(job_id, command.after_seq), after=command.after_seq, tag={"job_id": job_id})
