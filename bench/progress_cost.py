"""Benchmark 5: a job calling ``ctx.progress()`` N times against one calling it never, run
in-process through executions.services.job_run on the bench database (no HTTP, no worker)."""

from __future__ import annotations

import time
from typing import Any

from .common import ROUNDS, Arms, PgStats, ab_rounds, verdict

TITLE = "benchmark 5: progress cost"
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


def measure() -> list[dict[str, Any]]:
    """As migrated; again at fillfactor 80 if the progress writes were not heap-only enough."""
    results = [run()]
    if hot_fractions(results[0]["arms"])[1] < TARGET["hot_fraction_min"]:
        print("benchmark 5 again with the Job table at fillfactor 80 …", flush=True)
        results.append(run(fillfactor=80))
    return results


def hot_fractions(arms: Any) -> tuple[float, float]:
    """HOT fraction of all the *progress* runs' Job updates, and of those beyond what the
    *never* runs wrote (the progress writes), summed over rounds."""
    upd, hot = sum(arms.values("progress", "job_updates")), sum(arms.values("progress", "job_hot_updates"))
    base_upd, base_hot = sum(arms.values("never", "job_updates")), sum(arms.values("never", "job_hot_updates"))
    extra_upd, extra_hot = upd - base_upd, hot - base_hot
    return (hot / upd if upd else 0.0), (extra_hot / extra_upd if extra_upd > 0 else 1.0)


def section(results: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    first = results[0]
    lines = [
        "## 5. Progress cost",
        "",
        f"In-process: a job of the `bench-progress` tool looping N = {first['n']:,} times, calling "
        "`ctx.progress(i * 100 / N)` on each turn (arm *progress*) or not at all (arm *never*), "
        "accepted with `execution_enqueue` and run with `executions.services.job_run` as a worker would "
        "(Redis publishes and cancel probes included). One warm-up per arm, then "
        f"{ROUNDS} alternating rounds. Job-row writes are `n_tup_upd` of `executions_job` in "
        "`pg_stat_user_tables` over `job_run` (claim, progress flushes, outcome, attempt log), and the "
        "heap-only fraction is `n_tup_hot_upd / n_tup_upd` over the same span.",
        "",
        "| Job table | arm | job_run s (median) | (p99 of rounds) | tool loop s (median) "
        "| Job row updates (median) | HOT updates (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for result in results:
        arms = result["arms"]
        table = f"fillfactor {result['fillfactor']}" if result["fillfactor"] else "as migrated"
        for arm in ("progress", "never"):
            lines.append(
                f"| {table} | {arm} | {arms.median(arm, 'job_seconds'):.3f} | {arms.p99(arm, 'job_seconds'):.3f} | "
                f"{arms.median(arm, 'loop_seconds'):.3f} | {arms.median(arm, 'job_updates'):.0f} | "
                f"{arms.median(arm, 'job_hot_updates'):.0f} |"
            )
        added_ms = (arms.median("progress", "job_seconds") - arms.median("never", "job_seconds")) / result["n"] * 1000
        duration = arms.median("progress", "job_seconds")
        writes = arms.median("progress", "job_updates")
        extra = writes - arms.median("never", "job_updates")
        hot_all, hot_progress = hot_fractions(arms)
        lines += [
            "",
            f"{table}: added time {added_ms * 1000:.2f} µs per call. The *progress* job's run took {duration:.2f} s "
            f"and updated its Job row {writes:.0f} times, {extra:.0f} of them for progress (the rest — claim, "
            "outcome, attempt log — the job that never reports writes too). Heap-only updates: "
            f"{hot_progress:.3f} of the progress writes, {hot_all:.3f} of all the Job updates of the run (the claim "
            "and the outcome change `status`, which partial and composite indexes cover, so they cannot be HOT).",
            "",
        ]
        verdicts += [
            f"| 5. progress ({table}) | added time per call | {added_ms:.4f} ms "
            f"| ≤ {TARGET['added_ms_per_call_max']} ms | "
            f"{verdict(added_ms <= TARGET['added_ms_per_call_max'])} |",
            f"| 5. progress ({table}) | Job row writes for progress | {extra:.0f} "
            f"| ≤ duration + 2 = {duration + 2:.1f} | "
            f"{verdict(extra <= duration + 2)} |",
            f"| 5. progress ({table}) | Job row writes, whole run | {writes:.0f} "
            f"| ≤ duration + 2 = {duration + 2:.1f} | "
            f"{verdict(writes <= duration + 2)} |",
            f"| 5. progress ({table}) | HOT fraction, progress writes | {hot_progress:.3f} "
            f"| ≥ {TARGET['hot_fraction_min']} | {verdict(hot_progress >= TARGET['hot_fraction_min'])} |",
            f"| 5. progress ({table}) | HOT fraction, whole run | {hot_all:.3f} | ≥ {TARGET['hot_fraction_min']} | "
            f"{verdict(hot_all >= TARGET['hot_fraction_min'])} |",
        ]
    return lines, verdicts
