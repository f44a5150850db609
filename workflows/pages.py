"""Server-rendered status pages of workflows: the list, a workflow (its steps drawn as a graph
with each step's readiness, and a "run it" form built from the definition's inputs) and a
run, live (each step's state and progress on the graph, from the run's events stream, or by
polling its fragment, or, without JavaScript, as loaded with a refresh link).

As the job pages (executions/pages.py): thin views over the services and selectors; everyone
signs in; staff see everyone's, anyone else only their own, and another person's id answers
404. Staff may look at and cancel anyone's run; only the owner starts or retries one, since
that spends the owner's credits. Values that came from a tool or a person are only ever
rendered through autoescaping templates.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from redis.exceptions import RedisError

from core.errors import ToolexecError, http_status
from core.words import credits_words
from executions.page_forms import FIELD_PREFIX, TryItForm, input_field, required_order
from executions.pages import action_links, duration_words, error_view, output_view
from instances.models import ToolInstance

from . import page_selectors as select
from .definition import Definition, definition_of
from .graph import NODE_WIDTH, Layout, NodeBox, graph_layout, short_label
from .models import StepRun, Workflow, WorkflowRun
from .selectors import run_steps, step_detail
from .services.readiness import StepReadiness, WorkflowReadiness, workflow_readiness
from .services.runs import run_cancel, run_retry, run_start
from .streams import run_event_response

ITERATIONS_SHOWN = 100  # a fan-out's iterations listed on the run page; the API has them all
SUBTITLE_CHARS = 28  # a node's second line
BAR_INSET = 10  # a node's progress bar, inside its box
BAR_WIDTH = NODE_WIDTH - 2 * BAR_INSET
ENDED_OK = (StepRun.Status.SUCCEEDED, StepRun.Status.REUSED, StepRun.Status.SKIPPED)


# --- The "run it" form --------------------------------------------------------------------------


class RunItForm(forms.Form):
    """A run of a workflow: one field per property of its definition's ``inputs`` schema, as
    the instance page's "try it" form has one per input of a tool. The order: the schema's
    ``required`` list, then the other properties by name (a stored definition is jsonb, which
    does not keep the order it was written in)."""

    def __init__(self, *args: Any, schema: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        schema = schema if isinstance(schema, dict) else {}
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [name for name in required_order(schema) if name in properties]
        self.input_names: dict[str, str] = {}
        for name in [*required, *sorted(set(properties) - set(required))]:
            prop = properties[name] if isinstance(properties[name], dict) else {}
            key = FIELD_PREFIX + name
            self.input_names[key] = name
            field = input_field(prop, required=name in required, initial=prop.get("default"))
            if field.label is None:
                field.label = name
            self.fields[key] = field

    # What was typed in as inputs, and the service's field errors put back on their fields:
    # the same as the "try it" form's.
    input_fields = TryItForm.input_fields
    inputs = TryItForm.inputs
    add_input_errors = TryItForm.add_input_errors


# --- The graph ----------------------------------------------------------------------------------


@dataclass
class GraphNode:
    box: NodeBox
    css: str
    subtitle: str
    state: str
    title: str
    href: str
    bar: int | None = None  # the progress bar's width, when the node has one


def dependencies_of(definition: Definition) -> dict[str, list[str]]:
    return {step_id: list(step.depends_on) for step_id, step in definition.steps.items()}


def graph_view(layout: Layout, nodes: Iterable[GraphNode], *, title: str) -> dict[str, Any]:
    return {
        "width": layout.width,
        "height": layout.height,
        "nodes": list(nodes),
        "edges": layout.edges,
        "title": title,
        "bar_width": BAR_WIDTH,
        "bar_inset": BAR_INSET,
    }


def tool_words(instance: ToolInstance | None) -> str:
    return instance.tool.name if instance is not None else "instance not found"


# --- Workflows ------------------------------------------------------------------------------


@login_required
@require_GET
def workflow_list(request: HttpRequest) -> HttpResponse:
    rows = select.workflow_rows(user=request.user)
    return render(request, "status/workflows.html", {"workflows": rows})


@dataclass
class StepCheck:
    step_id: str
    instance: ToolInstance | None
    is_ready: bool
    checks: list[dict[str, Any]]
    fan_out: bool
    depends_on: list[str]


def _step_checks(definition: Definition, readiness: WorkflowReadiness) -> list[StepCheck]:
    by_step: dict[str, StepReadiness] = {step.step_id: step for step in readiness.steps}
    rows = []
    for step_id, step in definition.steps.items():
        found = by_step.get(step_id)
        result = found.readiness if found is not None else None
        if result is None:
            message = found.first_problem()[1] if found is not None else "This step was not checked."
            checks = [{"passed": False, "message": message, "actions": []}]
        else:
            checks = [
                {
                    "passed": check.passed,
                    "message": check.message,
                    "actions": action_links(check.action_items) if not check.passed else [],
                }
                for check in result.checks
            ]
        rows.append(
            StepCheck(
                step_id=step_id,
                instance=result.instance if result is not None else None,
                is_ready=found is not None and found.is_ready,
                checks=checks,
                fan_out=step.for_each is not None,
                depends_on=list(step.depends_on),
            )
        )
    return rows


def _readiness_graph(definition: Definition, steps: list[StepCheck]) -> dict[str, Any]:
    layout = graph_layout(dependencies_of(definition))
    by_step = {step.step_id: step for step in steps}
    nodes = []
    for box in layout.nodes:
        step = by_step[box.step_id]
        failed = next((check for check in step.checks if not check["passed"]), None)
        subtitle = tool_words(step.instance) + (" · for each" if step.fan_out else "")
        nodes.append(
            GraphNode(
                box=box,
                css="ready" if step.is_ready else "not-ready",
                subtitle=short_label(subtitle, SUBTITLE_CHARS),
                state="✓ ready" if step.is_ready else "✗ not ready",
                title=f"{box.step_id}: " + ("ready" if failed is None else failed["message"]),
                href=f"#step-{box.step_id}",
            )
        )
    return graph_view(layout, nodes, title="The workflow's steps, and whether each is ready to run")


def _workflow_context(request: HttpRequest, workflow: Workflow) -> dict[str, Any]:
    version = workflow.current_version
    context: dict[str, Any] = {
        "workflow": workflow,
        "version": version,
        "is_owner": workflow.owner_id == request.user.pk,
        "recent": run_rows(select.workflow_recent_runs(workflow=workflow)),
    }
    if version is None:
        return context
    definition = definition_of(version.pk, version.definition)
    readiness = workflow_readiness(workflow=workflow, version=version)
    steps = _step_checks(definition, readiness)
    summary = readiness.as_dict()
    context.update(
        definition=definition,
        steps=steps,
        graph=_readiness_graph(definition, steps),
        is_ready=readiness.is_ready,
        problem=summary["error_message"] or "",
        problem_actions=action_links(summary["action_items"]),
        credits={
            "estimate": credits_words(readiness.estimate),
            "balance": "unlimited" if readiness.account.is_unlimited else credits_words(readiness.account.balance),
            "covered": readiness.credits_covered,
        },
        definition_json=json.dumps(version.definition, indent=2, ensure_ascii=False, default=str),
    )
    return context


@login_required
@require_http_methods(["GET", "POST"])
def workflow_detail(request: HttpRequest, workflow_id: str) -> HttpResponse:
    workflow = get_object_or_404(select.workflows_visible(user=request.user), pk=workflow_id)
    if request.method == "POST" and workflow.owner_id != request.user.pk:
        raise PermissionDenied("Only the workflow's owner can run it.")  # staff look, they don't spend
    version = workflow.current_version
    schema = definition_of(version.pk, version.definition).inputs_schema if version is not None else None
    form = RunItForm(request.POST if request.method == "POST" else None, schema=schema)
    refusal: dict[str, Any] | None = None
    status = 200
    if request.method == "POST" and version is not None:
        status = 400
        if form.is_valid():
            try:
                started = run_start(workflow=workflow, inputs=form.inputs())
            except ToolexecError as exc:
                body = exc.envelope({"tool": workflow.name})
                form.add_input_errors(body.get("metadata", {}).get("field_errors") or {})
                refusal = error_view(body)
                status = http_status(exc.code)
            else:
                return redirect("status_workflows:run", run_id=started.run.pk)
    context = {**_workflow_context(request, workflow), "form": form, "refusal": refusal}
    return render(request, "status/workflow.html", context, status=status)


# --- Runs ---------------------------------------------------------------------------------------


@dataclass
class RunRow:
    run: WorkflowRun
    link: str
    duration: str
    credits: str


def run_duration(run: WorkflowRun) -> str:
    if run.started_at is None or run.finished_at is None:
        return "—"
    return duration_words((run.finished_at - run.started_at).total_seconds() * 1000)


def run_rows(runs: list[WorkflowRun]) -> list[RunRow]:
    return [
        RunRow(
            run=run,
            link=reverse("status_workflows:run", args=[run.pk]),
            duration=run_duration(run),
            credits=credits_words(run.credits_consumed),
        )
        for run in runs
    ]


def step_status(statuses: Iterable[str]) -> str:
    """One status for a step from its rows' (a fan-out has one per item): a failure shows at
    once; a step with rows still to run is RUNNING once any of them started or ended; ended
    rows agree, or the worst of them says it. The run page's script says it the same way."""
    counts = Counter(statuses)
    if not counts:
        return ""
    if len(counts) == 1:
        return next(iter(counts))
    if counts[StepRun.Status.FAILED]:
        return StepRun.Status.FAILED
    waiting = counts[StepRun.Status.PENDING] + counts[StepRun.Status.QUEUED]
    if counts[StepRun.Status.RUNNING] or (waiting and waiting < sum(counts.values())):
        return StepRun.Status.RUNNING
    if waiting:
        return StepRun.Status.QUEUED
    for worst in (StepRun.Status.CANCELLED, StepRun.Status.UPSTREAM_FAILED):
        if counts[worst]:
            return worst
    if counts[StepRun.Status.SUCCEEDED]:
        return StepRun.Status.SUCCEEDED
    return StepRun.Status.REUSED if counts[StepRun.Status.REUSED] else StepRun.Status.SKIPPED


def row_progress(row: dict[str, Any]) -> int:
    """How far a row has come: its job's progress while in flight, all the way once it
    succeeded (or reused a success), none when it ended otherwise or has not started."""
    if row["status"] in (StepRun.Status.SUCCEEDED, StepRun.Status.REUSED):
        return 100
    if row["status"] in StepRun.IN_FLIGHT:
        return int(row["progress"] or 0)
    return 0


def status_words(status: str) -> str:
    return status.replace("_", " ").lower() if status else "not started"


@dataclass
class StepView:
    """A step of a run, as its page shows it: its rows (``iterations``) summed up."""

    step_id: str
    instance: ToolInstance | None
    fan_out: bool
    status: str = ""
    progress: int = 0
    detail: str = ""
    iterations: list[dict[str, Any]] = field(default_factory=list)
    shown: list[dict[str, Any]] = field(default_factory=list)
    total: int | None = None
    done: int = 0
    failed: int = 0
    error: dict[str, Any] | None = None

    @property
    def single(self) -> dict[str, Any] | None:
        """The row of a plain step (one that is not a fan-out)."""
        return self.iterations[0] if self.iterations and not self.fan_out else None

    @property
    def more(self) -> int:
        return len(self.iterations) - len(self.shown)


def iteration_words(row: dict[str, Any]) -> str:
    status = row["status"]
    if status == StepRun.Status.QUEUED:
        return row["current_step"] or "waiting for a worker"
    if status == StepRun.Status.PENDING:
        return "retrying soon" if row.get("run_after") else "waiting its turn"
    if status == StepRun.Status.RUNNING:
        return row["current_step"] or ""
    if row["started_at"] and row["finished_at"]:
        return f"took {duration_words((row['finished_at'] - row['started_at']).total_seconds() * 1000)}"
    return ""


def fan_out_words(view: StepView) -> str:
    if view.total == 0:
        return "no items"
    words = f"{view.done} of {view.total} items done"
    return words + (f", {view.failed} failed" if view.failed else "")


def _interesting_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The iterations a fan-out lists, at most ITERATIONS_SHOWN, in item order: the ones in
    flight or that went wrong first, then the others."""
    if len(rows) <= ITERATIONS_SHOWN:
        return rows
    rank = sorted(range(len(rows)), key=lambda i: (rows[i]["status"] in ENDED_OK, i))
    return [rows[i] for i in sorted(rank[:ITERATIONS_SHOWN])]


def step_views(definition: Definition, rows: list[StepRun], instances: dict[str, ToolInstance]) -> list[StepView]:
    """Every step of the definition, in its order, with its rows (none yet: not started)."""
    views = {
        step_id: StepView(step_id=step_id, instance=instances.get(step.instance_id), fan_out=step.for_each is not None)
        for step_id, step in definition.steps.items()
    }
    for row in rows:
        view = views.get(row.step_id)
        if view is None:  # a row of a step the version no longer has cannot happen; shown nowhere
            continue
        detail = step_detail(row)
        detail["words"] = iteration_words(detail)
        detail["bar"] = row_progress(detail)
        detail["error_view"] = error_view(detail["error"]) if detail["error"] else None
        view.iterations.append(detail)
    for view in views.values():
        its = view.iterations
        view.status = step_status(row["status"] for row in its)
        if its and its[0]["items_total"] is not None:
            view.fan_out = True
        view.total = (its[0]["items_total"] or 0) if view.fan_out and its else None
        view.done = sum(row["status"] in StepRun.TERMINAL for row in its)
        view.failed = sum(row["status"] == StepRun.Status.FAILED for row in its)
        if its:
            view.progress = round(sum(map(row_progress, its)) / (view.total or len(its)))
        view.error = next((row["error_view"] for row in its if row["error_view"]), None)
        view.shown = _interesting_first(its) if view.fan_out else its
        if view.fan_out:
            view.detail = fan_out_words(view) if its else ""
        elif view.single is not None:
            view.detail = view.single["words"]
    return list(views.values())


def _run_graph(definition: Definition, steps: list[StepView]) -> dict[str, Any]:
    layout = graph_layout(dependencies_of(definition))
    by_step = {step.step_id: step for step in steps}
    nodes = []
    for box in layout.nodes:
        step = by_step[box.step_id]
        subtitle = tool_words(step.instance) + (" · for each" if step.fan_out else "")
        state = status_words(step.status)
        if step.status in (StepRun.Status.RUNNING, StepRun.Status.QUEUED):
            state += f" · {step.progress} %"
        nodes.append(
            GraphNode(
                box=box,
                css=f"s-{(step.status or 'none').lower()}",
                subtitle=short_label(subtitle, SUBTITLE_CHARS),
                state=state,
                title=f"{box.step_id}: {state}" + (f" ({step.detail})" if step.detail else ""),
                href=f"#step-{box.step_id}",
                bar=round(BAR_WIDTH * step.progress / 100),
            )
        )
    return graph_view(layout, nodes, title="The run's steps and how far each has come")


def live_state(steps: list[StepView]) -> dict[str, Any]:
    """What the page's script starts from, to apply the stream's events to: per step, whether
    it fans out, its item count and each row's [status, progress, current step]."""
    return {
        step.step_id: {
            "fan_out": step.fan_out,
            "total": step.total,
            "rows": {
                str(row["iteration"]): [row["status"], row_progress(row), row["current_step"]]
                for row in step.iterations
            },
        }
        for step in steps
    }


def _visible_run(request: HttpRequest, run_id: str) -> WorkflowRun:
    return get_object_or_404(select.runs_visible(user=request.user), pk=run_id)


def _run_live_context(request: HttpRequest, run: WorkflowRun) -> dict[str, Any]:
    definition = definition_of(run.version_id, run.version.definition)
    instances = select.step_instances(
        owner_id=run.owner_id, instance_ids=(step.instance_id for step in definition.steps.values())
    )
    steps = step_views(definition, run_steps(run=run), instances)
    terminal = run.status in WorkflowRun.TERMINAL
    ended = sum(1 for step in steps if step.status in StepRun.TERMINAL)
    return {
        "run": run,
        "steps": steps,
        "graph": _run_graph(definition, steps),
        "steps_done": f"{ended} of {len(steps)} steps ended",
        "terminal": terminal,
        "can_cancel": not terminal,
        "cancelling": run.status == WorkflowRun.Status.CANCELLING,
        "can_retry": terminal and run.owner_id == request.user.pk,
        "retry_steps": list(definition.steps),
        "output": output_view(run.output) if run.status == WorkflowRun.Status.SUCCEEDED else None,
        "error": error_view(run.error) if terminal and run.error else None,
        "duration": run_duration(run),
        "credits": credits_words(run.credits_consumed),
        "live_state": live_state(steps),
    }


@login_required
@require_GET
def run_detail(request: HttpRequest, run_id: str) -> HttpResponse:
    run = _visible_run(request, run_id)
    context = {
        **_run_live_context(request, run),
        "inputs": json.dumps(run.inputs, indent=2, ensure_ascii=False, default=str),
        "live_config": {
            "status": run.status,
            "events_url": reverse("status_workflows:run-events", args=[run.pk]),
            "fragment_url": reverse("status_workflows:run-fragment", args=[run.pk]),
            "job_url": reverse("status:job", args=["00000000-0000-0000-0000-000000000000"]),
            "terminal": sorted(WorkflowRun.TERMINAL),
            "step_terminal": sorted(StepRun.TERMINAL),
            "bar_width": BAR_WIDTH,
        },
    }
    return render(request, "status/workflow_run.html", context)


@login_required
@require_GET
def run_fragment(request: HttpRequest, run_id: str) -> HttpResponse:
    """The live part of the run page, for the page's polling when streaming is unavailable."""
    run = _visible_run(request, run_id)
    response = render(request, "status/_workflow_run_live.html", _run_live_context(request, run))
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def run_events(request: HttpRequest, run_id: str) -> StreamingHttpResponse:
    """The run's events stream (as the API's), with the pages' permissions."""
    return run_event_response(request, str(_visible_run(request, run_id).pk))


@login_required
@require_POST
def run_cancel_view(request: HttpRequest, run_id: str) -> HttpResponse:
    run = _visible_run(request, run_id)
    try:
        run = run_cancel(run=run)
    except ToolexecError as exc:
        messages.info(request, str(exc))
    except RedisError:
        messages.warning(
            request,
            "The cancellation is recorded, but the job queue did not answer: the steps still running "
            "will be stopped once the queue is reachable again.",
        )
    else:
        if run.status == WorkflowRun.Status.CANCELLED:
            messages.success(request, "The run was cancelled.")
        else:
            messages.success(request, "Cancelling: the steps still running stop at their next check.")
    return redirect("status_workflows:run", run_id=run.pk)


@login_required
@require_POST
def run_retry_view(request: HttpRequest, run_id: str) -> HttpResponse:
    run = _visible_run(request, run_id)
    if run.owner_id != request.user.pk:
        raise PermissionDenied("Only the run's owner can retry it.")
    from_step = request.POST.get("from_step") or None
    try:
        retry = run_retry(run=run, from_step=from_step)
    except ToolexecError as exc:
        body = exc.envelope({"tool": run.workflow.name})
        messages.error(request, f"Not retried: {body.get('error_message') or exc}")
        return redirect("status_workflows:run", run_id=run.pk)
    messages.success(request, "A new run retries this one: the steps that succeeded are reused.")
    return redirect("status_workflows:run", run_id=retry.pk)
