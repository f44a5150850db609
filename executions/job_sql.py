"""A worker's statements for claiming a job, their SQL written once per process.

The ORM builds and compiles a query anew on every call: in a freshly forked work-horse, loading
the job with ``select_related`` took 3.8 ms of CPU and 900 copy-on-write page faults before it
was even sent, and building and compiling the claim about as much (docs/benchmarks.md,
benchmark 4). Here both statements are written from the models' own metadata the first time
(the worker does it before it forks its first horse: ``job_sql_prepare``), so a horse only
sends them: the load is a ``toolexec.sql.Loader``, which builds the model instances with the
field converters the ORM would apply.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import F, Model, Value
from django.db.models.functions import Coalesce

from toolexec.sql import Loader

from .models import Execution, Job

# What ``select_related("execution__tool", "instance__tool", "owner__credit_account")`` loads,
# the owner's row locked.
_JOB = Loader(
    Job,
    related=("execution", "execution__tool", "instance", "instance__tool", "owner", "owner__credit_account"),
    where=("id",),
    lock="owner",
)


@cache
def _claim_sql(alias: str) -> str:
    quote = connections[alias].ops.quote_name
    job, execution = quote(Job._meta.db_table), quote(Execution._meta.db_table)

    def col(model: type[Model], name: str) -> str:
        return quote(model._meta.get_field(name).column)

    status, owner, started = col(Job, "status"), col(Job, "owner"), col(Execution, "started_at")
    return (
        f"WITH claimed AS (UPDATE {job} SET {status} = %s, {col(Job, 'worker_name')} = %s,"
        f" {col(Job, 'attempts')} = {col(Job, 'attempts')} + 1, {col(Job, 'started_at')} = %s,"
        f" {col(Job, 'heartbeat_at')} = %s, {col(Job, 'updated_at')} = %s"
        f" WHERE {col(Job, 'id')} = %s AND {status} = %s"
        f" AND (SELECT count(*) FROM {job} other WHERE other.{owner} = {job}.{owner} AND other.{status} = %s) < %s"
        f" RETURNING {col(Job, 'execution')})"
        f" UPDATE {execution} SET {col(Execution, 'status')} = %s, {started} = COALESCE({started}, %s)"
        f" WHERE {col(Execution, 'id')} IN (SELECT {col(Job, 'execution')} FROM claimed)"
    )


def job_sql_prepare(alias: str = DEFAULT_DB_ALIAS) -> None:
    """Write the statements now: a worker calls this before it forks, so no horse does."""
    _JOB.sql(alias)
    _claim_sql(alias)


def job_claim_locked(job: Job, *, worker_name: str, share: int, now: datetime, alias: str = DEFAULT_DB_ALIAS) -> bool:
    """QUEUED → RUNNING, the job and its execution in one statement, if its owner runs fewer
    than ``share`` jobs; whether it was claimed. Counts right only under the owner's lock
    (``job_load_locked`` in the same transaction): the statement's snapshot is taken after it."""
    if not _written_once(alias):
        if Job.objects.using(alias).filter(owner_id=job.owner_id, status=Job.Status.RUNNING).count() >= share:
            return False
        claim = {"worker_name": worker_name[:200], "attempts": F("attempts") + 1, "started_at": now}
        queued = Job.objects.using(alias).filter(pk=job.pk, status=Job.Status.QUEUED)
        if not queued.update(status=Job.Status.RUNNING, heartbeat_at=now, updated_at=now, **claim):
            return False
        execution = Execution.objects.using(alias).filter(pk=job.execution_id)
        execution.update(status=Execution.Status.RUNNING, started_at=Coalesce("started_at", Value(now)))
        return True
    params = [
        Job.Status.RUNNING, worker_name[:200], now, now, now,
        job.pk, Job.Status.QUEUED, Job.Status.RUNNING, share,
        Execution.Status.RUNNING, now,
    ]  # fmt: skip
    with connections[alias].cursor() as cursor:
        cursor.execute(_claim_sql(alias), params)
        return cursor.rowcount == 1


def _written_once(alias: str) -> bool:
    """PostgreSQL runs the statements below; elsewhere (SQLite, the development default: no row
    locks, no UPDATE in WITH, and one writer at a time anyway) the ORM does the same work."""
    return connections[alias].vendor == "postgresql"


def job_load_locked(job_id: Any, alias: str = DEFAULT_DB_ALIAS) -> Job | None:
    """The job with its execution and the execution's tool, its instance and the instance's
    tool, its owner and the owner's credit account, the owner's row locked (FOR NO KEY UPDATE)
    until the transaction this runs in ends; None if there is no such job. What
    ``select_related("execution__tool", "instance__tool", "owner__credit_account")`` would load."""
    return _JOB.load(job_id, using=alias)
