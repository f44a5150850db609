from django.contrib import admin

from .models import CreditLedgerEntry, Execution, Job


class ReadOnlyAdmin(admin.ModelAdmin):
    """Executions, jobs and ledger entries are records written by the services only."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Execution)
class ExecutionAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "tool",
        "owner",
        "mode",
        "status",
        "error_code",
        "credits_consumed",
        "duration_ms",
        "created_at",
    ]
    list_filter = ["status", "mode", "tool"]
    search_fields = ["id", "owner__username", "error_code"]
    list_select_related = ["tool", "owner"]
    date_hierarchy = "created_at"
    show_full_result_count = False


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = ["id", "execution", "owner", "status", "progress", "current_step", "attempts", "created_at"]
    list_filter = ["status", "queue"]
    list_select_related = ["execution", "execution__tool", "owner"]
    show_full_result_count = False


@admin.register(CreditLedgerEntry)
class CreditLedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["account", "kind", "amount", "execution", "reason", "created_at"]
    list_filter = ["kind"]
    list_select_related = ["account__owner", "execution"]
    show_full_result_count = False
