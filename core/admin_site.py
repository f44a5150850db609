"""The operator console's admin site: the index grouped by what operators do, the django-rq
dashboard for superusers only, and what every app's admin of read-only records builds on."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import NoReverseMatch, reverse
from django.utils.functional import cached_property

# (group name, [(app_label, object_name), ...]) in the order operators look for them.
GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Catalog", [("tools", "ToolDefinition")]),
    (
        "Access",
        [
            ("instances", "Credential"),
            ("instances", "CredentialAuditEntry"),
            ("instances", "ToolInstance"),
            ("instances", "UploadedFile"),
            ("core", "ApiToken"),
            ("auth", "User"),
            ("auth", "Group"),
        ],
    ),
    ("Runs", [("executions", "Execution"), ("executions", "Job"), ("executions", "CacheEntry")]),
    (
        "Workflows",
        [
            ("workflows", "Workflow"),
            ("workflows", "WorkflowVersion"),
            ("workflows", "WorkflowRun"),
            ("workflows", "StepRun"),
        ],
    ),
    ("Billing", [("credits", "CreditAccount"), ("credits", "CreditLedgerEntry")]),
]


class ToolexecAdminSite(admin.AdminSite):
    site_header = "toolexec operator console"
    site_title = "toolexec console"
    index_title = "Operations"

    def get_app_list(self, request: HttpRequest, app_label: str | None = None) -> list[dict[str, Any]]:
        if app_label is not None:
            return super().get_app_list(request, app_label)
        models = {
            (app["app_label"], model["object_name"]): model
            for app in self._build_app_dict(request).values()
            for model in app["models"]
        }
        grouped: list[dict[str, Any]] = []
        for name, keys in GROUPS:
            entries = [models.pop(key) for key in keys if key in models]
            if name == "Runs" and request.user.is_superuser:
                entries.append(rq_dashboard_entry())
            if entries:
                grouped.append(_group(name, entries))
        if models:  # anything registered later still shows, under its own heading
            grouped.append(_group("Other", sorted(models.values(), key=lambda m: m["name"])))
        return grouped


def _group(name: str, models: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "app_label": name.lower(),
        "app_url": models[0]["admin_url"] or "",
        "has_module_perms": True,
        "models": models,
    }


def rq_dashboard_entry() -> dict[str, Any]:
    try:
        url = reverse("django_rq:home")
    except NoReverseMatch:
        url = "/admin/django-rq/"
    return {
        "name": "Queues (django-rq dashboard)",
        "object_name": "RQDashboard",
        "admin_url": url,
        "add_url": None,
        "view_only": True,
        "perms": {"view": True},
    }


def superuser_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """django-rq's views only ask for staff; its dashboard can delete and requeue jobs and
    shows their arguments, so here it is for superusers only."""

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("admin:login"))
        if not request.user.is_superuser:
            raise PermissionDenied("The queue dashboard is for superusers.")
        return view(request, *args, **kwargs)

    return guarded


def rq_dashboard_guard(site: admin.AdminSite) -> None:
    """Drop django-rq's second copy of its dashboard inside the admin (a "Dashboard" model
    whose pages only ask for staff); the URLconf mounts the superuser-only one
    (:func:`rq_dashboard_urls`) and the index links it."""
    import django_rq.models

    if site.is_registered(django_rq.models.Dashboard):
        site.unregister(django_rq.models.Dashboard)


def rq_dashboard_urls() -> tuple[list, str]:
    """django-rq's URLs for /admin/django-rq/: its dashboard views wrapped in
    :func:`superuser_required` (django-rq's own hook), its stats API as django-rq guards it."""
    from django_rq.urls import get_admin_urlpatterns, get_api_urlpatterns

    return [*get_api_urlpatterns(), *get_admin_urlpatterns(view_wrapper=superuser_required)], "django_rq"


class ReadOnlyMixin:
    """For ModelAdmins and inlines of records only the services write: no add, change or delete."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class EstimatedCountPaginator(Paginator):
    """A changelist paginator for tables that grow with every run: the unfiltered list takes
    PostgreSQL's row estimate (``pg_class.reltuples``, kept current by autovacuum's ANALYZE)
    instead of a ``COUNT(*)`` that reads the whole table on every page view. A filtered list,
    or a table under ``exact_below`` rows, is counted exactly. The admin's page links need a
    count; near the end of an estimated list the last page may come out short."""

    exact_below = 10_000
    estimated = False

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if isinstance(queryset, QuerySet) and not queryset.query.where:
            connection = connections[queryset.db]
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                        [connection.ops.quote_name(queryset.model._meta.db_table)],
                    )
                    row = cursor.fetchone()
                if row and row[0] >= self.exact_below:  # -1: never analysed
                    self.estimated = True
                    return int(row[0])
        return super().count


class ReadOnlyAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """For records written by the services only that grow with every run (executions, jobs,
    ledger entries): their changelists neither count the whole table (the paginator
    estimates) nor drill down by date (``date_hierarchy`` reads every row's date to list the
    years and months that have some): a date filter with fixed choices instead."""

    show_full_result_count = False
    paginator = EstimatedCountPaginator
