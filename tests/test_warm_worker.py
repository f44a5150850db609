"""The warm worker (`manage.py toolexec_worker`, executions/worker.py; DESIGN.md §7) with real
processes: job processes that run many jobs each, recycled after a number of jobs or above a
memory limit; hard timeouts of tools that never return to a check point, including one that
cannot be interrupted at all; cancelling such a tool; a warm shutdown; and a job's secrets gone
from the process once the job has ended.

Crash recovery (a killed job process, a killed supervisor) is in tests/test_async_recovery.py."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from executions.models import Job
from instances.services.credentials import credential_create, instance_configure_credentials
from tests.conftest import wait_for
from tests.test_async_recovery import running_process
from tests.test_async_worker import (
    TERMINAL,
    alive,
    assert_error_result,
    cancel,
    get_progress,
    get_result,
    job_process_of,
    start_async,
    wait_result,
    wait_status,
)
from tests.tools import WARM_WORKER_TOOLS
from tools import registry
from tools.services import catalog_sync

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def warm_tools(catalog):
    for tool in WARM_WORKER_TOOLS:
        registry.register(tool)
    catalog_sync()
    yield
    for tool in WARM_WORKER_TOOLS:
        registry.unregister(tool.slug)


def pid_of_run(api: Any, instance: Any) -> int:
    job_id = start_async(api, instance, {})["job_id"]
    body = wait_result(api, instance, job_id)
    assert body["status"] == "COMPLETED", body
    return body["result"]["pid"]


def job_process_pids(worker: Any) -> set[int]:
    return set(worker.job_processes())


# --- many jobs per process, and recycling ---------------------------------------------------


def test_one_job_process_runs_job_after_job_without_forking(api, user, make_instance, rq_worker, warm_tools):
    instance = make_instance("test-whoami", owner=user)
    worker = rq_worker()
    [process] = wait_for(lambda: job_process_pids(worker), message="the job process")

    pids = [pid_of_run(api, instance) for _ in range(5)]

    assert pids == [process] * 5
    assert job_process_pids(worker) == {process}


def test_a_job_process_is_recycled_after_max_jobs(api, user, make_instance, rq_worker, warm_tools):
    instance = make_instance("test-whoami", owner=user)
    worker = rq_worker(TOOLEXEC_WORKER_MAX_JOBS="2")

    pids = [pid_of_run(api, instance) for _ in range(5)]

    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert not alive(pids[0]) and not alive(pids[2])
    assert worker.process.poll() is None


def test_a_job_process_above_the_memory_limit_is_recycled_after_its_job(
    api, user, make_instance, rq_worker, warm_tools
):
    instance = make_instance("test-whoami", owner=user)
    rq_worker(TOOLEXEC_WORKER_MAX_RSS_MB="32")  # any Django process is above it: one job each

    pids = [pid_of_run(api, instance) for _ in range(3)]

    assert len(set(pids)) == 3


def test_processes_option_runs_that_many_job_processes(rq_worker, warm_tools):
    worker = rq_worker("--processes", "3")

    wait_for(lambda: len(job_process_pids(worker)) == 3, message="three job processes")


# --- hard timeouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sleep", "socket", "regex"])
def test_a_tool_that_never_returns_to_a_check_point_ends_timed_out_at_its_timeout(
    api, user, make_instance, rq_worker, warm_tools, how
):
    instance = make_instance("test-never-returns", owner=user)
    worker = rq_worker()
    [process] = wait_for(lambda: job_process_pids(worker), message="the job process")

    job_id = start_async(api, instance, {"how": how})["job_id"]
    body = wait_result(api, instance, job_id, timeout=10)

    assert_error_result(body, "TIMED_OUT", "TIMEOUT")
    assert 1500 <= Job.objects.get(pk=job_id).execution.duration_ms < 4000
    # Interrupted where it was: the same process goes on to the next job.
    assert pid_of_run(api, make_instance("test-whoami", owner=user)) == process


@pytest.mark.parametrize("how", ["masked", "gil"])
def test_a_tool_that_cannot_be_interrupted_ends_timed_out_and_its_process_is_replaced(
    api, user, make_instance, rq_worker, warm_tools, how
):
    instance = make_instance("test-never-returns", owner=user)
    worker = rq_worker()
    job_id = start_async(api, instance, {"how": how})["job_id"]
    _, process = running_process([worker], job_id)
    started = time.monotonic()

    body = wait_result(api, instance, job_id, timeout=10)

    assert time.monotonic() - started < 5
    assert_error_result(body, "TIMED_OUT", "TIMEOUT")
    assert "2 seconds" in body["error_message"]
    wait_for(lambda: not alive(process), timeout=5, message="the stuck process to be killed")
    replacement = pid_of_run(api, make_instance("test-whoami", owner=user))
    assert replacement != process


# --- heartbeats -------------------------------------------------------------------------------


def test_a_tool_holding_the_gil_is_still_reported_alive_by_its_supervisor(
    api, user, make_instance, rq_worker, warm_tools, settings
):
    """Its own process can run no thread while it holds the GIL; the supervisor's heartbeats
    keep it from being taken for lost, by another worker's reaper or by a read."""
    settings.TOOLEXEC_JOB_STALE_SECONDS = 4
    fast = {"TOOLEXEC_JOB_STALE_SECONDS": "4", "TOOLEXEC_JOB_HEARTBEAT_SECONDS": "1"}
    instance = make_instance("test-never-returns-long", owner=user)
    workers = [rq_worker(**fast), rq_worker(**fast)]
    job_id = start_async(api, instance, {"how": "gil"})["job_id"]
    running_process(workers, job_id)

    deadline = time.monotonic() + 10  # more than twice the stale time
    while time.monotonic() < deadline:
        assert get_progress(api, instance, job_id)["status"] == "RUNNING"
        time.sleep(0.5)
    assert cancel(api, instance, job_id).status_code == 202


# --- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sleep", "masked", "gil"])
def test_cancelling_a_tool_that_never_checks_ends_it_within_the_grace(
    api, user, make_instance, rq_worker, warm_tools, settings, how
):
    settings.TOOLEXEC_CANCEL_GRACE_SECONDS = 1
    instance = make_instance("test-never-returns-long", owner=user)
    worker = rq_worker(TOOLEXEC_CANCEL_GRACE_SECONDS="1", TOOLEXEC_JOB_HEARTBEAT_SECONDS="1")
    job_id = start_async(api, instance, {"how": how})["job_id"]
    _, process = running_process([worker], job_id)

    assert cancel(api, instance, job_id).status_code == 202
    asked = time.monotonic()

    job = wait_status(job_id, TERMINAL, timeout=5)
    assert job.status == Job.Status.CANCELLED
    assert time.monotonic() - asked < 1 + 2  # the grace, and the round that acts on it
    assert_error_result(get_result(api, instance, job_id), "CANCELLED", "CANCELLED")
    wait_for(lambda: job_process_of(job_id, [worker]) is None, timeout=5, message="the tool to be stopped")
    follow_up = pid_of_run(api, make_instance("test-whoami", owner=user))
    if how == "sleep":
        assert follow_up == process, "an interruptible tool is stopped in its process, which goes on"
    else:
        assert not alive(process) and follow_up != process, "an uninterruptible one's process is replaced"


# --- shutdown ---------------------------------------------------------------------------------


def test_sigterm_finishes_the_current_job_and_takes_no_new_one(api, user, make_instance, rq_worker, warm_tools):
    instance = make_instance("demo-long-task", owner=user)
    worker = rq_worker()
    current = start_async(api, instance, {"steps": 10, "step_seconds": 0.2})["job_id"]
    running_process([worker], current)
    waiting = start_async(api, instance, {"steps": 1, "step_seconds": 0})["job_id"]

    worker.process.send_signal(signal.SIGTERM)

    assert worker.process.wait(timeout=15) == 0
    assert Job.objects.get(pk=current).status == Job.Status.COMPLETED
    assert Job.objects.get(pk=waiting).status == Job.Status.QUEUED


# --- secrets --------------------------------------------------------------------------------


def test_a_jobs_secrets_are_gone_from_the_process_once_it_has_ended(
    api, other_api, user, other_user, make_instance, rq_worker, warm_tools
):
    token, note = "planted-token-5bd0c2a7e1f94c3d", "planted-note-9e81f0b4a6c2d7e3"
    keeper = make_instance("test-secret-keeper", owner=user)
    credential = credential_create(owner=user, provider="google", kind="oauth2", secret={"access_token": token})
    instance_configure_credentials(instance=keeper, mappings={"OAUTH_TOKEN": str(credential.pk)})
    hunter = make_instance("test-secret-hunter", owner=other_user)
    worker = rq_worker()
    [process] = wait_for(lambda: job_process_pids(worker), message="the job process")

    kept = start_async(api, keeper, {"note": note})["job_id"]
    assert wait_result(api, keeper, kept)["status"] == "FAILED"
    hunted = start_async(other_api, hunter, {"reversed": [token[::-1], note[::-1]]})["job_id"]
    body = wait_result(other_api, hunter, hunted)

    assert body["status"] == "COMPLETED", body
    assert body["result"]["pid"] == process, "both jobs ran in the same process"
    assert body["result"]["found"] == []
