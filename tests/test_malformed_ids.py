"""A malformed id answers like an id that does not exist (issue 19): 404 NOT_FOUND in a path,
400 INPUT_INVALID naming the field in a query or a body, the site's 404 page on a status page.
Never a 500.

Every route with an id is in the tables below, and the tables are checked against the live
routes (the OpenAPI schema, the status pages' URLconf), so a new route cannot be left out.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from core.api import not_found_envelope
from executions import page_urls
from tests.tools import GoogleSheetTool, NoopTool

MALFORMED = [
    "0" * 36,
    "-" * 36,
    "not-a-uuid",
    "12345",
    f"{uuid.UUID(int=1)}0",  # one digit too many
    "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
    "%C3%BC",  # "ü", percent-encoded as a client sends it
]

# Every API operation whose path names an object. {tool} is a slug; the others are UUIDs.
API_ROUTES = [
    ("get", "/api/v1/tools/{tool}/"),
    ("get", "/api/v1/instances/{instance}/"),
    ("put", "/api/v1/instances/{instance}/"),
    ("patch", "/api/v1/instances/{instance}/"),
    ("delete", "/api/v1/instances/{instance}/"),
    ("post", "/api/v1/instances/{instance}/activate/"),
    ("post", "/api/v1/instances/{instance}/disable/"),
    ("post", "/api/v1/instances/{instance}/configure-credentials/"),
    ("delete", "/api/v1/instances/{instance}/cache/"),
    ("get", "/api/v1/instances/{instance}/capabilities/"),
    ("get", "/api/v1/instances/{instance}/validate-execution/"),
    ("post", "/api/v1/instances/{instance}/execute-sync/"),
    ("post", "/api/v1/instances/{instance}/execute-async/"),
    ("get", "/api/v1/instances/{instance}/jobs/"),
    ("get", "/api/v1/instances/{instance}/jobs/{job}/"),
    ("get", "/api/v1/instances/{instance}/jobs/{job}/progress/"),
    ("get", "/api/v1/instances/{instance}/jobs/{job}/result/"),
    ("post", "/api/v1/instances/{instance}/jobs/{job}/cancel/"),
    ("get", "/api/v1/instances/{instance}/jobs/{job}/events/"),
    ("get", "/api/v1/credentials/{credential}/"),
    ("put", "/api/v1/credentials/{credential}/"),
    ("patch", "/api/v1/credentials/{credential}/"),
    ("delete", "/api/v1/credentials/{credential}/"),
    ("get", "/api/v1/files/{file}/"),
    ("delete", "/api/v1/files/{file}/"),
    ("get", "/api/v1/executions/{execution}/"),
    ("get", "/api/v1/workflows/{workflow}/"),
    ("patch", "/api/v1/workflows/{workflow}/"),
    ("delete", "/api/v1/workflows/{workflow}/"),
    ("get", "/api/v1/workflows/{workflow}/validate/"),
    ("post", "/api/v1/workflows/{workflow}/runs/"),
    ("get", "/api/v1/workflows/{workflow}/versions/"),
    ("post", "/api/v1/workflows/{workflow}/versions/"),
    ("get", "/api/v1/workflow-runs/{run}/"),
    ("post", "/api/v1/workflow-runs/{run}/cancel/"),
    ("post", "/api/v1/workflow-runs/{run}/retry/"),
    ("get", "/api/v1/workflow-runs/{run}/events/"),
]

PAGE_ROUTES = [
    ("get", "/status/executions/{execution}/"),
    ("get", "/status/instances/{instance}/"),
    ("get", "/status/jobs/{job}/"),
    ("get", "/status/jobs/{job}/fragment/"),
    ("get", "/status/jobs/{job}/events/"),
    ("post", "/status/jobs/{job}/cancel/"),
]

PLACEHOLDER = re.compile(r"{(\w+)}")


def _cases(routes: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(method, route, the placeholder made malformed): each id of each route in turn."""
    return [(method, route, slot) for method, route in routes for slot in PLACEHOLDER.findall(route)]


def _fill(route: str, ids: dict[str, str], malformed_slot: str, value: str) -> str:
    return PLACEHOLDER.sub(lambda m: value if m.group(1) == malformed_slot else ids[m.group(1)], route)


@pytest.fixture
def ids(api: APIClient, catalog: Any) -> dict[str, str]:
    """One object of each kind, owned by ``api``'s user, made through the API."""
    instance = api.post(
        "/api/v1/instances/", {"tool_definition_id": NoopTool.slug, "name": "real"}, format="json"
    ).json()["id"]
    accepted = api.post(f"/api/v1/instances/{instance}/execute-async", {"echo": "hi"}, format="json").json()
    credential = api.post(
        "/api/v1/credentials/",
        {"provider": "google", "kind": "oauth2", "label": "real", "secret": {"access_token": "t"}},
        format="json",
    ).json()["id"]
    upload = SimpleUploadedFile("people.csv", b"name\nAda\n", "text/csv")
    file = api.post("/api/v1/files/", {"file": upload}, format="multipart").json()["id"]
    definition = {"steps": [{"id": "a", "instance": instance, "inputs": {"echo": "hi"}}]}
    workflow = api.post(
        "/api/v1/workflows/", {"key": "real", "name": "real", "definition": definition}, format="json"
    ).json()["id"]
    run = api.post(f"/api/v1/workflows/{workflow}/runs", {}, format="json").json()["run_id"]
    return {
        "tool": NoopTool.slug,
        "instance": instance,
        "job": accepted["job_id"],
        "execution": accepted["execution_id"],
        "credential": credential,
        "file": file,
        "workflow": workflow,
        "run": run,
    }


def test_the_tables_hold_every_route_with_an_id() -> None:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    api_operations = {
        (method, re.sub(r"{\w+}", "{}", path))
        for path, operations in schema["paths"].items()
        if "{" in path
        for method in operations
    }
    assert {(method, PLACEHOLDER.sub("{}", route)) for method, route in API_ROUTES} == api_operations

    page_routes = {
        "/status/" + re.sub(r"<\w+:\w+>", "{}", str(pattern.pattern))
        for pattern in page_urls.urlpatterns
        if "<" in str(pattern.pattern)
    }
    assert {PLACEHOLDER.sub("{}", route) for _, route in PAGE_ROUTES} == page_routes


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "route", "slot"), _cases(API_ROUTES))
def test_a_malformed_id_in_an_api_path_answers_404_not_found(
    api: APIClient, ids: dict[str, str], method: str, route: str, slot: str
) -> None:
    for value in MALFORMED:
        path = _fill(route, ids, slot, value)
        for variant in (path, path.rstrip("/")):  # DESIGN.md's paths come with and without the slash
            response = getattr(api, method)(variant, {}, format="json")
            assert response.status_code == 404, (method, variant, response.content)
            assert response["Content-Type"] == "application/json"
            assert response.json() == not_found_envelope()


@pytest.mark.django_db
def test_the_issues_two_examples_answer_404_not_found(api: APIClient) -> None:
    zeros = "0" * 36
    for method, path in (
        ("get", f"/api/v1/instances/{zeros}/jobs/{zeros}/result/"),
        ("post", "/api/v1/instances/not-a-uuid/jobs/not-a-uuid/cancel/"),
    ):
        response = getattr(api, method)(path)
        assert response.status_code == 404
        assert response.json() == not_found_envelope()


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "route", "slot"), _cases(PAGE_ROUTES))
def test_a_malformed_id_in_a_status_page_path_answers_the_sites_404_page(
    user: Any, ids: dict[str, str], method: str, route: str, slot: str
) -> None:
    client = Client()
    client.force_login(user)
    absent = getattr(client, method)(_fill(route, ids, slot, str(uuid.uuid4())))
    assert absent.status_code == 404
    for value in MALFORMED:
        response = getattr(client, method)(_fill(route, ids, slot, value))
        assert response.status_code == 404, (route, value)
        assert response["Content-Type"].startswith("text/html")
        assert response.content == absent.content  # the site's 404 page, as for an id that is not there


@pytest.mark.django_db
@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_id_in_a_query_filter_answers_400_naming_the_field(
    api: APIClient, ids: dict[str, str], value: str
) -> None:
    response = api.get("/api/v1/executions/", {"instance": value})
    body = _input_invalid(response)
    assert list(body["metadata"]["field_errors"]) == ["instance"]


@pytest.mark.django_db
def test_a_malformed_id_in_the_history_pages_filter_is_reported_and_left_out(user: Any, ids: dict[str, str]) -> None:
    client = Client()
    client.force_login(user)
    response = client.get("/status/executions/", {"instance": "0" * 36})
    assert response.status_code == 200
    assert b"instance: Enter a valid UUID." in response.content
    assert f"/status/instances/{ids['instance']}/".encode() in response.content  # left out, not applied


@pytest.mark.django_db
@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_credential_id_in_credential_mappings_answers_400_naming_the_slot(
    api: APIClient, catalog: Any, value: str
) -> None:
    instance = api.post(
        "/api/v1/instances/", {"tool_definition_id": GoogleSheetTool.slug, "name": "sheet"}, format="json"
    ).json()["id"]
    response = api.post(
        f"/api/v1/instances/{instance}/configure-credentials",
        {"credential_mappings": {"OAUTH_TOKEN": value}},
        format="json",
    )
    body = _input_invalid(response)
    assert list(body["metadata"]["field_errors"]) == ["credential_mappings.OAUTH_TOKEN"]


@pytest.mark.django_db
@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_tool_or_file_id_in_a_body_answers_400_naming_the_field(
    api: APIClient, catalog: Any, value: str
) -> None:
    response = api.post("/api/v1/instances/", {"tool_definition_id": value, "name": "x"}, format="json")
    assert list(_input_invalid(response)["metadata"]["field_errors"]) == ["tool_definition_id"]

    reader = api.post(
        "/api/v1/instances/", {"tool_definition_id": "spreadsheet-reader", "name": "reader"}, format="json"
    ).json()["id"]
    response = api.post(f"/api/v1/instances/{reader}/execute-sync", {"file_id": value}, format="json")
    assert list(_input_invalid(response)["metadata"]["field_errors"]) == ["file_id"]


def _input_invalid(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.content
    body = response.json()
    assert (body["success"], body["error_code"]) == (False, "INPUT_INVALID")
    return body
