"""Operator console: credentials (write-only secrets, audit log), instances (readiness,
transitions) and uploaded files. Every action calls the service the API calls (clearing an
instance's result cache is added by executions/admin.py, where the cache lives)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from core.admin_site import ReadOnlyMixin
from core.errors import ToolexecError
from tools.errors import InputInvalid

from .crypto import SecretUnreadable
from .models import Credential, CredentialAuditEntry, ToolInstance, UploadedFile
from .providers import providers
from .readiness import Readiness, readiness_check, readiness_many
from .selectors import credential_users, slot_credentials
from .services.credentials import (
    SECRET_FIELDS,
    credential_check,
    credential_create,
    credential_delete,
    credential_reencrypt,
    credential_refresh,
    credential_revoke,
    credential_test_connection,
    credential_update,
)
from .services.files import file_delete
from .services.instances import TransitionRefused, instance_config_check, instance_transition, instance_update

# --- Credentials ----------------------------------------------------------------------------


class WriteOnlyTextarea(forms.Textarea):
    """Never renders a value: not the stored secret, nor one typed into a form that failed."""

    def format_value(self, value: Any) -> None:
        return None


class CredentialForm(forms.ModelForm):
    # Not named "secret": that is the model's non-editable ciphertext column.
    new_secret = forms.JSONField(
        label="Secret",
        required=False,
        widget=WriteOnlyTextarea(attrs={"rows": 4, "cols": 60, "autocomplete": "off", "spellcheck": "false"}),
        help_text="Write-only JSON, e.g. "
        + "; ".join(
            f"{kind}: {{{', '.join(f'{name!r}: …' for name in sorted(required))}}}".replace("'", '"')
            for kind, (required, _) in SECRET_FIELDS.items()
        )
        + ". Never shown again; leave empty to keep the stored secret.",
    )

    class Meta:
        model = Credential
        fields = ["owner", "provider", "kind", "label", "expires_at", "metadata"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "provider" in self.fields:
            self.fields["provider"] = forms.ChoiceField(
                choices=[(key, p.display_name) for key, p in sorted(providers().items())]
            )
        if self.instance._state.adding:
            self.fields["new_secret"].required = True

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        credential = self.instance
        provider = data.get("provider", credential.provider)
        kind = data.get("kind", credential.kind)
        secret = data.get("new_secret") or None
        if self.errors or not provider or not kind:
            return data
        try:
            credential_check(provider=provider, kind=kind, secret=secret, metadata=data.get("metadata") or {})
        except InputInvalid as exc:
            for path, problems in exc.metadata.get("field_errors", {}).items():
                field = {"secret": "new_secret"}.get(path.split(".")[0], path.split(".")[0])
                field = field if field in self.fields else None
                for problem in problems:
                    self.add_error(field, f"{path}: {problem}" if field and path != field else problem)
        return data


class ExpiringSoonFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expiry"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("7d", "Expiring within 7 days"), ("expired", "Expired"), ("never", "No expiry")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Credential]) -> QuerySet[Credential]:
        now = timezone.now()
        if self.value() == "7d":
            return queryset.filter(expires_at__gt=now, expires_at__lte=now + timedelta(days=7))
        if self.value() == "expired":
            return queryset.filter(expires_at__lte=now)
        if self.value() == "never":
            return queryset.filter(expires_at__isnull=True)
        return queryset


class CredentialAuditInline(ReadOnlyMixin, admin.TabularInline):
    """The credential's audit log: who changed what (field names only), read-only."""

    model = CredentialAuditEntry
    fk_name = "credential"
    fields = ["created_at", "action", "changed_fields", "actor", "note"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-created_at", "-id"]
    verbose_name_plural = "audit log"

    @admin.display(description="fields")
    def changed_fields(self, entry: CredentialAuditEntry) -> str:
        return ", ".join(entry.fields) or "—"

    def get_queryset(self, request: HttpRequest) -> QuerySet[CredentialAuditEntry]:
        return super().get_queryset(request).select_related("actor")

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("instances.view_credential")


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):
    form = CredentialForm
    list_display = [
        "__str__",
        "owner",
        "provider",
        "kind",
        "status",
        "fingerprint",
        "expires_at",
        "last_used_at",
    ]
    list_filter = ["provider", "kind", "status", ExpiringSoonFilter]
    search_fields = ["owner__username", "label"]
    list_select_related = ["owner"]
    raw_id_fields = ["owner"]
    readonly_fields = ["fingerprint", "refreshable", "status", "last_used_at", "last_error", "created_at", "updated_at"]
    inlines = [CredentialAuditInline]
    actions = ["revoke", "refresh_now", "test_connection", "reencrypt"]
    show_full_result_count = False

    def get_fields(self, request: HttpRequest, obj: Credential | None = None) -> list[str]:
        editable = ["owner", "provider", "kind", "label", "new_secret", "expires_at", "metadata"]
        return editable + (self.readonly_fields if obj is not None else [])

    def get_readonly_fields(self, request: HttpRequest, obj: Credential | None = None) -> list[str]:
        # Owner, provider and kind are what the secret is sealed to and checked against.
        return ["owner", "provider", "kind", *self.readonly_fields] if obj is not None else []

    def save_model(self, request: HttpRequest, obj: Credential, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if not change:
            created = credential_create(
                owner=data["owner"],
                provider=data["provider"],
                kind=data["kind"],
                secret=data["new_secret"],
                label=data.get("label", ""),
                expires_at=data.get("expires_at"),
                metadata=data.get("metadata") or {},
                actor=request.user,
            )
            for field in Credential._meta.concrete_fields:
                setattr(obj, field.attname, getattr(created, field.attname))
            obj._state.adding = False
            return
        changes = {
            name: data[name]
            for name in ("label", "expires_at", "metadata")
            if name in form.changed_data and data[name] != form.initial.get(name)
        }
        if data.get("new_secret"):
            changes["secret"] = data["new_secret"]
        if changes:
            credential_update(credential=obj, actor=request.user, **changes)

    def construct_change_message(self, request: HttpRequest, form: forms.ModelForm, formsets: Any, add: bool = False):
        # Django's history records changed field *names* only ("Secret" says the secret changed,
        # never to what); the form field's label is what lands there.
        return super().construct_change_message(request, form, formsets, add)

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: dict | None = None) -> HttpResponse:
        credential = self.get_object(request, object_id)
        if request.method == "POST" and credential is not None and self.has_delete_permission(request, credential):
            users = credential_users(credential=credential)
            if users:
                names = ", ".join(instance.name for instance in users)
                self.message_user(
                    request, f"Not deleted: instances still use this credential: {names}.", messages.ERROR
                )
                return HttpResponseRedirect(reverse("admin:instances_credential_change", args=[credential.pk]))
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request: HttpRequest, obj: Credential) -> None:
        credential_delete(credential=obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Credential]) -> None:
        for credential in queryset:
            try:
                credential_delete(credential=credential, actor=request.user)
            except ToolexecError as exc:
                self.message_user(request, f"{credential}: {exc.detail}", messages.ERROR)

    @admin.action(description="Mark selected credentials revoked", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[Credential]) -> None:
        for credential in queryset:
            if credential_revoke(credential=credential, actor=request.user):
                self.message_user(request, f"{credential}: revoked.", messages.SUCCESS)
            else:
                self.message_user(request, f"{credential}: was already revoked.", messages.WARNING)

    @admin.action(description="Refresh now (OAuth)", permissions=["change"])
    def refresh_now(self, request: HttpRequest, queryset: QuerySet[Credential]) -> None:
        for credential in queryset:
            try:
                credential_refresh(credential_id=str(credential.pk), actor=request.user)
            except ToolexecError as exc:
                self.message_user(request, f"{credential}: not refreshed: {exc.detail or exc.code}", messages.ERROR)
            except SecretUnreadable as exc:
                self.message_user(request, f"{credential}: not refreshed: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{credential}: refreshed.", messages.SUCCESS)

    @admin.action(description="Test connection", permissions=["change"])
    def test_connection(self, request: HttpRequest, queryset: QuerySet[Credential]) -> None:
        for credential in queryset:
            ok, message = credential_test_connection(credential=credential, actor=request.user)
            self.message_user(request, f"{credential}: {message}", messages.SUCCESS if ok else messages.WARNING)

    @admin.action(description="Re-encrypt with the newest key", permissions=["change"])
    def reencrypt(self, request: HttpRequest, queryset: QuerySet[Credential]) -> None:
        done = 0
        for credential in queryset:
            try:
                credential_reencrypt(credential=credential, actor=request.user)
            except SecretUnreadable as exc:
                self.message_user(request, f"{credential}: not re-encrypted: {exc}", messages.ERROR)
            else:
                done += 1
        if done:
            self.message_user(request, f"Re-encrypted {done} credential{'s' if done != 1 else ''}.", messages.SUCCESS)


@admin.register(CredentialAuditEntry)
class CredentialAuditEntryAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ["created_at", "action", "credential_ref", "owner", "actor", "changed_fields", "note"]
    list_filter = ["action"]
    search_fields = ["owner__username", "actor__username", "=credential_ref"]
    list_select_related = ["owner", "actor"]
    date_hierarchy = "created_at"
    show_full_result_count = False

    @admin.display(description="fields")
    def changed_fields(self, entry: CredentialAuditEntry) -> str:
        return ", ".join(entry.fields) or "—"


# --- Instances -----------------------------------------------------------------------------


def readiness_checklist_html(readiness: Readiness) -> SafeString:
    rows = format_html_join(
        "",
        '<li style="margin:.3em 0"><span style="color:{}">{}</span> <strong>{}</strong>: {}{}</li>',
        (
            (
                "#2e7d32" if check.passed else "#c62828",
                "✔" if check.passed else "✘",
                check.name,
                check.message,
                action_items_html(check.action_items),
            )
            for check in readiness.checks
        ),
    )
    verdict = "Ready to run." if readiness.is_ready else "Not ready."
    return format_html('<p><strong>{}</strong></p><ul style="margin-left:0;padding-left:0">{}</ul>', verdict, rows)


def action_items_html(items: list[dict[str, str]]) -> SafeString:
    if not items:
        return mark_safe("")
    return format_html(
        '<ul style="margin-left:1.5em">{}</ul>',
        format_html_join(
            "",
            '<li>{} ({}) <a href="{}">{}</a></li>',
            (
                (item.get("message", ""), item.get("priority", ""), item.get("url", "#"), item.get("url", ""))
                for item in items
            ),
        ),
    )


class ToolInstanceForm(forms.ModelForm):
    class Meta:
        model = ToolInstance
        fields = ["name", "workflow_id", "config"]

    def clean_config(self) -> Any:
        config = self.cleaned_data["config"]
        try:
            instance_config_check(tool=self.instance.tool, config=config)
        except InputInvalid as exc:
            problems = exc.metadata.get("field_errors", {})
            raise forms.ValidationError(
                [f"{path}: {message}" for path, messages in problems.items() for message in messages] or [exc.detail]
            ) from None
        return config


@admin.register(ToolInstance)
class ToolInstanceAdmin(admin.ModelAdmin):
    form = ToolInstanceForm
    list_display = [
        "name",
        "tool",
        "owner",
        "workflow_id",
        "status",
        "readiness",
        "execution_count",
        "failure_rate_display",
        "credits_consumed",
        "last_executed_at",
    ]
    list_filter = ["status", "tool"]
    search_fields = ["name", "workflow_id", "owner__username"]
    list_select_related = ["tool", "owner__credit_account"]
    fields = [
        "id",
        "name",
        "workflow_id",
        "owner",
        "tool",
        "status",
        "status_reason",
        "config",
        "readiness_checklist",
        "credential_mapping_display",
        "cache_setting",
        "statistics",
        "created_at",
        "updated_at",
    ]
    readonly_fields = [
        "id",
        "owner",
        "tool",
        "status",
        "status_reason",
        "readiness_checklist",
        "credential_mapping_display",
        "cache_setting",
        "statistics",
        "created_at",
        "updated_at",
    ]
    actions = ["activate", "disable"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # instances are created through the API, with an owner's credentials in mind

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        rows = list(changelist.result_list)  # evaluated once; the template iterates these objects
        for instance_id, readiness in readiness_many(rows).items():
            for row in rows:
                if str(row.pk) == instance_id:
                    row.readiness_result = readiness
        return changelist

    @admin.display(description="ready")
    def readiness(self, instance: ToolInstance) -> SafeString:
        result = getattr(instance, "readiness_result", None)
        if result is None:
            return mark_safe("–")
        if result.is_ready:
            return mark_safe('<span style="color:#2e7d32" title="Ready">●&nbsp;ready</span>')
        first = result.failures[0]
        return format_html('<span style="color:#c62828" title="{}">●&nbsp;{}</span>', first.message, first.error_code)

    @admin.display(description="failure rate", ordering="failure_count")
    def failure_rate_display(self, instance: ToolInstance) -> str:
        return f"{instance.failure_rate:.0%}" if instance.execution_count else "—"

    @admin.display(description="readiness")
    def readiness_checklist(self, instance: ToolInstance) -> SafeString:
        return readiness_checklist_html(readiness_check(instance=instance))

    @admin.display(description="credential mappings")
    def credential_mapping_display(self, instance: ToolInstance) -> SafeString:
        slots = instance.tool.credential_slots
        if not slots:
            return mark_safe("This tool needs no credentials.")
        resolved = slot_credentials(instance=instance)
        rows = []
        for slot in slots:
            mapped = instance.credential_mappings.get(slot["name"]) or "—"
            credential = resolved.get(slot["name"])
            if credential is None:
                found = mark_safe("<em>no credential</em>")
            else:
                url = reverse("admin:instances_credential_change", args=[credential.pk])
                found = format_html(
                    '<a href="{}">{}</a> ({}, fingerprint <code>{}</code>)',
                    url,
                    credential.label or credential.pk,
                    credential.status,
                    credential.fingerprint,
                )
            rows.append((slot["name"], slot["provider"], mapped, found))
        return format_html(
            "<table><tr><th>slot</th><th>provider</th><th>mapped to</th><th>resolves to</th></tr>{}</table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )

    @admin.display(description="result cache")
    def cache_setting(self, instance: ToolInstance) -> SafeString:
        if not instance.tool.cacheable:
            return mark_safe("This tool is not cacheable: every run runs it.")
        setting = f"on, results kept {instance.cache_ttl} s" if instance.caches else "off"
        default = (
            " (the tool's default)" if instance.cache_enabled is None and instance.cache_ttl_seconds is None else ""
        )
        entries = reverse("admin:executions_cacheentry_changelist") + f"?instance__id__exact={instance.pk}"
        return format_html('{}{} · <a href="{}">its cache entries</a>', setting, default, entries)

    @admin.display(description="statistics")
    def statistics(self, instance: ToolInstance) -> SafeString:
        average = instance.total_duration_ms // instance.execution_count if instance.execution_count else None
        rows = [
            ("executions", instance.execution_count),
            ("succeeded", instance.success_count),
            ("failed", instance.failure_count),
            ("failure rate", f"{instance.failure_rate:.1%}"),
            ("credits consumed", instance.credits_consumed),
            ("average duration", f"{average} ms" if average is not None else "—"),
            ("last run", instance.last_executed_at or "never"),
        ]
        return format_html("<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows))

    def save_model(self, request: HttpRequest, obj: ToolInstance, form: forms.ModelForm, change: bool) -> None:
        changes = {
            name: form.cleaned_data[name] for name in ("name", "workflow_id", "config") if name in form.changed_data
        }
        if changes:
            instance_update(instance=obj, **changes)

    def _transition(self, request: HttpRequest, queryset: QuerySet[ToolInstance], to: str, done: str) -> None:
        for instance in queryset.select_related("tool"):
            try:
                instance_transition(instance=instance, to=to, reason=f"{done} by {request.user} in the admin")
            except TransitionRefused as exc:
                self.message_user(request, f"{instance.name}: {exc.detail}", messages.ERROR)
            else:
                self.message_user(request, f"{instance.name}: {done}.", messages.SUCCESS)

    @admin.action(description="Activate selected instances", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[ToolInstance]) -> None:
        self._transition(request, queryset, ToolInstance.Status.ACTIVE, "activated")

    @admin.action(description="Disable selected instances", permissions=["change"])
    def disable(self, request: HttpRequest, queryset: QuerySet[ToolInstance]) -> None:
        self._transition(request, queryset, ToolInstance.Status.DISABLED, "disabled")


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
