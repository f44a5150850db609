"""The *warm floor* of the worker benchmarks (3, 4, 8): RQ's ``SimpleWorker`` (no fork: one
process runs every job) running a job that claims its PostgreSQL row and records its outcome
over one persistent connection, through Django's ORM on a table of the bench's own
(``bench.models.WarmFloorJob``). No toolexec code runs on its path: the claim is a conditional
``UPDATE … SET status = 'RUNNING' WHERE id = %s AND status = 'QUEUED'`` (autocommit: committed),
then the first line, then ``UPDATE … SET status = 'COMPLETED'`` (committed). Outside a request
Django never closes the connection, so the worker opens it once.

Started as ``rq worker --worker-class bench.floor_warm.WarmFloorWorker`` (RQ's own CLI) with the
bench settings in the environment; importing this module sets Django up.
"""

from __future__ import annotations

import time
from typing import Any

import django
from django.apps import apps
from rq import get_current_job
from rq.worker import SimpleWorker

from .bare_rq import first_line_record

if not apps.ready:  # the worker process (the bench and gunicorn have set Django up already)
    django.setup()

from django.utils import timezone  # after setup: bench.models needs the app registry

from .models import WarmFloorJob

QUEUE = "bench-warm-floor"


class WarmFloorWorker(SimpleWorker):
    """RQ's ``SimpleWorker`` as it is (the class exists so the worker process sets Django up)."""


def claimed_noop(key: str, row_id: str) -> None:
    """Claim the row, record the first line, record the outcome."""
    queued = WarmFloorJob.objects.filter(pk=row_id, status="QUEUED")
    claimed = queued.update(status="RUNNING", started_at=timezone.now())
    if claimed != 1:
        return
    ts = time.time()
    job = get_current_job()
    assert job is not None
    first_line_record(job.connection, key, ts=ts, ident=job.id)
    WarmFloorJob.objects.filter(pk=row_id).update(status="COMPLETED", finished_at=timezone.now())


def rows_insert(count: int) -> list[str]:
    """``count`` QUEUED rows (one INSERT); their ids."""
    rows = WarmFloorJob.objects.bulk_create([WarmFloorJob() for _ in range(count)])
    return [str(row.pk) for row in rows]


def completed(row_ids: list[Any]) -> int:
    return WarmFloorJob.objects.filter(pk__in=row_ids, status="COMPLETED").count()
