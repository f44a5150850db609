"""The server-rendered status pages: what each page shows, who may see it (others' ids answer
404), the "try it" form, cancelling from a page, escaping of everything a tool or a person
wrote, and a constant number of queries whatever the number of executions."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import django_rq
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rq.worker import Worker

from executions import page_selectors as select
from executions import pages
from executions.models import Execution, Job, Mode
from executions.page_forms import TryItForm
from executions.services.enqueue import execution_enqueue
from executions.services.jobs import job_claim
from instances.models import ToolInstance
from instances.selectors import instance_list
from tests.conftest import POSTGRES_AVAILABLE
from tests.factories import PASSWORD, UserFactory
from tools.models import ToolDefinition

pytestmark = pytest.mark.django_db

DEAD_REDIS = {"default": {"URL": "redis://127.0.0.1:1/0", "DEFAULT_TIMEOUT": 600}}


# --- helpers ------------------------------------------------------------------------------------


def record(
    instance: ToolInstance,
    *,
    status: str = Execution.Status.COMPLETED,
    mode: str = Mode.SYNC,
    duration_ms: int | None = 100,
    credits: str = "0.01",
    created_at: datetime | None = None,
    output: Any = None,
    error: dict[str, Any] | None = None,
    job: dict[str, Any] | None = None,
) -> Execution:
    """An execution as the service records it (rows only: these tests read pages)."""
    error = error or {}
    execution = Execution.objects.create(
        instance=instance,
        tool=instance.tool,
        owner=instance.owner,
        mode=mode,
        status=status,
        input_data={"expression": "a"},
        output_data=output if output is not None else ({"result": 1} if status == "COMPLETED" else None),
        error_code=error.get("error_code", ""),
        error_message=error.get("error_message", ""),
        error_metadata=error.get("metadata", {}),
        credits_consumed=Decimal(credits),
        duration_ms=duration_ms,
        created_at=created_at or timezone.now(),
        started_at=created_at or timezone.now(),
    )
    if job is not None or mode == Mode.ASYNC:
        job_status = (job or {}).pop("status", status if status in Job.Status.values else Job.Status.QUEUED)
        Job.objects.create(
            execution=execution,
            instance=instance,
            owner=instance.owner,
            status=job_status,
            rq_job_id="x",
            **{"heartbeat_at": timezone.now(), **(job or {})},
        )
    return execution


def failure(message: str = "Example API answered with an error", url: str = "https://toolexec.test/fix") -> dict:
    return {
        "error_code": "UPSTREAM_ERROR",
        "error_message": message,
        "metadata": {
            "action_items": [{"action": "fix", "message": "Fix the thing", "url": url, "priority": "high"}],
            "can_retry": True,
        },
    }


def signed_in(client, user):
    client.force_login(user)
    return client


def text(response) -> str:
    return response.content.decode()


@pytest.fixture
def page(client, user):
    return signed_in(client, user)


@pytest.fixture
def staff(db):
    return UserFactory(is_staff=True)


@pytest.fixture
def transform(make_instance, user):
    return instance_list(owner=user).get(pk=make_instance("json-transform", owner=user).pk)


# --- Signing in and out ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/status/",
        "/status/executions/",
        "/status/executions/00000000-0000-0000-0000-000000000001/",
        "/status/instances/00000000-0000-0000-0000-000000000001/",
        "/status/jobs/00000000-0000-0000-0000-000000000001/",
        "/status/jobs/00000000-0000-0000-0000-000000000001/fragment/",
        "/status/jobs/00000000-0000-0000-0000-000000000001/events/",
    ],
)
def test_every_page_sends_a_signed_out_person_to_the_login_page(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


def test_signing_in_on_the_login_page_leads_to_the_overview(client, user):
    form = client.get("/accounts/login/?next=/status/")
    assert form.status_code == 200
    assert "status/status.css" in text(form)  # styled like the pages
    response = client.post("/accounts/login/", {"username": user.username, "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/status/"
    assert client.get("/status/").status_code == 200


def test_a_wrong_password_is_refused_in_words(client, user):
    response = client.post("/accounts/login/", {"username": user.username, "password": "nope"})
    assert response.status_code == 200
    assert "Please enter a correct username and password" in text(response)


def test_signing_out_says_so_and_offers_to_sign_in_again(page):
    response = page.post("/accounts/logout/")
    assert response.status_code == 200
    assert "You are signed out" in text(response)
    assert 'href="/accounts/login/"' in text(response)
    assert page.get("/status/").status_code == 302


def test_the_browsable_api_keeps_its_own_login(client, user):
    response = client.get("/api-auth/login/")
    assert response.status_code == 200
    assert "rest_framework" in text(response)  # DRF's own template and static files
    response = client.post("/api-auth/login/?next=/api/v1/", {"username": user.username, "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/api/v1/"


# --- Overview ----------------------------------------------------------------------------------


@pytest.fixture
def day(transform, make_instance, user, other_user):
    """The last day of ``user``: 3 completed, 1 failed, 1 cancelled; plus noise that must not count."""
    now = timezone.now()
    for ms in (100, 200, 300):
        record(transform, duration_ms=ms, credits="0.5")
    record(transform, status="FAILED", duration_ms=1000, credits="0", error=failure())
    record(transform, status="CANCELLED", duration_ms=None, credits="0")
    record(transform, duration_ms=99_999, created_at=now - timedelta(days=2))  # too old
    theirs = make_instance("json-transform", owner=other_user)
    record(theirs, status="FAILED", duration_ms=5, error=failure("Their secret failure"))
    return transform


def test_the_overview_sums_up_the_last_day_of_your_runs(page, day):
    response = page.get("/status/")
    assert response.status_code == 200
    body = text(response)
    tiles = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", body))
    # p50 of 100, 200, 300, 1000 ms is 250 ms; p95 interpolates 300 → 1000 at 0.85: 895 ms.
    assert tiles == {
        "Executions": "5",
        "Failure rate": "20.0 %",
        "p50 duration": "250 ms",
        "p95 duration": "895 ms",
        "Credits": "1.5",
    }
    assert "Their secret failure" not in body


def test_staff_see_everyones_runs_on_the_overview(client, staff, day):
    body = text(signed_in(client, staff).get("/status/"))
    assert re.search(r"<dt>Executions</dt><dd>6</dd>", body)
    assert "Their secret failure" in body


@pytest.mark.postgres
def test_the_percentiles_fall_back_to_python_where_the_database_has_no_percentile_cont(day):
    since = timezone.now() - select.WINDOW
    executions = Execution.objects.all()
    assert select.window_summary(executions=executions, since=since, native=False) == select.window_summary(
        executions=executions, since=since, native=True
    )
    assert select.tool_table(executions=executions, since=since, native=False) == select.tool_table(
        executions=executions, since=since, native=True
    )


def test_percentile_interpolates_like_percentile_cont():
    assert select.percentile([], 0.5) is None
    assert select.percentile([7], 0.95) == 7
    assert select.percentile([1, 2, 3, 4], 0.5) == 2.5
    assert select.percentile([300, 100, 1000, 200], 0.95) == pytest.approx(895)


def test_the_hourly_chart_counts_runs_and_failures_in_their_hours(page, transform):
    now = timezone.now()
    three_hours_ago = now - timedelta(hours=3)
    record(transform, created_at=three_hours_ago)
    record(transform, created_at=three_hours_ago, status="FAILED", error=failure())
    record(transform, created_at=now)
    buckets = select.hourly_buckets(executions=Execution.objects.all(), now=now)
    assert len(buckets) == 24
    assert [(b.runs, b.failed) for b in buckets[-4:]] == [(2, 1), (0, 0), (0, 0), (1, 0)]
    body = text(page.get("/status/"))
    assert "<svg" in body and 'role="img"' in body
    hour = three_hours_ago.astimezone(UTC).strftime("%Y-%m-%d %H:00")
    assert f"<title>{hour} UTC: 2 runs, 1 failed</title>" in body


def test_no_runs_in_a_day_says_so_instead_of_an_empty_chart(page):
    body = text(page.get("/status/"))
    assert "No runs in the last 24 hours." in body
    assert "<svg" not in body


def test_the_overview_has_a_row_per_tool(page, day, make_instance, user):
    slow = make_instance("test-noop", owner=user)
    record(slow, duration_ms=40)
    rows = select.tool_table(executions=Execution.objects.filter(owner=day.owner), since=timezone.now() - select.WINDOW)
    assert [(r.slug, r.runs, r.failed) for r in rows] == [("json-transform", 5, 1), ("test-noop", 1, 0)]
    body = text(page.get("/status/"))
    assert 'href="/status/executions/?tool=test-noop"' in body


def test_latest_failures_show_their_words_and_action_items_as_links(page, transform):
    record(transform, status="FAILED", error=failure("Billing API said no"))
    record(transform, status="TIMED_OUT", error=failure("Too slow", url="javascript:alert(1)"))
    body = text(page.get("/status/"))
    assert "Billing API said no" in body and "Too slow" in body
    assert '<a class="button" href="https://toolexec.test/fix">Fix the thing</a>' in body
    assert "javascript:" not in body  # an unsafe URL is shown as words, not as a link


def test_jobs_in_flight_show_their_progress_and_step(page, make_instance, user):
    long = make_instance("demo-long-task", owner=user)
    record(
        long,
        mode=Mode.ASYNC,
        status="RUNNING",
        job={
            "status": "RUNNING",
            "progress": 40,
            "current_step": "Step 4 of 10",
            "step_index": 4,
            "steps_total": 10,
            "started_at": timezone.now() - timedelta(seconds=8),
        },
    )
    body = text(page.get("/status/"))
    assert '<progress max="100" value="40">' in body
    assert "Step 4 of 10" in body and "(step 4 of 10)" not in body  # the step says it: not twice
    assert re.search(r'<td data-label="ETA">12\.\d s</td>', body)  # 8 s for 40 %: about 12 s left


@pytest.mark.redis
def test_the_overview_shows_queues_and_workers_from_rq(
    client, staff, user, make_instance, django_capture_on_commit_callbacks
):
    instance = make_instance("demo-long-task", owner=user)
    with django_capture_on_commit_callbacks(execute=True):
        accepted = execution_enqueue(instance=instance_list(owner=user).get(pk=instance.pk), inputs={"steps": 1})
    queue = django_rq.get_queue("default")
    worker = Worker([queue], connection=queue.connection, name="status-page-test-worker")
    worker.register_birth()
    worker.set_current_job_id(str(accepted.job.pk))
    try:
        body = text(signed_in(client, staff).get("/status/"))
    finally:
        worker.register_death()
    row = body.split('<td data-label="Queue">default</td>', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num" data-label="Waiting">1</td>' in row
    assert re.search(r'<td data-label="Oldest waiting">\d+\xa0\w+ ago</td>', row)  # the oldest waiting job's age
    assert "status-page-test-worker" in body
    assert f'href="/status/jobs/{accepted.job.pk}/"' in body  # staff follow the worker's job


def test_the_overview_says_queues_are_unavailable_when_redis_is_down(page, settings, day):
    settings.RQ_QUEUES = DEAD_REDIS
    response = page.get("/status/")
    assert response.status_code == 200
    assert "Queue and worker information is unavailable right now" in text(response)
    assert re.search(r"<dt>Executions</dt><dd>5</dd>", text(response))


# --- Instance page -------------------------------------------------------------------------------


def test_the_instance_page_lists_every_readiness_check_with_action_items(page, make_instance, user):
    sheet = make_instance("test-google-sheet", owner=user)  # needs a Google account: a draft
    body = text(page.get(f"/status/instances/{sheet.pk}/"))
    assert "Not yet" in body
    assert "is installed on this server" in body  # a passing check
    assert body.count('class="passed"') >= 2 and body.count('class="failed"') >= 1
    assert f'href="https://toolexec.test/api/v1/instances/{sheet.pk}/configure-credentials"' in body


def test_the_instance_page_shows_statistics_and_recent_runs(page, transform):
    ToolInstance.objects.filter(pk=transform.pk).update(
        execution_count=4, success_count=3, failure_count=1, total_duration_ms=2000, credits_consumed=Decimal("0.04")
    )
    executions = [record(transform), record(transform, mode=Mode.ASYNC, status="COMPLETED")]
    body = text(page.get(f"/status/instances/{transform.pk}/"))
    tiles = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", body))
    assert tiles == {
        "Runs": "4",
        "Completed": "3",
        "Not completed": "1",
        "Failure rate": "25.0 %",
        "Average": "500 ms",
        "Credits": "0.04",
    }
    assert f'href="/status/executions/{executions[0].pk}/"' in body  # a sync run: its record
    assert f'href="/status/jobs/{executions[1].job.pk}/"' in body  # an async one: its job


def test_another_persons_instance_is_not_found(page, make_instance, other_user):
    theirs = make_instance("json-transform", owner=other_user)
    assert page.get(f"/status/instances/{theirs.pk}/").status_code == 404
    assert page.post(f"/status/instances/{theirs.pk}/", {"mode": "sync"}).status_code == 404
    assert not Execution.objects.exists()


def test_staff_may_look_at_anyones_instance_but_not_run_it(client, staff, transform):
    staff_page = signed_in(client, staff)
    body = text(staff_page.get(f"/status/instances/{transform.pk}/"))
    assert "Only the instance's owner can run it" in body and 'name="in_expression"' not in body
    response = staff_page.post(
        f"/status/instances/{transform.pk}/", {"in_expression": "a", "in_data": "{}", "mode": "sync"}
    )
    assert response.status_code == 403
    assert not Execution.objects.exists()


def test_try_it_runs_json_transform_and_shows_the_result(page, transform):
    data = {"people": [{"name": "Ada", "age": 36}, {"name": "Linus", "age": 28}]}
    response = page.post(
        f"/status/instances/{transform.pk}/",
        {"in_expression": "people[?age > `30`]", "in_data": json.dumps(data), "mode": "sync"},
    )
    assert response.status_code == 200
    body = text(response)
    execution = Execution.objects.get()
    assert execution.status == "COMPLETED" and execution.output_data == {"result": [{"name": "Ada", "age": 36}]}
    assert "COMPLETED" in body and "0.01 credits" in body
    assert '<th scope="col">name</th><th scope="col">age</th>' in body  # records as a table
    assert "<td>Ada</td><td>36</td>" in body
    assert f'href="/status/executions/{execution.pk}/"' in body
    assert re.search(r"<dt>Runs</dt><dd>1</dd>", body)  # the statistics moved


def test_try_it_refuses_json_that_does_not_parse_on_its_field(page, transform):
    response = page.post(f"/status/instances/{transform.pk}/", {"in_expression": "a", "in_data": "{", "mode": "sync"})
    assert response.status_code == 400
    assert "This is not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)." in text(
        response
    )
    assert not Execution.objects.exists()


def test_try_it_shows_the_tools_own_field_errors_on_the_field(page, transform):
    response = page.post(
        f"/status/instances/{transform.pk}/", {"in_expression": "people[", "in_data": "{}", "mode": "sync"}
    )
    assert response.status_code == 400
    body = text(response)
    assert "The JMESPath expression is not valid" in body  # the envelope's words
    field = body.split('id="id_in_expression"', 1)[1].split("</div>", 1)[0]
    assert 'class="errorlist"' in field  # and the error on the field it is about
    assert not Execution.objects.exists()


def test_try_it_explains_why_an_instance_that_is_not_ready_cannot_run(page, transform):
    ToolInstance.objects.filter(pk=transform.pk).update(status=ToolInstance.Status.DISABLED)
    response = page.post(f"/status/instances/{transform.pk}/", {"in_expression": "a", "in_data": "{}", "mode": "sync"})
    assert response.status_code == 409
    body = text(response)
    assert "This JSON Transform instance is disabled. Activate it to run it again." in body
    assert f'href="https://toolexec.test/api/v1/instances/{transform.pk}/activate"' in body


def test_try_it_refuses_a_mode_the_tool_does_not_have(page, make_instance, user):
    priced = make_instance("test-priced", owner=user)  # sync only
    response = page.post(f"/status/instances/{priced.pk}/", {"in_units": "1", "mode": "async"})
    assert response.status_code == 400
    assert "Select a valid choice" in text(response)
    assert not Execution.objects.exists()


def test_try_it_shows_a_run_that_failed_in_words(page, make_instance, user):
    failing = make_instance("test-upstream-failing", owner=user)
    response = page.post(f"/status/instances/{failing.pk}/", {"mode": "sync"})
    assert response.status_code == 200
    assert "Example API answered with an error while Test Upstream Failing was running" in text(response)
    assert Execution.objects.get().status == "FAILED"


@pytest.mark.redis
def test_try_it_async_goes_to_the_jobs_page(page, make_instance, user):
    long = make_instance("demo-long-task", owner=user)
    response = page.post(f"/status/instances/{long.pk}/", {"in_steps": "3", "in_step_seconds": "0.1", "mode": "async"})
    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/status/jobs/{job.pk}/"
    assert job.status == "QUEUED" and job.execution.input_data == {"steps": 3, "step_seconds": 0.1}


@pytest.mark.django_db(transaction=True)  # the job is queued when its row commits, inside the request
def test_try_it_async_with_the_queue_down_says_so_and_links_the_failed_job(page, settings, make_instance, user):
    settings.RQ_QUEUES = DEAD_REDIS
    long = make_instance("demo-long-task", owner=user)
    response = page.post(f"/status/instances/{long.pk}/", {"in_steps": "3", "mode": "async"})
    assert response.status_code == 503
    job = Job.objects.get()
    assert job.status == "FAILED"
    assert "The job queue is unavailable right now" in text(response)
    assert f'href="/status/jobs/{job.pk}/"' in text(response)


def test_the_try_it_form_follows_the_json_schema(db):
    tool = ToolDefinition(
        slug="form-test",
        name="Form Test",
        modes=["sync", "async"],
        input_schema={
            "type": "object",
            "properties": {
                "title": {"type": "string", "description": "What to call it"},
                "count": {"type": "integer", "default": 3},
                "ratio": {"type": "number"},
                "dry_run": {"type": "boolean", "default": True},
                "colour": {"enum": ["red", "green"]},
                "size": {"enum": [1, 2]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "options": {"type": "object"},
                "api_key": {"type": "string", "writeOnly": True},
                "maybe": {"type": ["string", "null"]},
            },
            "required": ["title", "colour"],
        },
    )
    instance = ToolInstance(tool=tool, config={"colour": "green"})
    form = TryItForm(instance=instance)
    kinds = {key: type(field).__name__ for key, field in form.fields.items()}
    assert kinds == {
        "mode": "ChoiceField",
        "in_title": "CharField",
        "in_count": "IntegerField",
        "in_ratio": "FloatField",
        "in_dry_run": "BooleanField",
        "in_colour": "JSONChoiceField",
        "in_size": "JSONChoiceField",
        "in_tags": "LinesField",
        "in_options": "JSONTextField",
        "in_api_key": "CharField",
        "in_maybe": "CharField",
    }
    assert form.fields["in_title"].required and not form.fields["in_colour"].required  # config gives a colour
    assert form["in_count"].value() == 3 and form["in_dry_run"].value() is True
    assert 'type="password"' in str(form["in_api_key"])
    assert [c[0] for c in form.fields["mode"].choices] == ["sync", "async"]

    form = TryItForm(
        {
            "mode": "async",
            "in_title": "Report",
            "in_count": "",
            "in_ratio": "0.5",
            "in_colour": '"red"',
            "in_size": "2",
            "in_tags": "a\n\n b \nc",
            "in_options": '{"deep": [1, {"x": null}]}',
        },
        instance=instance,
    )
    assert form.is_valid(), form.errors
    assert form.inputs() == {
        "title": "Report",
        "ratio": 0.5,
        "dry_run": False,
        "colour": "red",
        "size": 2,
        "tags": ["a", "b", "c"],
        "options": {"deep": [1, {"x": None}]},
    }


def test_a_json_field_too_deeply_nested_is_refused_in_words(page, transform):
    response = page.post(
        f"/status/instances/{transform.pk}/", {"in_expression": "a", "in_data": "[" * 100_000, "mode": "sync"}
    )
    assert response.status_code == 400
    assert "This JSON is nested too deeply." in text(response)


# --- Output and errors are shown as text -----------------------------------------------------------

SCRIPT = "<script>alert('owned')</script>"


def test_a_tool_output_containing_script_is_shown_as_text(page, transform):
    execution = record(transform, output={"result": SCRIPT, "rows": [{"<b>col</b>": SCRIPT}]})
    body = text(page.get(f"/status/executions/{execution.pk}/"))
    assert "<script>alert" not in body and "<b>col" not in body
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in body
    assert '<th scope="col">&lt;b&gt;col&lt;/b&gt;</th>' in body


def test_a_sync_result_containing_script_is_shown_as_text(page, transform):
    response = page.post(
        f"/status/instances/{transform.pk}/",
        {"in_expression": "x", "in_data": json.dumps({"x": SCRIPT}), "mode": "sync"},
    )
    body = text(response)
    assert "<script>alert" not in body
    assert "&quot;&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;&quot;" in body


def test_error_words_names_and_steps_from_tools_and_people_are_escaped(client, staff, make_instance, user):
    user.username = "<i>mallory</i>"
    user.save()
    instance = make_instance("demo-long-task", owner=user, name=SCRIPT, workflow_id=SCRIPT)
    record(instance, status="FAILED", error=failure(SCRIPT))
    running = record(instance, mode=Mode.ASYNC, status="RUNNING", job={"status": "RUNNING", "current_step": SCRIPT})
    staff_page = signed_in(client, staff)
    pages = [
        "/status/",
        "/status/executions/",
        f"/status/instances/{instance.pk}/",
        f"/status/jobs/{running.job.pk}/",
        f"/status/jobs/{running.job.pk}/fragment/",
    ]
    for path in pages:
        body = text(staff_page.get(path))
        assert "<script>alert" not in body, path
        assert "<i>mallory" not in body, path
        assert "&lt;script&gt;" in body, path


def test_tabular_output_is_a_table_and_other_output_formatted_json(page, transform):
    table = record(transform, output={"columns": ["Region", "Target"], "rows": [{"Region": "North", "Target": "120"}]})
    nested = record(transform, output={"result": {"a": [1, 2]}})
    body = text(page.get(f"/status/executions/{table.pk}/"))
    assert "<td>North</td><td>120</td>" in body
    body = text(page.get(f"/status/executions/{nested.pk}/"))
    assert '<table class="data">' not in body
    assert '<pre class="json">{\n  &quot;result&quot;: {\n    &quot;a&quot;: [\n      1,' in body


# --- Job page ------------------------------------------------------------------------------------


@pytest.fixture
def long_task(make_instance, user):
    return make_instance("demo-long-task", owner=user)


def running_job(instance: ToolInstance, **fields: Any) -> Job:
    values = {
        "status": "RUNNING",
        "progress": 30,
        "current_step": "Fetching rows",
        "step_index": 3,
        "steps_total": 10,
        "started_at": timezone.now() - timedelta(seconds=3),
        **fields,
    }
    return record(instance, mode=Mode.ASYNC, status="RUNNING", job=values).job


def test_the_job_page_shows_progress_step_eta_and_a_cancel_button(page, long_task):
    job = running_job(long_task)
    body = text(page.get(f"/status/jobs/{job.pk}/"))
    assert '<progress class="job-progress" max="100" value="30"' in body
    assert '<span data-field="step">Fetching rows</span>' in body
    assert '<span data-field="steps" class="muted">step 3 of 10</span>' in body
    assert re.search(r"about 7\.\d s left", body)
    assert f'action="/status/jobs/{job.pk}/cancel/"' in body
    # Works without JavaScript (a refresh link), and hands the script its settings as JSON.
    assert f'<a href="/status/jobs/{job.pk}/">Refresh</a>' in body
    config = json.loads(re.search(r'<script id="job-config" type="application/json">(.*?)</script>', body).group(1))
    assert config["events_url"] == f"/status/jobs/{job.pk}/events/"
    assert config["fragment_url"] == f"/status/jobs/{job.pk}/fragment/"
    assert config["status"] == "RUNNING"
    assert 'src="/static/status/job.js"' in body


def test_a_step_named_like_its_counter_is_not_said_twice(page, long_task):
    job = running_job(long_task, current_step="Step 3 of 10")
    body = text(page.get(f"/status/jobs/{job.pk}/fragment/"))
    assert body.count("tep 3 of 10") == 1


def test_a_completed_job_shows_its_result_and_no_cancel_button(page, long_task):
    job = record(
        long_task, mode=Mode.ASYNC, output={"steps_completed": 3, "seconds": 0.3}, job={"status": "COMPLETED"}
    ).job
    Job.objects.filter(pk=job.pk).update(progress=100)
    body = text(page.get(f"/status/jobs/{job.pk}/"))
    assert "COMPLETED" in body and "&quot;steps_completed&quot;: 3" in body
    assert "/cancel/" not in body


def test_a_failed_job_shows_the_error_with_its_action_items(page, long_task):
    job = record(long_task, mode=Mode.ASYNC, status="FAILED", error=failure("It broke"), job={"status": "FAILED"}).job
    body = text(page.get(f"/status/jobs/{job.pk}/fragment/"))
    assert 'data-status="FAILED"' in body and "It broke" in body
    assert '<a class="button" href="https://toolexec.test/fix">Fix the thing</a>' in body
    assert "/cancel/" not in body


def test_the_fragment_is_the_live_part_alone(page, long_task):
    job = running_job(long_task, progress=55)
    response = page.get(f"/status/jobs/{job.pk}/fragment/")
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    body = text(response)
    assert body.lstrip().startswith('<div class="job-state" data-status="RUNNING" data-progress="55">')
    assert "<html" not in body


def test_a_running_job_whose_worker_went_silent_is_ended_when_its_page_is_read(page, long_task, settings):
    job = running_job(
        long_task, heartbeat_at=timezone.now() - timedelta(seconds=settings.TOOLEXEC_JOB_STALE_SECONDS + 5)
    )
    body = text(page.get(f"/status/jobs/{job.pk}/"))
    assert "FAILED" in body and "The worker running Demo Long Task stopped unexpectedly" in body


def test_the_events_stream_of_an_ended_job_sends_its_state_and_ends(page, long_task):
    job = record(long_task, mode=Mode.ASYNC, job={"status": "COMPLETED"}).job
    response = page.get(f"/status/jobs/{job.pk}/events/")
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    stream = b"".join(response.streaming_content).decode()
    assert stream.startswith("event: state\ndata: ")
    assert json.loads(stream.split("data: ", 1)[1])["status"] == "COMPLETED"


@pytest.mark.parametrize("suffix", ["", "fragment/", "events/"])
def test_another_persons_job_is_not_found(page, make_instance, other_user, suffix):
    theirs = running_job(make_instance("demo-long-task", owner=other_user))
    assert page.get(f"/status/jobs/{theirs.pk}/{suffix}").status_code == 404


def test_another_persons_job_cannot_be_cancelled(page, make_instance, other_user):
    theirs = running_job(make_instance("demo-long-task", owner=other_user))
    assert page.post(f"/status/jobs/{theirs.pk}/cancel/").status_code == 404
    assert Job.objects.get(pk=theirs.pk).cancel_requested_at is None


def test_staff_may_follow_anyones_job(client, staff, long_task):
    job = running_job(long_task)
    assert signed_in(client, staff).get(f"/status/jobs/{job.pk}/").status_code == 200


def test_cancel_needs_a_post(page, long_task):
    job = running_job(long_task)
    assert page.get(f"/status/jobs/{job.pk}/cancel/").status_code == 405


@pytest.mark.redis
def test_cancelling_a_queued_job_from_its_page(page, long_task, user):
    accepted = execution_enqueue(instance=instance_list(owner=user).get(pk=long_task.pk), inputs={"steps": 2})
    response = page.post(f"/status/jobs/{accepted.job.pk}/cancel/", follow=True)
    assert response.redirect_chain == [(f"/status/jobs/{accepted.job.pk}/", 302)]
    assert Job.objects.get(pk=accepted.job.pk).status == "CANCELLED"
    assert "The job was cancelled before it started." in text(response)


@pytest.mark.redis
def test_cancelling_a_running_job_from_its_page_asks_it_to_stop(page, long_task, user):
    accepted = execution_enqueue(instance=instance_list(owner=user).get(pk=long_task.pk), inputs={"steps": 2})
    assert job_claim(job_id=accepted.job.pk, worker_name="test")
    response = page.post(f"/status/jobs/{accepted.job.pk}/cancel/", follow=True)
    assert "Cancelling: the job stops at its next check." in text(response)
    assert Job.objects.get(pk=accepted.job.pk).cancel_requested_at is not None
    assert "Cancelling…" in text(response)


def test_cancelling_a_job_that_ended_says_so(page, long_task):
    job = record(long_task, mode=Mode.ASYNC, job={"status": "COMPLETED"}).job
    response = page.post(f"/status/jobs/{job.pk}/cancel/", follow=True)
    assert "This job has already ended (COMPLETED); there is nothing to cancel." in text(response)


@pytest.mark.redis
def test_cancelling_while_the_queue_is_down_says_what_happens_next(page, settings, long_task, user):
    accepted = execution_enqueue(instance=instance_list(owner=user).get(pk=long_task.pk), inputs={"steps": 2})
    assert job_claim(job_id=accepted.job.pk, worker_name="test")
    settings.RQ_QUEUES = DEAD_REDIS
    response = page.post(f"/status/jobs/{accepted.job.pk}/cancel/", follow=True)
    assert response.status_code == 200
    assert "the job queue did not answer" in text(response)
    assert Job.objects.get(pk=accepted.job.pk).cancel_requested_at is not None


# --- Executions ----------------------------------------------------------------------------------


def test_the_history_lists_only_your_runs_linking_to_their_job_or_record(page, transform, long_task, make_instance):
    sync = record(transform)
    run_async = record(long_task, mode=Mode.ASYNC, job={"status": "COMPLETED"})
    theirs = record(make_instance("json-transform", owner=UserFactory()))
    body = text(page.get("/status/executions/"))
    assert f'href="/status/executions/{sync.pk}/"' in body
    assert f'href="/status/jobs/{run_async.job.pk}/"' in body
    assert str(theirs.pk) not in body
    assert '<th scope="col">Owner</th>' not in body


def test_staff_see_everyones_history_with_owners(client, staff, transform):
    record(transform)
    body = text(signed_in(client, staff).get("/status/executions/"))
    assert '<th scope="col">Owner</th>' in body and f'<td data-label="Owner">{transform.owner.username}</td>' in body


def test_the_history_filters_by_status_mode_tool_instance_and_day(page, transform, long_task, make_instance, user):
    other = make_instance("json-transform", owner=user)
    yesterday = timezone.now() - timedelta(days=1)
    failed = record(transform, status="FAILED", error=failure())
    ok = record(transform)
    old = record(transform, created_at=yesterday)
    long = record(long_task, mode=Mode.ASYNC, job={"status": "COMPLETED"})
    elsewhere = record(other)

    runs = (failed, ok, old, long, elsewhere)

    def shown(query: str) -> set:
        body = text(page.get(f"/status/executions/?{query}"))
        return {run.pk for run in runs if f'href="{pages.execution_link(run)}"' in body}

    assert shown("status=failed") == {failed.pk}
    assert shown("status=FAILED") == {failed.pk}
    assert shown("mode=ASYNC") == {long.pk}
    assert shown("tool=demo-long-task") == {long.pk}
    assert shown(f"instance={other.pk}") == {elsewhere.pk}
    assert shown(f"date={yesterday:%Y-%m-%d}") == {old.pk}


def test_a_filter_that_is_not_understood_is_left_out_and_said(page, transform):
    record(transform)
    body = text(page.get("/status/executions/?status=BOGUS&date=someday"))
    assert "Some filters were not understood and are left out" in body
    assert "Select a valid choice. BOGUS is not one of the available choices." in body
    assert "Enter a valid date." in body
    assert "COMPLETED" in body


def test_the_history_pages_through_every_run_once_in_both_directions(page, transform):
    moment = timezone.now()
    # Half of them share one timestamp: the cursor must still not skip or repeat any.
    created = [record(transform, created_at=moment if i % 2 else moment - timedelta(seconds=i)) for i in range(60)]
    expected = [str(e.pk) for e in sorted(created, key=lambda e: (e.created_at, e.pk), reverse=True)]

    def ids_and_link(path: str, label: str) -> tuple[list[str], str]:
        body = text(page.get(path))
        ids = re.findall(r'<a href="/status/executions/([0-9a-f-]{36})/">', body)
        found = re.search(rf'<a href="(\?[^"]*)">{label}', body)
        return ids, ("/status/executions/" + found.group(1).replace("&amp;", "&") if found else "")

    walked, link, sizes = [], "/status/executions/", []
    while link:
        ids, link = ids_and_link(link, "Older")
        walked += ids
        sizes.append(len(ids))
    assert walked == expected and sizes == [25, 25, 10]
    # And back: "Newer" from the oldest page leads through the same runs, newest page last.
    back = []
    ids, link = ids_and_link(f"/status/executions/?before={_cursor(expected[49])}", "‹ Newer")
    assert ids == expected[50:]
    while link:
        ids, link = ids_and_link(link, "‹ Newer")
        back = ids + back
    assert back == expected[:50]


def _cursor(execution_id: str) -> str:
    return select.cursor_of(Execution.objects.get(pk=execution_id))


def test_a_page_link_that_is_not_valid_shows_the_newest_runs(page, transform):
    newest = record(transform)
    body = text(page.get("/status/executions/?before=garbage"))
    assert "That page link is not valid; here are the newest executions." in body
    assert str(newest.pk) in body


def test_an_execution_record_shows_inputs_outcome_and_its_job(page, long_task):
    execution = record(long_task, mode=Mode.ASYNC, job={"status": "COMPLETED"})
    body = text(page.get(f"/status/executions/{execution.pk}/"))
    assert "&quot;expression&quot;: &quot;a&quot;" in body
    assert f'href="/status/jobs/{execution.job.pk}/"' in body


def test_another_persons_execution_is_not_found(page, make_instance, other_user, client):
    theirs = record(make_instance("json-transform", owner=other_user))
    assert page.get(f"/status/executions/{theirs.pk}/").status_code == 404


# --- Query budgets ---------------------------------------------------------------------------

# Session and user (2), then one query per widget or object: the overview's jobs in flight,
# 24-hour summary, tool table, hourly buckets and latest failures; a job and its execution; an
# instance with its tool and account, its readiness (credentials), its recent runs, its result
# cache's last 24 hours (hits and credits saved).
# Without percentile_cont (SQLite, `make run`), the summary and the tool table read the durations.
SQLITE_PERCENTILE_QUERIES = 2
PAGE_BUDGETS = {
    "overview": 7,
    "history": 4,
    "execution": 3,
    "instance": 5,
    "job": 3,
    "fragment": 3,
}


def _fill(instance: ToolInstance, long: ToolInstance, count: int) -> Job:
    now = timezone.now()
    job = None
    for i in range(count):
        status = ["COMPLETED", "FAILED", "COMPLETED", "CANCELLED"][i % 4]
        error = failure() if status == "FAILED" else None
        record(instance, status=status, error=error, duration_ms=10 * i, created_at=now - timedelta(minutes=7 * i))
        running = record(
            long, mode=Mode.ASYNC, status="RUNNING", job={"status": "RUNNING", "progress": i % 100, "started_at": now}
        )
        job = job or running.job
    return job


@pytest.mark.parametrize("name", sorted(PAGE_BUDGETS))
def test_every_page_costs_the_same_number_of_queries_for_3_or_50_executions(
    client, name, make_instance, settings, django_assert_max_num_queries
):
    settings.RQ_QUEUES = DEAD_REDIS  # Redis is not the database; keep its answer out of the timing
    counts = []
    for size in (3, 50):
        owner = UserFactory()
        instance = make_instance("json-transform", owner=owner)
        long = make_instance("demo-long-task", owner=owner)
        job = _fill(instance, long, size)
        paths = {
            "overview": "/status/",
            "history": "/status/executions/",
            "execution": f"/status/executions/{job.execution_id}/",
            "instance": f"/status/instances/{instance.pk}/",
            "job": f"/status/jobs/{job.pk}/",
            "fragment": f"/status/jobs/{job.pk}/fragment/",
        }
        client.force_login(owner)
        budget = PAGE_BUDGETS[name] + (0 if POSTGRES_AVAILABLE or name != "overview" else SQLITE_PERCENTILE_QUERIES)
        with django_assert_max_num_queries(budget):
            with CaptureQueriesContext(connection) as captured:
                assert client.get(paths[name]).status_code == 200
        counts.append(len(captured))
    assert counts[0] == counts[1], f"{name}: {counts[0]} queries for 3 executions, {counts[1]} for 50"
