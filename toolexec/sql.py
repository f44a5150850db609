"""Several writes in one statement, for the hot paths that must not pay a round trip apiece.

PostgreSQL runs data-modifying statements in ``WITH`` as one statement, atomic by itself: no
BEGIN and COMMIT round trips around it. Each write is the UPDATE the ORM would run for
``queryset.update(**values)`` (compiled by Django, so columns, JSON and ``F()`` are the ORM's
own), or the INSERT of one new row, made conditional on the write it comes after. Elsewhere
(SQLite, the development default, cannot modify in ``WITH``) the same writes run one by one
in a transaction.

All the writes of one statement see the database as it was when the statement began, so no
two of them may change the same row (PostgreSQL would make only one of the changes).

For the same paths: ``insert`` (one new row), ``Loader`` (a select_related load of one row, its
SQL written once; ``LoaderPair``, two of them in one statement), and ``Prepared``, a statement a
kept PostgreSQL session plans only once.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

from django.db import connections, transaction
from django.db.models import BooleanField, Field, Model, QuerySet, signals
from django.db.models.expressions import Col, RawSQL
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


def insert(row: Model, *, using: str = "default") -> None:
    """``row.save(force_insert=True)`` of a new row whose key it holds already (a UUID the model
    gives it, not a database sequence) and whose model has one table (no parent models), with
    the same signals, in a statement planned once per session (``Prepared``) where the session
    keeps plans; elsewhere ``save()`` itself."""
    model, connection = type(row), connections[using]
    if not _plans_kept(connection) or model._meta.parents or model._meta.pk.db_returning or row.pk is None:
        row.save(force_insert=True, using=using)
        return
    signals.pre_save.send(sender=model, instance=row, raw=False, using=using, update_fields=None)
    statement, fields = _insert_statement(model, using)
    params = [field.get_db_prep_save(field.pre_save(row, add=True), connection) for field in fields]
    with connection.cursor() as cursor:
        execute(cursor, (statement, params))
    row._state.adding, row._state.db = False, using
    signals.post_save.send(sender=model, instance=row, created=True, update_fields=None, raw=False, using=using)


@cache
def _insert_statement(model: type[Model], alias: str) -> tuple[Prepared, tuple[Field, ...]]:
    sql, fields = insert_select_sql(model, None, alias)
    return Prepared(sql), fields


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


# --- Reads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Joined:
    """One model a Loader's row holds: where its columns are, how to convert them, and how it
    hangs from the object before it (``parent``, an index; None for the loaded model)."""

    model: type[Model]
    attnames: tuple[str, ...]
    converters: tuple[tuple[tuple[Any, Any], ...], ...]  # per column: (converter, expression) as the ORM keeps them
    pk: int  # the index of its primary key's column
    parent: int | None
    relation: Any  # the relation field (forward) or ``OneToOneRel`` (reverse), seen from the parent


class Loader:
    """``model.objects.select_related(*related).filter(<where> = %s, …)`` for one row, with its
    SQL written once per process and database: the ORM builds and compiles a query anew on every
    call, which costs a warm process about a millisecond for a join of a few tables, and a
    freshly forked work-horse several (copy-on-write faults).

    ``related`` are select_related paths of forward foreign keys and one-to-one relations, either
    way; ``where`` are columns of ``model``; ``lock`` a related path whose row is locked
    ``FOR NO KEY UPDATE`` until the transaction ends (where the database can lock rows). The
    objects come back as select_related gives them: fields converted as the ORM would, and
    every relation loaded, known absent (None) where the outer join found nothing.
    """

    def __init__(self, model: type[Model], related: tuple[str, ...], where: tuple[str, ...], lock: str = "") -> None:
        self.model, self.related, self.where, self.lock = model, related, where, lock
        self._written: dict[str, tuple[str, tuple[_Joined, ...]]] = {}
        self._prepared: dict[str, Prepared] = {}

    def load(self, *values: Any, using: str = "default") -> Model | None:
        """The object whose ``where`` columns hold ``values`` (as the ORM would prepare them for
        a filter), with its related objects; None if there is none."""
        params = self.params(*values, using=using)
        with connections[using].cursor() as cursor:
            execute(cursor, (self.statement(using), params))
            row = cursor.fetchone()
        return None if row is None else self.from_row(row, using=using)

    def from_row(self, row: tuple[Any, ...] | list[Any], *, using: str = "default") -> Model:
        """The objects of one row of ``sql()``, which a statement may select as a subquery
        (``SELECT loaded.*, … FROM (<sql>) loaded``) with columns of its own after them."""
        _, parts = self.sql(using)
        connection = connections[using]
        built: list[Model | None] = []
        offset = 0
        for part in parts:
            values_ = list(row[offset : offset + len(part.attnames)])
            offset += len(part.attnames)
            parent = built[part.parent] if part.parent is not None else None
            if values_[part.pk] is None or (part.parent is not None and parent is None):
                obj = None  # an outer join found no row
            else:
                for index, pairs in enumerate(part.converters):
                    for converter, expression in pairs:
                        values_[index] = converter(values_[index], expression, connection)
                obj = part.model.from_db(using, part.attnames, values_)
            built.append(obj)
            if parent is not None:
                part.relation.set_cached_value(parent, obj)
                if obj is not None and part.relation.one_to_one:  # the other way too, as select_related does
                    back = part.relation.remote_field if part.relation.concrete else part.relation.field
                    back.set_cached_value(obj, parent)
        return built[0]

    def params(self, *values: Any, using: str = "default") -> list[Any]:
        """``values`` for the ``where`` columns, prepared as the ORM would prepare them for a
        filter (a malformed key raises ``ValidationError``, as ``filter()`` does)."""
        connection = connections[using]
        pairs = zip(self._where_fields, values, strict=True)
        return [field.get_db_prep_value(value, connection) for field, value in pairs]

    @cached_property
    def _where_fields(self) -> tuple[Field, ...]:
        return tuple(self.model._meta.get_field(name) for name in self.where)

    def statement(self, using: str = "default") -> Prepared:
        """``sql()``, planned once per session (``Prepared``)."""
        if using not in self._prepared:
            self._prepared[using] = Prepared(self.sql(using)[0])
        return self._prepared[using]

    def sql(self, using: str = "default") -> tuple[str, tuple[_Joined, ...]]:
        """The statement and how to read its row: written the first time, then kept."""
        if using not in self._written:
            self._written[using] = self._write(connections[using])
            self._where_fields  # noqa: B018 - looked up now too, so a process prepared in advance has it
        return self._written[using]

    def _write(self, connection: Any) -> tuple[str, tuple[_Joined, ...]]:
        quote = connection.ops.quote_name
        paths = {"": 0}
        models: list[type[Model]] = [self.model]
        outer = [False]
        joins, parts = [], []
        selected: list[str] = []

        def columns(model: type[Model], alias: str) -> tuple[tuple[str, ...], tuple[Any, ...], int]:
            fields = model._meta.concrete_fields
            selected.extend(f"{alias}.{quote(field.column)}" for field in fields)
            converters = []
            for field in fields:
                col = Col(alias, field)
                pairs = [*connection.ops.get_db_converters(col), *col.get_db_converters(connection)]
                converters.append(tuple((converter, col) for converter in pairs))
            return tuple(field.attname for field in fields), tuple(converters), fields.index(model._meta.pk)

        parts.append(_Joined(self.model, *columns(self.model, "t0"), parent=None, relation=None))
        for path in self.related:
            parent_path, _, name = path.rpartition("__")
            parent = paths[parent_path]
            relation = models[parent]._meta.get_field(name)
            index, alias, parent_alias = len(models), f"t{len(models)}", f"t{parent}"
            target = relation.related_model
            if relation.concrete:  # forward: this row's foreign key
                on = f"{alias}.{quote(relation.target_field.column)} = {parent_alias}.{quote(relation.column)}"
                left = relation.null or outer[parent]
            else:  # reverse one-to-one: the other row's foreign key
                key, referenced = relation.field.column, relation.field.target_field.column
                on = f"{alias}.{quote(key)} = {parent_alias}.{quote(referenced)}"
                left = True
            joins.append(f"{'LEFT OUTER' if left else 'INNER'} JOIN {quote(target._meta.db_table)} {alias} ON {on}")
            paths[path], outer = index, [*outer, left]
            models.append(target)
            parts.append(_Joined(target, *columns(target, alias), parent=parent, relation=relation))
        where = " AND ".join(f"t0.{quote(self.model._meta.get_field(name).column)} = %s" for name in self.where)
        sql = f"SELECT {', '.join(selected)} FROM {quote(self.model._meta.db_table)} t0 {' '.join(joins)} WHERE {where}"
        if self.lock and connection.features.has_select_for_no_key_update:  # PostgreSQL; SQLite locks no rows
            sql += f" FOR NO KEY UPDATE OF t{paths[self.lock]}"
        return sql, tuple(parts)


class LoaderPair:
    """``first.load(…)`` and ``second.load(…)`` in one statement, for a path that needs two
    unrelated rows before it can do anything: one round trip instead of two. The second row is
    looked for only beside a first one (``(None, None)`` when there is no first)."""

    def __init__(self, first: Loader, second: Loader) -> None:
        self.first, self.second = first, second
        self._prepared: dict[str, Prepared] = {}

    def load(
        self, first: tuple[Any, ...], second: tuple[Any, ...], *, using: str = "default"
    ) -> tuple[Model | None, Model | None]:
        """The objects ``first.load(*first)`` and ``second.load(*second)`` would give; raises
        ``ValidationError`` for a malformed key, as they would."""
        params = [*self.first.params(*first, using=using), *self.second.params(*second, using=using)]
        with connections[using].cursor() as cursor:
            execute(cursor, (self.statement(using), params))
            row = cursor.fetchone()
        if row is None:
            return None, None
        width = sum(len(part.attnames) for part in self.first.sql(using)[1])
        return self.first.from_row(row, using=using), self.second.from_row(row[width:], using=using)

    def statement(self, using: str = "default") -> Prepared:
        if using not in self._prepared:
            first, second = self.first.sql(using)[0], self.second.sql(using)[0]
            # Each subquery names its own tables (t0, t1, …); the outer one only lays them side by side.
            sql = f"SELECT a.*, b.* FROM ({first}) a LEFT OUTER JOIN ({second}) b ON TRUE"
            self._prepared[using] = Prepared(sql)
        return self._prepared[using]


# --- Statements planned once per session -----------------------------------------------------


class Prepared:
    """A statement (``%s`` parameters) that PostgreSQL parses and plans once per session: sent
    as text, a join of a few tables or a chain of writes costs more to plan than to run (1.5 ms
    against 0.4 ms for a job's claim). The session keeps the plan (``PREPARE``); each run sends
    only ``EXECUTE`` and the values. Worth it on a connection that lives for many runs (a
    worker's, or with ``CONN_MAX_AGE``); elsewhere, and on other databases, the text is sent.
    """

    named: dict[str, Prepared] = {}  # every one written in this process, by name

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.name = "toolexec_" + hashlib.sha1(sql.encode()).hexdigest()[:24]
        Prepared.named[self.name] = self
        numbers = itertools.count(1)
        body = re.sub(r"%[s%]", lambda m: f"${next(numbers)}" if m[0] == "%s" else "%", sql)
        count = next(numbers) - 1
        self.execute_sql = f"EXECUTE {self.name}({', '.join(['%s'] * count)})" if count else f"EXECUTE {self.name}"
        # Idempotent: a session a work-horse was lent may have it already.
        prepare = f"PREPARE {self.name} AS {body}".replace("'", "''")
        self.prepare_sql = (
            f"IF NOT EXISTS (SELECT FROM pg_prepared_statements WHERE name = '{self.name}')"
            f" THEN EXECUTE '{prepare}'; END IF;"
        )


def statement_text(sql: str) -> str:
    """``sql`` as sent (``%s`` parameters), each ``EXECUTE`` of a ``Prepared`` written out as its
    statement, and the ``DO`` block that prepares statements left out: what a log or a count of
    reads and writes needs to see."""
    sql = re.sub(r"^DO \$toolexec\$.*? END \$toolexec\$; ", "", sql, flags=re.S)

    def written(match: re.Match[str]) -> str:
        statement = Prepared.named.get(match[1])
        return statement.sql if statement is not None else match[0]

    # Its values: %s placeholders, or literals as the driver interpolated them (quoted strings).
    return re.sub(r"EXECUTE (toolexec_[0-9a-f]+)(?:\((?:'(?:[^']|'')*'|[^')])*\))?", written, sql)


def execute(cursor: Any, *runs: tuple[Prepared, list[Any] | tuple[Any, ...]]) -> None:
    """Run each statement with its parameters, in one message (the cursor holds the last one's
    result; PostgreSQL runs several as one transaction). A statement the session has not
    planned yet is prepared first, in the same message."""
    connection = cursor.db
    params = [value for _, values in runs for value in values]
    if not _plans_kept(connection):
        cursor.execute("; ".join(statement.sql for statement, _ in runs), params)
        return
    missing = _unprepared(connection, [statement for statement, _ in runs])
    sql = "; ".join(statement.execute_sql for statement, _ in runs)
    if missing:
        sql = f"{_prepare_sql(missing).replace('%', '%%')}; {sql}"
    cursor.execute(sql, params)
    _prepared(connection, missing)


def prepare(connection: Any, statements: list[Prepared]) -> None:
    """Have the session plan ``statements``, those it has not yet: one round trip, or none.
    A worker calls this before it forks, so its work-horses find them ready in the session it
    lends them (a horse's own note of what it prepared ends with it)."""
    if not _plans_kept(connection):
        return
    connection.ensure_connection()
    missing = _unprepared(connection, statements)
    if missing:
        with connection.cursor() as cursor:
            cursor.execute(_prepare_sql(missing))
        _prepared(connection, missing)


def _unprepared(connection: Any, statements: list[Prepared]) -> list[Prepared]:
    known = getattr(connection, "_toolexec_prepared", None)
    if known is None or known[0] is not connection.connection:  # a new session: it has none
        return statements
    return [statement for statement in statements if statement.name not in known[1]]


def _prepared(connection: Any, statements: list[Prepared]) -> None:
    known = getattr(connection, "_toolexec_prepared", None)
    if known is None or known[0] is not connection.connection:
        known = connection._toolexec_prepared = (connection.connection, set())
    known[1].update(statement.name for statement in statements)


def _prepare_sql(statements: list[Prepared]) -> str:
    return f"DO $toolexec$ BEGIN {' '.join(statement.prepare_sql for statement in statements)} END $toolexec$"


def _plans_kept(connection: Any) -> bool:
    return connection.vendor == "postgresql" and connection.settings_dict["CONN_MAX_AGE"] != 0
