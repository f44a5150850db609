"""A run's ledger line is linked from the run (issue 20): ``Execution.ledger_entry`` takes the
place of ``CreditLedgerEntry.execution``, so the credits app depends on no app above it.
The links are copied over in one UPDATE, then the old column goes, and the ledger's model
leaves this app's state (credits.0001 holds it)."""

import django.db.models.deletion
from django.db import migrations, models
from django.db.models import Exists, OuterRef, Subquery


def links_to_executions(apps, schema_editor) -> None:
    execution_model = apps.get_model("executions", "Execution")
    ledger = apps.get_model("executions", "CreditLedgerEntry")  # the old state: it still has the column
    entry_of = ledger.objects.filter(execution_id=OuterRef("pk"))
    execution_model.objects.filter(Exists(entry_of)).update(ledger_entry_id=Subquery(entry_of.values("pk")[:1]))


def links_to_ledger(apps, schema_editor) -> None:
    execution_model = apps.get_model("executions", "Execution")
    ledger = apps.get_model("executions", "CreditLedgerEntry")
    execution_of = execution_model.objects.filter(ledger_entry_id=OuterRef("pk"))
    ledger.objects.filter(Exists(execution_of)).update(execution_id=Subquery(execution_of.values("pk")[:1]))


class Migration(migrations.Migration):
    dependencies = [
        ("executions", "0005_creditledgerentry_table"),
        ("credits", "0001_initial"),
    ]

    operations = [
        # The old link lets go of the name ``Execution.ledger_entry`` (no change in the database).
        migrations.AlterField(
            model_name="creditledgerentry",
            name="execution",
            field=models.OneToOneField(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="executions.execution",
            ),
        ),
        migrations.AddField(
            model_name="execution",
            name="ledger_entry",
            field=models.OneToOneField(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="execution",
                to="credits.creditledgerentry",
            ),
        ),
        migrations.RunPython(links_to_executions, links_to_ledger),
        migrations.RemoveField(model_name="creditledgerentry", name="execution"),
        migrations.SeparateDatabaseAndState(state_operations=[migrations.DeleteModel(name="CreditLedgerEntry")]),
    ]
