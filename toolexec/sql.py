"""Several writes in one statement, for the hot paths that must not pay a round trip apiece.

PostgreSQL runs data-modifying statements in ``WITH`` as one statement, atomic by itself: no
BEGIN and COMMIT round trips around it. Each write is the UPDATE the ORM would run for
``queryset.update(**values)`` (compiled by Django, so columns, JSON and ``F()`` are the ORM's
own), or the INSERT of one new row, made conditional on the write it comes after. Elsewhere
(SQLite, the development default, cannot modify in ``WITH``) the same writes run one by one
in a transaction.

All the writes of one statement see the database as it was when the statement began, so no
two of them may change the same row (PostgreSQL would make only one of the changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from django.db import connections, transaction
from django.db.models import BooleanField, Field, Model, QuerySet
from django.db.models.expressions import RawSQL
from django.db.models.sql import UpdateQuery


@dataclass
class Update:
    """``queryset.update(**values)``, named so the writes after it can depend on it."""

    name: str
    queryset: QuerySet[Any]
    values: dict[str, Any]
    after: str | None = None  # the write that must have changed a row for this one to run


@dataclass
class Insert:
    """``row.save()`` of a new row (its fields' defaults filled in as ``save()`` would)."""

    name: str
    row: Model
    after: str | None = None


def writes_chained(writes: list[Update | Insert], *, using: str = "default") -> dict[str, int]:
    """Run ``writes`` in order, each only if the one it comes ``after`` changed a row; return
    how many rows each changed. One statement on PostgreSQL, a transaction elsewhere."""
    if connections[using].vendor == "postgresql":
        return _in_one_statement(writes, using)
    return _in_a_transaction(writes, using)


def _in_one_statement(writes: list[Update | Insert], using: str) -> dict[str, int]:
    connection = connections[using]
    quote = connection.ops.quote_name
    parts, params, results = [], [], []
    for write in writes:
        if isinstance(write, Insert):
            sql, sql_params = _insert_sql(write, connection)
            pk = quote(write.row._meta.pk.column)
            parts.append(f"{quote(write.name)} AS ({sql} RETURNING {pk})")
            results.append(f"(SELECT {pk} FROM {quote(write.name)})")  # the new row's key, NULL if none
        else:
            sql, sql_params = _update_sql(write, connection)
            parts.append(f"{quote(write.name)} AS ({sql} RETURNING 1)")
            results.append(f"(SELECT count(*) FROM {quote(write.name)})")
        params.extend(sql_params)
    with connection.cursor() as cursor:
        cursor.execute(f"WITH {', '.join(parts)} SELECT {', '.join(results)}", params)
        row = cursor.fetchone()
    counts = {}
    for write, result in zip(writes, row, strict=True):
        if isinstance(write, Insert):
            counts[write.name] = int(result is not None)
            if result is not None:  # saved, as save() leaves it
                write.row.pk, write.row._state.adding, write.row._state.db = result, False, using
        else:
            counts[write.name] = result
    return counts


def _update_sql(write: Update, connection: Any) -> tuple[str, tuple[Any, ...]]:
    """What ``write.queryset.update(**write.values)`` would run (only if ``write.after``
    changed a row)."""
    queryset = write.queryset
    if write.after is not None:
        after = f"EXISTS (SELECT 1 FROM {connection.ops.quote_name(write.after)})"
        queryset = queryset.filter(RawSQL(after, (), output_field=BooleanField()))
    query = queryset.query.chain(UpdateQuery)
    query.add_update_values(write.values)
    return query.get_compiler(connection=connection).as_sql()


def _insert_sql(insert: Insert, connection: Any) -> tuple[str, list[Any]]:
    """INSERT … SELECT of the row's values: one row, or none if the write it comes after
    changed none."""
    sql, fields = insert_select_sql(type(insert.row), insert.after, connection.alias)
    return sql, [field.get_db_prep_save(field.pre_save(insert.row, add=True), connection) for field in fields]


@cache
def insert_select_sql(model: type[Model], after: str | None, alias: str) -> tuple[str, tuple[Field, ...]]:
    """``INSERT INTO <model's table> (…) SELECT %s, … [FROM <after>]``, and the fields whose
    values its parameters are. Each value is cast to its column's type (a SELECT list, unlike
    VALUES, gives PostgreSQL no column to infer it from); a key the database generates is left
    to it."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    fields = tuple(f for f in model._meta.concrete_fields if not f.generated and not (f.primary_key and f.db_returning))
    columns = ", ".join(quote(field.column) for field in fields)
    selected = ", ".join(f"CAST(%s AS {field.cast_db_type(connection)})" for field in fields)
    source = f" FROM {quote(after)}" if after else ""
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) SELECT {selected}{source}", fields


def _in_a_transaction(writes: list[Update | Insert], using: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    with transaction.atomic(using=using):
        for write in writes:
            if write.after is not None and not counts[write.after]:
                counts[write.name] = 0
            elif isinstance(write, Insert):
                write.row.save(force_insert=True, using=using)
                counts[write.name] = 1
            else:
                counts[write.name] = write.queryset.update(**write.values)
    return counts
