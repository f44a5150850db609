"""The *Celery peer* of benchmark 4: the same no-op job with the same durability on Celery 5, as
its documentation sets it up with Django. Prefork pool (``--concurrency`` = the processes of the
arm), the bench's Redis index as broker, ``task_acks_late`` (the message is acknowledged only
once the task has ended, so a lost worker's task runs again), ``task_track_started`` (a STARTED
row before the task runs) and django-celery-results in PostgreSQL (the outcome row), with
persistent connections: Celery's Django fixup closes the database connection before and after
every task unless ``CELERY_DB_REUSE_MAX`` is set, whatever ``CONN_MAX_AGE`` says, so it is set.
Everything else is Celery's default.

The worker: ``celery -A bench.celery_peer worker --pool prefork --concurrency N -Q bench-celery``
with ``DJANGO_SETTINGS_MODULE=bench.celery_settings``.
"""

from __future__ import annotations

import os
import time
from functools import cache
from typing import Any

from celery import Celery

from .bare_rq import first_line_record
from .common import REDIS_URL

QUEUE = "bench-celery"
# Connections are closed once per this many tasks (twice that many prerun/postrun calls): never
# within a benchmark round.
DB_REUSE_MAX = 1_000_000

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.celery_settings")

# The worker runs bench.celery_settings (django-celery-results installed); the bench process that
# sends the tasks runs bench.settings, without it, and reads the results with SQL (succeeded()).
WORKER = os.environ["DJANGO_SETTINGS_MODULE"] == "bench.celery_settings"

app = Celery("bench_celery_peer")
app.conf.update(
    broker_url=REDIS_URL,
    result_backend="django-db" if WORKER else None,
    task_acks_late=True,
    task_track_started=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    CELERY_DB_REUSE_MAX=DB_REUSE_MAX,  # read by celery.fixups.django under this very name
)


@app.task(name="bench.celery_peer.noop")
def noop(key: str) -> None:
    """Record the first line (``worker`` is the pool process), nothing else."""
    ts = time.time()
    os.environ["RQ_WORKER_ID"] = f"celery-{os.getpid()}"  # what first_line_record names the worker by
    first_line_record(_redis(), key, ts=ts, ident=noop.request.id)


@cache
def _redis() -> Any:
    """The pool process's own client (one connection, kept), as RQ's job.connection is."""
    import redis

    return redis.Redis.from_url(REDIS_URL)


def enqueue(key: str, count: int) -> list[str]:
    """``count`` tasks of the no-op (``apply_async``, as ``delay`` sends them); their ids."""
    return [noop.apply_async((key,), queue=QUEUE).id for _ in range(count)]


def succeeded(task_ids: list[str]) -> int:
    """How many of these tasks django-celery-results recorded SUCCESS (read with plain SQL: the
    bench process runs the bench settings, without the app)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM django_celery_results_taskresult WHERE task_id = ANY(%s) AND status = 'SUCCESS'",
            [task_ids],
        )
        return cursor.fetchone()[0]
