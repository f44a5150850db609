"""Keeping job states honest when a worker, its process or Redis fails: the reaper, lost
jobs, jobs the queue lost, heartbeats, timeouts the worker enforces."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from redis.exceptions import RedisError
from rq.job import Job as RQJob
from rq.job import JobStatus

from core.errors import ErrorCode, envelope
from credits.models import CreditAccount
from tools import registry
from tools.errors import ToolTimeout

from .. import events
from ..models import Execution, Job
from ..selectors import job_state
from ..signals import maintenance_round
from .cache import cache_purge_expired
from .control import job_stop
from .jobs import JOB_TO_RUN, job_cache_outcome, job_end, job_lead_end, job_retry
from .queueing import rq_enqueue, rq_forget
from .runs import Outcome, execution_finish

logger = logging.getLogger(__name__)


# Queued jobs the reaper checks against Redis in a round, oldest first: one pipeline of five
# commands each. After a loss the next round goes on with the next ones (those queued again
# are young again); otherwise the oldest are the next a worker takes, so a job lost behind a
# backlog is found no later than its turn would have come.
QUEUE_RECOVERY_BATCH = 100


def job_lost(*, job: Job, reason: str) -> bool:
    """A RUNNING job whose worker is gone: retried if its tool allows, else FAILED (WORKER_LOST),
    and the identical jobs that waited for it run themselves."""
    definition = job.execution.tool
    tool_class = registry.get_tool(definition.slug)
    if (
        tool_class is not None
        and tool_class.idempotent
        and ErrorCode.WORKER_LOST in tool_class.retry_on
        and job.attempts < job.max_attempts
    ):
        job_retry(job=job, error={"error_code": ErrorCode.WORKER_LOST.value}, delay=tool_class.retry_backoff_seconds)
        return True
    logger.warning("Job %s lost its worker: %s", job.pk, reason)
    params = {"tool": definition.name, "instance_id": str(job.instance_id or "")}
    lost = Outcome(Execution.Status.FAILED, error=envelope(ErrorCode.WORKER_LOST, params))
    plan = job_cache_outcome(job, lost)
    duration = int((timezone.now() - job.started_at).total_seconds() * 1000) if job.started_at else 0
    account = CreditAccount.objects.filter(owner_id=job.owner_id).first()
    ended = execution_finish(execution=job.execution, outcome=lost, duration_ms=duration, account=account, job=job)
    if ended:
        events.publish(str(job.pk), job_state(job_id=str(job.pk)))
        job_lead_end(job, plan)
    return ended


def jobs_reap(*, now: datetime | None = None) -> dict[str, int]:
    """Keeps job states honest; run by every worker's supervisor at every heartbeat while its
    processes run jobs, and each maintenance interval while they are idle.

    - RUNNING jobs whose heartbeat is older than TOOLEXEC_JOB_STALE_SECONDS lost their worker;
    - RUNNING jobs cancelled more than TOOLEXEC_CANCEL_GRACE_SECONDS ago that did not stop
      by themselves are ended CANCELLED and the process running them stopped;
    - QUEUED jobs that Redis lost are queued again (jobs_requeue_lost);
    - expired result cache entries are deleted (cache_purge_expired, a batch a round);
    - then the receivers of executions.signals.maintenance_round do their part (workflows).
    """
    now = now or timezone.now()
    counts = {"lost": 0, "cancelled": 0}
    running = Job.objects.filter(status=Job.Status.RUNNING).select_related("execution__tool")
    stale_before = now - timedelta(seconds=settings.TOOLEXEC_JOB_STALE_SECONDS)
    grace_before = now - timedelta(seconds=settings.TOOLEXEC_CANCEL_GRACE_SECONDS)
    for job in running.filter(Q(heartbeat_at__lt=stale_before) | Q(heartbeat_at__isnull=True)):
        counts["lost"] += job_lost(job=job, reason=f"no heartbeat since {job.heartbeat_at}")
    for job in running.filter(cancel_requested_at__lt=grace_before):
        counts["cancelled"] += job_stop(job=job)
    counts["requeued"] = jobs_requeue_lost(now=now)
    counts["cache_purged"] = cache_purge_expired(now=now)
    # The apps above keep their records honest in the same round (a workflow's runs).
    for receiver, result in maintenance_round.send_robust(sender=Job, now=now):
        if isinstance(result, Exception):
            logger.error("A maintenance round's receiver %r failed", receiver, exc_info=result)
        elif isinstance(result, dict):
            counts.update(result)
    return counts


def jobs_requeue_lost(*, now: datetime | None = None) -> int:
    """Queue again the QUEUED jobs RQ will never run, with the RQ job id they had, and return
    how many. PostgreSQL is the record of what was accepted: a Redis that restarted empty, or
    an enqueue that never happened (a process that died between its commit and its enqueue, a
    retry's schedule that Redis refused), strands nothing.

    A job counts as lost once it was handed to RQ (``enqueued_at``) more than
    TOOLEXEC_QUEUE_RECOVERY_SECONDS ago, so one on its way from its commit to its enqueue is
    not doubled. A job that follows an identical one (``Job.follows``) is not in RQ on purpose
    while its leader is queued or running; once the leader is neither (it vanished without
    settling it), it is lost like any other, and runs itself. One scheduled for later is
    scheduled again for its original time (``run_after``). Each is recorded before it is
    enqueued, by a conditional update that only one reaper wins; and should a job still be run
    twice (a worker that dequeued it just as it was looked at), the claim is conditional: the
    second delivery runs nothing.

    Redis round trips: none when no queued job is that old; otherwise one (a pipeline) for the
    oldest QUEUE_RECOVERY_BATCH of them, and RQ's enqueue (two) for each job queued again. A
    Redis that does not answer ends the round with a warning; the next round tries again.
    """
    now = now or timezone.now()
    handed_before = now - timedelta(seconds=settings.TOOLEXEC_QUEUE_RECOVERY_SECONDS)
    # job_queued_idx: QUEUED rows oldest first; enqueued_at is checked on the rows it finds.
    candidates = list(
        Job.objects.filter(status=Job.Status.QUEUED, enqueued_at__lt=handed_before)
        .exclude(rq_job_id="")
        .exclude(follows__status__in=(Job.Status.QUEUED, Job.Status.RUNNING))
        .select_related("execution__tool")
        .only(
            "id",
            "rq_job_id",
            "enqueued_at",
            "run_after",
            "attempt_log",
            "execution__id",
            "execution__tool__timeout_seconds",
        )
        .order_by("created_at")[:QUEUE_RECOVERY_BATCH]
    )
    if not candidates:
        return 0
    try:
        lost = rq_lost([job.rq_job_id for job in candidates])
    except RedisError:
        logger.warning("Redis is unavailable; queued jobs were not checked against it this round")
        return 0
    requeued = 0
    for job in candidates:
        if job.rq_job_id not in lost:
            continue
        try:
            requeued += job_requeue_lost(job, rq_status=lost[job.rq_job_id])
        except RedisError:
            logger.warning("Redis did not take job %s back; the next round tries again", job.pk)
            break
    return requeued


def rq_lost(rq_job_ids: list[str]) -> dict[str, str]:
    """Those of ``rq_job_ids`` that RQ will never run, each with the status its RQ job hash has
    ("" when there is none, as after Redis lost its data).

    RQ knows a job it will run: one waiting in the queue (or just taken from it by a worker, in
    the queue's intermediate list), scheduled or deferred, each in the list or registry that
    says so, or started (a worker has it and has not yet claimed it in PostgreSQL; should that
    worker die, RQ's own registry cleanup marks it failed). Any other state (no hash, a
    finished, failed, stopped or cancelled one, a hash whose list or registry lost it) means
    nothing will run it. One MULTI/EXEC of five commands a job, so the answers agree.
    """
    queue = events.queue()
    lists = (queue.key, queue.intermediate_queue_key)
    registries = (queue.scheduled_job_registry.key, queue.deferred_job_registry.key)
    with queue.connection.pipeline() as pipeline:
        for rq_job_id in rq_job_ids:
            pipeline.hget(RQJob.key_for(rq_job_id), "status")
            for key in lists:
                pipeline.lpos(key, rq_job_id)  # from the head, where the oldest jobs wait
            for key in registries:
                pipeline.zscore(key, rq_job_id)
        replies = pipeline.execute()
    lost: dict[str, str] = {}
    for index, rq_job_id in enumerate(rq_job_ids):
        raw, queued, taken, scheduled, deferred = replies[index * 5 : index * 5 + 5]
        status = raw.decode() if isinstance(raw, bytes) else (raw or "")
        known = (
            status == JobStatus.STARTED
            or (status == JobStatus.QUEUED and (queued is not None or taken is not None))
            or (status == JobStatus.SCHEDULED and scheduled is not None)
            or (status == JobStatus.DEFERRED and deferred is not None)
        )
        if not known:
            lost[rq_job_id] = status
    return lost


def job_requeue_lost(job: Job, *, rq_status: str) -> bool:
    """Record that the queue lost ``job`` and hand it to RQ again; False if another reaper (or
    anything else that changed the row since it was read) got there first."""
    now = timezone.now()
    due = job.run_after if job.run_after is not None and job.run_after > now else None
    message = f"The queue lost this job; queued again at {now.isoformat()}"
    message += f" to run at {due.isoformat()}, as it was scheduled." if due else "."
    note = {"event": "queue_lost", "message": message, "queued_again_at": now.isoformat()}
    seen = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED, rq_job_id=job.rq_job_id, enqueued_at=job.enqueued_at)
    if not seen.update(attempt_log=[*job.attempt_log, note], enqueued_at=now, updated_at=now):
        return False
    try:
        if rq_status:
            rq_forget(job.rq_job_id)
        rq_enqueue(
            job_id=str(job.pk),
            rq_job_id=job.rq_job_id,
            timeout=job.execution.tool.timeout_seconds,
            run_after=job.run_after,
        )
    except RedisError:
        # Undone, so the row says only what happened, and the job is looked at again next round.
        Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED, rq_job_id=job.rq_job_id, enqueued_at=now).update(
            attempt_log=job.attempt_log, enqueued_at=job.enqueued_at
        )
        raise
    logger.warning("Job %s was lost by the queue and queued again", job.pk)
    return True


def jobs_heartbeat(*, job_ids: list[str]) -> dict[str, str]:
    """The worker's supervisor reports the jobs its processes run alive. Returns each one's
    status, so it can stop a process still running a job that was cancelled meanwhile."""
    now = timezone.now()
    jobs = Job.objects.filter(pk__in=job_ids)
    jobs.filter(status=Job.Status.RUNNING).update(heartbeat_at=now)
    return {str(pk): status for pk, status in jobs.values_list("pk", "status")}


def job_timed_out(*, rq_job_id: str) -> None:
    """A RUNNING job whose tool ran past its timeout in a process that could not be interrupted
    (its supervisor killed the process): TIMED_OUT, as if the tool had been stopped at its limit."""
    job = Job.objects.select_related(*JOB_TO_RUN).filter(rq_job_id=rq_job_id, status=Job.Status.RUNNING).first()
    if job is None:
        return
    definition = job.execution.tool
    params = {"tool": definition.name, "instance_id": str(job.instance_id or "")}
    error = ToolTimeout(seconds=definition.timeout_seconds).envelope(params)
    duration = int((timezone.now() - job.started_at).total_seconds() * 1000) if job.started_at else 0
    account = getattr(job.owner, "credit_account", None)
    job_end(job, Outcome(Execution.Status.TIMED_OUT, error=error), duration, account)


def job_process_lost(*, rq_job_id: str, reason: str) -> None:
    job = Job.objects.select_related("execution__tool").filter(rq_job_id=rq_job_id, status=Job.Status.RUNNING).first()
    if job is not None:
        job_lost(job=job, reason=reason)


def job_check_alive(*, job: Job) -> Job:
    """A read of a RUNNING job whose heartbeat went stale ends it (no worker may be left to)."""
    stale_before = timezone.now() - timedelta(seconds=settings.TOOLEXEC_JOB_STALE_SECONDS)
    if job.status == Job.Status.RUNNING and (job.heartbeat_at is None or job.heartbeat_at < stale_before):
        job_lost(job=job, reason="stale heartbeat seen on read")
        job.refresh_from_db()
        job.execution.refresh_from_db()
    return job
