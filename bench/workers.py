"""What the worker benchmarks (3, 4, 7) share: RQ worker processes of either arm, the
first-line records their jobs write, and the fixtures of the product arm.

- *product*: ``manage.py toolexec_worker default --processes 1 --skip-checks``, as the README
  starts it but with one job process (bench settings, so the bench tools exist): the
  supervisor, its warm job process running ``executions.jobs.run`` for jobs accepted by the
  product, and the scheduler;
- *floor*: ``rq worker --worker-class bench.floor_rq.FloorWorker`` (RQ's ``Worker`` with one
  PostgreSQL connection lent to its horses, no Django) on ``bench-floor``, running
  ``bench.floor_rq.recorded_noop``: a claim and an outcome, each a committed UPDATE;
- *bare*: ``rq worker --worker-class rq.Worker --with-scheduler`` (RQ's own CLI, no Django) on
  the queue ``bench-bare``, running ``bench.bare_rq.noop`` enqueued with ``Queue.enqueue``.

``FloorWorker`` is a subclass of ``rq.Worker``: the floor and bare arms fork a work-horse per
job; the product's job process runs its jobs in itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

from rq.worker import Worker

from . import bare_rq, floor_rq
from .common import REDIS_URL, ROOT, database_url, subprocess_env

ARMS = ("product", "floor", "bare")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PRODUCT_QUEUE = "default"  # executions.events.QUEUE_NAME


@cache
def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


class WorkerProcess:
    """A worker's main process started by a benchmark (``process``, its output in ``log``):
    what every arm's worker is measured and stopped by."""

    process: subprocess.Popen[bytes]
    log: Any

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kb(self) -> int:
        return bare_rq.rss_kb(self.pid)

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) of the worker process itself, and of the rest of its tree:
        its live children (a warm job process, the scheduler) and those it has waited for (the
        work-horses that ended)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = (int(value) / CLOCK_TICKS for value in fields[11:13])
        return utime + stime, tree_cpu_seconds(self.pid) - (utime + stime)

    def children(self) -> list[int]:
        """Its child processes (work-horses, job processes, a scheduler, a pool)."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM (a warm shutdown: the current job finishes), then whatever is left of it."""
        children = self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        Path(self.log.name).unlink(missing_ok=True)


class RQWorker(WorkerProcess):
    """One worker process of an arm (its parent: the process that forks the work-horses)."""

    def __init__(self, arm: str, *, burst: bool = False, env: dict[str, str] | None = None) -> None:
        assert arm in ARMS, arm
        self.arm = arm
        self.name = f"bench-{arm}-{uuid.uuid4().hex[:8]}"
        if arm == "product":
            command = [
                sys.executable,
                "manage.py",
                "toolexec_worker",
                PRODUCT_QUEUE,
                "--processes",
                "1",
                "--skip-checks",
            ]
        else:
            worker_class, queue = {
                "floor": ("bench.floor_rq.FloorWorker", floor_rq.QUEUE),
                "bare": ("rq.Worker", bare_rq.QUEUE),
            }[arm]
            command = [
                sys.executable, "-m", "rq.cli", "worker", "--url", REDIS_URL, "--worker-class", worker_class,
                "--with-scheduler", "--name", self.name, queue,
            ]  # fmt: skip
        env = {**(env or {}), floor_rq.DSN_VARIABLE: database_url()} if arm == "floor" else env
        if burst:
            command.append("--burst")
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{arm}-worker-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            command, cwd=str(ROOT), env={**subprocess_env(), **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def state(self) -> str | None:
        if self.arm == "product":
            # The supervisor registers nothing in RQ; its one job process does, under its own name.
            children = set(self.children())
            found = [worker for worker in Worker.all(connection=redis_client()) if worker.pid in children]
            return found[0].get_state() if found else None
        value = redis_client().hget(f"rq:worker:{self.name}", "state")
        return value.decode() if value is not None else None

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the worker waits for a job (registered in Redis, state ``idle``)."""
        deadline = time.monotonic() + timeout
        while self.state() != "idle":
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.arm} worker exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.arm} worker did not get idle:\n{self.output()}")
            time.sleep(0.002)

    def wait_exit(self, timeout: float = 600) -> None:
        """A burst worker ends once its queue is empty."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the {self.arm} worker did not finish:\n{self.output()}") from None
        if self.process.returncode != 0:
            raise RuntimeError(f"the {self.arm} worker failed ({self.process.returncode}):\n{self.output()}")


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of every live process of the tree under ``pid``: all the
    CPU the tree has used, its reaped children's included (a child that ended counts in its
    parent's cutime once waited for), so a difference of two readings is what it spent between."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(value) for value in fields[11:15]) / CLOCK_TICKS
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    pending += [int(child) for child in (task / "children").read_text().split()]
    return total


def stop_all(workers: list[RQWorker]) -> None:
    for worker in workers:
        worker.stop()


def wait_state(workers: list[RQWorker], state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(worker.state() != state for worker in workers):
        for worker in workers:
            if worker.process.poll() is not None:
                raise RuntimeError(f"the {worker.arm} worker exited:\n{worker.output()}")
        if time.monotonic() > deadline:
            states = [worker.state() for worker in workers]
            raise RuntimeError(f"workers not {state} within {timeout} s: {states}\n{workers[0].output()}")
        time.sleep(0.01)


@contextlib.contextmanager
def held(workers: list[RQWorker], plug: Any) -> Any:
    """The workers, idle, stop taking jobs (RQ's suspension, as `rq suspend`) while the block
    fills their queue; they start on it together when it ends (each within the 1 s RQ's
    suspended workers sleep between checks). ``plug(n)`` enqueues ``n`` jobs: one for each
    worker blocked on the queue, so each reaches the suspension check."""
    from rq.suspension import resume, suspend

    wait_state(workers, "idle")
    suspend(redis_client())
    try:
        plug(len(workers))
        wait_state(workers, "suspended")
        yield
    finally:
        resume(redis_client())


# --- First-line records -------------------------------------------------------------------


def records_key(label: str) -> str:
    """A fresh Redis list for the first-line records of one batch of jobs."""
    return f"bench:first-line:{label}:{uuid.uuid4().hex[:12]}"


def records(key: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in redis_client().lrange(key, 0, -1)]


def wait_records(key: str, count: int, *, timeout: float = 600, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while redis_client().llen(key) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{redis_client().llen(key)} of {count} jobs ran within {timeout} s")
        time.sleep(poll)


def rq_job_ended(rq_job_id: str) -> bool:
    status = redis_client().hget(f"rq:job:{rq_job_id}", "status")
    return status in (b"finished", b"failed", b"stopped", b"canceled")


# --- The arms' jobs -----------------------------------------------------------------------


def bare_queue() -> Any:
    from rq import Queue

    return Queue(bare_rq.QUEUE, connection=redis_client())


def bare_enqueue(key: str, count: int = 1) -> list[str]:
    """``count`` jobs of the bare no-op, with plain ``Queue.enqueue``; their RQ ids."""
    queue = bare_queue()
    return [queue.enqueue(bare_rq.noop, key).id for _ in range(count)]


def floor_enqueue(key: str, count: int = 1) -> list[str]:
    """``count`` QUEUED rows and their jobs of ``recorded_noop``, with plain ``Queue.enqueue``;
    the RQ ids."""
    from django.db import connection
    from rq import Queue

    with connection.cursor() as cursor:
        rows = floor_rq.rows_insert(cursor, count)
    queue = Queue(floor_rq.QUEUE, connection=redis_client())
    return [queue.enqueue(floor_rq.recorded_noop, key, row).id for row in rows]


def product_instance(label: str) -> Any:
    """An ACTIVE instance of ``bench-first-line`` owned by a fresh user (with the default credits)."""
    from django.contrib.auth import get_user_model

    from instances.services.instances import instance_create
    from tools.models import ToolDefinition

    user = get_user_model().objects.create_user(username=f"bench-{label}-{time.time_ns()}", password=None)
    return instance_create(
        owner=user, tool=ToolDefinition.objects.get(slug="bench-first-line"), name=f"bench {label}", workflow_id="bench"
    )


def product_token(instance: Any) -> str:
    from core.models import ApiToken

    _, key = ApiToken.issue(user=instance.owner, name="bench")
    return key


def product_enqueue(instance: Any, key: str, count: int, *, rss: bool = False) -> list[str]:
    """``count`` jobs accepted with the service execute-async calls (``execution_enqueue``),
    in this process; their RQ ids."""
    from executions.services.enqueue import execution_enqueue

    inputs = {"key": key, "rss": True} if rss else {"key": key}
    return [execution_enqueue(instance=instance, inputs=inputs).job.rq_job_id for _ in range(count)]


def product_completed(rq_job_ids: list[str]) -> int:
    """How many of these jobs the product recorded COMPLETED."""
    from executions.models import Job

    return Job.objects.filter(rq_job_id__in=rq_job_ids, status=Job.Status.COMPLETED).count()


def queue_empty(arm: str) -> None:
    """Nothing left of an earlier round on the arm's queue."""
    from rq import Queue

    name = {"product": PRODUCT_QUEUE, "floor": floor_rq.QUEUE, "bare": bare_rq.QUEUE}[arm]
    Queue(name, connection=redis_client()).empty()
