"""Every error the sync flow can produce, in the one envelope of DESIGN.md §5, with its HTTP
status, in words a person understands, with what to do about it, and without tracebacks,
secrets or internal paths."""

from __future__ import annotations

import base64
import json
import re
import time
from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ValidationError as DjangoValidationError
from django.test import Client
from django.urls import reverse
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.test import APIClient, APIRequestFactory
from rest_framework.views import APIView

from core.errors import ErrorCode, envelope
from credits.models import CreditAccount
from executions.models import Execution
from instances.models import ToolInstance
from tools.models import ToolDefinition
from tools.services import catalog_sync

pytestmark = pytest.mark.django_db

BASE_URL = "https://toolexec.test"  # TOOLEXEC_BASE_URL in tests/settings.py

# Anything that looks like a Python traceback or a path on the server's disk.
_LEAK = re.compile(r"Traceback|File \"|\.py\b|site-packages|/srv/|/usr/|/home/|/work/|/tmp/")


# --- helpers ----------------------------------------------------------------------------


def assert_no_leak(response: Any) -> None:
    text = response.content.decode()
    match = _LEAK.search(text)
    assert match is None, f"the response leaks {match.group(0)!r}: {text}"


def assert_envelope(response: Any, status: int, code: str, *, can_retry: bool | None = None) -> dict[str, Any]:
    """The DESIGN.md §5 envelope with ``code`` at ``status``; returns the body."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    assert_no_leak(response)
    body = json.loads(response.content)
    assert body["success"] is False
    assert body["error_code"] == code
    message = body["error_message"]
    assert isinstance(message, str) and message.strip()
    assert "{" not in message and "}" not in message, f"an unfilled template: {message}"
    metadata = body["metadata"]
    assert isinstance(metadata["can_retry"], bool)
    if can_retry is not None:
        assert metadata["can_retry"] is can_retry
    items = metadata["action_items"]
    assert isinstance(items, list)
    for item in items:
        assert {"action", "message", "priority"} <= set(item), item
        assert item["priority"] in {"high", "medium", "low"}
        assert "{" not in item["message"] and "{" not in item.get("url", "")
        if "url" in item:
            assert item["url"].startswith(BASE_URL + "/")
    return body


def execute(api: APIClient, instance: Any, inputs: Any) -> Any:
    return api.post(f"/api/v1/instances/{instance.pk}/execute-sync", inputs, format="json")


def instance_url(instance: Any, action: str = "") -> str:
    return f"{BASE_URL}/api/v1/instances/{instance.pk}" + (f"/{action}" if action else "")


def actions(body: dict[str, Any]) -> list[str]:
    return [item["action"] for item in body["metadata"]["action_items"]]


def nothing_recorded(user: Any) -> bool:
    return not Execution.objects.filter(owner=user).exists()


# --- INPUT_INVALID ----------------------------------------------------------------------


def test_every_failing_field_is_named_at_once(api, make_instance, user):
    instance = make_instance(owner=user)

    response = execute(api, instance, {"expression": 5, "colour": "blue"})

    body = assert_envelope(response, 400, "INPUT_INVALID", can_retry=False)
    field_errors = body["metadata"]["field_errors"]
    assert set(field_errors) == {"expression", "data", "colour"}
    assert field_errors["expression"] == ["Must be of type string."]
    assert field_errors["data"] == ["This field is required."]
    assert field_errors["colour"] == ["Unknown field."]
    for name in ("expression", "data", "colour"):
        assert name in body["error_message"]
    assert actions(body) == ["fix_input"]
    assert nothing_recorded(user)


def test_input_errors_never_repeat_the_submitted_value(api, make_instance, user):
    instance = make_instance(owner=user)

    response = execute(api, instance, {"expression": {"password": "hunter2-secret"}, "data": {}})

    assert_envelope(response, 400, "INPUT_INVALID")
    assert "hunter2-secret" not in response.content.decode()


@pytest.mark.parametrize("body", [[1, 2, 3], "just a string", 42, None])
def test_a_body_that_is_not_an_object_is_refused(api, make_instance, user, body):
    instance = make_instance(owner=user)

    response = api.post(
        f"/api/v1/instances/{instance.pk}/execute-sync", json.dumps(body), content_type="application/json"
    )

    result = assert_envelope(response, 400, "INPUT_INVALID")
    assert "(root)" in result["metadata"]["field_errors"]
    assert "object" in result["error_message"]
    assert nothing_recorded(user)


def test_malformed_json_is_refused_as_invalid_input(api, make_instance, user):
    instance = make_instance(owner=user)

    response = api.post(
        f"/api/v1/instances/{instance.pk}/execute-sync", '{"expression": "a", ', content_type="application/json"
    )

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert "could not be read" in body["error_message"]
    assert nothing_recorded(user)


@pytest.mark.parametrize("expression", ["a.[", "foo[?bar ==", "a.b)", "@@@"])
def test_bad_jmespath_expression_names_the_expression_field(api, make_instance, user, expression):
    instance = make_instance(owner=user)

    response = execute(api, instance, {"expression": expression, "data": {"a": 1}})

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert set(body["metadata"]["field_errors"]) == {"expression"}
    assert body["metadata"]["field_errors"]["expression"][0]
    assert "JMESPath expression is not valid" in body["error_message"]
    assert nothing_recorded(user)


def test_null_character_in_inputs_is_refused_as_invalid_input(api, make_instance, user):
    """PostgreSQL's jsonb cannot store U+0000: the run can't be recorded, so it must be
    refused before anything is written, naming the field."""
    instance = make_instance(owner=user)

    response = execute(api, instance, {"expression": "a", "data": {"a": "nul\u0000byte"}})

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert "data.a" in body["metadata"]["field_errors"]


# --- not ready: 409 / 402 ---------------------------------------------------------------


def test_async_only_tool_run_synchronously_points_at_execute_async(api, make_instance, user):
    instance = make_instance("test-async-only", owner=user)

    response = execute(api, instance, {})

    body = assert_envelope(response, 409, "MODE_NOT_SUPPORTED")
    assert body["error_message"] == "Test Async Only cannot run sync; it supports only async execution."
    [item] = body["metadata"]["action_items"]
    assert item["action"] == "use_async"
    assert item["url"] == instance_url(instance, "execute-async")
    assert item["priority"] == "high"
    assert nothing_recorded(user)


def test_tool_whose_implementation_is_missing_answers_tool_unavailable(api, user, make_instance, catalog):
    definition = ToolDefinition.objects.create(
        slug="vanished-tool", name="Vanished Tool", implementation="vanished_plugin.tools.Vanished", modes=["sync"]
    )
    instance = make_instance(definition.slug, owner=user)
    catalog_sync()  # finds the implementation missing and marks the definition unavailable

    response = execute(api, instance, {})

    body = assert_envelope(response, 409, "TOOL_UNAVAILABLE")
    assert "Vanished Tool" in body["error_message"]
    assert "not available" in body["error_message"]
    assert "vanished_plugin" not in response.content.decode()
    assert actions(body) == ["contact_support"]
    assert nothing_recorded(user)


def test_tool_switched_off_by_operators_answers_tool_inactive(api, make_instance, user):
    instance = make_instance(owner=user)
    ToolDefinition.objects.filter(slug="json-transform").update(is_active=False)

    response = execute(api, instance, {"expression": "a", "data": {}})

    body = assert_envelope(response, 409, "TOOL_INACTIVE")
    assert body["error_message"] == "JSON Transform has been switched off by the operators and cannot run right now."
    assert actions(body) == ["contact_support"]
    assert nothing_recorded(user)


def test_disabled_instance_asks_to_be_activated(api, make_instance, user):
    instance = make_instance(owner=user)
    api.post(f"/api/v1/instances/{instance.pk}/disable")

    response = execute(api, instance, {"expression": "a", "data": {}})

    body = assert_envelope(response, 409, "INSTANCE_DISABLED")
    assert "disabled" in body["error_message"]
    [item] = body["metadata"]["action_items"]
    assert item["action"] == "activate_instance"
    assert item["url"] == instance_url(instance, "activate")
    assert nothing_recorded(user)


def test_google_tool_without_a_mapped_account_asks_to_connect_google(api, make_instance, user):
    instance = make_instance("test-google-sheet", owner=user)

    response = execute(api, instance, {"file_id": "abc"})

    body = assert_envelope(response, 409, "CREDENTIAL_MISSING")
    assert body["error_message"] == "Google Drive Reader needs your Google account before it can run."
    [item] = body["metadata"]["action_items"]  # the draft's own item says the same: given once
    assert item["action"] == "fix_credential"
    assert item["message"] == "Connect your Google account and map it to this instance"
    assert item["url"] == instance_url(instance, "configure-credentials")
    assert item["priority"] == "high"
    assert nothing_recorded(user)


def test_draft_instance_whose_credentials_resolve_answers_instance_draft(api, make_instance, user):
    """A draft whose slots were mapped behind the service's back (it activates a draft once
    every slot is mapped) still refuses to run, in words, until it is activated."""
    from instances.services.credentials import credential_create

    instance = make_instance("test-google-sheet", owner=user)
    credential_create(owner=user, provider="google", kind="oauth2", secret={"access_token": "ya29.test-token"})
    ToolInstance.objects.filter(pk=instance.pk).update(credential_mappings={"OAUTH_TOKEN": "google"})

    response = execute(api, instance, {"file_id": "abc"})

    body = assert_envelope(response, 409, "INSTANCE_DRAFT")
    assert body["error_message"] == (
        "This Google Drive Reader instance is a draft: it becomes active once its credentials are mapped."
    )
    assert actions(body) == ["fix_credential"]
    assert "ya29.test-token" not in response.content.decode()
    assert nothing_recorded(user)


def test_draft_check_action_item_reads_in_words(api, make_instance, user):
    instance = make_instance("test-google-sheet", owner=user)

    checks = api.get(f"/api/v1/instances/{instance.pk}/validate-execution").json()["checks"]

    [draft] = [check for check in checks if check["name"] == "instance_status"]
    assert draft["error_code"] == "INSTANCE_DRAFT"
    for item in draft["action_items"]:
        assert "the provider" not in item["message"]
        assert item["message"] == "Map the credentials this instance needs"


def test_empty_balance_answers_insufficient_credits_with_402(api, make_instance, user):
    instance = make_instance(owner=user)
    CreditAccount.objects.filter(owner=user).update(balance=Decimal("0.005"))

    response = execute(api, instance, {"expression": "a", "data": {}})

    # DESIGN.md §5 and the catalog: 402 for "no credits".
    body = assert_envelope(response, 402, "INSUFFICIENT_CREDITS")
    assert body["error_message"] == (
        "You do not have enough credits to run JSON Transform: a run costs at least 0.01 and your balance is 0.005."
    )
    assert actions(body) == ["add_credits"]
    assert nothing_recorded(user)
    assert CreditAccount.objects.get(owner=user).balance == Decimal("0.005")


def test_free_tool_runs_on_an_empty_balance(api, make_instance, user):
    instance = make_instance("test-noop", owner=user)
    CreditAccount.objects.filter(owner=user).update(balance=0)

    response = execute(api, instance, {"echo": "hi"})

    assert response.status_code == 200
    assert response.json()["success"] is True


def test_several_failing_checks_report_the_most_important_and_list_every_action_most_urgent_first(
    api, make_instance, user
):
    instance = make_instance("test-google-sheet", owner=user)
    ToolDefinition.objects.filter(slug="test-google-sheet").update(is_active=False)

    readiness = api.get(f"/api/v1/instances/{instance.pk}/validate-execution").json()
    refusal = execute(api, instance, {"file_id": "abc"})

    assert readiness["is_ready"] is False
    inactive = "Google Drive Reader has been switched off by the operators and cannot run right now."
    assert readiness["error_message"] == inactive
    assert [item["action"] for item in readiness["action_items"]] == ["fix_credential", "contact_support"]
    assert [item["priority"] for item in readiness["action_items"]] == ["high", "medium"]
    failed = {check["name"]: check["error_code"] for check in readiness["checks"] if not check["passed"]}
    assert failed == {
        "tool_active": "TOOL_INACTIVE",
        "instance_status": "INSTANCE_DRAFT",
        "credential:OAUTH_TOKEN": "CREDENTIAL_MISSING",
    }
    body = assert_envelope(refusal, 409, "TOOL_INACTIVE")
    assert body["error_message"] == inactive
    assert body["metadata"]["action_items"] == readiness["action_items"]


def test_validate_execution_for_a_mode_reports_an_unsupported_mode(api, make_instance, user):
    instance = make_instance("test-async-only", owner=user)

    ready_async = api.get(f"/api/v1/instances/{instance.pk}/validate-execution", {"mode": "async"}).json()
    ready_sync = api.get(f"/api/v1/instances/{instance.pk}/validate-execution", {"mode": "sync"}).json()

    assert ready_async["is_ready"] is True
    assert ready_sync["is_ready"] is False
    assert ready_sync["error_message"] == "Test Async Only cannot run sync; it supports only async execution."
    assert_envelope(
        api.get(f"/api/v1/instances/{instance.pk}/validate-execution", {"mode": "sometimes"}), 400, "INPUT_INVALID"
    )


# --- runs that failed: 200 success false ------------------------------------------------


def test_tool_that_crashes_answers_tool_error_without_the_exception_text(api, make_instance, user):
    instance = make_instance("test-exploding", owner=user)

    response = execute(api, instance, {})

    body = assert_envelope(response, 200, "TOOL_ERROR", can_retry=True)
    text = response.content.decode()
    assert "boom" not in text
    assert "/srv/secret/path.py" not in text
    assert "RuntimeError" not in text
    assert "Test Exploding" in body["error_message"]
    execution = Execution.objects.get(pk=body["execution_id"])
    assert body["metadata"]["execution_id"] == str(execution.pk)
    assert execution.status == Execution.Status.FAILED
    assert execution.error_code == "TOOL_ERROR"
    assert "boom" not in execution.error_message
    assert "/srv/" not in json.dumps(execution.error_metadata)


def test_upstream_failure_answers_upstream_error_with_success_false(api, make_instance, user):
    instance = make_instance("test-upstream-failing", owner=user)

    response = execute(api, instance, {})

    body = assert_envelope(response, 200, "UPSTREAM_ERROR", can_retry=True)
    assert "the server answered 502 Bad Gateway" in body["error_message"]
    assert "Test Upstream Failing" in body["error_message"]
    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.status == Execution.Status.FAILED
    assert execution.error_code == "UPSTREAM_ERROR"


def test_upstream_error_message_names_the_provider_the_tool_gave(api, make_instance, user):
    instance = make_instance("test-upstream-failing", owner=user)

    body = execute(api, instance, {}).json()

    assert body["error_message"].startswith("Example API answered with an error while Test Upstream Failing")


def test_slow_tool_is_stopped_at_the_sync_time_limit(api, make_instance, user, settings):
    settings.TOOLEXEC_SYNC_TIMEOUT_SECONDS = 1
    instance = make_instance("test-slow", owner=user)

    started = time.monotonic()
    response = execute(api, instance, {"seconds": 30})
    elapsed = time.monotonic() - started

    assert elapsed < 3, f"the answer took {elapsed:.1f}s"
    body = assert_envelope(response, 200, "TIMEOUT", can_retry=True)
    assert body["error_message"] == "Test Slow did not finish within 1 seconds and was stopped."
    [item] = body["metadata"]["action_items"]
    assert item["action"] == "use_async"
    assert item["url"] == instance_url(instance, "execute-async")
    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.status == Execution.Status.TIMED_OUT
    assert execution.error_code == "TIMEOUT"
    assert execution.finished_at is not None
    assert execution.duration_ms < 3000
    instance.refresh_from_db()
    assert instance.failure_count == 1


# --- HTTP-level errors ------------------------------------------------------------------


def test_request_without_a_token_answers_not_authenticated(db):
    response = APIClient().get("/api/v1/instances/")

    body = assert_envelope(response, 401, "NOT_AUTHENTICATED")
    assert "Token" in body["error_message"]
    assert response["WWW-Authenticate"] == "Token"


def test_request_with_a_bad_token_answers_not_authenticated(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    assert_envelope(client.get("/api/v1/instances/"), 401, "NOT_AUTHENTICATED")


def test_rejected_token_is_told_the_token_is_not_valid(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    body = client.get("/api/v1/instances/").json()

    assert "Sign in first" not in body["error_message"]
    assert "token" in body["error_message"].lower()


def test_unknown_instance_id_answers_not_found(api):
    assert_envelope(api.get("/api/v1/instances/6f1c8a53-6a56-4d6e-9a3f-6f0b6f2f3c11/"), 404, "NOT_FOUND")
    assert_envelope(
        api.post("/api/v1/instances/6f1c8a53-6a56-4d6e-9a3f-6f0b6f2f3c11/execute-sync", {}, format="json"),
        404,
        "NOT_FOUND",
    )
    assert_envelope(api.get("/api/v1/executions/6f1c8a53-6a56-4d6e-9a3f-6f0b6f2f3c11/"), 404, "NOT_FOUND")
    assert_envelope(api.get("/api/v1/tools/no-such-tool/"), 404, "NOT_FOUND")


def test_malformed_id_answers_not_found(api):
    assert_envelope(api.get("/api/v1/instances/not-a-uuid/"), 404, "NOT_FOUND")
    assert_envelope(api.get("/api/v1/executions/12345/"), 404, "NOT_FOUND")


def test_unknown_url_under_api_answers_not_found_in_the_envelope(api):
    assert_envelope(api.get("/api/v1/nowhere/"), 404, "NOT_FOUND")
    assert_envelope(api.get("/api/v2/instances/"), 404, "NOT_FOUND")
    assert_envelope(APIClient().get("/api/nothing-here"), 404, "NOT_FOUND")


def test_unknown_tool_at_create_is_refused_as_invalid_input(api):
    response = api.post("/api/v1/instances/", {"tool_definition_id": "no-such-tool", "name": "x"}, format="json")

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert "tool_definition_id" in body["metadata"]["field_errors"]


def test_create_without_a_name_names_the_missing_field(api):
    response = api.post("/api/v1/instances/", {"tool_definition_id": "json-transform"}, format="json")

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert body["metadata"]["field_errors"] == {"name": ["This field is required."]}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/v1/instances/{instance}/execute-sync"),
        ("delete", "/api/v1/executions/{execution}/"),
        ("put", "/api/v1/executions/{execution}/"),
        ("post", "/api/v1/executions/"),
        ("post", "/api/v1/tools/"),
        ("get", "/api/v1/instances/{instance}/activate"),
        ("post", "/api/v1/instances/{instance}/validate-execution"),
    ],
)
def test_wrong_method_answers_method_not_allowed(api, make_instance, user, method, path):
    instance = make_instance(owner=user)
    run = execute(api, instance, {"expression": "a", "data": {}}).json()
    url = path.format(instance=instance.pk, execution=run["execution_id"])

    response = getattr(api, method)(url)

    body = assert_envelope(response, 405, "METHOD_NOT_ALLOWED")
    assert method.upper() in body["error_message"]
    assert Execution.objects.filter(owner=user).count() == 1


@pytest.mark.redis
def test_too_many_requests_answer_throttled_with_when_to_retry(api, settings):
    rates = {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "2/min"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}

    assert api.get("/api/v1/instances/").status_code == 200
    assert api.get("/api/v1/tools/").status_code == 200
    response = api.get("/api/v1/instances/")

    body = assert_envelope(response, 429, "THROTTLED", can_retry=True)
    wait = body["metadata"]["retry_after_seconds"]
    assert isinstance(wait, int) and 0 < wait <= 60
    assert response["Retry-After"] == str(wait)
    assert f"{wait} seconds" in body["error_message"]


@pytest.mark.redis
def test_repeated_sign_in_attempts_are_throttled(db, user, settings):
    rates = {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "auth": "2/min"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    client = APIClient()
    attempt = {"username": user.username, "password": "guess"}

    client.post("/api/v1/auth/token/", attempt, format="json")
    client.post("/api/v1/auth/token/", attempt, format="json")
    response = client.post("/api/v1/auth/token/", {**attempt, "password": "correct horse battery staple"})

    body = assert_envelope(response, 429, "THROTTLED", can_retry=True)
    assert body["metadata"]["retry_after_seconds"] > 0
    assert response["Retry-After"] == str(body["metadata"]["retry_after_seconds"])
    assert "token" not in body


class _BrokenView(APIView):
    """Fails the way a bug would: the global exception handler must still answer."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes: list = []

    def get(self, request: Any) -> Response:
        raise RuntimeError("database password hunter2 at /srv/toolexec/executions/services.py line 42")


def test_unhandled_exception_answers_internal_error_without_a_traceback(db):
    request = APIRequestFactory().get("/api/v1/broken/")

    response = _BrokenView.as_view()(request)
    response.render()

    body = assert_envelope(response, 500, "INTERNAL_ERROR", can_retry=True)
    text = response.content.decode()
    assert "hunter2" not in text
    assert "RuntimeError" not in text
    assert body["error_message"] == "Something went wrong on our side. The error was logged; please try again."


def test_no_error_response_contains_a_traceback_or_a_path(api, make_instance, user, settings):
    """A sweep over every error the flow produces."""
    settings.TOOLEXEC_SYNC_TIMEOUT_SECONDS = 1
    responses = [
        execute(api, make_instance("test-exploding", owner=user), {}),
        execute(api, make_instance("test-upstream-failing", owner=user), {}),
        execute(api, make_instance("test-slow", owner=user), {"seconds": 5}),
        execute(api, make_instance("test-async-only", owner=user), {}),
        execute(api, make_instance("test-google-sheet", owner=user), {}),
        execute(api, make_instance(owner=user), {"expression": "a.[", "data": {}}),
        execute(api, make_instance(owner=user), {"nope": 1}),
        api.post("/api/v1/instances/", "{oops", content_type="application/json"),
        api.get("/api/v1/nowhere/"),
        api.get("/api/v1/instances/not-a-uuid/"),
        APIClient().get("/api/v1/executions/"),
    ]
    for response in responses:
        assert_no_leak(response)
        assert response.json()["success"] is False


# --- Requests that answered 500 before issue 19 -----------------------------------------


def test_json_nested_too_deeply_is_refused_as_invalid_input(api, make_instance, user):
    instance = make_instance("test-noop", owner=user)
    for depth in (101, 100_000):  # past the limit; past Python's recursion limit
        body = "[" * depth + "]" * depth
        url = f"/api/v1/instances/{instance.pk}/execute-sync"
        response = api.generic("POST", url, body, content_type="application/json")
        assert "nested more than 100 levels" in assert_envelope(response, 400, "INPUT_INVALID")["error_message"]
    assert nothing_recorded(user)


def test_a_form_with_more_fields_than_the_server_reads_is_refused_as_invalid_input(api, settings):
    body = "&".join(f"field{n}=1" for n in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))
    response = api.generic("POST", "/api/v1/instances/", body, content_type="application/x-www-form-urlencoded")
    assert_envelope(response, 400, "INPUT_INVALID")


@pytest.mark.parametrize(
    ("path", "parameter"),
    [("/api/v1/instances/", "workflow_id"), ("/api/v1/credentials/", "provider"), ("/api/v1/executions/", "status")],
)
def test_a_nul_character_in_a_list_filter_answers_400_naming_the_filter(api, path, parameter):
    body = assert_envelope(api.get(path, {parameter: "a\x00b"}), 400, "INPUT_INVALID")
    assert list(body["metadata"]["field_errors"]) == [parameter]


def test_a_nul_character_in_the_idempotency_key_answers_400_naming_the_header(api, make_instance, user):
    instance = make_instance("test-noop", owner=user)
    url = f"/api/v1/instances/{instance.pk}/execute-async"
    response = api.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="a\x00b")
    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert list(body["metadata"]["field_errors"]) == ["Idempotency-Key"]
    assert nothing_recorded(user)


def test_the_last_day_a_date_can_name_filters_the_history(api, user):
    assert api.get("/api/v1/executions/", {"date": "9999-12-31"}).json()["results"] == []
    page = Client()
    page.force_login(user)
    assert page.get("/status/executions/", {"date": "9999-12-31"}).status_code == 200


@pytest.mark.parametrize("position", ["garbage", "2020-01-01T00:00:00", "2020-13-45T00:00:00Z"])
def test_a_cursor_whose_position_is_not_a_time_with_its_zone_is_refused(api, position):
    cursor = base64.b64encode(f"o=0&r=1&p={position}".encode()).decode()
    body = assert_envelope(api.get("/api/v1/executions/", {"cursor": cursor}), 400, "INPUT_INVALID")
    assert list(body["metadata"]["field_errors"]) == ["cursor"]


class _OrmRefusalView(_BrokenView):
    def get(self, request: Any) -> Response:
        raise DjangoValidationError({"instance": ["“0000” is not a valid UUID."]})


def test_a_value_the_orm_refuses_answers_400_naming_the_field(db):
    response = _OrmRefusalView.as_view()(APIRequestFactory().get("/api/v1/broken/"))
    response.render()

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert body["metadata"]["field_errors"] == {"instance": ["“0000” is not a valid UUID."]}


# --- action items link to the API by route name ----------------------------------------


def test_action_item_links_are_built_from_the_routes_they_name():
    """The catalog names routes (core.errors.Route), not paths: a link follows the URLconf."""
    instance_id = "6f1c2b3a-0000-4000-8000-000000000001"

    body = envelope(ErrorCode.MODE_NOT_SUPPORTED, {"instance_id": instance_id, "other_mode": "async"})
    activate = envelope(ErrorCode.INSTANCE_DISABLED, {"instance_id": instance_id})

    assert body["metadata"]["action_items"][0]["url"] == (
        f"{BASE_URL}{reverse('instance-run-execute-async', kwargs={'pk': instance_id})}"
    )
    assert activate["metadata"]["action_items"][0]["url"] == f"{BASE_URL}/api/v1/instances/{instance_id}/activate"


def test_an_action_item_whose_params_name_no_route_comes_without_a_link():
    body = envelope(
        ErrorCode.MODE_NOT_SUPPORTED, {"instance_id": "6f1c2b3a-0000-4000-8000-000000000001", "other_mode": "batch"}
    )

    item = body["metadata"]["action_items"][0]
    assert "url" not in item and item["message"]


def test_an_action_item_without_the_instance_it_links_to_comes_without_a_link():
    body = envelope(ErrorCode.INSTANCE_DISABLED, {})

    assert [("url" in item) for item in body["metadata"]["action_items"]] == [False]


def test_errors_carry_numbers_and_the_catalog_says_them_in_words():
    short = envelope(
        ErrorCode.INSUFFICIENT_CREDITS, {"tool": "JSON Transform", "needed": Decimal("0.0100"), "balance": Decimal("2")}
    )
    assert short["error_message"] == (
        "You do not have enough credits to run JSON Transform: a run costs at least 0.01 and your balance is 2."
    )
    too_large = envelope(ErrorCode.FILE_TOO_LARGE, {"limit": 50 * 1024 * 1024}, metadata={"max_bytes": 52428800})
    assert too_large["error_message"] == "This file is too large: uploads may be at most 50 MB."
    assert too_large["metadata"]["max_bytes"] == 52428800
    # Words already given pass through as they are.
    assert envelope(ErrorCode.FILE_TOO_LARGE, {"limit": "1 KB"})["error_message"].endswith("at most 1 KB.")
