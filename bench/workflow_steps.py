"""Benchmark 10: workflow step-to-step latency. With an idle worker, the time from the last line
of a workflow's step A to the first line of its dependent B (``depends_on: ["a"]``), against
benchmark 3's product arm, the time from execute-async's 202 to the tool's first line, on the
same worker in the same run (issue 22). Beside them: where the step-to-step time goes, from the
times the product and RQ record on the way, and the SQL statements of A's end (which accepts B)
(in this process)."""

from __future__ import annotations

import http.client
import json
import os
import random
import time
from datetime import UTC, datetime
from typing import Any

from . import queue_start, workers
from .cache_hit import TABLE
from .common import ROUNDS, Arms, Gunicorn, ab_rounds, median, ms, p99, phases_timed, verdict

TITLE = "benchmark 10: workflow step-to-step latency"
RUNS_PER_ROUND = int(os.environ.get("BENCH_WORKFLOW_RUNS", "60"))  # × ROUNDS = 300 per arm
TARGET = {"p50_ratio_max": 1.3}  # step-to-step / queue-start (benchmark 3's product arm)
ARMS = ("queue-start", "step-to-step")
RQ_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # how RQ writes a job's times in its hash (UTC)

# A step-to-step interval cut at the times recorded on the way (each milestone's source: the
# tool's output, a row's column, RQ's job hash), in the order they happen with one job process.
MILESTONES = (
    ("a_last_line", "A's last line (`time.time()` in its output)"),
    ("a_outcome", "A's `Execution.finished_at`: `execution_finish` begins A's end transaction"),
    ("a_step_end", "A's `StepRun.finished_at`: the engine (in that transaction) has found A's row, locked the run"),
    ("b_row", "B's `StepRun.created_at`: A's row ended, `run_advance` begins"),
    ("b_execution", "B's `Execution.created_at`: still in A's transaction, `step_accept` has read B's instance, "
     "evaluated its inputs, checked readiness and the cache"),
    ("b_enqueued", "B's RQ `enqueued_at`: B's execution and job inserted, B's row updated, A's transaction "
     "committed, B on RQ"),
    ("a_returned", "A's RQ `ended_at`: the rest of A's job (`job_end`'s publish, the cache lead)"),
    ("b_dequeued", "B's RQ `started_at`: RQ has recorded A finished; the job process took B"),
    ("b_claimed", "B's `Job.started_at`: `job_run` begins B's claim"),
    ("b_first_line", "B's first line (`time.time()`, recorded in Redis)"),
)  # fmt: skip


def definition(step_a: Any, step_b: Any) -> dict[str, Any]:
    """A → B: A on an instance of ``bench-last-line``, B of ``bench-first-line`` after it,
    recording its first line in the Redis list the run's input ``key`` names."""
    return {
        "inputs": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
        "steps": [
            {"id": "a", "instance": str(step_a.pk), "inputs": {}},
            {"id": "b", "instance": str(step_b.pk), "depends_on": ["a"], "inputs": {"key": {"$expr": "input.key"}}},
        ],
    }


def fixtures() -> tuple[Any, Any, str]:
    """An ACTIVE instance of ``bench-first-line`` (the queue-start arm's, and step B's) owned by
    a fresh user with an API token; the user's instance of ``bench-last-line`` (step A) and
    workflow A → B."""
    from instances.services.instances import instance_create
    from tools.models import ToolDefinition
    from workflows.services.workflows import workflow_create

    first_line = workers.product_instance("workflow")
    last_line = instance_create(
        owner=first_line.owner,
        tool=ToolDefinition.objects.get(slug="bench-last-line"),
        name="bench workflow step a",
        workflow_id="bench",
    )
    workflow = workflow_create(
        owner=first_line.owner, key="bench", name="bench a → b", definition=definition(last_line, first_line)
    )
    return first_line, workflow, workers.product_token(first_line)


class RunClient:
    """``POST /api/v1/workflows/{id}/runs`` over one keep-alive HTTP connection, as an API
    client sends it."""

    def __init__(self, server: Gunicorn, workflow: Any, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.path = f"/api/v1/workflows/{workflow.pk}/runs"
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def submit(self, key: str) -> tuple[float, str]:
        """(time of the 202, run id)."""
        self.conn.request("POST", self.path, body=json.dumps({"key": key}), headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        accepted = time.time()
        if response.status != 202:
            raise RuntimeError(f"POST {self.path} answered {response.status}: {body[:500]!r}")
        return accepted, json.loads(body)["run_id"]

    def close(self) -> None:
        self.conn.close()


def rq_times(rq_job_id: str, *names: str) -> dict[str, float]:
    """Wall-clock times RQ recorded in a job's hash (``enqueued_at``, ``started_at``,
    ``ended_at``; kept for the result's TTL)."""
    values = workers.redis_client().hmget(f"rq:job:{rq_job_id}", names)
    return {
        name: datetime.strptime(value.decode(), RQ_TIME_FORMAT).replace(tzinfo=UTC).timestamp()
        for name, value in zip(names, values, strict=True)
    }


def run_ended(run_id: str, worker: workers.RQWorker, timeout: float = 30) -> None:
    """Until the run has ended; raises unless it SUCCEEDED."""
    from workflows.models import WorkflowRun

    deadline = time.monotonic() + timeout
    while True:
        status, error = WorkflowRun.objects.filter(pk=run_id).values_list("status", "error").get()
        if status in WorkflowRun.TERMINAL:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workflow run {run_id} did not end ({status}):\n{worker.output()}")
        time.sleep(0.002)
    if status != WorkflowRun.Status.SUCCEEDED:
        raise RuntimeError(f"the workflow run {run_id} ended {status}: {error}")


def milestones(run_id: str) -> tuple[dict[str, float], str]:
    """The wall-clock times (s) of an ended run's milestones (MILESTONES but B's first line, which
    its record holds), from its rows and RQ's job hashes; and B's execution id."""
    from workflows.models import StepRun

    fields = (
        "step_id", "output", "created_at", "finished_at", "execution_id", "execution__created_at",
        "execution__finished_at", "execution__job__started_at", "execution__job__rq_job_id",
    )  # fmt: skip
    rows = {row["step_id"]: row for row in StepRun.objects.filter(run_id=run_id).values(*fields)}
    a, b = rows["a"], rows["b"]
    # B's job may not be marked finished in RQ yet (its run ended in the database first).
    rq_a = rq_times(a["execution__job__rq_job_id"], "ended_at")
    rq_b = rq_times(b["execution__job__rq_job_id"], "enqueued_at", "started_at")
    times = {
        "a_first_line": a["output"]["first_line"],
        "a_last_line": a["output"]["last_line"],
        "a_outcome": a["execution__finished_at"].timestamp(),
        "a_step_end": a["finished_at"].timestamp(),
        "b_row": b["created_at"].timestamp(),
        "b_execution": b["execution__created_at"].timestamp(),
        "b_enqueued": rq_b["enqueued_at"],
        "a_returned": rq_a["ended_at"],
        "b_dequeued": rq_b["started_at"],
        "b_claimed": b["execution__job__started_at"].timestamp(),
    }
    return times, str(b["execution_id"])


def spaced_runs(client: RunClient, worker: workers.RQWorker, count: int, rng: random.Random) -> dict[str, Any]:
    """``count`` runs of A → B one at a time, each started with an idle worker after a gap
    (benchmark 3's); the step-to-step latencies in ms, the start → A's first line, and the
    milestones' intervals."""
    redis = workers.redis_client()
    latencies, to_first_step = [], []
    intervals: dict[str, list[float]] = {name: [] for name, _ in MILESTONES[1:]}
    for _ in range(count):
        worker.wait_idle()
        time.sleep(rng.uniform(*queue_start.GAP_SECONDS))
        key = workers.records_key("workflow")
        accepted, run_id = client.submit(key)
        popped = redis.blpop([key], timeout=30)
        if popped is None:
            raise RuntimeError(f"step b of the workflow run {run_id} did not start within 30 s:\n{worker.output()}")
        record = json.loads(popped[1])
        run_ended(run_id, worker)
        times, b_execution = milestones(run_id)
        assert record["id"] == b_execution, (record, b_execution)
        times["b_first_line"] = record["ts"]
        latencies.append((times["b_first_line"] - times["a_last_line"]) * 1000)
        to_first_step.append((times["a_first_line"] - accepted) * 1000)
        for (before, _), (name, _) in zip(MILESTONES, MILESTONES[1:], strict=False):
            intervals[name].append((times[name] - times[before]) * 1000)
    return {
        "p50_ms": median(latencies),
        "p99_ms": p99(latencies),
        "latencies": latencies,
        "to_first_step": to_first_step,
        "intervals": intervals,
    }


# --- In-process: the statements between A's end and B on RQ ----------------------------------

IN_PROCESS_RUNS = 30  # after 3 discarded
# Where the statements of A's job are cut (each at its function's return), and its commits.
CUTS = (
    ("executions.services.jobs", None, "job_check", "check"),
    ("workflows.receivers", None, "step_execution_ended", "engine"),
    ("django.db.backends.base.base", "BaseDatabaseWrapper", "commit", "COMMIT"),
)
PARTS = {
    "end": "A's end transaction, from the tool's return to the engine's receiver's return (B accepted in it)",
    "after": "A's commit (B goes to RQ on it), then the rest of A's job",
}


def statement_shape(sql: str) -> str:
    """``VERB table`` (``FOR UPDATE`` when it locks) of one statement."""
    found = TABLE.search(sql)
    lock = " FOR UPDATE" if "FOR UPDATE" in sql or "FOR NO KEY UPDATE" in sql else ""
    return f"{sql.split(None, 1)[0]} {found[1] if found else ''}{lock}".strip()


def statements_in_process(workflow: Any, runs: int = IN_PROCESS_RUNS) -> dict[str, Any]:
    """Runs of the workflow with no worker started, A's job and then B's run by ``job_run`` in
    this process (same settings and database). Of A's job: each statement and commit, in
    order, with its milliseconds (``connection.execute_wrapper``, and ``commit`` wrapped), cut
    into PARTS where ``job_check`` and the engine's receiver (which accepts B) return; and the
    milliseconds of the receiver in all. Medians over ``runs`` runs.
    The RQ jobs this leaves behind are emptied from the queue."""
    from django.db import connection

    from executions.services.jobs import job_run
    from workflows.models import StepRun, WorkflowRun
    from workflows.services.runs import run_start

    def job_of(run: Any, step_id: str) -> str:
        return str(StepRun.objects.filter(run=run, step_id=step_id).values_list("execution__job__pk", flat=True).get())

    timings: list[tuple[str, float]] = []
    cuts: dict[str, int] = {}
    whole: dict[str, float] = {}

    def timed(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            timings.append((statement_shape(sql), time.perf_counter() - started))

    def record(label: str, seconds: float) -> None:
        if label == "COMMIT":
            timings.append((label, seconds))
        else:
            cuts[label], whole[label] = len(timings), seconds

    shapes: dict[str, list[str]] = {}
    samples: dict[str, list[list[float]]] = {part: [] for part in PARTS}
    totals: dict[str, list[float]] = {"engine": []}
    for index in range(3 + runs):
        key = workers.records_key("workflow-in-process")
        run = run_start(workflow=workflow, inputs={"key": key}).run
        timings.clear()
        with connection.execute_wrapper(timed), phases_timed(CUTS, record):
            job_run(job_id=job_of(run, "a"), worker_name="bench-in-process")
        job_run(job_id=job_of(run, "b"), worker_name="bench-in-process")
        workers.redis_client().delete(key)
        status = WorkflowRun.objects.filter(pk=run.pk).values_list("status", flat=True).get()
        assert status == WorkflowRun.Status.SUCCEEDED, status
        parts = {
            "end": timings[cuts["check"] : cuts["engine"]],
            "after": timings[cuts["engine"] :],
        }
        for part, statements in parts.items():
            seen = [shape for shape, _ in statements]
            assert shapes.setdefault(part, seen) == seen, (part, shapes[part], seen)
            if index >= 3:
                samples[part].append([seconds * 1000 for _, seconds in statements])
        if index >= 3:
            for label in totals:
                totals[label].append(whole[label] * 1000)
    workers.queue_empty("product")
    return {
        "runs": runs,
        "parts": {
            part: [(shape, median([one[i] for one in samples[part]])) for i, shape in enumerate(shapes[part])]
            for part in PARTS
        },
        "totals": {label: median(values) for label, values in totals.items()},
    }


def measure() -> dict[str, Any]:
    instance, workflow, token = fixtures()
    workers.queue_empty("product")
    statements = statements_in_process(workflow)
    server = Gunicorn()
    execute_async = queue_start.ProductClient(server, instance, token)
    start_run = RunClient(server, workflow, token)
    worker = workers.RQWorker("product")
    rng = random.Random(10)
    try:
        worker.wait_idle()
        arms = ab_rounds(
            {
                "queue-start": lambda: queue_start.spaced_jobs(execute_async.submit, worker, RUNS_PER_ROUND, rng),
                "step-to-step": lambda: spaced_runs(start_run, worker, RUNS_PER_ROUND, rng),
            }
        )
    finally:
        execute_async.close()
        start_run.close()
        worker.stop()
        server.stop()
    return {"arms": arms, "runs_per_round": RUNS_PER_ROUND, "statements": statements}


def pooled(arms: Arms, arm: str, key: str = "latencies") -> list[float]:
    return [value for values in arms.values(arm, key) for value in values]  # type: ignore[union-attr]


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    arms: Arms = result["arms"]
    runs = result["runs_per_round"]
    gap = f"{queue_start.GAP_SECONDS[0] * 1000:.0f}–{queue_start.GAP_SECONDS[1] * 1000:.0f} ms"
    lines = [
        "## 10. Workflow step-to-step latency",
        "",
        "One worker, `manage.py toolexec_worker default --processes 1 --skip-checks` (a supervisor, one warm "
        "job process and the scheduler), runs both arms, alive through the whole benchmark; gunicorn (2 sync "
        "workers) serves both arms' requests, each arm on its own keep-alive connection. One at a time, each "
        f"sent {gap} (uniformly at random) after the previous one ended and the worker was idle again. "
        "*queue-start* (benchmark 3's product arm): `POST /api/v1/instances/{id}/execute-async` of the "
        "`bench-first-line` tool; the latency runs from the client's reading of the 202 to the `time.time()` "
        "the tool takes at its first line (recorded in a Redis list the client waits on). *step-to-step*: "
        "`POST /api/v1/workflows/{id}/runs` of a workflow of two steps, A on an instance of `bench-last-line` "
        "(it returns the `time.time()` of its first and of its last line as its output, which the product "
        'records with its execution) and B, `depends_on: ["a"]`, on the same `bench-first-line` instance '
        "as *queue-start*'s, its `key` input an expression of the run's inputs (`input.key`; B reads "
        "nothing of A's output); the latency runs from A's last line to B's first line. The client waits "
        "for B's record, then for the run to end SUCCEEDED, then reads A's output and the milestones below "
        "from the database and RQ's job hashes. Also recorded, not a target: from the client's reading of "
        "the run's 202 to A's first line. "
        f"One warm-up round per arm, then {ROUNDS} rounds of {runs} jobs or runs alternating the order: p50 "
        f"and p99 over all {ROUNDS * runs} of an arm, and the median and p99 over rounds of each round's p50.",
        "",
        "| arm | jobs or runs | p50 ms | p99 ms | round p50 ms (median) | round p50 ms (p99 of rounds) | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        values = pooled(arms, arm)
        lines.append(
            f"| {arm} | {len(values)} | {ms(median(values))} | {ms(p99(values))} | {ms(arms.median(arm, 'p50_ms'))} "
            f"| {ms(arms.p99(arm, 'p50_ms'))} | {ms(max(values))} |"
        )
    to_first_step = pooled(arms, "step-to-step", "to_first_step")
    p50 = {arm: median(pooled(arms, arm)) for arm in ARMS}
    p50_ratio = p50["step-to-step"] / p50["queue-start"]
    p99_ratio = p99(pooled(arms, "step-to-step")) / p99(pooled(arms, "queue-start"))
    lines += [
        "",
        f"p50 step-to-step / queue-start: {p50_ratio:.2f}×; p99: {p99_ratio:.2f}×. For information, the run's "
        f"202 → A's first line: p50 {ms(median(to_first_step))} ms, p99 {ms(p99(to_first_step))} ms "
        f"({median(to_first_step) / p50['queue-start']:.2f}× queue-start's p50).",
        "",
        "Where step-to-step goes: each milestone's time as the product or RQ recorded it (the same "
        "clock), the interval from the one before it, median and p99 over all runs (medians do not add "
        "up exactly to the whole's).",
        "",
        "| milestone (recorded as) | ms from the previous, p50 | p99 |",
        "|---|---|---|",
        f"| {MILESTONES[0][1]} | | |",
    ]
    intervals: dict[str, list[float]] = {name: [] for name, _ in MILESTONES[1:]}
    for one_round in arms.rounds["step-to-step"]:
        for name, values in one_round["intervals"].items():  # type: ignore[union-attr]
            intervals[name] += values
    for name, label in MILESTONES[1:]:
        lines.append(f"| {label} | {ms(median(intervals[name]))} | {ms(p99(intervals[name]))} |")
    statements = result["statements"]
    totals = statements["totals"]
    lines += [
        "",
        f"In this process, {statements['runs']} runs of the same workflow with no worker (after 3 discarded): "
        "`job_run` of A's job called directly, then B's. A's statements and commits from its tool's return, "
        "each with its milliseconds (median over the runs; `connection.execute_wrapper`, and the connection's "
        "`commit` wrapped; psycopg sends a transaction's BEGIN just before its first statement, so that round trip "
        "is in that statement's time). The engine's receiver (the first part's statements from its first "
        f"`workflows_` one on), which accepts B's execution too, takes {ms(totals['engine'])} ms in all, Python "
        "included; B goes to RQ when A's transaction commits.",
        "",
        "| part | statements (ms each) | statements | ms |",
        "|---|---|---|---|",
    ]
    for part, label in PARTS.items():
        found = statements["parts"][part]
        listed = ", ".join(f"`{shape}` {value:.2f}" for shape, value in found) or "none"
        lines.append(f"| {label} | {listed} | {len(found)} | {ms(sum(value for _, value in found))} |")
    lines.append("")
    verdicts = [
        f"| 10. workflow step-to-step | p50 step-to-step / queue-start (benchmark 3's product arm) | {p50_ratio:.2f}× "
        f"| ≤ {TARGET['p50_ratio_max']}× | {verdict(p50_ratio <= TARGET['p50_ratio_max'])} |",
    ]
    return lines, verdicts
