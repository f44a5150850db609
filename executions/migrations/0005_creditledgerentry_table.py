"""The credit ledger moves to the credits app (issue 20): first its table takes the credits
app's name, rows and ids kept. credits.0001 then takes the model up, and 0006 turns the link to
the run around and lets the model go here."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("executions", "0004_job_run_after"),
        ("instances", "0004_creditaccount_table"),
    ]

    operations = [
        migrations.AlterModelTable(name="creditledgerentry", table="credits_creditledgerentry"),
    ]
