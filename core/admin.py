from django.contrib import admin

from .models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["prefix", "user", "name", "created_at"]
    search_fields = ["user__username", "prefix", "name"]
    list_select_related = ["user"]
    readonly_fields = ["prefix", "created_at"]
    fields = ["user", "name", "prefix", "created_at"]

    def has_add_permission(self, request) -> bool:
        # A token's key is shown only when issued: use POST /api/v1/auth/token/.
        return False
