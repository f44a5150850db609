"""Operator console: executions and jobs (read-only records with cancel and retry through the
services), credit accounts and their ledger."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from redis.exceptions import RedisError
from rq.job import Job as RQJob

from core.admin_site import ReadOnlyMixin
from core.errors import ToolexecError
from core.redaction import redact
from instances.models import CreditAccount

from . import events
from .models import CreditLedgerEntry, Execution, Job
from .services.control import job_cancel, job_retry_as_new
from .services.credits import credits_adjust

LEDGER_INLINE_LIMIT = 50


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
    """Executions, jobs and ledger entries are records written by the services only. They grow
    with every run, so their changelists neither count the whole table (the paginator
    estimates) nor drill down by date (``date_hierarchy`` reads every row's date to list the
    years and months that have some): a date filter with fixed choices instead."""

    show_full_result_count = False
    paginator = EstimatedCountPaginator


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


@admin.register(CreditLedgerEntry)
class CreditLedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "account", "kind", "amount", "execution", "reason", "created_by"]
    list_filter = ["created_at", "kind"]
    search_fields = ["account__owner__username", "reason"]
    list_select_related = ["account__owner", "execution", "created_by"]


class LedgerInline(ReadOnlyMixin, admin.TabularInline):
    """The account's newest ledger entries (the full ledger is under Credit ledger entries)."""

    model = CreditLedgerEntry
    fields = ["created_at", "kind", "amount", "reason", "execution", "created_by"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-created_at", "-id"]
    verbose_name_plural = f"ledger (newest {LEDGER_INLINE_LIMIT})"

    def get_queryset(self, request: HttpRequest) -> QuerySet[CreditLedgerEntry]:
        qs = super().get_queryset(request).select_related("execution", "created_by")
        match = request.resolver_match
        account_id = match.kwargs.get("object_id") if match else None
        if account_id and str(account_id).isdigit():
            newest = CreditLedgerEntry.objects.filter(account_id=account_id).order_by("-created_at", "-id")
            qs = qs.filter(pk__in=newest.values("pk")[:LEDGER_INLINE_LIMIT])
        return qs

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("instances.view_creditaccount")


class AdjustBalanceForm(forms.Form):
    amount = forms.DecimalField(max_digits=14, decimal_places=4, help_text="Credits to add; negative to take away.")
    reason = forms.CharField(max_length=300, help_text="Written to the ledger, e.g. “refund for outage 2026-11-20”.")

    def clean_amount(self) -> Decimal:
        amount = self.cleaned_data["amount"]
        if not amount:
            raise forms.ValidationError("Must not be zero.")
        return amount


@admin.register(CreditAccount)
class CreditAccountAdmin(admin.ModelAdmin):
    list_display = ["owner", "balance", "is_unlimited", "updated_at"]
    list_filter = ["is_unlimited"]
    search_fields = ["owner__username"]
    list_select_related = ["owner"]
    fields = ["owner", "balance", "is_unlimited", "created_at", "updated_at"]
    readonly_fields = ["owner", "balance", "created_at", "updated_at"]
    inlines = [LedgerInline]
    actions = ["adjust_balance"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # an account opens with its owner's first instance

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the ledger is the account's history; balances move only by adjustments

    @admin.action(description="Adjust balance…", permissions=["change"])
    def adjust_balance(self, request: HttpRequest, queryset: QuerySet[CreditAccount]) -> HttpResponse | None:
        form = AdjustBalanceForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            for account in queryset:
                credits_adjust(
                    account=account,
                    amount=form.cleaned_data["amount"],
                    reason=form.cleaned_data["reason"],
                    actor=request.user,
                )
                self.message_user(
                    request, f"{account.owner}: balance adjusted by {form.cleaned_data['amount']}.", messages.SUCCESS
                )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Adjust balance",
            "opts": self.model._meta,
            "accounts": queryset.select_related("owner"),
            "form": form,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/instances/creditaccount/adjust_balance.html", context)
