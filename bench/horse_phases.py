"""Where a work-horse's time goes, phase by phase, and the worker's between two horses (the
tables in docs/benchmarks.md's notes).

    python -m bench.horse_phases [jobs]      # default 300; database toolexec_phases, Redis index 12

Runs the throughput benchmark's setup (jobs of ``bench-first-line`` pre-filled, one worker
held until they are all queued) with ``PhaseWorker``: ToolexecWorker whose horses time each
phase of a job with ``resource.getrusage`` (wall, CPU, minor page faults, which in a forked
child are mostly copy-on-write) and leave one JSON file each, as the worker does for its own
phases after each job. Prints the median per phase.
Not a benchmark: the wrappers cost time of their own; use it to see shares, and the throughput
benchmark for figures. (py-spy's ``--subprocesses`` joins a horse too late to see all of it.)
The worker claims and checks each job before it forks (``job_claim_ahead``), so the rows of the
claim and of the check show "—" unless the worker's claim failed and the horse claimed.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("BENCH_DB", "toolexec_phases")
os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
OUT = os.environ.get("HORSE_PHASES_DIR", os.path.join(tempfile.gettempdir(), "horse-phases"))

# (module, owner attribute or None, function, label): the phases of executions.jobs.run, then
# (indented) parts of them.
PHASES = [
    ("rq.worker.base", "BaseWorker", "prepare_job_execution", "RQ: prepare"),
    ("executions.services", None, "job_claim", "load + claim"),
    ("executions.services", None, "_job_check", "readiness + unseal"),
    ("bench.tools", "BenchFirstLineTool", "run", "the tool"),
    ("executions.services", None, "_job_end", "outcome"),
    ("rq.worker.base", "BaseWorker", "handle_job_success", "RQ: success"),
    ("executions.services", None, "readiness_check", "  readiness"),
    ("executions.services", None, "unseal", "  unseal"),
    ("executions.services", None, "execution_finish", "  the outcome's transaction"),
    ("executions.events", None, "publish", "  publish (both)"),
]
# The same for the worker process, per job: from the end of one horse to the end of the next.
WORKER_PHASES = [
    ("rq.worker.base", "BaseWorker", "dequeue_job_and_maintain_ttl", "dequeue (RQ + connections ready)"),
    ("executions.worker", "ToolexecWorker", "_claim_ahead", "claim + check ahead"),
    ("executions.services", None, "_job_check", "  readiness + unseal"),
    ("executions.events", None, "publish", "  publish"),
    ("rq.worker.base", "BaseWorker", "prepare_execution", "RQ: prepare execution"),
    ("rq.worker.worker_classes", "Worker", "fork_work_horse", "fork()"),
    ("os", None, "fork", "  os.fork"),
    ("rq.worker.worker_classes", "Worker", "monitor_work_horse", "wait for the horse"),
    ("executions.worker", "ToolexecWorker", "_database_return", "take the connections back"),
]
_spent: dict[str, list[float]] = {}


def _snap() -> tuple[float, float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_minflt


def _timed(function: Any, label: str) -> Any:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        before = _snap()
        try:
            return function(*args, **kwargs)
        finally:
            after = _snap()
            spent = _spent.setdefault(label, [0.0, 0.0, 0.0])
            for i in range(3):
                spent[i] += after[i] - before[i]

    return timed


def _instrument() -> None:
    import importlib

    for module_name, owner, name, label in [*PHASES, *WORKER_PHASES]:
        module = importlib.import_module(module_name)
        target = getattr(module, owner) if owner else module
        setattr(target, name, _timed(getattr(target, name), label))


def phase_worker() -> type:
    from executions.worker import ToolexecWorker

    class PhaseWorker(ToolexecWorker):
        def main_work_horse(self, job: Any, queue: Any) -> None:
            started, exit_ = _snap(), os._exit
            _spent.clear()  # what the worker itself timed before it forked is not the horse's

            def record_then_exit(code: int) -> None:
                ended = _snap()
                whole = [ended[i] - started[i] for i in range(3)]
                with open(os.path.join(OUT, f"{os.getpid()}.json"), "w") as out:
                    json.dump({"whole horse": whole, **_spent}, out)
                exit_(code)

            os._exit = record_then_exit  # the horse ends in os._exit
            super().main_work_horse(job, queue)

        def execute_job(self, job: Any, queue: Any) -> None:
            try:
                super().execute_job(job, queue)
            finally:
                whole = [_snap()[i] - self._since[i] for i in range(3)] if hasattr(self, "_since") else None
                self._since = _snap()
                with open(os.path.join(OUT, f"worker-{job.id}.json"), "w") as out:
                    json.dump({"whole job": whole, **_spent} if whole else {}, out)
                _spent.clear()

    return PhaseWorker


def main(jobs: int) -> None:
    from bench import run, workers
    from bench.common import subprocess_env

    run.prepare()
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    instance = workers.product_instance("phases")
    workers.queue_empty("product")
    worker = workers.RQWorker("product")
    worker.process.kill()  # the same worker, with the phase-timing class
    worker.process.wait()
    command = [
        sys.executable, "manage.py", "rqworker", workers.PRODUCT_QUEUE, "--with-scheduler",
        "--worker-class", "bench.horse_phases.PhaseWorker", "--skip-checks", "--name", worker.name,
    ]  # fmt: skip
    worker.process = subprocess.Popen(
        command, cwd=str(run.common.ROOT), env=subprocess_env(), stdout=worker.log, stderr=subprocess.STDOUT
    )
    key = workers.records_key("phases")
    try:
        with workers.held([worker], plug=lambda n: workers.product_enqueue(instance, workers.records_key("plug"), n)):
            workers.product_enqueue(instance, key, jobs)
        workers.wait_records(key, jobs)
        workers.wait_state([worker], "idle")
    finally:
        worker.stop()
    records = [json.load(open(path)) for path in glob.glob(os.path.join(OUT, "[0-9]*.json"))]
    records = [record for record in records if "outcome" in record]  # horses that ran a job
    print(f"{len(records)} work-horses; median per job")
    _table(records, ["whole horse", *(phase[3] for phase in PHASES)])
    records = [json.load(open(path)) for path in glob.glob(os.path.join(OUT, "worker-*.json"))]
    records = [record for record in records if record]  # not the first job (no horse before it)
    print(f"\nthe worker, from the end of one horse to the end of the next ({len(records)} jobs); median per job")
    _table(records, ["whole job", *(phase[3] for phase in WORKER_PHASES)])


def _table(records: list[dict[str, Any]], labels: list[str]) -> None:
    print(f"{'phase':<34} {'wall ms':>8} {'CPU ms':>8} {'faults':>7}")
    for label in labels:
        values = [record[label] for record in records if label in record]
        if not values:  # not in this process (the claim, when the worker claimed ahead of the fork)
            print(f"{label:<34} {'—':>8} {'—':>8} {'—':>7}")
            continue
        wall, cpu, faults = (statistics.median(value[i] for value in values) for i in range(3))
        print(f"{label:<34} {wall * 1000:8.2f} {cpu * 1000:8.2f} {faults:7.0f}")


if os.environ.get("RQ_WORKER_ID") is not None or "rqworker" in sys.argv:
    _instrument()  # in the worker process (before it forks any horse)


def __getattr__(name: str) -> Any:
    if name == "PhaseWorker":  # imported by rqworker's --worker-class, once Django is set up
        return phase_worker()
    raise AttributeError(name)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
