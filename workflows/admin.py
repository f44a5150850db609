"""Operator console: workflows (name, key and description editable through the service;
readiness of every step), their versions (read-only, the definition formatted), and runs
with their step runs inline (read-only records), cancelled and retried through the services
the API calls."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import ValidationError
from django.db.models import QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from redis.exceptions import RedisError

from core.admin_site import ReadOnlyAdmin, ReadOnlyMixin
from core.errors import ToolexecError
from executions.admin import admin_link, execution_admin_link, pretty_json, short_id
from instances.admin import action_items_html

from .models import StepRun, Workflow, WorkflowRun, WorkflowVersion
from .services.readiness import workflow_readiness
from .services.runs import run_cancel, run_retry
from .services.workflows import WorkflowBusy, workflow_delete, workflow_update

STEP_RUNS_INLINE = 100  # a run's step runs on its page; the step run list has every one


def status_page_link(url: str) -> SafeString:
    return format_html('<a href="{}">{}</a>', url, url)


def error_html(error: dict[str, Any] | None) -> SafeString:
    """An error envelope in words: its message and code, and what to do."""
    if not error:
        return mark_safe("—")
    metadata = error.get("metadata") if isinstance(error.get("metadata"), dict) else {}
    items = metadata.get("action_items") if isinstance(metadata.get("action_items"), list) else []
    return format_html(
        "<p><strong>{}</strong> <code>{}</code></p>{}",
        error.get("error_message", ""),
        error.get("error_code", ""),
        action_items_html([item for item in items if isinstance(item, dict)]),
    )


# --- Workflows ------------------------------------------------------------------------------


class WorkflowForm(forms.ModelForm):
    class Meta:
        model = Workflow
        fields = ["name", "key", "description"]

    def validate_unique(self) -> None:
        # A key is unique per owner, and the owner is not a field of this form, so Django
        # would leave the constraint to the database: check it here to answer in words.
        super().validate_unique()
        try:
            self.instance.validate_constraints()
        except ValidationError as exc:
            self.add_error("key" if "key" in self.changed_data else None, exc.messages)


class WorkflowVersionInline(ReadOnlyMixin, admin.TabularInline):
    model = WorkflowVersion
    fk_name = "workflow"
    fields = ["version_link", "created_at", "created_by", "step_count"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-number"]
    verbose_name_plural = "versions"

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowVersion]:
        return super().get_queryset(request).select_related("created_by")

    @admin.display(description="version")
    def version_link(self, version: WorkflowVersion) -> SafeString:
        return admin_link(version, f"version {version.number}")

    @admin.display(description="steps")
    def step_count(self, version: WorkflowVersion) -> int:
        steps = version.definition.get("steps") if isinstance(version.definition, dict) else None
        return len(steps) if isinstance(steps, list) else 0


class WorkflowChangeList(ChangeList):
    """Rows without the current version's definition, which the list never shows."""

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Workflow]:
        return super().get_queryset(request, exclude_parameters).defer("current_version__definition")


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    form = WorkflowForm
    list_display = ["name", "key", "owner", "version_number", "created_at", "updated_at"]
    list_filter = ["created_at"]
    search_fields = ["name", "key", "owner__username"]
    list_select_related = ["owner", "current_version"]
    fields = [
        "id",
        "name",
        "key",
        "description",
        "owner",
        "current_version_link",
        "readiness",
        "runs_link",
        "status_page",
        "created_at",
        "updated_at",
    ]
    readonly_fields = [
        "id",
        "owner",
        "current_version_link",
        "readiness",
        "runs_link",
        "status_page",
        "created_at",
        "updated_at",
    ]
    inlines = [WorkflowVersionInline]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # created through the API, which validates the definition against the owner's instances

    def get_queryset(self, request: HttpRequest) -> QuerySet[Workflow]:
        return super().get_queryset(request).select_related("owner", "current_version")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return WorkflowChangeList

    @admin.display(description="version", ordering="current_version__number")
    def version_number(self, workflow: Workflow) -> Any:
        return workflow.current_version.number if workflow.current_version else "—"

    @admin.display(description="current version")
    def current_version_link(self, workflow: Workflow) -> SafeString:
        version = workflow.current_version
        return admin_link(version, f"version {version.number}" if version else None)

    @admin.display(description="readiness")
    def readiness(self, workflow: Workflow) -> SafeString:
        if workflow.current_version is None:
            return mark_safe("No version: nothing to run.")
        readiness = workflow_readiness(workflow=workflow)
        rows = []
        for step in readiness.steps:
            if step.is_ready:
                rows.append((step.step_id, "#2e7d32", "✔", "ready", mark_safe("")))
            else:
                code, message, items = step.first_problem()
                rows.append((step.step_id, "#c62828", "✘", f"{message} ({code})", action_items_html(items)))
        summary = readiness.as_dict()
        verdict = "Ready to run." if readiness.is_ready else f"Not ready: {summary['error_message']}"
        credits = summary["credits"]
        balance = "unlimited" if credits["balance"] is None else credits["balance"]
        return format_html(
            "<p><strong>{}</strong></p><p>Credits: a run costs at least {}; the balance is {}.</p>"
            '<ul style="margin-left:0;padding-left:0">{}</ul>',
            verdict,
            credits["estimate"],
            balance,
            format_html_join(
                "",
                '<li style="margin:.3em 0"><strong>{}</strong>: <span style="color:{}">{}</span> {}{}</li>',
                rows,
            ),
        )

    @admin.display(description="runs")
    def runs_link(self, workflow: Workflow) -> SafeString:
        url = reverse("admin:workflows_workflowrun_changelist") + f"?workflow__id__exact={workflow.pk}"
        return format_html('<a href="{}">its runs</a>', url)

    @admin.display(description="status page")
    def status_page(self, workflow: Workflow) -> SafeString:
        return status_page_link(reverse("status_workflows:workflow", args=[workflow.pk]))

    def save_model(self, request: HttpRequest, obj: Workflow, form: forms.ModelForm, change: bool) -> None:
        changes = {name: form.cleaned_data[name] for name in form.changed_data if name in WorkflowForm.Meta.fields}
        if changes:
            workflow_update(workflow=obj, **changes)

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple[list[Any], dict[str, int], set[str], list]:
        """What deleting says it deletes: the workflows, and how many of their versions, runs and
        step runs go with them. The collector's other findings do not apply here: a run
        PROTECTs its version from being deleted alone, and runs, versions and step runs are
        read-only records; the service deletes them with their workflow (runs first), and
        deleting a workflow takes the permission to delete workflows alone. A large fan-out's
        thousands of step runs are counted, not listed."""
        deleted, counts, _, _ = super().get_deleted_objects(objs, request)
        return [item for item in deleted if not isinstance(item, list)], counts, set(), []

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: dict | None = None) -> HttpResponse:
        try:
            return super().delete_view(request, object_id, extra_context)
        except WorkflowBusy as exc:
            self.message_user(request, f"Not deleted: {exc.detail}", messages.ERROR)
            return HttpResponseRedirect(reverse("admin:workflows_workflow_change", args=[object_id]))

    def delete_model(self, request: HttpRequest, obj: Workflow) -> None:
        workflow_delete(workflow=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> None:
        for workflow in queryset:
            try:
                workflow_delete(workflow=workflow)
            except WorkflowBusy as exc:
                self.message_user(request, f"{workflow}: not deleted: {exc.detail}", messages.ERROR)


# --- Versions -------------------------------------------------------------------------------


class WorkflowVersionChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[WorkflowVersion]:
        return super().get_queryset(request, exclude_parameters).defer("definition")


@admin.register(WorkflowVersion)
class WorkflowVersionAdmin(ReadOnlyAdmin):
    """Versions are immutable: a run pins the one it started on."""

    list_display = ["__str__", "workflow", "number", "created_by", "created_at"]
    list_filter = ["created_at"]
    search_fields = ["=id", "workflow__key", "workflow__name"]
    list_select_related = ["workflow", "created_by"]
    fields = ["id", "workflow_link", "number", "is_current", "created_by", "created_at", "definition_formatted"]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowVersion]:
        return super().get_queryset(request).select_related("workflow", "created_by")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return WorkflowVersionChangeList

    @admin.display(description="workflow")
    def workflow_link(self, version: WorkflowVersion) -> SafeString:
        return admin_link(version.workflow)

    @admin.display(description="current", boolean=True)
    def is_current(self, version: WorkflowVersion) -> bool:
        return version.workflow.current_version_id == version.pk

    @admin.display(description="definition")
    def definition_formatted(self, version: WorkflowVersion) -> SafeString:
        return pretty_json(version.definition)


# --- Runs ---------------------------------------------------------------------------------------


class StepRunInline(ReadOnlyMixin, admin.TabularInline):
    """A run's step runs, read-only; a large fan-out's first STEP_RUNS_INLINE (see
    WorkflowRunAdmin.get_formset_kwargs), the step run list has all."""

    model = StepRun
    fk_name = "run"
    fields = ["step_id", "iteration", "status", "attempt", "execution_link", "job_link", "finished_at", "error_code"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "step runs"

    def get_queryset(self, request: HttpRequest) -> QuerySet[StepRun]:
        return (
            super()
            .get_queryset(request)
            .select_related("execution__job")
            .defer("inputs", "output", "item")
            .order_by("created_at", "iteration")
        )

    @admin.display(description="execution")
    def execution_link(self, row: StepRun) -> SafeString:
        return execution_admin_link(row.execution_id) if row.execution_id else mark_safe("—")

    @admin.display(description="job")
    def job_link(self, row: StepRun) -> SafeString:
        job = getattr(row.execution, "job", None) if row.execution_id else None
        return admin_link(job, f"{job.status} {job.progress}%" if job else None)

    @admin.display(description="error")
    def error_code(self, row: StepRun) -> str:
        return (row.error or {}).get("error_code", "") or "—"


class WorkflowRunChangeList(ChangeList):
    """Rows without their documents (inputs, output, error) or their version's definition."""

    deferred = ["inputs", "output", "error", "version__definition"]

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[WorkflowRun]:
        return super().get_queryset(request, exclude_parameters).defer(*self.deferred)


@admin.register(WorkflowRun)
class WorkflowRunAdmin(ReadOnlyAdmin):
    list_display_links = [short_id]
    list_display = [short_id, "workflow", "version_number", "owner", "status", "credits_consumed", "created_at"]
    list_filter = ["created_at", "status"]
    search_fields = ["=id", "workflow__key", "workflow__name", "owner__username"]
    list_select_related = ["workflow", "version", "owner"]
    actions = ["cancel", "retry"]
    inlines = [StepRunInline]
    fields = [
        "id",
        "workflow_link",
        "version_link",
        "owner",
        "status",
        "status_page",
        "retry_of_link",
        "retry_from_step",
        "idempotency_key",
        "created_at",
        "started_at",
        "finished_at",
        "credits_consumed",
        "inputs_formatted",
        "output_formatted",
        "error_words",
        "error_details",
        "step_runs",
    ]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowRun]:
        return super().get_queryset(request).select_related("workflow", "version", "owner")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return WorkflowRunChangeList

    def has_operate_permission(self, request: HttpRequest) -> bool:
        """Cancel and retry change what runs: they need the change permission on runs,
        although the records themselves are never edited."""
        return request.user.has_perm("workflows.change_workflowrun")

    def get_formset_kwargs(self, request: HttpRequest, obj: Any, inline: Any, prefix: str) -> dict[str, Any]:
        kwargs = super().get_formset_kwargs(request, obj, inline, prefix)
        if isinstance(inline, StepRunInline) and obj is not None:
            # The first rows only, by a subquery: the formset filters the queryset again by
            # run, which a sliced queryset would not allow.
            first = StepRun.objects.filter(run=obj).order_by("created_at", "iteration").values("pk")
            kwargs["queryset"] = kwargs["queryset"].filter(pk__in=Subquery(first[:STEP_RUNS_INLINE]))
        return kwargs

    @admin.display(description="version", ordering="version__number")
    def version_number(self, run: WorkflowRun) -> int:
        return run.version.number

    @admin.display(description="workflow")
    def workflow_link(self, run: WorkflowRun) -> SafeString:
        return admin_link(run.workflow)

    @admin.display(description="version")
    def version_link(self, run: WorkflowRun) -> SafeString:
        return admin_link(run.version, f"version {run.version.number}")

    @admin.display(description="status page")
    def status_page(self, run: WorkflowRun) -> SafeString:
        return status_page_link(reverse("status_workflows:run", args=[run.pk]))

    @admin.display(description="retries")
    def retry_of_link(self, run: WorkflowRun) -> SafeString:
        if run.retry_of_id is None:
            return mark_safe("—")
        url = reverse("admin:workflows_workflowrun_change", args=[run.retry_of_id])
        return format_html('<a href="{}">{}</a>', url, run.retry_of_id)

    @admin.display(description="inputs")
    def inputs_formatted(self, run: WorkflowRun) -> SafeString:
        return pretty_json(run.inputs)

    @admin.display(description="output")
    def output_formatted(self, run: WorkflowRun) -> SafeString:
        return pretty_json(run.output) if run.output is not None else mark_safe("—")

    @admin.display(description="what happened")
    def error_words(self, run: WorkflowRun) -> SafeString:
        return error_html(run.error)

    @admin.display(description="error envelope")
    def error_details(self, run: WorkflowRun) -> SafeString:
        return pretty_json(run.error) if run.error else mark_safe("—")

    @admin.display(description="step runs")
    def step_runs(self, run: WorkflowRun) -> SafeString:
        url = reverse("admin:workflows_steprun_changelist") + f"?run__id__exact={run.pk}"
        return format_html(
            'Below, the first {} in run order; <a href="{}">every step run of this run</a>, with filters.',
            STEP_RUNS_INLINE,
            url,
        )

    @admin.action(description="Cancel selected runs", permissions=["operate"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[WorkflowRun]) -> None:
        for run in queryset:
            try:
                run = run_cancel(run=run)
            except ToolexecError as exc:
                self.message_user(request, f"Run {run.pk}: {exc.detail}", messages.ERROR)
            except RedisError:
                self.message_user(
                    request,
                    f"Run {run.pk}: cancelling, but the job queue did not answer: its steps still running "
                    "stop once the queue is reachable again.",
                    messages.WARNING,
                )
            else:
                state = (
                    "cancelled."
                    if run.status == WorkflowRun.Status.CANCELLED
                    else "cancelling: its steps still running stop at their next check."
                )
                self.message_user(request, f"Run {run.pk}: {state}", messages.SUCCESS)

    @admin.action(description="Retry selected runs, reusing the steps that succeeded", permissions=["operate"])
    def retry(self, request: HttpRequest, queryset: QuerySet[WorkflowRun]) -> None:
        for run in queryset:
            try:
                new = run_retry(run=run)
            except ToolexecError as exc:
                detail = exc.detail or exc.envelope().get("error_message", exc.code.value)
                self.message_user(request, f"Run {run.pk}: not retried: {detail}", messages.ERROR)
            else:
                self.message_user(request, f"Run {run.pk}: retried as run {new.pk}.", messages.SUCCESS)


# --- Step runs ------------------------------------------------------------------------------


class StepRunChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[StepRun]:
        return (
            super()
            .get_queryset(request, exclude_parameters)
            .defer("inputs", "output", "item", "run__inputs", "run__output", "run__error")
        )


@admin.register(StepRun)
class StepRunAdmin(ReadOnlyAdmin):
    list_display_links = [short_id]
    list_display = [short_id, "run_link", "step_id", "iteration", "status", "attempt", "finished_at"]
    list_filter = ["status"]
    search_fields = ["=run__id", "step_id"]
    list_select_related = ["run"]
    fields = [
        "id",
        "run_link",
        "step_id",
        "iteration",
        "items_total",
        "item_formatted",
        "status",
        "attempt",
        "execution_link",
        "job_link",
        "run_after",
        "created_at",
        "started_at",
        "finished_at",
        "inputs_formatted",
        "output_formatted",
        "error_words",
        "error_details",
    ]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[StepRun]:
        return super().get_queryset(request).select_related("run", "execution__job")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return StepRunChangeList

    @admin.display(description="run")
    def run_link(self, row: StepRun) -> SafeString:
        url = reverse("admin:workflows_workflowrun_change", args=[row.run_id])
        return format_html('<a href="{}">{}</a>', url, str(row.run_id)[:8])

    @admin.display(description="execution")
    def execution_link(self, row: StepRun) -> SafeString:
        return execution_admin_link(row.execution_id) if row.execution_id else mark_safe("—")

    @admin.display(description="job")
    def job_link(self, row: StepRun) -> SafeString:
        job = getattr(row.execution, "job", None) if row.execution_id else None
        return admin_link(job, f"{job.pk} ({job.status}, {job.progress}%)" if job else None)

    @admin.display(description="item")
    def item_formatted(self, row: StepRun) -> SafeString:
        return pretty_json(row.item) if row.items_total is not None else mark_safe("—")

    @admin.display(description="inputs (secrets redacted)")
    def inputs_formatted(self, row: StepRun) -> SafeString:
        return pretty_json(row.inputs) if row.inputs is not None else mark_safe("—")

    @admin.display(description="output")
    def output_formatted(self, row: StepRun) -> SafeString:
        return pretty_json(row.output) if row.output is not None else mark_safe("—")

    @admin.display(description="what happened")
    def error_words(self, row: StepRun) -> SafeString:
        return error_html(row.error)

    @admin.display(description="error envelope")
    def error_details(self, row: StepRun) -> SafeString:
        return pretty_json(row.error) if row.error else mark_safe("—")
