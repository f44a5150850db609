"""``toolexec.sql.Prepared``: statements a long-lived PostgreSQL session plans once. The first run
on a session prepares the statement in the same message; later runs send only EXECUTE; a new
session, or one that already has the statement (a work-horse prepared it on a session its
worker lent it), is handled without an error or a round trip of its own."""

from __future__ import annotations

import pytest
from django.db import DataError, connection
from django.test.utils import CaptureQueriesContext

from toolexec.sql import Prepared, execute, prepare

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

# A parameter in a pattern, a literal percent sign and a quote: all must survive both forms.
QUOTIENT = Prepared("SELECT 100 / %s, 'it''s 100%%' LIKE %s")


def run(statement: Prepared, *params) -> tuple[tuple, list[str]]:
    with CaptureQueriesContext(connection) as captured, connection.cursor() as cursor:
        execute(cursor, (statement, params))
        return cursor.fetchone(), [query["sql"] for query in captured]


def session_has(statement: Prepared) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = %s", [statement.name])
        return cursor.fetchone()[0] == 1


@pytest.fixture
def new_session():
    connection.close()
    connection.ensure_connection()
    yield
    connection.close()


@pytest.mark.django_db(transaction=True)
def test_the_first_run_on_a_session_prepares_it_in_the_same_message_then_only_executes(new_session):
    first, sent = run(QUOTIENT, 4, "%100%%")
    assert first == (25, True)
    assert len(sent) == 1 and sent[0].startswith("DO ") and f"EXECUTE {QUOTIENT.name}(" in sent[0]
    assert session_has(QUOTIENT)

    second, sent = run(QUOTIENT, 5, "it%")
    assert second == (20, True)
    assert sent == [f"EXECUTE {QUOTIENT.name}(5, 'it%')"]


@pytest.mark.django_db(transaction=True)
def test_a_new_session_is_prepared_again(new_session):
    run(QUOTIENT, 4, "x")
    connection.close()

    result, sent = run(QUOTIENT, 2, "%")

    assert result == (50, True) and sent[0].startswith("DO ")


@pytest.mark.django_db(transaction=True)
def test_a_session_that_already_has_it_is_not_refused(new_session):
    """A work-horse prepared it on the session its worker lent it; the worker does not know."""
    run(QUOTIENT, 4, "x")
    del connection._toolexec_prepared

    assert run(QUOTIENT, 10, "%")[0] == (10, True)


@pytest.mark.django_db(transaction=True)
def test_a_run_that_fails_leaves_the_session_usable_and_prepares_again_harmlessly(new_session):
    with pytest.raises(DataError):  # division by zero, in the message that prepared it
        run(QUOTIENT, 0, "x")
    assert session_has(QUOTIENT)  # PREPARE is not undone by the rollback

    result, sent = run(QUOTIENT, 1, "%")

    assert result == (100, True) and sent[0].startswith("DO ")  # not noted as prepared: it asks again


@pytest.mark.django_db(transaction=True)
def test_prepare_plans_ahead_so_the_first_run_only_executes(new_session):
    prepare(connection, [QUOTIENT])

    result, sent = run(QUOTIENT, 3, "%")

    assert result == (33, True) and sent == [f"EXECUTE {QUOTIENT.name}(3, '%')"]


@pytest.mark.django_db(transaction=True)
def test_without_persistent_connections_the_text_is_sent(new_session):
    connection.settings_dict["CONN_MAX_AGE"], kept = 0, connection.settings_dict["CONN_MAX_AGE"]
    try:
        result, sent = run(QUOTIENT, 4, "%")
        prepare(connection, [QUOTIENT])
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = kept

    assert result == (25, True) and sent == ["SELECT 100 / 4, 'it''s 100%' LIKE '%'"]
    assert not session_has(QUOTIENT)


@pytest.mark.django_db(transaction=True)
def test_several_statements_run_in_one_message_and_the_last_one_answers(new_session):
    other = Prepared("SELECT %s + 1")

    with connection.cursor() as cursor:
        execute(cursor, (other, [1]), (QUOTIENT, [50, "%"]))
        assert cursor.fetchone() == (2, True)


# --- insert(): save(force_insert=True), planned once per session -------------------------------


def test_insert_writes_the_row_save_writes_with_its_signals(make_instance, user):
    from django.db.models import signals

    from executions.models import Execution
    from toolexec.sql import insert

    instance = make_instance("test-noop", owner=user)

    def new() -> Execution:
        return Execution(instance=instance, tool=instance.tool, owner=user, mode="sync", input_data={"a": [1, "é"]})

    heard = []

    def hear(sender, instance, **kwargs):
        heard.append((kwargs.get("created"), instance._state.adding))

    saved, inserted = new(), new()
    saved.save(force_insert=True)
    signals.pre_save.connect(hear, sender=Execution)
    signals.post_save.connect(hear, sender=Execution)
    try:
        with CaptureQueriesContext(connection) as captured:
            insert(inserted)
    finally:
        signals.pre_save.disconnect(hear, sender=Execution)
        signals.post_save.disconnect(hear, sender=Execution)

    assert len(captured) == 1 and "EXECUTE toolexec_" in captured[0]["sql"]
    assert heard == [(None, True), (True, False)]  # as save() sends them
    assert not inserted._state.adding and inserted._state.db == "default"

    def stored(row: Execution) -> dict:
        values = {f.attname: getattr(Execution.objects.get(pk=row.pk), f.attname) for f in Execution._meta.fields}
        return {k: v for k, v in values.items() if k not in {"id", "created_at"}}

    assert stored(inserted) == stored(saved)


def test_insert_of_a_duplicate_key_raises_integrity_error_as_save_does(make_instance, user):
    from django.db import IntegrityError, transaction

    from executions.models import Execution
    from toolexec.sql import insert

    instance = make_instance("test-noop", owner=user)
    row = Execution(instance=instance, tool=instance.tool, owner=user, mode="sync", idempotency_key="k")
    insert(row)
    twin = Execution(instance=instance, tool=instance.tool, owner=user, mode="sync", idempotency_key="k")

    with pytest.raises(IntegrityError), transaction.atomic():
        insert(twin)


@pytest.mark.django_db(transaction=True)
def test_statement_text_writes_out_what_a_message_runs(new_session):
    """What a log, or a count of reads and writes, needs to see (bench/sync_execute.py)."""
    from toolexec.sql import statement_text

    other = Prepared("UPDATE auth_user SET last_login = NULL WHERE id = %s")
    with CaptureQueriesContext(connection) as captured, connection.cursor() as cursor:
        execute(cursor, (other, [0]), (QUOTIENT, [1, "%"]))  # the first run: it prepares them too

    assert statement_text(captured[0]["sql"]) == f"{other.sql}; {QUOTIENT.sql}"
    assert statement_text(f"EXECUTE {other.name}('a) b'';', 2)") == other.sql  # values as interpolated
    assert statement_text("SELECT 1") == "SELECT 1"
    assert statement_text("EXECUTE toolexec_0000(%s)") == "EXECUTE toolexec_0000(%s)"  # not one of ours
