"""Benchmark 7: worker memory. One product worker runs 10,000 jobs; the resident memory of its
long-lived process (the parent that forks a work-horse per job) after 10,000 jobs against
after 100, and the work-horses' own, as each one measures itself at its first line."""

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
            horses = workers.records(key)[-min(FIRST, checkpoint) :]
            samples.append(
                {
                    "jobs": checkpoint,
                    "rss_kb": worker.rss_kb(),
                    "horse_rss_kb": sorted(r["rss_kb"] for r in horses)[len(horses) // 2],
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
    growth = (last["rss_kb"] - first["rss_kb"]) / first["rss_kb"]
    lines = [
        "## 7. Worker memory",
        "",
        f"One product worker (`manage.py toolexec_worker default --processes 1 --skip-checks`) runs "
        f"{result['jobs']:,} jobs of the `bench-first-line` "
        f"tool, accepted with `execution_enqueue` {BATCH} at a time while it works. At each checkpoint, once the "
        "worker is idle again: VmRSS of the worker process, the parent that lives as long as the worker and forks "
        "a work-horse per job (its scheduler child not included), and the median VmRSS of the last work-horses, "
        "each read by the job at its first line (a horse's RSS counts the pages it still shares with the parent).",
        "",
        "| jobs run | worker RSS MB | work-horse RSS MB (median) | elapsed s |",
        "|---|---|---|---|",
    ]
    for sample in samples:
        horse = f"{sample['horse_rss_kb'] / 1024:.1f}" if "horse_rss_kb" in sample else "—"
        lines.append(f"| {sample['jobs']:,} | {sample['rss_kb'] / 1024:.1f} | {horse} | {sample['seconds']:.0f} |")
    lines += [
        "",
        f"Worker RSS after {last['jobs']:,} jobs / after {FIRST}: {1 + growth:.3f} ({growth:+.1%}).",
        "",
    ]
    verdicts = [
        f"| 7. memory | worker RSS after {last['jobs']:,} jobs vs after {FIRST} | {growth:+.1%} "
        f"| within ±{TARGET['growth_max']:.0%} | {verdict(abs(growth) <= TARGET['growth_max'])} |"
    ]
    return lines, verdicts
