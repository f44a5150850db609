"""Benchmark 5: a job calling ``ctx.progress()`` N times against one calling it never, run
in-process through executions.services.job_run on the bench database (no HTTP, no worker):
once as fast as the loop goes (the cost per call), once spread over a few seconds (the writes
a longer job makes, and whether they are heap-only)."""

from __future__ import annotations

import time
from typing import Any

from .common import ROUNDS, Arms, PgStats, ab_rounds, verdict

TITLE = "benchmark 5: progress cost"
N = 100_000
SPREAD_SECONDS = 5.0
TARGET = {"added_ms_per_call_max": 0.05, "writes_max": "duration_s + 2", "hot_fraction_min": 0.95}


def _instance() -> Any:
    from django.contrib.auth import get_user_model

    from instances.services.instances import instance_create
    from tools.models import ToolDefinition

    user = get_user_model().objects.create_user(username=f"bench-progress-{time.time_ns()}", password=None)
    return instance_create(
        owner=user, tool=ToolDefinition.objects.get(slug="bench-progress"), name="bench progress", workflow_id="bench"
    )


def one_job(instance: Any, *, progress: bool, stats: PgStats, spread: float = 0) -> dict[str, float]:
    """Accept a job through the service, run it as a worker would, and read what it wrote."""
    from django.db import connection, connections

    from executions.models import Job
    from executions.services.enqueue import execution_enqueue
    from executions.services.jobs import job_run

    inputs = {"n": N, "progress": progress, "spread_seconds": spread}
    job = execution_enqueue(instance=instance, inputs=inputs).job
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
        tight: Arms = ab_rounds(
            {
                "progress": lambda: one_job(instance, progress=True, stats=stats),
                "never": lambda: one_job(instance, progress=False, stats=stats),
            }
        )
        spread: Arms = ab_rounds(
            {
                "progress": lambda: one_job(instance, progress=True, stats=stats, spread=SPREAD_SECONDS),
                "never": lambda: one_job(instance, progress=False, stats=stats, spread=SPREAD_SECONDS),
            },
            warmup=0,
        )
    finally:
        stats.close()
    return {"tight": tight, "spread": spread, "n": N, "fillfactor": fillfactor, "reloptions": reloptions}


def measure() -> list[dict[str, Any]]:
    """As migrated; again at fillfactor 80 if the progress writes were not heap-only enough."""
    results = [run()]
    if hot_fractions(results[0]["spread"])[1] < TARGET["hot_fraction_min"]:
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
        "(Redis publishes, cancel probes and the progress writer thread included). Two loops: *tight* runs "
        f"as fast as it goes (the cost per call); *spread* pauses a hundred times to last {SPREAD_SECONDS:g} s "
        "(the writes of a longer job). One warm-up per arm of the tight loop, then "
        f"{ROUNDS} alternating rounds of each. Job-row writes are `n_tup_upd` of `executions_job` in "
        "`pg_stat_user_tables` over `job_run` (claim, progress writes, outcome), and the heap-only "
        "fraction is `n_tup_hot_upd / n_tup_upd` over the same span.",
        "",
        "| Job table | loop | arm | job_run s (median) | (p99 of rounds) | tool loop s (median) "
        "| Job row updates (median) | HOT updates (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for result in results:
        table = f"fillfactor {result['fillfactor']}" if result["fillfactor"] else "as migrated"
        for loop in ("tight", "spread"):
            arms = result[loop]
            for arm in ("progress", "never"):
                lines.append(
                    f"| {table} | {loop} | {arm} | {arms.median(arm, 'job_seconds'):.3f} | "
                    f"{arms.p99(arm, 'job_seconds'):.3f} | {arms.median(arm, 'loop_seconds'):.3f} | "
                    f"{arms.median(arm, 'job_updates'):.0f} | {arms.median(arm, 'job_hot_updates'):.0f} |"
                )
        tight, spread = result["tight"], result["spread"]
        added_ms = (tight.median("progress", "job_seconds") - tight.median("never", "job_seconds")) / result["n"] * 1000
        lines += ["", f"{table}: added time {added_ms * 1000:.2f} µs per call."]
        verdicts.append(
            f"| 5. progress ({table}) | added time per call | {added_ms:.4f} ms "
            f"| ≤ {TARGET['added_ms_per_call_max']} ms | {verdict(added_ms <= TARGET['added_ms_per_call_max'])} |"
        )
        for loop, arms in (("tight", tight), ("spread", spread)):
            duration = arms.median("progress", "job_seconds")
            writes = arms.median("progress", "job_updates")
            extra = writes - arms.median("never", "job_updates")
            hot_all, hot_progress = hot_fractions(arms)
            lines.append(
                f"The {loop} *progress* job ran {duration:.2f} s and updated its Job row {writes:.0f} times, "
                f"{extra:.0f} of them for progress (the claim and the outcome, which carries the last report and "
                f"the attempt log, the job that never reports writes too). Heap-only: {hot_progress:.3f} of the "
                f"progress writes, {hot_all:.3f} of all the run's Job updates (the claim and the outcome change "
                "`status`, which indexes cover, so they cannot be HOT; the progress writes touch no indexed column)."
            )
            verdicts.append(
                f"| 5. progress ({table}, {loop}) | Job row writes, whole run | {writes:.0f} "
                f"| ≤ duration + 2 = {duration + 2:.1f} | {verdict(writes <= duration + 2)} |"
            )
        hot_progress = hot_fractions(spread)[1]
        verdicts.append(
            f"| 5. progress ({table}, spread) | HOT fraction of the progress writes | {hot_progress:.3f} "
            f"| ≥ {TARGET['hot_fraction_min']} | {verdict(hot_progress >= TARGET['hot_fraction_min'])} |"
        )
        lines.append("")
    return lines, verdicts
