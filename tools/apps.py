from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import post_migrate


def _sync_after_migrate(sender: AppConfig, *, using: str = "default", **kwargs: object) -> None:
    """`migrate` leaves the catalog in step with the code (unless the table was just dropped)."""
    from .models import ToolDefinition
    from .services import catalog_sync

    if ToolDefinition._meta.db_table in connections[using].introspection.table_names():
        catalog_sync()


class ToolsConfig(AppConfig):
    name = "tools"
    verbose_name = "Catalog"

    def ready(self) -> None:
        from . import builtin  # noqa: F401  (built-in tools register themselves on import)
        from .registry import load_entry_points

        load_entry_points()
        post_migrate.connect(_sync_after_migrate, sender=self, dispatch_uid="tools.catalog_sync")
