"""Instances: create, update, delete, status transitions, and the check of their default inputs."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from core.errors import ErrorCode, ToolexecError
from credits.services import credit_account_for
from tools.errors import InputInvalid
from tools.models import ToolDefinition
from tools.schemas import defaults_errors, nul_errors

from ..models import ToolInstance


class TransitionRefused(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


def _check_config(tool: ToolDefinition, config: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise InputInvalid(
            "config must be an object of default inputs.", field_errors={"config": ["Must be an object."]}
        )
    errors = nul_errors(config) or defaults_errors(tool.input_schema, config)
    if errors:
        raise InputInvalid(
            "Some default inputs in config are not valid for this tool.",
            field_errors={f"config.{path}" if path else "config": messages for path, messages in errors.items()},
        )
    return config


def instance_config_check(*, tool: ToolDefinition, config: Any) -> dict[str, Any]:
    """Raise INPUT_INVALID (with field errors) unless ``config`` holds valid default inputs of ``tool``."""
    return _check_config(tool, config)


@transaction.atomic
def instance_create(
    *,
    owner: AbstractBaseUser,
    tool: ToolDefinition,
    name: str,
    workflow_id: str = "",
    config: dict[str, Any] | None = None,
) -> ToolInstance:
    """A new instance: ACTIVE when the tool needs no credentials, otherwise DRAFT until mapped."""
    config = _check_config(tool, config or {})
    status = ToolInstance.Status.DRAFT if tool.required_slots else ToolInstance.Status.ACTIVE
    credit_account_for(owner=owner)
    return ToolInstance.objects.create(
        owner=owner, tool=tool, name=name, workflow_id=workflow_id, config=config, status=status
    )


def instance_update(*, instance: ToolInstance, **changes: Any) -> ToolInstance:
    """Change name, workflow_id or config (status moves only through transitions)."""
    allowed = {"name", "workflow_id", "config"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"instance_update cannot change {sorted(unknown)}")
    if "config" in changes:
        _check_config(instance.tool, changes["config"])
    for name, value in changes.items():
        setattr(instance, name, value)
    instance.save(update_fields=[*changes, "updated_at"])
    return instance


def instance_delete(*, instance: ToolInstance) -> None:
    """Delete the instance; its executions stay in the history, detached from it."""
    instance.delete()


_TRANSITION_WORDS = {
    ToolInstance.Status.ACTIVE: "activate",
    ToolInstance.Status.DISABLED: "disable",
    ToolInstance.Status.ERROR: "mark as failed",
}


def instance_transition(*, instance: ToolInstance, to: str, reason: str = "") -> ToolInstance:
    """Move ``instance`` to status ``to`` if the move is allowed, with one conditional update."""
    current = instance.status
    verb = _TRANSITION_WORDS.get(to, f"move to {to}")
    if current == to:
        raise TransitionRefused(f"This instance is already {current.lower()}.")
    if not instance.can_move_to(to):
        raise TransitionRefused(f"An instance that is {current.lower()} cannot {verb}.")
    if to == ToolInstance.Status.ACTIVE:
        unmapped = [s["name"] for s in instance.tool.required_slots if not instance.credential_mappings.get(s["name"])]
        if unmapped:
            raise TransitionRefused(
                f"This instance cannot be activated until its credentials are mapped: {', '.join(unmapped)}."
            )
    now = timezone.now()
    moved = ToolInstance.objects.filter(pk=instance.pk, status=current).update(
        status=to, status_reason=reason, updated_at=now
    )
    if not moved:
        instance.refresh_from_db(fields=["status"])
        raise TransitionRefused(f"The instance changed meanwhile; it is now {instance.status.lower()}.")
    instance.status, instance.status_reason, instance.updated_at = to, reason, now
    return instance
