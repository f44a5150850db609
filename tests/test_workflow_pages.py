"""The workflow status pages: a workflow's steps drawn as a graph with each step's readiness and
a "run it" form built from the definition's inputs; a run's page with each step's state and
progress on the graph, its fragment and events stream for the live page, cancel and retry;
who may see and do what (others' ids answer 404); escaping; and the query budgets, a run
page rendering in a constant number of queries even for a 1,000-item fan-out.

Runs here are rows written directly (these tests read pages); tests/test_workflow_browser.py
follows real runs on a real worker."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from executions.models import Execution, Job, Mode
from instances.models import ToolInstance
from tests.factories import UserFactory
from tests.test_status_pages import failure, record, signed_in, text
from workflows import graph
from workflows.models import StepRun, Workflow, WorkflowRun
from workflows.pages import RunItForm, step_status
from workflows.services.workflows import workflow_create

pytestmark = pytest.mark.django_db

ZERO = "00000000-0000-0000-0000-000000000001"


# --- helpers ------------------------------------------------------------------------------------


def transform(expression: str = "@", data: Any = 1) -> dict[str, Any]:
    return {"expression": expression, "data": data}


def make_workflow(owner: Any, steps: list[dict[str, Any]], *, name: str = "Monthly report", **extra: Any) -> Workflow:
    return workflow_create(
        owner=owner, key=f"wf-{uuid.uuid4().hex[:8]}", name=name, definition={"steps": steps, **extra}
    )


def step(step_id: str, instance: ToolInstance, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "instance": str(instance.pk), "inputs": transform(), **extra}


def make_run(workflow: Workflow, status: str = "RUNNING", **fields: Any) -> WorkflowRun:
    now = timezone.now()
    return WorkflowRun.objects.create(
        workflow=workflow,
        version=workflow.current_version,
        owner=workflow.owner,
        status=status,
        started_at=None if status == "QUEUED" else now - timedelta(seconds=5),
        finished_at=now if status in WorkflowRun.TERMINAL else None,
        **fields,
    )


def step_row(run: WorkflowRun, step_id: str, status: str, **fields: Any) -> StepRun:
    now = timezone.now()
    ended = status in StepRun.TERMINAL
    ran = status in ("RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
    return StepRun.objects.create(
        run=run,
        step_id=step_id,
        status=status,
        started_at=now - timedelta(seconds=2) if ran else None,
        finished_at=now if ended else None,
        **fields,
    )


def running_step(run: WorkflowRun, step_id: str, instance: ToolInstance, **job: Any) -> StepRun:
    """A step whose execution's job runs: its progress and current step are the job's."""
    values = {"status": "RUNNING", "progress": 40, "current_step": "Reading rows", **job}
    execution = record(instance, mode=Mode.ASYNC, status="RUNNING", job=values)
    return step_row(run, step_id, "RUNNING", execution=execution, attempt=1)


@pytest.fixture
def page(client, user):
    return signed_in(client, user)


@pytest.fixture
def staff(db):
    return UserFactory(is_staff=True)


@pytest.fixture
def chain(make_instance, user) -> Workflow:
    """list → read (a fan-out) → summary, and notes beside read: a diamond's worth of edges."""
    instances = {name: make_instance(owner=user, name=f"{name} instance") for name in ("list", "read", "notes", "sum")}
    return make_workflow(
        user,
        [
            step("list", instances["list"], inputs=transform("@", [{"id": "a"}, {"id": "b"}, {"id": "c"}])),
            step(
                "read",
                instances["read"],
                for_each={"$expr": "steps.list.output.result"},
                concurrency=2,
                inputs=transform("@", {"$expr": "item"}),
            ),
            step("notes", instances["notes"], depends_on=["list"]),
            step(
                "summary",
                instances["sum"],
                depends_on=["notes"],
                inputs=transform("length(@)", {"$expr": "steps.read.output"}),
            ),
        ],
        inputs={
            "type": "object",
            "required": ["month"],
            "properties": {
                "month": {"type": "string", "description": "Which month, as 2025-01"},
                "limit": {"type": "integer", "default": 10},
                "dry_run": {"type": "boolean"},
                "format": {"enum": ["csv", "json"]},
            },
        },
    )


def nodes(body: str) -> dict[str, dict[str, str]]:
    """The graph's nodes: step id → its class, state words and bar width."""
    found = {}
    for match in re.finditer(r'<a href="#step-[^"]*" class="node ([^"]*)" data-step="([^"]*)">(.*?)</a>', body, re.S):
        inside = match.group(3)
        state = re.search(r'<text class="state"[^>]*>(.*?)</text>', inside)
        bar = re.search(r'<rect class="bar" data-field="bar"[^>]* width="(\d+)"', inside)
        found[match.group(2)] = {
            "class": match.group(1),
            "state": state.group(1) if state else "",
            "bar": bar.group(1) if bar else None,
        }
    return found


def step_body(body: str, step_id: str) -> str:
    """A step's rows in the run page's steps table."""
    return body.split(f'<tbody id="step-{step_id}"', 1)[1].split("</tbody>", 1)[0]


# --- The graph's layout -------------------------------------------------------------------------


def test_steps_go_in_columns_by_depth_and_rows_by_their_order():
    layout = graph.graph_layout({"list": [], "read": ["list"], "notes": ["list"], "summary": ["read", "notes"]})
    where = {node.step_id: (node.column, node.row) for node in layout.nodes}
    assert where == {"list": (0, 0), "read": (1, 0), "notes": (1, 1), "summary": (2, 0)}
    assert layout.columns == 3
    assert {(edge.source, edge.target) for edge in layout.edges} == {
        ("list", "read"),
        ("list", "notes"),
        ("read", "summary"),
        ("notes", "summary"),
    }
    boxes = {node.step_id: node for node in layout.nodes}
    # A column shorter than the tallest is centred on it.
    assert boxes["list"].y == boxes["summary"].y == (boxes["read"].y + boxes["notes"].y) // 2
    assert layout.width == boxes["summary"].x + graph.NODE_WIDTH + graph.MARGIN
    assert layout.height == boxes["notes"].y + graph.NODE_HEIGHT + graph.MARGIN


def test_every_edge_runs_from_a_steps_right_side_to_its_dependents_left_side():
    layout = graph.graph_layout({"a": [], "b": ["a"], "c": ["a", "b"]})
    boxes = {node.step_id: node for node in layout.nodes}
    for edge in layout.edges:
        start, end = edge.path.split(" C")[0][1:], edge.path.rsplit(" ", 1)[1]
        source, target = boxes[edge.source], boxes[edge.target]
        assert start == f"{source.x + source.width},{source.y + source.height // 2}"
        assert end == f"{target.x},{target.y + target.height // 2}"
    assert boxes["c"].column == 2  # after its deepest dependency, not its first


def test_a_long_step_id_is_shortened_on_its_node_and_a_cycle_does_not_hang():
    long = "a-step-whose-name-goes-on-and-on"
    layout = graph.graph_layout({long: [], "x": ["y"], "y": ["x"], "z": ["gone"]})
    labels = {node.step_id: node.label for node in layout.nodes}
    assert labels[long] == long[: graph.LABEL_CHARS - 1] + "…"
    assert {node.step_id for node in layout.nodes} == {long, "x", "y", "z"}
    assert all(edge.source != "gone" for edge in layout.edges)
    assert graph.graph_layout({}).nodes == [] and graph.graph_layout({}).width == 0


@pytest.mark.parametrize(
    ("statuses", "shown"),
    [
        ([], ""),
        (["SUCCEEDED"] * 3, "SUCCEEDED"),
        (["SUCCEEDED", "RUNNING", "PENDING"], "RUNNING"),
        (["SUCCEEDED", "PENDING"], "RUNNING"),
        (["QUEUED", "PENDING"], "QUEUED"),
        (["SUCCEEDED", "FAILED", "RUNNING"], "FAILED"),
        (["SUCCEEDED", "REUSED"], "SUCCEEDED"),
        (["REUSED", "REUSED"], "REUSED"),
        (["SUCCEEDED", "CANCELLED"], "CANCELLED"),
    ],
)
def test_a_fan_outs_rows_say_one_status_for_their_step(statuses, shown):
    assert step_status(statuses) == shown


# --- Signing in, and others' ids ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/status/workflows/",
        f"/status/workflows/{ZERO}/",
        f"/status/workflows/runs/{ZERO}/",
        f"/status/workflows/runs/{ZERO}/fragment/",
        f"/status/workflows/runs/{ZERO}/events/",
    ],
)
def test_every_workflow_page_sends_a_signed_out_person_to_the_login_page(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


@pytest.mark.parametrize("suffix", ["", "fragment/", "events/"])
def test_another_persons_run_is_not_found(page, make_instance, other_user, suffix):
    theirs = make_run(make_workflow(other_user, [step("a", make_instance(owner=other_user))]))
    assert page.get(f"/status/workflows/runs/{theirs.pk}/{suffix}").status_code == 404


def test_another_persons_workflow_is_not_found_nor_listed_nor_run(page, make_instance, other_user):
    theirs = make_workflow(other_user, [step("a", make_instance(owner=other_user))], name="Their secret flow")
    assert page.get(f"/status/workflows/{theirs.pk}/").status_code == 404
    assert page.post(f"/status/workflows/{theirs.pk}/", {}).status_code == 404
    assert "Their secret flow" not in text(page.get("/status/workflows/"))
    assert not WorkflowRun.objects.exists()


def test_another_persons_run_cannot_be_cancelled_or_retried(page, make_instance, other_user):
    workflow = make_workflow(other_user, [step("a", make_instance(owner=other_user))])
    running, failed = make_run(workflow), make_run(workflow, "FAILED")
    assert page.post(f"/status/workflows/runs/{running.pk}/cancel/").status_code == 404
    assert page.post(f"/status/workflows/runs/{failed.pk}/retry/").status_code == 404
    assert WorkflowRun.objects.get(pk=running.pk).status == "RUNNING"
    assert WorkflowRun.objects.count() == 2


def test_staff_may_look_at_anyones_workflow_and_run_but_not_start_or_retry_one(client, staff, chain):
    run = make_run(chain, "FAILED")
    signed_in(client, staff)
    body = text(client.get(f"/status/workflows/{chain.pk}/"))
    assert "Only the workflow's owner can run it from here." in body and "owned by" in body
    assert client.get(f"/status/workflows/runs/{run.pk}/").status_code == 200
    assert client.post(f"/status/workflows/{chain.pk}/", {"in_month": "2025-01"}).status_code == 403
    assert client.post(f"/status/workflows/runs/{run.pk}/retry/").status_code == 403
    assert WorkflowRun.objects.count() == 1
    listing = text(client.get("/status/workflows/"))
    assert chain.name in listing and chain.owner.get_username() in listing


# --- The list ---------------------------------------------------------------------------------


def test_the_list_shows_your_workflows_with_their_latest_run(page, chain, make_instance, user):
    make_run(chain, "FAILED", created_at=timezone.now() - timedelta(hours=1))
    latest = make_run(chain, "SUCCEEDED")
    quiet = make_workflow(user, [step("only", make_instance(owner=user))], name="Never run")
    body = text(page.get("/status/workflows/"))
    assert f'href="/status/workflows/{chain.pk}/">Monthly report</a>' in body
    assert f'href="/status/workflows/runs/{latest.pk}/"><span class="status status-succeeded">SUCCEEDED' in body
    assert f'href="/status/workflows/{quiet.pk}/">Never run</a>' in body and "never run" in body
    assert 'aria-current="page">Workflows</a>' in body  # in the pages' navigation


def test_the_list_says_how_to_create_a_workflow_when_there_is_none(page):
    assert "POST /api/v1/workflows/" in text(page.get("/status/workflows/"))


# --- A workflow's page --------------------------------------------------------------------------


def test_the_workflow_page_draws_its_steps_as_a_graph_with_each_steps_readiness(page, chain):
    body = text(page.get(f"/status/workflows/{chain.pk}/"))
    drawn = nodes(body)
    assert list(drawn) == ["list", "read", "notes", "summary"]
    assert {n["class"] for n in drawn.values()} == {"ready"}
    assert {n["state"] for n in drawn.values()} == {"✓ ready"}
    assert body.count('class="edge"') == 4
    assert 'data-from="list" data-to="read"' in body and 'data-from="notes" data-to="summary"' in body
    assert "JSON Transform · for each" in body  # the fan-out says so on its node
    assert '<p class="ok-text" data-field="verdict"><strong>Yes</strong>' in body
    assert 'id="step-read"' in body and "after list" in body


def test_a_step_that_is_not_ready_says_why_on_its_node_and_what_to_do(page, make_instance, user):
    sheet = make_instance("test-google-sheet", owner=user, name="Sales plan")  # needs a Google account
    first = make_instance(owner=user, name="first")
    sheet_step = {"id": "sheet", "instance": str(sheet.pk), "inputs": {"file_id": "f"}}
    workflow = make_workflow(user, [step("first", first), sheet_step])
    body = text(page.get(f"/status/workflows/{workflow.pk}/"))
    drawn = nodes(body)
    assert drawn["first"]["class"] == "ready" and drawn["sheet"]["class"] == "not-ready"
    assert drawn["sheet"]["state"] == "✗ not ready"
    assert re.search(r"<strong>Not yet</strong>: Step &#x27;sheet&#x27;: ", body)
    problems = body.split('id="step-sheet"', 1)[1].split("</li>\n    \n", 1)[0]
    assert "Google" in problems and 'class="button"' in problems  # an action item, as a link


def test_the_run_it_form_is_built_from_the_definitions_inputs(chain):
    form = RunItForm(schema=chain.current_version.definition["inputs"])
    fields = {name: type(field).__name__ for name, field in form.fields.items()}
    assert list(fields) == ["in_month", "in_dry_run", "in_format", "in_limit"]  # required first, then by name
    assert fields == {
        "in_month": "CharField",
        "in_dry_run": "BooleanField",
        "in_format": "JSONChoiceField",
        "in_limit": "IntegerField",
    }
    assert form.fields["in_month"].required and not form.fields["in_limit"].required
    assert form.fields["in_limit"].initial == 10
    assert form.fields["in_month"].help_text == "Which month, as 2025-01"
    bound = RunItForm({"in_month": "2025-01", "in_format": '"csv"', "in_limit": ""}, schema=form_schema(chain))
    assert bound.is_valid(), bound.errors
    assert bound.inputs() == {"month": "2025-01", "dry_run": False, "format": "csv"}


def form_schema(workflow: Workflow) -> dict[str, Any]:
    return workflow.current_version.definition["inputs"]


def test_a_workflow_without_inputs_says_so_on_its_form(page, make_instance, user):
    workflow = make_workflow(user, [step("only", make_instance(owner=user))])
    assert "This workflow takes no inputs." in text(page.get(f"/status/workflows/{workflow.pk}/"))


def test_running_it_starts_a_run_and_goes_to_the_runs_page(page, chain):
    response = page.post(f"/status/workflows/{chain.pk}/", {"in_month": "2025-01", "in_limit": "3"})
    run = WorkflowRun.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/status/workflows/runs/{run.pk}/"
    assert run.inputs == {"month": "2025-01", "limit": 3, "dry_run": False}
    assert run.owner == chain.owner and run.version == chain.current_version


def test_running_it_with_inputs_the_schema_refuses_shows_the_error_on_the_field(page, make_instance, user):
    workflow = make_workflow(
        user,
        [step("only", make_instance(owner=user))],
        inputs={"type": "object", "properties": {"limit": {"type": "integer", "minimum": 1}}},
    )
    response = page.post(f"/status/workflows/{workflow.pk}/", {"in_limit": "0"})
    assert response.status_code == 400
    body = text(response)
    field = body.split('for="id_in_limit"', 1)[1].split("</div>", 1)[0]
    assert '<ul class="errorlist" id="id_in_limit_error"><li>Must be at least 1.</li></ul>' in field
    assert not WorkflowRun.objects.exists()
    typed = page.post(f"/status/workflows/{workflow.pk}/", {"in_limit": "many"})
    assert typed.status_code == 400 and "Enter a whole number." in text(typed)


def test_running_a_workflow_that_is_not_ready_says_which_step_and_runs_nothing(page, make_instance, user):
    sheet = make_instance("test-google-sheet", owner=user, name="Sales plan")
    workflow = make_workflow(user, [{"id": "sheet", "instance": str(sheet.pk), "inputs": {"file_id": "f"}}])
    response = page.post(f"/status/workflows/{workflow.pk}/", {})
    assert response.status_code == 409
    refusal = text(response).split('id="run-refusal"', 1)[1].split("</section>", 1)[0]
    assert "It did not start" in refusal and "Step &#x27;sheet&#x27;" in refusal
    assert 'class="button"' in refusal
    assert not WorkflowRun.objects.exists() and not Execution.objects.exists()


# --- A run's page -------------------------------------------------------------------------------


@pytest.fixture
def midway(chain, user) -> WorkflowRun:
    """list done; 3 items of read: one done, one running at 50 %, one waiting; notes running
    at 40 % ("Reading rows"); summary not started."""
    run = make_run(chain, inputs={"month": "2025-01"})
    instances = {i.name: i for i in ToolInstance.objects.filter(owner=user)}
    step_row(run, "list", "SUCCEEDED", attempt=1, output={"result": [1, 2, 3]})
    step_row(run, "read", "SUCCEEDED", iteration=0, items_total=3, item={"id": "a"}, attempt=1)
    job = {"status": "RUNNING", "progress": 50}
    item = record(instances["read instance"], mode=Mode.ASYNC, status="RUNNING", job=job)
    step_row(run, "read", "RUNNING", iteration=1, items_total=3, item={"id": "b"}, attempt=1, execution=item)
    step_row(run, "read", "PENDING", iteration=2, items_total=3, item={"id": "c"})
    running_step(run, "notes", instances["notes instance"])
    return run


def test_the_run_page_shows_each_steps_state_and_progress_on_the_graph(page, midway):
    body = text(page.get(f"/status/workflows/runs/{midway.pk}/"))
    drawn = nodes(body)
    bar = graph.NODE_WIDTH - 20
    assert drawn["list"] == {"class": "s-succeeded", "state": "succeeded", "bar": str(bar)}
    # The fan-out: one done (100), one at 50, one waiting (0): half way.
    assert drawn["read"] == {"class": "s-running", "state": "running · 50 %", "bar": str(round(bar * 0.5))}
    assert drawn["notes"] == {"class": "s-running", "state": "running · 40 %", "bar": str(round(bar * 0.4))}
    assert drawn["summary"] == {"class": "s-none", "state": "not started", "bar": "0"}
    read = step_body(body, "read")
    assert "1 of 3 items done" in read and "3 items" in read
    assert read.count("<li data-iteration=") == 3 and "waiting its turn" in read
    notes = step_body(body, "notes")
    assert '<td data-label="Now"><span data-field="detail">Reading rows</span></td>' in notes
    job = Job.objects.get(execution__workflow_steps__step_id="notes")
    assert f'href="/status/jobs/{job.pk}/" data-field="link">its job</a>' in notes
    assert '<span class="muted" data-field="steps-done">1 of 4 steps ended</span>' in body
    assert f'action="/status/workflows/runs/{midway.pk}/cancel/"' in body


def test_the_run_page_works_without_javascript_and_hands_its_script_the_state(page, midway):
    body = text(page.get(f"/status/workflows/runs/{midway.pk}/"))
    assert f'<a href="/status/workflows/runs/{midway.pk}/">Refresh</a>' in body
    assert '<section id="run-live" class="live" data-live="static">' in body
    assert 'src="/static/status/workflow_run.js"' in body and 'href="/static/status/workflow.css"' in body
    config = json.loads(re.search(r'<script id="run-config" type="application/json">(.*?)</script>', body).group(1))
    assert config["events_url"] == f"/status/workflows/runs/{midway.pk}/events/"
    assert config["fragment_url"] == f"/status/workflows/runs/{midway.pk}/fragment/"
    assert config["status"] == "RUNNING" and "SUCCEEDED" in config["terminal"]
    state = json.loads(re.search(r'<script id="run-state-data" type="application/json">(.*?)</script>', body).group(1))
    assert state["read"] == {
        "fan_out": True,
        "total": 3,
        "rows": {"0": ["SUCCEEDED", 100, ""], "1": ["RUNNING", 50, ""], "2": ["PENDING", 0, ""]},
    }
    assert state["summary"] == {"fan_out": False, "total": None, "rows": {}}


def test_the_fragment_is_the_live_part_alone(page, midway):
    response = page.get(f"/status/workflows/runs/{midway.pk}/fragment/")
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    body = text(response)
    assert body.lstrip().startswith('<div class="run-state" data-status="RUNNING">')
    assert "<html" not in body and 'class="workflow-graph"' in body


def test_a_succeeded_run_shows_its_output_and_offers_a_retry_from_a_step(page, chain):
    run = make_run(chain, "SUCCEEDED", output={"count": 3, "title": "Report"}, credits_consumed=Decimal("0.4"))
    body = text(page.get(f"/status/workflows/runs/{run.pk}/"))
    outcome = body.split('id="run-outcome"', 1)[1]
    assert "Output" in outcome and "&quot;count&quot;: 3" in outcome and "0.4 credits" in outcome
    assert "/cancel/" not in body
    options = re.findall(r'<option value="([^"]*)">', outcome)
    assert options == ["list", "read", "notes", "summary"]  # a run that succeeded retries from a step


def test_a_failed_run_shows_its_error_with_action_items_and_the_failed_step(page, chain):
    error = failure("Step 'read' (item 2) failed: the upstream answered 502")
    run = make_run(chain, "FAILED", error=error)
    step_row(run, "list", "SUCCEEDED")
    step_row(run, "read", "FAILED", iteration=0, items_total=1, error=failure("the upstream answered 502"))
    step_row(run, "notes", "SUCCEEDED")
    step_row(run, "summary", "UPSTREAM_FAILED")
    body = text(page.get(f"/status/workflows/runs/{run.pk}/"))
    drawn = nodes(body)
    assert drawn["read"]["class"] == "s-failed" and drawn["summary"]["class"] == "s-upstream_failed"
    outcome = body.split('id="run-outcome"', 1)[1].split("<h2>Steps</h2>", 1)[0]
    assert "What happened" in outcome and "failed: the upstream answered 502" in outcome
    assert '<a class="button" href="https://toolexec.test/fix">Fix the thing</a>' in outcome
    assert '<option value="">the steps that did not succeed</option>' in outcome
    read = step_body(body, "read")
    assert "the upstream answered 502" in read


def test_the_events_stream_of_an_ended_run_sends_its_state_and_ends(page, chain):
    run = make_run(chain, "SUCCEEDED")
    step_row(run, "list", "SUCCEEDED")
    response = page.get(f"/status/workflows/runs/{run.pk}/events/")
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    stream = b"".join(response.streaming_content).decode()
    assert stream.startswith("event: state\ndata: ")
    state = json.loads(stream.split("data: ", 1)[1])
    assert state["status"] == "SUCCEEDED" and state["steps"][0]["step_id"] == "list"


def test_cancel_needs_a_post(page, chain):
    run = make_run(chain)
    assert page.get(f"/status/workflows/runs/{run.pk}/cancel/").status_code == 405
    assert page.get(f"/status/workflows/runs/{run.pk}/retry/").status_code == 405


def test_cancelling_a_run_whose_steps_wait_ends_it_at_once(page, chain):
    run = make_run(chain)
    step_row(run, "list", "PENDING")
    response = page.post(f"/status/workflows/runs/{run.pk}/cancel/", follow=True)
    assert response.redirect_chain == [(f"/status/workflows/runs/{run.pk}/", 302)]
    assert WorkflowRun.objects.get(pk=run.pk).status == "CANCELLED"
    assert "The run was cancelled." in text(response)
    again = page.post(f"/status/workflows/runs/{run.pk}/cancel/", follow=True)
    assert "already ended (CANCELLED)" in text(again)


def test_staff_may_cancel_anyones_run(client, staff, chain):
    run = make_run(chain)
    step_row(run, "list", "PENDING")
    signed_in(client, staff).post(f"/status/workflows/runs/{run.pk}/cancel/")
    assert WorkflowRun.objects.get(pk=run.pk).status == "CANCELLED"


def test_retrying_a_failed_run_reuses_what_succeeded_and_goes_to_the_new_runs_page(page, chain):
    run = make_run(chain, "FAILED", error=failure(), inputs={"month": "2025-01"})
    step_row(run, "list", "SUCCEEDED", output={"result": [{"id": "a"}]})
    step_row(run, "read", "FAILED", iteration=0, items_total=1, item={"id": "a"}, error=failure())
    step_row(run, "notes", "SUCCEEDED", output={"result": 1})
    step_row(run, "summary", "UPSTREAM_FAILED")
    response = page.post(f"/status/workflows/runs/{run.pk}/retry/", {"from_step": ""})
    retry = WorkflowRun.objects.get(retry_of=run)
    assert response.status_code == 302 and response["Location"] == f"/status/workflows/runs/{retry.pk}/"
    reused = set(StepRun.objects.filter(run=retry, status="REUSED").values_list("step_id", flat=True))
    assert reused == {"list", "notes"}
    body = text(page.get(response["Location"]))
    assert f'retries <a href="/status/workflows/runs/{run.pk}/">an earlier run</a>' in body
    assert nodes(body)["list"]["class"] == "s-reused"


def test_a_retry_the_service_refuses_is_said_in_words(page, chain):
    run = make_run(chain, "SUCCEEDED")
    response = page.post(f"/status/workflows/runs/{run.pk}/retry/", {"from_step": "nowhere"}, follow=True)
    assert "Not retried: This workflow&#x27;s version has no step &#x27;nowhere&#x27;." in text(response)
    assert WorkflowRun.objects.count() == 1


def test_names_errors_and_outputs_from_people_and_tools_are_escaped(page, make_instance, user):
    attack = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    workflow = make_workflow(user, [step("only", make_instance(owner=user))], name=attack)
    run = make_run(workflow, "FAILED", error=failure(attack), output=None)
    step_row(run, "only", "FAILED", error=failure(attack), output={"x": attack})
    for path in (f"/status/workflows/{workflow.pk}/", f"/status/workflows/runs/{run.pk}/", "/status/workflows/"):
        body = text(page.get(path))
        assert "<script>alert" not in body and "<img src=x" not in body, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body, path


# --- Query budgets ---------------------------------------------------------------------------

# Session and user (2), then: the run with its workflow, version and owner; its step rows with
# their executions' jobs; the steps' instances. The workflow page: the workflow with its version
# and owner; the steps' instances with their tools and the credit account (readiness: one more
# for credentials when a step's tool needs some; these need none); its recent runs. The list:
# the workflows with their latest runs.
RUN_PAGE_BUDGET = 5
WORKFLOW_PAGE_BUDGET = 5
LIST_BUDGET = 3


def fan_out_run(owner: Any, make_instance: Any, items: int) -> WorkflowRun:
    """A run of list → each (a fan-out over ``items``), midway: a tenth of the items done, ten
    running on jobs, the rest waiting."""
    lister, each = make_instance(owner=owner, name="list"), make_instance(owner=owner, name="each")
    workflow = make_workflow(
        owner,
        [
            step("list", lister),
            step("each", each, for_each={"$expr": "steps.list.output.result"}, concurrency=10),
            step("after", lister, inputs=transform("length(@)", {"$expr": "steps.each.output"})),
        ],
    )
    run = make_run(workflow)
    step_row(run, "list", "SUCCEEDED")
    now = timezone.now()
    rows = []
    for i in range(items):
        status = "SUCCEEDED" if i < items // 10 else "RUNNING" if i < items // 10 + 10 else "PENDING"
        execution = None
        if status == "RUNNING":
            job = {"status": "RUNNING", "progress": i % 100}
            execution = record(each, mode=Mode.ASYNC, status="RUNNING", job=job)
        rows.append(
            StepRun(
                run=run, step_id="each", iteration=i, items_total=items, item=i, status=status, created_at=now,
                execution=execution, output={"result": i} if status == "SUCCEEDED" else None,
            )
        )  # fmt: skip
    StepRun.objects.bulk_create(rows)
    return run


@pytest.mark.parametrize("suffix", ["", "fragment/"])
def test_a_run_page_costs_the_same_queries_for_a_10_or_a_1000_item_fan_out(
    client, make_instance, suffix, django_assert_max_num_queries
):
    counts = []
    for items in (10, 1000):
        owner = UserFactory()
        run = fan_out_run(owner, make_instance, items)
        client.force_login(owner)
        with django_assert_max_num_queries(RUN_PAGE_BUDGET):
            with CaptureQueriesContext(connection) as captured:
                response = client.get(f"/status/workflows/runs/{run.pk}/{suffix}")
        assert response.status_code == 200
        assert f"{items // 10} of {items} items done" in text(response)
        counts.append(len(captured))
    print(f"run page{' fragment' if suffix else ''}: {counts[0]} queries for 10 items, {counts[1]} for 1,000")
    assert counts[0] == counts[1], f"{counts[0]} queries for 10 items, {counts[1]} for 1,000"


def test_a_long_fan_out_lists_its_first_items_in_flight_first_and_says_how_many_more(page, make_instance, user):
    run = fan_out_run(user, make_instance, 1000)
    body = text(page.get(f"/status/workflows/runs/{run.pk}/"))
    each = step_body(body, "each")
    listed = [int(n) for n in re.findall(r'<li data-iteration="(\d+)">', each)]
    assert len(listed) == 100 and listed == sorted(listed)
    assert set(range(100, 110)) <= set(listed)  # the ten running are listed, though not among the first
    assert "900 more items not listed" in each


def test_a_workflow_page_costs_the_same_queries_for_2_or_12_steps(client, make_instance, django_assert_max_num_queries):
    counts = []
    for size in (2, 12):
        owner = UserFactory()
        instances = [make_instance(owner=owner, name=f"step {i}") for i in range(size)]
        steps = [step(f"s{i}", instance, depends_on=[f"s{i - 1}"] if i else []) for i, instance in enumerate(instances)]
        workflow = make_workflow(owner, steps)
        for _ in range(size):
            make_run(workflow, "SUCCEEDED")
        client.force_login(owner)
        with django_assert_max_num_queries(WORKFLOW_PAGE_BUDGET):
            with CaptureQueriesContext(connection) as captured:
                response = client.get(f"/status/workflows/{workflow.pk}/")
        assert response.status_code == 200 and len(nodes(text(response))) == size
        counts.append(len(captured))
    print(f"workflow page: {counts[0]} queries for 2 steps, {counts[1]} for 12")
    assert counts[0] == counts[1], f"{counts[0]} queries for 2 steps, {counts[1]} for 12"


def test_the_list_costs_the_same_queries_for_2_or_20_workflows(client, make_instance, django_assert_max_num_queries):
    counts = []
    for size in (2, 20):
        owner = UserFactory()
        instance = make_instance(owner=owner)
        for _ in range(size):
            make_run(make_workflow(owner, [step("only", instance)]), "SUCCEEDED")
        client.force_login(owner)
        with django_assert_max_num_queries(LIST_BUDGET):
            with CaptureQueriesContext(connection) as captured:
                assert client.get("/status/workflows/").status_code == 200
        counts.append(len(captured))
    print(f"workflow list: {counts[0]} queries for 2 workflows, {counts[1]} for 20")
    assert counts[0] == counts[1]
