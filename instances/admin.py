from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import Credential, CreditAccount, ToolInstance, UploadedFile
from .services import file_delete


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


@admin.register(UploadedFile)
class UploadedFileAdmin(admin.ModelAdmin):
    """Read-only: files arrive through the API (which hashes them); deleting one here also
    removes its stored bytes."""

    list_display = ["name", "owner", "size_bytes", "content_type", "created_at"]
    search_fields = ["name", "sha256", "owner__username"]
    list_select_related = ["owner"]
    date_hierarchy = "created_at"
    fields = ["id", "owner", "name", "size_bytes", "content_type", "sha256", "stored_at", "created_at"]
    readonly_fields = fields

    @admin.display(description="Stored at")
    def stored_at(self, obj: UploadedFile) -> str:
        # The storage path as text: uploads are not served over HTTP, so there is nothing to link to.
        return obj.file.name

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UploadedFile | None = None) -> bool:
        return False

    def delete_model(self, request: HttpRequest, obj: UploadedFile) -> None:
        file_delete(file=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[UploadedFile]) -> None:
        for upload in queryset:
            file_delete(file=upload)
