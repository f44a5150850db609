"""The async flow of DESIGN.md §4 (4b → 5 → 6) and §7 over HTTP, with real RQ workers in
subprocesses (``rq_worker``): accepting a run, progress rising to COMPLETED, the result,
the live events, cancellation (queued, running, stubborn, finished), timeouts, retries,
per-owner fairness, and what reaches Redis and the worker's log (ids only).

Crash recovery (killed job processes and workers) lives in tests/test_async_recovery.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import zlib
from decimal import Decimal
from typing import Any

import django_rq
import pytest
from django.conf import settings
from django.db import transaction
from rest_framework.test import APIClient
from rq.job import Job as RQJob
from rq.job import JobStatus

from core.models import ApiToken
from credits.models import CreditAccount, CreditLedgerEntry
from executions.models import Execution, Job
from executions.services.enqueue import execution_enqueue
from instances.models import ToolInstance
from tests.conftest import wait_for
from tests.factories import UserFactory
from tests.tools import attempts_key

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ACCEPTED_KEYS = {"job_id", "execution_id", "status", "progress_url", "result_url", "events_url", "cache"}
PROGRESS_KEYS = {"status", "progress", "current_step", "steps_total", "step_index", "eta_seconds", "updated_at"}
ENVELOPE_KEYS = {"error_code", "error_message", "metadata"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


# --- helpers ----------------------------------------------------------------------------


def start_async(api: APIClient, instance: Any, inputs: Any, **headers: str) -> dict[str, Any]:
    response = api.post(f"/api/v1/instances/{instance.pk}/execute-async", inputs, format="json", **headers)
    assert response.status_code == 202, response.content
    return response.json()


def jobs_url(instance: Any, job_id: str = "") -> str:
    base = f"/api/v1/instances/{instance.pk}/jobs/"
    return f"{base}{job_id}/" if job_id else base


def get_progress(api: APIClient, instance: Any, job_id: str) -> dict[str, Any]:
    response = api.get(f"/api/v1/instances/{instance.pk}/jobs/{job_id}/progress")
    assert response.status_code == 200, response.content
    return response.json()


def get_result(api: APIClient, instance: Any, job_id: str) -> dict[str, Any]:
    response = api.get(f"/api/v1/instances/{instance.pk}/jobs/{job_id}/result")
    assert response.status_code == 200, response.content
    return response.json()


def cancel(api: APIClient, instance: Any, job_id: str) -> Any:
    return api.post(f"/api/v1/instances/{instance.pk}/jobs/{job_id}/cancel")


def job_row(job_id: str) -> Job:
    return Job.objects.select_related("execution").get(pk=job_id)


def wait_status(job_id: str, statuses: set[str] | str, *, timeout: float = 20) -> Job:
    """Poll the database (not the API, whose reads may end stale jobs themselves)."""
    wanted = {statuses} if isinstance(statuses, str) else statuses
    return wait_for(
        lambda: (row := job_row(job_id)).status in wanted and row,
        timeout=timeout,
        message=f"job {job_id} to reach {sorted(wanted)} (it is {job_row(job_id).status})",
    )


def wait_result(api: APIClient, instance: Any, job_id: str, *, timeout: float = 20) -> dict[str, Any]:
    return wait_for(
        lambda: (body := get_result(api, instance, job_id))["status"] in TERMINAL and body,
        timeout=timeout,
        interval=0.2,
        message=f"job {job_id} to end",
    )


def job_process_of(job_id: str, workers: list[Any]) -> int | None:
    """The pid of the job process that runs the job (its RQ job id is the job's id), among
    ``workers``' processes."""
    for worker in workers:
        for pid, rq_job_id in worker.job_processes().items():
            if rq_job_id == job_id:
                return pid
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_books_consistent(instance: Any, owner: Any, *, runs: int, successes: int, charged: Decimal) -> None:
    """Statistics, balance and ledger agree with the recorded executions, and nothing is left
    hanging: every hold was settled exactly once."""
    row = ToolInstance.objects.get(pk=instance.pk)
    executions = Execution.objects.filter(instance=instance)
    assert row.execution_count == runs
    assert row.success_count == successes
    assert row.failure_count == runs - successes
    assert row.execution_count == row.success_count + row.failure_count
    assert row.credits_consumed == charged
    assert executions.count() == runs
    assert not executions.exclude(status__in=Execution.TERMINAL).exists()
    assert executions.filter(status=Execution.Status.COMPLETED).count() == successes
    assert sum((e.credits_consumed for e in executions), Decimal("0")) == charged
    account = CreditAccount.objects.get(owner=owner)
    assert account.balance == settings.TOOLEXEC_DEFAULT_CREDITS - charged
    ledger = CreditLedgerEntry.objects.filter(account=account, kind=CreditLedgerEntry.Kind.EXECUTION)
    assert sum((entry.amount for entry in ledger), Decimal("0")) == -charged


def assert_error_result(body: dict[str, Any], status: str, code: str) -> None:
    assert body["status"] == status, body
    assert ENVELOPE_KEYS <= set(body), body
    assert body["error_code"] == code
    assert isinstance(body["error_message"], str) and len(body["error_message"].split()) >= 4
    assert isinstance(body["metadata"]["action_items"], list)


def client_for(user: Any) -> APIClient:
    _, key = ApiToken.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


# --- 4b: accepting a run ----------------------------------------------------------------


def test_execute_async_answers_202_and_records_a_pending_execution_and_a_queued_job(api, user, make_instance):
    instance = make_instance("demo-long-task", owner=user)

    body = start_async(api, instance, {"steps": 3, "step_seconds": 0.1})

    assert set(body) == ACCEPTED_KEYS
    assert body["status"] == "QUEUED"
    job_id, execution_id = body["job_id"], body["execution_id"]
    uuid.UUID(job_id), uuid.UUID(execution_id)
    base = f"/api/v1/instances/{instance.pk}/jobs/{job_id}"
    assert body["progress_url"] == f"{base}/progress"
    assert body["result_url"] == f"{base}/result"
    assert body["events_url"] == f"{base}/events"
    job = job_row(job_id)
    assert job.status == Job.Status.QUEUED
    assert str(job.execution_id) == execution_id
    assert job.execution.mode == "ASYNC"
    assert job.execution.status == Execution.Status.PENDING
    assert job.execution.input_data == {"steps": 3, "step_seconds": 0.1}
    # Enqueued with our own job id, carrying that id only.
    assert job.rq_job_id == job_id
    rq_job = RQJob.fetch(job_id, connection=django_rq.get_connection("default"))
    assert rq_job.func_name == "executions.jobs.run"
    assert rq_job.args == (job_id,)
    assert rq_job.kwargs == {}
    assert rq_job.get_status() == JobStatus.QUEUED
    assert job_id in django_rq.get_queue("default").job_ids
    # The tool's minimum price is held until the run ends.
    assert CreditAccount.objects.get(owner=user).balance == settings.TOOLEXEC_DEFAULT_CREDITS - Decimal("0.01")


def test_nothing_is_enqueued_when_the_accepting_transaction_rolls_back(user, make_instance):
    instance = make_instance("demo-long-task", owner=user)
    queue = django_rq.get_queue("default")

    with pytest.raises(RuntimeError), transaction.atomic():
        execution_enqueue(instance=instance, inputs={"steps": 1})
        raise RuntimeError("the request failed after accepting")

    assert queue.count == 0
    assert not Job.objects.exists()
    assert not Execution.objects.exists()


def test_sync_only_tool_answers_409_mode_not_supported_and_records_nothing(api, user, make_instance):
    instance = make_instance("test-priced", owner=user)

    response = api.post(f"/api/v1/instances/{instance.pk}/execute-async", {"units": 1}, format="json")

    assert response.status_code == 409, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "MODE_NOT_SUPPORTED"
    assert "sync" in body["error_message"]
    assert body["metadata"]["action_items"]
    assert not Job.objects.exists() and not Execution.objects.exists()
    assert django_rq.get_queue("default").count == 0


@pytest.mark.parametrize(
    ("prepare", "inputs", "status", "code"),
    [
        ("nothing", {"echo": 5}, 400, "INPUT_INVALID"),
        ("nothing", ["not", "an", "object"], 400, "INPUT_INVALID"),
        ("disable", {"echo": "hi"}, 409, "INSTANCE_DISABLED"),
        ("no_credits", {"echo": "hi"}, 402, "INSUFFICIENT_CREDITS"),
    ],
)
def test_execute_async_refuses_like_execute_sync_with_the_same_envelope(
    api, user, make_instance, prepare, inputs, status, code
):
    instance = make_instance("test-noop", owner=user)
    if prepare == "disable":
        assert api.post(f"/api/v1/instances/{instance.pk}/disable").status_code == 200
    if prepare == "no_credits":
        # test-noop is free: price it so an empty account cannot pay for it.
        instance.tool.base_credits = Decimal("1")
        instance.tool.save(update_fields=["base_credits"])
        CreditAccount.objects.filter(owner=user).update(balance=Decimal("0"))

    sync = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", inputs, format="json")
    run_async = api.post(f"/api/v1/instances/{instance.pk}/execute-async", inputs, format="json")

    assert sync.status_code == status, sync.content
    assert run_async.status_code == status, run_async.content
    assert run_async.json()["error_code"] == code
    assert run_async.json() == sync.json()
    assert not Job.objects.exists()
    assert django_rq.get_queue("default").count == 0


def test_jobs_list_shows_the_instance_jobs_newest_first_and_only_to_their_owner(api, other_api, user, make_instance):
    instance = make_instance("demo-long-task", owner=user)
    elsewhere = make_instance("demo-long-task", owner=user, name="another instance")
    ids = [start_async(api, instance, {"steps": 1})["job_id"] for _ in range(3)]
    start_async(api, elsewhere, {"steps": 1})

    response = api.get(jobs_url(instance))

    assert response.status_code == 200, response.content
    rows = response.json()["results"]
    assert [row["job_id"] for row in rows] == list(reversed(ids))
    assert {row["status"] for row in rows} == {"QUEUED"}
    assert {row["instance_id"] for row in rows} == {str(instance.pk)}
    assert rows[0]["tool_definition_id"] == "demo-long-task"
    assert other_api.get(jobs_url(instance)).status_code == 404
    assert other_api.get(f"/api/v1/instances/{instance.pk}/jobs/{ids[0]}/progress").status_code == 404


# --- 5 → 6: a run on a real worker --------------------------------------------------------


def test_progress_rises_to_completed_and_the_result_is_served(api, user, make_instance, rq_worker):
    instance = make_instance("demo-long-task", owner=user)
    rq_worker()
    # Polled from the database, which gets the latest report once a second: over 4.8 s.
    job_id = start_async(api, instance, {"steps": 8, "step_seconds": 0.6})["job_id"]

    seen: list[dict[str, Any]] = []
    running_result = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = get_progress(api, instance, job_id)
        assert set(state) == PROGRESS_KEYS
        seen.append(state)
        if state["status"] == "RUNNING" and 0 < state["progress"] < 100 and running_result is None:
            running_result = get_result(api, instance, job_id)
        if state["status"] in TERMINAL:
            break
        time.sleep(0.1)

    assert seen[-1]["status"] == "COMPLETED", seen[-1]
    percents = [state["progress"] for state in seen]
    assert percents == sorted(percents), f"progress went down: {percents}"
    rising = sorted({s["progress"] for s in seen if s["status"] == "RUNNING" and 0 < s["progress"] < 100})
    assert len(rising) >= 3, f"expected to watch progress rise, saw {percents}"
    running = [state for state in seen if state["status"] == "RUNNING" and state["progress"] > 0]
    assert running[-1]["steps_total"] == 8
    assert running[-1]["current_step"].startswith("Step ")
    assert all(isinstance(state["eta_seconds"], int | float) for state in running if state["progress"] < 100)
    indexes = [state["step_index"] for state in running]
    assert indexes == sorted(indexes)
    assert seen[-1]["progress"] == 100

    assert running_result is not None, "never saw the job running"
    assert running_result["status"] == "RUNNING"
    assert running_result["result"] is None
    assert set(running_result["progress"]) == PROGRESS_KEYS

    result = get_result(api, instance, job_id)
    assert set(result) == {"status", "result", "credits_consumed", "duration_ms", "cache"}
    assert result["status"] == "COMPLETED"
    assert result["result"] == {"steps_completed": 8, "seconds": pytest.approx(4.8)}
    assert (result["cache"]["status"], result["cache"]["miss_reason"]) == ("MISS", "no_entry")  # and kept
    assert result["credits_consumed"] == 0.01
    assert result["duration_ms"] >= 4800

    job = job_row(job_id)
    assert job.execution.status == Execution.Status.COMPLETED
    assert job.attempts == 1
    assert job.finished_at is not None and job.worker_name
    assert job.sealed_inputs == ""  # the job's copy of its inputs is dropped once it ends
    assert_books_consistent(instance, user, runs=1, successes=1, charged=Decimal("0.01"))
    listed = api.get(jobs_url(instance)).json()["results"]
    assert listed[0]["status"] == "COMPLETED" and listed[0]["progress"] == 100


def test_events_stream_follows_progress_to_the_terminal_state(api, user, make_instance, rq_worker):
    instance = make_instance("demo-long-task", owner=user)
    rq_worker()
    job_id = start_async(api, instance, {"steps": 5, "step_seconds": 0.3})["job_id"]
    wait_status(job_id, "RUNNING")

    response = api.get(f"/api/v1/instances/{instance.pk}/jobs/{job_id}/events")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    events: list[dict[str, Any]] = []

    def listen() -> None:
        for chunk in response.streaming_content:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            for line in text.splitlines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: ") :]))

    # In a thread, so a stream that never ends fails the test instead of hanging it.
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    listener.join(timeout=30)
    assert not listener.is_alive(), f"the stream did not end; events so far: {events}"
    assert events[-1]["status"] == "COMPLETED"
    assert events[-1]["progress"] == 100
    progress = [event["progress"] for event in events if "progress" in event]
    assert progress == sorted(progress)
    assert any(event.get("event") == "progress" for event in events), events


# --- cancellation -------------------------------------------------------------------------


def test_cancelled_queued_job_never_starts_and_returns_its_held_credits(api, user, make_instance, rq_worker):
    instance = make_instance("demo-long-task", owner=user)
    job_id = start_async(api, instance, {"steps": 2, "step_seconds": 0.1})["job_id"]

    response = cancel(api, instance, job_id)

    assert response.status_code == 202, response.content
    assert response.json()["status"] == "CANCELLED"
    rq_worker()
    follow_up = start_async(api, instance, {"steps": 1, "step_seconds": 0})["job_id"]
    wait_status(follow_up, "COMPLETED")  # the worker went through the queue past the cancelled one
    job = job_row(job_id)
    assert job.status == Job.Status.CANCELLED
    assert job.attempts == 0 and job.started_at is None and job.worker_name == ""
    assert job.execution.started_at is None
    assert_error_result(get_result(api, instance, job_id), "CANCELLED", "CANCELLED")
    assert_books_consistent(instance, user, runs=2, successes=1, charged=Decimal("0.01"))


def test_cancelled_running_job_stops_at_its_next_check(api, user, make_instance, rq_worker):
    instance = make_instance("demo-long-task", owner=user)
    worker = rq_worker()
    job_id = start_async(api, instance, {"steps": 100, "step_seconds": 0.2})["job_id"]
    wait_for(lambda: get_progress(api, instance, job_id)["progress"] >= 2, message="the job to make progress")

    response = cancel(api, instance, job_id)
    asked = time.monotonic()

    assert response.status_code == 202, response.content
    assert response.json()["status"] in {"RUNNING", "CANCELLED"}
    body = wait_result(api, instance, job_id, timeout=10)
    assert time.monotonic() - asked < 5, "a cooperative tool stops at its next check"
    assert_error_result(body, "CANCELLED", "CANCELLED")
    assert body["metadata"]["job_id"] == job_id
    job = job_row(job_id)
    assert job.progress < 100
    assert job.execution.status == Execution.Status.CANCELLED
    assert job.cancel_requested_at is not None
    wait_for(lambda: worker.running_job() is None, timeout=5, message="the job process to be done with the job")
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))


def test_cancelled_stubborn_job_is_stopped_through_rq_with_a_single_worker(
    api, user, make_instance, rq_worker, settings
):
    settings.TOOLEXEC_CANCEL_GRACE_SECONDS = 1
    instance = make_instance("test-stubborn", owner=user)
    worker = rq_worker(TOOLEXEC_CANCEL_GRACE_SECONDS="1")
    job_id = start_async(api, instance, {"seconds": 12})["job_id"]
    wait_status(job_id, "RUNNING")
    wait_for(lambda: job_process_of(job_id, [worker]), message="the job process")

    assert cancel(api, instance, job_id).status_code == 202

    job = wait_status(job_id, TERMINAL, timeout=8)
    assert job.status == Job.Status.CANCELLED
    wait_for(lambda: not job_process_of(job_id, [worker]), timeout=5, message="the tool to be stopped")


def test_cancelled_stubborn_job_is_stopped_through_rq_by_another_workers_reaper(
    api, user, make_instance, rq_worker, settings
):
    fast = {
        "TOOLEXEC_CANCEL_GRACE_SECONDS": "1",
        "TOOLEXEC_JOB_STALE_SECONDS": "6",
        "TOOLEXEC_JOB_HEARTBEAT_SECONDS": "1",
    }
    settings.TOOLEXEC_CANCEL_GRACE_SECONDS = 1
    settings.TOOLEXEC_JOB_STALE_SECONDS = 6
    instance = make_instance("test-stubborn", owner=user)
    workers = [rq_worker(**fast), rq_worker(**fast)]
    job_id = start_async(api, instance, {"seconds": 30})["job_id"]
    wait_status(job_id, "RUNNING")
    wait_for(lambda: job_process_of(job_id, workers), message="the job process")

    assert cancel(api, instance, job_id).status_code == 202
    asked = time.monotonic()

    job = wait_status(job_id, TERMINAL, timeout=15)
    assert job.status == Job.Status.CANCELLED
    wait_for(lambda: not job_process_of(job_id, workers), timeout=5, message="RQ's stop-job command to stop the tool")
    assert time.monotonic() - asked < 15
    assert_error_result(get_result(api, instance, job_id), "CANCELLED", "CANCELLED")
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))
    # The workers carry on.
    follow_up = start_async(api, make_instance("demo-long-task", owner=user), {"steps": 1, "step_seconds": 0})
    wait_status(follow_up["job_id"], "COMPLETED")


def test_cancelling_a_finished_job_answers_409_and_changes_nothing(api, user, make_instance, rq_worker):
    instance = make_instance("demo-long-task", owner=user)
    rq_worker()
    job_id = start_async(api, instance, {"steps": 1, "step_seconds": 0})["job_id"]
    wait_status(job_id, "COMPLETED")

    response = cancel(api, instance, job_id)

    assert response.status_code == 409, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error_code"]
    assert "ended" in body["error_message"] or "finished" in body["error_message"]
    job = job_row(job_id)
    assert job.status == Job.Status.COMPLETED and job.cancel_requested_at is None
    assert get_result(api, instance, job_id)["status"] == "COMPLETED"
    assert_books_consistent(instance, user, runs=1, successes=1, charged=Decimal("0.01"))


# --- timeouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("cooperative", [False, True], ids=["hard-rq-timeout", "cooperative"])
def test_job_over_the_tools_timeout_ends_timed_out_in_words(api, user, make_instance, rq_worker, cooperative):
    instance = make_instance("test-hard-sleep", owner=user)
    worker = rq_worker()
    job_id = start_async(api, instance, {"seconds": 20, "cooperative": cooperative})["job_id"]
    rq_job = RQJob.fetch(job_id, connection=django_rq.get_connection("default"))
    assert rq_job.timeout == 2  # the tool's timeout_seconds is the RQ job timeout

    body = wait_result(api, instance, job_id, timeout=15)

    assert_error_result(body, "TIMED_OUT", "TIMEOUT")
    assert "2 seconds" in body["error_message"]
    assert "Test Hard Sleep" in body["error_message"]
    job = job_row(job_id)
    assert job.execution.status == Execution.Status.TIMED_OUT
    assert 1500 <= job.execution.duration_ms < 10_000
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))
    # The worker survives its timed-out job.
    wait_for(lambda: worker.running_job() is None, timeout=5, message="the job process to be done with the job")
    follow_up = start_async(api, make_instance("demo-long-task", owner=user), {"steps": 1, "step_seconds": 0})
    wait_status(follow_up["job_id"], "COMPLETED")


# --- retries --------------------------------------------------------------------------------


def test_retryable_failure_is_retried_with_backoff_until_it_succeeds(api, user, make_instance, rq_worker):
    instance = make_instance("test-flaky", owner=user)
    rq_worker()
    accepted = start_async(api, instance, {"failures": 2})

    body = wait_result(api, instance, accepted["job_id"], timeout=12)

    assert body["status"] == "COMPLETED", body
    assert body["result"] == {"attempt": 3}
    job = job_row(accepted["job_id"])
    assert job.attempts == 3 and job.max_attempts == 3
    assert [entry["error_code"] for entry in job.attempt_log] == ["UPSTREAM_RATE_LIMITED", "UPSTREAM_RATE_LIMITED", ""]
    assert int(django_rq.get_connection("default").get(attempts_key(accepted["execution_id"]))) == 3
    assert_books_consistent(instance, user, runs=1, successes=1, charged=Decimal("0"))


def test_retries_stop_after_max_attempts_and_the_job_fails_with_the_last_error(api, user, make_instance, rq_worker):
    instance = make_instance("test-flaky", owner=user)
    rq_worker()
    accepted = start_async(api, instance, {"failures": 10})

    body = wait_result(api, instance, accepted["job_id"], timeout=12)

    assert_error_result(body, "FAILED", "UPSTREAM_RATE_LIMITED")
    job = job_row(accepted["job_id"])
    assert job.attempts == 3
    assert len(job.attempt_log) == 3
    assert int(django_rq.get_connection("default").get(attempts_key(accepted["execution_id"]))) == 3
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))


def test_non_idempotent_tool_is_never_retried_automatically(api, user, make_instance, rq_worker):
    instance = make_instance("test-flaky-unsafe", owner=user)
    rq_worker()
    accepted = start_async(api, instance, {"failures": 1})

    body = wait_result(api, instance, accepted["job_id"], timeout=15)
    time.sleep(2)  # a retry, had one been scheduled, would be due by now

    assert_error_result(body, "FAILED", "UPSTREAM_RATE_LIMITED")
    assert body["metadata"]["can_retry"] is True  # the caller may try again by hand
    job = job_row(accepted["job_id"])
    assert job.status == Job.Status.FAILED
    assert job.attempts == 1 and job.max_attempts == 1
    assert int(django_rq.get_connection("default").get(attempts_key(accepted["execution_id"]))) == 1
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))


# --- fairness -------------------------------------------------------------------------------


def _watch_running(owner: Any, job_ids: list[str], *, timeout: float) -> tuple[int, list[Job]]:
    """Poll until every job ended; return the most jobs of ``owner`` seen RUNNING at once."""
    most = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        most = max(most, Job.objects.filter(owner=owner, status=Job.Status.RUNNING).count())
        rows = list(Job.objects.filter(pk__in=job_ids))
        if all(row.status in TERMINAL for row in rows):
            return most, rows
        time.sleep(0.05)
    return most, list(Job.objects.filter(pk__in=job_ids))


def test_an_owner_runs_at_most_their_share_of_jobs_and_the_rest_wait_their_turn(api, user, make_instance, rq_worker):
    instance = make_instance("demo-long-task", owner=user)
    workers = [rq_worker(TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER="2") for _ in range(3)]
    assert len(workers) == 3
    # Cache-Control: no-store, or the three identical runs would collapse into one (issue 21).
    no_store = {"HTTP_CACHE_CONTROL": "no-store"}
    ids = [start_async(api, instance, {"steps": 4, "step_seconds": 0.5}, **no_store)["job_id"] for _ in range(3)]

    wait_for(
        lambda: Job.objects.filter(pk__in=ids, status=Job.Status.RUNNING).count() == 2,
        message="two jobs to run",
    )
    time.sleep(0.5)  # the third worker has had time to take the third job
    assert Job.objects.filter(pk__in=ids, status=Job.Status.QUEUED).count() == 1
    most, rows = _watch_running(user, ids, timeout=12)

    assert most <= 2
    assert {row.status for row in rows} == {"COMPLETED"}, [(row.pk, row.status) for row in rows]
    assert_books_consistent(instance, user, runs=3, successes=3, charged=Decimal("0.03"))


def test_default_share_is_four_running_jobs_per_owner(settings):
    assert settings.TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER == 4


def test_an_owner_at_their_share_does_not_hold_up_another_owner(api, user, make_instance, rq_worker):
    other = UserFactory()
    other_api = client_for(other)
    mine = make_instance("demo-long-task", owner=user)
    theirs = make_instance("demo-long-task", owner=other)
    for _ in range(2):
        rq_worker(TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER="1")
    first = start_async(api, mine, {"steps": 20, "step_seconds": 0.3})["job_id"]
    wait_status(first, "RUNNING")
    waiting = start_async(api, mine, {"steps": 1, "step_seconds": 0})["job_id"]
    # The idle worker takes the second job and does not run it: its owner is at their share.
    wait_for(lambda: django_rq.get_queue("default").count == 0, message="the idle worker to take the job")
    time.sleep(0.5)

    assert job_row(waiting).status == Job.Status.QUEUED
    other_job = start_async(other_api, theirs, {"steps": 1, "step_seconds": 0})["job_id"]
    wait_status(other_job, "COMPLETED", timeout=10)
    assert job_row(first).status == Job.Status.RUNNING
    assert job_row(waiting).status == Job.Status.QUEUED
    assert job_row(waiting).attempts == 0
    cancel(api, mine, first)  # done here: let the workers stop quickly


# --- what reaches Redis and the logs ----------------------------------------------------------

MARKER = "input-marker-7f3a9c51"


def _redis_values(connection: Any) -> list[bytes]:
    """Every key and value in our Redis database, compressed job data unpacked as well."""
    values: list[bytes] = []
    for key in connection.scan_iter(count=1000):
        kind = connection.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            items = [connection.get(key)]
        elif kind == "hash":
            items = [part for pair in connection.hgetall(key).items() for part in pair]
        elif kind == "list":
            items = connection.lrange(key, 0, -1)
        elif kind == "set":
            items = list(connection.smembers(key))
        elif kind == "zset":
            items = connection.zrange(key, 0, -1)
        elif kind == "stream":
            items = [repr(connection.xrange(key)).encode()]
        else:
            items = []
        for item in [key, *items]:
            raw = item.encode() if isinstance(item, str) else (item or b"")
            values.append(raw)
            try:
                values.append(zlib.decompress(raw))
            except zlib.error:
                pass
    return values


def test_redis_holds_only_ids_and_the_worker_logs_no_inputs(api, user, make_instance, rq_worker):
    instance = make_instance("test-noop", owner=user)
    connection = django_rq.get_connection("default")
    job_id = start_async(api, instance, {"echo": MARKER})["job_id"]

    rq_job = RQJob.fetch(job_id, connection=connection)
    assert rq_job.args == (job_id,)
    assert rq_job.kwargs == {}
    assert MARKER not in (rq_job.description or "")
    queued = _redis_values(connection)
    assert queued, "the queued job is in Redis"
    assert not [value for value in queued if MARKER.encode() in value]

    worker = rq_worker()
    wait_status(job_id, "COMPLETED")
    assert get_result(api, instance, job_id)["result"] == {"echo": MARKER}

    assert not [value for value in _redis_values(connection) if MARKER.encode() in value]
    log = worker.log()
    assert job_id in log, "the worker logs job ids"
    assert MARKER not in log


def test_result_of_a_job_not_yet_started_says_so_with_its_progress(api, user, make_instance):
    """No worker is running: the job waits QUEUED, and a read does not take it for lost."""
    instance = make_instance("demo-long-task", owner=user)
    job_id = start_async(api, instance, {"steps": 1})["job_id"]
    Job.objects.filter(pk=job_id).update(heartbeat_at=None)

    assert get_progress(api, instance, job_id)["status"] == "QUEUED"
    assert get_result(api, instance, job_id) == {
        "status": "QUEUED",
        "result": None,
        "progress": get_progress(api, instance, job_id),
    }
