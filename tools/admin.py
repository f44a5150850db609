from django.contrib import admin

from .models import ToolDefinition


@admin.register(ToolDefinition)
class ToolDefinitionAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "version", "category", "is_active", "is_available", "synced_at"]
    list_filter = ["is_active", "is_available", "category"]
    search_fields = ["slug", "name"]
    readonly_fields = [
        "slug",
        "implementation",
        "is_available",
        "unavailable_reason",
        "synced_at",
        "created_at",
        "updated_at",
    ]
