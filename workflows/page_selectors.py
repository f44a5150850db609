"""Reads for the workflow status pages (workflows/pages.py), each one query whatever the
number of workflows, runs or steps. Staff see everyone's; anyone else only their own."""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import OuterRef, QuerySet, Subquery

from instances.models import ToolInstance

from .models import Workflow, WorkflowRun

User = AbstractBaseUser | AnonymousUser


def workflows_visible(*, user: User) -> QuerySet[Workflow]:
    qs = Workflow.objects.select_related("current_version", "owner")
    return qs if user.is_staff else qs.filter(owner_id=user.pk)


def runs_visible(*, user: User) -> QuerySet[WorkflowRun]:
    """With the workflow and the version (its definition draws the graph) joined."""
    qs = WorkflowRun.objects.select_related("workflow", "version", "owner")
    return qs if user.is_staff else qs.filter(owner_id=user.pk)


def workflow_rows(*, user: User, limit: int = 200) -> list[Workflow]:
    """The workflows a person sees, newest first, each with its latest run's id, status and
    start (``latest_run_*``): one query, on the runs' ``(workflow, -created_at)`` index."""
    latest = WorkflowRun.objects.filter(workflow=OuterRef("pk")).order_by("-created_at")
    qs = (
        workflows_visible(user=user)
        .defer("current_version__definition", "description")
        .annotate(
            latest_run_id=Subquery(latest.values("pk")[:1]),
            latest_run_status=Subquery(latest.values("status")[:1]),
            latest_run_at=Subquery(latest.values("created_at")[:1]),
        )
        .order_by("-created_at", "-id")
    )
    return list(qs[:limit])


def workflow_recent_runs(*, workflow: Workflow, limit: int = 10) -> list[WorkflowRun]:
    """The workflow's latest runs (its page), on the ``(workflow, -created_at)`` index."""
    return list(
        WorkflowRun.objects.filter(workflow_id=workflow.pk)
        .select_related("version", "owner")
        .defer("version__definition", "inputs", "output", "error")
        .order_by("-created_at", "-id")[:limit]
    )


def step_instances(*, owner_id: int, instance_ids: Iterable[str]) -> dict[str, ToolInstance]:
    """The owner's instances that a version's steps name, with their tool, by id (as text)."""
    return {
        str(instance.pk): instance
        for instance in ToolInstance.objects.filter(owner_id=owner_id, pk__in=set(instance_ids))
        .select_related("tool")
        .only("id", "name", "status", "owner_id", "tool__id", "tool__name", "tool__slug")
    }
