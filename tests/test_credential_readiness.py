"""Credential mappings, the credential checks of readiness, and credentials at run time.

configure-credentials maps a tool's slots to a provider key (resolved at run time to the
owner's newest ACTIVE credential of it) or to a credential id (pinned). Readiness then checks
every required slot: mapped, the credential exists, is the owner's, is ACTIVE and not expired
(or expired but refreshable). At run time the tool gets the decrypted secret, and a tool that
says the credential is expired, revoked or invalid moves it to that status.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from core.errors import ErrorCode, envelope
from instances.models import Credential, ToolInstance
from tools import registry
from tools.errors import CredentialExpired, CredentialInvalid, CredentialRevoked
from tools.sdk import SYNC, CredentialSlot, ExecutionContext, Tool
from tools.services import catalog_sync

pytestmark = pytest.mark.django_db

EXPIRED_GOOGLE_MESSAGE = "Your Google account access for Google Drive Reader has expired and needs to be renewed."


# --- test-only tools --------------------------------------------------------------------


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class SecretDigestTool(Tool):
    """Answers a digest of the secret it was given, so a test can tell which one it was."""

    slug = "test-secret-digest"
    name = "Google Secret Digest"
    credential_slots = (CredentialSlot("OAUTH_TOKEN", provider="google", kind="oauth2"),)
    modes = frozenset({SYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        return {"digest": digest(ctx.credential("OAUTH_TOKEN"))}


class CredentialFailingTool(Tool):
    """Says the Google credential it was given is expired, revoked or invalid."""

    slug = "test-credential-failing"
    name = "Google Sheets Writer"
    input_schema = {"type": "object", "properties": {"failure": {"enum": ["expired", "revoked", "invalid"]}}}
    credential_slots = (CredentialSlot("OAUTH_TOKEN", provider="google", kind="oauth2"),)
    modes = frozenset({SYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        ctx.credential("OAUTH_TOKEN")
        error = {"expired": CredentialExpired, "revoked": CredentialRevoked, "invalid": CredentialInvalid}
        raise error[inputs.get("failure", "expired")]("Google answered 401 invalid_grant", provider="google")


class BearerOnlyTool(Tool):
    """Takes an HTTP credential of kind bearer only."""

    slug = "test-bearer-only"
    name = "Status Page Poster"
    credential_slots = (CredentialSlot("API_TOKEN", provider="http", kind="bearer"),)
    modes = frozenset({SYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        return {"ok": bool(ctx.credential("API_TOKEN"))}


EXTRA_TOOLS = [SecretDigestTool, CredentialFailingTool, BearerOnlyTool]


@pytest.fixture
def tools_here(catalog):
    for tool in EXTRA_TOOLS:
        registry.register(tool)
    catalog_sync()
    yield catalog
    for tool in EXTRA_TOOLS:
        registry.unregister(tool.slug)


# --- helpers ----------------------------------------------------------------------------


def create_credential(api: APIClient, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "provider": "google",
        "kind": "oauth2",
        "label": "Google",
        "secret": {"access_token": secrets.token_urlsafe(24)},
    }
    body.update(overrides)
    response = api.post("/api/v1/credentials/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def create_instance(api: APIClient, tool: str = "test-google-sheet", name: str = "Drive import") -> dict[str, Any]:
    response = api.post(
        "/api/v1/instances/", {"tool_definition_id": tool, "workflow_id": "wf-1", "name": name}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


def configure(api: APIClient, instance_id: str, mappings: Any) -> Any:
    return api.post(
        f"/api/v1/instances/{instance_id}/configure-credentials", {"credential_mappings": mappings}, format="json"
    )


def validate(api: APIClient, instance_id: str) -> dict[str, Any]:
    response = api.get(f"/api/v1/instances/{instance_id}/validate-execution")
    assert response.status_code == 200, response.content
    return response.json()


def execute(api: APIClient, instance_id: str, inputs: dict[str, Any] | None = None) -> Any:
    return api.post(f"/api/v1/instances/{instance_id}/execute-sync", inputs or {}, format="json")


def credential_check(readiness: dict[str, Any], slot: str = "OAUTH_TOKEN") -> dict[str, Any]:
    return next(check for check in readiness["checks"] if check["name"] == f"credential:{slot}")


def reconnect_item(url: str) -> dict[str, str]:
    return {
        "action": "fix_credential",
        "message": "Click the link below to reconnect your Google account",
        "url": url,
        "priority": "high",
    }


def assert_reconnect_url_names(url: str, credential_id: str) -> None:
    assert settings.TOOLEXEC_BASE_URL == "https://toolexec.test"
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "toolexec.test"), url
    assert url.startswith(settings.TOOLEXEC_BASE_URL + "/")
    assert credential_id in url


def expired(**overrides: Any) -> dict[str, Any]:
    return {"expires_at": (timezone.now() - timedelta(hours=1)).isoformat(), **overrides}


# --- configure-credentials --------------------------------------------------------------


def test_instance_of_a_tool_needing_a_credential_is_a_draft_until_its_slot_is_mapped(api, catalog):
    create_credential(api)
    instance = create_instance(api)
    assert instance["status"] == "DRAFT"
    draft = validate(api, instance["id"])
    assert draft["is_ready"] is False
    assert draft["error_code"] == "CREDENTIAL_MISSING"

    response = configure(api, instance["id"], {"OAUTH_TOKEN": "google"})

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "ACTIVE"
    assert response.json()["credential_mappings"] == {"OAUTH_TOKEN": "google"}
    row = ToolInstance.objects.get(pk=instance["id"])
    assert (row.status, row.credential_mappings) == ("ACTIVE", {"OAUTH_TOKEN": "google"})
    ready = validate(api, instance["id"])
    assert ready["is_ready"] is True, ready
    assert credential_check(ready)["passed"] is True


def test_a_credential_id_pins_that_credential(api, catalog):
    credential = create_credential(api)
    instance = create_instance(api)

    response = configure(api, instance["id"], {"OAUTH_TOKEN": credential["id"]})

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "ACTIVE"
    assert response.json()["credential_mappings"] == {"OAUTH_TOKEN": credential["id"]}
    assert validate(api, instance["id"])["is_ready"] is True


def _invalid_mapping(case: str, api: APIClient, other_api: APIClient) -> tuple[str, dict[str, Any], str]:
    """(tool slug, mappings, the field the 400 must name) for one refused mapping."""
    if case == "unknown slot":
        return "test-google-sheet", {"DRIVE_KEY": "google"}, "credential_mappings.DRIVE_KEY"
    if case == "provider the slot does not accept":
        return "test-google-sheet", {"OAUTH_TOKEN": "http"}, "credential_mappings.OAUTH_TOKEN"
    if case == "credential of another provider":
        http = create_credential(api, provider="http", kind="bearer", secret={"token": "t" * 20})
        return "test-google-sheet", {"OAUTH_TOKEN": http["id"]}, "credential_mappings.OAUTH_TOKEN"
    if case == "kind the slot does not accept":
        api_key = create_credential(api, provider="http", kind="api_key", secret={"api_key": "k" * 20})
        return "test-bearer-only", {"API_TOKEN": api_key["id"]}, "credential_mappings.API_TOKEN"
    if case == "unknown credential id":
        return "test-google-sheet", {"OAUTH_TOKEN": str(uuid.uuid4())}, "credential_mappings.OAUTH_TOKEN"
    if case == "another user's credential":
        theirs = create_credential(other_api)
        return "test-google-sheet", {"OAUTH_TOKEN": theirs["id"]}, "credential_mappings.OAUTH_TOKEN"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "unknown slot",
        "provider the slot does not accept",
        "credential of another provider",
        "kind the slot does not accept",
        "unknown credential id",
        "another user's credential",
    ],
)
def test_configure_credentials_refuses_with_400_naming_the_field_and_changes_nothing(api, other_api, tools_here, case):
    tool, mappings, field = _invalid_mapping(case, api, other_api)
    instance = create_instance(api, tool=tool)

    response = configure(api, instance["id"], mappings)

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["error_code"] == "INPUT_INVALID"
    assert list(body["metadata"]["field_errors"]) == [field], body
    row = ToolInstance.objects.get(pk=instance["id"])
    assert (row.status, row.credential_mappings) == ("DRAFT", {})


def test_another_users_credential_is_refused_without_touching_it_or_a_configured_instance(api, other_api, catalog):
    mine = create_credential(api)
    theirs = create_credential(other_api)
    instance = create_instance(api)
    assert configure(api, instance["id"], {"OAUTH_TOKEN": mine["id"]}).status_code == 200
    before = ToolInstance.objects.get(pk=instance["id"])
    their_row = Credential.objects.get(pk=theirs["id"])

    response = configure(api, instance["id"], {"OAUTH_TOKEN": theirs["id"]})

    assert response.status_code == 400, response.content
    assert "credential_mappings.OAUTH_TOKEN" in response.json()["metadata"]["field_errors"]
    after = ToolInstance.objects.get(pk=instance["id"])
    assert (after.status, after.credential_mappings, after.updated_at) == (
        "ACTIVE",
        {"OAUTH_TOKEN": mine["id"]},
        before.updated_at,
    )
    assert theirs["id"] not in api.get(f"/api/v1/instances/{instance['id']}/").content.decode()
    untouched = Credential.objects.get(pk=theirs["id"])
    assert (untouched.updated_at, untouched.last_used_at, untouched.status) == (
        their_row.updated_at,
        None,
        "ACTIVE",
    )


def test_configuring_someone_elses_instance_answers_404(api, other_api, catalog):
    instance = create_instance(api)
    theirs = create_credential(other_api)

    response = configure(other_api, instance["id"], {"OAUTH_TOKEN": theirs["id"]})

    assert response.status_code == 404
    row = ToolInstance.objects.get(pk=instance["id"])
    assert (row.status, row.credential_mappings) == ("DRAFT", {})


# --- readiness: expired, refreshable, revoked, not the owner's ----------------------------


@pytest.mark.parametrize("mapping", ["provider key", "credential id"])
def test_expired_google_token_asks_to_reconnect(api, catalog, mapping):
    credential = create_credential(api, **expired())  # no refresh token: cannot be refreshed
    instance = create_instance(api)
    value = "google" if mapping == "provider key" else credential["id"]
    assert configure(api, instance["id"], {"OAUTH_TOKEN": value}).status_code == 200

    readiness = validate(api, instance["id"])

    assert readiness["is_ready"] is False
    assert readiness["error_code"] == "CREDENTIAL_EXPIRED"
    assert readiness["error_message"] == EXPIRED_GOOGLE_MESSAGE
    [item] = readiness["action_items"]
    assert_reconnect_url_names(item["url"], credential["id"])
    assert item == reconnect_item(item["url"])
    check = credential_check(readiness)
    assert (check["passed"], check["error_code"], check["message"]) == (
        False,
        "CREDENTIAL_EXPIRED",
        EXPIRED_GOOGLE_MESSAGE,
    )

    response = execute(api, instance["id"], {"file_id": "abc"})

    assert response.status_code == 409, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "CREDENTIAL_EXPIRED"
    assert body["error_message"] == EXPIRED_GOOGLE_MESSAGE
    assert body["metadata"]["action_items"] == [reconnect_item(item["url"])]
    assert Credential.objects.get(pk=credential["id"]).last_used_at is None


def test_expired_oauth_credential_with_a_refresh_token_is_ready(api, catalog):
    credential = create_credential(
        api, **expired(secret={"access_token": secrets.token_urlsafe(24), "refresh_token": secrets.token_urlsafe(24)})
    )
    instance = create_instance(api)
    assert configure(api, instance["id"], {"OAUTH_TOKEN": "google"}).status_code == 200

    readiness = validate(api, instance["id"])

    assert readiness["is_ready"] is True, readiness
    assert credential_check(readiness)["passed"] is True
    response = execute(api, instance["id"], {"file_id": "abc"})
    assert response.status_code == 200, response.content
    assert response.json()["success"] is True
    assert Credential.objects.get(pk=credential["id"]).status == "ACTIVE"


@pytest.mark.parametrize("mapping", ["provider key", "credential id"])
def test_credential_revoked_after_configuration_makes_the_instance_not_ready(api, catalog, mapping):
    credential = create_credential(api)
    instance = create_instance(api)
    value = "google" if mapping == "provider key" else credential["id"]
    assert configure(api, instance["id"], {"OAUTH_TOKEN": value}).status_code == 200
    assert validate(api, instance["id"])["is_ready"] is True

    Credential.objects.filter(pk=credential["id"]).update(status=Credential.Status.REVOKED)

    readiness = validate(api, instance["id"])
    expected = envelope(ErrorCode.CREDENTIAL_REVOKED, {"tool": "Google Drive Reader", "provider": "Google"})
    assert readiness["is_ready"] is False
    assert readiness["error_code"] == "CREDENTIAL_REVOKED"
    assert readiness["error_message"] == expected["error_message"]
    assert "revoked" in readiness["error_message"]
    [item] = readiness["action_items"]
    assert_reconnect_url_names(item["url"], credential["id"])
    assert item == reconnect_item(item["url"])
    response = execute(api, instance["id"], {"file_id": "abc"})
    assert response.status_code == 409, response.content
    assert response.json()["error_code"] == "CREDENTIAL_REVOKED"
    assert response.json()["error_message"] == expected["error_message"]


def test_a_pinned_revoked_credential_is_not_replaced_by_another_active_one(api, catalog):
    pinned = create_credential(api)
    instance = create_instance(api)
    assert configure(api, instance["id"], {"OAUTH_TOKEN": pinned["id"]}).status_code == 200
    create_credential(api, label="a newer one")
    Credential.objects.filter(pk=pinned["id"]).update(status=Credential.Status.REVOKED)

    readiness = validate(api, instance["id"])

    assert readiness["is_ready"] is False
    assert readiness["error_code"] == "CREDENTIAL_REVOKED"


def test_deleted_credential_behind_a_provider_mapping_reads_as_missing(api, catalog):
    credential = create_credential(api)
    instance = create_instance(api)
    assert configure(api, instance["id"], {"OAUTH_TOKEN": "google"}).status_code == 200
    Credential.objects.filter(pk=credential["id"]).delete()  # e.g. by an operator in the admin

    readiness = validate(api, instance["id"])

    assert readiness["is_ready"] is False
    assert readiness["error_code"] == "CREDENTIAL_MISSING"
    assert credential_check(readiness)["passed"] is False


def test_a_mapping_to_someone_elses_credential_is_never_used(api, other_api, catalog):
    theirs = create_credential(other_api)
    instance = create_instance(api)
    # The API refuses this mapping; it can only come from outside it (an operator, old data).
    ToolInstance.objects.filter(pk=instance["id"]).update(
        credential_mappings={"OAUTH_TOKEN": theirs["id"]}, status=ToolInstance.Status.ACTIVE
    )

    readiness = validate(api, instance["id"])
    response = execute(api, instance["id"], {"file_id": "abc"})

    assert readiness["is_ready"] is False
    assert readiness["error_code"] == "CREDENTIAL_MISSING"
    assert response.status_code == 409, response.content
    assert response.json()["error_code"] == "CREDENTIAL_MISSING"
    assert Credential.objects.get(pk=theirs["id"]).last_used_at is None


# --- run time ---------------------------------------------------------------------------


def test_the_tool_gets_the_decrypted_secret_and_the_credential_is_marked_used(api, tools_here):
    secret = {"access_token": secrets.token_urlsafe(24), "refresh_token": secrets.token_urlsafe(24)}
    credential = create_credential(api, secret=secret)
    instance = create_instance(api, tool="test-secret-digest")
    assert configure(api, instance["id"], {"OAUTH_TOKEN": "google"}).status_code == 200
    before = timezone.now()

    response = execute(api, instance["id"])

    assert response.status_code == 200, response.content
    assert response.json()["data"] == {"digest": digest(secret)}
    used = Credential.objects.get(pk=credential["id"]).last_used_at
    assert used is not None and used >= before
    assert api.get(f"/api/v1/credentials/{credential['id']}/").json()["last_used_at"] is not None


def test_provider_key_resolves_to_the_most_recently_updated_active_credential(api, tools_here):
    older_secret = {"access_token": secrets.token_urlsafe(24)}
    newer_secret = {"access_token": secrets.token_urlsafe(24)}
    older = create_credential(api, label="older", secret=older_secret)
    newer = create_credential(api, label="newer", secret=newer_secret)
    revoked = create_credential(api, label="newest but revoked")
    Credential.objects.filter(pk=revoked["id"]).update(
        status=Credential.Status.REVOKED, updated_at=timezone.now() + timedelta(minutes=5)
    )
    create_credential(api, provider="http", kind="bearer", secret={"token": "t" * 20})  # another provider
    instance = create_instance(api, tool="test-secret-digest")
    assert configure(api, instance["id"], {"OAUTH_TOKEN": "google"}).status_code == 200

    first = execute(api, instance["id"])

    assert first.status_code == 200, first.content
    assert first.json()["data"] == {"digest": digest(newer_secret)}
    assert Credential.objects.get(pk=older["id"]).last_used_at is None
    assert Credential.objects.get(pk=newer["id"]).last_used_at is not None
    assert Credential.objects.get(pk=revoked["id"]).last_used_at is None

    # Updating the older one makes it the most recently updated.
    assert api.patch(f"/api/v1/credentials/{older['id']}/", {"label": "renewed"}, format="json").status_code == 200
    second = execute(api, instance["id"])

    assert second.json()["data"] == {"digest": digest(older_secret)}
    assert Credential.objects.get(pk=older["id"]).last_used_at is not None


def test_provider_key_never_resolves_to_another_users_newer_credential(api, other_api, tools_here):
    mine = {"access_token": secrets.token_urlsafe(24)}
    create_credential(api, secret=mine)
    theirs = create_credential(other_api)
    instance = create_instance(api, tool="test-secret-digest")
    assert configure(api, instance["id"], {"OAUTH_TOKEN": "google"}).status_code == 200

    response = execute(api, instance["id"])

    assert response.json()["data"] == {"digest": digest(mine)}
    assert Credential.objects.get(pk=theirs["id"]).last_used_at is None


@pytest.mark.parametrize(
    ("failure", "code", "status"),
    [
        ("expired", ErrorCode.CREDENTIAL_EXPIRED, Credential.Status.EXPIRED),
        ("revoked", ErrorCode.CREDENTIAL_REVOKED, Credential.Status.REVOKED),
        ("invalid", ErrorCode.CREDENTIAL_INVALID, Credential.Status.ERROR),
    ],
)
def test_a_tool_reporting_its_credential_bad_moves_the_credential_to_that_status(
    api, tools_here, failure, code, status
):
    credential = create_credential(api)
    instance = create_instance(api, tool="test-credential-failing", name="Write the sheet")
    assert configure(api, instance["id"], {"OAUTH_TOKEN": "google"}).status_code == 200

    with CaptureQueriesContext(connection) as queries:
        response = execute(api, instance["id"], {"failure": failure})

    params = {"tool": "Google Sheets Writer", "provider": "Google", "detail": "Google answered 401 invalid_grant"}
    expected = envelope(code, params)
    assert response.status_code == 200, response.content  # the tool ran and failed
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == code.value
    assert body["error_message"] == expected["error_message"]
    [item] = body["metadata"]["action_items"]
    assert_reconnect_url_names(item["url"], credential["id"])
    assert item == reconnect_item(item["url"])
    row = Credential.objects.get(pk=credential["id"])
    assert row.status == status
    assert row.last_error == "Google answered 401 invalid_grant"
    status_updates = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith('UPDATE "instances_credential"') and '"status" =' in q["sql"].split("WHERE")[0]
    ]
    assert len(status_updates) == 1, status_updates
    assert '"status"' in status_updates[0].split("WHERE", 1)[1], "the move is a conditional update"

    readiness = validate(api, instance["id"])
    assert readiness["is_ready"] is False
    assert readiness["error_code"] == code.value
    refused = execute(api, instance["id"], {"failure": failure})
    assert refused.status_code == 409
    assert refused.json()["error_code"] == code.value


def test_tool_raising_credential_expired_flips_the_credential_and_validate_says_not_ready(api, tools_here):
    credential = create_credential(api)
    instance = create_instance(api, tool="test-credential-failing", name="Write the sheet")
    assert configure(api, instance["id"], {"OAUTH_TOKEN": credential["id"]}).status_code == 200
    assert validate(api, instance["id"])["is_ready"] is True

    execute(api, instance["id"], {"failure": "expired"})

    assert api.get(f"/api/v1/credentials/{credential['id']}/").json()["status"] == "EXPIRED"
    readiness = validate(api, instance["id"])
    assert readiness["is_ready"] is False
    assert readiness["error_code"] == "CREDENTIAL_EXPIRED"
    assert readiness["error_message"] == (
        "Your Google account access for Google Sheets Writer has expired and needs to be renewed."
    )
    # A new secret puts it back in service.
    renewed = api.patch(
        f"/api/v1/credentials/{credential['id']}/",
        {"secret": {"access_token": secrets.token_urlsafe(24)}},
        format="json",
    )
    assert renewed.json()["status"] == "ACTIVE"
    assert validate(api, instance["id"])["is_ready"] is True


def test_a_revoked_credential_on_an_optional_slot_makes_the_instance_not_ready(api, make_instance, user):
    """http-request's AUTH slot is optional; once mapped, its credential must be usable."""
    created = api.post(
        "/api/v1/credentials/",
        {"provider": "http", "kind": "bearer", "label": "API", "secret": {"token": "tok-9f8e7d6c"}},
        format="json",
    ).json()
    instance = make_instance("http-request", owner=user)
    mapped = api.post(
        f"/api/v1/instances/{instance.pk}/configure-credentials",
        {"credential_mappings": {"AUTH": created["id"]}},
        format="json",
    )
    assert mapped.status_code == 200
    assert api.get(f"/api/v1/instances/{instance.pk}/validate-execution").json()["is_ready"] is True

    Credential.objects.filter(pk=created["id"]).update(status=Credential.Status.REVOKED)

    body = api.get(f"/api/v1/instances/{instance.pk}/validate-execution").json()
    assert body["is_ready"] is False
    assert body["error_code"] == "CREDENTIAL_REVOKED"
