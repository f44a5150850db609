"""The warm arms of the worker benchmarks (3, 4, 8), beside bench/workers.py's forking ones:

- *warm floor*: ``rq worker --worker-class bench.floor_warm.WarmFloorWorker`` (RQ's
  ``SimpleWorker``, Django set up, no toolexec code) on ``bench-warm-floor``, running
  ``bench.floor_warm.claimed_noop``: the claim and the outcome of a row of the bench's own, each a
  committed UPDATE over the worker's one persistent connection;
- *simple bare*: ``rq worker --worker-class rq.SimpleWorker`` (RQ's own CLI, no Django) on
  ``bench-simple-bare``, running ``bench.bare_rq.noop``;
- *celery*: the Celery peer (bench/celery_peer.py), a prefork pool of N processes.

The RQ ones are driven exactly as bench/workers.py drives its own (``RQWorker``'s interface); the
Celery one has the same methods where they mean something for it (no RQ state: it is held by
cancelling its queue's consumer, Celery's remote control, instead of RQ's suspension).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from functools import cache
from typing import Any

from . import bare_rq, workers
from .common import REDIS_URL, ROOT, subprocess_env

SIMPLE_BARE_QUEUE = "bench-simple-bare"
WARM_FLOOR_QUEUE = "bench-warm-floor"  # bench.floor_warm.QUEUE (not imported: it sets Django up)
CELERY_QUEUE = "bench-celery"  # bench.celery_peer.QUEUE


class WarmRQWorker(workers.RQWorker):
    """One RQ worker process of a warm arm ("warm-floor" or "simple-bare"); no work-horse."""

    def __init__(self, arm: str, *, burst: bool = False, env: dict[str, str] | None = None) -> None:  # noqa: PLW0231
        worker_class, queue = {
            "warm-floor": ("bench.floor_warm.WarmFloorWorker", WARM_FLOOR_QUEUE),
            "simple-bare": ("rq.SimpleWorker", SIMPLE_BARE_QUEUE),
        }[arm]
        self.arm = arm
        self.name = f"bench-{arm}-{uuid.uuid4().hex[:8]}"
        command = [
            sys.executable, "-m", "rq.cli", "worker", "--url", REDIS_URL, "--worker-class", worker_class,
            "--with-scheduler", "--name", self.name, queue,
        ]  # fmt: skip
        if burst:
            command.append("--burst")
        # RQ's forking Worker names the worker in its horses' environment; SimpleWorker does not.
        env = {**(env or {}), "RQ_WORKER_ID": self.name}
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{arm}-worker-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            command, cwd=str(ROOT), env={**subprocess_env(), **env}, stdout=self.log, stderr=subprocess.STDOUT
        )


def simple_bare_enqueue(key: str, count: int = 1) -> list[str]:
    from rq import Queue

    queue = Queue(SIMPLE_BARE_QUEUE, connection=workers.redis_client())
    return [queue.enqueue(bare_rq.noop, key).id for _ in range(count)]


@cache
def warm_floor_queue() -> Any:
    from rq import Queue

    return Queue(WARM_FLOOR_QUEUE, connection=workers.redis_client())


def warm_floor_enqueue(key: str, count: int = 1) -> list[str]:
    """``count`` QUEUED rows and their jobs of ``claimed_noop``; the RQ ids."""
    from . import floor_warm

    rows = floor_warm.rows_insert(count)
    return [warm_floor_queue().enqueue(floor_warm.claimed_noop, key, row).id for row in rows]


def rq_queue_empty(arm: str) -> None:
    from rq import Queue

    name = {"warm-floor": WARM_FLOOR_QUEUE, "simple-bare": SIMPLE_BARE_QUEUE}[arm]
    Queue(name, connection=workers.redis_client()).empty()


class CeleryWorker(workers.WorkerProcess):
    """The Celery peer's worker: one main process and a prefork pool of ``processes``."""

    arm = "celery"

    def __init__(self, processes: int = 1) -> None:
        self.hostname = f"bench-celery-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
        self.name = self.hostname
        self.log = tempfile.NamedTemporaryFile(prefix="bench-celery-worker-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "bench.celery_peer", "worker", "--pool", "prefork",
                "--concurrency", str(processes), "-Q", CELERY_QUEUE, "--hostname", self.hostname,
                "--loglevel", "WARNING",
            ],
            cwd=str(ROOT), env={**subprocess_env(), "DJANGO_SETTINGS_MODULE": "bench.celery_settings"},
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def _control(self) -> Any:
        from .celery_peer import app

        return app.control

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the worker answers a ping (its pool started, consuming its queue)."""
        deadline = time.monotonic() + timeout
        while not self._control().ping(destination=[self.hostname], timeout=0.5):
            if self.process.poll() is not None:
                raise RuntimeError(f"the celery worker exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the celery worker did not answer:\n{self.output()}")

    wait_idle = wait_ready

    def hold(self) -> None:
        """Stop consuming the queue (``celery control cancel_consumer``)."""
        self._control().cancel_consumer(CELERY_QUEUE, destination=[self.hostname], reply=True, timeout=5)

    def release(self) -> None:
        self._control().add_consumer(CELERY_QUEUE, destination=[self.hostname], reply=True, timeout=5)


def celery_queue_empty() -> None:
    from .celery_peer import app

    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge(CELERY_QUEUE)
