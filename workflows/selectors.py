"""Reads of workflows and runs, each in a constant number of queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from executions.models import Job

from .models import StepRun, Workflow, WorkflowRun


def workflow_list(*, owner: AbstractBaseUser) -> QuerySet[Workflow]:
    return Workflow.objects.filter(owner=owner).select_related("current_version")


def run_list(
    *,
    owner: AbstractBaseUser,
    workflow_id: str | None = None,
    status: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> QuerySet[WorkflowRun]:
    """The owner's runs, newest first, with their version's number joined."""
    qs = WorkflowRun.objects.filter(owner=owner).select_related("version").defer("version__definition")
    if workflow_id:
        qs = qs.filter(workflow_id=workflow_id)
    if status:
        qs = qs.filter(status=status)
    if created_after:
        qs = qs.filter(created_at__gte=created_after)
    if created_before:
        qs = qs.filter(created_at__lt=created_before)
    return qs


def run_steps(*, run: WorkflowRun) -> list[StepRun]:
    """The run's step rows in run order (as created; a fan-out's in item order), each with its
    execution's job for its progress: one query."""
    return list(
        StepRun.objects.filter(run=run)
        .select_related("execution__job")
        .only(
            *("id", "step_id", "iteration", "items_total", "status", "attempt", "output", "error", "execution_id"),
            *("started_at", "finished_at", "created_at", "run_after"),
            *("execution__id", "execution__job__id", "execution__job__progress", "execution__job__current_step"),
            *("execution__job__status",),
        )
        .order_by("created_at", "iteration")
    )


def step_detail(row: StepRun) -> dict[str, Any]:
    job: Job | None = getattr(row.execution, "job", None) if row.execution_id else None
    in_flight = row.status in StepRun.IN_FLIGHT
    return {
        "step_id": row.step_id,
        "iteration": row.iteration,
        "items_total": row.items_total,
        "status": row.status,
        "attempt": row.attempt,
        "execution_id": str(row.execution_id) if row.execution_id else None,
        "job_id": str(job.pk) if job is not None else None,
        "progress": _progress(row, job),
        "current_step": job.current_step if job is not None and in_flight else "",
        "run_after": row.run_after if in_flight else None,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "output": row.output,
        "error": row.error,
    }


def _progress(row: StepRun, job: Job | None) -> int:
    """Its job's while in flight; 100 once it succeeded (or was reused); else how far it got."""
    if row.status in (StepRun.Status.SUCCEEDED, StepRun.Status.REUSED):
        return 100
    return job.progress if job is not None else 0


def run_detail(*, run: WorkflowRun) -> dict[str, Any]:
    """GET /workflow-runs/{id}: the run and every step row. Two queries (the run, given with its
    version, and its steps) whatever the number of steps."""
    return {
        "run_id": str(run.pk),
        "workflow_id": str(run.workflow_id),
        "version": run.version.number,
        "status": run.status,
        "inputs": run.inputs,
        "output": run.output,
        "error": run.error,
        "credits_consumed": float(run.credits_consumed),  # a number, as everywhere in the API
        "retry_of": str(run.retry_of_id) if run.retry_of_id else None,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "steps": [step_detail(row) for row in run_steps(run=run)],
    }
