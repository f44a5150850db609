"""The live channel of a workflow run: one Redis pub/sub channel per run, on which the engine
announces each step's change and the run's end, once the change has committed. A step's
progress is not repeated here: it is on its job's own channel (executions.events), which the
run's event stream follows for the steps in flight (workflows/streams.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db import transaction

from executions import events as job_events
from executions.events import Topic

if TYPE_CHECKING:
    from .models import StepRun, WorkflowRun


def channel(run_id: Any) -> str:
    return Topic.run(run_id).channel


def publish(run_id: Any, event: dict[str, Any]) -> None:
    """Tell live listeners (numbered and kept, as a job's events are: executions/events.py); a
    Redis hiccup never fails the run, the database has the truth."""
    job_events.publish_to(Topic.run(run_id), event)


def step_event(row: StepRun | Any, **extra: Any) -> dict[str, Any]:
    return {
        "event": "step",
        "step_id": row.step_id,
        "iteration": row.iteration,
        "status": row.status,
        "attempt": row.attempt,
        **extra,
    }


def step_changed(run: WorkflowRun, row: StepRun | Any, **extra: Any) -> None:
    """Announce the row's change once it commits (``job_id``: its job, for a stream to follow)."""
    event = step_event(row, **extra)
    transaction.on_commit(lambda: publish(run.pk, event))


def run_changed(run: WorkflowRun) -> None:
    event = {"event": "run", "run_id": str(run.pk), "status": run.status}
    transaction.on_commit(lambda: publish(run.pk, event))
