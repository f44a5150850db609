"""A worker's claim of a job: one round trip, its SQL written once per process.

The ORM builds and compiles a query anew on every call: in a freshly forked work-horse, loading
the job with ``select_related`` took 3.8 ms of CPU and 900 copy-on-write page faults before it
was even sent, and building and compiling the claim about as much (docs/benchmarks.md,
benchmark 4). And a claim in a transaction is four round trips (BEGIN, the owner's lock, the
claim, COMMIT). Here the lock, the claim and the load are written once from the models' own
metadata (the worker does it before it forks its first horse: ``job_sql_prepare``) and sent as
one message, which PostgreSQL runs as one transaction; the load is a ``toolexec.sql.Loader``,
which builds the model instances with the field converters the ORM would apply.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import F, Model, Value
from django.db.models.functions import Coalesce

from toolexec.sql import Loader, Prepared, execute

from .models import Execution, Job

# What ``select_related("execution__tool", "instance", "owner__credit_account")`` loads. The
# instance's tool is the execution's (an instance keeps the tool it was made with): that row is
# loaded once and given to both (``_tool_shared``).
_JOB = Loader(
    Job,
    related=("execution", "execution__tool", "instance", "owner", "owner__credit_account"),
    where=("id",),
)


def _tool_shared(job: Job | None) -> Job | None:
    if job is not None and job.instance is not None and job.instance.tool_id == job.execution.tool_id:
        job.instance.tool = job.execution.tool
    return job


@cache
def _load_and_claim(alias: str) -> tuple[Prepared, Prepared]:
    """Two statements sent in one message, which PostgreSQL runs as one transaction in one round
    trip: the first locks the job's owner; the second, whose snapshot is taken after the lock, so
    it counts every claim made before, claims the job (and its execution) if the owner runs
    fewer than their share, and selects the job as it was before, with its related rows and
    whether it claimed. (One statement could not do it: its snapshot would be taken before it
    waited for the lock.)"""
    connection = connections[alias]
    quote = connection.ops.quote_name
    job, execution = quote(Job._meta.db_table), quote(Execution._meta.db_table)
    owner_field = Job._meta.get_field("owner")
    owners, owner_key = quote(owner_field.related_model._meta.db_table), quote(owner_field.target_field.column)

    def col(model: type[Model], name: str) -> str:
        return quote(model._meta.get_field(name).column)

    status, owner, started, job_id = col(Job, "status"), col(Job, "owner"), col(Execution, "started_at"), col(Job, "id")
    lock = (
        f"SELECT 1 FROM {owners} WHERE {owner_key} = (SELECT {owner} FROM {job} WHERE {job_id} = %s) FOR NO KEY UPDATE"
    )
    load, _ = _JOB.sql(alias)
    claim = (
        f"WITH claimed AS (UPDATE {job} SET {status} = %s, {col(Job, 'worker_name')} = %s,"
        f" {col(Job, 'attempts')} = {col(Job, 'attempts')} + 1, {col(Job, 'started_at')} = %s,"
        f" {col(Job, 'heartbeat_at')} = %s, {col(Job, 'updated_at')} = %s"
        f" WHERE {job_id} = %s AND {status} = %s"
        f" AND (SELECT count(*) FROM {job} other WHERE other.{owner} = {job}.{owner} AND other.{status} = %s) < %s"
        f" RETURNING {col(Job, 'execution')}),"
        f" started AS (UPDATE {execution} SET {col(Execution, 'status')} = %s, {started} = COALESCE({started}, %s)"
        f" WHERE {col(Execution, 'id')} IN (SELECT {col(Job, 'execution')} FROM claimed) RETURNING 1)"
        f" SELECT loaded.*, EXISTS (SELECT 1 FROM claimed) FROM ({load}) loaded"
    )
    return Prepared(lock), Prepared(claim)


def job_sql_prepare(alias: str = DEFAULT_DB_ALIAS) -> list[Prepared]:
    """Write the statements now (a worker calls this before it forks, so no horse does); they
    are returned for the worker to have its session plan them too."""
    return [*_load_and_claim(alias)] if _written_once(alias) else []


def job_load_and_claim(
    job_id: Any, *, worker_name: str, share: int, now: datetime, alias: str = DEFAULT_DB_ALIAS
) -> tuple[Job | None, bool]:
    """Claim the job, QUEUED → RUNNING with its execution, if its owner runs fewer than
    ``share`` jobs; return the job as it was before the claim (with its execution and the
    execution's tool, its instance and the instance's tool, its owner and the owner's credit
    account: what ``select_related`` would give, the tool one object), or None if there is no
    such job, and whether this call claimed it.

    Claims of one owner's jobs take turns on a lock on the owner's row, held until the claim
    commits, so two workers can't both take the owner's last free place. On PostgreSQL that is
    one round trip (``_load_and_claim``); elsewhere (SQLite, the development default: no row
    locks, no UPDATE in WITH, one writer at a time anyway) the ORM does the same in a transaction.
    """
    if not _written_once(alias):
        return _load_and_claim_through_the_orm(job_id, worker_name=worker_name, share=share, now=now, alias=alias)
    key = _JOB.params(job_id, using=alias)[0]
    claim = [
        Job.Status.RUNNING, worker_name[:200], now, now, now,
        key, Job.Status.QUEUED, Job.Status.RUNNING, share,
        Execution.Status.RUNNING, now,
        key,
    ]  # fmt: skip
    lock_statement, claim_statement = _load_and_claim(alias)
    with connections[alias].cursor() as cursor:
        execute(cursor, (lock_statement, [key]), (claim_statement, claim))
        row = cursor.fetchone()
    if row is None:
        return None, False
    return _tool_shared(_JOB.from_row(row, using=alias)), row[-1]


def _load_and_claim_through_the_orm(
    job_id: Any, *, worker_name: str, share: int, now: datetime, alias: str
) -> tuple[Job | None, bool]:
    with transaction.atomic(using=alias):
        job = _tool_shared(_JOB.load(job_id, using=alias))
        if job is None or job.status != Job.Status.QUEUED:
            return job, False
        jobs = Job.objects.using(alias)
        if jobs.filter(owner_id=job.owner_id, status=Job.Status.RUNNING).count() >= share:
            return job, False
        claim = {"worker_name": worker_name[:200], "attempts": F("attempts") + 1, "started_at": now}
        if not jobs.filter(pk=job.pk, status=Job.Status.QUEUED).update(
            status=Job.Status.RUNNING, heartbeat_at=now, updated_at=now, **claim
        ):
            return job, False
        execution = Execution.objects.using(alias).filter(pk=job.execution_id)
        execution.update(status=Execution.Status.RUNNING, started_at=Coalesce("started_at", Value(now)))
        return job, True


def _written_once(alias: str) -> bool:
    """PostgreSQL runs the statements above; elsewhere the ORM does the same work."""
    return connections[alias].vendor == "postgresql"
