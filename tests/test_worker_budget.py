"""What a job costs the database and Redis on a real worker (``rq_worker``): the worker lends
one PostgreSQL session and one Redis connection to every work-horse it forks
(executions/worker.py), so a job opens neither of its own, and a horse that does not leave one
idle takes it with it.

The probes below are plain RQ functions, enqueued directly: the work-horse imports this module
and runs them on the connection it was lent, as ``executions.jobs.run`` does.
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
from executions.services import execution_enqueue
from tests.conftest import wait_for
from tests.test_async_worker import alive
from tools.models import ToolDefinition

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


# --- run in the work-horse -------------------------------------------------------------------


def backend_pid() -> int:
    """The PostgreSQL backend serving this process's connection."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def hold_transaction(key: str) -> None:
    """Open a transaction, say which backend and which horse hold it, and wait to be killed."""
    with transaction.atomic():
        pid = backend_pid()
        django_rq.get_connection().rpush(key, json.dumps({"backend": pid, "horse": os.getpid()}))
        time.sleep(60)


def leave_transaction_open() -> int:
    """Return with a transaction still open on the connection (a bug a horse may have)."""
    transaction.set_autocommit(False)
    return backend_pid()


def health_checks_then_backend_pid() -> tuple[int, int]:
    """How many health checks (CONN_HEALTH_CHECKS) this horse makes before its first statement,
    after closing old connections as ``executions.jobs.run`` does; and its backend."""
    from django.db import close_old_connections

    checks: list[int] = []
    real = connection.is_usable
    connection.is_usable = lambda: checks.append(1) or real()
    close_old_connections()
    backend = backend_pid()
    return len(checks), backend


def sleep_then_backend_pid(seconds: float) -> int:
    time.sleep(seconds)
    return backend_pid()


def first_uses() -> dict[str, int]:
    """What this horse finds done by the worker that forked it: how many ciphers opening a
    job's sealed inputs builds here, and how often a new Redis connection reads redis-py's
    version from the package metadata."""
    from redis import utils
    from rq import get_current_job

    from instances import crypto

    reads: list[int] = []
    real = utils.get_lib_version
    utils.get_lib_version = lambda: reads.append(1) or real()
    try:
        fresh = get_current_job().connection.connection_pool.make_connection()
        fresh.connect()
        fresh.disconnect()
    finally:
        utils.get_lib_version = real
    built: list[int] = []
    real_cipher = crypto.Fernet
    crypto.Fernet = lambda key: built.append(1) or real_cipher(key)
    try:
        crypto.unseal(crypto.seal("x", row_id="r", owner_id=1), row_id="r", owner_id=1)
    finally:
        crypto.Fernet = real_cipher
    return {"ciphers_built": len(built), "metadata_reads": len(reads)}


def redis_client_id() -> int:
    """The Redis connection RQ and the job's events use in this horse."""
    from rq import get_current_job

    return get_current_job().connection.client_id()


def redis_block(key: str) -> None:
    """Say which connection and which horse, then wait on the lent connection to be killed."""
    from rq import get_current_job

    redis = get_current_job().connection
    redis.rpush(key, json.dumps({"client": redis.client_id(), "horse": os.getpid()}))
    redis.blpop([f"{key}:never"], timeout=60)


def keep_redis_connection_busy() -> int:
    """Take the lent connection out of the pool, send a command on it and return with it."""
    from rq import get_current_job

    redis = get_current_job().connection
    client = redis.client_id()
    busy = redis.connection_pool.get_connection()
    busy.send_command("PING")
    return client


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


def kill_the_horse_of(holder: Any) -> dict[str, Any]:
    """Enqueue ``holder``, wait for what it says it holds (and its horse's pid), SIGKILL that
    horse and wait until it is dead; what it said."""
    key = f"test:hold:{uuid.uuid4().hex}"
    django_rq.get_queue("default").enqueue(holder, key, job_timeout=120)
    _, raw = django_rq.get_connection().blpop([key], timeout=30)
    held = json.loads(raw)
    os.kill(held["horse"], signal.SIGKILL)
    wait_for(lambda: not alive(held["horse"]), timeout=10, message="the horse to die")
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


def test_every_job_of_a_worker_runs_on_the_one_session_it_lends(rq_worker, make_instance, user):
    rq_worker()
    instance = make_instance("test-noop", owner=user)
    first = run(backend_pid)
    for _ in range(3):
        # A real job between the probes: claim, run, outcome, on the same lent session.
        job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
        wait_for(lambda job=job: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, message="the job")
        assert run(backend_pid) == first
    assert other_sessions() <= 1  # the worker's; no job left one behind


def idle(worker: Any) -> bool:
    """Whether the worker waits for work: done with its last job, ready for the next."""
    from rq import Worker

    found = [w for w in Worker.all(connection=django_rq.get_connection()) if w.pid == worker.pid]
    return bool(found) and found[0].get_state() == "idle"


def last_statement(pid: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone()[0]


def test_a_session_handed_back_a_moment_ago_is_lent_again_without_a_health_check(rq_worker):
    worker = rq_worker()
    lent = run(backend_pid)
    wait_for(lambda: idle(worker), message="the worker to wait for work")
    # Neither the worker, making ready for the next job, nor the next horse says SELECT 1.
    assert last_statement(lent) == "SELECT pg_backend_pid()"
    assert run(health_checks_then_backend_pid) == (0, lent)


def test_a_session_that_died_while_the_worker_was_idle_is_not_lent(rq_worker):
    worker = rq_worker(TOOLEXEC_JOB_STALE_SECONDS="120")  # waits for work 60 s at a time
    lent = run(backend_pid)
    wait_for(lambda: idle(worker), message="the worker to wait for work")
    time.sleep(1.2)  # longer than HANDED_BACK_FRESH_SECONDS
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [lent])
    wait_for(lambda: not backend_alive(lent), timeout=10, message="the session to end")

    checks, backend = run(health_checks_then_backend_pid)
    assert (checks, backend_alive(backend)) == (0, True)  # the worker checked it, and replaced it
    assert backend != lent


def test_a_horse_finds_the_ciphers_and_redis_greeting_prepared_by_its_worker(rq_worker):
    rq_worker()
    assert run(first_uses) == {"ciphers_built": 0, "metadata_reads": 0}


def test_a_horse_killed_mid_transaction_takes_its_session_with_it(rq_worker):
    worker = rq_worker()
    lent = run(backend_pid)
    held = kill_the_horse_of(hold_transaction)
    assert held["backend"] == lent  # it ran on the lent session
    # Not taken back in an unknown state: the worker drops it, the server ends the session
    # and rolls its transaction back.
    wait_for(lambda: not backend_alive(lent), timeout=10, message="the killed horse's session to end")
    assert run(backend_pid) != lent
    assert worker.process.poll() is None


def test_a_job_that_leaves_a_transaction_open_does_not_hand_its_session_back(rq_worker):
    rq_worker()
    lent = run(leave_transaction_open)
    wait_for(lambda: not backend_alive(lent), timeout=10, message="the session left in a transaction to end")
    after = run(backend_pid)
    assert after != lent
    assert run(backend_pid) == after  # and the next one is lent again


def test_heartbeats_during_a_long_job_use_a_session_of_their_own_closed_after_it(rq_worker):
    rq_worker(TOOLEXEC_JOB_HEARTBEAT_SECONDS="1")
    lent = run(backend_pid)
    job = django_rq.get_queue("default").enqueue(sleep_then_backend_pid, 3.5)
    # While the horse holds the lent session, the worker beats on a second one.
    wait_for(lambda: other_sessions() == 2, timeout=10, message="the heartbeat session")
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, timeout=15, message="the long job")
    assert job.return_value(refresh=True) == lent
    wait_for(lambda: other_sessions() == 1, timeout=10, message="the heartbeat session to close")
    assert run(backend_pid) == lent


def redis_clients() -> set[int]:
    return {client["id"] for client in django_rq.get_connection().client_list()}


def test_every_job_of_a_worker_runs_on_the_one_redis_connection_it_lends(rq_worker, make_instance, user):
    rq_worker()
    instance = make_instance("test-noop", owner=user)
    first = run(redis_client_id)
    for _ in range(3):
        # A real job between the probes: RQ's bookkeeping, the job's publishes, on the lent connection.
        job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
        wait_for(lambda job=job: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, message="the job")
        assert run(redis_client_id) == first


def test_a_horse_killed_mid_command_takes_its_redis_connection_with_it(rq_worker):
    worker = rq_worker()
    lent = run(redis_client_id)
    held = kill_the_horse_of(redis_block)
    assert held["client"] == lent  # it waited on the lent connection
    # Not lent again with a reply on its way: the worker drops it, the server sees it close.
    wait_for(lambda: lent not in redis_clients(), timeout=10, message="the killed horse's connection to close")
    assert run(redis_client_id) not in {lent, None}
    assert worker.process.poll() is None


def test_a_job_that_keeps_the_redis_connection_busy_does_not_hand_it_back(rq_worker):
    rq_worker()
    lent = run(keep_redis_connection_busy)
    wait_for(lambda: lent not in redis_clients(), timeout=10, message="the connection left busy to close")
    after = run(redis_client_id)
    assert after != lent
    assert run(redis_client_id) == after  # and the next one is lent again


def test_a_redis_connection_the_server_closed_while_the_worker_was_idle_is_replaced(rq_worker):
    worker = rq_worker()
    lent = run(redis_client_id)
    wait_for(lambda: idle(worker), message="the worker to wait for work")
    django_rq.get_connection().client_kill_filter(_id=lent)
    # The horse's pool notices before its first command and connects anew; that connection
    # ends with the horse, and the worker lends a new one from the next job on.
    assert run(redis_client_id) != lent
    again = run(redis_client_id)
    assert run(redis_client_id) == again != lent


@pytest.mark.django_db
def test_a_redis_connection_that_cannot_connect_is_lent_unconnected_and_the_horse_connects_it(settings, caplog):
    from redis import Redis

    from executions.worker import ToolexecWorker, _redis_adopt

    worker = ToolexecWorker(["default"], connection=django_rq.get_connection())
    worker.connection = Redis.from_url("redis://127.0.0.1:1/0")  # Redis went away: nothing listens there
    worker._redis_ready()
    assert "No Redis connection to lend to the next work-horse" in caplog.text
    assert not worker._redis_spare.is_connected

    # What a horse does with one: its pool connects it for the first command, as it would a
    # connection of its own.
    redis = Redis.from_url(settings.REDIS_URL)
    unconnected = redis.connection_pool.make_connection()
    _redis_adopt(redis.connection_pool, unconnected)
    assert redis.ping() is True
    assert unconnected.is_connected
    unconnected.disconnect()


def test_the_worker_claims_a_job_before_it_forks_the_horse_that_runs_it(rq_worker, make_instance, user):
    rq_worker()
    instance = make_instance("test-noop", owner=user)
    job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, message="the job")
    claimed_at = Job.objects.get(pk=job.pk).started_at
    # RQ marks the job started in the work-horse; the claim was made before that, in the worker.
    horse_started_at = RQJob.fetch(job.rq_job_id, connection=django_rq.get_connection()).started_at
    assert claimed_at < horse_started_at


def test_a_claim_ahead_that_fails_is_left_to_the_horse_and_the_worker_lives_on(rq_worker, make_instance, user):
    worker = rq_worker()
    broken = django_rq.get_queue("default").enqueue("executions.jobs.run", "not-a-job-id")
    wait_for(lambda: broken.get_status(refresh=True) == JobStatus.FAILED, message="the job with a bad id to fail")
    assert f"Could not claim job {broken.id} before forking; its work-horse will" in worker.log()
    assert "ValidationError" in RQJob.fetch(broken.id, connection=broken.connection).latest_result().exc_string

    instance = make_instance("test-noop", owner=user)
    job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, message="the next job")
    assert worker.process.poll() is None


def test_a_job_switched_off_while_queued_is_refused_by_the_workers_check(rq_worker, make_instance, user):
    instance = make_instance("test-noop", owner=user)
    job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
    ToolDefinition.objects.filter(slug="test-noop").update(is_active=False)

    worker = rq_worker()  # checks the job ahead of the fork; its horse ends it with the refusal
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.FAILED, message="the job to be refused")
    execution = Execution.objects.get(pk=job.execution_id)
    assert execution.error_code == "TOOL_INACTIVE"
    assert execution.credits_consumed == 0
    assert RQJob.fetch(job.rq_job_id, connection=django_rq.get_connection()).get_status() == JobStatus.FINISHED
    assert "Could not claim" not in worker.log()


def test_a_check_that_fails_unexpectedly_in_the_worker_ends_the_job_failed_and_the_worker_lives_on(
    rq_worker, make_instance, user
):
    instance = make_instance("test-noop", owner=user)
    job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
    Job.objects.filter(pk=job.pk).update(sealed_inputs="not a sealed token")

    worker = rq_worker()  # the worker's check raises; its horse raises it again and ends the job
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.FAILED, message="the job to fail")
    execution = Execution.objects.get(pk=job.execution_id)
    assert execution.error_code == "INTERNAL_ERROR"
    assert execution.credits_consumed == 0
    assert f"Job {job.pk} could not start" in worker.log()
    assert "SecretUnreadable" in worker.log()  # the traceback is the operator's, not the user's
    assert "SecretUnreadable" not in json.dumps(execution.error_metadata) + execution.error_message
    assert "Could not claim" not in worker.log()

    following = execution_enqueue(instance=instance, inputs={"echo": "y"}).job
    wait_for(lambda: Job.objects.get(pk=following.pk).status == Job.Status.COMPLETED, message="the next job")
    assert worker.process.poll() is None
