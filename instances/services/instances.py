"""Instances: create, update, delete, status transitions, and the checks of their default inputs
and result-cache setting."""

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


def _check_cache(tool: ToolDefinition, enabled: bool | None, ttl_seconds: int | None) -> None:
    """Raise INPUT_INVALID naming ``cache.enabled`` / ``cache.ttl_seconds`` unless the setting
    suits the tool: caching only for a cacheable tool, a TTL of 1 s up to its ``cache_ttl_max``
    (None, for either, means the tool's default, or that it is not being changed)."""
    errors: dict[str, list[str]] = {}
    if enabled and not tool.cacheable:
        errors["cache.enabled"] = [f"{tool.name} is not cacheable: its runs always run the tool."]
    if ttl_seconds is not None and not 1 <= ttl_seconds <= tool.cache_ttl_max:
        errors["cache.ttl_seconds"] = [f"Must be from 1 to {tool.cache_ttl_max} seconds for {tool.name}."]
    if errors:
        words = "; ".join(f"{path}: {' '.join(problems)}" for path, problems in errors.items())
        raise InputInvalid(f"The result-cache setting is not valid: {words}", field_errors=errors)


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
    cache_enabled: bool | None = None,
    cache_ttl_seconds: int | None = None,
) -> ToolInstance:
    """A new instance: ACTIVE when the tool needs no credentials, otherwise DRAFT until mapped.
    Its result cache follows the tool's defaults unless ``cache_enabled`` / ``cache_ttl_seconds``
    say otherwise."""
    config = _check_config(tool, config or {})
    _check_cache(tool, cache_enabled, cache_ttl_seconds)
    status = ToolInstance.Status.DRAFT if tool.required_slots else ToolInstance.Status.ACTIVE
    credit_account_for(owner=owner)
    return ToolInstance.objects.create(
        owner=owner,
        tool=tool,
        name=name,
        workflow_id=workflow_id,
        config=config,
        status=status,
        cache_enabled=cache_enabled,
        cache_ttl_seconds=cache_ttl_seconds,
    )


def instance_update(*, instance: ToolInstance, **changes: Any) -> ToolInstance:
    """Change name, workflow_id, config or the result-cache setting (``cache_enabled``,
    ``cache_ttl_seconds``; None goes back to the tool's default). Status moves only through
    transitions. (A shorter TTL applies to the results the instance cached already: a cached
    result answers only while it is younger than the instance's TTL.)"""
    allowed = {"name", "workflow_id", "config", "cache_enabled", "cache_ttl_seconds"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"instance_update cannot change {sorted(unknown)}")
    if "config" in changes:
        _check_config(instance.tool, changes["config"])
    _check_cache(instance.tool, changes.get("cache_enabled"), changes.get("cache_ttl_seconds"))
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
