"""Benchmark 5: a job calling ``ctx.progress()`` N times against one calling it never, run
in-process through executions.services.job_run on the bench database (no HTTP, no worker)."""

from __future__ import annotations

import time
from typing import Any

from .common import Arms, PgStats, ab_rounds

N = 100_000
TARGET = {"added_ms_per_call_max": 0.05, "writes_max": "duration_s + 2", "hot_fraction_min": 0.95}


def _instance() -> Any:
    from django.contrib.auth import get_user_model

    from instances.services import instance_create
    from tools.models import ToolDefinition

    user = get_user_model().objects.create_user(username=f"bench-progress-{time.time_ns()}", password=None)
    return instance_create(
        owner=user, tool=ToolDefinition.objects.get(slug="bench-progress"), name="bench progress", workflow_id="bench"
    )


def one_job(instance: Any, *, progress: bool, stats: PgStats) -> dict[str, float]:
    """Accept a job through the service, run it as a worker would, and read what it wrote."""
    from django.db import connection, connections

    from executions.models import Job
    from executions.services import execution_enqueue, job_run

    job = execution_enqueue(instance=instance, inputs={"n": N, "progress": progress}).job
    connections.close_all()  # this backend exits and flushes its counters before "before"
    before = stats.settled(lambda: stats.table("executions_job"))
    started = time.perf_counter()
    job_run(job_id=str(job.pk), worker_name="bench")
    seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    connections.close_all()
    after = stats.settled(lambda: stats.table("executions_job"))
    job.refresh_from_db()
    assert job.status == Job.Status.COMPLETED, (job.status, job.execution.error_message)
    updates = after["upd"] - before["upd"]
    return {
        "job_seconds": seconds,
        "loop_seconds": job.execution.output_data["loop_seconds"],
        "job_updates": updates,
        "job_hot_updates": after["hot"] - before["hot"],
    }


def run(*, fillfactor: int | None = None) -> dict[str, Any]:
    from django.db import connection

    if fillfactor is not None:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE executions_job SET (fillfactor = {int(fillfactor)})")
            cursor.execute("VACUUM FULL executions_job")  # rewrite the pages with the new free space
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE relname = 'executions_job'")
        reloptions = cursor.fetchone()[0]
    instance = _instance()
    stats = PgStats()
    try:
        arms: Arms = ab_rounds(
            {
                "progress": lambda: one_job(instance, progress=True, stats=stats),
                "never": lambda: one_job(instance, progress=False, stats=stats),
            }
        )
    finally:
        stats.close()
    return {"arms": arms, "n": N, "fillfactor": fillfactor, "reloptions": reloptions}
