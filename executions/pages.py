"""Server-rendered status pages: the overview, an instance with its "try it" form, a job with
live progress, and the execution history.

Plain Django views, thin: parse → selectors/services → render. Everyone signs in; staff see
everyone's objects, anyone else only their own, and another person's id answers 404. Values
that came from a tool or a person are only ever rendered through autoescaping templates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from redis.exceptions import RedisError

from core.errors import ToolexecError, http_status
from core.words import credits_words
from instances.models import ToolInstance
from instances.readiness import readiness_check
from tools.models import ToolDefinition
from tools.sdk import ASYNC

from . import page_selectors as select
from .models import Execution, Job
from .page_forms import ExecutionFilterForm, TryItForm
from .selectors import job_progress
from .services.cache import MissReason
from .services.cache import Status as CacheStatus
from .services.control import job_cancel
from .services.enqueue import execution_enqueue
from .services.recovery import job_check_alive
from .services.sync import execution_run_sync
from .streams import job_event_response

TABLE_ROWS_SHOWN = 200
JSON_CHARS_SHOWN = 200_000
HISTORY_PAGE_SIZE = 25


# --- Words and small views of values ---------------------------------------------------------


def duration_words(ms: float | None) -> str:
    """350 ms, 4.2 s, 3 min 5 s, 2 h 10 min."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def steps_words(step: str, index: int | None, total: int | None) -> str:
    """ "step i of n", unless the step's own name already says just that."""
    if not total:
        return ""
    words = f"step {index or 0} of {total}"
    return "" if step.strip().lower() == words else words


def percent_words(rate: float | None) -> str:
    return "—" if rate is None else f"{rate * 100:.1f} %"


def _safe_href(url: str) -> str:
    """Only http(s) and same-site links become links; anything else stays text."""
    if not isinstance(url, str) or not url:
        return ""
    if url.startswith("/") and not url.startswith("//"):
        return url
    parts = urlsplit(url)
    return url if parts.scheme in ("http", "https") and parts.netloc else ""


def action_links(items: Any) -> list[dict[str, str]]:
    links = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        links.append(
            {
                "message": str(item.get("message") or item.get("action") or ""),
                "href": _safe_href(item.get("url", "")),
                "priority": str(item.get("priority", "")),
            }
        )
    return links


def error_view(body: dict[str, Any] | None) -> dict[str, Any] | None:
    """An error envelope, as the templates show it: words, action items, field errors."""
    if not body:
        return None
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    field_errors = metadata.get("field_errors") if isinstance(metadata.get("field_errors"), dict) else {}
    return {
        "code": body.get("error_code", ""),
        "message": body.get("error_message", ""),
        "actions": action_links(metadata.get("action_items")),
        "field_errors": [(path, " ".join(map(str, msgs))) for path, msgs in field_errors.items()],
        "can_retry": bool(metadata.get("can_retry")),
    }


def execution_error(execution: Execution) -> dict[str, Any] | None:
    if not execution.error_code:
        return None
    return error_view(
        {
            "error_code": execution.error_code,
            "error_message": execution.error_message,
            "metadata": execution.error_metadata,
        }
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _table_of(output: Any) -> dict[str, Any] | None:
    """Tabular output (a list of records, or ``rows`` with ``columns``) as a table."""
    rows: Any = None
    columns: Any = None
    if isinstance(output, list):
        rows = output
    elif isinstance(output, dict):
        for key in ("rows", "result", "records", "items"):
            if isinstance(output.get(key), list):
                rows = output[key]
                break
        if isinstance(output.get("columns"), list) and all(isinstance(c, str) for c in output["columns"]):
            columns = output["columns"]
    if not rows:
        return None
    shown = rows[:TABLE_ROWS_SHOWN]
    if all(isinstance(row, dict) for row in rows):
        if columns is None:
            columns = list(dict.fromkeys(key for row in shown for key in row))
        body = [[_cell(row.get(column)) for column in columns] for row in shown]
    elif columns and all(isinstance(row, list) for row in rows):
        body = [[_cell(row[i] if i < len(row) else None) for i in range(len(columns))] for row in shown]
    else:
        return None
    return {"columns": columns, "rows": body, "total": len(rows), "truncated": len(rows) > len(shown)}


def output_view(output: Any) -> dict[str, Any]:
    text = json.dumps(output, indent=2, ensure_ascii=False, default=str)
    return {
        "json": text[:JSON_CHARS_SHOWN],
        "json_truncated": len(text) > JSON_CHARS_SHOWN,
        "table": _table_of(output),
    }


CACHE_WORDS = {
    CacheStatus.REFRESH: "the tool ran again as asked (Cache-Control: no-cache), replacing the cached result",
    CacheStatus.BYPASS: "left out as asked (Cache-Control: no-store)",
}
MISS_WORDS = {
    MissReason.NO_ENTRY: "missed: no result of the same run was cached yet",
    MissReason.EXPIRED: "missed: the same run's cached result had expired",
    MissReason.TOOL_VERSION_CHANGED: "missed: the tool changed since the same run's result was cached",
    MissReason.CREDENTIAL_CHANGED: "missed: a credential changed since the same run's result was cached",
    MissReason.CONFIG_CHANGED: "missed: the instance's default inputs changed since the same run's result was cached",
    MissReason.NOT_CACHEABLE: "not used: this run cannot be cached",
    MissReason.DISABLED: "off for this instance",
    MissReason.TOO_LARGE: "not kept: the result is too large",
    MissReason.FAILED: "not kept: only a completed run's result is",
}


def cache_view(execution: Execution) -> dict[str, Any] | None:
    """What the result cache did for a run, as its pages say it: served from the cache (and
    from which run's result), or why not. None when the cache did not take part."""
    report = execution.cache if isinstance(execution.cache, dict) else {}
    if execution.cache_hit:
        source = execution.source_execution_id
        age = report.get("age_seconds")
        return {
            "hit": True,
            "collapsed": report.get("status") == CacheStatus.COLLAPSED,
            "source_link": reverse("status:execution", args=[source]) if source else "",
            "age": _age_words(age) if isinstance(age, int) else "",
        }
    status = report.get("status")
    words = CACHE_WORDS.get(status) or MISS_WORDS.get(report.get("miss_reason"))
    return {"hit": False, "status": status, "words": words} if words else None


def _age_words(seconds: int) -> str:
    """How long before a run its cached result was made: whole seconds, as the report has it."""
    if seconds < 1:
        return "less than a second"
    return f"{seconds} s" if seconds < 60 else duration_words(seconds * 1000)


def cache_setting_words(instance: ToolInstance) -> str:
    if not instance.tool.cacheable:
        return "Off: this tool's runs are never cached."
    if not instance.caches:
        return "Off"
    return f"On: results are kept {duration_words(instance.cache_ttl * 1000)}"


def execution_link(execution: Execution) -> str:
    """A run's page: its job's (live) page when it ran async, its detail page otherwise."""
    job = getattr(execution, "job", None)
    if job is not None:
        return reverse("status:job", args=[job.pk])
    return reverse("status:execution", args=[execution.pk])


@dataclass
class ExecutionRow:
    execution: Execution
    link: str
    duration: str
    credits: str


def execution_rows(executions: list[Execution]) -> list[ExecutionRow]:
    return [
        ExecutionRow(
            execution=e,
            link=execution_link(e),
            duration=duration_words(e.duration_ms),
            credits=credits_words(e.credits_consumed),
        )
        for e in executions
    ]


# --- The hourly chart (inline SVG, drawn here) ------------------------------------------------

CHART_BAR = 20
CHART_GAP = 4
CHART_HEIGHT = 120
CHART_TOP = 22  # room for the peak's label
CHART_AXIS = 28  # room for the hours under the bars


def hourly_chart(buckets: list[select.HourBucket]) -> dict[str, Any]:
    """Bar geometry for the last hours: completed-or-other runs in one colour, failures on top."""
    peak = max((b.runs for b in buckets), default=0)
    scale = CHART_HEIGHT / peak if peak else 0
    base = CHART_TOP + CHART_HEIGHT
    bars = []
    for index, bucket in enumerate(buckets):
        x = index * (CHART_BAR + CHART_GAP) + CHART_GAP
        ok_height = round((bucket.runs - bucket.failed) * scale, 1)
        failed_height = round(bucket.failed * scale, 1)
        bars.append(
            {
                "x": x,
                "ok_y": round(base - ok_height, 1),
                "ok_height": ok_height,
                "failed_y": round(base - ok_height - failed_height, 1),
                "failed_height": failed_height,
                "label": bucket.hour.strftime("%H:00"),
                "show_label": index % 6 == 0 or index == len(buckets) - 1,
                # The first and last labels are anchored inside the chart, never cut at its edge.
                "label_x": x if index == 0 else x + CHART_BAR if index == len(buckets) - 1 else x + CHART_BAR / 2,
                "label_anchor": "start" if index == 0 else "end" if index == len(buckets) - 1 else "middle",
                "title": f"{bucket.hour:%Y-%m-%d %H:00} UTC: {bucket.runs} runs, {bucket.failed} failed",
            }
        )
    return {
        "bars": bars,
        "peak": peak,
        "width": len(buckets) * (CHART_BAR + CHART_GAP) + CHART_GAP,
        "height": base + CHART_AXIS,
        "base": base,
        "label_y": base + 22,
        "peak_y": CHART_TOP - 6,
        "bar_width": CHART_BAR,
        "top": CHART_TOP,
    }


# --- Overview -----------------------------------------------------------------------------------


@dataclass
class FlightRow:
    job: Job
    eta: str
    stale: bool
    steps: str


@login_required
@require_GET
def overview(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    since = now - select.WINDOW
    executions = select.executions_visible(user=request.user)
    summary = select.window_summary(executions=executions, since=since)
    tools = select.tool_table(executions=executions, since=since)
    flights = select.jobs_in_flight(jobs=select.jobs_visible(user=request.user))
    stale_before = now - timedelta(seconds=settings.TOOLEXEC_JOB_STALE_SECONDS)
    flight_rows = [
        FlightRow(
            job=job,
            eta=duration_words(eta * 1000) if (eta := job_progress(job=job)["eta_seconds"]) is not None else "—",
            stale=job.status == Job.Status.RUNNING and (job.heartbeat_at is None or job.heartbeat_at < stale_before),
            steps=steps_words(job.current_step, job.step_index, job.steps_total),
        )
        for job in flights[:50]
    ]
    failures = select.latest_failures(executions=executions)
    context = {
        "queues": select.queue_report(),
        "flights": flight_rows,
        "more_flights": len(flights) > 50,
        "summary": summary,
        "summary_words": {
            "failure_rate": percent_words(summary.failure_rate),
            "p50": duration_words(summary.p50_ms),
            "p95": duration_words(summary.p95_ms),
            "credits": credits_words(summary.credits),
        },
        "chart": hourly_chart(select.hourly_buckets(executions=executions, now=now)),
        "tools": [
            {
                "row": row,
                "failure_rate": percent_words(row.failure_rate),
                "avg": duration_words(row.avg_ms),
                "p50": duration_words(row.p50_ms),
                "p95": duration_words(row.p95_ms),
                "credits": credits_words(row.credits),
            }
            for row in tools
        ],
        "failures": [{"row": row, "error": execution_error(row), "link": execution_link(row)} for row in failures],
        "now": now,
    }
    return render(request, "status/overview.html", context)


# --- Executions -------------------------------------------------------------------------------


@login_required
@require_GET
def execution_list(request: HttpRequest) -> HttpResponse:
    tools = list(ToolDefinition.objects.order_by("name").values_list("slug", "name"))
    form = ExecutionFilterForm(request.GET or None, tools=tools)
    if form.is_bound:
        form.is_valid()  # invalid filters are shown as errors and left out
    executions = select.executions_visible(user=request.user).filter(**form.filters())
    notice = ""
    try:
        page = select.execution_history(
            executions=executions,
            before=request.GET.get("before", ""),
            after=request.GET.get("after", ""),
            size=HISTORY_PAGE_SIZE,
        )
    except select.BadCursor:
        notice = "That page link is not valid; here are the newest executions."
        page = select.execution_history(executions=executions, size=HISTORY_PAGE_SIZE)

    def page_link(**cursor: str) -> str:
        query = request.GET.copy()
        for key in ("before", "after"):
            query.pop(key, None)
        query.update(cursor)
        return f"?{query.urlencode()}"

    context = {
        "form": form,
        "rows": execution_rows(page.items),
        "newer_link": page_link(after=page.newer) if page.newer else "",
        "older_link": page_link(before=page.older) if page.older else "",
        "newest_link": page_link() if (page.newer or request.GET.get("before")) else "",
        "notice": notice,
        "filtered": bool(form.filters()),
    }
    return render(request, "status/executions.html", context)


@login_required
@require_GET
def execution_detail(request: HttpRequest, execution_id: str) -> HttpResponse:
    execution = get_object_or_404(
        select.executions_visible(user=request.user).select_related("tool", "instance", "job", "owner"),
        pk=execution_id,
    )
    context = {
        "execution": execution,
        "job": getattr(execution, "job", None),
        "inputs": json.dumps(execution.input_data, indent=2, ensure_ascii=False, default=str),
        "output": output_view(execution.output_data) if execution.status == Execution.Status.COMPLETED else None,
        "error": execution_error(execution),
        "duration": duration_words(execution.duration_ms),
        "credits": credits_words(execution.credits_consumed),
        "cache": cache_view(execution),
    }
    return render(request, "status/execution.html", context)


# --- Instances and the "try it" form ---------------------------------------------------------


def _instance_context(request: HttpRequest, instance: ToolInstance) -> dict[str, Any]:
    readiness = readiness_check(instance=instance)
    checks = [
        {"check": check, "actions": action_links(check.action_items) if not check.passed else []}
        for check in readiness.checks
    ]
    average = instance.total_duration_ms / instance.execution_count if instance.execution_count else None
    cache = {"setting": cache_setting_words(instance), "cacheable": instance.tool.cacheable}
    if instance.tool.cacheable:
        summary = select.instance_cache_summary(instance=instance, since=timezone.now() - select.WINDOW)
        cache.update(
            summary=summary,
            hit_rate=percent_words(summary.hit_rate),
            credits_saved=credits_words(summary.credits_saved),
        )
    return {
        "instance": instance,
        "tool": instance.tool,
        "checks": checks,
        "is_ready": readiness.is_ready,
        "first_problem": readiness.failures[0].message if readiness.failures else "",
        "stats": {
            "failure_rate": percent_words(instance.failure_rate if instance.execution_count else None),
            "average": duration_words(average),
            "credits": credits_words(instance.credits_consumed),
        },
        "recent": execution_rows(select.instance_recent_executions(instance=instance)),
        "cache": cache,
        "is_owner": instance.owner_id == request.user.pk,
    }


@login_required
@require_http_methods(["GET", "POST"])
def instance_detail(request: HttpRequest, instance_id: str) -> HttpResponse:
    instance = get_object_or_404(select.instances_visible(user=request.user), pk=instance_id)
    if request.method == "POST" and instance.owner_id != request.user.pk:
        raise PermissionDenied("Only the instance's owner can run it.")  # staff look, they don't spend
    form = TryItForm(request.POST if request.method == "POST" else None, instance=instance)
    run: dict[str, Any] | None = None
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            params = {"tool": instance.tool.name, "instance_id": str(instance.pk)}
            try:
                if form.cleaned_data["mode"] == ASYNC:
                    accepted = execution_enqueue(instance=instance, inputs=form.inputs())
                    return redirect("status:job", job_id=accepted.job.pk)
                execution, outcome = execution_run_sync(instance=instance, inputs=form.inputs())
            except ToolexecError as exc:
                body = exc.envelope(params)
                form.add_input_errors(body.get("metadata", {}).get("field_errors") or {})
                run = {"error": error_view(body), "job_id": body.get("metadata", {}).get("job_id")}
                status = http_status(exc.code)
            else:
                status = 200
                run = {
                    "execution": execution,
                    "link": reverse("status:execution", args=[execution.pk]),
                    "output": output_view(outcome.output) if outcome.error is None else None,
                    "error": error_view(outcome.error),
                    "duration": duration_words(execution.duration_ms),
                    "credits": credits_words(outcome.credits),
                    "cache": cache_view(execution),
                }
                instance.refresh_from_db()  # the statistics just moved
    context = {**_instance_context(request, instance), "form": form, "run": run}
    return render(request, "status/instance.html", context, status=status)


# --- Jobs ---------------------------------------------------------------------------------------


def _visible_job(request: HttpRequest, job_id: str) -> Job:
    job = get_object_or_404(select.jobs_visible(user=request.user), pk=job_id)
    return job_check_alive(job=job)


def _job_live_context(job: Job) -> dict[str, Any]:
    progress = job_progress(job=job)
    execution = job.execution
    terminal = job.status in Job.TERMINAL
    eta = progress["eta_seconds"]
    return {
        "job": job,
        "progress": progress,
        "eta": duration_words(eta * 1000) if eta is not None else "",
        "steps_words": steps_words(job.current_step, job.step_index, job.steps_total),
        "terminal": terminal,
        "can_cancel": not terminal,
        "cancelling": not terminal and job.cancel_requested_at is not None,
        "output": output_view(execution.output_data) if job.status == Job.Status.COMPLETED else None,
        "error": execution_error(execution) if terminal else None,
        "duration": duration_words(execution.duration_ms),
        "credits": credits_words(execution.credits_consumed),
        "cache": cache_view(execution) if terminal else None,
    }


@login_required
@require_GET
def job_detail(request: HttpRequest, job_id: str) -> HttpResponse:
    job = _visible_job(request, job_id)
    live = _job_live_context(job)
    elapsed = (timezone.now() - job.started_at).total_seconds() if job.started_at else None
    context = {
        **live,
        "execution": job.execution,
        "inputs": json.dumps(job.execution.input_data, indent=2, ensure_ascii=False, default=str),
        "live_config": {
            "status": job.status,
            # The job's socket (toolexec/routing.py; signed in by the session); the stream and
            # the fragment are the page's fallbacks, in that order (static/status/job.js).
            "ws_url": f"/ws/v1/jobs/{job.pk}/",
            "events_url": reverse("status:job-events", args=[job.pk]),
            "fragment_url": reverse("status:job-fragment", args=[job.pk]),
            "elapsed_seconds": elapsed,
            "terminal": sorted(Job.TERMINAL),
        },
    }
    return render(request, "status/job.html", context)


@login_required
@require_GET
def job_fragment(request: HttpRequest, job_id: str) -> HttpResponse:
    """The live part of the job page, for the page's polling when streaming is unavailable."""
    job = _visible_job(request, job_id)
    response = render(request, "status/_job_live.html", _job_live_context(job))
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def job_events(request: HttpRequest, job_id: str) -> StreamingHttpResponse:
    """The job's events stream (as the API's), with the pages' permissions."""
    return job_event_response(request, str(_visible_job(request, job_id).pk))


@login_required
@require_POST
def job_cancel_view(request: HttpRequest, job_id: str) -> HttpResponse:
    job = _visible_job(request, job_id)
    try:
        job = job_cancel(job=job)
    except ToolexecError as exc:
        messages.info(request, str(exc))
    except RedisError:
        messages.warning(
            request,
            "The cancellation is recorded, but the job queue did not answer: the job will be stopped "
            "once the queue is reachable again.",
        )
    else:
        if job.status == Job.Status.CANCELLED:
            messages.success(request, "The job was cancelled before it started.")
        else:
            messages.success(request, "Cancelling: the job stops at its next check.")
    return redirect("status:job", job_id=job.pk)
