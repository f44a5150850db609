"""Async runs accepted: the same checks as a sync run, the result cache (a hit answers with
a job already COMPLETED), the Execution and the Job in one transaction, then on commit the RQ
job, or, when an identical job leads the cache key, the wait for it; Idempotency-Key replays."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from redis.exceptions import RedisError

from core.errors import ErrorCode, envelope
from credits.models import CreditAccount
from instances.crypto import seal
from instances.models import ToolInstance
from tools.errors import IdempotencyConflict, QueueUnavailable
from tools.sdk import ASYNC

from ..events import QUEUE_NAME
from ..models import Execution, Job, Mode
from .cache import CacheControl, CachePlan, CacheReport, cache_lead, cache_plan
from .jobs import job_cache_outcome, job_follow, job_lead_end, lead_holder
from .queueing import rq_enqueue
from .runs import Outcome, execution_finish, execution_prepare, execution_record_hit, execution_record_start

logger = logging.getLogger(__name__)


@dataclass
class Accepted:
    job: Job
    replayed: bool = False
    cache: CacheReport | None = None  # what the result cache did (for a replay: as recorded)


def request_fingerprint(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def execution_enqueue(
    *,
    instance: ToolInstance,
    inputs: Any,
    idempotency_key: str = "",
    cache_control: CacheControl | None = None,
    origin: str = "",
    run_after: datetime | None = None,
) -> Accepted:
    """Accept an async run: the same checks as a sync run, then the Execution (PENDING) and the
    Job (QUEUED) in one transaction, and the RQ job, carrying only the job's id, on commit.

    The result cache answers first when it can: a HIT records the Execution and its Job
    COMPLETED at once (execution_record_hit), with no RQ job and no worker. Otherwise the job
    carries its cache plan to the worker; and when its result may be kept, it takes the lead on
    its cache key, or, when an identical job holds it, follows that job instead of going to RQ
    (job_follow): it ends from the leader's entry (COLLAPSED), or runs itself if none is kept.
    Without Redis nothing collapses.

    With an ``idempotency_key``, the same key and body from the same owner within
    TOOLEXEC_IDEMPOTENCY_HOURS give back the first job and create nothing; a different body is
    refused. Raises QueueUnavailable (the execution then ends FAILED) when Redis is down.

    ``origin`` says who asked for the run when not its owner directly (Execution.origin); a
    job with a ``run_after`` still to come waits for it in RQ's schedule (a workflow step's
    retry backoff). Called inside the caller's transaction, the job goes to RQ when that
    commits, and a Redis that is down ends the execution FAILED without raising here.
    """
    # The instance is part of what a key identifies: the same key on another instance is a conflict.
    fingerprint = request_fingerprint({"instance": str(instance.pk), "inputs": inputs}) if idempotency_key else ""
    if idempotency_key:
        replay = _idempotent_replay(owner_id=instance.owner_id, key=idempotency_key, fingerprint=fingerprint)
        if replay is not None:
            return Accepted(replay, replayed=True, cache=recorded_cache(replay))
    tool, merged, readiness = execution_prepare(instance=instance, mode=ASYNC, inputs=inputs)
    plan = cache_plan(
        instance=instance,
        tool=tool,
        inputs=inputs,
        merged=merged,
        credentials=readiness.credentials,
        control=cache_control or CacheControl(),
    )
    definition = instance.tool
    handed: dict[str, bool] = {}
    try:
        if plan.hit:
            _, outcome, hit_job = execution_record_hit(
                instance=instance,
                inputs=merged,
                mode=Mode.ASYNC,
                account=readiness.account,
                plan=plan,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
                origin=origin,
            )
            assert hit_job is not None  # recorded with its job in ASYNC mode
            return Accepted(hit_job, cache=outcome.cache)
        with transaction.atomic():
            execution = execution_record_start(
                instance=instance,
                inputs=merged,
                mode=Mode.ASYNC,
                account=readiness.account,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
                origin=origin,
            )
            job = Job(
                execution=execution,
                instance=instance,
                owner_id=instance.owner_id,
                queue=QUEUE_NAME,
                status=Job.Status.QUEUED,
                max_attempts=tool.max_attempts if tool.idempotent else 1,
                enqueued_at=execution.created_at,
                run_after=run_after,
                cache_plan=plan.as_dict(),
            )
            job.rq_job_id = str(job.pk)
            job.sealed_inputs = seal(merged, row_id=str(job.pk), owner_id=instance.owner_id)
            job.save(force_insert=True)
            accepted = Accepted(job, cache=plan.report)
            transaction.on_commit(
                lambda: handed.setdefault("handed", _hand_over(accepted, definition, readiness.account, plan))
            )
    except IntegrityError:
        if not idempotency_key:
            raise
        # A concurrent request with the same key got there first: answer with its job.
        replay = _idempotent_replay(owner_id=instance.owner_id, key=idempotency_key, fingerprint=fingerprint)
        if replay is None:
            raise
        return Accepted(replay, replayed=True, cache=recorded_cache(replay))
    if handed.get("handed") is False:
        raise QueueUnavailable(
            tool=definition.name,
            instance_id=str(instance.pk),
            metadata={"execution_id": str(job.execution_id), "job_id": str(job.pk)},
        )
    return accepted


def recorded_cache(job: Job) -> CacheReport | None:
    """What the cache did for a job already accepted: its run's report once it ended, else its
    accept's (from the plan it carries); None for a job accepted before the cache."""
    recorded = job.execution.cache or (job.cache_plan or {}).get("report")
    return CacheReport.from_dict(recorded) if recorded else None


def _idempotent_replay(*, owner_id: int, key: str, fingerprint: str) -> Job | None:
    """The job a key already made, if it is recent; raises on a different body."""
    execution = Execution.objects.filter(owner_id=owner_id, idempotency_key=key).select_related("job").first()
    if execution is None:
        return None
    window = timedelta(hours=settings.TOOLEXEC_IDEMPOTENCY_HOURS)
    if execution.created_at < timezone.now() - window:
        # Expired: free the key for this new request (the old run keeps its record).
        Execution.objects.filter(pk=execution.pk, idempotency_key=key).update(idempotency_key="")
        return None
    if execution.request_fingerprint != fingerprint:
        raise IdempotencyConflict()
    return execution.job


def _hand_over(accepted: Accepted, definition: Any, account: CreditAccount, plan: CachePlan) -> bool:
    """The committed job's way on: when its result may be kept, the lead on its cache key (held
    under the job's id, for the tool's timeout), or, when an identical job leads, that job to
    follow; then, unless it follows, the RQ queue. False when Redis took neither."""
    job = accepted.job
    if plan.key is not None:
        holder = cache_lead(plan, seconds=definition.timeout_seconds, holder=lead_holder(job.pk))
        if holder is not None and job_follow(job, holder=holder, plan=plan, account=account):
            if job.status == Job.Status.COMPLETED:  # its leader had ended: answered from its entry
                accepted.cache = CacheReport.from_dict(job.execution.cache)
            return True
    return _enqueue(job, definition, account)


def _enqueue(job: Job, definition: Any, account: CreditAccount) -> bool:
    """Put the job on the RQ queue (ids only). If Redis is down, the run ends FAILED with
    QUEUE_UNAVAILABLE, its held credits return, its lead (if it took one) ends, and False says so."""
    try:
        rq_enqueue(
            job_id=str(job.pk), rq_job_id=job.rq_job_id, timeout=definition.timeout_seconds, run_after=job.run_after
        )
        return True
    except RedisError:
        logger.warning("Redis is unavailable; job %s could not be queued", job.pk)
        # The client is told to retry: its Idempotency-Key must lead to a new run, not this one.
        Execution.objects.filter(pk=job.execution_id).update(idempotency_key="")
        error = envelope(ErrorCode.QUEUE_UNAVAILABLE, {"tool": definition.name, "instance_id": str(job.instance_id)})
        failed = Outcome(Execution.Status.FAILED, error=error)
        plan = job_cache_outcome(job, failed)
        if execution_finish(
            execution=job.execution,
            outcome=failed,
            duration_ms=0,
            account=account,
            job=job,
            job_from=(Job.Status.QUEUED,),
        ):
            job_lead_end(job, plan)
        return False
