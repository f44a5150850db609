"""The live events of a workflow run: the run's own topic (each step's change and the run's
end, numbered, replayed after a ``Last-Event-ID`` as a job's are; executions/live.py), and the
progress of its steps in flight, read from their jobs' channels and said of their step
(``"event": "progress"`` with ``step_id``, ``iteration``, ``job_id`` and the job's ``job_seq``;
they carry no ``seq``: the run's numbering is the run's topic's). A step that starts while the
stream is open is followed from the run's announcement of it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from channels.db import database_sync_to_async
from django.db import close_old_connections
from django.http import HttpRequest, StreamingHttpResponse
from redis.exceptions import RedisError

from executions import events as job_events
from executions import live
from executions.events import Topic
from executions.streams import KEEPALIVE_SECONDS, MAX_STREAM_SECONDS, last_event_id, sse

from .models import StepRun, WorkflowRun
from .selectors import run_detail


def runs_ended(run_ids: list[str]) -> set[str]:
    """Which of these runs have ended (one query): the hub's lookup for quiet run topics."""
    ended = WorkflowRun.objects.filter(pk__in=run_ids, status__in=WorkflowRun.TERMINAL).values_list("pk", flat=True)
    return {str(pk) for pk in ended}


def run_current(run_id: str) -> dict[str, Any]:
    """The run's state now (every step), with the ``seq`` of the run's last event it reflects."""
    try:
        last = job_events.last_event(Topic.run(run_id))
    except RedisError:
        last = None
    run = WorkflowRun.objects.select_related("version").get(pk=run_id)
    return {"event": "state", **run_detail(run=run), "seq": last["seq"] if last else 0}


def steps_in_flight(state: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """The job channel of each step in flight → (step id, iteration)."""
    return {
        job_events.channel(step["job_id"]): (step["step_id"], step["iteration"])
        for step in state.get("steps", ())
        if step.get("job_id") and step["status"] in StepRun.IN_FLIGHT
    }


def announced(event: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """A step the run announced as handed to a job: its job channel → (step id, iteration)."""
    if event.get("event") == "step" and event.get("job_id"):
        return {job_events.channel(event["job_id"]): (event["step_id"], event["iteration"])}
    return {}


def progress_of(step: tuple[str, int], event: dict[str, Any]) -> dict[str, Any]:
    job_seq = event.pop("seq", None)
    return {**event, "event": "progress", "step_id": step[0], "iteration": step[1], "job_seq": job_seq}


def run_event_response(request: HttpRequest, run_id: str) -> StreamingHttpResponse:
    after = last_event_id(request)
    if "wsgi.version" in request.META:
        body: Iterator[str] | AsyncIterator[str] = (sse(e) for e in follow_run_sync(run_id, after=after))
    else:
        body = (sse(e) async for e in follow_run(run_id, after=after, keepalive=KEEPALIVE_SECONDS))
    response = StreamingHttpResponse(body, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def follow_run_sync(run_id: str, *, after: int | None = None) -> Iterator[dict[str, Any] | None]:
    """The run's events for a thread (SSE under WSGI); None at each quiet keep-alive."""
    topic, feed = Topic.run(run_id), live.Feed()
    following: dict[str, tuple[str, int]] = {}
    pubsub = None

    def follow(channels: dict[str, tuple[str, int]]) -> None:
        nonlocal pubsub
        new = {name: step for name, step in channels.items() if name not in following}
        following.update(new)
        if pubsub is not None and new:
            try:
                pubsub.subscribe(*new)
            except RedisError:
                pubsub = None

    try:
        try:
            pubsub = job_events.redis().pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(topic.channel)
        except RedisError:
            pubsub = None
        current = run_current(run_id)
        for event in live.opening(topic, current=lambda: current, after=after, feed=feed):
            yield event
            if live.is_terminal(event):
                return
            follow(announced(event))
        follow(steps_in_flight(current))
        deadline = time.monotonic() + MAX_STREAM_SECONDS
        while time.monotonic() < deadline:
            message = None
            if pubsub is not None:
                try:
                    message = pubsub.get_message(timeout=KEEPALIVE_SECONDS)
                except RedisError:
                    pubsub = None
            else:
                time.sleep(1.0)
            if message and message.get("type") == "message":
                name = message["channel"].decode()
                event = json.loads(message["data"])
                if name in following:
                    yield progress_of(following[name], event)
                elif feed.take(event):
                    if live.is_terminal(event):
                        yield {**run_current(run_id), "seq": event["seq"]}  # the end, with every step
                        return
                    yield event
                    follow(announced(event))
                continue
            state = run_current(run_id)
            if live.is_terminal(state):
                yield state
                return
            follow(steps_in_flight(state))
            yield None
    finally:
        if pubsub is not None:
            try:
                pubsub.close()
            except RedisError:
                pass
        close_old_connections()


async def follow_run(
    run_id: str, *, after: int | None = None, keepalive: float | None = None
) -> AsyncIterator[dict[str, Any] | None]:
    """The run's events under asyncio (SSE under ASGI, the run's WebSocket), through the
    process's hub; with ``keepalive``, None after that many quiet seconds."""
    topic, feed, hub = Topic.run(run_id), live.Feed(), live.hub()
    queue: live.Queue = await hub.listen(topic.channel)
    following: dict[str, tuple[str, int]] = {}

    async def follow(channels: dict[str, tuple[str, int]]) -> None:
        for name, step in channels.items():
            if name not in following:
                following[name] = step
                await hub.listen(name, queue)

    try:
        current = await database_sync_to_async(run_current)(run_id)
        opening = await database_sync_to_async(live.opening)(topic, current=lambda: current, after=after, feed=feed)
        for event in opening:
            yield event
            if live.is_terminal(event):
                return
            await follow(announced(event))
        await follow(steps_in_flight(current))
        while True:
            try:
                name, event = await asyncio.wait_for(queue.get(), keepalive) if keepalive else await queue.get()
            except TimeoutError:
                yield None
                continue
            if name in following:
                if event is not live.RESYNC and event is not live.ENDED:
                    yield progress_of(following[name], dict(event))
                continue
            if event is live.ENDED:  # its terminal event never came: the database's state
                state = await database_sync_to_async(run_current)(run_id)
                if live.is_terminal(state):
                    yield {**state, "replayed": False}
                    return
                continue
            replay = [event]
            if event is live.RESYNC:
                replay = await database_sync_to_async(live.opening)(
                    topic, current=lambda: run_current(run_id), after=feed.last, feed=feed
                )
            for each in replay:
                if each is event and not feed.take(each):
                    continue
                if live.is_terminal(each):
                    yield {**await database_sync_to_async(run_current)(run_id), "seq": each.get("seq", 0)}
                    return
                yield each
                await follow(announced(each))
    finally:
        for name in [topic.channel, *following]:
            await hub.unlisten(name, queue)
