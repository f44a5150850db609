"""Recording a run, sync or async: the checks before it, its start (with the credits it
holds) and its outcome (with the statistics, the settlement and the ledger), each in one
transaction, and the outcome of a tool's result or failure."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from core.errors import ErrorCode, ToolexecError, envelope
from core.redaction import redact, scrub_envelope, scrub_known
from credits.models import CreditAccount, CreditLedgerEntry
from credits.services import credits_balance, credits_hold, credits_settle
from instances.models import ToolInstance
from instances.providers import provider_display
from instances.readiness import Readiness, readiness_check
from instances.services.credentials import ResolvedCredential, credential_failure_record, credential_refresh
from instances.services.files import file_opener
from tools import registry
from tools.errors import InputInvalid, InsufficientCredits
from tools.schemas import errors_by_field, nul_errors, summary
from tools.sdk import ExecutionContext, Tool

from ..models import Execution, Job, Mode
from ..signals import execution_ended
from .cache import CachePlan, CacheReport, cache_entry_hit, cache_store
from .cache import Status as CacheStatus

logger = logging.getLogger(__name__)


UNFINISHED = (Execution.Status.PENDING, Execution.Status.RUNNING)


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
    cache: CacheReport | None = None  # what the result cache did for the run, if it took part


CREDENTIAL_FAILURES = frozenset(
    {ErrorCode.CREDENTIAL_EXPIRED, ErrorCode.CREDENTIAL_REVOKED, ErrorCode.CREDENTIAL_INVALID}
)


STATUS_FOR_ERROR = {
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


def execution_record_start(
    *,
    instance: ToolInstance,
    inputs: dict[str, Any],
    mode: str,
    account: CreditAccount,
    idempotency_key: str = "",
    fingerprint: str = "",
    origin: str = "",
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
        origin=origin,
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
        raise InsufficientCredits(tool=definition.name, needed=hold, balance=credits_balance(account=account))
    return execution


def run_context(
    *, execution: Execution, resolved: dict[str, ResolvedCredential], seconds: int, **hooks: Any
) -> ExecutionContext:
    """What a tool's run is given, sync or async: its credentials by slot (secrets, metadata,
    and a refresh on demand), the owner's files, its deadline in ``seconds``; ``hooks`` are a
    job's progress sink and cancellation probe."""

    def refresh(slot: str) -> dict[str, Any]:
        return credential_refresh(credential_id=resolved[slot].credential_id)

    return ExecutionContext(
        execution_id=str(execution.pk),
        tool_slug=execution.tool.slug,
        credentials={slot: r.secret for slot, r in resolved.items()},
        credential_info={slot: r.metadata for slot, r in resolved.items()},
        refresher=refresh,
        files=file_opener(owner_id=execution.owner_id),
        deadline=time.monotonic() + seconds,
        timeout_seconds=seconds,
        **hooks,
    )


def outcome_of(
    result: Any, ctx: ExecutionContext, tool: Tool, params: dict[str, Any], resolved: dict[str, ResolvedCredential]
) -> Outcome:
    if isinstance(result, BaseException):
        return failure_outcome(result, params, tool, resolved)
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


def failure_outcome(
    exc: BaseException, params: dict[str, Any], tool: Tool, resolved: dict[str, ResolvedCredential]
) -> Outcome:
    if isinstance(exc, ToolexecError):
        if exc.provider:
            params = {**params, "provider": provider_display(exc.provider)}
        if exc.code in CREDENTIAL_FAILURES:
            params = {**params, **credential_failure_record(error=exc, resolved=resolved)}
        error = scrub_envelope(exc.envelope(params))
        return Outcome(STATUS_FOR_ERROR.get(exc.code, Execution.Status.FAILED), error=error)
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
    cache_plan: CachePlan | None = None,
) -> bool:
    """Write the outcome, statistics, balance and ledger entry together, once; and with a
    ``cache_plan`` whose report says the result is kept, the cache entry.

    With a ``job``, its terminal state (and ``job_fields``: the last progress report, the
    attempt log) is written too, provided it is still in one of ``job_from``.
    Returns False (and writes nothing) when the execution or the job had already reached a
    terminal state: a late report never overwrites one.

    One transaction: the job's end (if any); the charge's ledger line (if anything is charged),
    linked by the execution's end, a conditional update; the instance's statistics (``F()``);
    the settling of the credits held when the run started. All of it commits, or none.
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
    if outcome.cache is not None:
        execution_updates["cache"] = outcome.cache.as_dict()
        if outcome.cache.status in (CacheStatus.HIT, CacheStatus.COLLAPSED):
            # Answered from the cache now (a queued job that followed an identical run).
            execution_updates.update(
                cache_hit=True, source_execution_id=outcome.cache.source_execution_id, started_at=now
            )
    with transaction.atomic():
        if job is not None and not Job.objects.filter(pk=job.pk, status__in=job_from).update(**job_updates):
            return False
        if account is not None and outcome.credits:
            # The charge's ledger line, linked by the execution's own update just below.
            execution_updates["ledger_entry"] = CreditLedgerEntry.objects.create(
                account=account, kind=CreditLedgerEntry.Kind.EXECUTION, amount=-outcome.credits
            )
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
            # Settle what the run costs against what was held when it started (the ledger line says why).
            credits_settle(account=account, held=execution.credits_held, charge=outcome.credits)
        if cache_plan is not None:
            cache_store(plan=cache_plan, execution=execution, output=outcome.output)
        if job is not None:
            for name, value in job_updates.items():
                setattr(job, name, value)
        for name, value in execution_updates.items():
            setattr(execution, name, value)
        # A workflow advances its run in this transaction: its next steps commit with this end.
        execution_ended.send(sender=Execution, execution=execution, outcome=outcome, job=job)
    return True


def execution_record_hit(
    *,
    instance: ToolInstance,
    inputs: dict[str, Any],
    mode: str,
    account: CreditAccount,
    plan: CachePlan,
    idempotency_key: str = "",
    fingerprint: str = "",
    origin: str = "",
) -> tuple[Execution, Outcome, Job | None]:
    """A run answered from the cache (``plan.entry``): the tool does not run. Its Execution is
    recorded COMPLETED at once with the entry's output (for ``mode`` ASYNC with its Job,
    COMPLETED with progress 100, so a client polling it sees the result at once), the hit's
    price (TOOLEXEC_CACHE_HIT_CREDITS) taken off the balance with its ledger line, the
    instance's statistics and the entry's hit count: one transaction. Raises
    InsufficientCredits, and records nothing, when the balance does not cover the price."""
    assert plan.entry is not None
    definition = instance.tool
    price = Decimal(settings.TOOLEXEC_CACHE_HIT_CREDITS)
    now = timezone.now()
    report = plan.report
    execution = Execution(
        instance=instance,
        tool=definition,
        owner_id=instance.owner_id,
        mode=mode,
        status=Execution.Status.COMPLETED,
        input_data=redact(inputs),
        output_data=plan.entry.output,
        credits_consumed=price,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
        started_at=now,
        finished_at=now,
        duration_ms=0,
        cache_hit=True,
        source_execution_id=plan.entry.source_execution_id,
        cache=report.as_dict(),
        created_at=now,
        origin=origin,
    )
    job = None
    outcome = Outcome(Execution.Status.COMPLETED, output=plan.entry.output, credits=price, cache=report)
    with transaction.atomic():
        if price and not account.is_unlimited and not credits_hold(account=account, amount=price):
            raise InsufficientCredits(tool=definition.name, needed=price, balance=credits_balance(account=account))
        if price:
            execution.ledger_entry = CreditLedgerEntry.objects.create(
                account=account, kind=CreditLedgerEntry.Kind.EXECUTION, amount=-price
            )
        execution.save(force_insert=True)
        if mode == Mode.ASYNC:
            job = Job.objects.create(
                execution=execution,
                instance=instance,
                owner_id=instance.owner_id,
                status=Job.Status.COMPLETED,
                progress=100,
                started_at=now,
                finished_at=now,
            )
        ToolInstance.objects.filter(pk=instance.pk).update(
            execution_count=F("execution_count") + 1,
            success_count=F("success_count") + 1,
            credits_consumed=F("credits_consumed") + price,
            last_executed_at=now,
        )
        cache_entry_hit(plan.entry, now)
        execution_ended.send(sender=Execution, execution=execution, outcome=outcome, job=job)
    return execution, outcome, job
