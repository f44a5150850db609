"""A worker's side of an async run: the claim, the tool's run with its progress sink, the
outcome, a retry, a wait for the owner's fair share; and the result cache's single flight
across jobs: a job that leads its cache key ends its lead, and settles the identical jobs that
waited for it (its followers), when it ends."""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, close_old_connections, connections, transaction
from django.db.models import Exists, F, Func, IntegerField, Subquery, Value
from django.db.models.functions import Coalesce
from django.db.models.lookups import LessThan
from django.utils import timezone
from redis.exceptions import RedisError
from rq.timeouts import JobTimeoutException

from core.errors import ErrorCode, ToolexecError, envelope
from core.redaction import secrets_in_play
from credits.models import CreditAccount
from instances.crypto import unseal
from instances.readiness import Readiness, readiness_check
from instances.services.credentials import credentials_resolve
from tools import registry
from tools.errors import Cancelled, ToolTimeout, ToolUnavailable
from tools.sdk import Tool

from .. import events
from ..models import Execution, Job
from ..selectors import job_progress
from ..signals import execution_started
from .cache import CachePlan, MissReason, cache_collapsed, cache_entry_hit, cache_release, cache_report_for
from .queueing import rq_enqueue
from .runs import STATUS_FOR_ERROR, Outcome, execution_finish, outcome_of, run_context

logger = logging.getLogger(__name__)


# Seconds between a job's progress writes to the database (Redis carries every change at once);
# the last report is written with the outcome, so a run writes its Job row at most once a second
# plus the claim and the outcome.
PROGRESS_WRITE_INTERVAL = 1.0


FAIRNESS_RETRY_SECONDS = 2.0  # an owner over their running-jobs share is looked at again after this


# What running a job touches, loaded with the job when it is claimed: its execution and tool,
# its instance (readiness; its tool is the execution's), its owner with their credit account.
JOB_TO_RUN = ("execution__tool", "instance", "owner__credit_account")


# Of those rows, the columns the run reads (readiness, the outcome, a retry, the terminal
# event): not the recorded inputs and outputs, the tool's schemas or the instance's config.
# Reading a column left out here costs a query of its own, which the claim's query budget
# test (tests/test_job_claim.py) would catch.
JOB_TO_RUN_FIELDS = (
    *("id", "execution_id", "instance_id", "owner_id", "rq_job_id", "status", "progress", "current_step"),
    *("step_index", "steps_total", "attempts", "max_attempts", "sealed_inputs", "attempt_log", "worker_name"),
    *("started_at", "enqueued_at", "run_after", "updated_at", "cache_plan", "follows_id"),
    *("execution__tool_id", "execution__instance_id", "execution__owner_id", "execution__status"),
    *("execution__started_at", "execution__credits_held", "execution__origin"),
    *("execution__tool__slug", "execution__tool__name", "execution__tool__timeout_seconds", "execution__tool__modes"),
    *("execution__tool__credential_slots", "execution__tool__base_credits", "execution__tool__credits_per_unit"),
    *("execution__tool__is_active", "execution__tool__is_available"),
    *("instance__owner_id", "instance__tool_id", "instance__status", "instance__credential_mappings"),
    *("owner__id", "owner__credit_account__balance", "owner__credit_account__is_unlimited"),
)


class RefusedAtStart(Exception):
    """A queued job found its tool or credentials unusable when its turn came."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error_message"])
        self.body = body


class JobProgress:
    """The progress sink of a running job. Every change is published at once; the database
    gets the latest report from this process's ``ProgressWriter``, at most once every
    ``interval`` seconds counted from the claim (which wrote the row), so a tool that reports and
    then blocks for a while still shows its report within a second. The latest report also goes
    out with the outcome (:meth:`take`), so the row and the terminal event agree on it."""

    def __init__(self, job: Job, interval: float = PROGRESS_WRITE_INTERVAL) -> None:
        self.job_id = str(job.pk)
        self.interval = interval
        self.due_at = time.monotonic() + interval  # the earliest time of the next write
        self._pending: dict[str, Any] | None = None
        self._latest: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, percent: int, step: str, step_index: int | None, steps_total: int | None) -> None:
        state = {"progress": percent, "current_step": step[:300], "step_index": step_index, "steps_total": steps_total}
        events.publish(self.job_id, {"event": "progress", "status": Job.Status.RUNNING, **state})
        with self._lock:
            waiting, self._pending, self._latest = self._pending is not None, state, state
        if not waiting:  # the writer knows when to write a report it has been told of already
            PROGRESS_WRITER.watch(self)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def flush(self) -> None:
        """Write the latest report now, if there is one not yet written."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        now = timezone.now()
        # Progress never goes down, and a job that already ended is left alone.
        Job.objects.filter(pk=self.job_id, status=Job.Status.RUNNING, progress__lte=pending["progress"]).update(
            **pending, heartbeat_at=now, updated_at=now
        )
        self.due_at = time.monotonic() + self.interval

    def take(self) -> dict[str, Any]:
        """Stop writing and return the latest report (empty if none), written or not, for the
        outcome's own update: the row and the terminal event then agree on it. (A write the
        writer has in flight is harmless: it is conditional on the job still running.)"""
        PROGRESS_WRITER.unwatch(self)
        with self._lock:
            self._pending = None
            return dict(self._latest)


class ProgressWriter:
    """The thread that writes the progress of this process's running jobs to their rows, on one
    database session it keeps: a job process runs job after job, and a thread with a session of
    its own per job would cost a connection (a PostgreSQL backend) per job that reports. It
    starts with the first report and closes its session after ``idle_seconds`` with no job to
    watch (or on :meth:`stop`)."""

    def __init__(self, idle_seconds: float = 60.0) -> None:
        self.idle_seconds = idle_seconds
        self._sinks: set[JobProgress] = set()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def watch(self, sink: JobProgress) -> None:
        """``sink`` has a report to write."""
        with self._wake:
            self._sinks.add(sink)
            if self._thread is None or not self._thread.is_alive():  # the first report, or in a forked child
                self._stopping = False
                self._thread = threading.Thread(target=self._write, name="progress-writer", daemon=True)
                self._thread.start()
            self._wake.notify()

    def unwatch(self, sink: JobProgress) -> None:
        with self._wake:
            self._sinks.discard(sink)

    def stop(self) -> None:
        """End the thread and close its session (the test suite, before it drops its database)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _write(self) -> None:
        try:
            while True:
                with self._wake:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    waiting = [sink for sink in self._sinks if sink.pending]
                    due = [sink for sink in waiting if sink.due_at <= now]
                    if not due:
                        until = min((sink.due_at for sink in waiting), default=now + self.idle_seconds)
                        if not self._wake.wait(until - now) and not self._sinks:
                            connections.close_all()  # nothing to watch for a while: no idle session kept
                        continue
                for sink in due:
                    try:
                        sink.flush()
                    except DatabaseError:
                        logger.warning("could not write the progress of job %s", sink.job_id, exc_info=True)
                        close_old_connections()  # a broken session is replaced at the next write
        finally:
            connections.close_all()  # this thread's own session


PROGRESS_WRITER = ProgressWriter()


# What a job's run needs from its check: the tool's class, the inputs, the readiness.
Checked = tuple[type[Tool], dict[str, Any], Readiness]


def job_run(*, job_id: str, worker_name: str = "") -> None:
    """The worker's side of an async run: claim and check the job, run the tool, record the
    outcome once.

    A job that is gone, already claimed, cancelled or finished is left alone (a duplicate
    delivery runs nothing). An owner already running their share waits for a later turn.
    """
    job = job_claim(job_id=job_id, worker_name=worker_name)
    if job is None:
        return
    execution, definition = job.execution, job.execution.tool
    params = {"tool": definition.name, "instance_id": str(job.instance_id or "")}
    account = getattr(job.owner, "credit_account", None)
    started = time.monotonic()
    try:
        tool_class, inputs, readiness = job_check(job)
        tool, resolved = tool_class(), credentials_resolve(credentials=readiness.credentials)
    except RefusedAtStart as refused:
        job_end(job, Outcome(Execution.Status.FAILED, error=refused.body), 0, account)
        return
    except ToolexecError as exc:
        status = STATUS_FOR_ERROR.get(exc.code, Execution.Status.FAILED)
        job_end(job, Outcome(status, error=exc.envelope(params)), 0, account)
        return
    except Exception:  # ours, not the tool's (inputs that no longer open, say): end it now, not at the reaper
        logger.exception("Job %s could not start", job.pk)
        job_end(job, Outcome(Execution.Status.FAILED, error=envelope(ErrorCode.INTERNAL_ERROR, params)), 0, account)
        return
    ctx = run_context(
        execution=execution,
        resolved=resolved,
        seconds=definition.timeout_seconds,
        progress_sink=JobProgress(job),
        cancel_probe=events.CancelProbe(str(job.pk)),
    )
    with secrets_in_play(r.secret for r in resolved.values()):
        try:
            result: Any = tool.run(inputs, ctx)
        except JobTimeoutException:
            result = ToolTimeout(seconds=definition.timeout_seconds)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the run's outcome
            result = exc
        finally:
            cancel_death_penalty()
        last_report = ctx.progress_sink.take()  # type: ignore[union-attr]
        outcome = outcome_of(result, ctx, tool, params, resolved)
        # A failure's traceback holds the tool's frames (inputs, credentials), and this frame,
        # which holds the failure: a cycle the garbage collector would free at some later time.
        # The worker process goes on to other owners' jobs, so it is broken now.
        result = None
    duration_ms = int((time.monotonic() - started) * 1000)
    code = (outcome.error or {}).get("error_code")
    if code in tool.retry_on and job.attempts < job.max_attempts:
        job_retry(job=job, error=outcome.error or {}, delay=tool.retry_backoff_seconds * 2 ** (job.attempts - 1))
        return
    job_end(job, outcome, duration_ms, account, last_report, tool=tool)


def job_claim(*, job_id: str, worker_name: str) -> Job | None:
    """QUEUED → RUNNING with its execution, unless the owner already runs their share of jobs
    (TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER): then the job waits for a later turn. Returns the
    claimed job, loaded with what running it needs (``JOB_TO_RUN``), or None.

    One transaction of three statements: the load, which locks the job's row and its owner's;
    the claim, an update conditional on the owner's running jobs being fewer than their share;
    the execution's start. The owner's lock makes claims of one owner's jobs take turns until
    each commits, so two workers can't both take the owner's last place: the count in the
    claim runs after the lock is granted, so it sees every claim committed before. The job's
    lock means that a claim that changed nothing found the owner at their share. (SQLite locks
    no rows; it has one writer at a time, and a job that moved meanwhile is not queued again.)
    """
    now = timezone.now()
    share = settings.TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER
    with transaction.atomic():
        loading = (
            Job.objects.select_related(*JOB_TO_RUN)
            .only(*JOB_TO_RUN_FIELDS)
            .select_for_update(no_key=True, of=("self", "owner"))
        )
        try:
            job = loading.get(pk=job_id)
        except Job.DoesNotExist:
            return None
        if job.status != Job.Status.QUEUED:
            return None  # a duplicate delivery of a job already claimed or ended
        running = (
            Job.objects.filter(owner_id=job.owner_id, status=Job.Status.RUNNING)
            .order_by()
            .values(count=Func("pk", function="COUNT", output_field=IntegerField()))
        )
        claimed = Job.objects.filter(LessThan(Subquery(running), share), pk=job.pk, status=Job.Status.QUEUED).update(
            status=Job.Status.RUNNING,
            worker_name=worker_name[:200],
            attempts=F("attempts") + 1,
            started_at=now,
            heartbeat_at=now,
            updated_at=now,
        )
        if claimed:
            Execution.objects.filter(pk=job.execution_id).update(
                status=Execution.Status.RUNNING, started_at=Coalesce("started_at", Value(now))
            )
    if not claimed:
        job_wait_turn(job, delay=FAIRNESS_RETRY_SECONDS)
        return None
    job.status, job.worker_name, job.attempts = Job.Status.RUNNING, worker_name[:200], job.attempts + 1
    job.started_at = job.heartbeat_at = job.updated_at = now
    job.execution.status = Execution.Status.RUNNING
    job.execution.started_at = job.execution.started_at or now
    if job.instance is not None:
        job.instance.tool = job.execution.tool  # an instance's tool never changes
    events.publish(str(job.pk), {"event": "state", "status": Job.Status.RUNNING, "progress": job.progress})
    execution_started.send(sender=Execution, execution=job.execution, job=job)
    return job


def job_check(job: Job) -> Checked:
    """What the tool needs, checked again now: it may have changed since the job was queued.
    (Its credentials are resolved by whoever runs it: that may refresh a token over HTTP.)"""
    instance = job.instance
    if instance is None:
        raise Cancelled("The instance was deleted before the job started.")
    tool_class = registry.get_tool(job.execution.tool.slug)
    if tool_class is None:
        raise ToolUnavailable()
    instance.owner = job.owner  # loaded with its credit account: readiness needs no query for them
    readiness = readiness_check(instance=instance)
    # Credits were held when the job was accepted; what matters now is the tool and credentials.
    blocking = [c for c in readiness.failures if c.name.startswith(("tool_", "credential:"))]
    if blocking:
        readiness.checks = blocking
        raise RefusedAtStart(readiness.refusal()[1])
    inputs = unseal(job.sealed_inputs, row_id=str(job.pk), owner_id=job.owner_id)
    return tool_class, inputs, readiness


def job_end(
    job: Job,
    outcome: Outcome,
    duration_ms: int,
    account: CreditAccount | None,
    last_report: dict[str, Any] | None = None,
    *,
    tool: Tool | None = None,
) -> None:
    """The outcome, with the attempt's entry in the log and the last progress report, in one
    update of the Job row; with the job's cache plan, what the cache did (the entry it keeps
    commits with the outcome). Then the job's lead on its cache key ends and its followers are
    settled (job_lead_end)."""
    plan = job_cache_outcome(job, outcome, tool=tool)
    log = [
        *job.attempt_log,
        {
            "attempt": job.attempts,
            "worker": job.worker_name,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": timezone.now().isoformat(),
            "error_code": (outcome.error or {}).get("error_code", ""),
        },
    ]
    if execution_finish(
        execution=job.execution,
        outcome=outcome,
        duration_ms=duration_ms,
        account=account,
        job=job,
        job_fields={**(last_report or {}), "attempt_log": log},
        cache_plan=plan,
    ):
        events.publish(str(job.pk), {"event": "state", **job_progress(job=job)})  # the row just written
        job_lead_end(job, plan)


def job_retry(*, job: Job, error: dict[str, Any], delay: float) -> None:
    """A retryable failure with attempts left: back to QUEUED, to run again after ``delay``."""
    log = [
        *job.attempt_log,
        {"attempt": job.attempts, "worker": job.worker_name, "error_code": error.get("error_code")},
    ]
    next_rq_id = f"{job.pk}-attempt-{job.attempts + 1}"  # RQ ids: letters, digits, - and _
    step = f"Attempt {job.attempts} failed ({error.get('error_code')}); retrying in {delay:g} s"
    now = timezone.now()
    run_after = now + timedelta(seconds=delay)
    with transaction.atomic():
        # The schedule goes in with the state: a reaper that finds the job QUEUED before RQ has
        # it sees a job handed to RQ just now, and what to re-create should Redis lose it.
        moved = Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(
            status=Job.Status.QUEUED,
            rq_job_id=next_rq_id,
            attempt_log=log,
            current_step=step[:300],
            enqueued_at=now,
            run_after=run_after,
            updated_at=now,
        )
        if not moved:
            return
        Execution.objects.filter(pk=job.execution_id).update(status=Execution.Status.PENDING)
    job.rq_job_id, job.enqueued_at, job.run_after = next_rq_id, now, run_after
    events.publish(str(job.pk), {"event": "state", "status": Job.Status.QUEUED, "current_step": step})
    job_schedule(job)


def job_wait_turn(job: Job, *, delay: float) -> None:
    """A QUEUED job whose owner runs their share already: looked at again after ``delay``."""
    rq_job_id = f"{job.pk}-wait-{int(time.time() * 1000)}"
    now = timezone.now()
    run_after = now + timedelta(seconds=delay)
    waits = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED)
    if waits.update(rq_job_id=rq_job_id, enqueued_at=now, run_after=run_after, updated_at=now):
        job.rq_job_id, job.enqueued_at, job.run_after = rq_job_id, now, run_after
        job_schedule(job)


def job_schedule(job: Job) -> None:
    """Give RQ the job's schedule, recorded on the row already. If Redis does not answer, the
    row is the record: the reaper makes the schedule once Redis is back (jobs_requeue_lost)."""
    try:
        rq_enqueue(
            job_id=str(job.pk),
            rq_job_id=job.rq_job_id,
            timeout=job.execution.tool.timeout_seconds,
            run_after=job.run_after,
        )
    except RedisError:
        logger.warning("Redis did not take job %s; the reaper will queue it again", job.pk)


# --- The result cache's single flight across jobs -------------------------------------------
#
# An async run whose result may be kept takes the lead on its cache key once its job is
# committed (enqueue: cache_lead, the holder naming the job), for its tool's timeout. An identical
# run accepted meanwhile does not go to RQ: its job stays QUEUED and follows the leader
# (``Job.follows``). When the leader ends, wherever that happens (its worker, a cancellation, the
# reaper), its lead ends and each follower still QUEUED ends COMPLETED from the entry the leader
# kept (COLLAPSED), or, when it kept none, goes to RQ to run itself.
#
# Nothing strands a follower: it joins by writing its row first and then looking at its leader,
# and a leader ends by writing its row first and then looking for followers, so one of the two
# always sees the other (both may: every step is conditional). A leader that vanished without
# ending that way (a row deleted, a process gone before it wrote its end) leaves its followers
# QUEUED with an RQ job id that RQ does not know: the reaper queues them once their leader is no
# longer in flight (jobs_requeue_lost).

LEAD_PREFIX = "job:"  # a sync run's lead holder is a bare hex id: only a job can be followed


def lead_holder(job_id: Any) -> str:
    return f"{LEAD_PREFIX}{job_id}"


def lead_job_id(holder: str) -> str | None:
    """The id of the job that holds a lead, or None when a sync run holds it."""
    if not holder.startswith(LEAD_PREFIX):
        return None
    try:
        return str(uuid.UUID(holder.removeprefix(LEAD_PREFIX)))
    except ValueError:
        return None


def job_cache_plan(job: Job) -> CachePlan | None:
    """The job's cache plan as its accept made it (without a lead), or None."""
    return CachePlan.from_dict(job.cache_plan) if job.cache_plan else None


def job_cache_outcome(job: Job, outcome: Outcome, *, tool: Tool | None = None) -> CachePlan | None:
    """Set ``outcome.cache``, what the cache did for the job's run (the result kept, or why
    not), from the job's plan; returns the plan, for execution_finish to keep the result."""
    plan = job_cache_plan(job)
    if plan is None or outcome.cache is not None:
        return plan
    if tool is None:
        tool_class = registry.get_tool(job.execution.tool.slug)
        tool = tool_class() if tool_class is not None else None
    if tool is None:  # its tool is gone, so it has no result: nothing to keep
        if plan.key is not None:
            plan.report.miss_reason = MissReason.FAILED
        outcome.cache = plan.report
        return plan
    outcome.cache = cache_report_for(plan, tool=tool, status=outcome.status, output=outcome.output)
    return plan


def job_lead_end(job: Job, plan: CachePlan | None) -> int:
    """The job ended (its outcome committed): the lead it may hold on its cache key ends, and
    the jobs that follow it are settled. Returns how many. A job whose result could not be
    kept, or that followed another, never led: nothing to do."""
    if plan is None or plan.key is None or job.follows_id is not None:
        return 0
    plan.lead = lead_holder(job.pk)
    cache_release(plan)  # only its own: a lead that expired and was taken by another stays
    return job_followers_settle(leader_id=str(job.pk), plan=plan)


def job_followers_settle(*, leader_id: str, plan: CachePlan) -> int:
    """Each QUEUED follower of the job ``leader_id``, which ended: COMPLETED from the entry it
    kept, or handed to RQ to run itself. One query when there are none (Job.follows' index)."""
    followers = list(
        Job.objects.filter(follows_id=leader_id, status=Job.Status.QUEUED).select_related(
            "execution__tool", "owner__credit_account"
        )
    )
    if not followers:
        return 0
    collapsed = cache_collapsed(plan)
    for follower in followers:
        job_follower_settle(follower, collapsed, account=getattr(follower.owner, "credit_account", None))
    return len(followers)


def job_follower_settle(job: Job, collapsed: CachePlan | None, *, account: CreditAccount | None) -> None:
    """A QUEUED follower whose leader ended: with ``collapsed`` (the leader's entry) it ends
    COMPLETED from it at once, charged TOOLEXEC_CACHE_HIT_CREDITS against what it held, and
    reports COLLAPSED; without, it goes to RQ to run itself. Either happens once."""
    now = timezone.now()
    if collapsed is not None:
        assert collapsed.entry is not None
        outcome = Outcome(
            Execution.Status.COMPLETED,
            output=collapsed.entry.output,
            credits=Decimal(settings.TOOLEXEC_CACHE_HIT_CREDITS),
            cache=collapsed.report,
        )
        if execution_finish(
            execution=job.execution,
            outcome=outcome,
            duration_ms=0,
            account=account,
            job=job,
            job_from=(Job.Status.QUEUED,),
            job_fields={"started_at": now, "current_step": ""},
        ):
            cache_entry_hit(collapsed.entry, now)
            events.publish(str(job.pk), {"event": "state", **job_progress(job=job)})
        return
    # Recorded before RQ has it, as any hand-over is: should Redis not take it, the reaper does.
    if not Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).update(
        enqueued_at=now, current_step="", updated_at=now
    ):
        return
    job.enqueued_at, job.current_step = now, ""
    try:
        rq_enqueue(job_id=str(job.pk), rq_job_id=job.rq_job_id, timeout=job.execution.tool.timeout_seconds)
    except RedisError:
        logger.warning("Redis did not take job %s; the reaper will queue it", job.pk)


def job_follow(job: Job, *, holder: str, plan: CachePlan, account: CreditAccount | None) -> bool:
    """Make the just accepted ``job`` follow the job that holds the lead on its cache key
    (``holder``) instead of going to RQ; False when it cannot (a sync run or a job that is gone
    leads): then it runs itself. A leader that ended meanwhile settles it at once."""
    leader_id = lead_job_id(holder)
    if leader_id is None or leader_id == str(job.pk):
        return False
    step = "Waiting for an identical run"
    following = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).filter(Exists(Job.objects.filter(pk=leader_id)))
    try:
        if not following.update(follows_id=leader_id, current_step=step, updated_at=timezone.now()):
            return False
    except IntegrityError:  # the leader's row went just now
        return False
    job.follows_id, job.current_step = leader_id, step
    # Written first, looked second: a leader that ended before seeing this follower is seen here.
    if not Job.objects.filter(pk=leader_id, status__in=(Job.Status.QUEUED, Job.Status.RUNNING)).exists():
        job_follower_settle(job, cache_collapsed(plan), account=account)
    return True


def cancel_death_penalty() -> None:
    """The tool is done: RQ's alarm must not fire while the outcome is being written."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)
