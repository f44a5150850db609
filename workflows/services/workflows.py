"""Workflows and their versions: create, rename, a new version, delete. A definition is
validated (structure, then against the owner's instances) before anything is written."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from core.errors import ErrorCode, ToolexecError
from instances.models import ToolInstance
from tools.errors import InputInvalid

from ..definition import Definition, definition_check, definition_parse
from ..models import Workflow, WorkflowRun, WorkflowVersion


class WorkflowBusy(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


def definition_validate_for(*, owner_id: int, raw: Any) -> Definition:
    """The definition parsed and checked against the owner's instances (one query); raises
    INPUT_INVALID naming each field that fails."""
    definition = definition_parse(raw)
    ids = definition.instance_ids
    instances = {
        str(instance.pk): instance
        for instance in ToolInstance.objects.filter(owner_id=owner_id, pk__in=ids).select_related("tool")
    }
    definition_check(definition, instances=instances)
    return definition


def _key_taken(key: str) -> InputInvalid:
    return InputInvalid(
        f"You already have a workflow with the key {key!r}.", field_errors={"key": ["Already in use by your workflow."]}
    )


def workflow_create(
    *, owner: AbstractBaseUser, key: str, name: str, definition: Any, description: str = ""
) -> Workflow:
    """A workflow with its first version (number 1)."""
    definition_validate_for(owner_id=owner.pk, raw=definition)
    try:
        with transaction.atomic():
            workflow = Workflow.objects.create(owner=owner, key=key, name=name, description=description)
            _version_add(workflow, definition, actor=owner)
    except IntegrityError:
        if Workflow.objects.filter(owner=owner, key=key).exists():
            raise _key_taken(key) from None
        raise
    return workflow


def workflow_update(*, workflow: Workflow, **changes: Any) -> Workflow:
    """Change its key, name or description (its definition changes by a new version)."""
    fields = [name for name in ("key", "name", "description") if name in changes]
    if not fields:
        return workflow
    before = {name: getattr(workflow, name) for name in fields}
    for name in fields:
        setattr(workflow, name, changes[name])
    try:
        with transaction.atomic():
            workflow.save(update_fields=[*fields, "updated_at"])
    except IntegrityError:
        for name, value in before.items():  # the caller's object says what is stored
            setattr(workflow, name, value)
        raise _key_taken(changes["key"]) from None
    return workflow


def workflow_version_create(*, workflow: Workflow, definition: Any, actor: AbstractBaseUser | None) -> WorkflowVersion:
    """A new version (the next number), which new runs use from now on; runs in flight keep theirs."""
    definition_validate_for(owner_id=workflow.owner_id, raw=definition)
    with transaction.atomic():
        Workflow.objects.select_for_update().filter(pk=workflow.pk).first()  # numbers are taken in turn
        return _version_add(workflow, definition, actor=actor)


def _version_add(workflow: Workflow, definition: Any, *, actor: AbstractBaseUser | None) -> WorkflowVersion:
    last = workflow.versions.order_by("-number").values_list("number", flat=True).first() or 0
    version = WorkflowVersion.objects.create(
        workflow=workflow, number=last + 1, definition=definition, created_by=actor
    )
    Workflow.objects.filter(pk=workflow.pk).update(current_version=version)
    workflow.current_version = version
    return version


def workflow_delete(*, workflow: Workflow) -> None:
    """Delete it with its versions and runs; refused while one of its runs is in flight."""
    with transaction.atomic():
        if WorkflowRun.objects.filter(workflow=workflow, status__in=WorkflowRun.IN_FLIGHT).exists():
            raise WorkflowBusy("A run of this workflow is still in flight; cancel it first, then delete the workflow.")
        WorkflowRun.objects.filter(workflow=workflow).delete()  # versions are PROTECTed by their runs
        workflow.delete()
