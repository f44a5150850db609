"""Credit accounts are the credits app's now (credits.0001): the model leaves this app's state,
once the ledger that pointed at it here has moved too (executions.0006). Nothing changes in the
database."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("instances", "0004_creditaccount_table"),
        ("executions", "0006_execution_ledger_entry"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(state_operations=[migrations.DeleteModel(name="CreditAccount")]),
    ]
