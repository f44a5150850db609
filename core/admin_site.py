"""The operator console's admin site: the index grouped by what operators do, and the
django-rq dashboard for superusers only."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.urls import NoReverseMatch, reverse

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
    ("Runs", [("executions", "Execution"), ("executions", "Job")]),
    ("Billing", [("instances", "CreditAccount"), ("executions", "CreditLedgerEntry")]),
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
