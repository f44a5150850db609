"""Moving credit accounts and the ledger into the credits app keeps every row: ids, balances,
the link between a run and its ledger line (now held by the run), and the content types that
permissions and admin log entries point at. Real migrations, run backwards to the schema before
the move and forwards again, on the test database."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from credits.models import CreditAccount, CreditLedgerEntry
from executions.models import Execution

# The last migrations before the move; credits did not exist.
BEFORE_THE_MOVE = [
    ("instances", "0003_credentialauditentry"),
    ("executions", "0004_job_run_after"),
    ("credits", None),
    ("workflows", None),  # it came later, and stands on the executions of today
]

pytestmark = pytest.mark.django_db(transaction=True)


def migrate(targets: list[tuple[str, str | None]]):
    """Migrate the test database to ``targets``; the apps (historical models) of that state,
    every other app at its latest."""
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    executor.loader.build_graph()
    named = {app for app, _ in targets}
    others = [node for node in executor.loader.graph.leaf_nodes() if node[0] not in named]
    return executor.loader.project_state(others + [target for target in targets if target[1]]).apps


def latest() -> list[tuple[str, str | None]]:
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


def test_moving_credits_to_their_app_keeps_accounts_ledger_and_the_link_to_each_run():
    end = latest()
    try:
        old = migrate(BEFORE_THE_MOVE)
        content_type = old.get_model("contenttypes", "ContentType")
        account_type = content_type.objects.get_or_create(app_label="instances", model="creditaccount")[0]
        ledger_type = content_type.objects.get_or_create(app_label="executions", model="creditledgerentry")[0]
        owner = old.get_model("auth", "User").objects.create(username="moved")
        tool = old.get_model("tools", "ToolDefinition").objects.create(
            slug="moved-tool", name="Moved", implementation="nowhere.Moved"
        )
        execution_model = old.get_model("executions", "Execution")
        charged = execution_model.objects.create(tool=tool, owner=owner, mode="SYNC", status="COMPLETED")
        free = execution_model.objects.create(tool=tool, owner=owner, mode="SYNC", status="COMPLETED")
        account = old.get_model("instances", "CreditAccount").objects.create(owner=owner, balance=Decimal("97.25"))
        ledger = old.get_model("executions", "CreditLedgerEntry")
        charge = ledger.objects.create(account=account, kind="EXECUTION", amount=Decimal("-0.75"), execution=charged)
        adjustment = ledger.objects.create(account=account, kind="ADJUSTMENT", amount=Decimal("-2"), reason="refund")

        migrate(end)

        assert CreditAccount.objects.get(pk=account.pk).balance == Decimal("97.25")
        assert CreditAccount.objects.get(pk=account.pk).owner_id == owner.pk
        moved_charge = CreditLedgerEntry.objects.get(pk=charge.pk)
        assert (moved_charge.account_id, moved_charge.amount) == (account.pk, Decimal("-0.75"))
        assert moved_charge.execution.pk == charged.pk
        assert Execution.objects.get(pk=charged.pk).ledger_entry_id == charge.pk
        assert CreditLedgerEntry.objects.filter(execution=charged.pk).get().pk == charge.pk
        assert not Execution.objects.filter(pk=free.pk, ledger_entry__isnull=False).exists()
        assert not CreditLedgerEntry.objects.filter(pk=adjustment.pk, execution__isnull=False).exists()
        assert CreditLedgerEntry.objects.get(pk=adjustment.pk).reason == "refund"
        # The same content types, renamed: permissions and admin log entries follow the models.
        assert ContentType.objects.get(pk=account_type.pk).app_label == "credits"
        assert ContentType.objects.get(pk=ledger_type.pk).app_label == "credits"
        assert ContentType.objects.get_for_model(CreditAccount).pk == account_type.pk
        # New rows take ids after the moved ones (the tables kept their sequences).
        newcomer = old.get_model("auth", "User").objects.create(username="new")
        assert CreditAccount.objects.create(owner_id=newcomer.pk).pk > account.pk
    finally:
        migrate(end)


def test_moving_credits_back_restores_the_link_on_the_ledger():
    """The migrations undo: the ledger line points at its run again."""
    end = latest()
    try:
        before = migrate(end)
        owner = before.get_model("auth", "User").objects.create(username="undone")
        tool = before.get_model("tools", "ToolDefinition").objects.create(
            slug="undone-tool", name="Undone", implementation="nowhere.Undone"
        )
        account = before.get_model("credits", "CreditAccount").objects.create(owner=owner, balance=Decimal("5"))
        entry = before.get_model("credits", "CreditLedgerEntry").objects.create(
            account=account, kind="EXECUTION", amount=Decimal("-1")
        )
        execution = before.get_model("executions", "Execution").objects.create(
            tool=tool, owner=owner, mode="SYNC", status="COMPLETED", ledger_entry=entry
        )

        old = migrate(BEFORE_THE_MOVE)

        restored = old.get_model("executions", "CreditLedgerEntry").objects.get(pk=entry.pk)
        assert restored.execution_id == execution.pk
        assert old.get_model("instances", "CreditAccount").objects.get(pk=account.pk).balance == Decimal("5")
    finally:
        migrate(end)
