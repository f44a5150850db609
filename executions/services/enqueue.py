"""Async runs accepted: the same checks as a sync run, the Execution and the Job in one
transaction, the RQ job on commit; Idempotency-Key replays."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
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
from .queueing import rq_enqueue
from .runs import Outcome, execution_finish, execution_prepare, execution_record_start

logger = logging.getLogger(__name__)


@dataclass
class Accepted:
    job: Job
    replayed: bool = False


def request_fingerprint(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def execution_enqueue(*, instance: ToolInstance, inputs: Any, idempotency_key: str = "") -> Accepted:
    """Accept an async run: the same checks as a sync run, then the Execution (PENDING) and the
    Job (QUEUED) in one transaction, and the RQ job, carrying only the job's id, on commit.

    With an ``idempotency_key``, the same key and body from the same owner within
    TOOLEXEC_IDEMPOTENCY_HOURS give back the first job and create nothing; a different body is
    refused. Raises QueueUnavailable (the execution then ends FAILED) when Redis is down.
    """
    # The instance is part of what a key identifies: the same key on another instance is a conflict.
    fingerprint = request_fingerprint({"instance": str(instance.pk), "inputs": inputs}) if idempotency_key else ""
    if idempotency_key:
        replay = _idempotent_replay(owner_id=instance.owner_id, key=idempotency_key, fingerprint=fingerprint)
        if replay is not None:
            return Accepted(replay, replayed=True)
    tool, merged, readiness = execution_prepare(instance=instance, mode=ASYNC, inputs=inputs)
    definition = instance.tool
    outcome: dict[str, bool] = {}
    try:
        with transaction.atomic():
            execution = execution_record_start(
                instance=instance,
                inputs=merged,
                mode=Mode.ASYNC,
                account=readiness.account,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
            )
            job = Job(
                execution=execution,
                instance=instance,
                owner_id=instance.owner_id,
                queue=QUEUE_NAME,
                status=Job.Status.QUEUED,
                max_attempts=tool.max_attempts if tool.idempotent else 1,
                enqueued_at=execution.created_at,
            )
            job.rq_job_id = str(job.pk)
            job.sealed_inputs = seal(merged, row_id=str(job.pk), owner_id=instance.owner_id)
            job.save(force_insert=True)
            transaction.on_commit(lambda: outcome.setdefault("enqueued", _enqueue(job, definition, readiness.account)))
    except IntegrityError:
        if not idempotency_key:
            raise
        # A concurrent request with the same key got there first: answer with its job.
        replay = _idempotent_replay(owner_id=instance.owner_id, key=idempotency_key, fingerprint=fingerprint)
        if replay is None:
            raise
        return Accepted(replay, replayed=True)
    if outcome.get("enqueued") is False:
        raise QueueUnavailable(
            tool=definition.name,
            instance_id=str(instance.pk),
            metadata={"execution_id": str(job.execution_id), "job_id": str(job.pk)},
        )
    return Accepted(job)


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


def _enqueue(job: Job, definition: Any, account: CreditAccount) -> bool:
    """Put the job on the RQ queue (ids only). If Redis is down, the run ends FAILED with
    QUEUE_UNAVAILABLE, its held credits return, and False says so."""
    try:
        rq_enqueue(job_id=str(job.pk), rq_job_id=job.rq_job_id, timeout=definition.timeout_seconds)
        return True
    except RedisError:
        logger.warning("Redis is unavailable; job %s could not be queued", job.pk)
        # The client is told to retry: its Idempotency-Key must lead to a new run, not this one.
        Execution.objects.filter(pk=job.execution_id).update(idempotency_key="")
        error = envelope(ErrorCode.QUEUE_UNAVAILABLE, {"tool": definition.name, "instance_id": str(job.instance_id)})
        execution_finish(
            execution=job.execution,
            outcome=Outcome(Execution.Status.FAILED, error=error),
            duration_ms=0,
            account=account,
            job=job,
            job_from=(Job.Status.QUEUED,),
        )
        return False
