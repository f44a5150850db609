"""Credit accounts and the ledger, moved here with their rows from the instances and executions
apps (instances.0004 and executions.0005 renamed the tables): this creates the models' state
only. Their content types (and so their permissions and admin log entries) move with them.

The ledger's link to a run is not here: executions.0006 moves it onto the run
(``Execution.ledger_entry``), copying the links, so this app depends on no app above it."""

import django.db.models.deletion
from decimal import Decimal
from django.conf import settings
from django.db import migrations, models

MOVED = (("instances", "creditaccount"), ("executions", "creditledgerentry"))


def content_types_to_credits(apps, schema_editor) -> None:
    content_types = apps.get_model("contenttypes", "ContentType")
    for app_label, model in MOVED:
        if not content_types.objects.filter(app_label="credits", model=model).exists():
            content_types.objects.filter(app_label=app_label, model=model).update(app_label="credits")


def content_types_back(apps, schema_editor) -> None:
    content_types = apps.get_model("contenttypes", "ContentType")
    for app_label, model in MOVED:
        if not content_types.objects.filter(app_label=app_label, model=model).exists():
            content_types.objects.filter(app_label="credits", model=model).update(app_label=app_label)


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("contenttypes", "0002_remove_content_type_name"),
        ("instances", "0004_creditaccount_table"),
        ("executions", "0005_creditledgerentry_table"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="CreditAccount",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("balance", models.DecimalField(decimal_places=4, default=Decimal("0"), max_digits=14)),
                        ("is_unlimited", models.BooleanField(default=False)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        ("updated_at", models.DateTimeField(auto_now=True)),
                        (
                            "owner",
                            models.OneToOneField(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="credit_account",
                                to=settings.AUTH_USER_MODEL,
                            ),
                        ),
                    ],
                ),
                migrations.CreateModel(
                    name="CreditLedgerEntry",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        (
                            "kind",
                            models.CharField(
                                choices=[
                                    ("EXECUTION", "Execution charge"),
                                    ("ADJUSTMENT", "Manual adjustment"),
                                    ("GRANT", "Opening grant"),
                                ],
                                max_length=12,
                            ),
                        ),
                        (
                            "amount",
                            models.DecimalField(decimal_places=4, help_text="Negative for a charge.", max_digits=14),
                        ),
                        ("reason", models.CharField(blank=True, max_length=300)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        (
                            "account",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="ledger",
                                to="credits.creditaccount",
                            ),
                        ),
                        (
                            "created_by",
                            models.ForeignKey(
                                blank=True,
                                null=True,
                                on_delete=django.db.models.deletion.SET_NULL,
                                related_name="+",
                                to=settings.AUTH_USER_MODEL,
                            ),
                        ),
                    ],
                    options={
                        "verbose_name_plural": "credit ledger entries",
                        "ordering": ["-created_at", "-id"],
                        "indexes": [
                            models.Index(fields=["account", "-created_at"], name="ledger_account_created_idx"),
                        ],
                    },
                ),
            ],
        ),
        migrations.RunPython(content_types_to_credits, content_types_back),
    ]
