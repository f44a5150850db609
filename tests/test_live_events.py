"""One event source per job (DESIGN.md §11): every event is numbered (``seq``), kept in the
job's Redis Stream and published; the SSE stream sends each with its ``id:`` line, resumes
after a ``Last-Event-ID`` with every missed event once, falls back to the current state when
the stream lost them, and streams live under ASGI as under WSGI."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.db import connections
from django.test import AsyncClient

from core.models import ApiToken
from executions import events, live
from executions.events import Topic
from executions.models import Job
from tests.test_async_worker import start_async

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def parse(chunks: list[str]) -> list[dict[str, Any]]:
    """The stream's events: each data line's JSON, with its id line checked against its seq."""
    found = []
    for block in "".join(chunks).split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "data" in lines:
            event = json.loads(lines["data"])
            assert lines.get("id") == (str(event["seq"]) if event.get("seq") else None), block
            found.append(event)
    return found


def read_sync(response: Any) -> list[dict[str, Any]]:
    return parse([chunk.decode() for chunk in response.streaming_content])


@pytest.fixture
def queued_job(api, user, make_instance) -> Job:
    """A job no worker takes: its events are the test's to publish."""
    body = start_async(api, make_instance("demo-long-task", owner=user), {"steps": 3, "step_seconds": 0.1})
    return Job.objects.get(pk=body["job_id"])


def publish_run(job_id: str, marks: int) -> None:
    events.publish(job_id, {"event": "state", "status": "RUNNING", "progress": 0})
    for mark in range(1, marks + 1):
        events.publish(job_id, {"event": "progress", "status": "RUNNING", "progress": mark * 10})
    Job.objects.filter(pk=job_id).update(status="COMPLETED", progress=100)
    events.publish(job_id, {"event": "state", "status": "COMPLETED", "progress": 100})


@pytest.mark.django_db
def test_every_event_of_a_job_is_numbered_kept_and_replayable_after_any_seq(queued_job):
    job_id = str(queued_job.pk)
    publish_run(job_id, marks=3)
    topic = Topic.job(job_id)

    everything, complete = events.replay(topic, after=0)
    assert complete and [e["seq"] for e in everything] == [1, 2, 3, 4, 5]
    assert everything[-1]["status"] == "COMPLETED"
    rest, complete = events.replay(topic, after=3)
    assert complete and [e["seq"] for e in rest] == [4, 5]
    assert events.replay(topic, after=5) == ([], True)
    assert 0 < events.redis().ttl(topic.stream) <= 3600, "kept for the retention after the terminal event"

    events.redis().delete(topic.stream)  # expired
    assert events.replay(topic, after=2)[1] is False


@pytest.mark.django_db
def test_the_sse_stream_gives_each_event_its_id_and_resumes_after_last_event_id(api, queued_job):
    job_id = str(queued_job.pk)
    publish_run(job_id, marks=4)
    url = f"/api/v1/instances/{queued_job.instance_id}/jobs/{job_id}/events"

    resumed = read_sync(api.get(url, HTTP_ACCEPT="text/event-stream", HTTP_LAST_EVENT_ID="2"))

    assert [e["seq"] for e in resumed] == [3, 4, 5, 6], "every missed event, once, in order"
    assert resumed[-1]["status"] == "COMPLETED"


@pytest.mark.django_db
def test_a_resume_the_stream_no_longer_holds_gets_the_current_state_from_the_database(api, queued_job):
    job_id = str(queued_job.pk)
    publish_run(job_id, marks=2)
    events.redis().delete(Topic.job(job_id).stream)
    url = f"/api/v1/instances/{queued_job.instance_id}/jobs/{job_id}/events"

    [state] = read_sync(api.get(url, HTTP_ACCEPT="text/event-stream", HTTP_LAST_EVENT_ID="1"))

    assert state["status"] == "COMPLETED" and state["replayed"] is False


@pytest.mark.django_db
def test_the_first_event_is_the_current_state_with_the_seq_it_reflects(queued_job):
    job_id = str(queued_job.pk)
    events.publish(job_id, {"event": "state", "status": "RUNNING", "progress": 0})
    events.publish(job_id, {"event": "progress", "status": "RUNNING", "progress": 40, "current_step": "Step 2"})

    state = live.job_current(job_id)

    assert (state["seq"], state["status"], state["progress"], state["current_step"]) == (2, "RUNNING", 40, "Step 2")


@pytest.mark.django_db(transaction=True)
def test_under_asgi_the_stream_sends_its_first_event_at_once_and_then_each_live_event(user, make_instance):
    body = start_async_as(user, make_instance)
    job_id = body["job_id"]
    _, key = ApiToken.issue(user=user)

    async def follow() -> list[dict[str, Any]]:
        client = AsyncClient()
        url = f"{body['events_url']}"
        response = await client.get(url, headers={"Authorization": f"Token {key}", "Accept": "text/event-stream"})
        assert response.status_code == 200
        chunks: list[str] = []
        stream = aiter(response.streaming_content)
        started = time.monotonic()
        chunks.append((await asyncio.wait_for(anext(stream), 1.0)).decode())
        first_after = time.monotonic() - started
        await sync_to_async(publish_run)(job_id, 2)
        async for chunk in stream:
            chunks.append(chunk.decode())
        assert first_after < 1.0
        return parse(chunks)

    received = asyncio.run(follow())
    # The stream read the database in asgiref's thread: its connection goes, as under a server
    # with DATABASE_CONN_MAX_AGE=0, which ASGI wants.
    asyncio.run(database_sync_to_async(connections.close_all)())

    assert received[0]["event"] == "state" and received[0]["seq"] == 0
    assert [e["seq"] for e in received[1:]] == [1, 2, 3, 4]
    assert received[-1]["status"] == "COMPLETED"


def start_async_as(user: Any, make_instance: Any) -> dict[str, Any]:
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    return start_async(client, make_instance("demo-long-task", owner=user), {"steps": 3, "step_seconds": 0.1})
