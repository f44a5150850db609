"""toolexec's warm worker (`manage.py toolexec_worker`): a supervisor and the processes it runs.

Celery's prefork-pool model, on RQ. The supervisor forks TOOLEXEC_WORKER_PROCESSES job
processes and one scheduler process, then watches them; it never runs a job itself.

- A job process is an RQ ``SimpleWorker`` (``ToolexecWorker``): it runs job after job in
  itself, on one persistent database connection and one Redis client, with no fork per job.
  It tells the supervisor, over a pipe, which job it starts and when it is done with it.
  After TOOLEXEC_WORKER_MAX_JOBS jobs, or once its RSS is above TOOLEXEC_WORKER_MAX_RSS_MB
  after a job, it exits and the supervisor starts a fresh one.
- Heartbeats come from the supervisor, which runs no tool code: a tool can block its own
  process's threads (C code that holds the GIL), never the supervisor. Every
  TOOLEXEC_JOB_HEARTBEAT_SECONDS it marks the jobs its processes run alive, and runs the
  reaper (``jobs_reap``), which ends jobs whose worker vanished elsewhere and stops overdue
  cancellations; while idle it runs the reaper every maintenance interval.
- A hard timeout is RQ's: SIGALRM at the job's timeout raises in the tool (``time.sleep``, a
  socket read, a regular expression are all interrupted). A process still on a job a second
  after its timeout could not be interrupted: the supervisor SIGKILLs it, records the job
  TIMED_OUT and starts another.
- Cancelling a tool that never checks: at TOOLEXEC_CANCEL_GRACE_SECONDS the reaper ends the
  job CANCELLED and sends RQ's stop-job command; the job process receives it on its pubsub
  thread and interrupts the tool in its main thread (a signal). A process still on that job
  at the next round is SIGKILLed and replaced.
- A job process that dies (SIGKILL, out of memory) has its job ended at once (WORKER_LOST, or
  retried where the tool allows), and is replaced. If the supervisor itself dies, its job
  processes are killed with it (PR_SET_PDEATHSIG) and their jobs, no longer beating, are ended
  by another worker's reaper, or by a read of the job, after TOOLEXEC_JOB_STALE_SECONDS.
- SIGTERM (or SIGINT) to the supervisor: each job process finishes its current job and takes no
  new one (RQ's warm shutdown), then the supervisor exits. A second one is a cold shutdown.

Job descriptions are not logged: the log carries job ids only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
import selectors
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import django_rq
from django.conf import settings
from django.db import close_old_connections, connections
from rq.command import parse_payload
from rq.exceptions import StopRequested
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.worker import SimpleWorker

from . import jobs  # noqa: F401 - the jobs' entry points, imported once by the supervisor for every process
from .models import Job
from .services.queueing import RUN
from .services.recovery import job_process_lost, job_timed_out, jobs_heartbeat, jobs_reap

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.25  # how often the supervisor looks at its processes and their pipes
TIMEOUT_KILL_GRACE_SECONDS = 1.0  # past its timeout, how long a job process has to end the job itself
RESTART_PAUSE_SECONDS = 1.0  # after a process failed, before starting another (Redis down, say)
STOP_SIGNAL = signal.SIGUSR1  # the job process's own signal to interrupt the tool it runs


class JobStopped(BaseException):
    """Raised in a job process's main thread to stop a tool that was cancelled and never
    checked (RQ's stop-job command). A BaseException, so a tool's ``except Exception`` does
    not swallow it."""


class ToolexecWorker(SimpleWorker):
    """One job process of the supervisor: RQ's ``SimpleWorker``, running each job in this
    process, reporting what it runs to the supervisor through ``report``."""

    log_job_description = False

    def __init__(self, *args: Any, report: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        kwargs["log_job_description"] = False
        super().__init__(*args, **kwargs)
        self.report = report or (lambda line: None)
        self.job_in_hand: str | None = None  # the RQ job id whose code runs in this process now
        self.job_to_stop: str | None = None  # the RQ job id RQ's stop-job command named

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        signal.signal(STOP_SIGNAL, self.stop_job_in_hand)

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
        toolexec_job = job.args[0] if job.func_name == RUN and job.args else "-"
        self.report(f"start {job.id} {timeout} {toolexec_job}")
        self.job_in_hand = job.id
        try:
            super().execute_job(job, queue)
        finally:
            self.job_in_hand = self.job_to_stop = None
            # As at the end of a request: a connection that errored or aged is not kept.
            close_old_connections()
            self.report(f"end {job.id}")
        rss_mb = resident_mb()
        if rss_mb > settings.TOOLEXEC_WORKER_MAX_RSS_MB:
            self.log.info(
                "Worker %s: %d MB resident after job %s; making way for a new process", self.name, rss_mb, job.id
            )
            raise StopRequested()

    def handle_payload(self, message: Any) -> None:
        """RQ's commands, received on the pubsub thread. Stop-job: the job runs in this process,
        so interrupt it in the main thread (the signal handler raises there only if it is still
        that job)."""
        payload = parse_payload(message)
        if payload.get("command") != "stop-job":
            super().handle_payload(message)
            return
        self.job_to_stop = payload.get("job_id")
        if self.job_to_stop is not None and self.job_to_stop == self.job_in_hand:
            os.kill(os.getpid(), STOP_SIGNAL)

    def stop_job_in_hand(self, signum: int, frame: Any) -> None:
        if self.job_in_hand is not None and self.job_in_hand == self.job_to_stop:
            raise JobStopped(f"job {self.job_in_hand} was stopped")


def resident_mb() -> int:
    """This process's resident memory now, in MB (the peak where /proc is not available)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when the process that forked it dies
    (Linux's PR_SET_PDEATHSIG); elsewhere, a thread that watches the parent's pid."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, sig, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1)
            os.kill(os.getpid(), sig)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the kernel was told
        os.kill(os.getpid(), sig)


@dataclass
class JobProcess:
    """What the supervisor knows of one of its processes."""

    pid: int
    pipe: int  # read end: the process's reports, one line each
    scheduler: bool = False
    jobs_done: int = 0
    job: str | None = None  # the RQ job id it runs
    toolexec_job: str | None = None  # the id of the Job row, if it is a toolexec run (executions.jobs.run)
    timeout: float = 0
    since: float = 0.0  # monotonic time it started the job
    cancel_seen: bool = False  # its job was seen CANCELLED while the process still ran it
    buffer: bytes = field(default=b"", repr=False)


class WorkerSupervisor:
    """Runs ``processes`` job processes on ``queues`` (and an RQ scheduler process), replaces
    any that ends, and watches the jobs they run (module docstring)."""

    def __init__(self, queues: Sequence[str], *, processes: int, with_scheduler: bool = True) -> None:
        self.queues = list(queues)
        self.processes = processes
        self.with_scheduler = with_scheduler
        self.children: dict[int, JobProcess] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.stop_signals = 0
        self.next_round = 0.0
        self.next_idle_reap = 0.0
        self.start_not_before = 0.0

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        logger.info(
            "Supervisor %d: %d job processes on %s, at most %d jobs or %d MB each",
            os.getpid(),
            self.processes,
            ",".join(self.queues),
            settings.TOOLEXEC_WORKER_MAX_JOBS,
            settings.TOOLEXEC_WORKER_MAX_RSS_MB,
        )
        try:
            while True:
                if not self.stopping:
                    self.start_missing()
                self.read_reports(TICK_SECONDS)
                self.reap_children()
                if self.stopping and not self.children:
                    break
                self.enforce_timeouts()
                self.maintain()
        finally:
            connections.close_all()
        logger.info("Supervisor %d: all job processes have ended", os.getpid())

    # --- processes ----------------------------------------------------------------------

    def start_missing(self) -> None:
        if time.monotonic() < self.start_not_before:
            return
        if self.with_scheduler and not any(child.scheduler for child in self.children.values()):
            self.fork(scheduler=True)
        while sum(not child.scheduler for child in self.children.values()) < self.processes:
            self.fork(scheduler=False)

    def fork(self, *, scheduler: bool) -> None:
        connections.close_all()  # no database socket may be shared with a child
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            if scheduler:
                run_scheduler(self.queues)
            run_job_process(self.queues, write_end)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.children[pid] = JobProcess(pid=pid, pipe=read_end, scheduler=scheduler)
        self.selector.register(read_end, selectors.EVENT_READ, pid)

    def read_reports(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            child = self.children.get(key.data)
            if child is not None:
                self.read_pipe(child)

    def read_pipe(self, child: JobProcess) -> None:
        while True:
            try:
                chunk = os.read(child.pipe, 4096)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not chunk:
                self.selector.unregister(child.pipe)
                os.close(child.pipe)
                child.pipe = -1
                return
            child.buffer += chunk
            *lines, child.buffer = child.buffer.split(b"\n")
            for line in lines:
                self.on_report(child, line.decode().split())

    def on_report(self, child: JobProcess, words: list[str]) -> None:
        if words[:1] == ["start"] and len(words) == 4:
            child.job, child.timeout = words[1], float(words[2])
            child.toolexec_job = words[3] if words[3] != "-" else None
            child.since, child.cancel_seen = time.monotonic(), False
        elif words[:1] == ["end"]:
            child.job, child.toolexec_job, child.jobs_done = None, None, child.jobs_done + 1

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.pipe >= 0:
                self.read_pipe(child)  # a last report it wrote before it ended
                if child.pipe >= 0:
                    self.selector.unregister(child.pipe)
                    os.close(child.pipe)
            self.on_child_ended(child, status)

    def on_child_ended(self, child: JobProcess, status: int) -> None:
        kind = "scheduler" if child.scheduler else "job process"
        if status != 0:
            self.start_not_before = time.monotonic() + RESTART_PAUSE_SECONDS
        if child.job is None:
            log = logger.info if status == 0 or self.stopping else logger.warning
            log("Supervisor: %s %d ended (status %d) after %d jobs", kind, child.pid, status, child.jobs_done)
            return
        reason = f"job process {child.pid} ended with status {status}"
        logger.warning("Supervisor: %s while running job %s", reason, child.job)
        try:
            job_process_lost(rq_job_id=child.job, reason=reason)
        except Exception:
            # The reaper ends the job once its heartbeat is stale; the supervisor must live on.
            logger.exception("Could not record the loss of job %s", child.job)

    def kill(self, child: JobProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)
        self.children.pop(child.pid, None)
        if child.pipe >= 0:
            self.selector.unregister(child.pipe)
            os.close(child.pipe)
            child.pipe = -1

    def request_stop(self, signum: int, frame: Any) -> None:
        """Warm shutdown: every process finishes its job and ends. A second signal: cold."""
        self.stopping = True
        self.stop_signals += 1
        logger.info("Supervisor: %s shutdown requested", "warm" if self.stop_signals == 1 else "cold")
        for child in list(self.children.values()):
            with contextlib.suppress(ProcessLookupError):
                if self.stop_signals == 1 or child.scheduler:
                    os.kill(child.pid, signal.SIGTERM)
                else:
                    os.kill(child.pid, signal.SIGKILL)

    # --- the jobs -------------------------------------------------------------------------

    def enforce_timeouts(self) -> None:
        """A process still on a job past its timeout (and the grace to end it itself) could not
        be interrupted: it is killed, and the job recorded TIMED_OUT."""
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.job is None or child.timeout <= 0:
                continue
            if now - child.since < child.timeout + TIMEOUT_KILL_GRACE_SECONDS:
                continue
            job = child.job
            logger.warning(
                "Supervisor: job %s ran past its %g s timeout uninterrupted; killing %d", job, child.timeout, child.pid
            )
            self.kill(child)
            try:
                job_timed_out(rq_job_id=job)
            except Exception:
                logger.exception("Could not record the timeout of job %s", job)

    def maintain(self) -> None:
        """Every heartbeat interval while jobs run: beat for them, reap, and kill the processes
        still running a job that was cancelled (one they could not interrupt). While idle: reap
        every maintenance interval."""
        now = time.monotonic()
        busy = {child.toolexec_job: child for child in self.children.values() if child.toolexec_job is not None}
        if busy and now >= self.next_round:
            self.next_round = now + settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS
            try:
                statuses = jobs_heartbeat(job_ids=list(busy))
                jobs_reap()
            except Exception:
                # Watching the processes must go on; the next round tries again.
                logger.exception("Heartbeat or reaping failed")
                return
            for job_id, child in busy.items():
                if statuses.get(job_id) != Job.Status.CANCELLED or child.toolexec_job != job_id:
                    continue
                if child.cancel_seen:
                    logger.warning(
                        "Supervisor: job %s was cancelled but process %d still runs it; killing it", job_id, child.pid
                    )
                    self.kill(child)
                else:
                    child.cancel_seen = True  # RQ's stop-job command may be on its way: look again next round
        elif not busy and now >= self.next_idle_reap:
            self.next_idle_reap = now + max(1, settings.TOOLEXEC_JOB_STALE_SECONDS // 2)
            try:
                jobs_reap()
            except Exception:
                logger.exception("Reaping failed")
            connections.close_all()  # idle: hold no connection until the next round


def run_job_process(queues: Sequence[str], report_fd: int) -> NoReturn:
    """A forked job process: RQ's work loop until it has done its jobs, is told to stop, or
    its RSS grows too large. Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent(signal.SIGKILL)

        def report(line: str) -> None:
            os.write(report_fd, f"{line}\n".encode())  # one write under PIPE_BUF: never interleaved

        worker = django_rq.get_worker(*queues, worker_class=ToolexecWorker, report=report)
        worker.work(max_jobs=settings.TOOLEXEC_WORKER_MAX_JOBS)
        code = 0
    except BaseException:
        logger.exception("Job process %d failed", os.getpid())
    finally:
        os._exit(code)


def run_scheduler(queues: Sequence[str]) -> NoReturn:
    """A forked process that runs RQ's scheduler for ``queues`` while it holds their lock (one
    scheduler across all workers), and keeps trying to take the lock while another holds it."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(signal.SIGTERM)  # it then releases its lock
        scheduler = RQScheduler(queues, connection=django_rq.get_connection(queues[0]))
        while not scheduler.acquire_locks():
            time.sleep(max(1, settings.TOOLEXEC_JOB_STALE_SECONDS // 2))
        scheduler.work()  # until SIGTERM
        code = 0
    except BaseException:
        logger.exception("Scheduler process %d failed", os.getpid())
    finally:
        os._exit(code)
