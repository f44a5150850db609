from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django.utils import timezone

from .models import Execution, Job


def execution_list(
    *,
    owner: AbstractBaseUser,
    instance_id: str | None = None,
    status: str | None = None,
    mode: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> QuerySet[Execution]:
    """The owner's executions, newest first, with the tool joined for its slug and name."""
    qs = Execution.objects.filter(owner=owner).select_related("tool")
    if instance_id:
        qs = qs.filter(instance_id=instance_id)
    if status:
        qs = qs.filter(status=status)
    if mode:
        qs = qs.filter(mode=mode)
    if created_after:
        qs = qs.filter(created_at__gte=created_after)
    if created_before:
        qs = qs.filter(created_at__lt=created_before)
    return qs


def utc_day(day: date) -> tuple[datetime, datetime | None]:
    """The UTC day as bounds [start, end) on created_at; the last day a date can name has no end."""
    start = datetime.combine(day, time.min, tzinfo=UTC)
    return start, start + timedelta(days=1) if day < date.max else None


def job_list(*, owner: AbstractBaseUser, instance_id: str) -> QuerySet[Job]:
    """The owner's jobs of one instance, newest first, with what the API shows joined."""
    return Job.objects.filter(owner=owner, instance_id=instance_id).select_related("execution__tool")


def job_state(*, job_id: str) -> dict[str, Any]:
    """The event a listener gets for the job's current state (the last one is terminal)."""
    job = Job.objects.select_related("execution").get(pk=job_id)
    return {"event": "state", **job_progress(job=job)}


def job_progress(*, job: Job) -> dict[str, Any]:
    eta = None
    if job.status == Job.Status.RUNNING and job.started_at and 0 < job.progress < 100:
        elapsed = (timezone.now() - job.started_at).total_seconds()
        eta = round(elapsed * (100 - job.progress) / job.progress, 1)
    return {
        "status": job.status,
        "progress": job.progress,
        "current_step": job.current_step,
        "steps_total": job.steps_total,
        "step_index": job.step_index,
        "eta_seconds": eta,
        "updated_at": job.updated_at.isoformat(),
    }
