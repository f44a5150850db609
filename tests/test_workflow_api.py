"""The workflows API (DESIGN.md §10, issue 22): workflows and their versions, readiness,
starting a run (with an Idempotency-Key), a run's detail, cancel, retry and events, tenant
isolation and query budgets.

Real PostgreSQL and Redis; a real worker process where a run must actually progress. Tests
whose runs must reach the worker commit their data (``django_db(transaction=True)``); in the
others a run is started but its steps are never handed over (nothing commits).
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from executions.models import Execution, Job, Mode
from instances.models import ToolInstance
from tests.conftest import wait_for
from tests.factories import UserFactory
from tests.test_async_api import assert_envelope, client_for
from tests.test_query_budget import _assert_same_count, _queries_of
from tests.test_tenant_isolation import ABSENT_ID, assert_not_found
from workflows.models import StepRun, Workflow, WorkflowRun, WorkflowVersion
from workflows.services.workflows import workflow_create

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db]

WORKFLOWS = "/api/v1/workflows/"
RUNS = "/api/v1/workflow-runs/"

WORKFLOW_KEYS = {
    "id",
    "key",
    "name",
    "description",
    "version",
    "definition",
    "created_at",
    "updated_at",
    "validate_url",
    "runs_url",
}
RUN_KEYS = {
    "run_id",
    "workflow_id",
    "version",
    "status",
    "inputs",
    "output",
    "error",
    "credits_consumed",
    "retry_of",
    "created_at",
    "started_at",
    "finished_at",
}
STEP_KEYS = {
    "step_id",
    "iteration",
    "items_total",
    "status",
    "attempt",
    "execution_id",
    "job_id",
    "progress",
    "current_step",
    "run_after",
    "started_at",
    "finished_at",
    "output",
    "error",
}


# --- helpers ----------------------------------------------------------------------------


def transform(expression: str, data: Any) -> dict[str, Any]:
    return {"expression": expression, "data": data}


def chain(a: ToolInstance, b: ToolInstance) -> dict[str, Any]:
    """A → B: A picks the numbers from the run's inputs, B (reading A's output) sums them."""
    return {
        "inputs": {"type": "object", "properties": {"numbers": {"type": "array"}}, "required": ["numbers"]},
        "steps": [
            {"id": "a", "instance": str(a.pk), "inputs": transform("numbers", {"$expr": "input"})},
            {"id": "b", "instance": str(b.pk), "inputs": transform("sum(@)", {"$expr": "steps.a.output.result"})},
        ],
        "output": {"$expr": "steps.b.output"},
    }


def single(instance: ToolInstance, value: Any = 1) -> dict[str, Any]:
    return {"steps": [{"id": "only", "instance": str(instance.pk), "inputs": transform("@", value)}]}


def created(response: Any) -> dict[str, Any]:
    assert response.status_code == 201, response.content
    return response.json()


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.content
    return response.json()


def accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.content
    return response.json()


def create_workflow(client: APIClient, definition: dict[str, Any], *, key: str = "monthly-report") -> dict[str, Any]:
    body = {"key": key, "name": "Monthly report", "description": "Sums the month.", "definition": definition}
    return created(client.post(WORKFLOWS, body, format="json"))


def start(client: APIClient, workflow_id: str, inputs: Any, *, key: str | None = None) -> Any:
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post(f"{WORKFLOWS}{workflow_id}/runs", inputs, format="json", **headers)


def field_errors(response: Any) -> dict[str, list[str]]:
    return assert_envelope(response, 400, "INPUT_INVALID")["metadata"]["field_errors"]


def wait_run(client: APIClient, run_id: str, timeout: float = 30) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        detail = ok(client.get(f"{RUNS}{run_id}"))
        return detail if detail["status"] in {"SUCCEEDED", "FAILED", "CANCELLED"} else None

    return wait_for(ended, timeout=timeout, message=f"run {run_id} to end")


def run_row(workflow: Workflow, status: str = "SUCCEEDED", **fields: Any) -> WorkflowRun:
    """A run recorded directly (its steps, if any, added by the caller)."""
    return WorkflowRun.objects.create(
        workflow=workflow, version=workflow.current_version, owner=workflow.owner, status=status, **fields
    )


@pytest.fixture
def pair(user, make_instance) -> tuple[ToolInstance, ToolInstance]:
    return make_instance(owner=user, name="a"), make_instance(owner=user, name="b")


# --- Workflows: create, read, update, delete ---------------------------------------------


def test_creating_a_workflow_answers_201_with_its_first_version(api, pair):
    definition = chain(*pair)

    body = create_workflow(api, definition)

    assert set(body) == WORKFLOW_KEYS
    assert body["key"] == "monthly-report"
    assert body["name"] == "Monthly report"
    assert body["description"] == "Sums the month."
    assert body["version"] == 1
    assert body["definition"] == definition
    assert body["validate_url"] == f"/api/v1/workflows/{body['id']}/validate"
    assert body["runs_url"] == f"/api/v1/workflows/{body['id']}/runs"
    workflow = Workflow.objects.get(pk=body["id"])
    assert workflow.current_version.number == 1
    assert workflow.current_version.created_by == workflow.owner


def test_a_workflow_is_listed_read_renamed_and_deleted(api, pair):
    workflow = create_workflow(api, chain(*pair))
    url = f"{WORKFLOWS}{workflow['id']}/"

    assert [row["id"] for row in ok(api.get(WORKFLOWS))["results"]] == [workflow["id"]]
    assert ok(api.get(url)) == ok(api.get(WORKFLOWS))["results"][0]

    renamed = ok(api.patch(url, {"name": "Renamed", "key": "renamed", "description": ""}, format="json"))
    assert (renamed["name"], renamed["key"], renamed["description"]) == ("Renamed", "renamed", "")
    assert renamed["version"] == 1 and renamed["definition"] == workflow["definition"]

    assert api.delete(url).status_code == 204
    assert_not_found(api.get(url))
    assert not Workflow.objects.exists() and not WorkflowVersion.objects.exists()


def test_patching_a_definition_is_refused_pointing_to_a_new_version(api, pair):
    workflow = create_workflow(api, chain(*pair))

    response = api.patch(f"{WORKFLOWS}{workflow['id']}/", {"definition": single(pair[0])}, format="json")

    errors = field_errors(response)
    assert list(errors) == ["definition"]
    assert "new version" in errors["definition"][0] and "POST" in errors["definition"][0]
    assert Workflow.objects.get(pk=workflow["id"]).current_version.number == 1


def test_put_is_not_offered(api, pair):
    workflow = create_workflow(api, chain(*pair))

    response = api.put(f"{WORKFLOWS}{workflow['id']}/", {"name": "x", "key": "x"}, format="json")

    assert_envelope(response, 405, "METHOD_NOT_ALLOWED")


def test_a_key_already_in_use_is_refused_naming_key(api, pair):
    create_workflow(api, chain(*pair), key="taken")
    other = create_workflow(api, single(pair[0]), key="free")

    assert "key" in field_errors(
        api.post(WORKFLOWS, {"key": "taken", "name": "x", "definition": single(pair[0])}, format="json")
    )
    assert "key" in field_errors(api.patch(f"{WORKFLOWS}{other['id']}/", {"key": "taken"}, format="json"))
    assert Workflow.objects.count() == 2


def test_deleting_a_workflow_with_a_run_in_flight_answers_409(api, pair):
    workflow = create_workflow(api, chain(*pair))
    accepted(start(api, workflow["id"], {"numbers": [1]}))

    response = api.delete(f"{WORKFLOWS}{workflow['id']}/")

    assert_envelope(response, 409, "INVALID_TRANSITION")
    assert Workflow.objects.filter(pk=workflow["id"]).exists()


# --- Definitions that fail validation -----------------------------------------------------


def test_a_cycle_is_refused_naming_the_step_where_it_starts(api, pair):
    a, b = pair
    definition = {
        "steps": [
            {"id": "a", "instance": str(a.pk), "depends_on": ["b"], "inputs": transform("@", 1)},
            {"id": "b", "instance": str(b.pk), "depends_on": ["a"], "inputs": transform("@", 2)},
        ]
    }

    response = api.post(WORKFLOWS, {"key": "loop", "name": "Loop", "definition": definition}, format="json")

    errors = field_errors(response)
    assert "definition.steps[0].depends_on" in errors, errors
    assert "cycle" in errors["definition.steps[0].depends_on"][0]
    assert not Workflow.objects.exists()


def test_an_instance_that_is_not_yours_is_refused_naming_the_field(api, pair, other_user, make_instance):
    theirs = make_instance(owner=other_user, name="theirs")
    definition = chain(pair[0], theirs)

    errors = field_errors(api.post(WORKFLOWS, {"key": "k", "name": "n", "definition": definition}, format="json"))

    assert errors == {"definition.steps[1].instance": ["No instance of yours has this id."]}
    assert not Workflow.objects.exists()


def test_a_literal_input_the_tool_refuses_is_named_by_its_path(api, pair):
    definition = {"steps": [{"id": "a", "instance": str(pair[0].pk), "inputs": transform(5, 1)}]}

    errors = field_errors(api.post(WORKFLOWS, {"key": "k", "name": "n", "definition": definition}, format="json"))

    assert list(errors) == ["definition.steps[0].inputs.expression"]


def test_a_new_version_is_validated_too_and_nothing_is_saved(api, pair):
    workflow = create_workflow(api, chain(*pair))
    bad = {"steps": [{"id": "a", "instance": str(pair[0].pk), "inputs": transform("@", {"$expr": "input.("})}]}

    errors = field_errors(api.post(f"{WORKFLOWS}{workflow['id']}/versions", {"definition": bad}, format="json"))

    assert any(path.startswith("definition.steps[0].inputs.data") for path in errors), errors
    assert WorkflowVersion.objects.filter(workflow_id=workflow["id"]).count() == 1


def test_a_request_missing_its_fields_names_them(api):
    errors = field_errors(api.post(WORKFLOWS, {"key": "not a slug!"}, format="json"))

    assert set(errors) == {"key", "name", "definition"}


# --- Versions -------------------------------------------------------------------------------


def test_versions_increment_newest_first_and_a_run_pins_its_version(api, user, pair):
    a, b = pair
    workflow = create_workflow(api, chain(a, b))
    first_run = accepted(start(api, workflow["id"], {"numbers": [1, 2]}))
    versions_url = f"{WORKFLOWS}{workflow['id']}/versions"

    second = created(api.post(versions_url, {"definition": chain(b, a)}, format="json"))
    third = created(api.post(versions_url, {"definition": single(a)}, format="json"))

    assert set(second) == {"id", "number", "definition", "created_at", "created_by"}
    assert (second["number"], third["number"]) == (2, 3)
    assert third["definition"] == single(a) and third["created_by"] == user.pk
    listed = ok(api.get(f"{versions_url}/"))["results"]
    assert [version["number"] for version in listed] == [3, 2, 1]
    assert listed[0] == third
    current = ok(api.get(f"{WORKFLOWS}{workflow['id']}/"))
    assert current["version"] == 3 and current["definition"] == single(a)
    assert ok(api.get(f"{RUNS}{first_run['run_id']}"))["version"] == 1, "a run keeps the version it started on"
    later = accepted(start(api, workflow["id"], {}))
    assert ok(api.get(f"{RUNS}{later['run_id']}"))["version"] == 3


# --- Readiness ------------------------------------------------------------------------------


def test_validate_answers_like_validate_execution_for_every_step(api, pair):
    workflow = create_workflow(api, chain(*pair))

    body = ok(api.get(f"{WORKFLOWS}{workflow['id']}/validate"))

    assert body["is_ready"] is True
    assert body["error_code"] is None and body["error_message"] is None and body["action_items"] == []
    assert body["credits"] == {"estimate": 0.02, "balance": 100.0, "covered": True}  # json-transform: 0.01 a run
    assert [step["step_id"] for step in body["checks"]] == ["a", "b"]
    assert [step["instance_id"] for step in body["checks"]] == [str(instance.pk) for instance in pair]
    for step in body["checks"]:
        assert step["is_ready"] is True
        assert step["checks"] and all(check["passed"] for check in step["checks"])
        assert set(step["checks"][0]) == {"name", "passed", "message", "error_code", "action_items"}


def test_a_step_not_ready_is_named_and_starting_answers_409_running_nothing(api, pair):
    workflow = create_workflow(api, chain(*pair))
    ToolInstance.objects.filter(pk=pair[1].pk).update(status=ToolInstance.Status.DISABLED)

    body = ok(api.get(f"{WORKFLOWS}{workflow['id']}/validate"))
    refused = start(api, workflow["id"], {"numbers": [1]})

    assert body["is_ready"] is False
    assert body["error_code"] == "INSTANCE_DISABLED"
    assert "'b'" in body["error_message"]
    assert [step["is_ready"] for step in body["checks"]] == [True, False]
    envelope = assert_envelope(refused, 409, "INSTANCE_DISABLED")
    assert envelope["metadata"]["step_id"] == "b"
    assert [step["step_id"] for step in envelope["metadata"]["checks"]] == ["b"]
    assert not WorkflowRun.objects.exists()


# --- Starting a run -------------------------------------------------------------------------


def test_starting_answers_202_with_where_to_follow_the_run(api, pair):
    workflow = create_workflow(api, chain(*pair))

    body = accepted(start(api, workflow["id"], {"numbers": [1, 2]}))

    run = WorkflowRun.objects.get()
    assert body == {
        "run_id": str(run.pk),
        "status": run.status,
        "run_url": f"/api/v1/workflow-runs/{run.pk}",
        "events_url": f"/api/v1/workflow-runs/{run.pk}/events",
    }
    assert run.inputs == {"numbers": [1, 2]} and run.version.number == 1


def test_inputs_that_fail_the_definitions_schema_are_named(api, pair):
    workflow = create_workflow(api, chain(*pair))

    assert "numbers" in field_errors(start(api, workflow["id"], {"numbers": "not a list"}))
    assert "numbers" in field_errors(start(api, workflow["id"], {}))
    assert "(root)" in field_errors(start(api, workflow["id"], [1, 2]))
    assert not WorkflowRun.objects.exists()


def test_the_same_idempotency_key_twice_makes_one_run(api, pair):
    workflow = create_workflow(api, chain(*pair))

    first = start(api, workflow["id"], {"numbers": [1]}, key="month-2025-01")
    again = start(api, workflow["id"], {"numbers": [1]}, key="month-2025-01")

    assert accepted(again) == accepted(first)
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert WorkflowRun.objects.count() == 1


def test_the_same_key_with_another_body_answers_409_idempotency_conflict(api, pair):
    workflow = create_workflow(api, chain(*pair))
    accepted(start(api, workflow["id"], {"numbers": [1]}, key="month-2025-01"))

    response = start(api, workflow["id"], {"numbers": [2]}, key="month-2025-01")

    assert_envelope(response, 409, "IDEMPOTENCY_CONFLICT")
    assert WorkflowRun.objects.count() == 1


def test_an_overlong_idempotency_key_is_refused_naming_the_header(api, pair):
    workflow = create_workflow(api, chain(*pair))

    errors = field_errors(start(api, workflow["id"], {"numbers": [1]}, key="k" * 256))

    assert list(errors) == ["Idempotency-Key"]
    assert not WorkflowRun.objects.exists()


# --- A run end to end, with a worker ----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_a_to_b_chain_succeeds_end_to_end_and_retries_from_a_step(api, pair, rq_worker):
    rq_worker()
    workflow = create_workflow(api, chain(*pair))

    started = accepted(start(api, workflow["id"], {"numbers": [1, 2, 3, 4]}))
    detail = wait_run(api, started["run_id"])

    assert detail["status"] == "SUCCEEDED", detail["error"]
    assert detail["output"] == {"result": 10}
    assert detail["credits_consumed"] == pytest.approx(0.02)
    assert set(detail) == RUN_KEYS | {"steps"}
    a, b = detail["steps"]
    assert all(set(step) == STEP_KEYS for step in detail["steps"])
    assert (a["step_id"], a["status"], a["output"]) == ("a", "SUCCEEDED", {"result": [1, 2, 3, 4]})
    assert (b["step_id"], b["status"], b["output"]) == ("b", "SUCCEEDED", {"result": 10})
    assert b["attempt"] == 1 and b["progress"] == 100 and b["error"] is None
    assert Job.objects.get(pk=b["job_id"]).execution_id == uuid.UUID(b["execution_id"])
    assert StepRun.objects.get(run_id=started["run_id"], step_id="b").inputs["data"] == [1, 2, 3, 4]

    events = b"".join(api.get(f"{RUNS}{started['run_id']}/events").streaming_content).decode()
    last = json.loads(events.strip().split("\n\n")[-1].split("data: ", 1)[1])
    assert last["status"] == "SUCCEEDED" and last["output"] == {"result": 10}

    retried = accepted(api.post(f"{RUNS}{started['run_id']}/retry", {"from_step": "b"}, format="json"))
    again = wait_run(api, retried["run_id"])

    assert again["status"] == "SUCCEEDED" and again["retry_of"] == started["run_id"]
    assert [step["status"] for step in again["steps"]] == ["REUSED", "SUCCEEDED"]
    assert again["output"] == {"result": 10}


def test_the_event_stream_answers_text_event_stream_with_the_runs_state(api, pair):
    workflow = create_workflow(api, chain(*pair))
    run = run_row(Workflow.objects.get(pk=workflow["id"]), output={"result": 3})

    response = api.get(f"{RUNS}{run.pk}/events")

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache" and response["X-Accel-Buffering"] == "no"
    event = b"".join(response.streaming_content).decode()
    assert event.startswith("event: state\n")
    assert json.loads(event.split("data: ", 1)[1])["output"] == {"result": 3}


# --- Cancel and retry ---------------------------------------------------------------------


def test_cancelling_a_run_answers_202_with_its_detail(api, pair):
    workflow = create_workflow(api, chain(*pair))
    run_id = accepted(start(api, workflow["id"], {"numbers": [1]}))["run_id"]

    body = accepted(api.post(f"{RUNS}{run_id}/cancel"))

    assert body["run_id"] == run_id
    assert body["status"] in {"CANCELLING", "CANCELLED"}
    assert set(body) == RUN_KEYS | {"steps"}
    assert WorkflowRun.objects.get(pk=run_id).status == body["status"]


@pytest.mark.parametrize("status", ["SUCCEEDED", "FAILED", "CANCELLED"])
def test_cancelling_a_run_that_ended_answers_409(api, pair, status):
    workflow = create_workflow(api, chain(*pair))
    run = run_row(Workflow.objects.get(pk=workflow["id"]), status=status)

    response = api.post(f"{RUNS}{run.pk}/cancel")

    body = assert_envelope(response, 409, "INVALID_TRANSITION")
    assert status in body["error_message"]
    assert WorkflowRun.objects.get(pk=run.pk).status == status


def test_retrying_a_run_in_flight_answers_409(api, pair):
    workflow = create_workflow(api, chain(*pair))
    run_id = accepted(start(api, workflow["id"], {"numbers": [1]}))["run_id"]

    response = api.post(f"{RUNS}{run_id}/retry", {}, format="json")

    assert_envelope(response, 409, "INVALID_TRANSITION")
    assert WorkflowRun.objects.count() == 1


def test_retrying_from_a_step_the_version_lacks_is_a_400_naming_from_step(api, pair):
    workflow = create_workflow(api, chain(*pair))
    run = run_row(Workflow.objects.get(pk=workflow["id"]), status="FAILED")

    response = api.post(f"{RUNS}{run.pk}/retry", {"from_step": "nope"}, format="json")

    errors = field_errors(response)
    assert list(errors) == ["from_step"]
    assert "a" in errors["from_step"][0] and "b" in errors["from_step"][0]
    assert WorkflowRun.objects.count() == 1


def test_retrying_a_failed_run_answers_202_with_the_new_run(api, pair):
    workflow = create_workflow(api, chain(*pair))
    failed = run_row(Workflow.objects.get(pk=workflow["id"]), status="FAILED", inputs={"numbers": [5]})

    body = accepted(api.post(f"{RUNS}{failed.pk}/retry", {}, format="json"))

    retry = WorkflowRun.objects.get(pk=body["run_id"])
    assert retry.retry_of_id == failed.pk and retry.inputs == {"numbers": [5]}
    assert body == {
        "run_id": str(retry.pk),
        "status": retry.status,
        "run_url": f"/api/v1/workflow-runs/{retry.pk}",
        "events_url": f"/api/v1/workflow-runs/{retry.pk}/events",
    }


# --- The runs list --------------------------------------------------------------------------


@pytest.fixture
def two_workflows(user, make_instance) -> tuple[Workflow, Workflow]:
    a, b = make_instance(owner=user, name="a"), make_instance(owner=user, name="b")
    return (
        workflow_create(owner=user, key="first", name="First", definition=single(a)),
        workflow_create(owner=user, key="second", name="Second", definition=single(b)),
    )


def test_the_runs_list_filters_by_workflow_status_and_time(api, two_workflows):
    first, second = two_workflows
    now = timezone.now()
    old = run_row(first, "SUCCEEDED", created_at=now - timedelta(days=3))
    failed = run_row(first, "FAILED", created_at=now - timedelta(hours=1))
    theirs = run_row(second, "SUCCEEDED", created_at=now - timedelta(minutes=1))

    def listed(**params: Any) -> list[str]:
        return [row["run_id"] for row in ok(api.get(RUNS, params))["results"]]

    assert listed() == [str(theirs.pk), str(failed.pk), str(old.pk)]
    assert listed(workflow=str(first.pk)) == [str(failed.pk), str(old.pk)]
    assert listed(status="succeeded") == [str(theirs.pk), str(old.pk)]
    assert listed(workflow=str(first.pk), status="FAILED") == [str(failed.pk)]
    assert listed(created_after=(now - timedelta(days=1)).isoformat()) == [str(theirs.pk), str(failed.pk)]
    assert listed(created_before=(now - timedelta(days=1)).isoformat()) == [str(old.pk)]
    assert listed(status="") == listed()


@pytest.mark.parametrize(
    ("param", "value"),
    [("workflow", "not-a-uuid"), ("status", "DONE"), ("created_after", "yesterday"), ("created_before", "x\x00")],
)
def test_a_bad_filter_answers_400_naming_it(api, param, value):
    errors = field_errors(api.get(RUNS, {param: value}))

    assert list(errors) == [param]


def test_the_list_renders_each_run_as_its_detail_does_without_steps(api, two_workflows):
    first, second = two_workflows
    run_row(first, "SUCCEEDED", output={"result": 1}, credits_consumed=Decimal("0.0200"))
    failed = run_row(second, "FAILED", error={"error_code": "UPSTREAM_ERROR"})
    run_row(second, "RUNNING", retry_of=failed, inputs={"n": 1})

    listed = ok(api.get(RUNS))["results"]

    assert len(listed) == 3
    for row in listed:
        detail = ok(api.get(f"{RUNS}{row['run_id']}"))
        assert row == {key: value for key, value in detail.items() if key != "steps"}


# --- Another owner ----------------------------------------------------------------------------


@pytest.fixture
def theirs(other_api, other_user, make_instance) -> dict[str, str]:
    """Another user's workflow and a run of it."""
    a, b = make_instance(owner=other_user, name="their a"), make_instance(owner=other_user, name="their b")
    workflow = create_workflow(other_api, chain(a, b), key="their-workflow")
    run = accepted(start(other_api, workflow["id"], {"numbers": [42]}))
    return {"workflow": workflow["id"], "run": run["run_id"]}


ID_ENDPOINTS = [
    ("get", "/api/v1/workflows/{workflow}/", None),
    ("patch", "/api/v1/workflows/{workflow}/", {"name": "hijacked"}),
    ("delete", "/api/v1/workflows/{workflow}/", None),
    ("get", "/api/v1/workflows/{workflow}/versions/", None),
    ("post", "/api/v1/workflows/{workflow}/versions", {"definition": {"steps": []}}),
    ("get", "/api/v1/workflows/{workflow}/validate", None),
    ("post", "/api/v1/workflows/{workflow}/runs", {"numbers": [1]}),
    ("get", "/api/v1/workflow-runs/{run}/", None),
    ("post", "/api/v1/workflow-runs/{run}/cancel", None),
    ("post", "/api/v1/workflow-runs/{run}/retry", {"from_step": "a"}),
    ("get", "/api/v1/workflow-runs/{run}/events", None),
]


def world_of(owner: Any) -> dict[str, Any]:
    return {
        "workflows": list(Workflow.objects.filter(owner=owner).order_by("pk").values()),
        "versions": list(WorkflowVersion.objects.filter(workflow__owner=owner).order_by("pk").values()),
        "runs": list(WorkflowRun.objects.filter(owner=owner).order_by("pk").values()),
        "steps": list(StepRun.objects.filter(run__owner=owner).order_by("pk").values()),
    }


def test_another_owner_gets_404_on_every_endpoint_and_changes_nothing(api, user, other_user, theirs):
    before_theirs, before_mine = world_of(other_user), world_of(user)
    absent = {key: ABSENT_ID for key in theirs}

    for method, path, body in ID_ENDPOINTS:
        foreign = getattr(api, method)(path.format(**theirs), body, format="json")
        missing = getattr(api, method)(path.format(**absent), body, format="json")

        assert_not_found(foreign)
        assert foreign.json() == missing.json(), (method, path)
        assert "42" not in foreign.content.decode()

    assert world_of(other_user) == before_theirs
    assert world_of(user) == before_mine


def test_lists_show_only_your_own(api, other_api, theirs):
    assert ok(api.get(WORKFLOWS))["results"] == []
    assert ok(api.get(RUNS))["results"] == []
    assert ok(api.get(RUNS, {"workflow": theirs["workflow"]}))["results"] == []
    assert ok(other_api.get(f"{RUNS}{theirs['run']}"))["run_id"] == theirs["run"]
    assert [row["id"] for row in ok(other_api.get(WORKFLOWS))["results"]] == [theirs["workflow"]]


# --- Query budgets ----------------------------------------------------------------------------

# The token with its user, the run with its version's number, its steps with their jobs.
RUN_DETAIL_QUERIES = 3


def _chain_of(owner: Any, make_instance, length: int) -> WorkflowRun:
    """A run of a ``length``-step chain, recorded directly: every step ran as an execution with
    its job, the last one still running."""
    instance = make_instance(owner=owner, name=f"chain of {length}")
    steps = [
        {"id": f"s{n}", "instance": str(instance.pk), "inputs": transform("@", n)}
        | ({"depends_on": [f"s{n - 1}"]} if n else {})
        for n in range(length)
    ]
    workflow = workflow_create(owner=owner, key=f"chain-{length}", name="Chain", definition={"steps": steps})
    run = run_row(workflow, "RUNNING")
    now = timezone.now()
    executions = Execution.objects.bulk_create(
        Execution(
            instance=instance,
            tool=instance.tool,
            owner=owner,
            mode=Mode.ASYNC,
            status=Execution.Status.COMPLETED if n < length - 1 else Execution.Status.RUNNING,
            input_data={"expression": "@", "data": n},
            output_data={"result": n},
            credits_consumed=Decimal("0.01"),
            started_at=now,
        )
        for n in range(length)
    )
    Job.objects.bulk_create(
        Job(
            execution=execution,
            instance=instance,
            owner=owner,
            status=Job.Status.COMPLETED if n < length - 1 else Job.Status.RUNNING,
            progress=100 if n < length - 1 else 40,
        )
        for n, execution in enumerate(executions)
    )
    StepRun.objects.bulk_create(
        StepRun(
            run=run,
            step_id=f"s{n}",
            status=StepRun.Status.SUCCEEDED if n < length - 1 else StepRun.Status.RUNNING,
            execution=execution,
            attempt=1,
            inputs={"expression": "@", "data": n},
            output={"result": n} if n < length - 1 else None,
            created_at=now + timedelta(microseconds=n),
            started_at=now,
        )
        for n, execution in enumerate(executions)
    )
    return run


def test_a_run_detail_costs_the_same_queries_for_1_or_50_steps(make_instance):
    short_owner, long_owner = UserFactory(), UserFactory()
    short, long = _chain_of(short_owner, make_instance, 1), _chain_of(long_owner, make_instance, 50)
    short_api, long_api = client_for(short_owner), client_for(long_owner)
    details: list[dict[str, Any]] = []

    small = _queries_of(lambda: details.append(ok(short_api.get(f"{RUNS}{short.pk}"))))
    large = _queries_of(lambda: details.append(ok(long_api.get(f"{RUNS}{long.pk}"))))

    _assert_same_count(small, large)
    assert len(large) <= RUN_DETAIL_QUERIES, large
    steps = details[1]["steps"]
    assert [step["step_id"] for step in steps] == [f"s{n}" for n in range(50)]
    assert steps[-1]["status"] == "RUNNING" and steps[-1]["progress"] == 40
    assert all(step["job_id"] for step in steps)


def test_the_runs_and_workflows_lists_cost_the_same_queries_for_3_or_30(make_instance):
    few_owner, many_owner = UserFactory(), UserFactory()
    for owner, count in ((few_owner, 3), (many_owner, 30)):
        instance = make_instance(owner=owner)
        for n in range(count):
            workflow = workflow_create(owner=owner, key=f"w{n}", name=f"W{n}", definition=single(instance, n))
            run_row(workflow)
    few, many = client_for(few_owner), client_for(many_owner)

    for url in (RUNS, WORKFLOWS):
        small = _queries_of(lambda url=url: ok(few.get(url)))
        large = _queries_of(lambda url=url: ok(many.get(url)))

        _assert_same_count(small, large)
        assert len(small) <= 2, small
