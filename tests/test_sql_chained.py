"""Writes chained into one statement (toolexec/sql.py): each runs only if the one it comes
after changed a row, all of them or none. The PostgreSQL form (one ``WITH`` statement) and the
portable form (a transaction, for SQLite) both run here against PostgreSQL and must agree."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import IntegrityError, connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from executions.models import CreditLedgerEntry
from instances.models import CreditAccount
from tests.factories import UserFactory
from toolexec import sql
from toolexec.sql import Insert, Update, writes_chained

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

FORMS = {"one statement": sql._in_one_statement, "a transaction": sql._in_a_transaction}


@pytest.fixture(params=FORMS, ids=list(FORMS))
def chained(request):
    return lambda writes: FORMS[request.param](writes, "default")


@pytest.fixture
def account(db) -> CreditAccount:
    return CreditAccount.objects.create(owner=UserFactory(), balance=Decimal("5"))


@pytest.fixture
def other(db) -> CreditAccount:
    return CreditAccount.objects.create(owner=UserFactory(), balance=Decimal("5"))


def take(account: CreditAccount, amount: str, name: str = "take", after: str | None = None) -> Update:
    """Take ``amount`` off the balance if it covers it."""
    covered = CreditAccount.objects.filter(pk=account.pk, balance__gte=Decimal(amount))
    return Update(name, covered, {"balance": F("balance") - Decimal(amount)}, after=after)


def balance(account: CreditAccount) -> Decimal:
    return CreditAccount.objects.get(pk=account.pk).balance


def test_a_write_runs_only_after_the_one_it_depends_on_changed_a_row(chained, account, other):
    assert chained([take(account, "3"), take(other, "1", "then", after="take")]) == {"take": 1, "then": 1}
    assert (balance(account), balance(other)) == (Decimal("2"), Decimal("4"))

    # 3 is not covered now: what comes after it does not run either, though it would be.
    assert chained([take(account, "3"), take(other, "1", "then", after="take")]) == {"take": 0, "then": 0}
    assert (balance(account), balance(other)) == (Decimal("2"), Decimal("4"))


def test_a_write_without_a_dependency_runs_whatever_the_others_did(chained, account, other):
    assert chained([take(account, "9"), take(other, "2", "other")]) == {"take": 0, "other": 1}
    assert (balance(account), balance(other)) == (Decimal("5"), Decimal("3"))


def test_an_inserted_row_gets_its_key_and_the_fields_save_would_fill(chained, account):
    entry = CreditLedgerEntry(account=account, kind=CreditLedgerEntry.Kind.EXECUTION, amount=Decimal("-2.5"))

    assert chained([take(account, "2.5"), Insert("entry", entry, after="take")]) == {"take": 1, "entry": 1}

    assert entry.pk is not None and not entry._state.adding
    stored = CreditLedgerEntry.objects.get(pk=entry.pk)
    assert (stored.amount, stored.kind, stored.execution_id, stored.created_by_id) == (
        Decimal("-2.5"),
        "EXECUTION",
        None,
        None,
    )
    assert stored.created_at == entry.created_at is not None  # auto_now_add, as save() fills it


def test_no_row_is_inserted_after_a_write_that_changed_none(chained, account):
    entry = CreditLedgerEntry(account=account, kind=CreditLedgerEntry.Kind.EXECUTION, amount=Decimal("-9"))

    assert chained([take(account, "9"), Insert("entry", entry, after="take")]) == {"take": 0, "entry": 0}

    assert entry.pk is None and entry._state.adding
    assert not CreditLedgerEntry.objects.filter(account=account).exists()


@pytest.mark.django_db(transaction=True)
def test_a_failing_write_undoes_the_ones_before_it(chained, account):
    second_account = CreditAccount(owner=account.owner)  # an owner has one account: this fails

    with pytest.raises(IntegrityError):
        chained([take(account, "2"), Insert("second", second_account, after="take")])

    assert balance(account) == Decimal("5")  # the first write did not stand alone
    assert CreditAccount.objects.filter(owner=account.owner).count() == 1


def test_on_postgresql_the_chain_is_one_statement(account, other):
    entry = CreditLedgerEntry(account=account, kind=CreditLedgerEntry.Kind.EXECUTION, amount=Decimal("-1"))
    writes = [take(account, "1"), take(other, "1", "select", after="take"), Insert("order", entry, after="select")]

    with CaptureQueriesContext(connection) as captured:
        counts = writes_chained(writes)  # names that are SQL keywords are quoted

    assert len(captured) == 1, [query["sql"] for query in captured.captured_queries]
    assert counts == {"take": 1, "select": 1, "order": 1}
    assert (balance(account), balance(other)) == (Decimal("4"), Decimal("4"))
