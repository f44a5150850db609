"""Sync runs: the tool runs in the request, in a thread, so the request answers at the time
limit; the run is recorded before the tool starts and its outcome after (services.runs)."""

from __future__ import annotations

import contextvars
import threading
import time
from typing import Any

from django.conf import settings
from django.db import connections

from core.errors import ToolexecError
from core.redaction import secrets_in_play
from instances.models import ToolInstance
from instances.services.credentials import credentials_resolve
from instances.services.files import file_opener
from tools.errors import ToolTimeout
from tools.sdk import SYNC, ExecutionContext, Tool

from ..models import Execution, Mode
from .runs import Outcome, credential_refresher, execution_finish, execution_prepare, execution_record_start, outcome_of


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
            refresher=credential_refresher(resolved),
            files=file_opener(owner_id=instance.owner_id),
            deadline=time.monotonic() + time_limit,
            timeout_seconds=time_limit,
        )
        clock = time.monotonic()
        outcome = outcome_of(run_with_time_limit(tool, merged, ctx, time_limit), ctx, tool, params, resolved)
        duration_ms = int((time.monotonic() - clock) * 1000)
    execution_finish(execution=execution, outcome=outcome, duration_ms=duration_ms, account=readiness.account)
    return execution, outcome


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
