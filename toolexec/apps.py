from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class ToolexecConfig(AppConfig):
    name = "toolexec"
    verbose_name = "Access"

    def ready(self) -> None:
        from .redaction import install_log_redaction

        install_log_redaction()


class ToolexecAdminConfig(admin_apps.AdminConfig):
    """Django's admin with the operator console's site (toolexec.admin_site)."""

    default = False  # named in INSTALLED_APPS; the toolexec app itself stays ToolexecConfig
    default_site = "toolexec.admin_site.ToolexecAdminSite"

    def ready(self) -> None:
        super().ready()  # autodiscover: every app's admin module registers its models
        from django.contrib import admin

        from .admin_site import rq_dashboard_guard

        rq_dashboard_guard(admin.site)
