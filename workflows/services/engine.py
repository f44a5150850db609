"""The engine that advances a workflow run (DESIGN.md §10). The database drives it, not RQ.

Every step runs as an ordinary async execution (``Execution.origin = "workflow"``). When one
ends, executions sends ``execution_ended`` inside the transaction that records the outcome;
the receiver locks the run, records the step's end (or its retry) and advances the run: the
steps that became ready get their rows, and the rows whose turn came have their executions
accepted (``step_accept``), all in that same transaction; their jobs go to RQ when it
commits. The reaper's round advances any run that went quiet (``runs_reap``), so a crash
between two steps never leaves a run stuck.

Everything that changes a run happens with its row locked (``select_for_update``), always the
run before its steps, so advancing twice does nothing twice: what the first did is what the
second reads.

A step row is PENDING until its turn comes (a fan-out's concurrency, a retry), QUEUED once its
execution is accepted (it points to it), RUNNING once a worker claimed its job, then SUCCEEDED,
FAILED, SKIPPED, UPSTREAM_FAILED, CANCELLED or REUSED.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from core.errors import ErrorCode, ToolexecError, envelope
from core.redaction import redact
from executions.models import Execution
from executions.services.enqueue import execution_enqueue
from instances.models import ToolInstance

from .. import events
from ..definition import Definition, ExpressionError, Step, definition_of, evaluate
from ..models import StepRun, WorkflowRun

logger = logging.getLogger(__name__)

ORIGIN = "workflow"  # Execution.origin of a step's run

Status = StepRun.Status

# What a step's execution ended as, as its step's status.
STEP_STATUS_FOR = {
    Execution.Status.COMPLETED: Status.SUCCEEDED,
    Execution.Status.FAILED: Status.FAILED,
    Execution.Status.TIMED_OUT: Status.FAILED,
    Execution.Status.CANCELLED: Status.CANCELLED,
}

NOT_STARTED, ACTIVE, SUCCEEDED, FAILED, SKIPPED = "not_started", "active", "succeeded", "failed", "skipped"

# The columns advancing reads of every row of the run: not inputs or outputs, which only the
# steps that reference them load (step_context).
ROW_FIELDS = ("id", "step_id", "iteration", "status", "items_total", "execution_id", "attempt", "error", "finished_at")


@dataclass(slots=True)
class Row:
    """A step row as advancing sees it: read as plain values, as a fan-out's thousand rows are
    read at every step's end (model instances would cost more than the query)."""

    id: Any
    step_id: str
    iteration: int
    status: str
    items_total: int | None
    execution_id: Any
    attempt: int
    error: dict[str, Any] | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: StepRun) -> Row:
        return cls(*(getattr(row, name) for name in ROW_FIELDS))


def lock_run(run_id: Any) -> WorkflowRun | None:
    """The run, locked until the transaction ends, with its version (not locked)."""
    return WorkflowRun.objects.select_related("version").select_for_update(of=("self",)).filter(pk=run_id).first()


def run_definition(run: WorkflowRun) -> Definition:
    return definition_of(run.version_id, run.version.definition)


@dataclass
class RunRows:
    """A run's step rows by step id, as advancing sees them."""

    by_step: dict[str, list[Row]]

    @classmethod
    def load(cls, run: WorkflowRun) -> RunRows:
        by_step: dict[str, list[Row]] = {}
        for values in StepRun.objects.filter(run=run).order_by("step_id", "iteration").values_list(*ROW_FIELDS):
            row = Row(*values)
            by_step.setdefault(row.step_id, []).append(row)
        return cls(by_step)

    def add(self, rows: list[StepRun]) -> None:
        for row in rows:
            self.by_step.setdefault(row.step_id, []).append(Row.of(row))

    def state(self, step_id: str) -> str:
        """A step as its dependents see it: not started, active, or ended as succeeded (every
        row SUCCEEDED or REUSED), skipped (every row SKIPPED) or failed (any other end)."""
        rows = self.by_step.get(step_id)
        if not rows:
            return NOT_STARTED
        statuses = {row.status for row in rows}
        if statuses & {Status.PENDING, Status.QUEUED, Status.RUNNING}:
            return ACTIVE
        if statuses <= {Status.SUCCEEDED, Status.REUSED}:
            return SUCCEEDED
        if statuses == {Status.SKIPPED}:
            return SKIPPED
        return FAILED

    def all_rows(self) -> list[Row]:
        return [row for rows in self.by_step.values() for row in rows]


def run_advance(run: WorkflowRun) -> None:
    """Take the run (locked by the caller, inside its transaction) as far as its steps' states
    allow: new rows for the steps that became ready, the turn of waiting rows (their
    executions accepted now, in this transaction: their jobs go to RQ when it commits), and
    the run's end once nothing is left to do."""
    if run.status in WorkflowRun.TERMINAL:
        return
    definition = run_definition(run)
    rows = RunRows.load(run)
    now = timezone.now()
    while True:
        failure = _first_failure(definition, rows)
        if run.status == WorkflowRun.Status.CANCELLING or failure is not None:
            _wind_down(run, definition, rows, failure, now)
            return
        created = _create_ready(run, definition, rows, now)
        if not any(row.status in StepRun.TERMINAL for row in created):
            break  # nothing ended at birth (skipped, empty fan-out, refused): no new state to act on
    if all(rows.state(step_id) not in (NOT_STARTED, ACTIVE) for step_id in definition.steps):
        _finish(run, definition, rows, now)
        return
    turns = _take_turns(definition, rows)
    if turns and run.status == WorkflowRun.Status.QUEUED:
        WorkflowRun.objects.filter(pk=run.pk).update(status=WorkflowRun.Status.RUNNING, started_at=now)
        run.status, run.started_at = WorkflowRun.Status.RUNNING, now
    if turns and _hand_over(run, definition, turns):
        run_advance(run)  # a step refused, or answered from the cache, at once: act on it


def _first_failure(definition: Definition, rows: RunRows) -> Row | None:
    """The first row (by when it ended) of a step that must fail the run: FAILED, or CANCELLED
    while the run was not being cancelled, in a step whose ``on_error`` is "fail"."""
    failed = [
        row
        for step_id, step in definition.steps.items()
        if step.on_error == "fail"
        for row in rows.by_step.get(step_id, ())
        if row.status in (Status.FAILED, Status.CANCELLED) and row.error
    ]
    return min(failed, key=lambda row: (row.finished_at or timezone.now(), row.step_id, row.iteration), default=None)


def _create_ready(run: WorkflowRun, definition: Definition, rows: RunRows, now: datetime) -> list[StepRun]:
    """Rows for each step not started whose dependencies all ended: SKIPPED (``when`` false,
    or a dependency skipped), one PENDING row, or one per ``for_each`` item."""
    created: list[StepRun] = []
    for step_id, step in definition.steps.items():
        if rows.state(step_id) != NOT_STARTED:
            continue
        states = [rows.state(dep) for dep in step.depends_on]
        if any(state in (NOT_STARTED, ACTIVE) for state in states):
            continue
        new = _rows_for(run, definition, step, rows, states, now)
        rows.add(new)
        created.extend(new)
    if created:
        StepRun.objects.bulk_create(created)
        for row in created:
            if row.status in StepRun.TERMINAL:
                events.step_changed(run, row)
    return created


def _rows_for(
    run: WorkflowRun, definition: Definition, step: Step, rows: RunRows, states: list[str], now: datetime
) -> list[StepRun]:
    def row(**fields: Any) -> StepRun:
        return StepRun(run=run, step_id=step.id, created_at=now, updated_at=now, **fields)

    def ended(status: str, **fields: Any) -> StepRun:
        return row(status=status, finished_at=now, **fields)

    if SKIPPED in states and step.on_upstream_skipped == "skip":
        return [ended(Status.SKIPPED)]
    context = step_context(run, definition, step.refs)
    try:
        if step.when is not None and not evaluate(step.when, context, path="when"):
            return [ended(Status.SKIPPED)]
        if step.for_each is None:
            return [row(status=Status.PENDING)]
        items = evaluate(step.for_each, context, path="for_each")
    except ExpressionError as exc:
        return [ended(Status.FAILED, error=step_error(step, ErrorCode.INPUT_INVALID, f"{exc.path}: {exc.message}"))]
    if not isinstance(items, list):
        reason = f"for_each must give a list; it gave {type(items).__name__}."
        return [ended(Status.FAILED, items_total=0, error=step_error(step, ErrorCode.INPUT_INVALID, reason))]
    limit = settings.TOOLEXEC_WORKFLOW_MAX_FANOUT
    if len(items) > limit:
        reason = f"for_each gave {len(items)} items; a step fans out to at most {limit}."
        return [ended(Status.FAILED, items_total=len(items), error=step_error(step, ErrorCode.INPUT_INVALID, reason))]
    if not items:
        return [ended(Status.SUCCEEDED, items_total=0, output=None)]
    return [row(status=Status.PENDING, iteration=i, item=item, items_total=len(items)) for i, item in enumerate(items)]


def step_error(step: Step, code: ErrorCode, detail: str) -> dict[str, Any]:
    """The envelope of a step that could not run (its expressions, its instance), in words."""
    body = envelope(code, {"detail": detail}, metadata={"step_id": step.id})
    body["error_message"] = f"Step {step.id!r}: {detail}"
    return body


def step_context(
    run: WorkflowRun, definition: Definition, refs: frozenset[str], row: StepRun | None = None
) -> dict[str, Any]:
    """What expressions see: the run's inputs, the steps they reference (``refs``: their
    output, status and error; a fan-out's output is the list of its iterations' outputs, in
    item order) and, for an iteration (``row``), its item and index. One query, only when they
    reference a step."""
    steps: dict[str, dict[str, Any]] = {}
    if refs:
        found: dict[str, list[dict[str, Any]]] = {}
        referenced = StepRun.objects.filter(run=run, step_id__in=refs).order_by("step_id", "iteration")
        for values in referenced.values("step_id", "status", "output", "error", "items_total"):
            found.setdefault(values["step_id"], []).append(values)
        for step_id, values in found.items():
            steps[step_id] = step_view(definition.steps[step_id], values)
    context: dict[str, Any] = {"input": run.inputs, "steps": steps}
    if row is not None and row.items_total is not None:
        context.update(item=row.item, index=row.iteration)
    return context


def step_view(step: Step, values: list[dict[str, Any]]) -> dict[str, Any]:
    """``steps.<id>`` as expressions see it, from its rows' values."""
    errors = [v["error"] for v in values if v["error"]]
    statuses = {v["status"] for v in values}
    status = values[0]["status"] if len(statuses) == 1 else (Status.FAILED if errors else Status.SUCCEEDED)
    if step.for_each is not None:
        output = [] if values[0]["items_total"] == 0 else [v["output"] for v in values]
    else:
        output = values[0]["output"]
    return {"output": output, "status": status, "error": errors[0] if errors else None}


def _take_turns(definition: Definition, rows: RunRows) -> list[Row]:
    """The PENDING rows whose turn has come: every one of a plain step, and of a fan-out as
    many as its ``concurrency`` leaves room for beside its rows in flight."""
    taken: list[Row] = []
    for step_id, step in definition.steps.items():
        step_rows = rows.by_step.get(step_id, ())
        pending = [row for row in step_rows if row.status == Status.PENDING]
        if not pending:
            continue
        in_flight = sum(row.status in StepRun.IN_FLIGHT for row in step_rows)
        room = (step.concurrency or 1) - in_flight if step.for_each is not None else len(pending)
        taken.extend(pending[: max(0, room)])
    return taken


def _hand_over(run: WorkflowRun, definition: Definition, turns: list[Row]) -> bool:
    """Accept the execution of each row whose turn came (``step_accept``), and mark it in
    ``turns`` as the row now is. True when one of them ended at once (refused, or answered
    from the cache): the run has more to do."""
    ended = False
    by_id = {row.id: row for row in turns}
    for row in StepRun.objects.filter(pk__in=list(by_id), status=Status.PENDING).order_by("iteration"):
        step_accept(run, definition, row)
        by_id[row.pk].status, by_id[row.pk].execution_id = row.status, row.execution_id
        ended = ended or row.status in StepRun.TERMINAL
    return ended


def _wind_down(run: WorkflowRun, definition: Definition, rows: RunRows, failure: Row | None, now: datetime) -> None:
    """A run being cancelled, or failing (fail fast): nothing new starts. Rows waiting for
    their turn (or a retry) end (CANCELLED, or UPSTREAM_FAILED), steps not started get a row
    saying so; those in flight finish; the run ends once none is left in flight."""
    cancelling = run.status == WorkflowRun.Status.CANCELLING
    end_as = Status.CANCELLED if cancelling else Status.UPSTREAM_FAILED
    waiting = [row for row in rows.all_rows() if row.status == Status.PENDING]
    if waiting:
        StepRun.objects.filter(pk__in=[row.id for row in waiting], status=Status.PENDING).update(
            status=end_as, finished_at=now, updated_at=now
        )
        for row in waiting:
            row.status = end_as
            events.step_changed(run, row)
    missing = [
        StepRun(run=run, step_id=step_id, status=end_as, created_at=now, updated_at=now, finished_at=now)
        for step_id in definition.steps
        if rows.state(step_id) == NOT_STARTED
    ]
    if missing:
        StepRun.objects.bulk_create(missing)
        rows.add(missing)
    if any(row.status in (Status.QUEUED, Status.RUNNING) for row in rows.all_rows()):
        return
    if cancelling:
        error = envelope(ErrorCode.CANCELLED, {"tool": "The workflow", "instance_id": ""})
        error["error_message"] = "The workflow run was cancelled."
        _end_run(run, WorkflowRun.Status.CANCELLED, now, error=error)
    else:
        assert failure is not None
        _end_run(run, WorkflowRun.Status.FAILED, now, error=run_error(failure))


def run_error(row: Row) -> dict[str, Any]:
    """The run's envelope from its first failed step's: which step, why, what to do."""
    error = dict(row.error or envelope(ErrorCode.TOOL_ERROR))
    where = f"Step {row.step_id!r}" + (f" (item {row.iteration})" if row.items_total else "")
    message = error.get("error_message", "")
    if not message.startswith(f"Step {row.step_id!r}"):
        error["error_message"] = f"{where} failed: {message}"
    error["metadata"] = {**error.get("metadata", {}), "step_id": row.step_id, "iteration": row.iteration}
    return error


def _finish(run: WorkflowRun, definition: Definition, rows: RunRows, now: datetime) -> None:
    """Every step ended and none failed the run: its output, from the definition's."""
    if definition.output is None:
        _end_run(run, WorkflowRun.Status.SUCCEEDED, now, output=None)
        return
    try:
        context = step_context(run, definition, definition.output_refs)
        output = evaluate(definition.output, context, path="output")
    except ExpressionError as exc:
        error = envelope(ErrorCode.INPUT_INVALID, {"detail": f"The workflow's output: {exc.path}: {exc.message}"})
        _end_run(run, WorkflowRun.Status.FAILED, now, error=error)
        return
    _end_run(run, WorkflowRun.Status.SUCCEEDED, now, output=output)


def _end_run(run: WorkflowRun, status: str, now: datetime, **fields: Any) -> None:
    WorkflowRun.objects.filter(pk=run.pk, status__in=WorkflowRun.IN_FLIGHT).update(
        status=status, finished_at=now, started_at=Coalesce("started_at", now), updated_at=now, **fields
    )
    run.status, run.finished_at = status, now
    for name, value in fields.items():
        setattr(run, name, value)
    events.run_changed(run)


# --- Handing steps to the execution service --------------------------------------------------


def step_accept(run: WorkflowRun, definition: Definition, row: StepRun) -> None:
    """A PENDING row's turn: its inputs resolved from its upstream outputs, and its execution
    accepted (the checks of any async run: readiness, inputs, credits, the result cache) inside
    the caller's transaction, the run locked; the job goes to RQ when it commits (due at the
    row's ``run_after``: a retry's backoff). The row is QUEUED with its execution, in one
    update, or ends FAILED with the refusal's envelope, or, answered from the cache, ends."""
    step = definition.steps[row.step_id]
    instance = (
        ToolInstance.objects.select_related("tool", "owner__credit_account")
        .filter(pk=step.instance_id, owner_id=run.owner_id)
        .first()
    )
    error = None
    try:
        if instance is None:
            raise ExpressionError("instance", "the instance it runs on no longer exists.")
        inputs = evaluate(step.inputs, step_context(run, definition, step.input_refs, row), path="inputs")
        accepted = execution_enqueue(instance=instance, inputs=inputs, origin=ORIGIN, run_after=row.run_after)
    except ExpressionError as exc:
        error = step_error(step, ErrorCode.INPUT_INVALID, f"{exc.path}: {exc.message}")
    except ToolexecError as exc:
        error = exc.envelope({"tool": instance.tool.name if instance else "", "instance_id": step.instance_id})
        error["metadata"] = {**error.get("metadata", {}), "step_id": step.id}
    now = timezone.now()
    if error is not None:
        _row_end(run, row, Status.FAILED, now, error=error)
        return
    execution = accepted.job.execution
    row.status, row.execution, row.inputs, row.attempt = Status.QUEUED, execution, redact(inputs), row.attempt + 1
    row.updated_at = now
    row.save(update_fields=["status", "execution", "inputs", "attempt", "updated_at"])
    events.step_changed(run, row, job_id=str(accepted.job.pk))
    if execution.status in Execution.TERMINAL:
        # Answered at once (a cached result): its end was sent before this row pointed to it.
        step_execution_end(run=run, row=row, execution=execution, credits=execution.credits_consumed, advance=False)


# --- A step's execution started or ended (executions.signals) --------------------------------


def step_execution_started(*, execution: Execution) -> None:
    """A worker claimed a step's job: the row shows RUNNING."""
    if execution.origin != ORIGIN:
        return
    now = timezone.now()
    StepRun.objects.filter(execution_id=execution.pk, status=Status.QUEUED).update(
        status=Status.RUNNING, started_at=Coalesce("started_at", now), updated_at=now
    )


def step_execution_ended(*, execution: Execution, credits: Decimal) -> None:
    """A step's execution reached its end (inside the transaction recording it): the run,
    locked, records the step's end, or its retry, and advances."""
    if execution.origin != ORIGIN:
        return
    found = StepRun.objects.filter(execution_id=execution.pk).values_list("pk", "run_id").first()
    if found is None:
        return  # ended while being accepted (a cached result): step_accept records it
    try:
        # A savepoint: whatever goes wrong in the run, the execution's own end commits (else its
        # job could never end), and the reaper advances the run later (runs_reap).
        with transaction.atomic():
            run = lock_run(found[1])
            row = StepRun.objects.filter(pk=found[0]).first()
            if run is None or row is None:
                return
            step_execution_end(run=run, row=row, execution=execution, credits=credits)
    except Exception:
        logger.exception("Run %s could not record the end of its step's execution %s", found[1], execution.pk)


def step_execution_end(
    *, run: WorkflowRun, row: StepRun, execution: Execution, credits: Decimal, advance: bool = True
) -> None:
    """Record the end of the row's execution (or, failed with attempts left, its retry), then,
    unless told not to (the caller advances), advance the run."""
    if row.status not in StepRun.IN_FLIGHT or row.execution_id != execution.pk:
        return
    now = timezone.now()
    if credits:
        WorkflowRun.objects.filter(pk=run.pk).update(credits_consumed=F("credits_consumed") + credits)
    error = _execution_error(execution)
    status = STEP_STATUS_FOR[execution.status]
    step = run_definition(run).steps[row.step_id]
    if status == Status.FAILED and run.status == WorkflowRun.Status.RUNNING and _retries(step, row, error):
        _row_retry(run, row, step, error, now)
    else:
        _row_end(run, row, status, now, output=execution.output_data, error=error)
    if advance:
        run_advance(run)


def _execution_error(execution: Execution) -> dict[str, Any] | None:
    if not execution.error_code:
        return None
    return {
        "error_code": execution.error_code,
        "error_message": execution.error_message,
        "metadata": execution.error_metadata,
    }


def _retries(step: Step, row: StepRun, error: dict[str, Any] | None) -> bool:
    code = (error or {}).get("error_code", "")
    return row.attempt < step.retry.max_attempts and code in step.retry.on


def _row_retry(run: WorkflowRun, row: StepRun, step: Step, error: dict[str, Any] | None, now: datetime) -> None:
    """Back to PENDING for its next attempt, as a new execution due after the step's backoff
    (the advance that follows hands it over)."""
    run_after = now + timedelta(seconds=step.retry.delay(row.attempt))
    StepRun.objects.filter(pk=row.pk).update(
        status=Status.PENDING, execution=None, run_after=run_after, error=error, updated_at=now
    )
    row.status, row.execution_id, row.run_after, row.error = Status.PENDING, None, run_after, error
    events.step_changed(run, row)


def _row_end(run: WorkflowRun, row: StepRun, status: str, now: datetime, **fields: Any) -> None:
    StepRun.objects.filter(pk=row.pk).update(status=status, finished_at=now, updated_at=now, **fields)
    row.status, row.finished_at = status, now
    for name, value in fields.items():
        setattr(row, name, value)
    events.step_changed(run, row)


# --- The reaper's part -----------------------------------------------------------------------

# Runs a round looks at, least recently changed first.
REAP_BATCH = 100


def runs_reap(*, now: datetime | None = None) -> dict[str, int]:
    """Runs in flight that have not changed for TOOLEXEC_QUEUE_RECOVERY_SECONDS: rows whose
    execution ended without the run hearing of it record that end, and the run is advanced
    (rows whose turn came are handed over). Doing it twice does nothing twice."""
    now = now or timezone.now()
    quiet_since = now - timedelta(seconds=settings.TOOLEXEC_QUEUE_RECOVERY_SECONDS)
    stale = WorkflowRun.objects.filter(status__in=WorkflowRun.IN_FLIGHT, updated_at__lt=quiet_since)
    counts = {"workflow_runs_advanced": 0}
    for run_id in stale.order_by("updated_at").values_list("pk", flat=True)[:REAP_BATCH]:
        try:
            run_reap(run_id=run_id)
        except DatabaseError:
            logger.exception("Run %s could not be advanced; the next round tries again", run_id)
            continue
        except Exception:
            # Not the database: advancing it again would fail again. It ends, saying so.
            logger.exception("Run %s cannot be advanced; it ends FAILED", run_id)
            run_fail_broken(run_id=run_id)
        counts["workflow_runs_advanced"] += 1
    return counts


def run_fail_broken(*, run_id: Any) -> None:
    """End a run the engine cannot advance (its steps in flight finish on their own)."""
    now = timezone.now()
    error = envelope(ErrorCode.INTERNAL_ERROR)
    error["error_message"] = "This workflow run could not be advanced because of an error on our side."
    WorkflowRun.objects.filter(pk=run_id, status__in=WorkflowRun.IN_FLIGHT).update(
        status=WorkflowRun.Status.FAILED, error=error, finished_at=now, updated_at=now
    )


def row_step(run: WorkflowRun, row: StepRun) -> Step:
    return run_definition(run).steps[row.step_id]


def run_reap(*, run_id: Any) -> None:
    with transaction.atomic():
        run = lock_run(run_id)
        if run is None or run.status in WorkflowRun.TERMINAL:
            return
        unheard = StepRun.objects.filter(
            run=run, status__in=StepRun.IN_FLIGHT, execution__status__in=Execution.TERMINAL
        ).select_related("execution")
        for row in unheard:
            assert row.execution is not None
            credits = row.execution.credits_consumed
            step_execution_end(run=run, row=row, execution=row.execution, credits=credits, advance=False)
        gone = StepRun.objects.filter(run=run, status__in=StepRun.IN_FLIGHT, execution__isnull=True)
        for row in gone:  # its execution was deleted (an operator): it will never end by itself
            detail = "its execution was deleted before it ended."
            _row_end(
                run,
                row,
                Status.FAILED,
                timezone.now(),
                error=step_error(row_step(run, row), ErrorCode.TOOL_ERROR, detail),
            )
        WorkflowRun.objects.filter(pk=run.pk).update(updated_at=timezone.now())
        run_advance(run)  # rows whose turn came and were not handed over (a crash) are now
