"""The floor's run links its ledger entry, as the product's does (credits depends on no app above it)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("bench", "0001_initial"),
    ]

    operations = [
        migrations.RemoveField(
            model_name="floorledgerentry",
            name="execution",
        ),
        migrations.AddField(
            model_name="floorexecution",
            name="ledger_entry",
            field=models.OneToOneField(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="bench.floorledgerentry",
            ),
        ),
    ]
