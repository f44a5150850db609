"""A run's outcome written in one statement, its SQL written once per process.

``execution_finish`` writes a run's outcome: the job's end (for an async run), the execution's,
the instance's statistics, the settling of the credits held when it started, and the ledger
entry, each only once the one before it changed a row. Built and compiled through the ORM
(``outcome_writes``, chained by ``toolexec.sql``) that cost a warm process 1.5 ms of CPU per
run, and a freshly forked work-horse, which touches every object of the ORM's for the first
time (copy-on-write page faults), 5.5 ms: its largest cost (docs/benchmarks.md, benchmark 4).

Here the same statement is written from the models' metadata the first time (a worker does it
before it forks: ``outcome_sql_prepare``) and planned once per session (``Prepared``), so a run
only binds its values. The statement has every part always; a part with nothing to do gets
parameters that match no row (no instance, nothing to settle) or a false condition (no charge,
no ledger entry), and a job field the run does not set keeps its value.

Off PostgreSQL (SQLite, the development default, cannot modify in ``WITH``), and for a job
field the statement does not know, the ORM's writes run instead, in a transaction there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Exists, F, Field, Model

from instances.models import CreditAccount, ToolInstance
from instances.services import credits_settle, credits_to_settle
from toolexec.sql import Insert, Prepared, Update, execute, insert_select_sql, writes_chained

from .models import CreditLedgerEntry, Execution, Job

UNFINISHED = (Execution.Status.PENDING, Execution.Status.RUNNING)
# Written on every job that ends; and the fields written only when a run gives them.
JOB_ALWAYS = ("status", "finished_at", "updated_at")
JOB_WHEN_GIVEN = ("progress", "current_step", "step_index", "steps_total", "sealed_inputs", "attempt_log")
EXECUTION_FIELDS = (
    "status", "output_data", "error_code", "error_message", "error_metadata",
    "credits_consumed", "finished_at", "duration_ms",
)  # fmt: skip


@dataclass
class Finish:
    """One run's outcome, as ``execution_finish`` decided it: the values each row gets."""

    execution: Execution
    execution_updates: dict[str, Any]
    succeeded: bool
    charge: Decimal
    duration_ms: int
    now: datetime
    account: CreditAccount | None = None
    job: Job | None = None
    job_from: tuple[str, ...] = ()
    job_updates: dict[str, Any] = field(default_factory=dict)


def outcome_write(finish: Finish, *, using: str = DEFAULT_DB_ALIAS) -> bool:
    """Write ``finish``, all of it or nothing; whether it was written (False: the execution,
    or the job, had already reached a terminal state)."""
    if _written_once(using) and set(finish.job_updates) <= {*JOB_ALWAYS, *JOB_WHEN_GIVEN}:
        statement, fields = _statement(using, finish.job is not None)
        with connections[using].cursor() as cursor:
            execute(cursor, (statement, _params(finish, fields, connections[using])))
            return cursor.fetchone()[0] == 1
    return writes_chained(outcome_writes(finish), using=using)["execution"] == 1


def _written_once(alias: str) -> bool:
    """PostgreSQL runs the statement below; elsewhere the ORM's writes run in a transaction."""
    return connections[alias].vendor == "postgresql"


def outcome_sql_prepare(alias: str = DEFAULT_DB_ALIAS) -> list[Prepared]:
    """Write the statements now (a worker calls this before it forks, so no horse does); they
    are returned for the worker to have its session plan them too."""
    return [_statement(alias, True)[0], _statement(alias, False)[0]] if _written_once(alias) else []


def outcome_writes(finish: Finish) -> list[Update | Insert]:
    """The outcome as the ORM writes it, each write after the one it depends on: the job's
    (if any), then the execution's, then the rest."""
    execution, writes = finish.execution, []
    if finish.job is not None:
        # Both rows end together or not at all: the job only while its execution is unfinished.
        still_open = Exists(Execution.objects.filter(pk=execution.pk, status__in=UNFINISHED))
        job = Job.objects.filter(still_open, pk=finish.job.pk, status__in=finish.job_from)
        writes.append(Update("job", job, finish.job_updates))
    open_execution = Execution.objects.filter(pk=execution.pk, status__in=UNFINISHED)
    after_job = "job" if finish.job is not None else None
    writes.append(Update("execution", open_execution, finish.execution_updates, after=after_job))
    if execution.instance_id is not None:
        statistics = {
            "execution_count": F("execution_count") + 1,
            "success_count": F("success_count") + int(finish.succeeded),
            "failure_count": F("failure_count") + int(not finish.succeeded),
            "credits_consumed": F("credits_consumed") + finish.charge,
            "total_duration_ms": F("total_duration_ms") + finish.duration_ms,
            "last_executed_at": finish.now,
        }
        writes.append(
            Update("instance", ToolInstance.objects.filter(pk=execution.instance_id), statistics, "execution")
        )
    if finish.account is not None:
        # Settle what the run costs against what was held when it started, and say why.
        held, charge = execution.credits_held, finish.charge
        settle = credits_settle(account=finish.account, held=held, charge=charge, after="execution")
        writes += [settle] if settle else []
        if charge:
            writes.append(Insert("ledger", _ledger_entry(finish), after="execution"))
    return writes


def _ledger_entry(finish: Finish) -> CreditLedgerEntry:
    kind = CreditLedgerEntry.Kind.EXECUTION
    return CreditLedgerEntry(account=finish.account, kind=kind, amount=-finish.charge, execution=finish.execution)


@dataclass(frozen=True)
class _Fields:
    job: tuple[Field, ...]  # JOB_ALWAYS, then JOB_WHEN_GIVEN
    execution: tuple[Field, ...]
    ledger: tuple[Field, ...]


@cache
def _statement(alias: str, with_job: bool) -> tuple[Prepared, _Fields]:
    quote = connections[alias].ops.quote_name

    def table(model: type[Model]) -> str:
        return quote(model._meta.db_table)

    def col(model: type[Model], name: str) -> str:
        return quote(model._meta.get_field(name).column)

    def where_open(model: type[Model]) -> str:  # this row, if its status is still one of a list
        return f"{col(model, 'id')} = %s AND {col(model, 'status')} = ANY(%s)"

    parts, done = [], f"EXISTS (SELECT 1 FROM {quote('execution')})"
    if with_job:
        sets = [f"{col(Job, name)} = %s" for name in JOB_ALWAYS]
        sets += [f"{col(Job, name)} = CASE WHEN %s THEN %s ELSE {col(Job, name)} END" for name in JOB_WHEN_GIVEN]
        still_open = f"EXISTS (SELECT 1 FROM {table(Execution)} WHERE {where_open(Execution)})"
        parts.append(
            f"{quote('job')} AS (UPDATE {table(Job)} SET {', '.join(sets)}"
            f" WHERE {where_open(Job)} AND {still_open} RETURNING 1)"
        )
    sets = [f"{col(Execution, name)} = %s" for name in EXECUTION_FIELDS]
    after_job = f" AND EXISTS (SELECT 1 FROM {quote('job')})" if with_job else ""
    parts.append(
        f"{quote('execution')} AS (UPDATE {table(Execution)} SET {', '.join(sets)}"
        f" WHERE {where_open(Execution)}{after_job} RETURNING 1)"
    )
    counted = ("execution_count", "success_count", "failure_count", "credits_consumed", "total_duration_ms")
    sets = [f"{col(ToolInstance, name)} = {col(ToolInstance, name)} + %s" for name in counted]
    sets.append(f"{col(ToolInstance, 'last_executed_at')} = %s")
    parts.append(
        f"{quote('instance')} AS (UPDATE {table(ToolInstance)} SET {', '.join(sets)}"
        f" WHERE {col(ToolInstance, 'id')} = %s AND {done})"
    )
    balance = col(CreditAccount, "balance")
    parts.append(
        f"{quote('account')} AS (UPDATE {table(CreditAccount)}"
        f" SET {balance} = {balance} - %s, {col(CreditAccount, 'updated_at')} = %s"
        f" WHERE {col(CreditAccount, 'id')} = %s AND {done})"
    )
    insert, ledger_fields = insert_select_sql(CreditLedgerEntry, "execution", alias)
    parts.append(f"{quote('ledger')} AS ({insert} WHERE %s)")
    sql = f"WITH {', '.join(parts)} SELECT count(*) FROM {quote('execution')}"
    fields = _Fields(
        job=tuple(Job._meta.get_field(name) for name in (*JOB_ALWAYS, *JOB_WHEN_GIVEN)),
        execution=tuple(Execution._meta.get_field(name) for name in EXECUTION_FIELDS),
        ledger=ledger_fields,
    )
    return Prepared(sql), fields


def _params(finish: Finish, fields: _Fields, connection: Any) -> list[Any]:
    def prepared(field: Field, value: Any) -> Any:
        return field.get_db_prep_save(value, connection)

    execution, params = finish.execution, []
    if finish.job is not None:
        given = finish.job_updates
        params += [prepared(field, given[field.name]) for field in fields.job[: len(JOB_ALWAYS)]]
        for field in fields.job[len(JOB_ALWAYS) :]:
            params += [field.name in given, prepared(field, given.get(field.name))]
        params += [finish.job.pk, list(finish.job_from), execution.pk, list(UNFINISHED)]
    params += [prepared(field, finish.execution_updates[field.name]) for field in fields.execution]
    params += [execution.pk, list(UNFINISHED)]
    succeeded = int(finish.succeeded)
    params += [1, succeeded, 1 - succeeded, finish.charge, finish.duration_ms, finish.now, execution.instance_id]
    account, settle = finish.account, Decimal("0")
    if account is not None:
        settle = credits_to_settle(account=account, held=execution.credits_held, charge=finish.charge)
    params += [settle, finish.now, account.pk if settle else None]
    if account is not None and finish.charge:
        entry = _ledger_entry(finish)
        params += [prepared(field, field.pre_save(entry, add=True)) for field in fields.ledger] + [True]
    else:
        params += [None] * len(fields.ledger) + [False]
    return params
