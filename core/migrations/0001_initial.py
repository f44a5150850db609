"""API tokens, moved here from the toolexec app with their rows (toolexec.0002 renamed the
table): this creates the model's state only. Its content type (and so its permissions) moves
with it."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def content_type_to_core(apps, schema_editor) -> None:
    content_types = apps.get_model("contenttypes", "ContentType")
    if not content_types.objects.filter(app_label="core", model="apitoken").exists():
        content_types.objects.filter(app_label="toolexec", model="apitoken").update(app_label="core")


def content_type_to_toolexec(apps, schema_editor) -> None:
    content_types = apps.get_model("contenttypes", "ContentType")
    if not content_types.objects.filter(app_label="toolexec", model="apitoken").exists():
        content_types.objects.filter(app_label="core", model="apitoken").update(app_label="toolexec")


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("contenttypes", "0002_remove_content_type_name"),
        ("toolexec", "0002_apitoken_to_core"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="ApiToken",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("key_hash", models.CharField(editable=False, max_length=64, unique=True)),
                        (
                            "prefix",
                            models.CharField(
                                editable=False,
                                help_text="The key's first characters, to tell tokens apart.",
                                max_length=8,
                            ),
                        ),
                        ("name", models.CharField(blank=True, max_length=100)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        (
                            "user",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="api_tokens",
                                to=settings.AUTH_USER_MODEL,
                            ),
                        ),
                    ],
                    options={"verbose_name": "API token"},
                ),
            ],
        ),
        migrations.RunPython(content_type_to_core, content_type_to_toolexec),
    ]
