"""Is a workflow ready to run? Every step's instance through the readiness checks of any
async run (tool, instance, credentials, mode, credits), and the owner's balance against an
estimate of the whole run's cost; in words, with what to do, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from core.errors import ErrorCode, action_items, envelope
from credits.models import CreditAccount
from credits.services import credit_account_for
from instances.models import ToolInstance
from instances.readiness import Readiness, readiness_many
from tools.sdk import ASYNC

from ..definition import Definition, definition_of
from ..models import Workflow, WorkflowVersion


@dataclass
class StepReadiness:
    step_id: str
    instance_id: str
    readiness: Readiness | None  # None: no instance of the owner's has this id any more

    @property
    def is_ready(self) -> bool:
        return self.readiness is not None and self.readiness.is_ready

    def first_problem(self) -> tuple[str, str, list[dict[str, str]]]:
        """(error code, message, action items) of its most important problem."""
        if self.readiness is None:
            message = "The instance this step runs on no longer exists; save a version that names another."
            return ErrorCode.INPUT_INVALID.value, message, []
        first = self.readiness.failures[0]
        return first.error_code, first.message, self.readiness.action_items

    def as_dict(self) -> dict[str, Any]:
        if self.readiness is None:
            code, message, _ = self.first_problem()
            checks = [{"name": "instance", "passed": False, "message": message, "error_code": code, "action_items": []}]
            return {"step_id": self.step_id, "instance_id": self.instance_id, "is_ready": False, "checks": checks}
        return {
            "step_id": self.step_id,
            "instance_id": self.instance_id,
            "is_ready": self.readiness.is_ready,
            "checks": [check.as_dict() for check in self.readiness.checks],
        }


@dataclass
class WorkflowReadiness:
    steps: list[StepReadiness]
    account: CreditAccount
    estimate: Decimal  # the credits the run is expected to cost (a fan-out over an expression counts once)
    skipped: frozenset[str] = field(default_factory=frozenset)  # steps a retry reuses: not checked

    @property
    def credits_covered(self) -> bool:
        return self.account.is_unlimited or self.account.balance >= self.estimate

    @property
    def is_ready(self) -> bool:
        return self.credits_covered and all(step.is_ready for step in self.steps)

    def problem(self) -> tuple[str, str, list[dict[str, str]], dict[str, Any]]:
        """(code, message, action items, metadata) of the most important problem: the first
        step (in run order) that is not ready, else the balance."""
        for step in self.steps:
            if not step.is_ready:
                code, message, items = step.first_problem()
                return code, f"Step {step.step_id!r}: {message}", items, {"step_id": step.step_id}
        params = {"tool": "this workflow", "needed": self.estimate, "balance": self.account.balance}
        message = envelope(ErrorCode.INSUFFICIENT_CREDITS, params)["error_message"]
        return ErrorCode.INSUFFICIENT_CREDITS.value, message, action_items(ErrorCode.INSUFFICIENT_CREDITS, params), {}

    def as_dict(self) -> dict[str, Any]:
        ready = self.is_ready
        code, message, items, _ = (None, None, [], {}) if ready else self.problem()
        return {
            "is_ready": ready,
            "error_code": code,
            "error_message": message,
            "action_items": items if not ready else [],
            "credits": {
                "estimate": float(self.estimate),
                "balance": None if self.account.is_unlimited else float(self.account.balance),
                "covered": self.credits_covered,
            },
            "checks": [step.as_dict() for step in self.steps],
        }

    def refusal(self) -> dict[str, Any]:
        """The envelope that refuses to start a run on this readiness (answered with 409, as
        any conflict with the state of what the run needs): the most important problem, and
        in ``metadata.checks`` every step that is not ready."""
        code, message, items, metadata = self.problem()
        body = envelope(code, {"tool": "this workflow", "instance_id": ""}, items=items, metadata=metadata)
        body["error_message"] = message
        body["metadata"]["checks"] = [step.as_dict() for step in self.steps if not step.is_ready]
        return body


def workflow_readiness(
    *, workflow: Workflow, version: WorkflowVersion | None = None, skip: frozenset[str] = frozenset()
) -> WorkflowReadiness:
    """Readiness of every step of ``version`` (the current one by default) but ``skip``:
    the steps' instances and their credentials in two queries, whatever the number of steps."""
    version = version or workflow.current_version
    assert version is not None
    definition = definition_of(version.pk, version.definition)
    steps = [step for step_id, step in definition.steps.items() if step_id not in skip]
    instances = {
        str(instance.pk): instance
        for instance in ToolInstance.objects.filter(
            owner_id=workflow.owner_id, pk__in={step.instance_id for step in steps}
        ).select_related("tool", "owner__credit_account")
    }
    by_instance = readiness_many(list(instances.values()), mode=ASYNC)
    account = next((r.account for r in by_instance.values()), None) or credit_account_for(owner=workflow.owner)
    return WorkflowReadiness(
        steps=[StepReadiness(step.id, step.instance_id, by_instance.get(step.instance_id)) for step in steps],
        account=account,
        estimate=_estimate(definition, instances, steps),
        skipped=skip,
    )


def _estimate(definition: Definition, instances: dict[str, ToolInstance], steps: list[Any]) -> Decimal:
    """Each step's minimum price (its tool's base credits), times its items for a fan-out over
    a literal list; a fan-out over an expression is counted once, as its size is not known yet."""
    total = Decimal("0")
    for step in steps:
        instance = instances.get(step.instance_id)
        if instance is None:
            continue
        times = len(step.for_each) if isinstance(step.for_each, list) else 1
        total += instance.tool.base_credits * times
    return total
