"""Server-Sent Events of a topic's live events (executions/live.py): a job's, a workflow
run's. Each event's ``seq`` is its ``id:`` line, so a client that reconnects with
``Last-Event-ID`` (EventSource does it by itself) gets every event it missed, once.

Under ASGI the stream is an async iterator (redis.asyncio, through the process's hub): a
synchronous generator would be consumed whole before the first byte went out. Under WSGI
(gunicorn gthread) it is a generator that holds its thread, as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from django.http import HttpRequest, StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter

from . import live
from .events import Topic

# The resume of an events stream, as the OpenAPI schema documents it on each events endpoint.
RESUME_PARAMETERS = (
    OpenApiParameter(
        "Last-Event-ID",
        int,
        OpenApiParameter.HEADER,
        description="The id (seq) of the last event received: every later event is sent first, once.",
    ),
    OpenApiParameter(
        "last_event_id",
        int,
        description="As Last-Event-ID, for a first connection that saw events elsewhere (the header wins).",
    ),
)

KEEPALIVE_SECONDS = 15.0
MAX_STREAM_SECONDS = 3600.0


def sse(event: dict[str, Any] | None) -> str:
    """One event in the stream's format (a comment line for None: a keep-alive)."""
    if event is None:
        return ": keep-alive\n\n"
    ident = f"id: {event['seq']}\n" if event.get("seq") else ""
    return f"{ident}event: {event.get('event', 'state')}\ndata: {live.event_text(event)}\n\n"


def last_event_id(request: HttpRequest) -> int | None:
    """The ``seq`` a reconnecting client saw last, or None: its Last-Event-ID header, which
    EventSource sends on its own reconnects, else ``?last_event_id=N``, how a client that saw
    events elsewhere (the job page, after its WebSocket) opens its first EventSource after N."""
    for raw in (request.META.get("HTTP_LAST_EVENT_ID", ""), request.GET.get("last_event_id", "")):
        if raw.strip().isdigit():
            return int(raw.strip())
    return None


def event_stream_response(
    request: HttpRequest, topic: Topic, current: Callable[[], dict[str, Any]]
) -> StreamingHttpResponse:
    """The topic's events as ``text/event-stream``, for the server this request came through."""
    after = last_event_id(request)
    if "wsgi.version" in request.META:
        body: Iterator[str] | AsyncIterator[str] = _sync_stream(topic, current, after)
    else:
        body = _async_stream(topic, current, after)
    response = StreamingHttpResponse(body, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events through as they come
    return response


def _sync_stream(topic: Topic, current: Callable[[], dict[str, Any]], after: int | None) -> Iterator[str]:
    for event in live.follow_sync(
        topic, current=current, after=after, keepalive=KEEPALIVE_SECONDS, lifetime=MAX_STREAM_SECONDS
    ):
        yield sse(event)


async def _async_stream(topic: Topic, current: Callable[[], dict[str, Any]], after: int | None) -> AsyncIterator[str]:
    async for event in live.follow(topic, current=current, after=after, keepalive=KEEPALIVE_SECONDS):
        yield sse(event)


def job_event_response(request: HttpRequest, job_id: str) -> StreamingHttpResponse:
    """A job's events: its current state first (or what a reconnecting client missed), then
    each progress and state event until the terminal one."""
    return event_stream_response(request, Topic.job(job_id), lambda: live.job_current(job_id))
