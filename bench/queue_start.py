"""Benchmark 3: queue-to-start latency. With an idle worker, the time from the 202 of
``execute-async`` (through gunicorn) to the tool's first line, against RQ's ``SimpleWorker``
running a bare no-op: from the return of ``Queue.enqueue`` to the function's first line (the
target, issue 20); beside them, for reference, the warm floor (bench/floor_warm.py: a
``SimpleWorker`` job that claims a row first), and RQ's own forking ``Worker`` running the same
no-op (*bare*) and the forking floor (bench/floor_rq.py)."""

from __future__ import annotations

import http.client
import json
import os
import random
import time
from typing import Any

from . import warm_arms, workers
from .common import ROUNDS, Arms, Gunicorn, ab_rounds, median, ms, p99, verdict

TITLE = "benchmark 3: queue-to-start latency"
JOBS_PER_ROUND = int(os.environ.get("BENCH_QUEUE_START_JOBS", "60"))  # × ROUNDS = 300 per arm
GAP_SECONDS = (0.05, 0.15)  # idle time between one job's end and the next submission (uniform)
TARGET = {"p50_ratio_max": 1.2}  # product / simple bare (RQ's SimpleWorker, a bare no-op)
ARMS = (*workers.ARMS, "simple-bare", "warm-floor")


class ProductClient:
    """execute-async over one keep-alive HTTP connection, as an API client sends it."""

    def __init__(self, server: Gunicorn, instance: Any, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.path = f"/api/v1/instances/{instance.pk}/execute-async"
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def submit(self, key: str) -> tuple[float, str, str]:
        """(time of the 202, execution id, RQ job id)."""
        self.conn.request("POST", self.path, body=json.dumps({"key": key}), headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        accepted = time.time()
        if response.status != 202:
            raise RuntimeError(f"execute-async answered {response.status}: {body[:500]!r}")
        data = json.loads(body)
        return accepted, data["execution_id"], data["job_id"]

    def close(self) -> None:
        self.conn.close()


def bare_submit(key: str) -> tuple[float, str, str]:
    """(time ``Queue.enqueue`` returned, RQ job id, RQ job id)."""
    job_id = workers.bare_queue().enqueue(workers.bare_rq.noop, key).id
    return time.time(), job_id, job_id


def floor_submit(key: str) -> tuple[float, str, str]:
    """(time ``Queue.enqueue`` returned, RQ job id, RQ job id); its row is inserted before."""
    [job_id] = workers.floor_enqueue(key)
    return time.time(), job_id, job_id


def simple_bare_submit(key: str) -> tuple[float, str, str]:
    """(time ``Queue.enqueue`` returned, RQ job id, RQ job id), on the SimpleWorker's queue."""
    [job_id] = warm_arms.simple_bare_enqueue(key)
    return time.time(), job_id, job_id


def warm_floor_submit(key: str) -> tuple[float, str, str]:
    """(time ``Queue.enqueue`` returned, RQ job id, RQ job id); its row is inserted before."""
    [job_id] = warm_arms.warm_floor_enqueue(key)
    return time.time(), job_id, job_id


def spaced_jobs(submit: Any, worker: workers.RQWorker, count: int, rng: random.Random) -> dict[str, Any]:
    """``count`` jobs one at a time, each sent to an idle worker after a gap; the latencies in ms."""
    redis = workers.redis_client()
    latencies = []
    for _ in range(count):
        worker.wait_idle()
        time.sleep(rng.uniform(*GAP_SECONDS))
        key = workers.records_key("queue-start")
        accepted, ident, rq_job_id = submit(key)
        popped = redis.blpop([key], timeout=30)
        if popped is None:
            raise RuntimeError(f"the {worker.arm} job {rq_job_id} did not start within 30 s:\n{worker.output()}")
        record = json.loads(popped[1])
        assert record["id"] == ident, (record, ident)
        latencies.append((record["ts"] - accepted) * 1000)
        deadline = time.monotonic() + 30
        while not workers.rq_job_ended(rq_job_id):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {worker.arm} job {rq_job_id} did not end:\n{worker.output()}")
            time.sleep(0.002)
    return {"p50_ms": median(latencies), "p99_ms": p99(latencies), "latencies": latencies}


def measure() -> dict[str, Any]:
    instance = workers.product_instance("queue-start")
    token = workers.product_token(instance)
    for arm in workers.ARMS:
        workers.queue_empty(arm)
    server = Gunicorn()
    client = ProductClient(server, instance, token)
    started = [workers.RQWorker("product"), workers.RQWorker("floor"), workers.RQWorker("bare")]
    product, floor, bare = started
    for arm in ("simple-bare", "warm-floor"):
        warm_arms.rq_queue_empty(arm)
    warm = [warm_arms.WarmRQWorker("simple-bare"), warm_arms.WarmRQWorker("warm-floor")]
    simple_bare, warm_floor = warm
    rng = random.Random(3)
    try:
        for worker in [*started, *warm]:
            worker.wait_idle()
        arms = ab_rounds(
            {
                "product": lambda: spaced_jobs(client.submit, product, JOBS_PER_ROUND, rng),
                "floor": lambda: spaced_jobs(floor_submit, floor, JOBS_PER_ROUND, rng),
                "bare": lambda: spaced_jobs(bare_submit, bare, JOBS_PER_ROUND, rng),
                "simple-bare": lambda: spaced_jobs(simple_bare_submit, simple_bare, JOBS_PER_ROUND, rng),
                "warm-floor": lambda: spaced_jobs(warm_floor_submit, warm_floor, JOBS_PER_ROUND, rng),
            }
        )
    finally:
        client.close()
        workers.stop_all(started)
        workers.stop_all(warm)
        server.stop()
    return {"arms": arms, "jobs_per_round": JOBS_PER_ROUND}


def pooled(arms: Arms, arm: str) -> list[float]:
    return [value for latencies in arms.values(arm, "latencies") for value in latencies]  # type: ignore[union-attr]


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    arms: Arms = result["arms"]
    jobs = result["jobs_per_round"]
    lines = [
        "## 3. Queue-to-start latency",
        "",
        "An idle worker; one job at a time, each sent "
        f"{GAP_SECONDS[0] * 1000:.0f}–{GAP_SECONDS[1] * 1000:.0f} ms (uniformly at random) after the previous one "
        "ended and its worker was idle again. *product*: `POST /api/v1/instances/{id}/execute-async` of the "
        "`bench-first-line` tool through gunicorn (2 sync workers) on a keep-alive connection, run by "
        "`manage.py toolexec_worker default --processes 1 --skip-checks` (a supervisor, one warm job process "
        "and the scheduler); the latency runs from the client's reading of the 202 to the `time.time()` the tool "
        "takes at its first line (recorded in a Redis list the client waits on). *bare*: `Queue.enqueue` of a "
        "no-op function (`bench/bare_rq.py`) run by `rq worker --worker-class rq.Worker --with-scheduler` (RQ's "
        "own CLI, no Django), from the return of `enqueue` to the function's first line. *floor* (not a target: "
        "what a job with a durable record costs by itself): `Queue.enqueue` of `bench/floor_rq.py`'s "
        "`recorded_noop` after inserting its row, run by `rq worker --worker-class bench.floor_rq.FloorWorker "
        "--with-scheduler` (RQ's `Worker` lending one psycopg connection to its horses, no Django); the job "
        "claims its row with a committed UPDATE, then takes its first line, then records its outcome with "
        "another. *simple-bare* (the target's arm): the same no-op run by `rq worker --worker-class "
        "rq.SimpleWorker --with-scheduler` (RQ's own CLI, no Django, no fork). *warm-floor* (not a target): "
        "`bench/floor_warm.py`'s `claimed_noop` after inserting its row, run by `rq worker --worker-class "
        "bench.floor_warm.WarmFloorWorker --with-scheduler` (RQ's `SimpleWorker`, Django set up, no toolexec "
        "code): a conditional ORM `update()` claims the row, then the first line, then another records the "
        "outcome, over one persistent connection. All workers alive through the whole benchmark on their "
        "own queues. "
        f"One warm-up round per arm, then {ROUNDS} rounds of "
        f"{jobs} jobs alternating the order: p50 and p99 over all {ROUNDS * jobs} jobs of an arm, and the "
        "median and p99 over rounds of each round's p50.",
        "",
        "| arm | jobs | p50 ms | p99 ms | round p50 ms (median) | round p50 ms (p99 of rounds) | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        values = pooled(arms, arm)
        lines.append(
            f"| {arm} | {len(values)} | {ms(median(values))} | {ms(p99(values))} | {ms(arms.median(arm, 'p50_ms'))} "
            f"| {ms(arms.p99(arm, 'p50_ms'))} | {ms(max(values))} |"
        )
    p50 = {arm: median(pooled(arms, arm)) for arm in ARMS}
    p50_ratio = p50["product"] / p50["simple-bare"]
    p99_ratio = p99(pooled(arms, "product")) / p99(pooled(arms, "simple-bare"))
    lines += [
        "",
        f"p50 product / simple-bare: {p50_ratio:.2f}×; p99: {p99_ratio:.2f}×. "
        f"p50 product / warm-floor: {p50['product'] / p50['warm-floor']:.2f}×; "
        f"warm-floor / simple-bare: {p50['warm-floor'] / p50['simple-bare']:.2f}×. "
        f"For reference (the previous issue's arms): product / bare (forking) {p50['product'] / p50['bare']:.2f}×, "
        f"floor / bare {p50['floor'] / p50['bare']:.2f}×, product / floor {p50['product'] / p50['floor']:.2f}×.",
        "",
    ]
    verdicts = [
        f"| 3. queue-to-start | p50 product / RQ SimpleWorker (bare no-op) | {p50_ratio:.2f}× "
        f"| ≤ {TARGET['p50_ratio_max']}× | {verdict(p50_ratio <= TARGET['p50_ratio_max'])} |",
    ]
    return lines, verdicts
