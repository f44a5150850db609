from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class CoreConfig(AppConfig):
    """What every app stands on: the error catalog and envelope, API tokens, authentication,
    throttles, pagination, redaction, the shared Redis client and the admin site. It imports
    no other app of the project."""

    name = "core"
    verbose_name = "Access"

    def ready(self) -> None:
        from .redaction import install_log_redaction

        install_log_redaction()


class CoreAdminConfig(admin_apps.AdminConfig):
    """Django's admin with the operator console's site (core.admin_site)."""

    default = False  # named in INSTALLED_APPS; the core app itself is CoreConfig
    default_site = "core.admin_site.ToolexecAdminSite"

    def ready(self) -> None:
        super().ready()  # autodiscover: every app's admin module registers its models
        from django.contrib import admin

        from .admin_site import rq_dashboard_guard

        rq_dashboard_guard(admin.site)
