"""Sync runs: the tool runs in the request, in a thread, so the request answers at the time
limit; the run is recorded before the tool starts and its outcome after (services.runs)."""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from typing import Any

from django.conf import settings
from django.db import connections

from core.errors import ToolexecError
from core.redaction import secrets_in_play
from instances.models import ToolInstance
from instances.readiness import Readiness
from instances.services.credentials import credentials_resolve
from tools.errors import ToolTimeout
from tools.sdk import SYNC, ExecutionContext, Tool

from ..models import Execution, Mode
from .cache import (
    CacheControl,
    CachePlan,
    cache_lead,
    cache_plan,
    cache_release,
    cache_report_for,
    cache_wait,
)
from .runs import (
    Outcome,
    execution_finish,
    execution_prepare,
    execution_record_hit,
    execution_record_start,
    outcome_of,
    run_context,
)


def execution_run_sync(
    *, instance: ToolInstance, inputs: Any, cache_control: CacheControl | None = None
) -> tuple[Execution, Outcome]:
    """Run ``instance`` now and record it. Raises NotReady, InputInvalid, InsufficientCredits or
    a credential error before recording; after that, every failure is an Outcome recorded on
    the Execution.

    The result cache answers first when it can (a HIT: the tool does not run). Otherwise,
    when the result may be kept, concurrent identical runs take turns: the first runs, the
    others wait for its entry (COLLAPSED) and run themselves only if it kept none."""
    tool, merged, readiness = execution_prepare(instance=instance, mode=SYNC, inputs=inputs)
    plan = cache_plan(
        instance=instance,
        tool=tool,
        inputs=inputs,
        merged=merged,
        credentials=readiness.credentials,
        control=cache_control or CacheControl(),
    )
    if plan.hit:
        return _answered_from_cache(instance, merged, readiness.account, plan)
    definition = instance.tool
    time_limit = min(definition.timeout_seconds, settings.TOOLEXEC_SYNC_TIMEOUT_SECONDS)
    if cache_lead(plan, seconds=time_limit, holder=uuid.uuid4().hex) is not None:
        collapsed = cache_wait(plan, deadline=time.monotonic() + time_limit)
        if collapsed is not None:
            return _answered_from_cache(instance, merged, readiness.account, collapsed)
    try:
        execution, outcome, duration_ms = _run(instance, tool, merged, readiness, time_limit)
        outcome.cache = cache_report_for(plan, tool=tool, status=outcome.status, output=outcome.output)
        execution_finish(
            execution=execution,
            outcome=outcome,
            duration_ms=duration_ms,
            account=readiness.account,
            cache_plan=plan,
        )
    finally:
        cache_release(plan)
    return execution, outcome


def _answered_from_cache(
    instance: ToolInstance, merged: dict[str, Any], account: Any, plan: CachePlan
) -> tuple[Execution, Outcome]:
    execution, outcome, _ = execution_record_hit(
        instance=instance, inputs=merged, mode=Mode.SYNC, account=account, plan=plan
    )
    return execution, outcome


def _run(
    instance: ToolInstance, tool: Tool, merged: dict[str, Any], readiness: Readiness, time_limit: int
) -> tuple[Execution, Outcome, int]:
    """Record the start, run the tool in its thread, and say how it went and in how many
    milliseconds (not yet recorded: the caller records the outcome)."""
    definition = instance.tool
    params = {"tool": definition.name, "instance_id": str(instance.pk)}
    try:
        resolved = credentials_resolve(credentials=readiness.credentials)
    except ToolexecError as exc:
        exc.params.update(params)
        raise
    with secrets_in_play(r.secret for r in resolved.values()):
        execution = execution_record_start(instance=instance, inputs=merged, mode=Mode.SYNC, account=readiness.account)
        ctx = run_context(execution=execution, resolved=resolved, seconds=time_limit)
        clock = time.monotonic()
        outcome = outcome_of(run_with_time_limit(tool, merged, ctx, time_limit), ctx, tool, params, resolved)
        duration_ms = int((time.monotonic() - clock) * 1000)
    return execution, outcome, duration_ms


def run_with_time_limit(tool: Tool, inputs: dict[str, Any], ctx: ExecutionContext, seconds: int) -> Any:
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
