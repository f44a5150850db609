"""A Redis that loses its data strands nothing (issue 19; DESIGN.md §7). PostgreSQL is the
record of what was accepted: the reaper queues again, with the same RQ job id, every QUEUED job
that RQ will never run once it has been missing for TOOLEXEC_QUEUE_RECOVERY_SECONDS, and makes a
lost schedule (a retry's backoff, a fair-share wait) again for its original time. The claim is
conditional, so a job delivered twice still runs once.

The Redis these tests lose is a redis-server of their own on another port (``private_redis``),
killed with SIGKILL and started again empty; never the machine's Redis on 6379. The tool counts
its runs in a file, outside Redis.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.registry import DeferredJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from executions import events
from executions.models import Job
from executions.services.jobs import job_claim, job_retry
from executions.services.recovery import job_requeue_lost, jobs_reap, jobs_requeue_lost
from tests.conftest import wait_for
from tests.test_async_worker import assert_books_consistent, job_row, start_async, wait_status
from tests.test_settings import _manage
from tests.tools import runs_recorded
from toolexec import settings as toolexec_settings

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

RECOVERY_SECONDS = 2
MAINTENANCE_SECONDS = 1  # a worker's maintenance interval: TOOLEXEC_JOB_STALE_SECONDS // 2
RUN_SECONDS = 4  # what a worker takes to fork, run and record a handful of quick jobs
FAST = {
    "TOOLEXEC_QUEUE_RECOVERY_SECONDS": str(RECOVERY_SECONDS),
    "TOOLEXEC_JOB_STALE_SECONDS": str(2 * MAINTENANCE_SECONDS),
    "TOOLEXEC_JOB_HEARTBEAT_SECONDS": "1",
}
LOST_LINE = re.compile(r"Job (\S+) was lost by the queue and queued again$")


class PrivateRedis:
    """A redis-server of the test's own on a free port, keeping nothing on disk, so that killing
    it and starting it again loses everything it held."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        assert self.port != 6379, "never the machine's own Redis"
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        with open(self.directory / "redis-server.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout=10, message=f"redis-server on port {self.port} to answer")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # SIGKILL: no goodbye, nothing saved
            self.process.wait(timeout=10)

    def restart_empty(self) -> None:
        self.kill()
        self.start()
        assert self.client().dbsize() == 0

    def refuse_writes(self, refuse: bool = True) -> None:
        """Have Redis answer reads and refuse every write, as a primary does that lost the
        replicas it must write to."""
        self.client().config_set("min-replicas-to-write", int(refuse))

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_connect_timeout=1)

    def queue(self) -> Queue:
        return Queue("default", connection=self.client())

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except RedisError:
            return False


@pytest.fixture
def private_redis(tmp_path, settings):
    """A private Redis, and RQ in this process on it (``events`` keeps a client per queue
    configuration, so the new one is used at once). Workers get it through ``REDIS_URL``; ask
    for this fixture before ``rq_worker``, so that the workers stop before their Redis does."""
    server = PrivateRedis(tmp_path)
    server.start()
    settings.RQ_QUEUES = {"default": {**settings.RQ_QUEUES["default"], "URL": server.url}}
    settings.TOOLEXEC_QUEUE_RECOVERY_SECONDS = RECOVERY_SECONDS
    yield server
    server.kill()


@pytest.fixture
def counted(make_instance, user, tmp_path):
    """An instance of the tool that counts its runs, and the file it counts them in."""
    return make_instance("test-counted", owner=user), str(tmp_path / "runs")


def start_worker(rq_worker: Any, private_redis: PrivateRedis) -> Any:
    return rq_worker(REDIS_URL=private_redis.url, **FAST)


def past_the_grace() -> datetime:
    """A reaper's clock once every job queued so far has been missing long enough."""
    return timezone.now() + timedelta(seconds=RECOVERY_SECONDS + 1)


def queue_lost_entries(job_id: str) -> list[dict[str, Any]]:
    return [entry for entry in job_row(job_id).attempt_log if entry.get("event") == "queue_lost"]


def scheduled_at(private_redis: PrivateRedis, rq_job_id: str) -> float | None:
    """When RQ's schedule says the job runs (seconds since the epoch), or None."""
    return private_redis.client().zscore(ScheduledJobRegistry(queue=private_redis.queue()).key, rq_job_id)


def warnings_logged(caplog: Any) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith("executions.services.")]


# --- with real workers: Redis killed and started again empty ----------------------------------


def test_jobs_accepted_before_redis_restarted_empty_each_run_once_when_a_worker_starts(
    api, user, counted, private_redis, rq_worker
):
    instance, runs_file = counted
    accepted = [start_async(api, instance, {"runs_file": runs_file}) for _ in range(5)]
    job_ids = [body["job_id"] for body in accepted]
    assert private_redis.queue().job_ids == job_ids  # accepted onto the private Redis, no worker yet

    private_redis.restart_empty()
    worker = start_worker(rq_worker, private_redis)
    started = time.monotonic()

    for job_id in job_ids:
        wait_status(job_id, "COMPLETED", timeout=RECOVERY_SECONDS + MAINTENANCE_SECONDS + RUN_SECONDS + 10)
    assert time.monotonic() - started < RECOVERY_SECONDS + MAINTENANCE_SECONDS + RUN_SECONDS
    assert Counter(execution for execution, _ in runs_recorded(runs_file)) == {
        body["execution_id"]: 1 for body in accepted
    }
    for job_id in job_ids:
        job = job_row(job_id)
        assert job.attempts == 1 and job.rq_job_id == job_id  # queued again with its own RQ id
        [lost] = queue_lost_entries(job_id)
        assert lost["message"].startswith("The queue lost this job; queued again at ")
        assert lost["message"].endswith(f"{lost['queued_again_at']}.")
    assert_books_consistent(instance, user, runs=5, successes=5, charged=Decimal("0.05"))
    # One warning a job, naming the job and nothing else.
    lines = [line for line in worker.log().splitlines() if "lost by the queue" in line]
    assert sorted(LOST_LINE.search(line).group(1) for line in lines) == sorted(job_ids)
    assert runs_file not in worker.log()


def test_a_retry_waiting_on_its_backoff_when_redis_restarted_empty_runs_once_at_its_original_time(
    api, user, counted, private_redis, rq_worker
):
    instance, runs_file = counted
    first_worker = start_worker(rq_worker, private_redis)
    accepted = start_async(api, instance, {"runs_file": runs_file, "failures": 1})
    job_id, retry_id = accepted["job_id"], f"{accepted['job_id']}-attempt-2"
    waiting = wait_for(
        lambda: (row := job_row(job_id)).status == Job.Status.QUEUED and row.attempts == 1 and row,
        timeout=15,
        message="the first attempt to fail and its retry to wait",
    )
    assert waiting.rq_job_id == retry_id
    original_time = math.ceil(waiting.run_after.timestamp())  # RQ schedules to the second, rounded up
    assert scheduled_at(private_redis, retry_id) == original_time

    first_worker.stop()
    private_redis.restart_empty()
    assert scheduled_at(private_redis, retry_id) is None
    start_worker(rq_worker, private_redis)
    started = time.time()

    # Made again before its time came, for that time.
    remade = wait_for(
        lambda: scheduled_at(private_redis, retry_id),
        timeout=max(0.5, waiting.run_after.timestamp() - started),
        message="the reaper to make the schedule again",
    )
    assert remade == original_time
    job = wait_status(job_id, "COMPLETED", timeout=20)
    ended = time.time()
    runs = [when for execution, when in runs_recorded(runs_file) if execution == accepted["execution_id"]]
    assert len(runs) == 2  # the failed attempt and the retry, each once
    assert runs[1] >= original_time
    assert ended < max(original_time, started + RECOVERY_SECONDS) + MAINTENANCE_SECONDS + RUN_SECONDS
    assert job.attempts == 2 and job.rq_job_id == retry_id
    assert [entry.get("error_code", entry.get("event")) for entry in job.attempt_log] == [
        "UPSTREAM_RATE_LIMITED",
        "queue_lost",
        "",
    ]
    assert f"to run at {waiting.run_after.isoformat()}, as it was scheduled." in job.attempt_log[1]["message"]
    assert_books_consistent(instance, user, runs=1, successes=1, charged=Decimal("0.01"))


@pytest.mark.parametrize("second_id", ["another", "the same"])
def test_a_job_enqueued_twice_on_purpose_runs_once(api, user, counted, private_redis, rq_worker, second_id):
    instance, runs_file = counted
    accepted = start_async(api, instance, {"runs_file": runs_file})
    job_id = accepted["job_id"]
    twice = f"{job_id}-twice" if second_id == "another" else job_id
    events.queue().enqueue_call("executions.jobs.run", args=(job_id,), job_id=twice)
    queue = private_redis.queue()
    assert queue.job_ids == [job_id, twice]  # two deliveries of one toolexec job

    for _ in range(2):
        start_worker(rq_worker, private_redis)
    wait_status(job_id, "COMPLETED")
    connection = private_redis.client()
    started = StartedJobRegistry(queue=queue)
    wait_for(
        lambda: (
            not connection.llen(queue.key)
            and not connection.llen(queue.intermediate_queue_key)
            and not connection.zcard(started.key)
            and {RQJob.fetch(rq_id, connection=connection).get_status() for rq_id in (job_id, twice)}
            == {JobStatus.FINISHED}
        ),
        message="both deliveries to be done",
    )

    assert [execution for execution, _ in runs_recorded(runs_file)] == [accepted["execution_id"]]
    assert job_row(job_id).attempts == 1
    assert_books_consistent(instance, user, runs=1, successes=1, charged=Decimal("0.01"))


# --- the reaper, in this process ---------------------------------------------------------------


def test_a_job_missing_from_redis_is_left_alone_for_the_grace_period_then_queued_again(
    api, counted, private_redis, settings
):
    settings.TOOLEXEC_QUEUE_RECOVERY_SECONDS = 30
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    private_redis.client().flushall()  # as if the enqueue after its commit had not happened yet
    handed = job_row(job_id).enqueued_at

    assert jobs_requeue_lost(now=handed + timedelta(seconds=29)) == 0
    assert private_redis.queue().job_ids == []
    assert jobs_requeue_lost(now=handed + timedelta(seconds=31)) == 1

    assert private_redis.queue().job_ids == [job_id]
    rq_job = RQJob.fetch(job_id, connection=private_redis.client())
    assert (rq_job.func_name, rq_job.args, rq_job.kwargs) == ("executions.jobs.run", (job_id,), {})
    assert rq_job.timeout == instance.tool.timeout_seconds
    job = job_row(job_id)
    assert job.status == Job.Status.QUEUED and job.enqueued_at > handed
    assert len(queue_lost_entries(job_id)) == 1
    # Known to RQ again: later rounds leave it alone.
    assert jobs_requeue_lost(now=job.enqueued_at + timedelta(seconds=31)) == 0
    assert private_redis.queue().job_ids == [job_id]


def _waiting(connection: Redis, queue: Queue, rq_id: str) -> None:
    pass  # in the queue, as accepted


def _taken(connection: Redis, queue: Queue, rq_id: str) -> None:
    connection.lmove(queue.key, queue.intermediate_queue_key)  # by a worker, a moment ago


def _started(connection: Redis, queue: Queue, rq_id: str) -> None:
    _taken(connection, queue, rq_id)
    connection.lrem(queue.intermediate_queue_key, 0, rq_id)
    connection.hset(RQJob.key_for(rq_id), "status", JobStatus.STARTED.value)  # not yet claimed


def _scheduled(connection: Redis, queue: Queue, rq_id: str) -> None:
    connection.lrem(queue.key, 0, rq_id)
    connection.hset(RQJob.key_for(rq_id), "status", JobStatus.SCHEDULED.value)
    connection.zadd(ScheduledJobRegistry(queue=queue).key, {rq_id: time.time() + 60})


def _deferred(connection: Redis, queue: Queue, rq_id: str) -> None:
    connection.lrem(queue.key, 0, rq_id)
    connection.hset(RQJob.key_for(rq_id), "status", JobStatus.DEFERRED.value)
    connection.zadd(DeferredJobRegistry(queue=queue).key, {rq_id: time.time()})


@pytest.mark.parametrize("state", [_waiting, _taken, _started, _scheduled, _deferred], ids=lambda f: f.__name__[1:])
def test_a_job_rq_will_run_is_left_alone(api, counted, private_redis, state: Callable[..., None]):
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    queue = private_redis.queue()
    state(private_redis.client(), queue, job_id)
    before = private_redis.client().hgetall(RQJob.key_for(job_id))

    assert jobs_requeue_lost(now=past_the_grace()) == 0

    assert private_redis.client().hgetall(RQJob.key_for(job_id)) == before
    assert queue_lost_entries(job_id) == []


def _gone(connection: Redis, queue: Queue, rq_id: str) -> None:
    connection.flushall()


def _ended(status: JobStatus) -> Callable[..., None]:
    def ended(connection: Redis, queue: Queue, rq_id: str) -> None:
        connection.lrem(queue.key, 0, rq_id)
        connection.hset(RQJob.key_for(rq_id), "status", status.value)
        connection.expire(RQJob.key_for(rq_id), 600)  # as RQ keeps an ended job's hash a while

    ended.__name__ = f"_{status.value}"
    return ended


def _dropped_from_its_list(connection: Redis, queue: Queue, rq_id: str) -> None:
    connection.lrem(queue.key, 0, rq_id)  # the hash says queued; no list has it


def _dropped_from_the_schedule(connection: Redis, queue: Queue, rq_id: str) -> None:
    connection.lrem(queue.key, 0, rq_id)
    connection.hset(RQJob.key_for(rq_id), "status", JobStatus.SCHEDULED.value)


@pytest.mark.parametrize(
    "state",
    [
        _gone,
        _ended(JobStatus.FINISHED),
        _ended(JobStatus.FAILED),
        _ended(JobStatus.STOPPED),
        _ended(JobStatus.CANCELED),
        _dropped_from_its_list,
        _dropped_from_the_schedule,
    ],
    ids=lambda f: f.__name__[1:],
)
def test_a_queued_job_rq_will_never_run_is_queued_again_under_its_id(
    api, counted, private_redis, state: Callable[..., None], caplog
):
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    connection = private_redis.client()
    state(connection, private_redis.queue(), job_id)

    with caplog.at_level(logging.WARNING, logger="executions.services"):
        assert jobs_requeue_lost(now=past_the_grace()) == 1

    assert private_redis.queue().job_ids == [job_id]
    rq_job = RQJob.fetch(job_id, connection=connection)
    assert rq_job.get_status() == JobStatus.QUEUED and rq_job.args == (job_id,)
    assert connection.ttl(RQJob.key_for(job_id)) == -1  # nothing of the old run expires it
    assert len(queue_lost_entries(job_id)) == 1
    assert warnings_logged(caplog) == [f"Job {job_id} was lost by the queue and queued again"]


def test_a_lost_job_two_reapers_find_at_once_is_queued_again_once(api, counted, private_redis):
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    private_redis.client().flushall()
    # Both read the row before either wrote it.
    first, second = (Job.objects.select_related("execution__tool").get(pk=job_id) for _ in range(2))

    assert job_requeue_lost(first, rq_status="") is True
    assert job_requeue_lost(second, rq_status="") is False

    assert private_redis.queue().job_ids == [job_id]
    assert len(queue_lost_entries(job_id)) == 1


def test_a_leftover_rq_job_that_expired_after_the_check_is_no_obstacle(api, counted, private_redis):
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    job = Job.objects.select_related("execution__tool").get(pk=job_id)
    private_redis.client().flushall()  # the finished run's hash the reaper saw has expired since

    assert job_requeue_lost(job, rq_status=JobStatus.FINISHED.value) is True

    assert private_redis.queue().job_ids == [job_id]
    assert len(queue_lost_entries(job_id)) == 1


def test_redis_down_during_the_reaper_is_a_warning_and_a_later_round_queues_the_job_again(
    api, counted, private_redis, caplog
):
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    handed = job_row(job_id).enqueued_at
    private_redis.kill()

    with caplog.at_level(logging.WARNING, logger="executions.services"):
        counts = jobs_reap(now=past_the_grace())  # a worker's maintenance: it must not raise

    assert counts["requeued"] == 0
    assert warnings_logged(caplog) == ["Redis is unavailable; queued jobs were not checked against it this round"]
    job = job_row(job_id)
    assert (job.enqueued_at, job.attempt_log) == (handed, [])
    private_redis.start()  # empty
    assert jobs_reap(now=past_the_grace())["requeued"] == 1
    assert private_redis.queue().job_ids == [job_id]


def test_a_lost_job_redis_refuses_to_take_back_stays_as_it_was_for_the_next_round(api, counted, private_redis, caplog):
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    handed = job_row(job_id).enqueued_at
    connection = private_redis.client()
    connection.flushall()
    private_redis.refuse_writes()

    with caplog.at_level(logging.WARNING, logger="executions.services"):
        assert jobs_requeue_lost(now=past_the_grace()) == 0

    assert warnings_logged(caplog) == [f"Redis did not take job {job_id} back; the next round tries again"]
    job = job_row(job_id)
    assert (job.enqueued_at, job.attempt_log) == (handed, [])  # the record says only what happened
    private_redis.refuse_writes(False)
    assert jobs_requeue_lost(now=past_the_grace()) == 1
    assert private_redis.queue().job_ids == [job_id]
    assert len(queue_lost_entries(job_id)) == 1


def test_a_retry_whose_schedule_redis_refused_is_scheduled_by_the_reaper_for_its_original_time(
    api, counted, private_redis, caplog
):
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    job = job_claim(job_id=job_id, worker_name="test")
    connection = private_redis.client()
    private_redis.refuse_writes()

    with caplog.at_level(logging.WARNING, logger="executions.services"):
        job_retry(job=job, error={"error_code": "UPSTREAM_RATE_LIMITED"}, delay=60)  # the run ends quietly

    assert warnings_logged(caplog) == [f"Redis did not take job {job_id}; the reaper will queue it again"]
    retry_id = f"{job_id}-attempt-2"
    waiting = job_row(job_id)
    assert (waiting.status, waiting.rq_job_id) == (Job.Status.QUEUED, retry_id)
    assert waiting.run_after == waiting.enqueued_at + timedelta(seconds=60)
    private_redis.refuse_writes(False)
    assert scheduled_at(private_redis, retry_id) is None

    assert jobs_requeue_lost(now=waiting.enqueued_at + timedelta(seconds=RECOVERY_SECONDS + 1)) == 1

    assert scheduled_at(private_redis, retry_id) == math.ceil(waiting.run_after.timestamp())
    assert RQJob.fetch(retry_id, connection=connection).args == (job_id,)
    [lost] = queue_lost_entries(job_id)
    assert lost["message"].endswith(f"to run at {waiting.run_after.isoformat()}, as it was scheduled.")


def test_a_lost_schedule_whose_time_has_come_is_queued_to_run_now(api, counted, private_redis):
    instance, runs_file = counted
    job_id = start_async(api, instance, {"runs_file": runs_file})["job_id"]
    job_retry(
        job=job_claim(job_id=job_id, worker_name="test"), error={"error_code": "UPSTREAM_RATE_LIMITED"}, delay=0.2
    )
    retry_id = f"{job_id}-attempt-2"
    assert scheduled_at(private_redis, retry_id) is not None
    private_redis.client().flushall()
    time.sleep(0.3)

    assert jobs_requeue_lost(now=past_the_grace()) == 1

    assert private_redis.queue().job_ids == [retry_id]
    assert scheduled_at(private_redis, retry_id) is None
    [lost] = queue_lost_entries(job_id)
    assert "to run at" not in lost["message"]


# --- the setting -------------------------------------------------------------------------------


def test_queue_recovery_waits_30_seconds_by_default_and_refuses_less_than_one():
    assert toolexec_settings.TOOLEXEC_QUEUE_RECOVERY_SECONDS == 30
    result = _manage("check", DEBUG="true", TOOLEXEC_QUEUE_RECOVERY_SECONDS="0")
    assert result.returncode != 0
    assert "TOOLEXEC_QUEUE_RECOVERY_SECONDS must be at least 1, not 0" in result.stderr
