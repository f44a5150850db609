"""Benchmark 4: worker throughput. No-op jobs pre-filled, then drained by 1 and by 2 worker
processes of each arm: the product's (``executions.jobs.run`` for jobs accepted by
``execution_enqueue``) against the *warm floor* (RQ's ``SimpleWorker`` running a job that claims
its PostgreSQL row and records its outcome over one persistent connection, bench/floor_warm.py)
and the *Celery peer* with the same durability (bench/celery_peer.py); beside them, for
reference, bare RQ's forking ``Worker`` running a no-op function and the forking floor."""

from __future__ import annotations

import os
import time
from typing import Any

from . import celery_peer, warm_arms, workers
from .common import ROUNDS, Arms, ab_rounds, verdict

TITLE = "benchmark 4: worker throughput"
JOBS = int(os.environ.get("BENCH_THROUGHPUT_JOBS", "2000"))  # pre-filled per round, as the issue asks
PROCESSES = (1, 2)
# product / warm floor and product / Celery peer per process (at 1 and at 2 processes), and the
# product's 2 processes / 1 (issue 20).
TARGET = {"warm_floor_ratio_min": 0.75, "celery_ratio_min": 1.0, "scaling_min": 1.6}
ARMS = (*workers.ARMS, "warm-floor", "celery")


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
    if arm == "warm-floor":
        return warm_arms.warm_floor_enqueue(key, count)
    return workers.bare_enqueue(key, count)


def start(arm: str) -> workers.RQWorker:
    return warm_arms.WarmRQWorker(arm) if arm == "warm-floor" else workers.RQWorker(arm)


def drain(arm: str, processes: int, instance: Any) -> dict[str, float]:
    """Start ``processes`` workers of the arm, hold them (RQ's suspension) while JOBS jobs fill
    their queue, let them go and wait until they have run every job and are idle again."""
    if arm == "celery":
        return drain_celery(processes)
    if arm == "warm-floor":
        warm_arms.rq_queue_empty(arm)
    else:
        workers.queue_empty(arm)
    key = workers.records_key(f"throughput-{arm}-{processes}")
    running = [start(arm) for _ in range(processes)]
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
    return _figures(records, processes, cpu_before, cpu_after, wall, fill_seconds)


def drain_celery(processes: int) -> dict[str, float]:
    """The Celery peer: one worker with a prefork pool of ``processes``, its queue's consumer
    cancelled (Celery's remote control) while JOBS tasks fill it, then added back; done when
    every task has run and django-celery-results holds its SUCCESS row."""
    warm_arms.celery_queue_empty()
    key = workers.records_key(f"throughput-celery-{processes}")
    worker = warm_arms.CeleryWorker(processes)
    try:
        worker.wait_ready()
        worker.hold()
        filled = time.perf_counter()
        ids = celery_peer.enqueue(key, JOBS)
        fill_seconds = time.perf_counter() - filled
        cpu_before = [worker.cpu_seconds()]
        worker.release()
        started = time.perf_counter()
        workers.wait_records(key, JOBS)
        deadline = time.monotonic() + 60
        while (done := celery_peer.succeeded(ids)) != JOBS:
            if time.monotonic() > deadline:
                raise RuntimeError(f"celery × {processes}: {done} of {JOBS} results SUCCESS\n{worker.output()}")
            time.sleep(0.05)
        wall = time.perf_counter() - started
        cpu_after = [worker.cpu_seconds()]
    finally:
        worker.stop()
    records = workers.records(key)
    workers.redis_client().delete(key)
    return _figures(records, processes, cpu_before, cpu_after, wall, fill_seconds)


def _figures(
    records: list[dict[str, Any]],
    processes: int,
    cpu_before: list[tuple[float, float]],
    cpu_after: list[tuple[float, float]],
    wall: float,
    fill_seconds: float,
) -> dict[str, float]:
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
            {arm: (lambda arm=arm, processes=processes: drain(arm, processes, instance)) for arm in ARMS}
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
        "`manage.py toolexec_worker default --processes 1 --skip-checks` per process (a supervisor, one warm job "
        "process and the scheduler). "
        "*warm floor*: `bench/floor_warm.py`'s `claimed_noop`, its rows (`bench.models.WarmFloorJob`) inserted "
        "with the jobs, run by `rq worker --worker-class bench.floor_warm.WarmFloorWorker --with-scheduler` (RQ's "
        "`SimpleWorker`, no fork, Django set up, no toolexec code): a conditional ORM `update()` claims the row "
        "(QUEUED → RUNNING, committed), then the first line, then another records the outcome (COMPLETED, "
        "committed), over the worker's one persistent connection. *celery*: the Celery peer with the same "
        "durability (`bench/celery_peer.py`): a no-op task sent with `apply_async`, run by `celery worker "
        "--pool prefork --concurrency N` (one worker, N pool processes), Redis broker (the bench's index), "
        "`task_acks_late`, `task_track_started`, django-celery-results in PostgreSQL (a STARTED and a SUCCESS "
        "row per task) with persistent connections (`CONN_MAX_AGE` None and `CELERY_DB_REUSE_MAX`, without "
        "which Celery's Django fixup closes the connection around every task); held by cancelling its "
        "queue's consumer (`celery control cancel_consumer`) instead of RQ's suspension, and done when every "
        "task's SUCCESS row is there. For reference (targets of the previous issue): *bare*, a no-op function "
        "(`bench/bare_rq.py`) enqueued with `Queue.enqueue`, run by `rq worker --worker-class rq.Worker "
        "--with-scheduler` (RQ's own CLI, no Django); *floor*, `bench/floor_rq.py`'s `recorded_noop` on RQ's "
        "forking `Worker` lending one psycopg connection to its horses (the same claim and outcome, plain SQL). "
        "Every arm's jobs record the "
        "`time.time()` of their first line and their worker (pool process for Celery) in a Redis list. The "
        "rate is counted while every process of the arm was working: first lines from the latest of the "
        "processes' first job to the earliest of their last job (the up to 1 s a suspended worker takes to "
        "notice the resume, and the tail, do not count). CPU per job is `/proc/<pid>/stat` of the worker "
        "processes over the drain: their own (utime + stime) and their children's (work-horses, cutime + "
        "cstime; for Celery the pool processes' utime + stime). One warm-up round per arm, then "
        f"{ROUNDS} rounds alternating the order, per process count.",
        "",
        "| processes | arm | jobs/s (median) | jobs/s (p99 of rounds) | per process (median) "
        "| window jobs (median) | drain wall s (median) | CPU ms per job: worker process | work-horse / pool "
        "| fill s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for processes, arms in by_processes.items():
        for arm in ARMS:
            lines.append(
                f"| {processes} | {arm} | {arms.median(arm, 'rate'):.1f} | {arms.p99(arm, 'rate'):.1f} "
                f"| {arms.median(arm, 'per_process'):.1f} | {arms.median(arm, 'window_jobs'):.0f} "
                f"| {arms.median(arm, 'wall_seconds'):.1f} | {arms.median(arm, 'parent_cpu_ms'):.2f} "
                f"| {arms.median(arm, 'horse_cpu_ms'):.2f} | {arms.median(arm, 'fill_seconds'):.1f} |"
            )
    verdicts = []
    for processes, arms in by_processes.items():
        product = arms.median("product", "per_process")
        label = f"4. throughput, {processes} process{'es' if processes > 1 else ''}"
        for arm, name, key in (
            ("warm-floor", "warm floor", "warm_floor_ratio_min"),
            ("celery", "Celery peer", "celery_ratio_min"),
        ):
            ratio = product / arms.median(arm, "per_process")
            verdicts.append(
                f"| {label} | per process, product / {name} | {ratio:.2f}× | ≥ {TARGET[key]}× "
                f"| {verdict(ratio >= TARGET[key])} |"
            )
    lines.append("")
    for processes, arms in by_processes.items():
        per = {arm: arms.median(arm, "per_process") for arm in ARMS}
        lines.append(
            f"- {processes} process{'es' if processes > 1 else ''}, per process: product / bare "
            f"{per['product'] / per['bare']:.0%}, product / floor {per['product'] / per['floor']:.0%} (reference); "
            f"warm floor / Celery peer {per['warm-floor'] / per['celery']:.2f}×"
        )
    for arm in ARMS:
        scaling = by_processes[2].median(arm, "rate") / by_processes[1].median(arm, "rate")
        lines.append(f"- {arm}: 2 processes / 1 process = {scaling:.2f}×")
        if arm == "product":
            verdicts.append(
                f"| 4. throughput | product, 2 processes / 1 | {scaling:.2f}× | ≥ {TARGET['scaling_min']}× "
                f"| {verdict(scaling >= TARGET['scaling_min'])} |"
            )
    lines.append("")
    return lines, verdicts
