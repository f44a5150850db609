"""Benchmark 8: platform CPU per async no-op job, from accept to outcome recorded, web and
worker together (issue 20: under 10 ms a job), beside the warm floor's.

One gunicorn (2 sync workers) and one worker process of each arm, alive through the whole
benchmark. A round sends JOBS jobs one after another over one keep-alive connection and waits
until every one has run and its outcome is recorded and the worker is idle again; the CPU is
what the gunicorn process tree and the worker's process tree spent over the round (utime +
stime of every live process, and cutime + cstime for the children they reaped: work-horses,
recycled children), from ``/proc``, divided by JOBS. The load generator is this process and is
not counted; PostgreSQL and Redis are not either (the whole machine's, from ``/proc/stat``, is
reported beside, as noisy as the machine is shared).

- *product*: ``POST /api/v1/instances/{id}/execute-async`` of ``bench-first-line``, run by the
  product's worker as bench/workers.py starts it; done when the jobs are COMPLETED;
- *warm floor*: ``POST /bench/framework-floor/accept`` (bench/baseline/views.py: DRF with the
  product's authentication and throttles, a QUEUED row and ``Queue.enqueue``), run by the warm
  floor's ``SimpleWorker`` (bench/floor_warm.py: claim and outcome, one persistent connection);
  done when the rows are COMPLETED.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path
from typing import Any

from . import warm_arms, workers
from .common import ROUNDS, Arms, Gunicorn, ab_rounds, ms, verdict

TITLE = "benchmark 8: platform CPU per async job"
JOBS = int(os.environ.get("BENCH_CPU_JOBS", "500"))  # per round
ARMS = ("product", "warm-floor")
TARGET = {"cpu_ms_max": 10.0}  # the product's web + worker CPU per job (a goal; not a ratio)


class Client:
    """One keep-alive HTTP connection posting ``{"key": …}`` to an accept endpoint."""

    def __init__(self, server: Gunicorn, path: str, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.path = path
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def submit(self, key: str) -> dict[str, Any]:
        self.conn.request("POST", self.path, body=json.dumps({"key": key}), headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 202:
            raise RuntimeError(f"{self.path} answered {response.status}: {body[:500]!r}")
        return json.loads(body)

    def close(self) -> None:
        self.conn.close()


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores: /proc/stat, everything but idle and iowait)."""
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / workers.CLOCK_TICKS


def round_of(arm: str, client: Client, server: Gunicorn, worker: Any) -> dict[str, float]:
    worker.wait_idle()
    key = workers.records_key(f"cpu-{arm}")
    web_before = workers.tree_cpu_seconds(server.process.pid)
    worker_before = workers.tree_cpu_seconds(worker.pid)
    machine_before, started = machine_busy_seconds(), time.perf_counter()
    answers = [client.submit(key) for _ in range(JOBS)]
    workers.wait_records(key, JOBS)
    deadline = time.monotonic() + 120
    while (done := completed(arm, answers)) != JOBS:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{arm}: {done} of {JOBS} outcomes recorded\n{worker.output()}")
        time.sleep(0.05)
    worker.wait_idle()
    wall = time.perf_counter() - started
    web = workers.tree_cpu_seconds(server.process.pid) - web_before
    work = workers.tree_cpu_seconds(worker.pid) - worker_before
    machine = machine_busy_seconds() - machine_before
    workers.redis_client().delete(key)
    return {
        "web_ms": web * 1000 / JOBS,
        "worker_ms": work * 1000 / JOBS,
        "total_ms": (web + work) * 1000 / JOBS,
        "machine_ms": machine * 1000 / JOBS,
        "wall_seconds": wall,
    }


def completed(arm: str, answers: list[dict[str, Any]]) -> int:
    if arm == "product":
        return workers.product_completed([answer["job_id"] for answer in answers])
    from . import floor_warm

    return floor_warm.completed([answer["execution_id"] for answer in answers])


def measure() -> dict[str, Any]:
    instance = workers.product_instance("cpu")
    token = workers.product_token(instance)  # both arms authenticate as the instance's owner
    workers.queue_empty("product")
    warm_arms.rq_queue_empty("warm-floor")
    server = Gunicorn()
    product_client = Client(server, f"/api/v1/instances/{instance.pk}/execute-async", token)
    floor_client = Client(server, "/bench/framework-floor/accept", token)
    product, floor = workers.RQWorker("product"), warm_arms.WarmRQWorker("warm-floor")
    try:
        arms = ab_rounds(
            {
                "product": lambda: round_of("product", product_client, server, product),
                "warm-floor": lambda: round_of("warm-floor", floor_client, server, floor),
            }
        )
    finally:
        product_client.close()
        floor_client.close()
        workers.stop_all([product, floor])
        server.stop()
    return {"arms": arms, "jobs": JOBS}


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    arms: Arms = result["arms"]
    lines = [
        "## 8. Platform CPU per async job",
        "",
        f"{result['jobs']:,} no-op jobs a round, sent one after another over one keep-alive connection to "
        "one gunicorn (2 sync workers) and run by one worker process of the arm, both alive through the "
        "benchmark; a round ends when every job's outcome is recorded and the worker is idle. CPU per job, "
        "accept to outcome recorded: what the gunicorn process tree (*web*) and the worker's process tree "
        "(*worker*: the worker, its work-horses or children, its scheduler) spent over the round, utime + "
        "stime of each live process and cutime + cstime of what they reaped (`/proc/<pid>/stat`), divided by "
        "the jobs. The load generator, PostgreSQL and Redis are not counted; *machine* is the whole box's "
        "busy CPU over the round (`/proc/stat`; everything, the load generator, PostgreSQL, Redis and any "
        "other load on the shared machine included). *product*: `POST /api/v1/instances/{id}/execute-async` "
        "of `bench-first-line`, run by the product's worker (as in benchmark 4), done when the jobs are "
        "COMPLETED. *warm-floor*: `POST /bench/framework-floor/accept` (a DRF `APIView` with the product's "
        "authentication and throttles: a QUEUED row of the bench's own and `Queue.enqueue`), run by the warm "
        "floor (RQ's `SimpleWorker`, `bench/floor_warm.py`: claim and outcome over one persistent "
        f"connection), done when its rows are COMPLETED. One warm-up round per arm, then {ROUNDS} rounds "
        "alternating the order; medians over rounds.",
        "",
        "| arm | web ms/job | worker ms/job | web + worker ms/job | machine ms/job | round wall s |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        lines.append(
            f"| {arm} | {ms(arms.median(arm, 'web_ms'))} | {ms(arms.median(arm, 'worker_ms'))} "
            f"| {ms(arms.median(arm, 'total_ms'))} | {ms(arms.median(arm, 'machine_ms'))} "
            f"| {arms.median(arm, 'wall_seconds'):.1f} |"
        )
    product, floor = arms.median("product", "total_ms"), arms.median("warm-floor", "total_ms")
    lines += ["", f"Web + worker CPU per job, product / warm floor: {product / floor:.2f}×.", ""]
    verdicts = [
        f"| 8. platform CPU | web + worker CPU per async job, product (warm floor {ms(floor)} ms) "
        f"| {ms(product)} ms | < {TARGET['cpu_ms_max']:g} ms | {verdict(product < TARGET['cpu_ms_max'])} |"
    ]
    return lines, verdicts
