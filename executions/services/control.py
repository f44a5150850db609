"""What people do to a job: cancel it, or run a failed one again as a new run; and the stop
of a cancelled job that did not stop by itself."""

from __future__ import annotations

import logging
from typing import Any

from django.utils import timezone
from redis.exceptions import RedisError
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError

from core.errors import ErrorCode, ToolexecError, envelope
from credits.models import CreditAccount
from instances.crypto import unseal
from instances.models import ToolInstance

from .. import events
from ..models import Execution, Job
from ..selectors import job_state
from .cache import CacheControl
from .enqueue import execution_enqueue
from .jobs import job_cache_outcome, job_lead_end
from .queueing import rq_cancel
from .runs import Outcome, execution_finish

logger = logging.getLogger(__name__)


class JobFinished(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


def job_cancel(*, job: Job) -> Job:
    """A queued job never starts (the identical jobs that waited for it run themselves); a
    running one stops at its next check, or is stopped by the reaper through RQ's stop-job
    command after TOOLEXEC_CANCEL_GRACE_SECONDS."""
    if job.status in Job.TERMINAL:
        raise JobFinished(f"This job has already ended ({job.status}); there is nothing to cancel.")
    now = timezone.now()
    params = {"tool": job.execution.tool.name, "instance_id": str(job.instance_id or "")}
    if job.status == Job.Status.QUEUED:
        cancelled = Outcome(Execution.Status.CANCELLED, error=envelope(ErrorCode.CANCELLED, params))
        plan = job_cache_outcome(job, cancelled)
        account = CreditAccount.objects.filter(owner_id=job.owner_id).first()
        if execution_finish(
            execution=job.execution,
            outcome=cancelled,
            duration_ms=0,
            account=account,
            job=job,
            job_from=(Job.Status.QUEUED,),
        ):
            Job.objects.filter(pk=job.pk).update(cancel_requested_at=now)
            rq_cancel(job.rq_job_id)
            events.publish(str(job.pk), job_state(job_id=str(job.pk)))
            job_lead_end(job, plan)
            return Job.objects.get(pk=job.pk)
        job.refresh_from_db()  # it started meanwhile: cancel it as a running job
        if job.status in Job.TERMINAL:
            raise JobFinished(f"This job has already ended ({job.status}); there is nothing to cancel.")
    Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, cancel_requested_at__isnull=True).update(
        cancel_requested_at=now, current_step="Cancelling", updated_at=now
    )
    events.cancel_flag_set(str(job.pk))
    events.publish(str(job.pk), {"event": "state", "status": Job.Status.RUNNING, "current_step": "Cancelling"})
    job.refresh_from_db()
    return job


class JobNotRetryable(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


RETRYABLE_AS_NEW = frozenset({Job.Status.FAILED, Job.Status.CANCELLED, Job.Status.TIMED_OUT})


def job_retry_as_new(*, job: Job, actor: Any = None) -> Job:
    """Run a failed, cancelled or timed-out job's inputs again as a new Execution and Job,
    through the same checks and enqueue path as execute-async. The old records stay as they are.
    It runs even when an identical run's result is cached (Cache-Control: no-cache), and its
    result replaces that entry: asked to run again, it does."""
    if job.status not in RETRYABLE_AS_NEW:
        raise JobNotRetryable(f"Only a failed, cancelled or timed-out job can be retried; this one is {job.status}.")
    if job.instance_id is None:
        raise JobNotRetryable("The instance this job ran on was deleted; there is nothing to run it on.")
    if not job.sealed_inputs:
        raise JobNotRetryable("This job's inputs are no longer kept, so it cannot be run again.")
    inputs = unseal(job.sealed_inputs, row_id=str(job.pk), owner_id=job.owner_id)
    instance = ToolInstance.objects.select_related("tool", "owner__credit_account").get(pk=job.instance_id)
    accepted = execution_enqueue(instance=instance, inputs=inputs, cache_control=CacheControl(no_cache=True))
    logger.info("Job %s retried as job %s by %s", job.pk, accepted.job.pk, getattr(actor, "pk", None))
    return accepted.job


def job_stop(*, job: Job) -> bool:
    """End a running job CANCELLED now and stop the process running it (it did not stop by
    itself); the identical jobs that waited for it run themselves."""
    params = {"tool": job.execution.tool.name, "instance_id": str(job.instance_id or "")}
    cancelled = Outcome(Execution.Status.CANCELLED, error=envelope(ErrorCode.CANCELLED, params))
    plan = job_cache_outcome(job, cancelled)
    duration = int((timezone.now() - job.started_at).total_seconds() * 1000) if job.started_at else 0
    account = CreditAccount.objects.filter(owner_id=job.owner_id).first()
    if not execution_finish(execution=job.execution, outcome=cancelled, duration_ms=duration, account=account, job=job):
        return False
    job_lead_end(job, plan)
    try:
        send_stop_job_command(events.redis(), job.rq_job_id)
    except (NoSuchJobError, InvalidJobOperation, RedisError):
        pass  # the process is already done with it
    events.publish(str(job.pk), job_state(job_id=str(job.pk)))
    return True
