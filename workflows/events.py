"""The live channel of a workflow run: one Redis pub/sub channel per run, on which the engine
announces each step's change and the run's end, once the change has committed. A step's
progress is not repeated here: it is on its job's own channel (executions.events), which the
run's event stream follows for the steps in flight (workflows/streams.py)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.db import transaction
from redis.exceptions import RedisError

from executions import events as job_events

if TYPE_CHECKING:
    from .models import StepRun, WorkflowRun


def channel(run_id: Any) -> str:
    return f"toolexec:workflow-run:{run_id}:events"


def publish(run_id: Any, event: dict[str, Any]) -> None:
    """Tell live listeners; a Redis hiccup never fails the run, the database has the truth."""
    try:
        job_events.redis().publish(channel(run_id), json.dumps(event, default=str))
    except RedisError:
        pass


def step_event(row: StepRun | Any, **extra: Any) -> dict[str, Any]:
    return {
        "event": "step",
        "step_id": row.step_id,
        "iteration": row.iteration,
        "status": row.status,
        "attempt": row.attempt,
        **extra,
    }


def step_changed(run: WorkflowRun, row: StepRun) -> None:
    event = step_event(row)
    transaction.on_commit(lambda: publish(run.pk, event))


def step_handed(run_id: Any, row: StepRun, job_id: str) -> None:
    """Published after the commit already: the stream starts following the step's job."""
    publish(run_id, step_event(row, job_id=job_id))


def run_changed(run: WorkflowRun) -> None:
    event = {"event": "run", "run_id": str(run.pk), "status": run.status}
    transaction.on_commit(lambda: publish(run.pk, event))
