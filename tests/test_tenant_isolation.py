"""Every object belongs to an owner (DESIGN.md §8): another user's id answers 404 in the
envelope, exactly like an id that does not exist, and changes nothing; lists show only one's
own objects."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from credits.models import CreditAccount, CreditLedgerEntry
from executions.models import CacheEntry, Execution
from instances.models import Credential, ToolInstance
from instances.services.credentials import credential_create

pytestmark = pytest.mark.django_db

ABSENT_ID = "0b8f1c1e-2f1a-4c52-9a57-2f4f1f0e9d11"


# --- helpers ----------------------------------------------------------------------------


def run(client: APIClient, instance_id: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/api/v1/instances/{instance_id}/execute-sync", inputs, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def world_of(owner: Any) -> dict[str, Any]:
    """Everything an API call could change for ``owner``, read fresh from the database."""
    return {
        "instances": list(ToolInstance.objects.filter(owner=owner).order_by("pk").values()),
        "executions": list(Execution.objects.filter(owner=owner).order_by("pk").values()),
        "credentials": list(Credential.objects.filter(owner=owner).order_by("pk").values()),
        "balance": list(CreditAccount.objects.filter(owner=owner).values_list("balance", flat=True)),
        "ledger": list(CreditLedgerEntry.objects.filter(account__owner=owner).order_by("pk").values()),
        "cache_entries": list(CacheEntry.objects.filter(owner=owner).order_by("pk").values()),
    }


def assert_not_found(response: Any) -> None:
    assert response.status_code == 404, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "NOT_FOUND"
    assert body["error_message"]
    assert body["metadata"]["action_items"] == []
    assert isinstance(body["metadata"]["can_retry"], bool)


@pytest.fixture
def theirs(other_api, other_user, make_instance) -> dict[str, str]:
    """Another user's instance (run once), a draft of theirs, their credential."""
    instance = make_instance(owner=other_user, workflow_id="their-workflow", name="theirs")
    draft = make_instance("test-google-sheet", owner=other_user, workflow_id="their-workflow", name="their draft")
    execution = run(other_api, instance.pk, {"expression": "a", "data": {"a": "their data"}})
    credential = credential_create(
        owner=other_user, provider="google", kind="oauth2", secret={"access_token": "ya29.theirs"}
    )
    return {
        "instance": str(instance.pk),
        "draft": str(draft.pk),
        "execution": execution["execution_id"],
        "credential": str(credential.pk),
    }


# (method, path, body): every endpoint that takes an id.
ID_ENDPOINTS = [
    ("get", "/api/v1/instances/{instance}/", None),
    ("put", "/api/v1/instances/{instance}/", {"name": "hijacked", "workflow_id": "mine", "config": {}}),
    ("patch", "/api/v1/instances/{instance}/", {"name": "hijacked"}),
    ("delete", "/api/v1/instances/{instance}/", None),
    ("post", "/api/v1/instances/{instance}/disable", None),
    ("post", "/api/v1/instances/{draft}/activate", None),
    ("post", "/api/v1/instances/{instance}/activate", None),
    ("get", "/api/v1/instances/{instance}/capabilities", None),
    ("get", "/api/v1/instances/{instance}/validate-execution", None),
    ("post", "/api/v1/instances/{instance}/execute-sync", {"expression": "a", "data": {"a": 1}}),
    ("post", "/api/v1/instances/{draft}/configure-credentials", {"credential_mappings": {"OAUTH_TOKEN": "google"}}),
    ("delete", "/api/v1/instances/{instance}/cache", None),
    ("get", "/api/v1/executions/{execution}/", None),
    ("get", "/api/v1/credentials/{credential}/", None),
    ("patch", "/api/v1/credentials/{credential}/", {"label": "hijacked"}),
    ("delete", "/api/v1/credentials/{credential}/", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ID_ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ID_ENDPOINTS])
def test_another_users_object_answers_not_found_and_changes_nothing(api, user, other_user, theirs, method, path, body):
    before_theirs, before_mine = world_of(other_user), world_of(user)

    response = getattr(api, method)(path.format(**theirs), body, format="json")

    assert_not_found(response)
    assert "their data" not in response.content.decode()
    assert world_of(other_user) == before_theirs
    assert world_of(user) == before_mine


@pytest.mark.parametrize(("method", "path", "body"), ID_ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ID_ENDPOINTS])
def test_another_users_object_is_indistinguishable_from_an_absent_one(api, theirs, method, path, body):
    absent = {key: ABSENT_ID for key in theirs}

    foreign = getattr(api, method)(path.format(**theirs), body, format="json")
    missing = getattr(api, method)(path.format(**absent), body, format="json")

    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == missing.json()


def test_owner_still_reaches_the_objects_others_were_refused(other_api, theirs):
    assert other_api.get(f"/api/v1/instances/{theirs['instance']}/").status_code == 200
    assert other_api.get(f"/api/v1/executions/{theirs['execution']}/").status_code == 200
    assert other_api.get(f"/api/v1/credentials/{theirs['credential']}/").status_code == 200
    assert run(other_api, theirs["instance"], {"expression": "a", "data": {"a": 2}})["success"] is True


def test_instance_list_shows_only_ones_own_instances(api, user, make_instance, theirs):
    mine = make_instance(owner=user, workflow_id="their-workflow", name="mine")

    listed = [i["id"] for i in api.get("/api/v1/instances/").json()["results"]]
    by_workflow = [i["id"] for i in api.get("/api/v1/instances/", {"workflow_id": "their-workflow"}).json()["results"]]
    drafts = api.get("/api/v1/instances/", {"status": "DRAFT"}).json()["results"]

    assert listed == [str(mine.pk)]
    assert by_workflow == [str(mine.pk)]
    assert drafts == []


def test_execution_list_shows_only_ones_own_runs(api, user, make_instance, theirs):
    mine = make_instance(owner=user)
    my_run = run(api, mine.pk, {"expression": "a", "data": {}})

    listed = [e["id"] for e in api.get("/api/v1/executions/").json()["results"]]
    theirs_by_instance = api.get("/api/v1/executions/", {"instance": theirs["instance"]})

    assert listed == [my_run["execution_id"]]
    assert theirs_by_instance.status_code == 200
    assert theirs_by_instance.json()["results"] == []


def test_credential_list_shows_only_ones_own_credentials(api, user, theirs):
    mine = credential_create(owner=user, provider="google", kind="oauth2", secret={"access_token": "ya29.mine"})

    listed = [c["id"] for c in api.get("/api/v1/credentials/").json()["results"]]

    assert listed == [str(mine.pk)]


def test_mapping_another_users_credential_is_refused_as_if_it_did_not_exist(api, user, make_instance, theirs):
    mine = make_instance("test-google-sheet", owner=user)

    response = api.post(
        f"/api/v1/instances/{mine.pk}/configure-credentials",
        {"credential_mappings": {"OAUTH_TOKEN": theirs["credential"]}},
        format="json",
    )

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["error_code"] == "INPUT_INVALID"
    assert body["metadata"]["field_errors"] == {
        "credential_mappings.OAUTH_TOKEN": ["You have no credential with this id."]
    }
    mine.refresh_from_db()
    assert mine.credential_mappings == {}
    assert mine.status == ToolInstance.Status.DRAFT


def test_a_provider_mapping_never_resolves_to_another_users_credential(api, user, make_instance, theirs):
    """They have a Google account connected; I map my slot to "google" without one of my own."""
    mine = make_instance("test-google-sheet", owner=user)
    api.post(
        f"/api/v1/instances/{mine.pk}/configure-credentials",
        {"credential_mappings": {"OAUTH_TOKEN": "google"}},
        format="json",
    )

    response = api.post(f"/api/v1/instances/{mine.pk}/execute-sync", {"file_id": "abc"}, format="json")

    assert response.status_code == 409, response.content
    assert response.json()["error_code"] == "CREDENTIAL_MISSING"
    assert "ya29.theirs" not in response.content.decode()
    assert not Execution.objects.filter(owner=user).exists()
