"""Benchmark 4: worker throughput. No-op jobs pre-filled, then drained by 1 and by 2 worker
processes of each arm: the product's (``ToolexecWorker`` running ``executions.jobs.run`` for
jobs accepted by ``execution_enqueue``) against bare RQ's forking ``Worker`` running a no-op
function enqueued with ``Queue.enqueue``. 2,000 jobs per arm and process count, over the
rounds (at the product's rate, 2,000 at once per round would take most of an hour)."""

from __future__ import annotations

import os
import time
from typing import Any

from . import workers
from .common import ROUNDS, Arms, ab_rounds, verdict

TITLE = "benchmark 4: worker throughput"
JOBS = int(os.environ.get("BENCH_THROUGHPUT_JOBS", "2000"))  # pre-filled per round, as the issue asks
PROCESSES = (1, 2)
TARGET = {"per_process_ratio_min": 0.70, "scaling_min": 1.5}


def steady_rate(records: list[dict[str, Any]]) -> tuple[float, int, float]:
    """Jobs per second while every process was working: over the window from the latest of
    the processes' first job to the earliest of their last job (so neither a process's
    start-up nor the tail, when the others have run out of jobs, counts), the first lines of
    all processes in it. Returns (rate, jobs in the window, window seconds)."""
    by_worker: dict[str, list[float]] = {}
    for record in records:
        by_worker.setdefault(record["worker"], []).append(record["ts"])
    start = max(min(stamps) for stamps in by_worker.values())
    end = min(max(stamps) for stamps in by_worker.values())
    inside = sorted(ts for stamps in by_worker.values() for ts in stamps if start <= ts <= end)
    seconds = end - start
    return (len(inside) - 1) / seconds, len(inside), seconds


def enqueue(arm: str, instance: Any, key: str, count: int) -> list[str]:
    if arm == "product":
        return workers.product_enqueue(instance, key, count)
    if arm == "floor":
        return workers.floor_enqueue(key, count)
    return workers.bare_enqueue(key, count)


def drain(arm: str, processes: int, instance: Any) -> dict[str, float]:
    """Start ``processes`` workers of the arm, hold them (RQ's suspension) while JOBS jobs fill
    their queue, let them go and wait until they have run every job and are idle again."""
    workers.queue_empty(arm)
    key = workers.records_key(f"throughput-{arm}-{processes}")
    running = [workers.RQWorker(arm) for _ in range(processes)]
    try:
        with workers.held(running, plug=lambda n: enqueue(arm, instance, workers.records_key("plug"), n)):
            filled = time.perf_counter()
            ids = enqueue(arm, instance, key, JOBS)
            fill_seconds = time.perf_counter() - filled
            cpu_before = [worker.cpu_seconds() for worker in running]
        started = time.perf_counter()
        workers.wait_records(key, JOBS)
        workers.wait_state(running, "idle")
        wall = time.perf_counter() - started
        cpu_after = [worker.cpu_seconds() for worker in running]
    finally:
        workers.stop_all(running)
    records = workers.records(key)
    workers.redis_client().delete(key)
    if arm == "product" and (done := workers.product_completed(ids)) != JOBS:
        raise RuntimeError(f"product × {processes}: {done} of {JOBS} jobs COMPLETED")
    rate, inside, seconds = steady_rate(records)
    parent = sum(after[0] - before[0] for before, after in zip(cpu_before, cpu_after, strict=True))
    horses = sum(after[1] - before[1] for before, after in zip(cpu_before, cpu_after, strict=True))
    return {
        "rate": rate,
        "per_process": rate / processes,
        "window_jobs": inside,
        "window_seconds": seconds,
        "wall_seconds": wall,
        "fill_seconds": fill_seconds,
        "parent_cpu_ms": parent * 1000 / JOBS,
        "horse_cpu_ms": horses * 1000 / JOBS,
        "workers_seen": len({r["worker"] for r in records}),
    }


def measure() -> dict[str, Any]:
    instance = workers.product_instance("throughput")
    by_processes: dict[int, Arms] = {}
    for processes in PROCESSES:
        by_processes[processes] = ab_rounds(
            {arm: (lambda arm=arm, processes=processes: drain(arm, processes, instance)) for arm in workers.ARMS}
        )
    return {"arms": by_processes, "jobs": JOBS, "total_jobs": JOBS * ROUNDS}


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    by_processes: dict[int, Arms] = result["arms"]
    lines = [
        "## 4. Worker throughput",
        "",
        f"{result['jobs']:,} jobs pre-filled per round ({result['total_jobs']:,} per arm and process count over "
        f"the {ROUNDS} rounds), then drained by 1 and by 2 worker processes, started beforehand and held with "
        "RQ's suspension (`rq suspend`) while the queue fills. *product*: jobs of the `bench-first-line` tool "
        "accepted with `executions.services.execution_enqueue` (the service behind execute-async), run by "
        "`manage.py rqworker default --with-scheduler --worker-class executions.worker.ToolexecWorker --skip-checks`. "
        "*bare*: a no-op function (`bench/bare_rq.py`) enqueued with `Queue.enqueue`, run by `rq worker "
        "--worker-class rq.Worker --with-scheduler` (RQ's own CLI, no Django). *floor* (not a target: what a "
        "job with a durable record costs by itself): `bench/floor_rq.py`'s `recorded_noop`, its rows inserted "
        "with the jobs, run by `rq worker --worker-class bench.floor_rq.FloorWorker --with-scheduler` (RQ's "
        "`Worker` lending one psycopg2 connection to its horses): a committed UPDATE claims the row, then the "
        "first line, then a committed UPDATE records the outcome. Every arm's jobs record the "
        "`time.time()` of their first line and their worker in a Redis list. The rate is counted while every "
        "process of the arm was working: first lines from the latest of the processes' first job to the "
        "earliest of their last job (the up to 1 s a suspended worker takes to notice the resume, and the "
        "tail, do not count). CPU per job is `/proc/<pid>/stat` of the worker processes over the drain: their "
        "own (utime + stime) and their work-horses' (cutime + cstime). One warm-up round per arm, then "
        f"{ROUNDS} rounds alternating the order, per process count.",
        "",
        "| processes | arm | jobs/s (median) | jobs/s (p99 of rounds) | per process (median) "
        "| window jobs (median) | drain wall s (median) | CPU ms per job: worker process | work-horse | fill s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for processes, arms in by_processes.items():
        for arm in workers.ARMS:
            lines.append(
                f"| {processes} | {arm} | {arms.median(arm, 'rate'):.1f} | {arms.p99(arm, 'rate'):.1f} "
                f"| {arms.median(arm, 'per_process'):.1f} | {arms.median(arm, 'window_jobs'):.0f} "
                f"| {arms.median(arm, 'wall_seconds'):.1f} | {arms.median(arm, 'parent_cpu_ms'):.2f} "
                f"| {arms.median(arm, 'horse_cpu_ms'):.2f} | {arms.median(arm, 'fill_seconds'):.1f} |"
            )
    verdicts = []
    for processes, arms in by_processes.items():
        ratio = arms.median("product", "per_process") / arms.median("bare", "per_process")
        verdicts.append(
            f"| 4. throughput, {processes} process{'es' if processes > 1 else ''} | per process, product / bare RQ "
            f"| {ratio:.0%} | ≥ {TARGET['per_process_ratio_min']:.0%} "
            f"| {verdict(ratio >= TARGET['per_process_ratio_min'])} |"
        )
    lines.append("")
    for processes, arms in by_processes.items():
        floor, bare = arms.median("floor", "per_process"), arms.median("bare", "per_process")
        lines.append(
            f"- {processes} process{'es' if processes > 1 else ''}, per process: floor / bare {floor / bare:.0%}, "
            f"product / floor {arms.median('product', 'per_process') / floor:.0%}"
        )
    for arm in workers.ARMS:
        scaling = by_processes[2].median(arm, "rate") / by_processes[1].median(arm, "rate")
        lines.append(f"- {arm}: 2 processes / 1 process = {scaling:.2f}×")
        if arm == "product":
            verdicts.append(
                f"| 4. throughput | product, 2 processes / 1 | {scaling:.2f}× | ≥ {TARGET['scaling_min']}× "
                f"| {verdict(scaling >= TARGET['scaling_min'])} |"
            )
    lines.append("")
    return lines, verdicts
