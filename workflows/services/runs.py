"""What people do to workflow runs: start one (after the whole workflow's readiness), cancel
one, and retry one from a failure, reusing the steps that succeeded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from redis.exceptions import RedisError

from core.errors import ErrorCode, ToolexecError
from executions.models import Job
from executions.services.control import JobFinished, job_cancel
from executions.services.enqueue import request_fingerprint
from tools.errors import IdempotencyConflict, InputInvalid
from tools.schemas import errors_by_field, nul_errors, summary

from ..definition import Definition, definition_of
from ..models import StepRun, Workflow, WorkflowRun
from .engine import lock_run, run_advance
from .readiness import WorkflowReadiness, workflow_readiness


class WorkflowNotReady(ToolexecError):
    """A step's instance (or the balance) is not ready: nothing runs. Answered 409 with the
    most important problem, like an instance's refusal, and every step that is not ready."""

    status = 409

    def __init__(self, readiness: WorkflowReadiness) -> None:
        self.readiness = readiness
        body = readiness.refusal()
        super().__init__(body["error_message"])
        self.code = ErrorCode(body["error_code"])
        self.body = body

    def envelope(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.body


class RunFinished(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


class RunNotRetryable(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


@dataclass
class Started:
    run: WorkflowRun
    replayed: bool = False


def run_inputs_check(definition: Definition, inputs: Any) -> dict[str, Any]:
    if not isinstance(inputs, dict):
        raise InputInvalid(
            "The request body must be a JSON object of the workflow's inputs.",
            field_errors={"(root)": ["Must be an object."]},
        )
    errors = nul_errors(inputs) or errors_by_field(definition.inputs_schema or {"type": "object"}, inputs)
    if errors:
        raise InputInvalid(summary(errors), field_errors=errors)
    return inputs


def run_start(*, workflow: Workflow, inputs: Any, idempotency_key: str = "") -> Started:
    """Start a run of the workflow's current version: its inputs checked against the
    definition's ``inputs`` schema, every step's readiness and the balance checked (refused
    with WorkflowNotReady, running nothing), then the run and its first steps' rows in one
    transaction; the steps are handed to the execution service when it commits.

    The same ``idempotency_key`` and inputs from the same owner within
    TOOLEXEC_IDEMPOTENCY_HOURS give back the first run; other inputs are refused."""
    version = workflow.current_version
    assert version is not None
    definition = definition_of(version.pk, version.definition)
    run_inputs_check(definition, inputs)
    fingerprint = request_fingerprint({"workflow": str(workflow.pk), "inputs": inputs}) if idempotency_key else ""
    if idempotency_key:
        replay = _idempotent_replay(owner_id=workflow.owner_id, key=idempotency_key, fingerprint=fingerprint)
        if replay is not None:
            return Started(replay, replayed=True)
    readiness = workflow_readiness(workflow=workflow, version=version)
    if not readiness.is_ready:
        raise WorkflowNotReady(readiness)
    run = WorkflowRun(
        workflow=workflow,
        version=version,
        owner_id=workflow.owner_id,
        inputs=inputs,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
    )
    try:
        with transaction.atomic():
            run.save(force_insert=True)
            run_advance(run)
    except IntegrityError:
        if not idempotency_key:
            raise
        replay = _idempotent_replay(owner_id=workflow.owner_id, key=idempotency_key, fingerprint=fingerprint)
        if replay is None:
            raise
        return Started(replay, replayed=True)
    return Started(run)


def _idempotent_replay(*, owner_id: int, key: str, fingerprint: str) -> WorkflowRun | None:
    run = WorkflowRun.objects.filter(owner_id=owner_id, idempotency_key=key).first()
    if run is None:
        return None
    if run.created_at < timezone.now() - timedelta(hours=settings.TOOLEXEC_IDEMPOTENCY_HOURS):
        WorkflowRun.objects.filter(pk=run.pk, idempotency_key=key).update(idempotency_key="")
        return None
    if run.request_fingerprint != fingerprint:
        raise IdempotencyConflict()
    return run


def run_cancel(*, run: WorkflowRun) -> WorkflowRun:
    """CANCELLING: nothing new starts, steps waiting for their turn end CANCELLED, and every
    step's job in flight is cancelled (the job cancel of any async run); the run ends
    CANCELLED once they all have. Refused once the run has ended. Raises RedisError, once every
    job was tried, when Redis could not be told of one (the reaper stops it later)."""
    with transaction.atomic():
        locked = lock_run(run.pk)
        assert locked is not None
        if locked.status in WorkflowRun.TERMINAL:
            raise RunFinished(f"This run has already ended ({locked.status}); there is nothing to cancel.")
        if locked.status != WorkflowRun.Status.CANCELLING:
            WorkflowRun.objects.filter(pk=locked.pk).update(status=WorkflowRun.Status.CANCELLING)
            locked.status = WorkflowRun.Status.CANCELLING
        run_advance(locked)  # ends what waits; ends the run at once when nothing is in flight
        job_ids = list(
            Job.objects.filter(
                execution__workflow_steps__run=locked,
                execution__workflow_steps__status__in=StepRun.IN_FLIGHT,
                status__in=(Job.Status.QUEUED, Job.Status.RUNNING),
            ).values_list("pk", flat=True)
        )
    unreachable: RedisError | None = None
    for job in Job.objects.filter(pk__in=job_ids).select_related("execution__tool"):
        try:
            job_cancel(job=job)  # its end reaches the run through the engine
        except JobFinished:
            pass  # it ended meanwhile, and the run heard of it
        except RedisError as exc:
            # Recorded; the reaper stops it once Redis answers. The other steps go on being cancelled.
            unreachable = exc
    if unreachable is not None:
        raise unreachable
    return WorkflowRun.objects.get(pk=run.pk)


def run_retry(*, run: WorkflowRun, from_step: str | None = None) -> WorkflowRun:
    """A new run of the same version and inputs (``retry_of``) in which every step that
    succeeded before is REUSED with its recorded output and not run again, except ``from_step``
    and every step downstream of it, and every step downstream of one that did not succeed.
    Of a fan-out that partly succeeded, the items that succeeded are reused when its upstream
    steps all were. Checked for readiness like a new run (the reused steps excepted)."""
    if run.status not in WorkflowRun.TERMINAL:
        raise RunNotRetryable("This run is still in flight; wait for it to end, or cancel it, then retry.")
    definition = definition_of(run.version_id, run.version.definition)
    if from_step is not None and from_step not in definition.steps:
        raise InputInvalid(
            f"This workflow's version has no step {from_step!r}.",
            field_errors={"from_step": [f"Must be one of: {', '.join(definition.steps)}."]},
        )
    if run.status == WorkflowRun.Status.SUCCEEDED and from_step is None:
        raise RunNotRetryable("This run succeeded; name the step to run again from (from_step).")
    old: dict[str, list[StepRun]] = {}
    for row in StepRun.objects.filter(run=run).order_by("step_id", "iteration"):
        old.setdefault(row.step_id, []).append(row)
    rerun = {from_step, *definition.descendants(from_step)} if from_step else set()
    reused: set[str] = set()
    for step_id, step in definition.steps.items():  # in run order: upstream first
        rows = old.get(step_id, [])
        upstream_reused = all(dep in reused for dep in step.depends_on)
        if step_id not in rerun and upstream_reused and rows and all(r.status in _REUSABLE for r in rows):
            reused.add(step_id)
    workflow = run.workflow
    readiness = workflow_readiness(workflow=workflow, version=run.version, skip=frozenset(reused))
    if not readiness.is_ready:
        raise WorkflowNotReady(readiness)
    now = timezone.now()
    with transaction.atomic():
        retry = WorkflowRun.objects.create(
            workflow=workflow,
            version=run.version,
            owner_id=run.owner_id,
            inputs=run.inputs,
            retry_of=run,
            retry_from_step=from_step or "",
        )
        copies = [_reused(retry, row, now) for step_id in reused for row in old[step_id]]
        for step_id, step in definition.steps.items():
            rows = old.get(step_id, [])
            partly = step.for_each is not None and step_id not in reused and step_id not in rerun
            if partly and rows and all(dep in reused for dep in step.depends_on) and rows[0].items_total:
                # The same items (its upstream is reused): keep what succeeded, run the rest.
                copies += [
                    _reused(retry, row, now)
                    if row.status in _REUSABLE
                    else StepRun(
                        run=retry,
                        step_id=step_id,
                        iteration=row.iteration,
                        item=row.item,
                        items_total=row.items_total,
                        status=StepRun.Status.PENDING,
                        created_at=now,
                    )
                    for row in rows
                ]
        StepRun.objects.bulk_create(copies)
        run_advance(retry)
    return retry


_REUSABLE = (StepRun.Status.SUCCEEDED, StepRun.Status.REUSED)


def _reused(run: WorkflowRun, row: StepRun, now: Any) -> StepRun:
    return StepRun(
        run=run,
        step_id=row.step_id,
        iteration=row.iteration,
        item=row.item,
        items_total=row.items_total,
        status=StepRun.Status.REUSED,
        execution_id=row.execution_id,
        attempt=row.attempt,
        inputs=row.inputs,
        output=row.output,
        created_at=now,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
