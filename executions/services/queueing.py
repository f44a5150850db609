"""Handing jobs to RQ and taking them back. RQ carries a job's id only; PostgreSQL is the record."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone
from redis.exceptions import RedisError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob

from .. import events

RUN = "executions.jobs.run"  # the RQ function of every toolexec job


def rq_enqueue(*, job_id: str, rq_job_id: str, timeout: int, run_after: datetime | None = None) -> None:
    """Hand a job to RQ under ``rq_job_id`` (its arguments: the job's id only): to run as soon as
    a worker is free, or, with a ``run_after`` still to come, then."""
    options = {
        "job_id": rq_job_id,
        "description": f"toolexec job {job_id}",
        "result_ttl": 600,
        "failure_ttl": 7 * 24 * 3600,
    }
    if run_after is not None and run_after > timezone.now():
        # RQ's schedule counts whole seconds (it truncates): rounded up, a job never runs early.
        due = run_after.replace(microsecond=0) + timedelta(seconds=1) if run_after.microsecond else run_after
        events.queue().enqueue_at(due, RUN, job_id, job_timeout=timeout, **options)
    else:
        events.queue().enqueue_call(RUN, args=(job_id,), timeout=timeout, **options)


def rq_cancel(rq_job_id: str) -> None:
    try:
        RQJob.fetch(rq_job_id, connection=events.redis()).cancel()
    except (NoSuchJobError, InvalidJobOperation, RedisError):
        pass  # nothing queued any more; our row already says CANCELLED


def rq_forget(rq_job_id: str) -> None:
    """Delete what is left of an RQ job that will never run (a finished or failed run's hash,
    which expires, and its place in a registry): nothing of it may outlive the job queued again
    under its id."""
    try:
        RQJob.fetch(rq_job_id, connection=events.redis()).delete()
    except NoSuchJobError:
        pass  # it expired meanwhile
