"""Operator console: executions and jobs (read-only records with cancel and retry through the
services), and the result cache's entries (read-only, with a purge)."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from redis.exceptions import RedisError
from rq.job import Job as RQJob

from core.admin_site import ReadOnlyAdmin
from core.errors import ToolexecError
from core.redaction import redact
from core.words import bytes_words
from instances.admin import ToolInstanceAdmin
from instances.models import ToolInstance

from . import events
from .models import CacheEntry, Execution, Job
from .services.cache import cache_clear, cache_purge_expired
from .services.control import job_cancel, job_retry_as_new


def pretty_json(value: Any) -> SafeString:
    text = json.dumps(redact(value), indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return format_html('<pre style="white-space:pre-wrap;max-width:60em">{}</pre>', text)


def admin_link(obj: Any, text: Any = None) -> SafeString:
    if obj is None:
        return mark_safe("—")
    meta = obj._meta
    url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text if text is not None else obj)


@admin.display(description="id", ordering="created_at")
def short_id(obj: Any) -> str:
    return str(obj.pk)[:8]


def execution_admin_link(execution_id: Any) -> SafeString:
    """A link to a run's admin page by its id alone (no query for the run)."""
    if execution_id is None:
        return mark_safe("a run no longer recorded")
    url = reverse("admin:executions_execution_change", args=[execution_id])
    return format_html('<a href="{}">{}</a>', url, execution_id)


class ExecutionChangeList(ChangeList):
    """Rows carry what the list shows: the tool and the owner (the record page's queryset also
    joins the instance and the job), and not the run's documents, which only its page shows."""

    deferred = ["input_data", "output_data", "error_message", "error_metadata"]

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Execution]:
        queryset = super().get_queryset(request, exclude_parameters)
        return queryset.select_related(None).select_related(*self.list_select_related).defer(*self.deferred)


@admin.register(Execution)
class ExecutionAdmin(ReadOnlyAdmin):
    list_display_links = [short_id]
    list_display = [
        short_id,
        "tool",
        "owner",
        "mode",
        "status",
        "error_code",
        "credits_consumed",
        "duration_ms",
        "created_at",
    ]
    list_filter = ["created_at", "status", "mode", "tool", "owner"]
    search_fields = ["=id", "owner__username", "error_code"]
    list_select_related = ["tool", "owner"]
    fields = [
        "id",
        "tool",
        "owner",
        "instance_link",
        "job_link",
        "mode",
        "status",
        "created_at",
        "started_at",
        "finished_at",
        "duration_ms",
        "credits_consumed",
        "cache_hit",
        "source_link",
        "cache_report",
        "inputs",
        "output",
        "error_code",
        "error_message",
        "error_action_items",
        "error_details",
    ]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Execution]:
        return super().get_queryset(request).select_related("tool", "owner", "instance", "job")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ExecutionChangeList

    @admin.display(description="instance")
    def instance_link(self, execution: Execution) -> SafeString:
        return admin_link(execution.instance)

    @admin.display(description="job")
    def job_link(self, execution: Execution) -> SafeString:
        job = getattr(execution, "job", None) if execution.mode == "ASYNC" else None
        return admin_link(job, f"{job.pk} ({job.status})" if job else None)

    @admin.display(description="served from the result of")
    def source_link(self, execution: Execution) -> SafeString:
        return execution_admin_link(execution.source_execution_id) if execution.cache_hit else mark_safe("—")

    @admin.display(description="cache")
    def cache_report(self, execution: Execution) -> SafeString:
        return pretty_json(execution.cache) if execution.cache else mark_safe("—")

    @admin.display(description="input (secrets redacted)")
    def inputs(self, execution: Execution) -> SafeString:
        return pretty_json(execution.input_data)

    @admin.display(description="output")
    def output(self, execution: Execution) -> SafeString:
        return pretty_json(execution.output_data)

    @admin.display(description="what to do")
    def error_action_items(self, execution: Execution) -> SafeString:
        items = (execution.error_metadata or {}).get("action_items") or []
        if not items:
            return mark_safe("—")
        return format_html(
            '<ul style="margin:0;padding-left:1.2em">{}</ul>',
            format_html_join(
                "",
                '<li>{} ({}) <a href="{}">{}</a></li>',
                ((i.get("message", ""), i.get("priority", ""), i.get("url", "#"), i.get("url", "")) for i in items),
            ),
        )

    @admin.display(description="error metadata")
    def error_details(self, execution: Execution) -> SafeString:
        return pretty_json(execution.error_metadata)


class QueueFilter(admin.SimpleListFilter):
    """The queues of the settings (``RQ_QUEUES``): the admin's own filter on ``queue`` would ask
    the jobs table for its distinct values, a scan of every job on every page view."""

    title = "queue"
    parameter_name = "queue"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(name, name) for name in settings.RQ_QUEUES]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        return queryset.filter(queue=self.value()) if self.value() else queryset


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display_links = [short_id]
    list_display = [
        short_id,
        "execution_link",
        "owner",
        "status",
        "progress_bar",
        "current_step",
        "rq_state",
        "attempts",
        "created_at",
    ]
    list_filter = ["created_at", "status", QueueFilter]
    search_fields = ["=id", "owner__username", "rq_job_id"]
    list_select_related = ["execution__tool", "owner", "instance"]
    actions = ["cancel", "retry"]
    fields = [
        "id",
        "execution_link",
        "instance_link",
        "owner",
        "queue",
        "status",
        "progress_bar",
        "current_step",
        "rq_job_id",
        "rq_state",
        "attempts",
        "max_attempts",
        "attempt_history",
        "worker_name",
        "heartbeat_at",
        "cancel_requested_at",
        "enqueued_at",
        "started_at",
        "finished_at",
        "created_at",
    ]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        return super().get_queryset(request).select_related("execution__tool", "owner", "instance")

    def has_operate_permission(self, request: HttpRequest) -> bool:
        """Cancel and retry change what runs: they need the change permission on jobs,
        although the records themselves are never edited."""
        return request.user.has_perm("executions.change_job")

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        rows = list(changelist.result_list)
        states = rq_states([row.rq_job_id for row in rows if row.rq_job_id])
        for row in rows:
            row.rq_state_value = states.get(row.rq_job_id, "—")
        return changelist

    @admin.display(description="execution")
    def execution_link(self, job: Job) -> SafeString:
        return admin_link(job.execution, f"{job.execution.tool.name} ({job.execution.status})")

    @admin.display(description="instance")
    def instance_link(self, job: Job) -> SafeString:
        return admin_link(job.instance)

    @admin.display(description="progress", ordering="progress")
    def progress_bar(self, job: Job) -> SafeString:
        return format_html(
            '<progress value="{}" max="100" style="width:8em;vertical-align:middle"></progress> {}%',
            job.progress,
            job.progress,
        )

    @admin.display(description="RQ state")
    def rq_state(self, job: Job) -> str:
        if hasattr(job, "rq_state_value"):
            return job.rq_state_value
        if not job.rq_job_id:
            return "—"
        return rq_states([job.rq_job_id]).get(job.rq_job_id, "—")

    @admin.display(description="attempts")
    def attempt_history(self, job: Job) -> SafeString:
        return pretty_json(job.attempt_log)

    @admin.action(description="Cancel selected jobs (queued or running)", permissions=["operate"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        for job in queryset.select_related("execution__tool"):
            try:
                job = job_cancel(job=job)
            except ToolexecError as exc:
                self.message_user(request, f"Job {job.pk}: {exc.detail}", messages.ERROR)
            else:
                state = "cancelled" if job.status == Job.Status.CANCELLED else "asked to stop"
                self.message_user(request, f"Job {job.pk}: {state}.", messages.SUCCESS)

    @admin.action(description="Retry selected jobs as new runs", permissions=["operate"])
    def retry(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        for job in queryset:
            try:
                new = job_retry_as_new(job=job, actor=request.user)
            except ToolexecError as exc:
                detail = exc.detail or exc.envelope().get("error_message", exc.code.value)
                self.message_user(request, f"Job {job.pk}: not retried: {detail}", messages.ERROR)
            else:
                self.message_user(request, f"Job {job.pk}: retried as job {new.pk}.", messages.SUCCESS)


class CacheEntryChangeList(ChangeList):
    """Rows without their output: it can be a megabyte each, and the list never shows it."""

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[CacheEntry]:
        return super().get_queryset(request, exclude_parameters).defer("output")


class ExpiredFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expired"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "Expired"), ("no", "Still served")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> QuerySet[CacheEntry]:
        # Both on the expiry index (cache_expires_idx).
        if self.value() == "yes":
            return queryset.filter(expires_at__lte=timezone.now())
        if self.value() == "no":
            return queryset.filter(expires_at__gt=timezone.now())
        return queryset


@admin.register(CacheEntry)
class CacheEntryAdmin(ReadOnlyAdmin):
    """The result cache's entries: what each is and how much it is used. What an entry holds is
    shown on its page only to staff with ``executions.view_cacheentry``; staff who may view
    executions see the rest (which instance, tool and run, size, expiry, hits) and no output.
    Purging takes ``executions.delete_cacheentry``."""

    list_display_links = [short_id]
    list_display = [
        short_id,
        "tool",
        "owner",
        "instance",
        "size",
        "created_at",
        "expires_at",
        "hits",
        "last_hit_at",
    ]
    list_filter = [ExpiredFilter, "tool"]
    search_fields = ["=key", "owner__username", "instance__name"]
    list_select_related = ["tool", "owner", "instance"]
    actions = ["purge"]
    fields = [
        "key",
        "tool",
        "tool_version",
        "owner",
        "instance_link",
        "source_link",
        "size",
        "created_at",
        "expires_at",
        "hits",
        "last_hit_at",
        "output",
    ]

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_view_permission(request, obj) or request.user.has_perm("executions.view_execution")

    def may_see_output(self, request: HttpRequest) -> bool:
        return request.user.has_perm("executions.view_cacheentry")

    def has_purge_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("executions.delete_cacheentry")

    def get_fields(self, request: HttpRequest, obj: CacheEntry | None = None) -> list[str]:
        if self.may_see_output(request):
            return self.fields
        return [*self.fields[:-1], "output_withheld"]

    def get_readonly_fields(self, request: HttpRequest, obj: CacheEntry | None = None) -> list[str]:
        return self.get_fields(request, obj)

    def get_queryset(self, request: HttpRequest) -> QuerySet[CacheEntry]:
        queryset = super().get_queryset(request).select_related("tool", "owner", "instance")
        return queryset if self.may_see_output(request) else queryset.defer("output")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return CacheEntryChangeList

    @admin.display(description="size", ordering="size_bytes")
    def size(self, entry: CacheEntry) -> str:
        return bytes_words(entry.size_bytes)

    @admin.display(description="instance")
    def instance_link(self, entry: CacheEntry) -> SafeString:
        return admin_link(entry.instance)

    @admin.display(description="stored by the run")
    def source_link(self, entry: CacheEntry) -> SafeString:
        return execution_admin_link(entry.source_execution_id)

    @admin.display(description="output (secrets redacted)")
    def output(self, entry: CacheEntry) -> SafeString:
        return pretty_json(entry.output)

    @admin.display(description="output")
    def output_withheld(self, entry: CacheEntry) -> str:
        return "Not shown: seeing a cached output takes the “Can view cache entry” permission."

    @admin.action(description="Purge selected entries, and every expired one", permissions=["purge"])
    def purge(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> None:
        # Deleting an entry only makes the next identical run miss: nothing else refers to it.
        selected, _ = queryset.delete()
        expired = 0
        while (done := cache_purge_expired()) > 0:
            expired += done
        self.message_user(request, f"Purged {selected} selected and {expired} expired cache entries.", messages.SUCCESS)


def rq_states(rq_job_ids: list[str]) -> dict[str, str]:
    """RQ's own state of each job, fetched in one round trip ("gone" once RQ forgot it)."""
    if not rq_job_ids:
        return {}
    try:
        fetched = RQJob.fetch_many(rq_job_ids, connection=events.redis())
    except RedisError:
        return dict.fromkeys(rq_job_ids, "Redis unavailable")
    states = {}
    for rq_job_id, rq_job in zip(rq_job_ids, fetched, strict=True):
        status = rq_job.get_status(refresh=False) if rq_job is not None else None
        states[rq_job_id] = "gone" if rq_job is None else str(getattr(status, "value", status) or "unknown")
    return states


class InstanceAdmin(ToolInstanceAdmin):
    """The instance admin, with the action that needs the result cache (which lives here)."""

    actions = [*ToolInstanceAdmin.actions, "clear_cache"]

    @admin.action(description="Clear the cached results of selected instances", permissions=["change"])
    def clear_cache(self, request: HttpRequest, queryset: QuerySet[ToolInstance]) -> None:
        for instance in queryset:
            cleared = cache_clear(instance=instance)
            self.message_user(
                request,
                f"{instance.name}: {cleared} cached result{'s' if cleared != 1 else ''} cleared.",
                messages.SUCCESS,
            )


admin.site.unregister(ToolInstance)
admin.site.register(ToolInstance, InstanceAdmin)
