"""A worker's statements for claiming a job, their SQL written once per process.

The ORM builds and compiles a query anew on every call: in a freshly forked work-horse, loading
the job with ``select_related`` took 3.8 ms of CPU and 900 copy-on-write page faults before it
was even sent, and building and compiling the claim about as much (docs/benchmarks.md,
benchmark 4). Here both statements are written from the models' own metadata the first time
(the worker does it before it forks its first horse: ``job_sql_prepare``), so a horse only
sends them, and builds the model instances with the field converters the ORM would apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import F, Model, Value
from django.db.models.expressions import Col
from django.db.models.functions import Coalesce

from instances.models import CreditAccount, ToolInstance
from tools.models import ToolDefinition

from .models import Execution, Job


@dataclass(frozen=True)
class _Part:
    model: type[Model]
    attnames: list[str]
    converters: list[list[tuple[Any, Any]]]  # per column: (converter, expression) as the ORM's compiler keeps them


@cache
def _loader(alias: str) -> tuple[str, tuple[_Part, ...]]:
    connection = connections[alias]
    quote = connection.ops.quote_name
    user = get_user_model()

    def table(model: type[Model]) -> str:
        return quote(model._meta.db_table)

    def column(model: type[Model], name: str) -> str:
        return quote(model._meta.get_field(name).column)

    aliases = {Job: "j", Execution: "e", ToolDefinition: "t", ToolInstance: "i", user: "u", CreditAccount: "a"}
    selected, parts = [], []
    for model, short in aliases.items():
        fields = list(model._meta.concrete_fields)
        selected += [f"{short}.{quote(field.column)}" for field in fields]
        converters = []
        for field in fields:
            col = Col(short, field)
            pairs = [*connection.ops.get_db_converters(col), *col.get_db_converters(connection)]
            converters.append([(converter, col) for converter in pairs])
        parts.append(_Part(model, [field.attname for field in fields], converters))
    pk = quote(Job._meta.pk.column)
    sql = (
        f"SELECT {', '.join(selected)} FROM {table(Job)} j"
        f" JOIN {table(Execution)} e ON e.{quote(Execution._meta.pk.column)} = j.{column(Job, 'execution')}"
        f" JOIN {table(ToolDefinition)} t ON t.{quote(ToolDefinition._meta.pk.column)} = e.{column(Execution, 'tool')}"
        f" LEFT JOIN {table(ToolInstance)} i ON i.{quote(ToolInstance._meta.pk.column)} = j.{column(Job, 'instance')}"
        f" JOIN {table(user)} u ON u.{quote(user._meta.pk.column)} = j.{column(Job, 'owner')}"
        f" LEFT JOIN {table(CreditAccount)} a ON a.{column(CreditAccount, 'owner')} = u.{quote(user._meta.pk.column)}"
        f" WHERE j.{pk} = %s FOR NO KEY UPDATE OF u"
    )
    return sql, tuple(parts)


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
    _loader(alias)
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
    """The job with its execution and the execution's tool, its instance (the same tool), its
    owner and the owner's credit account, the owner's row locked (FOR NO KEY UPDATE) until the
    transaction this runs in ends; None if there is no such job. What
    ``select_related("execution__tool", "instance__tool", "owner__credit_account")`` would load."""
    if not _written_once(alias):
        jobs = Job.objects.using(alias).select_related("execution__tool", "instance__tool", "owner__credit_account")
        try:
            return jobs.select_for_update(of=("owner",), no_key=True).get(pk=job_id)
        except Job.DoesNotExist:
            return None
    connection = connections[alias]
    sql, parts = _loader(alias)
    with connection.cursor() as cursor:
        cursor.execute(sql, [job_id])
        row = cursor.fetchone()
    if row is None:
        return None
    job, execution, tool, instance, owner, account = _instances(row, parts, connection, alias)
    execution.tool = tool
    job.execution = execution
    if instance is not None:
        instance.tool = tool if instance.tool_id == tool.pk else ToolDefinition.objects.get(pk=instance.tool_id)
    job.instance = instance
    owner._state.fields_cache["credit_account"] = account  # None: known to have none, as select_related says
    job.owner = owner
    return job


def _instances(row: tuple[Any, ...], parts: tuple[_Part, ...], connection: Any, alias: str) -> list[Model | None]:
    built: list[Model | None] = []
    offset = 0
    for part in parts:
        values = list(row[offset : offset + len(part.attnames)])
        offset += len(part.attnames)
        if values[part.attnames.index(part.model._meta.pk.attname)] is None:
            built.append(None)  # an outer join found no row
            continue
        for index, pairs in enumerate(part.converters):
            for converter, expression in pairs:
                values[index] = converter(values[index], expression, connection)
        built.append(part.model.from_db(alias, part.attnames, values))
    return built
