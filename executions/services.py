"""The execution service: running tools and recording every attempt (DESIGN.md §4, §7).

A sync run is two short transactions around the tool's work: the Execution row is written
(RUNNING) before the tool starts, and afterwards the outcome, the instance statistics, the
ledger entry and the balance are written together. No transaction is open while the tool runs.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.models import F, Func, IntegerField, Q, Subquery, Value
from django.db.models.functions import Coalesce
from django.db.models.lookups import LessThan
from django.utils import timezone
from redis.exceptions import RedisError
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.timeouts import JobTimeoutException

from core.errors import ErrorCode, ToolexecError, envelope
from core.redaction import redact, scrub_envelope, scrub_known, secrets_in_play
from instances.crypto import seal, unseal
from instances.models import CreditAccount, ToolInstance
from instances.providers import provider_display
from instances.readiness import Readiness, readiness_check
from instances.services import (
    ResolvedCredential,
    credential_failure_record,
    credential_refresh,
    credentials_resolve,
    credits_balance,
    credits_hold,
    credits_settle,
    credits_words,
    file_opener,
)
from tools import registry
from tools.errors import (
    Cancelled,
    IdempotencyConflict,
    InputInvalid,
    InsufficientCredits,
    QueueUnavailable,
    ToolTimeout,
    ToolUnavailable,
)
from tools.schemas import errors_by_field, nul_errors, summary
from tools.sdk import ASYNC, SYNC, ExecutionContext, Tool

from . import events
from .events import QUEUE_NAME
from .models import CreditLedgerEntry, Execution, Job, Mode

logger = logging.getLogger(__name__)


# Seconds between a job's progress writes to the database (Redis carries every change at once);
# the last report is written with the outcome, so a run writes its Job row at most once a second
# plus the claim and the outcome.
PROGRESS_WRITE_INTERVAL = 1.0
FAIRNESS_RETRY_SECONDS = 2.0  # an owner over their running-jobs share is looked at again after this
RUN = "executions.jobs.run"  # the RQ function of every toolexec job
# Queued jobs the reaper checks against Redis in a round, oldest first: one pipeline of five
# commands each. After a loss the next round goes on with the next ones (those queued again
# are young again); otherwise the oldest are the next a worker takes, so a job lost behind a
# backlog is found no later than its turn would have come.
QUEUE_RECOVERY_BATCH = 100
UNFINISHED = (Execution.Status.PENDING, Execution.Status.RUNNING)
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
    *("started_at", "enqueued_at", "run_after", "updated_at"),
    *("execution__tool_id", "execution__instance_id", "execution__status", "execution__started_at"),
    "execution__credits_held",
    *("execution__tool__slug", "execution__tool__name", "execution__tool__timeout_seconds", "execution__tool__modes"),
    *("execution__tool__credential_slots", "execution__tool__base_credits", "execution__tool__credits_per_unit"),
    *("execution__tool__is_active", "execution__tool__is_available"),
    *("instance__owner_id", "instance__tool_id", "instance__status", "instance__credential_mappings"),
    *("owner__id", "owner__credit_account__balance", "owner__credit_account__is_unlimited"),
)


class JobFinished(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


class RefusedAtStart(Exception):
    """A queued job found its tool or credentials unusable when its turn came."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error_message"])
        self.body = body


class NotReady(ToolexecError):
    """The instance failed its readiness checks: the envelope is the most important problem,
    with every check's action items."""

    def __init__(self, readiness: Readiness) -> None:
        super().__init__(readiness.failures[0].message)
        self.readiness = readiness
        self.code = ErrorCode(readiness.failures[0].error_code)

    def envelope(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.readiness.refusal()[1]


@dataclass
class Outcome:
    status: str
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # the envelope of a failed run
    credits: Decimal = Decimal("0")


CREDENTIAL_FAILURES = frozenset(
    {ErrorCode.CREDENTIAL_EXPIRED, ErrorCode.CREDENTIAL_REVOKED, ErrorCode.CREDENTIAL_INVALID}
)

_STATUS_FOR_ERROR = {
    ErrorCode.TIMEOUT: Execution.Status.TIMED_OUT,
    ErrorCode.CANCELLED: Execution.Status.CANCELLED,
}


def inputs_prepare(*, instance: ToolInstance, tool: Tool, inputs: Any) -> dict[str, Any]:
    """The instance's default inputs overlaid with ``inputs``, checked against the schema
    and the tool's own validation; raises InputInvalid naming every failing field."""
    if not isinstance(inputs, dict):
        raise InputInvalid(
            "The request body must be a JSON object of the tool's inputs.",
            field_errors={"(root)": ["Must be an object."]},
        )
    merged = {**instance.config, **inputs}
    field_errors = nul_errors(merged) or errors_by_field(instance.tool.input_schema, merged)
    if field_errors:
        raise InputInvalid(summary(field_errors), field_errors=field_errors)
    tool.validate(merged)
    return merged


def execution_prepare(*, instance: ToolInstance, mode: str, inputs: Any) -> tuple[Tool, dict[str, Any], Readiness]:
    """Everything that must hold before a run is recorded: readiness, then inputs."""
    readiness = readiness_check(instance=instance, mode=mode)
    if not readiness.is_ready:
        raise NotReady(readiness)
    tool_class = registry.get_tool(instance.tool.slug)
    assert tool_class is not None  # readiness checked it
    tool = tool_class()
    return tool, inputs_prepare(instance=instance, tool=tool, inputs=inputs), readiness


def execution_run_sync(*, instance: ToolInstance, inputs: Any) -> tuple[Execution, Outcome]:
    """Run ``instance`` now and record it. Raises NotReady, InputInvalid, InsufficientCredits or
    a credential error before recording; after that, every failure is an Outcome recorded on
    the Execution."""
    tool, merged, readiness = execution_prepare(instance=instance, mode=SYNC, inputs=inputs)
    definition = instance.tool
    params = {"tool": definition.name, "instance_id": str(instance.pk)}
    try:
        resolved = credentials_resolve(credentials=readiness.credentials)
    except ToolexecError as exc:
        exc.params.update(params)
        raise
    with secrets_in_play(r.secret for r in resolved.values()):
        execution = execution_record_start(instance=instance, inputs=merged, mode=Mode.SYNC, account=readiness.account)
        time_limit = min(definition.timeout_seconds, settings.TOOLEXEC_SYNC_TIMEOUT_SECONDS)
        ctx = ExecutionContext(
            execution_id=str(execution.pk),
            tool_slug=definition.slug,
            credentials={slot: r.secret for slot, r in resolved.items()},
            credential_info={slot: r.metadata for slot, r in resolved.items()},
            refresher=_refresher(resolved),
            files=file_opener(owner_id=instance.owner_id),
            deadline=time.monotonic() + time_limit,
            timeout_seconds=time_limit,
        )
        clock = time.monotonic()
        outcome = _outcome_of(_run_with_time_limit(tool, merged, ctx, time_limit), ctx, tool, params, resolved)
        duration_ms = int((time.monotonic() - clock) * 1000)
    execution_finish(execution=execution, outcome=outcome, duration_ms=duration_ms, account=readiness.account)
    return execution, outcome


def execution_record_start(
    *,
    instance: ToolInstance,
    inputs: dict[str, Any],
    mode: str,
    account: CreditAccount,
    idempotency_key: str = "",
    fingerprint: str = "",
) -> Execution:
    """Record the attempt (RUNNING for sync), holding the tool's minimum price on the account
    in the same transaction, so concurrent runs cannot spend the same credits twice. Raises
    InsufficientCredits, and records nothing, when the balance does not cover the hold."""
    definition = instance.tool
    hold = Decimal("0") if account.is_unlimited else definition.base_credits
    started = timezone.now()
    execution = Execution(
        instance=instance,
        tool=definition,
        owner_id=instance.owner_id,
        mode=mode,
        status=Execution.Status.RUNNING if mode == Mode.SYNC else Execution.Status.PENDING,
        input_data=redact(inputs),
        credits_held=hold,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
        started_at=started if mode == Mode.SYNC else None,
        created_at=started,
    )
    if not hold:
        execution.save(force_insert=True)
        return execution
    # The hold and the row commit together: a hold without its run would lose the credits.
    # Inside a caller's transaction (execution_enqueue) they are part of it, with no savepoint.
    with transaction.atomic(savepoint=False):
        held = credits_hold(account=account, amount=hold)
        if held:
            execution.save(force_insert=True)
    if not held:
        raise InsufficientCredits(
            tool=definition.name,
            needed=credits_words(hold),
            balance=credits_words(credits_balance(account=account)),
        )
    return execution


def _refresher(resolved: dict[str, ResolvedCredential]) -> Callable[[str], dict[str, Any]]:
    def refresh(slot: str) -> dict[str, Any]:
        return credential_refresh(credential_id=resolved[slot].credential_id)

    return refresh


def _run_with_time_limit(tool: Tool, inputs: dict[str, Any], ctx: ExecutionContext, seconds: int) -> Any:
    """Run the tool in a thread so the request can answer at the time limit; a tool still
    running then is told to stop at its next check and its late result is discarded.

    Returns the tool's result, or the exception it raised (ToolTimeout at the limit).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = tool.run(inputs, ctx)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the run's outcome
            box["error"] = exc
        finally:
            # The platform's hooks (files, token refresh) may have opened this thread's own
            # database connection; nothing else would close it.
            connections.close_all()

    # The copied context carries the secrets in play, so the tool's log lines are scrubbed.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(target,), name=f"tool-{ctx.execution_id}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        ctx.stop("timeout")
        return ToolTimeout(seconds=seconds)
    return box["error"] if "error" in box else box.get("result")


def _outcome_of(
    result: Any, ctx: ExecutionContext, tool: Tool, params: dict[str, Any], resolved: dict[str, ResolvedCredential]
) -> Outcome:
    if isinstance(result, BaseException):
        return _failure(result, params, tool, resolved)
    if not isinstance(result, dict):
        logger.error("Tool %s returned %s instead of a dict", tool.slug, type(result).__name__)
        return Outcome(Execution.Status.FAILED, error=envelope(ErrorCode.TOOL_ERROR, params))
    try:
        json.dumps(result)
    except (TypeError, ValueError):
        logger.error("Tool %s returned a result that is not JSON", tool.slug)
        return Outcome(Execution.Status.FAILED, error=envelope(ErrorCode.TOOL_ERROR, params))
    if resolved:
        result = scrub_known(result)
    return Outcome(Execution.Status.COMPLETED, output=result, credits=tool.credits_for(ctx.units))


def _failure(
    exc: BaseException, params: dict[str, Any], tool: Tool, resolved: dict[str, ResolvedCredential]
) -> Outcome:
    if isinstance(exc, ToolexecError):
        if exc.provider:
            params = {**params, "provider": provider_display(exc.provider)}
        if exc.code in CREDENTIAL_FAILURES:
            params = {**params, **credential_failure_record(error=exc, resolved=resolved)}
        error = scrub_envelope(exc.envelope(params))
        return Outcome(_STATUS_FOR_ERROR.get(exc.code, Execution.Status.FAILED), error=error)
    logger.error("Tool %s failed unexpectedly", tool.slug, exc_info=exc)
    return Outcome(Execution.Status.FAILED, error=envelope(ErrorCode.TOOL_ERROR, params))


def execution_finish(
    *,
    execution: Execution,
    outcome: Outcome,
    duration_ms: int,
    account: CreditAccount | None,
    job: Job | None = None,
    job_from: tuple[str, ...] = (Job.Status.RUNNING,),
    job_fields: dict[str, Any] | None = None,
) -> bool:
    """Write the outcome, statistics, balance and ledger entry together, once.

    With a ``job``, its terminal state (and ``job_fields``: the last progress report, the
    attempt log) is written too, provided it is still in one of ``job_from``.
    Returns False (and writes nothing) when the execution or the job had already reached a
    terminal state: a late report never overwrites one.

    One transaction: the job's end (if any), then the execution's, each a conditional update,
    then the instance's statistics (``F()``), the settling of the credits held when the run
    started and the ledger entry. All of it commits, or none.
    """
    now = timezone.now()
    error = outcome.error or {}
    succeeded = outcome.status == Execution.Status.COMPLETED
    job_updates: dict[str, Any] = {}
    if job is not None:
        job_updates = {**(job_fields or {}), "status": outcome.status, "finished_at": now, "updated_at": now}
        if succeeded:
            # Done with them; a failed, cancelled or timed-out job keeps its (sealed) inputs
            # so an operator can retry it as a new run (job_retry_as_new).
            job_updates.update(progress=100, sealed_inputs="")
    execution_updates = {
        "status": outcome.status,
        "output_data": outcome.output,
        "error_code": error.get("error_code", ""),
        "error_message": error.get("error_message", ""),
        "error_metadata": error.get("metadata", {}),
        "credits_consumed": outcome.credits,
        "finished_at": now,
        "duration_ms": duration_ms,
    }
    with transaction.atomic():
        if job is not None and not Job.objects.filter(pk=job.pk, status__in=job_from).update(**job_updates):
            return False
        if not Execution.objects.filter(pk=execution.pk, status__in=UNFINISHED).update(**execution_updates):
            # The execution ended meanwhile: its job does not end alone.
            transaction.set_rollback(True)
            return False
        if execution.instance_id is not None:
            ToolInstance.objects.filter(pk=execution.instance_id).update(
                execution_count=F("execution_count") + 1,
                success_count=F("success_count") + int(succeeded),
                failure_count=F("failure_count") + int(not succeeded),
                credits_consumed=F("credits_consumed") + outcome.credits,
                total_duration_ms=F("total_duration_ms") + duration_ms,
                last_executed_at=now,
            )
        if account is not None:
            # Settle what the run costs against what was held when it started, and say why.
            credits_settle(account=account, held=execution.credits_held, charge=outcome.credits)
            if outcome.credits:
                CreditLedgerEntry.objects.create(
                    account=account, kind=CreditLedgerEntry.Kind.EXECUTION, amount=-outcome.credits, execution=execution
                )
    if job is not None:
        for name, value in job_updates.items():
            setattr(job, name, value)
    for name, value in execution_updates.items():
        setattr(execution, name, value)
    return True


# --- Async: accepting a run ---------------------------------------------------------------


@dataclass
class Accepted:
    job: Job
    replayed: bool = False


def request_fingerprint(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def execution_enqueue(*, instance: ToolInstance, inputs: Any, idempotency_key: str = "") -> Accepted:
    """Accept an async run: the same checks as a sync run, then the Execution (PENDING) and the
    Job (QUEUED) in one transaction, and the RQ job, carrying only the job's id, on commit.

    With an ``idempotency_key``, the same key and body from the same owner within
    TOOLEXEC_IDEMPOTENCY_HOURS give back the first job and create nothing; a different body is
    refused. Raises QueueUnavailable (the execution then ends FAILED) when Redis is down.
    """
    # The instance is part of what a key identifies: the same key on another instance is a conflict.
    fingerprint = request_fingerprint({"instance": str(instance.pk), "inputs": inputs}) if idempotency_key else ""
    if idempotency_key:
        replay = _idempotent_replay(owner_id=instance.owner_id, key=idempotency_key, fingerprint=fingerprint)
        if replay is not None:
            return Accepted(replay, replayed=True)
    tool, merged, readiness = execution_prepare(instance=instance, mode=ASYNC, inputs=inputs)
    definition = instance.tool
    outcome: dict[str, bool] = {}
    try:
        with transaction.atomic():
            execution = execution_record_start(
                instance=instance,
                inputs=merged,
                mode=Mode.ASYNC,
                account=readiness.account,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
            )
            job = Job(
                execution=execution,
                instance=instance,
                owner_id=instance.owner_id,
                queue=QUEUE_NAME,
                status=Job.Status.QUEUED,
                max_attempts=tool.max_attempts if tool.idempotent else 1,
                enqueued_at=execution.created_at,
            )
            job.rq_job_id = str(job.pk)
            job.sealed_inputs = seal(merged, row_id=str(job.pk), owner_id=instance.owner_id)
            job.save(force_insert=True)
            transaction.on_commit(lambda: outcome.setdefault("enqueued", _enqueue(job, definition, readiness.account)))
    except IntegrityError:
        if not idempotency_key:
            raise
        # A concurrent request with the same key got there first: answer with its job.
        replay = _idempotent_replay(owner_id=instance.owner_id, key=idempotency_key, fingerprint=fingerprint)
        if replay is None:
            raise
        return Accepted(replay, replayed=True)
    if outcome.get("enqueued") is False:
        raise QueueUnavailable(
            tool=definition.name,
            instance_id=str(instance.pk),
            metadata={"execution_id": str(job.execution_id), "job_id": str(job.pk)},
        )
    return Accepted(job)


def _idempotent_replay(*, owner_id: int, key: str, fingerprint: str) -> Job | None:
    """The job a key already made, if it is recent; raises on a different body."""
    execution = Execution.objects.filter(owner_id=owner_id, idempotency_key=key).select_related("job").first()
    if execution is None:
        return None
    window = timedelta(hours=settings.TOOLEXEC_IDEMPOTENCY_HOURS)
    if execution.created_at < timezone.now() - window:
        # Expired: free the key for this new request (the old run keeps its record).
        Execution.objects.filter(pk=execution.pk, idempotency_key=key).update(idempotency_key="")
        return None
    if execution.request_fingerprint != fingerprint:
        raise IdempotencyConflict()
    return execution.job


def _enqueue(job: Job, definition: Any, account: CreditAccount) -> bool:
    """Put the job on the RQ queue (ids only). If Redis is down, the run ends FAILED with
    QUEUE_UNAVAILABLE, its held credits return, and False says so."""
    try:
        _rq_enqueue(job_id=str(job.pk), rq_job_id=job.rq_job_id, timeout=definition.timeout_seconds)
        return True
    except RedisError:
        logger.warning("Redis is unavailable; job %s could not be queued", job.pk)
        # The client is told to retry: its Idempotency-Key must lead to a new run, not this one.
        Execution.objects.filter(pk=job.execution_id).update(idempotency_key="")
        error = envelope(ErrorCode.QUEUE_UNAVAILABLE, {"tool": definition.name, "instance_id": str(job.instance_id)})
        execution_finish(
            execution=job.execution,
            outcome=Outcome(Execution.Status.FAILED, error=error),
            duration_ms=0,
            account=account,
            job=job,
            job_from=(Job.Status.QUEUED,),
        )
        return False


def _rq_enqueue(*, job_id: str, rq_job_id: str, timeout: int, run_after: datetime | None = None) -> None:
    """Hand a job to RQ under ``rq_job_id`` (its arguments: the job's id only): to run as soon as
    a worker is free, or, with a ``run_after`` still to come, then."""
    options = {
        "job_id": rq_job_id,
        "description": f"toolexec job {job_id}",
        "result_ttl": 600,
        "failure_ttl": 7 * 24 * 3600,
    }
    if run_after is not None and run_after > timezone.now():
        events.queue().enqueue_at(run_after, RUN, job_id, job_timeout=timeout, **options)
    else:
        events.queue().enqueue_call(RUN, args=(job_id,), timeout=timeout, **options)


# --- Async: running a job on a worker ------------------------------------------------------


class JobProgress:
    """The progress sink of a running job. Every change is published at once; the database
    gets the latest report from a writer thread, at most once every ``interval`` seconds
    counted from the claim (which wrote the row), so a tool that reports and then blocks for a
    while still shows its report within a second. The latest report also goes out with the
    outcome (:meth:`take`), so the row and the terminal event agree on it."""

    def __init__(self, job: Job, interval: float = PROGRESS_WRITE_INTERVAL) -> None:
        self.job_id = str(job.pk)
        self.interval = interval
        self._last_write = time.monotonic()
        self._pending: dict[str, Any] | None = None
        self._latest: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._reported = threading.Event()
        self._ended = threading.Event()
        self._writer: threading.Thread | None = None

    def __call__(self, percent: int, step: str, step_index: int | None, steps_total: int | None) -> None:
        state = {"progress": percent, "current_step": step[:300], "step_index": step_index, "steps_total": steps_total}
        events.publish(self.job_id, {"event": "progress", "status": Job.Status.RUNNING, **state})
        with self._lock:
            self._pending = self._latest = state
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_latest, name=f"progress-{self.job_id}", daemon=True)
            self._writer.start()
        else:
            self._reported.set()

    def _write_latest(self) -> None:
        try:
            while not self._ended.wait(max(0.0, self._last_write + self.interval - time.monotonic())):
                self._reported.clear()
                if self._pending is None:
                    self._reported.wait()  # the next report, or the end
                    if self._ended.is_set():
                        break
                try:
                    self.flush()
                except DatabaseError:
                    logger.warning("could not write the progress of job %s", self.job_id, exc_info=True)
        finally:
            connections.close_all()  # this thread's own connection

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
        self._last_write = time.monotonic()

    def take(self) -> dict[str, Any]:
        """Stop the writer and return the latest report (empty if none), written or not, for
        the outcome's own update: the row and the terminal event then agree on it."""
        self._ended.set()
        self._reported.set()
        if self._writer is not None:
            self._writer.join()
        with self._lock:
            self._pending = None
            return dict(self._latest)


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
        tool_class, inputs, readiness = _job_check(job)
        tool, resolved = tool_class(), credentials_resolve(credentials=readiness.credentials)
    except RefusedAtStart as refused:
        _job_end(job, Outcome(Execution.Status.FAILED, error=refused.body), 0, account)
        return
    except ToolexecError as exc:
        status = _STATUS_FOR_ERROR.get(exc.code, Execution.Status.FAILED)
        _job_end(job, Outcome(status, error=exc.envelope(params)), 0, account)
        return
    except Exception:  # ours, not the tool's (inputs that no longer open, say): end it now, not at the reaper
        logger.exception("Job %s could not start", job.pk)
        _job_end(job, Outcome(Execution.Status.FAILED, error=envelope(ErrorCode.INTERNAL_ERROR, params)), 0, account)
        return
    ctx = ExecutionContext(
        execution_id=str(execution.pk),
        tool_slug=definition.slug,
        credentials={slot: r.secret for slot, r in resolved.items()},
        credential_info={slot: r.metadata for slot, r in resolved.items()},
        refresher=_refresher(resolved),
        files=file_opener(owner_id=job.owner_id),
        deadline=time.monotonic() + definition.timeout_seconds,
        timeout_seconds=definition.timeout_seconds,
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
            _cancel_death_penalty()
        last_report = ctx.progress_sink.take()  # type: ignore[union-attr]
        outcome = _outcome_of(result, ctx, tool, params, resolved)
        # A failure's traceback holds the tool's frames (inputs, credentials), and this frame,
        # which holds the failure: a cycle the garbage collector would free at some later time.
        # The worker process goes on to other owners' jobs, so it is broken now.
        result = None
    duration_ms = int((time.monotonic() - started) * 1000)
    code = (outcome.error or {}).get("error_code")
    if code in tool.retry_on and job.attempts < job.max_attempts:
        job_retry(job=job, error=outcome.error or {}, delay=tool.retry_backoff_seconds * 2 ** (job.attempts - 1))
        return
    _job_end(job, outcome, duration_ms, account, last_report)


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
        _job_requeue(job, delay=FAIRNESS_RETRY_SECONDS)
        return None
    job.status, job.worker_name, job.attempts = Job.Status.RUNNING, worker_name[:200], job.attempts + 1
    job.started_at = job.heartbeat_at = job.updated_at = now
    job.execution.status = Execution.Status.RUNNING
    job.execution.started_at = job.execution.started_at or now
    if job.instance is not None:
        job.instance.tool = job.execution.tool  # an instance's tool never changes
    events.publish(str(job.pk), {"event": "state", "status": Job.Status.RUNNING, "progress": job.progress})
    return job


def _job_check(job: Job) -> Checked:
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


def _job_end(
    job: Job,
    outcome: Outcome,
    duration_ms: int,
    account: CreditAccount | None,
    last_report: dict[str, Any] | None = None,
) -> None:
    """The outcome, with the attempt's entry in the log and the last progress report, in one
    update of the Job row."""
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
    ):
        events.publish(str(job.pk), {"event": "state", **job_progress(job=job)})  # the row just written


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
    _job_schedule(job)


def _job_requeue(job: Job, *, delay: float) -> None:
    """A QUEUED job whose owner runs their share already: looked at again after ``delay``."""
    rq_job_id = f"{job.pk}-wait-{int(time.time() * 1000)}"
    now = timezone.now()
    run_after = now + timedelta(seconds=delay)
    waits = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED)
    if waits.update(rq_job_id=rq_job_id, enqueued_at=now, run_after=run_after, updated_at=now):
        job.rq_job_id, job.enqueued_at, job.run_after = rq_job_id, now, run_after
        _job_schedule(job)


def _job_schedule(job: Job) -> None:
    """Give RQ the job's schedule, recorded on the row already. If Redis does not answer, the
    row is the record: the reaper makes the schedule once Redis is back (jobs_requeue_lost)."""
    try:
        _rq_enqueue(
            job_id=str(job.pk),
            rq_job_id=job.rq_job_id,
            timeout=job.execution.tool.timeout_seconds,
            run_after=job.run_after,
        )
    except RedisError:
        logger.warning("Redis did not take job %s; the reaper will queue it again", job.pk)


def _cancel_death_penalty() -> None:
    """The tool is done: RQ's alarm must not fire while the outcome is being written."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)


# --- Async: cancelling, losing, reaping ------------------------------------------------


def job_cancel(*, job: Job) -> Job:
    """A queued job never starts; a running one stops at its next check, or is stopped by the
    reaper through RQ's stop-job command after TOOLEXEC_CANCEL_GRACE_SECONDS."""
    if job.status in Job.TERMINAL:
        raise JobFinished(f"This job has already ended ({job.status}); there is nothing to cancel.")
    now = timezone.now()
    params = {"tool": job.execution.tool.name, "instance_id": str(job.instance_id or "")}
    if job.status == Job.Status.QUEUED:
        cancelled = Outcome(Execution.Status.CANCELLED, error=envelope(ErrorCode.CANCELLED, params))
        account = CreditAccount.objects.filter(owner_id=job.owner_id).first()
        if execution_finish(
            execution=job.execution,
            outcome=cancelled,
            duration_ms=0,
            account=account,
            job=job,
            job_from=(Job.Status.QUEUED,),
        ):
            Job.objects.filter(pk=job.pk).update(cancel_requested_at=now)
            _rq_cancel(job.rq_job_id)
            events.publish(str(job.pk), job_state(job_id=str(job.pk)))
            return Job.objects.get(pk=job.pk)
        job.refresh_from_db()  # it started meanwhile: cancel it as a running job
        if job.status in Job.TERMINAL:
            raise JobFinished(f"This job has already ended ({job.status}); there is nothing to cancel.")
    Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, cancel_requested_at__isnull=True).update(
        cancel_requested_at=now, current_step="Cancelling", updated_at=now
    )
    events.cancel_flag_set(str(job.pk))
    events.publish(str(job.pk), {"event": "state", "status": Job.Status.RUNNING, "current_step": "Cancelling"})
    job.refresh_from_db()
    return job


class JobNotRetryable(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


RETRYABLE_AS_NEW = frozenset({Job.Status.FAILED, Job.Status.CANCELLED, Job.Status.TIMED_OUT})


def job_retry_as_new(*, job: Job, actor: Any = None) -> Job:
    """Run a failed, cancelled or timed-out job's inputs again as a new Execution and Job,
    through the same checks and enqueue path as execute-async. The old records stay as they are."""
    if job.status not in RETRYABLE_AS_NEW:
        raise JobNotRetryable(f"Only a failed, cancelled or timed-out job can be retried; this one is {job.status}.")
    if job.instance_id is None:
        raise JobNotRetryable("The instance this job ran on was deleted; there is nothing to run it on.")
    if not job.sealed_inputs:
        raise JobNotRetryable("This job's inputs are no longer kept, so it cannot be run again.")
    inputs = unseal(job.sealed_inputs, row_id=str(job.pk), owner_id=job.owner_id)
    instance = ToolInstance.objects.select_related("tool", "owner__credit_account").get(pk=job.instance_id)
    accepted = execution_enqueue(instance=instance, inputs=inputs)
    logger.info("Job %s retried as job %s by %s", job.pk, accepted.job.pk, getattr(actor, "pk", None))
    return accepted.job


def _rq_cancel(rq_job_id: str) -> None:
    try:
        RQJob.fetch(rq_job_id, connection=events.redis()).cancel()
    except (NoSuchJobError, InvalidJobOperation, RedisError):
        pass  # nothing queued any more; our row already says CANCELLED


def job_lost(*, job: Job, reason: str) -> bool:
    """A RUNNING job whose worker is gone: retried if its tool allows, else FAILED (WORKER_LOST)."""
    definition = job.execution.tool
    tool_class = registry.get_tool(definition.slug)
    if (
        tool_class is not None
        and tool_class.idempotent
        and ErrorCode.WORKER_LOST in tool_class.retry_on
        and job.attempts < job.max_attempts
    ):
        job_retry(job=job, error={"error_code": ErrorCode.WORKER_LOST.value}, delay=tool_class.retry_backoff_seconds)
        return True
    logger.warning("Job %s lost its worker: %s", job.pk, reason)
    params = {"tool": definition.name, "instance_id": str(job.instance_id or "")}
    lost = Outcome(Execution.Status.FAILED, error=envelope(ErrorCode.WORKER_LOST, params))
    duration = int((timezone.now() - job.started_at).total_seconds() * 1000) if job.started_at else 0
    account = CreditAccount.objects.filter(owner_id=job.owner_id).first()
    ended = execution_finish(execution=job.execution, outcome=lost, duration_ms=duration, account=account, job=job)
    if ended:
        events.publish(str(job.pk), job_state(job_id=str(job.pk)))
    return ended


def jobs_reap(*, now: datetime | None = None) -> dict[str, int]:
    """Keeps job states honest; run by every worker's supervisor at every heartbeat while its
    processes run jobs, and each maintenance interval while they are idle.

    - RUNNING jobs whose heartbeat is older than TOOLEXEC_JOB_STALE_SECONDS lost their worker;
    - RUNNING jobs cancelled more than TOOLEXEC_CANCEL_GRACE_SECONDS ago that did not stop
      by themselves are ended CANCELLED and the process running them stopped;
    - QUEUED jobs that Redis lost are queued again (jobs_requeue_lost).
    """
    now = now or timezone.now()
    counts = {"lost": 0, "cancelled": 0}
    running = Job.objects.filter(status=Job.Status.RUNNING).select_related("execution__tool")
    stale_before = now - timedelta(seconds=settings.TOOLEXEC_JOB_STALE_SECONDS)
    grace_before = now - timedelta(seconds=settings.TOOLEXEC_CANCEL_GRACE_SECONDS)
    for job in running.filter(Q(heartbeat_at__lt=stale_before) | Q(heartbeat_at__isnull=True)):
        counts["lost"] += job_lost(job=job, reason=f"no heartbeat since {job.heartbeat_at}")
    for job in running.filter(cancel_requested_at__lt=grace_before):
        counts["cancelled"] += job_stop(job=job)
    counts["requeued"] = jobs_requeue_lost(now=now)
    return counts


def jobs_requeue_lost(*, now: datetime | None = None) -> int:
    """Queue again the QUEUED jobs RQ will never run, with the RQ job id they had, and return
    how many. PostgreSQL is the record of what was accepted: a Redis that restarted empty, or
    an enqueue that never happened (a process that died between its commit and its enqueue, a
    retry's schedule that Redis refused), strands nothing.

    A job counts as lost once it was handed to RQ (``enqueued_at``) more than
    TOOLEXEC_QUEUE_RECOVERY_SECONDS ago, so one on its way from its commit to its enqueue is
    not doubled. One scheduled for later is scheduled again for its original time
    (``run_after``). Each is recorded before it is enqueued, by a conditional update that only
    one reaper wins; and should a job still be run twice (a worker that dequeued it just as it
    was looked at), the claim is conditional: the second delivery runs nothing.

    Redis round trips: none when no queued job is that old; otherwise one (a pipeline) for the
    oldest QUEUE_RECOVERY_BATCH of them, and RQ's enqueue (two) for each job queued again. A
    Redis that does not answer ends the round with a warning; the next round tries again.
    """
    now = now or timezone.now()
    handed_before = now - timedelta(seconds=settings.TOOLEXEC_QUEUE_RECOVERY_SECONDS)
    # job_queued_idx: QUEUED rows oldest first; enqueued_at is checked on the rows it finds.
    candidates = list(
        Job.objects.filter(status=Job.Status.QUEUED, enqueued_at__lt=handed_before)
        .exclude(rq_job_id="")
        .select_related("execution__tool")
        .only(
            "id",
            "rq_job_id",
            "enqueued_at",
            "run_after",
            "attempt_log",
            "execution__id",
            "execution__tool__timeout_seconds",
        )
        .order_by("created_at")[:QUEUE_RECOVERY_BATCH]
    )
    if not candidates:
        return 0
    try:
        lost = _rq_lost([job.rq_job_id for job in candidates])
    except RedisError:
        logger.warning("Redis is unavailable; queued jobs were not checked against it this round")
        return 0
    requeued = 0
    for job in candidates:
        if job.rq_job_id not in lost:
            continue
        try:
            requeued += _job_requeue_lost(job, rq_status=lost[job.rq_job_id])
        except RedisError:
            logger.warning("Redis did not take job %s back; the next round tries again", job.pk)
            break
    return requeued


def _rq_lost(rq_job_ids: list[str]) -> dict[str, str]:
    """Those of ``rq_job_ids`` that RQ will never run, each with the status its RQ job hash has
    ("" when there is none, as after Redis lost its data).

    RQ knows a job it will run: one waiting in the queue (or just taken from it by a worker, in
    the queue's intermediate list), scheduled or deferred, each in the list or registry that
    says so, or started (a worker has it and has not yet claimed it in PostgreSQL; should that
    worker die, RQ's own registry cleanup marks it failed). Any other state (no hash, a
    finished, failed, stopped or cancelled one, a hash whose list or registry lost it) means
    nothing will run it. One MULTI/EXEC of five commands a job, so the answers agree.
    """
    queue = events.queue()
    lists = (queue.key, queue.intermediate_queue_key)
    registries = (queue.scheduled_job_registry.key, queue.deferred_job_registry.key)
    with queue.connection.pipeline() as pipeline:
        for rq_job_id in rq_job_ids:
            pipeline.hget(RQJob.key_for(rq_job_id), "status")
            for key in lists:
                pipeline.lpos(key, rq_job_id)  # from the head, where the oldest jobs wait
            for key in registries:
                pipeline.zscore(key, rq_job_id)
        replies = pipeline.execute()
    lost: dict[str, str] = {}
    for index, rq_job_id in enumerate(rq_job_ids):
        raw, queued, taken, scheduled, deferred = replies[index * 5 : index * 5 + 5]
        status = raw.decode() if isinstance(raw, bytes) else (raw or "")
        known = (
            status == JobStatus.STARTED
            or (status == JobStatus.QUEUED and (queued is not None or taken is not None))
            or (status == JobStatus.SCHEDULED and scheduled is not None)
            or (status == JobStatus.DEFERRED and deferred is not None)
        )
        if not known:
            lost[rq_job_id] = status
    return lost


def _job_requeue_lost(job: Job, *, rq_status: str) -> bool:
    """Record that the queue lost ``job`` and hand it to RQ again; False if another reaper (or
    anything else that changed the row since it was read) got there first."""
    now = timezone.now()
    due = job.run_after if job.run_after is not None and job.run_after > now else None
    message = f"The queue lost this job; queued again at {now.isoformat()}"
    message += f" to run at {due.isoformat()}, as it was scheduled." if due else "."
    note = {"event": "queue_lost", "message": message, "queued_again_at": now.isoformat()}
    seen = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED, rq_job_id=job.rq_job_id, enqueued_at=job.enqueued_at)
    if not seen.update(attempt_log=[*job.attempt_log, note], enqueued_at=now, updated_at=now):
        return False
    try:
        if rq_status:
            _rq_forget(job.rq_job_id)
        _rq_enqueue(
            job_id=str(job.pk),
            rq_job_id=job.rq_job_id,
            timeout=job.execution.tool.timeout_seconds,
            run_after=job.run_after,
        )
    except RedisError:
        # Undone, so the row says only what happened, and the job is looked at again next round.
        Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED, rq_job_id=job.rq_job_id, enqueued_at=now).update(
            attempt_log=job.attempt_log, enqueued_at=job.enqueued_at
        )
        raise
    logger.warning("Job %s was lost by the queue and queued again", job.pk)
    return True


def _rq_forget(rq_job_id: str) -> None:
    """Delete what is left of an RQ job that will never run (a finished or failed run's hash,
    which expires, and its place in a registry): nothing of it may outlive the job queued again
    under its id."""
    try:
        RQJob.fetch(rq_job_id, connection=events.redis()).delete()
    except NoSuchJobError:
        pass  # it expired meanwhile


def job_stop(*, job: Job) -> bool:
    """End a running job CANCELLED now and stop the process running it (it did not stop by itself)."""
    params = {"tool": job.execution.tool.name, "instance_id": str(job.instance_id or "")}
    cancelled = Outcome(Execution.Status.CANCELLED, error=envelope(ErrorCode.CANCELLED, params))
    duration = int((timezone.now() - job.started_at).total_seconds() * 1000) if job.started_at else 0
    account = CreditAccount.objects.filter(owner_id=job.owner_id).first()
    if not execution_finish(execution=job.execution, outcome=cancelled, duration_ms=duration, account=account, job=job):
        return False
    try:
        send_stop_job_command(events.redis(), job.rq_job_id)
    except (NoSuchJobError, InvalidJobOperation, RedisError):
        pass  # the process is already done with it
    events.publish(str(job.pk), job_state(job_id=str(job.pk)))
    return True


def jobs_heartbeat(*, job_ids: list[str]) -> dict[str, str]:
    """The worker's supervisor reports the jobs its processes run alive. Returns each one's
    status, so it can stop a process still running a job that was cancelled meanwhile."""
    now = timezone.now()
    jobs = Job.objects.filter(pk__in=job_ids)
    jobs.filter(status=Job.Status.RUNNING).update(heartbeat_at=now)
    return {str(pk): status for pk, status in jobs.values_list("pk", "status")}


def job_timed_out(*, rq_job_id: str) -> None:
    """A RUNNING job whose tool ran past its timeout in a process that could not be interrupted
    (its supervisor killed the process): TIMED_OUT, as if the tool had been stopped at its limit."""
    job = Job.objects.select_related(*JOB_TO_RUN).filter(rq_job_id=rq_job_id, status=Job.Status.RUNNING).first()
    if job is None:
        return
    definition = job.execution.tool
    params = {"tool": definition.name, "instance_id": str(job.instance_id or "")}
    error = ToolTimeout(seconds=definition.timeout_seconds).envelope(params)
    duration = int((timezone.now() - job.started_at).total_seconds() * 1000) if job.started_at else 0
    account = getattr(job.owner, "credit_account", None)
    _job_end(job, Outcome(Execution.Status.TIMED_OUT, error=error), duration, account)


def job_process_lost(*, rq_job_id: str, reason: str) -> None:
    job = Job.objects.select_related("execution__tool").filter(rq_job_id=rq_job_id, status=Job.Status.RUNNING).first()
    if job is not None:
        job_lost(job=job, reason=reason)


# --- Async: reading a job ---------------------------------------------------------------


def job_state(*, job_id: str) -> dict[str, Any]:
    """The event a listener gets for the job's current state (the last one is terminal)."""
    job = Job.objects.select_related("execution").get(pk=job_id)
    return {"event": "state", **job_progress(job=job)}


def job_progress(*, job: Job) -> dict[str, Any]:
    eta = None
    if job.status == Job.Status.RUNNING and job.started_at and 0 < job.progress < 100:
        elapsed = (timezone.now() - job.started_at).total_seconds()
        eta = round(elapsed * (100 - job.progress) / job.progress, 1)
    return {
        "status": job.status,
        "progress": job.progress,
        "current_step": job.current_step,
        "steps_total": job.steps_total,
        "step_index": job.step_index,
        "eta_seconds": eta,
        "updated_at": job.updated_at.isoformat(),
    }


def job_check_alive(*, job: Job) -> Job:
    """A read of a RUNNING job whose heartbeat went stale ends it (no worker may be left to)."""
    stale_before = timezone.now() - timedelta(seconds=settings.TOOLEXEC_JOB_STALE_SECONDS)
    if job.status == Job.Status.RUNNING and (job.heartbeat_at is None or job.heartbeat_at < stale_before):
        job_lost(job=job, reason="stale heartbeat seen on read")
        job.refresh_from_db()
        job.execution.refresh_from_db()
    return job


# --- Credits ------------------------------------------------------------------------------


def credits_adjust(*, account: CreditAccount, amount: Decimal, reason: str, actor: Any = None) -> CreditLedgerEntry:
    """An operator's manual change of a balance (negative takes credits away), with its reason,
    in the ledger: one transaction, the balance moved with F()."""
    reason = (reason or "").strip()
    errors: dict[str, list[str]] = {}
    if not amount:
        errors["amount"] = ["Must not be zero."]
    if not reason:
        errors["reason"] = ["Say why the balance changes."]
    if errors:
        raise InputInvalid("The adjustment is not valid: " + "; ".join(errors), field_errors=errors)
    with transaction.atomic():
        CreditAccount.objects.filter(pk=account.pk).update(balance=F("balance") + amount, updated_at=timezone.now())
        entry = CreditLedgerEntry.objects.create(
            account=account,
            kind=CreditLedgerEntry.Kind.ADJUSTMENT,
            amount=amount,
            reason=reason[:300],
            created_by=actor if actor is not None and actor.is_authenticated else None,
        )
    return entry
