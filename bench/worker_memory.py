"""Benchmark 7: worker memory. One product worker (a supervisor and one warm job process) runs
10,000 jobs; the resident memory of the process that runs them, as each job measures it at its
first line, after 10,000 jobs against after 100 (recycling after TOOLEXEC_WORKER_MAX_JOBS
included: a recycled process is a new one), and the supervisor's beside it."""

from __future__ import annotations

import os
import time
from typing import Any

from . import workers
from .common import verdict

TITLE = "benchmark 7: worker memory"
JOBS = int(os.environ.get("BENCH_MEMORY_JOBS", "10000"))
FIRST = 100
CHECKPOINTS = sorted({FIRST, *(JOBS * step // 10 for step in range(1, 11))})
BATCH = 500  # jobs accepted at a time, while the worker works on those before
TARGET = {"growth_max": 0.10}


def measure() -> dict[str, Any]:
    instance = workers.product_instance("memory")
    workers.queue_empty("product")
    key = workers.records_key("memory")
    worker = workers.RQWorker("product")
    samples = []
    started = time.perf_counter()
    try:
        worker.wait_idle()
        samples.append({"jobs": 0, "rss_kb": worker.rss_kb(), "seconds": 0.0})
        accepted = 0
        for checkpoint in CHECKPOINTS:
            while accepted < checkpoint:
                count = min(BATCH, checkpoint - accepted)
                workers.product_enqueue(instance, key, count, rss=True)
                accepted += count
            workers.wait_records(key, checkpoint, timeout=900)
            workers.wait_state([worker], "idle")
            ran = workers.records(key)[-min(FIRST, checkpoint) :]
            samples.append(
                {
                    "jobs": checkpoint,
                    "rss_kb": worker.rss_kb(),
                    "job_rss_kb": sorted(r["rss_kb"] for r in ran)[len(ran) // 2],
                    "seconds": time.perf_counter() - started,
                }
            )
    finally:
        worker.stop()
        workers.redis_client().delete(key)
    return {"samples": samples, "jobs": JOBS}


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    samples = result["samples"]
    first = next(s for s in samples if s["jobs"] == FIRST)
    last = samples[-1]
    growth = (last["job_rss_kb"] - first["job_rss_kb"]) / first["job_rss_kb"]
    lines = [
        "## 7. Worker memory",
        "",
        f"One product worker (`manage.py toolexec_worker default --processes 1 --skip-checks`) runs "
        f"{result['jobs']:,} jobs of the `bench-first-line` "
        f"tool, accepted with `execution_enqueue` {BATCH} at a time while it works. At each checkpoint, once the "
        "worker is idle again: the median VmRSS of the process that ran the last jobs, each read by the job at its "
        "first line (the warm job process; after TOOLEXEC_WORKER_MAX_JOBS jobs a new one), and the VmRSS of the "
        "supervisor, which runs no job.",
        "",
        "| jobs run | supervisor RSS MB | job process RSS MB (median) | elapsed s |",
        "|---|---|---|---|",
    ]
    for sample in samples:
        job = f"{sample['job_rss_kb'] / 1024:.1f}" if "job_rss_kb" in sample else "—"
        lines.append(f"| {sample['jobs']:,} | {sample['rss_kb'] / 1024:.1f} | {job} | {sample['seconds']:.0f} |")
    lines += [
        "",
        f"Job process RSS after {last['jobs']:,} jobs / after {FIRST}: {1 + growth:.3f} ({growth:+.1%}).",
        "",
    ]
    verdicts = [
        f"| 7. memory | job process RSS after {last['jobs']:,} jobs vs after {FIRST} | {growth:+.1%} "
        f"| within ±{TARGET['growth_max']:.0%} | {verdict(abs(growth) <= TARGET['growth_max'])} |"
    ]
    return lines, verdicts
