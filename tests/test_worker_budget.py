"""The connections of a warm job process on a real worker (``rq_worker``): it keeps one
PostgreSQL session and one Redis connection for job after job (executions/worker.py), so a job
opens neither of its own; a session a job leaves unusable is not kept, one that died meanwhile is
replaced, and a killed process takes its connections with it.

The probes below are plain RQ functions, enqueued directly: the job process imports this module
and runs them as it runs ``executions.jobs.run``.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

import django_rq
import pytest
from django.db import connection, transaction
from rq.job import Job as RQJob
from rq.job import JobStatus

from executions.models import Execution, Job
from executions.services.enqueue import execution_enqueue
from executions.services.jobs import PROGRESS_WRITER
from tests.conftest import wait_for
from tests.test_async_worker import alive
from tools.models import ToolDefinition

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


# --- run in the job process -------------------------------------------------------------------


def backend_pid() -> int:
    """The PostgreSQL backend serving this process's connection."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def hold_transaction(key: str) -> None:
    """Open a transaction, say which backend and which process hold it, and wait to be killed."""
    with transaction.atomic():
        pid = backend_pid()
        django_rq.get_connection().rpush(key, json.dumps({"backend": pid, "horse": os.getpid()}))
        time.sleep(60)


def leave_transaction_open() -> int:
    """Return with a transaction still open on the connection (a bug a job may have)."""
    transaction.set_autocommit(False)
    return backend_pid()


def redis_client_id() -> int:
    """The Redis connection RQ and the job's events use in this process."""
    from rq import get_current_job

    return get_current_job().connection.client_id()


def redis_block(key: str) -> None:
    """Say which connection and which process, then wait on it to be killed."""
    from rq import get_current_job

    redis = get_current_job().connection
    redis.rpush(key, json.dumps({"client": redis.client_id(), "horse": os.getpid()}))
    redis.blpop([f"{key}:never"], timeout=60)


# --- helpers ------------------------------------------------------------------------------


def run(func: Any, *args: Any, timeout: float = 30) -> Any:
    """Enqueue ``func`` on the worker's queue and wait for its return value."""
    job = django_rq.get_queue("default").enqueue(func, *args)
    wait_for(
        lambda: job.get_status(refresh=True) in {JobStatus.FINISHED, JobStatus.FAILED},
        timeout=timeout,
        message=f"{func.__name__} to end",
    )
    assert job.get_status() == JobStatus.FINISHED, RQJob.fetch(job.id, connection=job.connection).exc_info
    return job.return_value(refresh=True)


def kill_the_process_of(holder: Any) -> dict[str, Any]:
    """Enqueue ``holder``, wait for what it says it holds (and its process's pid), SIGKILL that
    process and wait until it is dead; what it said."""
    key = f"test:hold:{uuid.uuid4().hex}"
    django_rq.get_queue("default").enqueue(holder, key, job_timeout=120)
    _, raw = django_rq.get_connection().blpop([key], timeout=30)
    held = json.loads(raw)
    os.kill(held["horse"], signal.SIGKILL)
    wait_for(lambda: not alive(held["horse"]), timeout=10, message="the job process to die")
    return held


def backend_alive(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone()[0] == 1


def other_sessions() -> int:
    """Sessions on the test database besides this test's own."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


# --- tests --------------------------------------------------------------------------------


def test_every_job_of_a_job_process_runs_on_the_one_session_it_keeps(rq_worker, make_instance, user):
    rq_worker()
    instance = make_instance("test-noop", owner=user)
    first = run(backend_pid)
    for _ in range(3):
        # A real job between the probes: claim, run, outcome, on the same session.
        job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
        wait_for(lambda job=job: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, message="the job")
        assert run(backend_pid) == first
    assert other_sessions() <= 2  # the job process's, and the supervisor's; no job left one behind


def test_a_session_that_died_between_jobs_is_replaced(rq_worker):
    rq_worker()
    kept = run(backend_pid)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [kept])
    wait_for(lambda: not backend_alive(kept), timeout=10, message="the session to end")

    replaced = run(backend_pid)
    assert replaced != kept and backend_alive(replaced)
    assert run(backend_pid) == replaced


def test_a_job_process_killed_mid_transaction_takes_its_session_with_it(rq_worker):
    worker = rq_worker()
    kept = run(backend_pid)
    held = kill_the_process_of(hold_transaction)
    assert held["backend"] == kept  # it ran on the session it keeps
    # The server ends the session and rolls its transaction back; the replacement process
    # opens its own.
    wait_for(lambda: not backend_alive(kept), timeout=10, message="the killed process's session to end")
    assert run(backend_pid) != kept
    assert worker.process.poll() is None


def test_a_session_a_job_leaves_in_a_transaction_is_not_kept(rq_worker):
    rq_worker()
    left = run(leave_transaction_open)
    wait_for(lambda: not backend_alive(left), timeout=10, message="the session left in a transaction to end")
    after = run(backend_pid)
    assert after != left
    assert run(backend_pid) == after  # and the next one is kept again


def test_heartbeats_during_a_long_job_come_from_the_supervisors_own_session(rq_worker, make_instance, user):
    rq_worker(TOOLEXEC_JOB_HEARTBEAT_SECONDS="1", TOOLEXEC_JOB_STALE_SECONDS="4")
    kept = run(backend_pid)
    wait_for(lambda: other_sessions() == 1, timeout=10, message="the supervisor to close its session while idle")
    instance = make_instance("test-slow", owner=user)
    job = execution_enqueue(instance=instance, inputs={"seconds": 4}).job
    # While the job process runs the job on its session, the supervisor beats on a second one.
    wait_for(lambda: other_sessions() == 2, timeout=10, message="the heartbeat session")
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, timeout=15, message="the long job")
    wait_for(lambda: other_sessions() == 1, timeout=10, message="the heartbeat session to close")
    assert run(backend_pid) == kept


def progress_writing_sessions() -> set[int]:
    """The backends whose last statement was a progress write (``JobProgress.flush``)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            """AND query LIKE 'UPDATE "executions_job" SET "progress"%%'"""
        )
        return {row[0] for row in cursor.fetchall()}


def test_the_progress_of_job_after_job_is_written_on_one_session_the_job_process_keeps(rq_worker, make_instance, user):
    PROGRESS_WRITER.stop()  # this process's own (earlier tests ran jobs in it): only the worker's count
    rq_worker()
    instance = make_instance("demo-long-task", owner=user)
    writers = []
    for steps in (4, 5, 6):  # three different runs: an identical one would be answered by the result cache
        job = execution_enqueue(instance=instance, inputs={"steps": steps, "step_seconds": 0.4}).job
        # A report the writer wrote while the job runs (the claim wrote 0, the outcome writes 100).
        wait_for(lambda job=job: 0 < Job.objects.get(pk=job.pk).progress < 100, timeout=15, message="a progress write")
        writers.append(progress_writing_sessions())
        wait_for(lambda job=job: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, message="the job")

    assert len(writers[0]) == 1 and writers == [writers[0]] * 3, writers


def redis_clients() -> set[int]:
    return {client["id"] for client in django_rq.get_connection().client_list()}


def test_every_job_of_a_job_process_runs_on_the_one_redis_connection_it_keeps(rq_worker, make_instance, user):
    rq_worker()
    instance = make_instance("test-noop", owner=user)
    first = run(redis_client_id)
    for _ in range(3):
        # A real job between the probes: RQ's bookkeeping, the job's publishes, on one connection.
        job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
        wait_for(lambda job=job: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, message="the job")
        assert run(redis_client_id) == first


def test_a_job_process_killed_mid_command_takes_its_redis_connection_with_it(rq_worker):
    worker = rq_worker()
    kept = run(redis_client_id)
    held = kill_the_process_of(redis_block)
    assert held["client"] == kept  # it waited on the connection it keeps
    wait_for(lambda: kept not in redis_clients(), timeout=10, message="the killed process's connection to close")
    assert run(redis_client_id) not in {kept, None}
    assert worker.process.poll() is None


def test_a_redis_connection_the_server_closed_between_jobs_is_replaced(rq_worker):
    rq_worker()
    kept = run(redis_client_id)
    django_rq.get_connection().client_kill_filter(_id=kept)
    # The pool notices before its next command and connects anew, and keeps that one.
    again = run(redis_client_id)
    assert again != kept
    assert run(redis_client_id) == again


def test_a_job_with_an_id_that_is_no_job_fails_and_the_worker_lives_on(rq_worker, make_instance, user):
    worker = rq_worker()
    broken = django_rq.get_queue("default").enqueue("executions.jobs.run", "not-a-job-id")
    wait_for(lambda: broken.get_status(refresh=True) == JobStatus.FAILED, message="the job with a bad id to fail")
    assert "ValidationError" in RQJob.fetch(broken.id, connection=broken.connection).latest_result().exc_string

    instance = make_instance("test-noop", owner=user)
    job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, message="the next job")
    assert worker.process.poll() is None


def test_a_job_switched_off_while_queued_is_refused_by_the_workers_check(rq_worker, make_instance, user):
    instance = make_instance("test-noop", owner=user)
    job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
    ToolDefinition.objects.filter(slug="test-noop").update(is_active=False)

    rq_worker()
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.FAILED, message="the job to be refused")
    execution = Execution.objects.get(pk=job.execution_id)
    assert execution.error_code == "TOOL_INACTIVE"
    assert execution.credits_consumed == 0
    assert RQJob.fetch(job.rq_job_id, connection=django_rq.get_connection()).get_status() == JobStatus.FINISHED


def test_a_check_that_fails_unexpectedly_in_the_worker_ends_the_job_failed_and_the_worker_lives_on(
    rq_worker, make_instance, user
):
    instance = make_instance("test-noop", owner=user)
    job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
    Job.objects.filter(pk=job.pk).update(sealed_inputs="not a sealed token")

    worker = rq_worker()
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.FAILED, message="the job to fail")
    execution = Execution.objects.get(pk=job.execution_id)
    assert execution.error_code == "INTERNAL_ERROR"
    assert execution.credits_consumed == 0
    assert f"Job {job.pk} could not start" in worker.log()
    assert "SecretUnreadable" in worker.log()  # the traceback is the operator's, not the user's
    assert "SecretUnreadable" not in json.dumps(execution.error_metadata) + execution.error_message

    following = execution_enqueue(instance=instance, inputs={"echo": "y"}).job
    wait_for(lambda: Job.objects.get(pk=following.pk).status == Job.Status.COMPLETED, message="the next job")
    assert worker.process.poll() is None
