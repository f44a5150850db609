"""The workflows app's receivers of executions' signals (connected in WorkflowsConfig.ready)."""

from typing import Any

from django.dispatch import receiver

from executions.models import Execution, Job
from executions.signals import execution_ended, execution_started, maintenance_round

from .services.engine import runs_reap, step_execution_ended, step_execution_started


@receiver(execution_started, sender=Execution, dispatch_uid="workflows.step_started")
def step_started(*, execution: Execution, **kwargs: Any) -> None:
    step_execution_started(execution=execution)


@receiver(execution_ended, sender=Execution, dispatch_uid="workflows.step_ended")
def step_ended(*, execution: Execution, outcome: Any, **kwargs: Any) -> None:
    step_execution_ended(execution=execution, credits=outcome.credits)


@receiver(maintenance_round, sender=Job, dispatch_uid="workflows.reap")
def reap(*, now: Any, **kwargs: Any) -> dict[str, int]:
    return runs_reap(now=now)
