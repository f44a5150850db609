"""WebSockets (DESIGN.md §11, issue 23): /ws/v1/jobs/{id}/, /ws/v1/workflow-runs/{id}/ and the
multiplexed /ws/v1/stream/; signing in with a token subprotocol, a single-use ticket or the
session; the close codes; resuming after the last seq seen with no gap and no duplicate.

The application is toolexec.asgi's, driven in-process by Channels' WebsocketCommunicator, on
real PostgreSQL and Redis, with a real worker process where a job must progress; and once under
the ASGI server `make run` starts (a real process), with a plain RFC 6455 client.

Every test commits its data (``django_db(transaction=True)``): the sockets read the database
through database_sync_to_async, which closes connections a test transaction would need.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import OperationalError, connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from core.models import ApiToken
from executions import events, live
from executions.events import Topic
from executions.models import Execution, Job
from instances.models import ToolInstance
from scripts.run import production_asgi_command, web_command
from tests.conftest import _database_url, wait_for, web_server
from tests.factories import UserFactory
from tests.ws_client import PlainWebSocket
from toolexec.asgi import application
from workflows.models import WorkflowRun

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

LONG = "demo-long-task"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
ABSENT = "00000000-0000-4000-8000-000000000000"
NOT_FOUND_FRAME = {
    "type": "error",
    "error_code": "NOT_FOUND",
    "error_message": "Not found: nothing exists here, or it is not yours.",
}


# --- helpers ------------------------------------------------------------------------------


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    """Run an async scenario from a test. Its database work (database_sync_to_async) comes back
    to this thread, on the test's connection."""
    return async_to_sync(scenario)()


def token_of(user: Any) -> str:
    _, key = ApiToken.issue(user=user)
    return key


def socket_to(
    path: str, *, token: str | None = None, origin: str | None = None, cookie: str | None = None
) -> WebsocketCommunicator:
    headers = []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    subprotocols = ["toolexec.token", token] if token is not None else None
    return WebsocketCommunicator(application, path, headers=headers, subprotocols=subprotocols)


async def frames_until_close(communicator: WebsocketCommunicator, timeout: float = 30) -> tuple[list[dict], int]:
    """Every frame the server sends until it closes the socket, and its close code."""
    frames = []
    while True:
        output = await communicator.receive_output(timeout)
        if output["type"] == "websocket.close":
            return frames, output.get("code", 1000)
        frames.append(json.loads(output["text"]))


async def frames_until(
    communicator: WebsocketCommunicator, done: Callable[[dict], bool], timeout: float = 30
) -> list[dict]:
    """Frames until one satisfies ``done`` (included); fails on a close."""
    frames = []
    while True:
        output = await communicator.receive_output(timeout)
        assert output["type"] == "websocket.send", output
        frames.append(json.loads(output["text"]))
        if done(frames[-1]):
            return frames


async def refused_with(communicator: WebsocketCommunicator) -> tuple[list[dict], int]:
    connected, _ = await communicator.connect()
    assert connected, "the socket must be accepted, so that its close code reaches the client"
    frames, code = await frames_until_close(communicator, timeout=5)
    await communicator.disconnect()
    return frames, code


def accept(client: APIClient, instance: ToolInstance, inputs: dict[str, Any]) -> str:
    response = client.post(f"/api/v1/instances/{instance.pk}/execute-async", inputs, format="json")
    assert response.status_code == 202, response.content
    return response.json()["job_id"]


def is_terminal(frame: dict) -> bool:
    return frame.get("event") == "state" and frame.get("status") in TERMINAL


def seqs(frames: list[dict]) -> list[int]:
    return [frame["seq"] for frame in frames]


@pytest.fixture
def long_task(make_instance, user) -> ToolInstance:
    return make_instance(LONG, owner=user)


@pytest.fixture
def queued_job(api, long_task) -> str:
    """A job that stays QUEUED (no worker runs in the test): its socket stays open."""
    return accept(api, long_task, {"steps": 3})


# --- Signing in ---------------------------------------------------------------------------


def test_a_token_in_the_subprotocol_signs_in_and_is_echoed_as_toolexec_token(user, queued_job):
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to(f"/ws/v1/jobs/{queued_job}/", token=token)
        connected, subprotocol = await communicator.connect()
        first = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return connected, subprotocol, first

    connected, subprotocol, first = run(scenario)

    assert connected and subprotocol == "toolexec.token"  # the token itself is never echoed
    assert first["event"] == "state" and first["status"] == "QUEUED" and first["progress"] == 0
    assert first["seq"] >= 0


def test_the_session_signs_in_from_an_allowed_origin(user, queued_job):
    browser = Client()
    browser.force_login(user)
    cookie = f"{django_settings.SESSION_COOKIE_NAME}={browser.cookies[django_settings.SESSION_COOKIE_NAME].value}"

    async def scenario() -> Any:
        communicator = socket_to(f"/ws/v1/jobs/{queued_job}/", origin="https://testserver", cookie=cookie)
        connected, subprotocol = await communicator.connect()
        first = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return connected, subprotocol, first

    connected, subprotocol, first = run(scenario)

    assert connected and subprotocol is None
    assert (first["event"], first["status"]) == ("state", "QUEUED")


def test_a_ticket_signs_in_once(api, queued_job):
    response = api.post("/api/v1/ws-tickets")
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {"ticket", "expires_in"} and body["expires_in"] == 60
    store = redis.Redis.from_url(django_settings.REDIS_URL)
    [key] = store.keys("toolexec:ws-ticket:*")
    assert body["ticket"].encode() not in key  # kept by its hash, as API tokens are
    assert 0 < store.ttl(key) <= 60

    async def scenario() -> Any:
        first = socket_to(f"/ws/v1/jobs/{queued_job}/?ticket={body['ticket']}")
        connected, _ = await first.connect()
        state = await first.receive_json_from(timeout=5)
        await first.disconnect()
        again = await refused_with(socket_to(f"/ws/v1/jobs/{queued_job}/?ticket={body['ticket']}"))
        return connected, state, again

    connected, state, (frames, code) = run(scenario)

    assert connected and state["status"] == "QUEUED"
    assert code == 4401 and frames[0]["error_code"] == "NOT_AUTHENTICATED"
    assert not store.keys("toolexec:ws-ticket:*")


def test_a_ticket_needs_a_signed_in_caller():
    response = APIClient().post("/api/v1/ws-tickets")

    assert response.status_code == 401
    assert response.json()["error_code"] == "NOT_AUTHENTICATED"


@pytest.mark.parametrize(
    "how", ["no credentials", "a wrong token", "the marker without a token", "a made-up ticket", "a wrong ticket"]
)
def test_missing_or_bad_credentials_close_with_4401_and_say_why(user, queued_job, how):
    path = f"/ws/v1/jobs/{queued_job}/"
    communicator = {
        "no credentials": lambda: socket_to(path),
        "a wrong token": lambda: socket_to(path, token="not-a-token"),
        "the marker without a token": lambda: WebsocketCommunicator(application, path, subprotocols=["toolexec.token"]),
        "a made-up ticket": lambda: socket_to(f"{path}?ticket=made-up"),
        "a wrong ticket": lambda: socket_to(f"{path}?ticket="),
    }[how]

    async def scenario() -> Any:
        return await refused_with(communicator())

    frames, code = run(scenario)

    assert code == 4401
    [frame] = frames
    assert frame["type"] == "error" and frame["error_code"] == "NOT_AUTHENTICATED"
    assert "toolexec.token" in frame["error_message"] and "ws-tickets" in frame["error_message"]


def test_a_foreign_origin_is_refused_at_the_handshake(user, queued_job):
    token = token_of(user)

    async def scenario() -> Any:
        foreign = socket_to(f"/ws/v1/jobs/{queued_job}/", token=token, origin="https://evil.example")
        refused = await foreign.connect()
        await foreign.disconnect()
        # A program sends no Origin at all, and no page of another site can drive it: it passes.
        program = socket_to(f"/ws/v1/jobs/{queued_job}/", token=token)
        accepted = await program.connect()
        await program.disconnect()
        return refused, accepted

    (connected, _), (program_connected, _) = run(scenario)

    assert not connected
    assert program_connected


def test_an_unknown_path_is_refused_at_the_handshake(user):
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to("/ws/v1/nothing-here/", token=token)
        connected, _ = await communicator.connect()
        await communicator.disconnect()
        return connected

    assert run(scenario) is False


# --- Which jobs ---------------------------------------------------------------------------


def test_another_owners_job_an_unknown_one_and_a_malformed_id_all_close_with_4404_alike(
    other_user, make_instance, other_api
):
    theirs = accept(other_api, make_instance(LONG, owner=other_user), {"steps": 3})
    mine = token_of(UserFactory())

    async def scenario() -> Any:
        results = []
        for job_id in (theirs, ABSENT, "not-a-job"):
            results.append(await refused_with(socket_to(f"/ws/v1/jobs/{job_id}/", token=mine)))
        return results

    results = run(scenario)

    assert results == [([NOT_FOUND_FRAME], 4404)] * 3


def test_staff_signed_in_with_the_session_follow_any_job_as_the_status_pages_show_them(
    other_user, make_instance, other_api
):
    theirs = accept(other_api, make_instance(LONG, owner=other_user), {"steps": 3})
    staff = UserFactory(is_staff=True)
    browser = Client()
    browser.force_login(staff)
    cookie = f"{django_settings.SESSION_COOKIE_NAME}={browser.cookies[django_settings.SESSION_COOKIE_NAME].value}"
    token = token_of(staff)

    async def scenario() -> Any:
        page = socket_to(f"/ws/v1/jobs/{theirs}/", origin="https://testserver", cookie=cookie)
        await page.connect()
        first = await page.receive_json_from(timeout=5)
        await page.disconnect()
        api_like = await refused_with(socket_to(f"/ws/v1/jobs/{theirs}/", token=token))
        return first, api_like

    first, (frames, code) = run(scenario)

    assert first["status"] == "QUEUED"
    assert (frames, code) == ([NOT_FOUND_FRAME], 4404)  # a token is the API's: yours only


# --- Malformed messages and the subscription limit --------------------------------------------


@pytest.mark.parametrize(
    ("path", "message", "words"),
    [
        ("jobs", "not json", "not valid JSON"),
        ("jobs", "[1, 2]", "JSON object"),
        ("jobs", '{"type": "subscribe"}', "type: must be one of resume"),
        ("jobs", '{"type": "resume"}', "after_seq: this field is required"),
        ("jobs", '{"type": "resume", "after_seq": -1}', "after_seq: must be a whole number"),
        ("jobs", '{"type": "resume", "after_seq": true}', "after_seq: must be a whole number"),
        ("stream", '{"type": "subscribe"}', "job_id: this field is required"),
        ("stream", '{"type": "subscribe", "job_id": "12345"}', 'job_id: must be an id (a UUID), not "12345"'),
        ("stream", '{"type": "dance", "job_id": "00000000-0000-4000-8000-000000000000"}', "type: must be one of"),
        (
            "stream",
            '{"type": "resume", "job_id": "00000000-0000-4000-8000-000000000000", "after_seq": "3"}',
            "after_seq",
        ),
    ],
)
def test_a_malformed_message_answers_input_invalid_in_words_then_closes_with_4400(
    user, queued_job, path, message, words
):
    token = token_of(user)
    target = f"/ws/v1/jobs/{queued_job}/" if path == "jobs" else "/ws/v1/stream/"

    async def scenario() -> Any:
        communicator = socket_to(target, token=token)
        await communicator.connect()
        if path == "jobs":
            await communicator.receive_json_from(timeout=5)  # the current state
        await communicator.send_to(text_data=message)
        frames, code = await frames_until_close(communicator, timeout=5)
        await communicator.disconnect()
        return frames, code

    frames, code = run(scenario)

    assert code == 4400
    assert frames[-1]["type"] == "error" and frames[-1]["error_code"] == "INPUT_INVALID"
    assert words in frames[-1]["error_message"]


def test_a_binary_frame_is_malformed_too(user):
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to("/ws/v1/stream/", token=token)
        await communicator.connect()
        await communicator.send_to(bytes_data=b"\x00\x01")
        result = await frames_until_close(communicator, timeout=5)
        await communicator.disconnect()
        return result

    frames, code = run(scenario)

    assert code == 4400 and frames[-1]["error_code"] == "INPUT_INVALID"


def test_one_subscription_over_the_limit_closes_with_4429_and_says_why(api, user, long_task, settings):
    settings.TOOLEXEC_WS_MAX_SUBSCRIPTIONS = 2
    jobs = [accept(api, long_task, {"steps": steps}) for steps in (3, 4, 5)]
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to("/ws/v1/stream/", token=token)
        await communicator.connect()
        firsts = []
        for job_id in jobs[:2]:
            await communicator.send_json_to({"type": "subscribe", "job_id": job_id})
            firsts.append(await communicator.receive_json_from(timeout=5))
        # An unsubscription frees its place.
        await communicator.send_json_to({"type": "unsubscribe", "job_id": jobs[0]})
        unsubscribed = await communicator.receive_json_from(timeout=5)
        await communicator.send_json_to({"type": "subscribe", "job_id": jobs[0]})
        firsts.append(await communicator.receive_json_from(timeout=5))
        await communicator.send_json_to({"type": "subscribe", "job_id": jobs[2]})
        frames, code = await frames_until_close(communicator, timeout=5)
        await communicator.disconnect()
        return firsts, unsubscribed, frames, code

    firsts, unsubscribed, frames, code = run(scenario)

    assert [(frame["job_id"], frame["status"]) for frame in firsts] == [
        (jobs[0], "QUEUED"),
        (jobs[1], "QUEUED"),
        (jobs[0], "QUEUED"),
    ]
    assert unsubscribed == {"type": "unsubscribed", "job_id": jobs[0]}
    assert code == 4429
    [frame] = frames
    assert frame["type"] == "error" and frame["error_code"] == "THROTTLED"
    assert "at most 2 jobs" in frame["error_message"]


def test_on_the_stream_a_job_not_yours_answers_an_error_frame_and_the_socket_stays(
    user, queued_job, other_user, make_instance, other_api
):
    theirs = accept(other_api, make_instance(LONG, owner=other_user), {"steps": 3})
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to("/ws/v1/stream/", token=token)
        await communicator.connect()
        await communicator.send_json_to({"type": "subscribe", "job_id": theirs})
        refused = await communicator.receive_json_from(timeout=5)
        await communicator.send_json_to({"type": "subscribe", "job_id": queued_job})
        mine = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return refused, mine

    refused, mine = run(scenario)

    assert refused == {**NOT_FOUND_FRAME, "job_id": theirs}
    assert (mine["job_id"], mine["status"]) == (queued_job, "QUEUED")


def test_without_redis_for_live_events_the_socket_closes_with_1011_so_the_page_can_fall_back(
    user, queued_job, settings
):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # where the live events' connection goes; nothing answers
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to(f"/ws/v1/jobs/{queued_job}/", token=token)
        connected, _ = await communicator.connect()
        result = await frames_until_close(communicator, timeout=10)
        await communicator.disconnect()
        return connected, result

    connected, (frames, code) = run(scenario)

    assert connected and frames == [] and code == 1011


def hub_connections() -> list[dict[str, Any]]:
    """The live-events hubs' Redis connections on this test process's database index."""
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    index = str(client.connection_pool.connection_kwargs.get("db", 0))
    return [c for c in client.client_list() if c.get("name") == live.HUB_CLIENT_NAME and c.get("db") == index]


class SlowLink:
    """A TCP proxy to Redis that holds what its clients send for ``delay`` seconds, as a slow
    network would: a command sent through it reaches Redis late; answers come back at once."""

    def __init__(self, redis_url: str, delay: float) -> None:
        self.upstream, self.delay = urlsplit(redis_url), delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = self.upstream._replace(netloc=f"127.0.0.1:{self.listener.getsockname()[1]}").geturl()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection((self.upstream.hostname, self.upstream.port or 6379))
            threading.Thread(target=self._pipe, args=(upstream, client, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, upstream, self.delay), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                time.sleep(delay)
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_listener_is_let_go_only_once_redis_has_confirmed_its_subscription(settings):
    """What a listener reads after listen() (the current state, a replay) must come after Redis
    started sending it the channel's events, or an event between the two would be lost. The
    hub's commands reach Redis 0.3 s late here: listen() must not return before."""
    channel = Topic.job("00000000-0000-4000-8000-00000000cafe").channel
    counter = redis.Redis.from_url(settings.REDIS_URL)  # straight to Redis
    link = SlowLink(settings.REDIS_URL, delay=0.3)
    settings.REDIS_URL = link.url  # where the hub connects

    async def scenario() -> list[int]:
        hub = live.hub()
        subscribed = []
        for _ in range(3):
            queue = await hub.listen(channel)
            subscribed.append(dict(counter.pubsub_numsub(channel))[channel.encode()])
            await hub.unlisten(channel, queue)
        await hub.pubsub.aclose()
        return subscribed

    try:
        assert run(scenario) == [1, 1, 1]
    finally:
        link.close()


def test_a_socket_whose_hub_lost_redis_gets_the_events_it_missed_once_redis_answers_again(user, queued_job):
    token = token_of(user)

    async def scenario() -> tuple[dict, list[dict]]:
        communicator = socket_to(f"/ws/v1/jobs/{queued_job}/", token=token)
        await communicator.connect()
        first = await communicator.receive_json_from(timeout=5)
        killer = redis.Redis.from_url(django_settings.REDIS_URL)
        for hub_connection in hub_connections():
            killer.client_kill_filter(_id=hub_connection["id"])
        # Published while the hub has no connection: kept in the job's stream, sent to nobody.
        events.publish(queued_job, {"event": "progress", "status": "RUNNING", "progress": 30})
        events.publish(queued_job, {"event": "progress", "status": "RUNNING", "progress": 60})
        missed = [await communicator.receive_json_from(timeout=10) for _ in range(2)]
        events.publish(queued_job, {"event": "progress", "status": "RUNNING", "progress": 90})  # live again
        live_again = await communicator.receive_json_from(timeout=10)
        extra = await communicator.receive_nothing(timeout=0.5)
        await communicator.disconnect()
        assert extra, "a frame was sent twice"
        return first, [*missed, live_again]

    first, frames = run(scenario)

    assert (first["status"], first["seq"]) == ("QUEUED", 0)
    assert [(f["seq"], f["progress"]) for f in frames] == [(1, 30), (2, 60), (3, 90)]
    assert len(hub_connections()) >= 1  # connected again (a closed loop's hub may linger until collected)


def test_a_job_that_ended_without_its_terminal_event_is_still_ended_on_its_socket(user, queued_job, settings):
    """The worker's publish of the end failed (Redis hiccuped for it alone): the database has the
    truth. Once the job's topic has been quiet for TOOLEXEC_LIVE_QUIET_CHECK_SECONDS, the process
    looks it up and the socket gets the row's state, then 1000."""
    settings.TOOLEXEC_LIVE_QUIET_CHECK_SECONDS = 1
    token = token_of(user)

    async def scenario() -> tuple[dict, bool, list[dict], int]:
        communicator = socket_to(f"/ws/v1/jobs/{queued_job}/", token=token)
        await communicator.connect()
        first = await communicator.receive_json_from(timeout=5)
        still_running_is_quiet = await communicator.receive_nothing(timeout=2.5)  # looked up, not ended
        await sync_to_async(end_without_an_event)(queued_job)
        frames, code = await frames_until_close(communicator, timeout=10)
        await communicator.disconnect()
        return first, still_running_is_quiet, frames, code

    first, quiet, frames, code = run(scenario)

    assert first["status"] == "QUEUED" and quiet
    assert [(f["status"], f["replayed"]) for f in frames] == [("CANCELLED", False)]
    assert code == 1000


def test_a_lookup_of_quiet_topics_that_fails_is_tried_again_at_the_next_round(user, queued_job, settings, monkeypatch):
    settings.TOOLEXEC_LIVE_QUIET_CHECK_SECONDS = 1
    asked: list[list[str]] = []

    def database_away_once(job_ids: list[str]) -> set[str]:
        asked.append(job_ids)
        if len(asked) == 1:
            raise OperationalError("the database went away")
        return live.jobs_ended(job_ids)

    monkeypatch.setitem(live.ENDED_LOOKUPS, "job", database_away_once)
    token = token_of(user)

    async def scenario() -> tuple[dict, list[dict], int]:
        communicator = socket_to(f"/ws/v1/jobs/{queued_job}/", token=token)
        await communicator.connect()
        first = await communicator.receive_json_from(timeout=5)
        await sync_to_async(end_without_an_event)(queued_job)
        frames, code = await frames_until_close(communicator, timeout=10)
        await communicator.disconnect()
        return first, frames, code

    first, frames, code = run(scenario)

    assert first["status"] == "QUEUED"
    assert [(f["status"], f["replayed"]) for f in frames] == [("CANCELLED", False)] and code == 1000
    assert len(asked) >= 2 and all(ids == [queued_job] for ids in asked)


def end_without_an_event(job_id: str) -> None:
    job = Job.objects.get(pk=job_id)
    Job.objects.filter(pk=job_id).update(status="CANCELLED", finished_at=timezone.now())
    Execution.objects.filter(pk=job.execution_id).update(status="CANCELLED", finished_at=timezone.now())


def test_a_run_that_ended_without_its_terminal_event_is_still_ended_on_its_socket(api, user, long_task, settings):
    settings.TOOLEXEC_LIVE_QUIET_CHECK_SECONDS = 1
    definition = {"steps": [{"id": "only", "instance": str(long_task.pk), "inputs": {"steps": 4}}]}
    body = {"key": "quiet", "name": "quiet", "definition": definition}
    workflow = api.post("/api/v1/workflows/", body, format="json")
    run_id = api.post(f"/api/v1/workflows/{workflow.json()['id']}/runs", {}, format="json").json()["run_id"]
    token = token_of(user)

    async def scenario() -> tuple[dict, list[dict], int]:
        communicator = socket_to(f"/ws/v1/workflow-runs/{run_id}/", token=token)
        await communicator.connect()
        first = await communicator.receive_json_from(timeout=5)
        await sync_to_async(WorkflowRun.objects.filter(pk=run_id).update)(status="CANCELLED")  # no event
        frames, code = await frames_until_close(communicator, timeout=10)
        await communicator.disconnect()
        return first, frames, code

    first, frames, code = run(scenario)

    assert first["status"] in ("QUEUED", "RUNNING")
    assert [(f["status"], f["replayed"]) for f in frames] == [("CANCELLED", False)]
    assert code == 1000


# --- Following a job, with a real worker ------------------------------------------------------


def test_a_job_is_followed_from_its_current_state_through_rising_progress_to_its_end_then_1000(
    rq_worker, api, user, long_task
):
    rq_worker()
    job_id = accept(api, long_task, {"steps": 6, "step_seconds": 0.2})
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to(f"/ws/v1/jobs/{job_id}/", token=token)
        await communicator.connect()
        result = await frames_until_close(communicator)
        await communicator.disconnect()
        return result

    frames, code = run(scenario)

    first, *rest = frames
    assert first["event"] == "state" and first["status"] in {"QUEUED", "RUNNING"}
    assert isinstance(first["seq"], int)
    assert seqs(rest) == list(range(first["seq"] + 1, first["seq"] + 1 + len(rest)))  # each event once, in order
    progress = [frame["progress"] for frame in rest if frame["event"] == "progress"]
    assert progress and progress == sorted(progress) and progress[-1] == 100
    assert is_terminal(frames[-1]) and frames[-1]["status"] == "COMPLETED"
    assert [frame for frame in frames if is_terminal(frame)] == [frames[-1]]
    assert code == 1000


def test_a_job_that_ended_sends_its_terminal_state_and_closes_with_1000(rq_worker, api, user, long_task):
    rq_worker()
    job_id = accept(api, long_task, {"steps": 1, "step_seconds": 0})
    wait_for(
        lambda: api.get(f"/api/v1/instances/{long_task.pk}/jobs/{job_id}/progress").json()["status"] == "COMPLETED"
    )
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to(f"/ws/v1/jobs/{job_id}/", token=token)
        await communicator.connect()
        result = await frames_until_close(communicator, timeout=5)
        await communicator.disconnect()
        return result

    frames, code = run(scenario)

    [frame] = frames
    assert (frame["status"], frame["progress"], code) == ("COMPLETED", 100, 1000)
    assert frame["seq"] == events.last_event(Topic.job(job_id))["seq"]


def test_a_cancel_over_rest_reaches_the_socket_as_cancelled(rq_worker, api, user, long_task):
    rq_worker()
    job_id = accept(api, long_task, {"steps": 100, "step_seconds": 0.2})
    token = token_of(user)
    cancel = sync_to_async(lambda: api.post(f"/api/v1/instances/{long_task.pk}/jobs/{job_id}/cancel"))

    async def scenario() -> Any:
        communicator = socket_to(f"/ws/v1/jobs/{job_id}/", token=token)
        await communicator.connect()
        before = await frames_until(communicator, lambda frame: frame.get("event") == "progress")
        response = await cancel()
        after, code = await frames_until_close(communicator)
        await communicator.disconnect()
        return before, response.status_code, after, code

    before, status, after, code = run(scenario)

    assert status == 202
    assert after[-1]["event"] == "state" and after[-1]["status"] == "CANCELLED"
    assert after[-1]["progress"] < 100
    assert code == 1000
    frames = before[1:] + after
    assert seqs(frames) == list(range(frames[0]["seq"], frames[0]["seq"] + len(frames)))


def test_a_client_that_reconnects_after_the_last_seq_it_saw_gets_every_missed_event_once_in_order(
    rq_worker, api, user, long_task
):
    """Disconnect mid-job; reconnect three ways: ``?after_seq=N`` on the job's socket, a
    ``resume`` on the stream, and a ``resume`` message on the job's socket."""
    rq_worker()
    job_id = accept(api, long_task, {"steps": 16, "step_seconds": 0.2})
    token = token_of(user)

    async def scenario() -> Any:
        first = socket_to(f"/ws/v1/jobs/{job_id}/", token=token)
        await first.connect()
        seen = await frames_until(first, lambda frame: frame.get("event") == "progress" and frame["progress"] >= 20)
        await first.disconnect()
        await asyncio.sleep(0.7)  # events go on while nobody listens

        after = seen[-1]["seq"]
        by_query = socket_to(f"/ws/v1/jobs/{job_id}/?after_seq={after}", token=token)
        stream = socket_to("/ws/v1/stream/", token=token)
        by_message = socket_to(f"/ws/v1/jobs/{job_id}/", token=token)
        for communicator in (by_query, stream, by_message):
            await communicator.connect()
        await stream.send_json_to({"type": "resume", "job_id": job_id, "after_seq": after})
        await by_message.send_json_to({"type": "resume", "job_id": job_id, "after_seq": after})
        query_frames, query_code = await frames_until_close(by_query)
        stream_frames = await frames_until(stream, is_terminal)
        message_frames, message_code = await frames_until_close(by_message)
        for communicator in (by_query, stream, by_message):
            await communicator.disconnect()
        return seen, query_frames, query_code, stream_frames, message_frames, message_code

    seen, query_frames, query_code, stream_frames, message_frames, message_code = run(scenario)

    after = seen[-1]["seq"]
    everything = seqs(events.replay(Topic.job(job_id), after=0)[0])
    assert everything == list(range(1, len(everything) + 1))
    missed_and_after = list(range(after + 1, everything[-1] + 1))
    assert len(missed_and_after) > 3  # the test did miss events
    assert seqs(query_frames) == missed_and_after and query_code == 1000
    assert seqs(stream_frames) == missed_and_after
    assert all(frame["job_id"] == job_id for frame in stream_frames)
    # A resume sent after connecting: the socket's current state may come first; then the
    # missed events, once each, in order.
    assert seqs(message_frames)[-len(missed_and_after) :] == missed_and_after and message_code == 1000
    assert len(message_frames) <= len(missed_and_after) + 1
    for frames in (query_frames, stream_frames, message_frames):
        assert frames[-1]["status"] == "COMPLETED"


def test_one_stream_follows_two_jobs_and_an_unsubscribed_one_goes_quiet(rq_worker, api, user, long_task):
    rq_worker("--processes", "2")
    first = accept(api, long_task, {"steps": 5, "step_seconds": 0.3})
    second = accept(api, long_task, {"steps": 30, "step_seconds": 0.2})
    token = token_of(user)

    async def scenario() -> Any:
        communicator = socket_to("/ws/v1/stream/", token=token)
        await communicator.connect()
        await communicator.send_json_to({"type": "subscribe", "job_id": first})
        await communicator.send_json_to({"type": "subscribe", "job_id": second})
        frames = await frames_until(communicator, lambda frame: frame.get("job_id") == second and "seq" in frame)
        await communicator.send_json_to({"type": "unsubscribe", "job_id": second})
        frames += await frames_until(communicator, lambda frame: frame.get("type") == "unsubscribed")
        after = await frames_until(communicator, lambda frame: frame.get("job_id") == first and is_terminal(frame))
        # The first job's feed ended; the socket stays: it still answers.
        await communicator.send_json_to({"type": "subscribe", "job_id": second})
        again = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return frames, after, again

    frames, after, again = run(scenario)

    assert {frame["job_id"] for frame in frames + after} == {first, second}
    assert all(frame["job_id"] == first for frame in after), "a frame of the unsubscribed job came after the answer"
    mine = [frame for frame in frames + after if frame["job_id"] == first]
    assert seqs(mine[1:]) == list(range(mine[0]["seq"] + 1, mine[0]["seq"] + len(mine)))
    assert mine[-1]["status"] == "COMPLETED"
    assert again["job_id"] == second and again["event"] == "state" and again["status"] in {"QUEUED", "RUNNING"}


# --- Workflow runs ----------------------------------------------------------------------------


def test_a_workflow_run_is_followed_to_its_end_then_1000_and_another_owners_run_is_4404(
    rq_worker, api, other_api, user, long_task
):
    rq_worker()
    definition = {"steps": [{"id": "only", "instance": str(long_task.pk), "inputs": {"steps": 4, "step_seconds": 0.2}}]}
    workflow = api.post("/api/v1/workflows/", {"key": "ws", "name": "ws", "definition": definition}, format="json")
    assert workflow.status_code == 201, workflow.content
    started = api.post(f"/api/v1/workflows/{workflow.json()['id']}/runs", {}, format="json")
    assert started.status_code == 202, started.content
    run_id = started.json()["run_id"]
    token, stranger = token_of(user), token_of(other_api.user)

    async def scenario() -> Any:
        communicator = socket_to(f"/ws/v1/workflow-runs/{run_id}/", token=token)
        await communicator.connect()
        followed = await frames_until_close(communicator)
        await communicator.disconnect()
        refused = await refused_with(socket_to(f"/ws/v1/workflow-runs/{run_id}/", token=stranger))
        return followed, refused

    (frames, code), refused = run(scenario)

    assert frames[0]["event"] == "state" and frames[0]["run_id"] == run_id and "steps" in frames[0]
    assert frames[-1]["event"] == "state" and frames[-1]["status"] == "SUCCEEDED"
    assert [step["status"] for step in frames[-1]["steps"]] == ["SUCCEEDED"]
    assert code == 1000
    assert refused == ([NOT_FOUND_FRAME], 4404)


# --- Under the ASGI server `make run` starts ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def asgi_server(transactional_db: Any, tmp_path: Path) -> Iterator[int]:
    """The web server `make run` starts (scripts/run.py's command: daphne's runserver) on a free
    port, on the test database; stopped after the test."""
    with _served(web_command, tmp_path) as port:
        yield port


@pytest.fixture(params=["make run", "production"])
def either_asgi_server(request: pytest.FixtureRequest, transactional_db: Any, tmp_path: Path) -> Iterator[int]:
    """The server `make run` starts (daphne's runserver), then the README's production one
    (uvicorn): a test using this runs on each."""
    with _served(web_command if request.param == "make run" else production_asgi_command, tmp_path) as port:
        yield port


@contextlib.contextmanager
def _served(command_for: Callable[[int], list[str]], tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": _database_url(connection.settings_dict),
        "REDIS_URL": django_settings.REDIS_URL,
        "SECRET_KEY": django_settings.SECRET_KEY,
        "TOOLEXEC_ENCRYPTION_KEYS": ",".join(django_settings.TOOLEXEC_ENCRYPTION_KEYS),
        "DATABASE_CONN_MAX_AGE": "0",  # as make run starts it
        "PYTHONUNBUFFERED": "1",
    }
    with web_server(command_for(port), port=port, env=env, log_path=tmp_path / "web.log"):
        yield port


def test_under_the_asgi_server_a_websocket_client_follows_a_job_to_completed(
    either_asgi_server, rq_worker, user, long_task
):
    asgi_server = either_asgi_server
    rq_worker()
    token = token_of(user)
    request = urllib.request.Request(
        f"http://127.0.0.1:{asgi_server}/api/v1/instances/{long_task.pk}/execute-async",
        data=json.dumps({"steps": 5, "step_seconds": 0.3}).encode(),
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        job_id = json.load(response)["job_id"]

    client = PlainWebSocket("127.0.0.1", asgi_server, f"/ws/v1/jobs/{job_id}/", subprotocols=["toolexec.token", token])
    assert client.headers["sec-websocket-protocol"] == "toolexec.token"
    frames = []
    try:
        while (received := client.receive())[0] == "text":
            frames.append(json.loads(received[1]))
    finally:
        client.close()

    assert received == ("close", 1000)
    assert frames[0]["event"] == "state"
    assert any(frame["event"] == "progress" for frame in frames)
    assert seqs(frames[1:]) == list(range(frames[0]["seq"] + 1, frames[0]["seq"] + len(frames)))
    assert frames[-1]["status"] == "COMPLETED" and frames[-1]["progress"] == 100


def test_under_the_asgi_server_the_sse_stream_sends_its_first_event_within_a_second_then_live_ones(
    either_asgi_server, user, queued_job, long_task
):
    asgi_server = either_asgi_server
    token = token_of(user)
    conn = http.client.HTTPConnection("127.0.0.1", asgi_server, timeout=10)
    asked = time.monotonic()
    conn.request(
        "GET",
        f"/api/v1/instances/{long_task.pk}/jobs/{queued_job}/events",
        headers={"Authorization": f"Token {token}", "Accept": "text/event-stream"},
    )
    response = conn.getresponse()
    assert response.status == 200

    def next_event() -> dict[str, Any]:
        lines = []
        while (line := response.readline().decode()) != "\n":
            lines.append(line)
        return json.loads(next(line for line in lines if line.startswith("data: "))[6:])

    first = next_event()
    took = time.monotonic() - asked
    events.publish(queued_job, {"event": "progress", "status": "RUNNING", "progress": 50})
    Job.objects.filter(pk=queued_job).update(status="COMPLETED", progress=100)
    events.publish(queued_job, {"event": "state", "status": "COMPLETED", "progress": 100})
    live_events = [next_event(), next_event()]
    conn.close()

    assert took < 1.0, f"the first event took {took:.2f} s"
    assert first["event"] == "state" and first["status"] == "QUEUED"
    assert [(e["seq"], e["progress"]) for e in live_events] == [(1, 50), (2, 100)]


def test_a_thousand_websocket_sessions_leave_no_database_connection_behind(asgi_server, user, queued_job):
    token = token_of(user)

    def session() -> None:
        client = PlainWebSocket(
            "127.0.0.1", asgi_server, f"/ws/v1/jobs/{queued_job}/", subprotocols=["toolexec.token", token]
        )
        kind, text = client.receive()
        assert kind == "text" and json.loads(text)["status"] == "QUEUED"
        client.close()

    def connections() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return cursor.fetchone()[0]

    for _ in range(10):
        session()
    settled = connections()
    for _ in range(1000):
        session()

    assert settled <= 3, f"{settled} database connections for one server after a few sessions"
    # Without persistent connections (as make run serves it) one may still be closing: give it a moment.
    wait_for(lambda: connections() <= max(settled, 1), timeout=10, message="the server's connections to settle")
