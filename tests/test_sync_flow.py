"""The synchronous flow of DESIGN.md §4 through HTTP: create an instance, ask whether it is
ready, run it, and find the run in the history; plus the catalog, instance management
(list filters, update, delete, activate/disable, capabilities) and default inputs."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from credits.models import CreditAccount, CreditLedgerEntry
from executions.models import Execution
from instances.models import ToolInstance
from tools.models import ToolDefinition

pytestmark = pytest.mark.django_db

SYNC_SUCCESS_KEYS = {"success", "cache", "data", "credits_consumed", "execution_id", "duration_ms"}
ENVELOPE_KEYS = {"success", "error_code", "error_message", "metadata"}


# --- helpers ----------------------------------------------------------------------------


def create_instance(api: APIClient, **overrides: Any) -> dict[str, Any]:
    body = {"tool_definition_id": "json-transform", "workflow_id": "workflow-1", "name": "Reshape orders"}
    body.update(overrides)
    response = api.post("/api/v1/instances/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def execute(api: APIClient, instance_id: Any, inputs: Any, *, slash: str = "") -> Any:
    return api.post(f"/api/v1/instances/{instance_id}/execute-sync{slash}", inputs, format="json")


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    body = response.json()
    assert ENVELOPE_KEYS <= set(body), body
    assert body["success"] is False
    assert body["error_code"] == code
    assert isinstance(body["error_message"], str) and body["error_message"]
    assert isinstance(body["metadata"]["action_items"], list)
    assert isinstance(body["metadata"]["can_retry"], bool)
    return body


def balance_of(user: Any) -> Decimal:
    return CreditAccount.objects.get(owner=user).balance


# --- the flow ---------------------------------------------------------------------------


def test_new_json_transform_instance_is_created_active_and_answers_201(api, user):
    body = create_instance(api, workflow_id="wf-42", name="Pick names")

    assert body["tool_definition_id"] == "json-transform"
    assert body["tool_name"] == "JSON Transform"
    assert body["workflow_id"] == "wf-42"
    assert body["name"] == "Pick names"
    assert body["status"] == "ACTIVE"  # no credentials needed, so nothing to wait for
    assert body["config"] == {}
    assert body["statistics"]["execution_count"] == 0
    row = ToolInstance.objects.get(pk=body["id"])
    assert row.owner == user
    assert row.tool.slug == "json-transform"


def test_ready_instance_validates_with_every_check_passed(api):
    instance = create_instance(api)

    response = api.get(f"/api/v1/instances/{instance['id']}/validate-execution")

    assert response.status_code == 200
    body = response.json()
    assert {"is_ready", "error_message", "action_items", "checks"} <= set(body)
    assert body["is_ready"] is True
    assert body["error_message"] is None
    assert body["action_items"] == []
    assert body["checks"], "validate-execution lists the checks it ran"
    assert all(check["passed"] for check in body["checks"])
    names = {check["name"] for check in body["checks"]}
    assert {"tool_available", "tool_active", "instance_status", "credits"} <= names


def test_execute_sync_answers_the_tool_result_with_exactly_the_documented_keys(api):
    instance = create_instance(api)

    response = execute(
        api,
        instance["id"],
        {
            "expression": "orders[?total > `10`].id",
            "data": {"orders": [{"id": 1, "total": 5}, {"id": 2, "total": 50}, {"id": 3, "total": 11}]},
        },
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == SYNC_SUCCESS_KEYS
    assert body["success"] is True
    assert body["data"] == {"result": [2, 3]}
    assert body["credits_consumed"] == 0.01
    uuid.UUID(body["execution_id"])
    assert isinstance(body["duration_ms"], int) and body["duration_ms"] >= 0


def test_successful_run_is_recorded_as_a_completed_execution(api, user):
    instance = create_instance(api)
    before = timezone.now()

    body = execute(api, instance["id"], {"expression": "a.b", "data": {"a": {"b": 3}}}).json()

    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.status == Execution.Status.COMPLETED
    assert execution.mode == "SYNC"
    assert str(execution.instance_id) == instance["id"]
    assert execution.owner == user
    assert execution.tool.slug == "json-transform"
    assert execution.input_data == {"expression": "a.b", "data": {"a": {"b": 3}}}
    assert execution.output_data == {"result": 3}
    assert execution.credits_consumed == Decimal("0.01")
    assert execution.error_code == ""
    assert before <= execution.started_at <= execution.finished_at <= timezone.now()
    assert execution.duration_ms == body["duration_ms"]


def test_successful_run_moves_the_instance_statistics(api):
    instance = create_instance(api)

    first = execute(api, instance["id"], {"expression": "a", "data": {"a": 1}}).json()
    second = execute(api, instance["id"], {"expression": "b", "data": {"b": 2}}).json()

    row = ToolInstance.objects.get(pk=instance["id"])
    assert row.execution_count == 2
    assert row.success_count == 2
    assert row.failure_count == 0
    assert row.credits_consumed == Decimal("0.02")
    assert row.total_duration_ms == first["duration_ms"] + second["duration_ms"]
    assert row.last_executed_at is not None
    stats = api.get(f"/api/v1/instances/{instance['id']}/").json()["statistics"]
    assert stats["execution_count"] == 2
    assert stats["success_count"] == 2
    assert stats["failure_rate"] == 0.0
    assert stats["credits_consumed"] == 0.02
    assert stats["last_executed_at"] is not None


def test_successful_run_debits_the_balance_once_with_one_ledger_entry(api, user):
    instance = create_instance(api)
    opening = balance_of(user)
    assert opening == settings.TOOLEXEC_DEFAULT_CREDITS

    body = execute(api, instance["id"], {"expression": "a", "data": {"a": 1}}).json()

    assert balance_of(user) == opening - Decimal("0.01")
    entries = CreditLedgerEntry.objects.filter(account__owner=user)
    assert entries.count() == 1
    entry = entries.get()
    assert entry.amount == Decimal("-0.01")
    assert entry.kind == CreditLedgerEntry.Kind.EXECUTION
    assert str(entry.execution.pk) == body["execution_id"]


def test_tool_that_ran_and_failed_answers_200_with_success_false_and_the_execution_id(api, make_instance, user):
    instance = make_instance("test-upstream-failing", owner=user)

    response = execute(api, instance.pk, {})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "UPSTREAM_ERROR"
    assert body["error_message"]
    assert isinstance(body["metadata"]["action_items"], list)
    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.status == Execution.Status.FAILED
    assert execution.error_code == "UPSTREAM_ERROR"
    assert execution.error_message == body["error_message"]
    assert execution.credits_consumed == 0
    instance.refresh_from_db()
    assert (instance.execution_count, instance.success_count, instance.failure_count) == (1, 0, 1)


def test_failed_run_charges_no_credits(api, make_instance, user):
    instance = make_instance("test-exploding", owner=user)
    opening = balance_of(user)

    execute(api, instance.pk, {})

    assert balance_of(user) == opening
    assert not CreditLedgerEntry.objects.filter(account__owner=user).exists()


# --- default inputs ---------------------------------------------------------------------


def test_instance_config_supplies_default_inputs(api):
    instance = create_instance(api, config={"expression": "a.b"})

    response = execute(api, instance["id"], {"data": {"a": {"b": "from config"}}})

    assert response.status_code == 200, response.content
    assert response.json()["data"] == {"result": "from config"}
    execution = Execution.objects.get(pk=response.json()["execution_id"])
    assert execution.input_data == {"expression": "a.b", "data": {"a": {"b": "from config"}}}


def test_inputs_override_instance_config(api):
    instance = create_instance(api, config={"expression": "a", "data": {"a": 1, "b": 2}})

    response = execute(api, instance["id"], {"expression": "b"})

    assert response.json()["data"] == {"result": 2}


def test_invalid_config_is_refused_at_create_naming_the_field(api):
    response = api.post(
        "/api/v1/instances/",
        {"tool_definition_id": "json-transform", "name": "x", "config": {"expression": 5}},
        format="json",
    )

    body = assert_error(response, 400, "INPUT_INVALID")
    assert "config.expression" in body["metadata"]["field_errors"]
    assert not ToolInstance.objects.exists()


# --- trailing slashes -------------------------------------------------------------------


def test_flow_paths_work_with_and_without_trailing_slash(api):
    response = api.post(
        "/api/v1/instances", {"tool_definition_id": "json-transform", "name": "no slash"}, format="json"
    )
    assert response.status_code == 201, response.content
    instance_id = response.json()["id"]

    for slash in ("", "/"):
        assert api.get(f"/api/v1/instances{slash}").status_code == 200
        assert api.get(f"/api/v1/instances/{instance_id}{slash}").status_code == 200
        assert api.get(f"/api/v1/instances/{instance_id}/validate-execution{slash}").json()["is_ready"] is True
        assert api.get(f"/api/v1/instances/{instance_id}/capabilities{slash}").status_code == 200
        run = execute(api, instance_id, {"expression": "a", "data": {"a": slash}}, slash=slash)
        assert run.status_code == 200 and run.json()["data"] == {"result": slash}
        assert api.get(f"/api/v1/executions{slash}").status_code == 200
        assert api.get(f"/api/v1/executions/{run.json()['execution_id']}{slash}").status_code == 200
        assert api.get(f"/api/v1/tools{slash}").status_code == 200
        assert api.get(f"/api/v1/tools/json-transform{slash}").status_code == 200
        assert api.post(f"/api/v1/instances/{instance_id}/disable{slash}").status_code == 200
        assert api.post(f"/api/v1/instances/{instance_id}/activate{slash}").status_code == 200


# --- execution history ------------------------------------------------------------------


def test_execution_detail_shows_the_recorded_run(api):
    instance = create_instance(api)
    run = execute(api, instance["id"], {"expression": "a", "data": {"a": [1, 2]}}).json()

    response = api.get(f"/api/v1/executions/{run['execution_id']}/")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == run["execution_id"]
    assert body["instance_id"] == instance["id"]
    assert body["tool_definition_id"] == "json-transform"
    assert body["mode"] == "SYNC"
    assert body["status"] == "COMPLETED"
    assert body["input_data"] == {"expression": "a", "data": {"a": [1, 2]}}
    assert body["output_data"] == {"result": [1, 2]}
    assert body["credits_consumed"] == 0.01
    assert body["duration_ms"] == run["duration_ms"]
    assert body["started_at"] and body["finished_at"]


def test_execution_list_is_newest_first_and_cursor_paginated(api):
    instance = create_instance(api)
    ids = [execute(api, instance["id"], {"expression": "a", "data": {"a": n}}).json()["execution_id"] for n in range(3)]

    first = api.get("/api/v1/executions/", {"page_size": 2})

    assert first.status_code == 200
    page = first.json()
    assert set(page) >= {"next", "previous", "results"}
    assert [e["id"] for e in page["results"]] == [ids[2], ids[1]]
    assert page["next"] and "cursor=" in page["next"]
    assert "page=" not in page["next"].replace("page_size=", "")  # a cursor, not a page number
    second = api.get(page["next"]).json()
    assert [e["id"] for e in second["results"]] == [ids[0]]
    assert second["next"] is None
    assert second["previous"]


def test_execution_list_filters_by_instance(api):
    one, two = create_instance(api, name="one"), create_instance(api, name="two")
    run_one = execute(api, one["id"], {"expression": "a", "data": {}}).json()
    execute(api, two["id"], {"expression": "a", "data": {}})

    results = api.get("/api/v1/executions/", {"instance": one["id"]}).json()["results"]

    assert [e["id"] for e in results] == [run_one["execution_id"]]


def test_execution_list_filters_by_status_and_mode(api, make_instance, user):
    instance = create_instance(api)
    ok = execute(api, instance["id"], {"expression": "a", "data": {}}).json()
    failed = execute(api, make_instance("test-exploding", owner=user).pk, {}).json()

    completed = api.get("/api/v1/executions/", {"status": "COMPLETED"}).json()["results"]
    failures = api.get("/api/v1/executions/", {"status": "failed"}).json()["results"]
    sync = api.get("/api/v1/executions/", {"mode": "SYNC"}).json()["results"]
    asynchronous = api.get("/api/v1/executions/", {"mode": "ASYNC"}).json()["results"]

    assert [e["id"] for e in completed] == [ok["execution_id"]]
    assert [e["id"] for e in failures] == [failed["execution_id"]]
    assert {e["id"] for e in sync} == {ok["execution_id"], failed["execution_id"]}
    assert asynchronous == []


def test_execution_list_filters_by_day_and_time_range(api):
    instance = create_instance(api)
    run = execute(api, instance["id"], {"expression": "a", "data": {}}).json()
    created = Execution.objects.get(pk=run["execution_id"]).created_at
    hour = timedelta(hours=1)

    def ids(**params: str) -> list[str]:
        response = api.get("/api/v1/executions/", params)
        assert response.status_code == 200, response.content
        return [e["id"] for e in response.json()["results"]]

    assert ids(date=created.date().isoformat()) == [run["execution_id"]]
    assert ids(date=(created - timedelta(days=1)).date().isoformat()) == []
    assert ids(created_after=(created - hour).isoformat()) == [run["execution_id"]]
    assert ids(created_after=(created + hour).isoformat()) == []
    assert ids(created_before=(created + hour).isoformat()) == [run["execution_id"]]
    assert ids(created_before=(created - hour).isoformat()) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("instance", "not-a-uuid"),
        ("status", "EXPLODED"),
        ("mode", "SOMETIMES"),
        ("date", "yesterday"),
        ("created_after", "soon"),
        ("created_before", "2024-13-45"),
    ],
)
def test_execution_list_refuses_a_bad_filter_value_naming_it(api, name, value):
    response = api.get("/api/v1/executions/", {name: value})

    body = assert_error(response, 400, "INPUT_INVALID")
    assert name in body["metadata"]["field_errors"]
    assert name in body["error_message"]


# --- the catalog ------------------------------------------------------------------------


def test_tool_list_shows_each_tool_with_its_capabilities(api, catalog):
    response = api.get("/api/v1/tools/")

    assert response.status_code == 200
    tools = {tool["id"]: tool for tool in response.json()}
    assert {"json-transform", "test-google-sheet", "test-async-only"} <= set(tools)
    transform = tools["json-transform"]
    assert transform["name"] == "JSON Transform"
    assert transform["input_schema"]["required"] == ["expression", "data"]
    assert transform["output_schema"]["required"] == ["result"]
    assert transform["credential_slots"] == []
    assert transform["modes"] == ["sync", "async"]  # async as a workflow's glue
    assert transform["pricing"] == {"base_credits": 0.01, "credits_per_unit": 0.0, "unit": ""}
    assert transform["is_available"] is True
    assert transform["unavailable_reason"] is None
    google = tools["test-google-sheet"]
    assert google["modes"] == ["sync", "async"]
    assert google["credential_slots"] == [
        {
            "name": "OAUTH_TOKEN",
            "provider": "google",
            "kinds": ["oauth2"],
            "scopes": ["drive.readonly"],
            "required": True,
            "description": "",
        }
    ]


def test_tool_detail_is_found_by_slug(api, catalog):
    response = api.get("/api/v1/tools/test-priced/")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "test-priced"
    assert body["pricing"] == {"base_credits": 0.01, "credits_per_unit": 0.5, "unit": ""}
    assert body["input_schema"]["properties"]["units"] == {"type": "number", "minimum": 0}


def test_tool_whose_implementation_is_missing_is_listed_unavailable_without_internal_paths(api, catalog):
    from tools.services import catalog_sync

    ToolDefinition.objects.create(
        slug="vanished-tool", name="Vanished Tool", implementation="vanished_plugin.tools.Vanished", modes=["sync"]
    )
    catalog_sync()

    response = api.get("/api/v1/tools/vanished-tool")

    assert response.status_code == 200
    body = response.json()
    assert body["is_available"] is False
    assert body["unavailable_reason"]
    assert "vanished_plugin" not in response.content.decode()


def test_tool_switched_off_by_operators_is_not_in_the_catalog(api):
    ToolDefinition.objects.filter(slug="json-transform").update(is_active=False)

    assert "json-transform" not in {t["id"] for t in api.get("/api/v1/tools/").json()}
    assert_error(api.get("/api/v1/tools/json-transform/"), 404, "NOT_FOUND")


# --- instance management ----------------------------------------------------------------


def test_instance_list_shows_newest_first_and_filters_by_workflow_and_status(api, make_instance, user):
    first = create_instance(api, workflow_id="wf-a", name="first")
    second = create_instance(api, workflow_id="wf-b", name="second")
    draft = make_instance("test-google-sheet", owner=user, workflow_id="wf-a", name="draft")

    def ids(**params: str) -> list[str]:
        response = api.get("/api/v1/instances/", params)
        assert response.status_code == 200, response.content
        return [i["id"] for i in response.json()["results"]]

    assert ids() == [str(draft.pk), second["id"], first["id"]]
    assert ids(workflow_id="wf-a") == [str(draft.pk), first["id"]]
    assert ids(status="DRAFT") == [str(draft.pk)]
    assert ids(status="active") == [second["id"], first["id"]]
    assert ids(workflow_id="wf-a", status="ACTIVE") == [first["id"]]
    assert ids(workflow_id="wf-unknown") == []


def test_instance_list_refuses_an_unknown_status_filter(api):
    body = assert_error(api.get("/api/v1/instances/", {"status": "SLEEPING"}), 400, "INPUT_INVALID")
    assert "status" in body["metadata"]["field_errors"]


def test_instance_retrieve_shows_the_instance(api):
    created = create_instance(api, config={"expression": "a"})

    response = api.get(f"/api/v1/instances/{created['id']}/")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == created["id"]
    assert body["config"] == {"expression": "a"}
    assert body["credential_mappings"] == {}
    assert set(body["statistics"]) >= {
        "execution_count",
        "success_count",
        "failure_count",
        "failure_rate",
        "credits_consumed",
        "total_duration_ms",
        "last_executed_at",
    }


def test_instance_patch_changes_only_the_given_fields(api):
    created = create_instance(api, workflow_id="wf-1", name="before", config={"expression": "a"})

    response = api.patch(f"/api/v1/instances/{created['id']}/", {"name": "after"}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["name"] == "after"
    row = ToolInstance.objects.get(pk=created["id"])
    assert (row.name, row.workflow_id, row.config) == ("after", "wf-1", {"expression": "a"})


def test_instance_put_changes_name_workflow_and_config(api):
    created = create_instance(api)

    response = api.put(
        f"/api/v1/instances/{created['id']}",
        {"name": "renamed", "workflow_id": "wf-9", "config": {"expression": "x"}},
        format="json",
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["name"], body["workflow_id"], body["config"]) == ("renamed", "wf-9", {"expression": "x"})
    row = ToolInstance.objects.get(pk=created["id"])
    assert (row.name, row.workflow_id, row.config) == ("renamed", "wf-9", {"expression": "x"})


def test_instance_update_cannot_change_status_or_tool(api):
    created = create_instance(api)

    api.patch(
        f"/api/v1/instances/{created['id']}/",
        {"status": "DISABLED", "tool_definition_id": "test-noop", "name": "still here"},
        format="json",
    )

    row = ToolInstance.objects.get(pk=created["id"])
    assert row.status == ToolInstance.Status.ACTIVE
    assert row.tool.slug == "json-transform"


def test_instance_update_refuses_config_the_tool_would_reject(api):
    created = create_instance(api, config={"expression": "a"})

    response = api.patch(f"/api/v1/instances/{created['id']}/", {"config": {"expression": 7}}, format="json")

    body = assert_error(response, 400, "INPUT_INVALID")
    assert "config.expression" in body["metadata"]["field_errors"]
    assert ToolInstance.objects.get(pk=created["id"]).config == {"expression": "a"}


def test_deleting_an_instance_keeps_its_executions_detached(api):
    created = create_instance(api)
    run = execute(api, created["id"], {"expression": "a", "data": {"a": 1}}).json()

    response = api.delete(f"/api/v1/instances/{created['id']}/")

    assert response.status_code == 204
    assert not ToolInstance.objects.filter(pk=created["id"]).exists()
    execution = Execution.objects.get(pk=run["execution_id"])
    assert execution.instance_id is None
    detail = api.get(f"/api/v1/executions/{run['execution_id']}/").json()
    assert detail["instance_id"] is None
    assert detail["status"] == "COMPLETED"
    assert_error(api.get(f"/api/v1/instances/{created['id']}/"), 404, "NOT_FOUND")


def test_disabling_an_active_instance_and_activating_it_again(api):
    created = create_instance(api)

    disabled = api.post(f"/api/v1/instances/{created['id']}/disable")
    assert disabled.status_code == 200, disabled.content
    assert disabled.json()["status"] == "DISABLED"
    assert ToolInstance.objects.get(pk=created["id"]).status == ToolInstance.Status.DISABLED

    activated = api.post(f"/api/v1/instances/{created['id']}/activate")
    assert activated.status_code == 200, activated.content
    assert activated.json()["status"] == "ACTIVE"
    assert ToolInstance.objects.get(pk=created["id"]).status == ToolInstance.Status.ACTIVE


def test_disabling_twice_is_refused_in_words(api):
    created = create_instance(api)
    api.post(f"/api/v1/instances/{created['id']}/disable")

    body = assert_error(api.post(f"/api/v1/instances/{created['id']}/disable"), 409, "INVALID_TRANSITION")

    assert "already disabled" in body["error_message"]
    assert ToolInstance.objects.get(pk=created["id"]).status == ToolInstance.Status.DISABLED


def test_activating_an_active_instance_is_refused_in_words(api):
    created = create_instance(api)

    body = assert_error(api.post(f"/api/v1/instances/{created['id']}/activate"), 409, "INVALID_TRANSITION")

    assert "already active" in body["error_message"]


def test_activating_a_draft_whose_credentials_are_not_mapped_is_refused_naming_the_slot(api, make_instance, user):
    draft = make_instance("test-google-sheet", owner=user)
    assert draft.status == ToolInstance.Status.DRAFT

    body = assert_error(api.post(f"/api/v1/instances/{draft.pk}/activate"), 409, "INVALID_TRANSITION")

    assert "credentials are mapped" in body["error_message"]
    assert "OAUTH_TOKEN" in body["error_message"]
    draft.refresh_from_db()
    assert draft.status == ToolInstance.Status.DRAFT


def test_a_draft_can_be_disabled_but_not_activated_from_disabled_without_credentials(api, make_instance, user):
    draft = make_instance("test-google-sheet", owner=user)

    assert api.post(f"/api/v1/instances/{draft.pk}/disable").json()["status"] == "DISABLED"
    body = assert_error(api.post(f"/api/v1/instances/{draft.pk}/activate"), 409, "INVALID_TRANSITION")

    assert "OAUTH_TOKEN" in body["error_message"]
    draft.refresh_from_db()
    assert draft.status == ToolInstance.Status.DISABLED


def test_capabilities_describe_what_the_instance_takes_and_costs(api):
    created = create_instance(api, config={"expression": "a"})

    response = api.get(f"/api/v1/instances/{created['id']}/capabilities")

    assert response.status_code == 200
    body = response.json()
    assert body["tool_definition_id"] == "json-transform"
    assert body["name"] == "JSON Transform"
    assert body["modes"] == ["sync", "async"]
    assert body["input_schema"]["required"] == ["expression", "data"]
    assert body["output_schema"]["required"] == ["result"]
    assert body["defaults"] == {"expression": "a"}
    assert body["credential_slots"] == []
    assert body["credential_mappings"] == {}
    assert body["timeout_seconds"] == 10
    assert body["pricing"] == {"base_credits": 0.01, "credits_per_unit": 0.0, "unit": ""}
    assert body["is_available"] is True


def test_capabilities_list_the_credential_slots_of_a_tool_that_needs_an_account(api, make_instance, user):
    draft = make_instance("test-google-sheet", owner=user)

    body = api.get(f"/api/v1/instances/{draft.pk}/capabilities/").json()

    assert [slot["name"] for slot in body["credential_slots"]] == ["OAUTH_TOKEN"]
    assert body["credential_slots"][0]["provider"] == "google"
    assert body["modes"] == ["sync", "async"]


# --- Recording a run: the hold, the outcome, the books ------------------------------------
# Through the services, on whichever database the suite runs: the same writes on PostgreSQL
# and SQLite.


def recorded_start(make_instance, user, tool: str = "test-priced", balance: str = "5") -> tuple[Execution, Any]:
    """A sync run recorded as started: its minimum price held (0.01 for test-priced)."""
    from executions.models import Mode
    from executions.services.runs import execution_record_start

    account, _ = CreditAccount.objects.update_or_create(owner=user, defaults={"balance": Decimal(balance)})
    instance = make_instance(tool, owner=user)
    return execution_record_start(instance=instance, inputs={}, mode=Mode.SYNC, account=account), account


def statistics_of(execution: Execution) -> tuple:
    instance = ToolInstance.objects.get(pk=execution.instance_id)
    return (
        instance.execution_count,
        instance.success_count,
        instance.failure_count,
        instance.credits_consumed,
        instance.total_duration_ms,
    )


def finish(execution: Execution, account: Any, status: str, *, credits: str = "0", duration_ms: int = 1, **kw) -> bool:
    from executions.services.runs import Outcome, execution_finish

    outcome = Outcome(status, credits=Decimal(credits), **kw)
    return execution_finish(execution=execution, outcome=outcome, duration_ms=duration_ms, account=account)


def test_a_hold_the_balance_does_not_cover_records_nothing(make_instance, user):
    from executions.models import Mode
    from executions.services.runs import execution_record_start
    from tools.errors import InsufficientCredits

    CreditAccount.objects.update_or_create(owner=user, defaults={"balance": Decimal("0.001")})
    instance = make_instance("test-priced", owner=user)
    account = CreditAccount.objects.get(owner=user)

    with pytest.raises(InsufficientCredits):
        execution_record_start(instance=instance, inputs={}, mode=Mode.SYNC, account=account)

    assert not Execution.objects.exists()
    assert balance_of(user) == Decimal("0.001")


def test_a_charge_beyond_the_hold_settles_the_rest_and_is_entered_in_the_ledger(make_instance, user):
    execution, account = recorded_start(make_instance, user)
    assert balance_of(user) == Decimal("4.99")  # 0.01 held

    assert finish(execution, account, "COMPLETED", credits="1.51", duration_ms=7, output={"ok": True})

    row = Execution.objects.get(pk=execution.pk)
    assert (row.status, row.output_data, row.credits_consumed, row.duration_ms) == (
        "COMPLETED",
        {"ok": True},
        Decimal("1.51"),
        7,
    )
    assert row.finished_at is not None and (row.error_code, row.error_message, row.error_metadata) == ("", "", {})
    assert balance_of(user) == Decimal("3.49")
    assert statistics_of(execution) == (1, 1, 0, Decimal("1.51"), 7)
    entry = CreditLedgerEntry.objects.get(execution=execution)
    assert (entry.account_id, entry.kind, entry.amount) == (account.pk, "EXECUTION", Decimal("-1.51"))
    assert entry.created_at is not None and entry.reason == "" and entry.created_by_id is None


def test_a_failed_run_gives_the_hold_back_and_enters_nothing(make_instance, user):
    execution, account = recorded_start(make_instance, user)
    error = {"error_code": "TOOL_ERROR", "error_message": "It broke.", "metadata": {"tool": "Test Priced"}}

    assert finish(execution, account, "FAILED", duration_ms=3, error=error)

    row = Execution.objects.get(pk=execution.pk)
    assert (row.status, row.output_data, row.error_code, row.error_message) == (
        "FAILED",
        None,
        "TOOL_ERROR",
        "It broke.",
    )
    assert row.error_metadata == {"tool": "Test Priced"} and row.credits_consumed == 0
    assert balance_of(user) == Decimal("5")
    assert statistics_of(execution) == (1, 0, 1, Decimal("0"), 3)
    assert not CreditLedgerEntry.objects.filter(execution=execution).exists()


def test_an_unlimited_account_is_charged_nothing_but_the_charge_is_entered(make_instance, user):
    execution, account = recorded_start(make_instance, user)
    CreditAccount.objects.filter(pk=account.pk).update(is_unlimited=True, balance=Decimal("2"))
    account.refresh_from_db()

    assert finish(execution, account, "COMPLETED", credits="0.51", output={})

    assert balance_of(user) == Decimal("2")
    assert CreditLedgerEntry.objects.get(execution=execution).amount == Decimal("-0.51")


def test_a_run_whose_instance_was_deleted_meanwhile_still_ends(make_instance, user):
    execution, account = recorded_start(make_instance, user, tool="test-noop")
    ToolInstance.objects.filter(pk=execution.instance_id).delete()
    execution.refresh_from_db()
    assert execution.instance_id is None

    assert finish(execution, account, "COMPLETED", output={})
    assert Execution.objects.get(pk=execution.pk).status == "COMPLETED"


def test_a_late_outcome_never_overwrites_an_ended_run(make_instance, user):
    execution, account = recorded_start(make_instance, user)
    assert finish(execution, account, "COMPLETED", credits="1", duration_ms=5, output={"ok": True})
    books = (balance_of(user), statistics_of(execution), CreditLedgerEntry.objects.count())

    late = {"error_code": "TIMEOUT", "error_message": "Too late."}
    assert not finish(execution, account, "FAILED", duration_ms=9, error=late)

    assert Execution.objects.get(pk=execution.pk).status == "COMPLETED"
    assert (balance_of(user), statistics_of(execution), CreditLedgerEntry.objects.count()) == books
