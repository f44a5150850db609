"""API tokens moved to the core app (issue 20): the table is renamed, its rows, ids and
indexes kept; the model leaves this app's state and core.0001 takes it up."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("toolexec", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.AlterModelTable(name="ApiToken", table="core_apitoken")],
            state_operations=[migrations.DeleteModel(name="ApiToken")],
        ),
    ]
