from django.contrib import admin

from .models import Credential, CreditAccount, ToolInstance


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):
    list_display = ["__str__", "owner", "provider", "kind", "status", "expires_at", "last_used_at"]
    list_filter = ["provider", "kind", "status"]
    search_fields = ["owner__username", "label"]
    list_select_related = ["owner"]
    # The secret column is never shown: it is excluded, not merely read-only.
    exclude = ["secret"]
    readonly_fields = ["last_used_at", "last_error", "created_at", "updated_at"]


@admin.register(ToolInstance)
class ToolInstanceAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "tool",
        "owner",
        "workflow_id",
        "status",
        "execution_count",
        "failure_count",
        "last_executed_at",
    ]
    list_filter = ["status", "tool"]
    search_fields = ["name", "workflow_id", "owner__username"]
    list_select_related = ["tool", "owner"]
    readonly_fields = [
        "status",
        "execution_count",
        "success_count",
        "failure_count",
        "credits_consumed",
        "total_duration_ms",
        "last_executed_at",
        "created_at",
        "updated_at",
    ]


@admin.register(CreditAccount)
class CreditAccountAdmin(admin.ModelAdmin):
    list_display = ["owner", "balance", "is_unlimited", "updated_at"]
    search_fields = ["owner__username"]
    list_select_related = ["owner"]
    readonly_fields = ["balance"]
