"""Crash recovery of async jobs (DESIGN.md §7) with real workers in subprocesses: a killed job
process, a killed supervisor (its job processes die with it; their jobs are noticed by another
worker's reaper, or by a read of the job), a frozen worker whose late report must not overwrite
the terminal state, and a long quiet job that must not be taken for lost while its worker lives."""

from __future__ import annotations

import os
import signal
import threading
import time
from decimal import Decimal
from typing import Any

import django_rq
import pytest
from django.conf import settings
from rq.job import Job as RQJob
from rq.job import JobStatus

from credits.models import CreditLedgerEntry
from executions.models import Execution, Job
from tests.conftest import wait_for
from tests.test_async_worker import (
    TERMINAL,
    alive,
    assert_books_consistent,
    assert_error_result,
    get_progress,
    get_result,
    job_process_of,
    job_row,
    start_async,
    wait_result,
    wait_status,
)
from tests.tools import attempts_key

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

DEFAULT_LIMIT_SECONDS = 60  # the issue: a lost job ends within 60 s in the default configuration
FAST = {"TOOLEXEC_JOB_STALE_SECONDS": "4", "TOOLEXEC_JOB_HEARTBEAT_SECONDS": "1"}


def kill_whole_worker(worker: Any) -> None:
    """SIGKILL the supervisor alone: its job processes and scheduler must die with it."""
    children = worker.children()
    os.kill(worker.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    for pid in children:
        wait_for(lambda pid=pid: not alive(pid), timeout=5, message=f"process {pid} to die with its supervisor")


def running_process(workers: list[Any], job_id: str) -> tuple[Any, int]:
    """Wait for ``job_id`` to run, then return its worker and the pid of its job process."""
    wait_for(lambda: get_row_progress(job_id) > 0, message="the job to make progress")
    found = wait_for(
        lambda: next(((w, pid) for w in workers if (pid := job_process_of(job_id, [w]))), None),
        message="the job process",
    )
    return found


def get_row_progress(job_id: str) -> int:
    row = job_row(job_id)
    return row.progress if row.status == Job.Status.RUNNING else 0


def assert_worker_lost(api: Any, instance: Any, job_id: str) -> None:
    body = get_result(api, instance, job_id)
    assert_error_result(body, "FAILED", "WORKER_LOST")
    assert body["metadata"]["job_id"] == job_id
    assert "worker" in body["error_message"].lower()
    job = job_row(job_id)
    assert job.execution.status == Execution.Status.FAILED
    assert job.execution.error_code == "WORKER_LOST"
    assert job.finished_at is not None and job.execution.finished_at is not None
    assert job.sealed_inputs.startswith("gAAAAA")  # a failed job keeps its inputs, sealed, for a retry


def test_defaults_are_the_ones_the_60_second_promise_is_made_for():
    assert settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS == 5
    assert settings.TOOLEXEC_JOB_STALE_SECONDS == 20


def test_sigkill_of_the_job_process_ends_the_job_failed_worker_lost_and_the_worker_carries_on(
    api, user, make_instance, rq_worker
):
    instance = make_instance("demo-long-task", owner=user)
    worker = rq_worker()  # the default configuration
    job_id = start_async(api, instance, {"steps": 100, "step_seconds": 0.3})["job_id"]
    _, process = running_process([worker], job_id)

    os.kill(process, signal.SIGKILL)
    killed = time.monotonic()

    wait_status(job_id, "FAILED", timeout=DEFAULT_LIMIT_SECONDS)
    assert time.monotonic() - killed < 5, "the supervisor records the loss at once"
    assert worker.process.poll() is None, "the worker survives its job process"
    assert_worker_lost(api, instance, job_id)
    assert get_progress(api, instance, job_id)["status"] == "FAILED"
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))

    follow_up = start_async(api, instance, {"steps": 2, "step_seconds": 0.1})["job_id"]
    assert wait_result(api, instance, follow_up)["status"] == "COMPLETED"
    assert job_row(job_id).status == Job.Status.FAILED
    assert_books_consistent(instance, user, runs=2, successes=1, charged=Decimal("0.01"))


def test_sigkill_of_the_whole_worker_ends_the_job_worker_lost_within_60_s_by_another_workers_reaper(
    api, user, make_instance, rq_worker
):
    """Default configuration, and nobody reads the job: the other worker's reaper ends it."""
    instance = make_instance("demo-long-task", owner=user)
    workers = [rq_worker(), rq_worker()]
    job_id = start_async(api, instance, {"steps": 200, "step_seconds": 0.5})["job_id"]
    victim, process = running_process(workers, job_id)

    kill_whole_worker(victim)
    killed = time.monotonic()

    assert not alive(process)
    assert job_row(job_id).status == Job.Status.RUNNING  # nobody has noticed yet
    wait_status(job_id, TERMINAL, timeout=DEFAULT_LIMIT_SECONDS)
    took = time.monotonic() - killed
    assert took < DEFAULT_LIMIT_SECONDS
    # Not before the heartbeat went stale: a live job is never ended early.
    assert took > settings.TOOLEXEC_JOB_STALE_SECONDS - settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS - 1
    assert_worker_lost(api, instance, job_id)
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))

    survivor = next(w for w in workers if w is not victim)
    assert survivor.process.poll() is None
    follow_up = start_async(api, instance, {"steps": 1, "step_seconds": 0})["job_id"]
    assert wait_result(api, instance, follow_up)["status"] == "COMPLETED"


def test_a_lost_job_is_reaped_even_while_the_surviving_worker_is_busy(api, user, make_instance, rq_worker, settings):
    settings.TOOLEXEC_JOB_STALE_SECONDS = 4
    settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS = 1
    instance = make_instance("demo-long-task", owner=user)
    workers = [rq_worker(**FAST), rq_worker(**FAST)]
    lost = start_async(api, instance, {"steps": 200, "step_seconds": 0.5})["job_id"]
    victim, _ = running_process(workers, lost)
    survivor = next(w for w in workers if w is not victim)
    busy = start_async(api, instance, {"steps": 100, "step_seconds": 0.2})["job_id"]
    running_process([survivor], busy)

    kill_whole_worker(victim)
    try:
        # Stale after 4 s; the survivor's heartbeat runs every second: 12 s is plenty.
        assert wait_status(lost, TERMINAL, timeout=12).status == Job.Status.FAILED
    finally:
        api.post(f"/api/v1/instances/{instance.pk}/jobs/{busy}/cancel")
    assert job_row(busy).status in {Job.Status.RUNNING, Job.Status.CANCELLED}


def test_sigkill_of_the_only_worker_is_noticed_by_a_read_once_the_heartbeat_is_stale(
    api, user, make_instance, rq_worker, settings
):
    settings.TOOLEXEC_JOB_STALE_SECONDS = 4
    settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS = 1
    instance = make_instance("demo-long-task", owner=user)
    worker = rq_worker(**FAST)
    job_id = start_async(api, instance, {"steps": 200, "step_seconds": 0.5})["job_id"]
    running_process([worker], job_id)

    kill_whole_worker(worker)
    killed = time.monotonic()

    state = wait_for(
        lambda: (body := get_progress(api, instance, job_id))["status"] in TERMINAL and body,
        timeout=15,
        interval=0.5,
        message="a read to end the lost job",
    )
    assert state["status"] == "FAILED"
    assert 0 < state["progress"] < 100
    assert time.monotonic() - killed < 15
    assert_worker_lost(api, instance, job_id)
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))


def test_a_late_report_from_a_frozen_worker_never_overwrites_the_terminal_state(
    api, user, make_instance, rq_worker, settings
):
    settings.TOOLEXEC_JOB_STALE_SECONDS = 4
    settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS = 1
    instance = make_instance("demo-long-task", owner=user)
    worker = rq_worker(**FAST)
    job_id = start_async(api, instance, {"steps": 10, "step_seconds": 0.4})["job_id"]
    _, process = running_process([worker], job_id)
    frozen = [worker.pid, process]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    # Should the process freeze holding a row lock, the read below would wait for it: thaw anyway.
    safety = threading.Timer(25, lambda: [os.kill(pid, signal.SIGCONT) for pid in reversed(frozen)])
    safety.start()
    try:
        body = wait_for(
            lambda: (body := get_result(api, instance, job_id))["status"] in TERMINAL and body,
            timeout=15,
            interval=0.5,
            message="a read to end the silent job",
        )
        assert_error_result(body, "FAILED", "WORKER_LOST")
        lost_at = job_row(job_id)
    finally:
        safety.cancel()
        for pid in reversed(frozen):
            os.kill(pid, signal.SIGCONT)

    # The job process wakes up, finishes the tool and reports COMPLETED, too late.
    connection = django_rq.get_connection("default")
    wait_for(
        lambda: RQJob.fetch(job_id, connection=connection).get_status() in {JobStatus.FINISHED, JobStatus.FAILED},
        timeout=15,
        message="the job process to finish its late run",
    )
    wait_for(lambda: job_process_of(job_id, [worker]) is None, timeout=5, message="the job process to be done with it")
    time.sleep(1.5)  # and the worker's own heartbeat and bookkeeping after it

    job = job_row(job_id)
    assert job.status == Job.Status.FAILED
    assert job.progress == lost_at.progress < 100
    assert job.finished_at == lost_at.finished_at
    assert job.execution.status == Execution.Status.FAILED
    assert job.execution.error_code == "WORKER_LOST"
    assert job.execution.output_data is None
    assert_books_consistent(instance, user, runs=1, successes=0, charged=Decimal("0"))
    assert not CreditLedgerEntry.objects.exists()
    assert_error_result(get_result(api, instance, job_id), "FAILED", "WORKER_LOST")


def test_a_long_quiet_job_is_not_taken_for_lost_while_its_worker_lives(api, user, make_instance, rq_worker, settings):
    """No progress for longer than the stale time: the worker's heartbeat keeps it alive, for
    reads and for another worker's reaper alike."""
    settings.TOOLEXEC_JOB_STALE_SECONDS = 4
    settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS = 1
    instance = make_instance("test-stubborn", owner=user)
    for _ in range(2):
        rq_worker(**FAST)
    job_id = start_async(api, instance, {"seconds": 9})["job_id"]
    wait_status(job_id, "RUNNING")

    statuses = set()
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        status = get_progress(api, instance, job_id)["status"]
        statuses.add(status)
        if status in TERMINAL:
            break
        time.sleep(0.5)

    assert status == "COMPLETED", statuses
    assert get_result(api, instance, job_id)["result"] == {"done": True}
    assert_books_consistent(instance, user, runs=1, successes=1, charged=Decimal("0"))


def test_a_lost_job_of_a_tool_that_allows_it_is_retried_and_completes(api, user, make_instance, rq_worker):
    instance = make_instance("test-resumable", owner=user)
    worker = rq_worker()
    accepted = start_async(api, instance, {"seconds": 30})
    job_id = accepted["job_id"]
    _, process = running_process([worker], job_id)

    os.kill(process, signal.SIGKILL)

    body = wait_result(api, instance, job_id, timeout=10)
    assert body["status"] == "COMPLETED", body
    assert body["result"] == {"attempt": 2}
    job = job_row(job_id)
    assert job.attempts == 2
    assert [entry["error_code"] for entry in job.attempt_log] == ["WORKER_LOST", ""]
    assert int(django_rq.get_connection("default").get(attempts_key(accepted["execution_id"]))) == 2
    assert_books_consistent(instance, user, runs=1, successes=1, charged=Decimal("0"))


def test_a_job_never_ends_alone_when_its_execution_has_already_ended(api, user, make_instance):
    """The outcome ends the job only with its execution, in one transaction, so the two rows
    can't disagree (execution_finish)."""
    from executions.services.jobs import job_claim
    from executions.services.runs import Outcome, execution_finish

    instance = make_instance("test-noop", owner=user)
    job = Job.objects.get(pk=start_async(api, instance, {})["job_id"])
    assert job_claim(job_id=job.pk, worker_name="test")
    Execution.objects.filter(pk=job.execution_id).update(status=Execution.Status.CANCELLED)

    done = Outcome(Execution.Status.COMPLETED, output={"echo": None})
    assert not execution_finish(execution=job.execution, outcome=done, duration_ms=5, account=None, job=job)

    job.refresh_from_db()
    assert (job.status, job.finished_at, job.execution.status) == (Job.Status.RUNNING, None, "CANCELLED")
    instance.refresh_from_db()
    assert instance.execution_count == 0  # nothing after the job's write ran either
