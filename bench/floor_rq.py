"""The *floor* arm of the worker benchmarks (3, 4): what any job with a durable record costs on
RQ's forking worker, so the product's gap to bare RQ can be told apart from what a record
costs by itself. Not a target; the worker benchmarks' counterpart of benchmark 1's floor.

``FloorWorker`` is RQ's ``Worker`` holding one PostgreSQL connection (psycopg, no Django),
lent to every work-horse (the product's forking worker did the same until issue 20). ``recorded_noop`` does the least a
recorded run needs: it claims its row (``UPDATE … WHERE status = 'QUEUED'``, committed), takes
its first line, and records the outcome (``UPDATE``, committed): two durable commits, as the
product's claim and outcome are.

Imported by the floor worker and its work-horses, so it imports neither Django nor the product.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import psycopg
from rq import get_current_job
from rq.worker import Worker

from .bare_rq import first_line_record

QUEUE = "bench-floor"
DSN_VARIABLE = "BENCH_FLOOR_DSN"
TABLE_SQL = """
CREATE TABLE IF NOT EXISTS bench_floor_job (
    id uuid PRIMARY KEY,
    status varchar(20) NOT NULL,
    started_at timestamptz,
    finished_at timestamptz
);
"""

_lent: Any = None  # the worker's connection, inherited by each work-horse


class FloorWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        global _lent
        _lent = psycopg.connect(os.environ[DSN_VARIABLE])
        _lent.autocommit = True


def recorded_noop(key: str, row_id: str) -> None:
    """Claim the row, record the first line, record the outcome."""
    with _lent.cursor() as cursor:
        cursor.execute(
            "UPDATE bench_floor_job SET status = 'RUNNING', started_at = now() WHERE id = %s AND status = 'QUEUED'",
            [row_id],
        )
        if cursor.rowcount != 1:
            return
        ts = time.time()
        job = get_current_job()
        assert job is not None
        first_line_record(job.connection, key, ts=ts, ident=job.id)
        cursor.execute("UPDATE bench_floor_job SET status = 'COMPLETED', finished_at = now() WHERE id = %s", [row_id])


def rows_insert(cursor: Any, count: int) -> list[str]:
    """``count`` QUEUED rows (one INSERT); their ids."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    cursor.execute(
        "INSERT INTO bench_floor_job (id, status) SELECT unnest(%s::uuid[]), 'QUEUED'",
        [ids],
    )
    return ids
