"""The execution service: running tools and recording every attempt (DESIGN.md §4, §7).

A sync run is two short transactions around the tool's work: the Execution row is written
(RUNNING) before the tool starts, and afterwards the outcome, the instance statistics, the
ledger entry and the balance are written together. No transaction is open while the tool runs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from instances.models import CreditAccount, ToolInstance
from instances.providers import provider_display
from instances.readiness import Readiness, readiness_check
from instances.services import (
    ResolvedCredential,
    credential_failure_record,
    credentials_resolve,
    credits_balance,
    credits_hold,
    credits_settle,
    credits_words,
)
from toolexec.redaction import redact, scrub_envelope, scrub_known, secrets_in_play
from tools import registry
from tools.errors import ErrorCode, InputInvalid, InsufficientCredits, ToolexecError, ToolTimeout, envelope
from tools.schemas import errors_by_field, nul_errors, summary
from tools.sdk import SYNC, ExecutionContext, Tool

from .models import CreditLedgerEntry, Execution, Mode

logger = logging.getLogger(__name__)


class NotReady(Exception):
    """The instance failed its readiness checks; carries them for the 409/402 envelope."""

    def __init__(self, readiness: Readiness) -> None:
        super().__init__(readiness.failures[0].message)
        self.readiness = readiness


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
            deadline=time.monotonic() + time_limit,
            timeout_seconds=time_limit,
        )
        clock = time.monotonic()
        outcome = _outcome_of(_run_with_time_limit(tool, merged, ctx, time_limit), ctx, tool, params, resolved)
        duration_ms = int((time.monotonic() - clock) * 1000)
    execution_finish(execution=execution, outcome=outcome, duration_ms=duration_ms, account=readiness.account)
    return execution, outcome


def execution_record_start(
    *, instance: ToolInstance, inputs: dict[str, Any], mode: str, account: CreditAccount
) -> Execution:
    """Record the attempt (RUNNING for sync), holding the tool's minimum price on the account
    in the same transaction, so concurrent runs cannot spend the same credits twice."""
    definition = instance.tool
    hold = Decimal("0") if account.is_unlimited else definition.base_credits
    started = timezone.now()
    with transaction.atomic() if hold else nullcontext():
        if hold and not credits_hold(account=account, amount=hold):
            raise InsufficientCredits(
                tool=definition.name,
                needed=credits_words(hold),
                balance=credits_words(credits_balance(account=account)),
            )
        return Execution.objects.create(
            instance=instance,
            tool=definition,
            owner_id=instance.owner_id,
            mode=mode,
            status=Execution.Status.RUNNING if mode == Mode.SYNC else Execution.Status.PENDING,
            input_data=redact(inputs),
            credits_held=hold,
            started_at=started if mode == Mode.SYNC else None,
            created_at=started,
        )


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
    *, execution: Execution, outcome: Outcome, duration_ms: int, account: CreditAccount | None
) -> bool:
    """Write the outcome, statistics, ledger entry and balance in one transaction, once.

    Returns False (and writes nothing) when the execution had already reached a terminal state.
    """
    now = timezone.now()
    error = outcome.error or {}
    credits = outcome.credits
    with transaction.atomic():
        finished = Execution.objects.filter(
            pk=execution.pk, status__in=[Execution.Status.PENDING, Execution.Status.RUNNING]
        ).update(
            status=outcome.status,
            output_data=outcome.output,
            error_code=error.get("error_code", ""),
            error_message=error.get("error_message", ""),
            error_metadata=error.get("metadata", {}),
            credits_consumed=credits,
            finished_at=now,
            duration_ms=duration_ms,
        )
        if not finished:
            return False
        succeeded = outcome.status == Execution.Status.COMPLETED
        if execution.instance_id is not None:
            ToolInstance.objects.filter(pk=execution.instance_id).update(
                execution_count=F("execution_count") + 1,
                success_count=F("success_count") + int(succeeded),
                failure_count=F("failure_count") + int(not succeeded),
                credits_consumed=F("credits_consumed") + credits,
                total_duration_ms=F("total_duration_ms") + duration_ms,
                last_executed_at=now,
            )
        if account is not None:
            # Settle what the run costs against what was held when it started.
            credits_settle(account=account, held=execution.credits_held, charge=credits)
        if credits and account is not None:
            CreditLedgerEntry.objects.create(
                account=account, kind=CreditLedgerEntry.Kind.EXECUTION, amount=-credits, execution=execution
            )
    execution.status = outcome.status
    execution.output_data = outcome.output
    execution.error_code = error.get("error_code", "")
    execution.error_message = error.get("error_message", "")
    execution.error_metadata = error.get("metadata", {})
    execution.credits_consumed = credits
    execution.finished_at = now
    execution.duration_ms = duration_ms
    return True
