"""The worker's side of an async run and what listeners see (DESIGN.md §6, §7): progress
writes are coalesced while every change is published, a duplicate delivery runs the tool once,
a late report never overwrites a terminal state, and the events stream gives the current state
first and ends with the terminal one.

The worker-side service (``job_run``) runs in this process for the counting tests, with tools
defined here; the live stream runs against a real worker process and a live HTTP server.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.db import connection, connections
from rest_framework.test import APIClient

from core.models import ApiToken
from credits.models import CreditAccount, CreditLedgerEntry
from executions.models import Execution, Job
from executions.services.control import job_stop
from executions.services.jobs import PROGRESS_WRITE_INTERVAL, JobProgress, job_run
from executions.services.runs import Outcome, execution_finish
from instances.models import ToolInstance
from tests.conftest import wait_for
from tests.job_events import Listener
from tools import registry
from tools.sdk import ASYNC, ExecutionContext, Tool
from tools.services import catalog_sync

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

PROGRESS_CALLS = 10_000


# --- Tools for these tests (registered in this process only) -----------------------------


class ChattyTool(Tool):
    """Reports progress ``calls`` times, each a change (the step text names the item), then
    fails if asked to."""

    slug = "test-chatty-progress"
    name = "Test Chatty Progress"
    input_schema = {
        "type": "object",
        "properties": {
            "calls": {"type": "integer", "minimum": 1},
            "pause": {"type": "number", "minimum": 0},
            "fail": {"type": "boolean"},
        },
        "required": ["calls"],
    }
    modes = frozenset({ASYNC})
    base_credits = Decimal("0.01")

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        calls, pause = inputs["calls"], inputs.get("pause", 0)
        for index in range(1, calls + 1):
            ctx.progress(index * 100 / calls, f"Item {index} of {calls}")
            if pause:
                time.sleep(pause)
        if inputs.get("fail"):
            raise RuntimeError("gave up after the last item")
        return {"calls": calls}


class CountingTool(Tool):
    """Counts how many times it really ran."""

    slug = "test-counting"
    name = "Test Counting"
    input_schema = {"type": "object", "properties": {"seconds": {"type": "number", "minimum": 0}}}
    modes = frozenset({ASYNC})
    base_credits = Decimal("0.01")
    runs = 0
    _lock = threading.Lock()

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        with CountingTool._lock:
            CountingTool.runs += 1
        ctx.sleep(inputs.get("seconds", 0))
        return {"ran": True}


class ReapedMidwayTool(Tool):
    """Is ended CANCELLED by the reaper's service while it runs, then reports success anyway,
    as a work-horse that ignored its cancellation would."""

    slug = "test-reaped-midway"
    name = "Test Reaped Midway"
    modes = frozenset({ASYNC})
    base_credits = Decimal("0.05")

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        ctx.progress(40, "Halfway")
        job = Job.objects.select_related("execution__tool").get(execution_id=ctx.execution_id)
        assert job_stop(job=job)
        ctx.usage(3)
        return {"late": True}


TOOLS = [ChattyTool, CountingTool, ReapedMidwayTool]


@pytest.fixture
def progress_tools(catalog):
    for tool in TOOLS:
        registry.register(tool)
    catalog_sync()
    CountingTool.runs = 0
    yield
    for tool in TOOLS:
        registry.unregister(tool.slug)


# --- helpers ----------------------------------------------------------------------------


def accept(client: APIClient, instance: ToolInstance, inputs: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/api/v1/instances/{instance.pk}/execute-async", inputs, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def books(job_id: str, instance: ToolInstance) -> dict[str, Any]:
    """Everything a finished run wrote, to compare before and after a late report."""
    job = Job.objects.get(pk=job_id)
    execution = Execution.objects.get(pk=job.execution_id)
    instance = ToolInstance.objects.get(pk=instance.pk)
    return {
        "job": (job.status, job.progress, job.finished_at, job.current_step, job.attempt_log),
        "execution": (
            execution.status,
            execution.output_data,
            execution.error_code,
            execution.credits_consumed,
            execution.finished_at,
            execution.duration_ms,
        ),
        "instance": (
            instance.execution_count,
            instance.success_count,
            instance.failure_count,
            instance.credits_consumed,
            instance.total_duration_ms,
        ),
        "balance": CreditAccount.objects.get(owner_id=instance.owner_id).balance,
        "ledger": CreditLedgerEntry.objects.filter(account__owner_id=instance.owner_id).count(),
    }


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of a Server-Sent Events text; comments (keep-alives) skipped."""
    parsed = []
    for block in text.split("\n\n"):
        name, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
        if data is not None:
            parsed.append((name, data))
    return parsed


# --- 4. Progress: coalesced writes, every change published -------------------------------


@pytest.fixture
def job_row_writes(db):
    """Every UPDATE of a Job row, from any connection (the progress writer has its own), as
    recorded by an AFTER UPDATE trigger: returns a reader of (status, progress, current_step)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            CREATE TABLE test_job_row_writes (n bigserial PRIMARY KEY, job_id uuid, status text,
                                              progress int, current_step text);
            CREATE FUNCTION test_job_row_written() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO test_job_row_writes (job_id, status, progress, current_step)
                VALUES (NEW.id, NEW.status, NEW.progress, NEW.current_step);
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_job_row_written AFTER UPDATE ON executions_job
                FOR EACH ROW EXECUTE FUNCTION test_job_row_written();
            """
        )

    def read(job_id: str) -> list[tuple[str, int, str]]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT status, progress, current_step FROM test_job_row_writes WHERE job_id = %s ORDER BY n",
                [job_id],
            )
            return cursor.fetchall()

    yield read
    with connection.cursor() as cursor:
        cursor.execute(
            "DROP TRIGGER test_job_row_written ON executions_job; DROP FUNCTION test_job_row_written();"
            "DROP TABLE test_job_row_writes;"
        )


def _run_chatty(client: APIClient, user, make_instance, writes, calls: int, pause: float = 0, fail: bool = False):
    """Accept a ChattyTool job, run it here while listening to its channel; returns the job,
    its row's writes (status, progress, current_step), the published events and the seconds
    the run took."""
    instance = make_instance(ChattyTool.slug, owner=user)
    body = accept(client, instance, {"calls": calls, "pause": pause, "fail": fail})
    listener = Listener(body["job_id"])
    started = time.monotonic()
    job_run(job_id=body["job_id"], worker_name="test")
    elapsed = time.monotonic() - started
    published = listener.wait_for_terminal()
    job_writes = writes(body["job_id"])
    print(f"\n{calls} progress calls in {elapsed:.2f} s: {len(job_writes)} UPDATEs of the Job row")
    return Job.objects.get(pk=body["job_id"]), job_writes, published, elapsed


def _assert_every_change_published(published: list[dict[str, Any]], calls: int) -> None:
    progress_events = [e for e in published if e["event"] == "progress"]
    assert len(progress_events) == calls  # every change, none coalesced away
    values = [e["progress"] for e in progress_events]
    assert values == sorted(values), "progress went down in the published events"
    assert progress_events[-1]["current_step"] == f"Item {calls} of {calls}"
    assert [e["seq"] for e in published] == list(range(1, len(published) + 1)), "numbered 1, 2, 3 … in order"
    assert published[0] == {"seq": 1, "event": "state", "status": "RUNNING", "progress": 0}
    assert (published[-1]["event"], published[-1]["status"], published[-1]["progress"]) == ("state", "COMPLETED", 100)
    assert [e for e in published if e.get("status") in Job.TERMINAL] == [published[-1]]


@pytest.mark.django_db(transaction=True)
def test_progress_writes_are_coalesced_in_time_while_every_change_is_published(
    api, user, make_instance, progress_tools, job_row_writes
):
    calls = 300  # over 1.5 s or more: more than one coalescing window
    job, job_writes, published, elapsed = _run_chatty(api, user, make_instance, job_row_writes, calls, pause=0.005)

    claim, *progress_writes, outcome = job_writes
    assert claim == ("RUNNING", 0, "") and outcome[0] == "COMPLETED", job_writes
    # At most one write a second, counted from the claim; the last report goes with the outcome.
    assert 1 <= len(progress_writes) <= elapsed / PROGRESS_WRITE_INTERVAL, (len(progress_writes), elapsed)
    assert all(status == "RUNNING" and 0 < progress < 100 for status, progress, _ in progress_writes), job_writes
    _assert_every_change_published(published, calls)
    assert (job.status, job.progress) == (Job.Status.COMPLETED, 100)
    assert job.current_step == f"Item {calls} of {calls}"  # the last report was written
    assert [entry["attempt"] for entry in job.attempt_log] == [1]  # written with the outcome


@pytest.mark.django_db(transaction=True)
def test_a_run_shorter_than_the_write_interval_writes_its_job_row_twice(
    api, user, make_instance, progress_tools, job_row_writes
):
    """The claim and the outcome: the progress and the attempt log ride on the outcome's update."""
    job, job_writes, published, elapsed = _run_chatty(api, user, make_instance, job_row_writes, 50)

    assert elapsed < PROGRESS_WRITE_INTERVAL
    assert len(job_writes) == 2, job_writes
    assert (job.status, job.progress, job.current_step) == (Job.Status.COMPLETED, 100, "Item 50 of 50")
    assert job.attempt_log[0]["error_code"] == "" and job.attempt_log[0]["worker"] == "test"
    _assert_every_change_published(published, 50)


@pytest.mark.django_db(transaction=True)
def test_a_report_followed_by_a_long_step_reaches_the_database_within_the_interval(
    api, user, make_instance, progress_tools, job_row_writes
):
    instance = make_instance(ChattyTool.slug, owner=user)
    job_id = accept(api, instance, {"calls": 2, "pause": 3})["job_id"]

    def run() -> None:
        try:
            job_run(job_id=job_id, worker_name="test")
        finally:
            connections.close_all()  # this thread's connection

    runner = threading.Thread(target=run)
    started = time.monotonic()
    runner.start()
    try:
        wait_for(lambda: Job.objects.get(pk=job_id).current_step == "Item 1 of 2", timeout=2.5)
        written_after = time.monotonic() - started
    finally:
        runner.join()

    assert PROGRESS_WRITE_INTERVAL * 0.9 <= written_after < PROGRESS_WRITE_INTERVAL + 1, written_after
    assert job_row_writes(job_id)[1] == ("RUNNING", 50, "Item 1 of 2")


@pytest.mark.django_db(transaction=True)
def test_a_failed_run_keeps_its_last_progress_report(api, user, make_instance, progress_tools, job_row_writes):
    job, job_writes, published, elapsed = _run_chatty(api, user, make_instance, job_row_writes, 30, fail=True)

    assert len(job_writes) == 2, job_writes
    assert (job.status, job.progress, job.current_step) == (Job.Status.FAILED, 100, "Item 30 of 30")
    assert [entry["error_code"] for entry in job.attempt_log] == ["TOOL_ERROR"]


@pytest.mark.django_db(transaction=True)
def test_ten_thousand_progress_reports_write_the_job_row_at_most_once_a_second_and_are_all_published(
    api, user, make_instance, progress_tools, job_row_writes
):
    job, job_writes, published, elapsed = _run_chatty(api, user, make_instance, job_row_writes, PROGRESS_CALLS)

    _assert_every_change_published(published, PROGRESS_CALLS)
    assert (job.status, job.progress) == (Job.Status.COMPLETED, 100)
    assert job.current_step == f"Item {PROGRESS_CALLS} of {PROGRESS_CALLS}"
    # The claim, the outcome, and a progress write at most once a second in between.
    assert len(job_writes) <= elapsed / PROGRESS_WRITE_INTERVAL + 2, (len(job_writes), f"{elapsed:.1f} s")


@pytest.mark.django_db(transaction=True)
def test_a_progress_write_never_moves_progress_backwards_in_the_database(api, user, make_instance, progress_tools):
    instance = make_instance(ChattyTool.slug, owner=user)
    body = accept(api, instance, {"calls": 1})
    job = Job.objects.get(pk=body["job_id"])
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING, progress=60)

    sink = JobProgress(job)
    sink(30, "an older report arriving late", None, None)
    sink.flush()
    sink.take()

    assert Job.objects.get(pk=job.pk).progress == 60


@pytest.mark.django_db(transaction=True)
def test_progress_is_not_written_to_a_job_that_already_ended(api, user, make_instance, progress_tools):
    instance = make_instance(ChattyTool.slug, owner=user)
    body = accept(api, instance, {"calls": 1})
    job = Job.objects.get(pk=body["job_id"])
    assert api.post(f"/api/v1/instances/{instance.pk}/jobs/{job.pk}/cancel").status_code == 202

    sink = JobProgress(job)
    sink(90, "still going", None, None)
    sink.flush()
    sink.take()

    job.refresh_from_db()
    assert (job.status, job.progress, job.current_step) == (Job.Status.CANCELLED, 0, "")


# --- 4. Duplicate delivery ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_duplicate_delivery_runs_the_tool_once(api, user, make_instance, progress_tools):
    instance = make_instance(CountingTool.slug, owner=user)
    body = accept(api, instance, {})

    job_run(job_id=body["job_id"], worker_name="first")
    after_first = books(body["job_id"], instance)
    job_run(job_id=body["job_id"], worker_name="second")

    assert CountingTool.runs == 1
    assert books(body["job_id"], instance) == after_first
    job = Job.objects.get(pk=body["job_id"])
    assert (job.status, job.attempts, job.worker_name) == (Job.Status.COMPLETED, 1, "first")
    assert after_first["instance"][:3] == (1, 1, 0)
    assert after_first["ledger"] == 1


@pytest.mark.django_db(transaction=True)
def test_two_simultaneous_deliveries_run_the_tool_once(api, user, make_instance, progress_tools):
    instance = make_instance(CountingTool.slug, owner=user)
    body = accept(api, instance, {"seconds": 0.3})
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def deliver(name: str) -> None:
        try:
            connection.ensure_connection()
            barrier.wait(timeout=30)
            job_run(job_id=body["job_id"], worker_name=name)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver, args=(f"worker-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not errors, errors
    assert CountingTool.runs == 1
    job = Job.objects.get(pk=body["job_id"])
    assert (job.status, job.attempts) == (Job.Status.COMPLETED, 1)
    instance.refresh_from_db()
    assert (instance.execution_count, instance.success_count) == (1, 1)


# --- 4. Late reports never overwrite a terminal state -------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_late_report_on_a_cancelled_job_changes_nothing(api, user, make_instance, progress_tools):
    instance = make_instance(CountingTool.slug, owner=user)
    start_balance = CreditAccount.objects.get(owner=user).balance
    body = accept(api, instance, {})
    cancel = api.post(f"/api/v1/instances/{instance.pk}/jobs/{body['job_id']}/cancel")
    assert cancel.status_code == 202 and cancel.json()["status"] == "CANCELLED"
    before = books(body["job_id"], instance)
    job = Job.objects.select_related("execution").get(pk=body["job_id"])
    account = CreditAccount.objects.get(owner=user)
    late = Outcome(Execution.Status.COMPLETED, output={"late": True}, credits=Decimal("5"))

    assert execution_finish(execution=job.execution, outcome=late, duration_ms=10, account=account, job=job) is False
    assert (
        execution_finish(
            execution=job.execution, outcome=late, duration_ms=10, account=account, job=job, job_from=("QUEUED",)
        )
        is False
    )
    assert execution_finish(execution=job.execution, outcome=late, duration_ms=10, account=account) is False
    job_run(job_id=body["job_id"], worker_name="late delivery")

    assert books(body["job_id"], instance) == before
    assert before["job"][0] == Job.Status.CANCELLED
    assert before["execution"][:3] == (Execution.Status.CANCELLED, None, "CANCELLED")
    assert before["balance"] == start_balance  # the hold came back once, and only once
    assert before["instance"][:3] == (1, 0, 1)
    assert CountingTool.runs == 0


@pytest.mark.django_db(transaction=True)
def test_a_late_report_that_finds_the_execution_ended_writes_nothing_at_all(api, user, make_instance, progress_tools):
    """execution_finish's contract: False, and nothing written, when the execution *or* the job
    had already ended; here only the execution had (say, ended by another path)."""
    instance = make_instance(CountingTool.slug, owner=user)
    body = accept(api, instance, {})
    api.post(f"/api/v1/instances/{instance.pk}/jobs/{body['job_id']}/cancel")
    Job.objects.filter(pk=body["job_id"]).update(status=Job.Status.RUNNING, finished_at=None)
    before = books(body["job_id"], instance)
    job = Job.objects.select_related("execution").get(pk=body["job_id"])
    late = Outcome(Execution.Status.COMPLETED, output={"late": True}, credits=Decimal("5"))

    written = execution_finish(
        execution=job.execution, outcome=late, duration_ms=10, account=CreditAccount.objects.get(owner=user), job=job
    )

    assert written is False
    assert books(body["job_id"], instance) == before


@pytest.mark.django_db(transaction=True)
def test_a_tool_finishing_after_it_was_reaped_cancelled_does_not_overwrite_the_cancellation(
    api, user, make_instance, progress_tools
):
    instance = make_instance(ReapedMidwayTool.slug, owner=user)
    start_balance = CreditAccount.objects.get(owner=user).balance
    body = accept(api, instance, {})
    listener = Listener(body["job_id"])

    job_run(job_id=body["job_id"], worker_name="test")
    published = listener.wait_for_terminal()

    job = Job.objects.get(pk=body["job_id"])
    execution = Execution.objects.get(pk=body["execution_id"])
    assert job.status == Job.Status.CANCELLED
    assert (execution.status, execution.error_code, execution.output_data) == ("CANCELLED", "CANCELLED", None)
    assert execution.credits_consumed == 0
    instance.refresh_from_db()
    assert (instance.execution_count, instance.success_count, instance.failure_count) == (1, 0, 1)
    assert CreditAccount.objects.get(owner=user).balance == start_balance
    assert not CreditLedgerEntry.objects.filter(execution=execution).exists()
    terminal = [e for e in published if e.get("status") in Job.TERMINAL]
    assert [e["status"] for e in terminal] == ["CANCELLED"]  # no COMPLETED after it


# --- 5. The events stream -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("ending", ["completed", "cancelled"])
def test_events_of_a_finished_job_send_the_terminal_state_and_end_at_once(
    api, user, make_instance, progress_tools, ending
):
    instance = make_instance(CountingTool.slug, owner=user)
    body = accept(api, instance, {})
    if ending == "completed":
        job_run(job_id=body["job_id"], worker_name="test")
    else:
        api.post(f"/api/v1/instances/{instance.pk}/jobs/{body['job_id']}/cancel")

    started = time.monotonic()
    response = api.get(body["events_url"], HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    assert response.streaming
    text = b"".join(response.streaming_content).decode()
    elapsed = time.monotonic() - started

    assert response["Content-Type"].startswith("text/event-stream")
    assert response["Cache-Control"] == "no-cache"
    [(name, data)] = parse_sse(text)
    assert name == "state"
    assert data["status"] == ending.upper()
    assert data["progress"] == (100 if ending == "completed" else 0)
    assert elapsed < 2, f"the stream of a finished job took {elapsed:.1f} s to end"


@pytest.mark.django_db(transaction=True)
def test_events_of_a_queued_job_start_with_its_state_then_follow_it_to_the_end(
    api, user, make_instance, progress_tools
):
    """The stream subscribes before reading the state, so a job run right after it starts is
    followed to its terminal event (in-process here: the tool runs in a thread)."""
    instance = make_instance(ChattyTool.slug, owner=user)
    body = accept(api, instance, {"calls": 20, "pause": 0.02})
    response = api.get(body["events_url"], HTTP_ACCEPT="text/event-stream")
    stream = iter(response.streaming_content)
    first = next(stream).decode()  # the stream has subscribed and read the current state

    runner = threading.Thread(target=lambda: (job_run(job_id=body["job_id"], worker_name="t"), connection.close()))
    runner.start()
    rest = b"".join(stream).decode()
    runner.join(30)

    events_seen = parse_sse(first + rest)
    assert events_seen[0] == ("state", {**events_seen[0][1], "status": "QUEUED", "progress": 0})
    progress = [data["progress"] for name, data in events_seen if name == "progress"]
    assert progress and progress == sorted(progress)
    name, last = events_seen[-1]
    assert (name, last["status"], last["progress"]) == ("state", "COMPLETED", 100)


@pytest.mark.django_db(transaction=True)
def test_a_late_client_on_a_live_job_gets_the_current_state_then_progress_then_the_end(
    rq_worker, live_server, api, user, make_instance
):
    """A real worker runs demo-long-task; a real HTTP client joins mid-run and reads the stream."""
    rq_worker()
    instance = make_instance("demo-long-task", owner=user)
    _, token = ApiToken.issue(user=user)
    body = accept(api, instance, {"steps": 8, "step_seconds": 0.4})
    joined_at = wait_for(
        lambda: (
            (job := Job.objects.get(pk=body["job_id"])).status == Job.Status.RUNNING
            and job.progress >= 25
            and job.progress
        ),
        timeout=30,
        message="the job to be a quarter done",
    )

    address = urlsplit(live_server.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    conn.request("GET", body["events_url"], headers={"Authorization": f"Token {token}", "Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    received: list[tuple[float, str, dict[str, Any]]] = []
    block = ""
    while True:
        line = response.readline()
        if not line:
            break  # the server ended the stream
        block += line.decode()
        if line in (b"\n", b"\r\n"):
            for name, data in parse_sse(block):
                received.append((time.time(), name, data))
            block = ""
    ended_at = time.time()
    conn.close()

    job = Job.objects.get(pk=body["job_id"])
    assert job.status == Job.Status.COMPLETED
    first_at, first_name, first = received[0]
    assert first_name == "state"
    assert first["status"] == "RUNNING"
    assert first["progress"] >= joined_at  # the current state, not a replay from zero
    assert first_at < job.finished_at.timestamp(), "the first event only arrived after the job had ended"
    progress = [data["progress"] for _, name, data in received if name == "progress"]
    assert progress, "no live progress event"
    assert progress == sorted(progress) and progress[0] >= first["progress"]
    _, last_name, last = received[-1]
    assert (last_name, last["status"], last["progress"]) == ("state", "COMPLETED", 100)
    assert [data["status"] for _, _, data in received].count("COMPLETED") == 1
    assert ended_at - job.finished_at.timestamp() < 5, "the stream did not end with the job"
