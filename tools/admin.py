"""Operator console: the tool catalog (availability, sync, switching tools on and off)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from .models import ToolDefinition
from .services import catalog_sync, tool_set_active


@admin.register(ToolDefinition)
class ToolDefinitionAdmin(admin.ModelAdmin):
    change_list_template = "admin/tools/tooldefinition/change_list.html"
    list_display = ["name", "slug", "version", "category", "is_active", "availability", "synced_at"]
    list_filter = ["is_active", "is_available", "category"]
    search_fields = ["slug", "name"]
    readonly_fields = [
        "slug",
        "implementation",
        "is_active",
        "is_available",
        "unavailable_reason",
        "synced_at",
        "created_at",
        "updated_at",
    ]
    actions = ["activate", "deactivate"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # definitions come from the registered implementations (Sync catalog)

    @admin.display(description="availability", ordering="is_available")
    def availability(self, definition: ToolDefinition) -> SafeString:
        if definition.is_available:
            return mark_safe('<span style="color:#2e7d32">● available</span>')
        return format_html(
            '<span style="color:#c62828">● unavailable</span><br><small>{}</small>', definition.unavailable_reason
        )

    def get_urls(self) -> list[URLPattern]:
        sync = path("sync/", self.admin_site.admin_view(self.sync_view), name="tools_tooldefinition_sync")
        return [sync, *super().get_urls()]

    def sync_view(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_change_permission(request):
            raise PermissionDenied
        report = catalog_sync()
        parts = [f"{len(report.created)} added", f"{len(report.updated)} updated"]
        self.message_user(request, "Catalog synced: " + ", ".join(parts) + ".", messages.SUCCESS)
        for slug, reason in report.unavailable.items():
            self.message_user(request, f"{slug} is unavailable: {reason}", messages.WARNING)
        return HttpResponseRedirect(reverse("admin:tools_tooldefinition_changelist"))

    def _set_active(self, request: HttpRequest, queryset: QuerySet[ToolDefinition], is_active: bool) -> None:
        for definition in queryset:
            tool_set_active(definition=definition, is_active=is_active)
        count = len(queryset)
        state = "switched on" if is_active else "switched off"
        self.message_user(request, f"{count} tool{'s' if count != 1 else ''} {state}.", messages.SUCCESS)

    @admin.action(description="Activate selected tools", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[ToolDefinition]) -> None:
        self._set_active(request, queryset, True)

    @admin.action(description="Deactivate selected tools", permissions=["change"])
    def deactivate(self, request: HttpRequest, queryset: QuerySet[ToolDefinition]) -> None:
        self._set_active(request, queryset, False)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        extra_context = {**(extra_context or {}), "has_change_permission": self.has_change_permission(request)}
        return super().changelist_view(request, extra_context)
