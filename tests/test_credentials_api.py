"""The credentials API (DESIGN.md §3, §8): create, list, retrieve, update and delete credentials
of every kind over HTTP. Secrets are write-only (never echoed, not even partly; a fingerprint
tells two apart), a credential is private to its owner, and one that an instance uses cannot be
deleted."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from instances.models import Credential, ToolInstance

pytestmark = pytest.mark.django_db

URL = "/api/v1/credentials/"
PUBLIC_FIELDS = {
    "id",
    "provider",
    "kind",
    "label",
    "metadata",
    "expires_at",
    "status",
    "fingerprint",
    "last_used_at",
    "last_error",
    "created_at",
    "updated_at",
}


# --- helpers ----------------------------------------------------------------------------


def planted() -> str:
    """A secret value unlike anything else a response could contain."""
    return secrets.token_urlsafe(24)


def body_of_kind(kind: str) -> dict[str, Any]:
    bodies = {
        "oauth2": {
            "provider": "google",
            "kind": "oauth2",
            "label": "Work Google account",
            "secret": {"access_token": planted(), "refresh_token": planted()},
            "metadata": {"account_email": "me@example.com", "scopes": ["drive.readonly"]},
            "expires_at": (timezone.now() + timedelta(hours=1)).isoformat(),
        },
        "api_key": {
            "provider": "http",
            "kind": "api_key",
            "label": "Weather API",
            "secret": {"api_key": planted()},
            "metadata": {"header_name": "X-API-Key"},
        },
        "bearer": {"provider": "http", "kind": "bearer", "label": "Status page", "secret": {"token": planted()}},
        "basic": {
            "provider": "http",
            "kind": "basic",
            "label": "Legacy CRM",
            "secret": {"username": "svc-" + planted(), "password": planted()},
        },
    }
    return bodies[kind]


KINDS = ["oauth2", "api_key", "bearer", "basic"]


def assert_secret_absent(text: str | bytes, secret: dict[str, str]) -> None:
    """Not one value of ``secret``, nor any 8-character piece of one, occurs in ``text``."""
    if isinstance(text, bytes):
        text = text.decode()
    for name, value in secret.items():
        assert value not in text, f"secret.{name} was echoed"
        for start in range(len(value) - 7):
            piece = value[start : start + 8]
            assert piece not in text, f"a piece of secret.{name} ({piece!r}) was echoed"


def create(api: APIClient, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def create_google_sheet_instance(api: APIClient, name: str) -> dict[str, Any]:
    response = api.post(
        "/api/v1/instances/",
        {"tool_definition_id": "test-google-sheet", "workflow_id": "wf-1", "name": name},
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()


def configure(api: APIClient, instance_id: str, mappings: dict[str, Any]) -> Any:
    return api.post(
        f"/api/v1/instances/{instance_id}/configure-credentials", {"credential_mappings": mappings}, format="json"
    )


# --- create -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_create_each_kind_answers_201_with_the_credential_and_without_its_secret(api, user, kind):
    body = body_of_kind(kind)

    response = api.post(URL, body, format="json")

    assert response.status_code == 201, response.content
    created = response.json()
    assert set(created) == PUBLIC_FIELDS
    assert "secret" not in created
    assert created["provider"] == body["provider"]
    assert created["kind"] == kind
    assert created["label"] == body["label"]
    assert created["metadata"] == body.get("metadata", {})
    assert created["status"] == "ACTIVE"
    assert created["last_used_at"] is None
    assert created["last_error"] == ""
    assert isinstance(created["fingerprint"], str) and 6 <= len(created["fingerprint"]) <= 16
    assert_secret_absent(response.content, body["secret"])
    row = Credential.objects.get(pk=created["id"])
    assert row.owner == user
    assert row.reveal_secret() == body["secret"]


def test_api_key_credential_keeps_its_header_name_in_metadata(api):
    created = create(api, body_of_kind("api_key"))

    assert created["metadata"] == {"header_name": "X-API-Key"}
    assert Credential.objects.get(pk=created["id"]).metadata["header_name"] == "X-API-Key"


def test_oauth2_credential_keeps_its_expiry(api):
    expires = timezone.now().replace(microsecond=0) + timedelta(minutes=30)
    body = {**body_of_kind("oauth2"), "expires_at": expires.isoformat()}

    created = create(api, body)

    assert Credential.objects.get(pk=created["id"]).expires_at == expires
    assert created["expires_at"] is not None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"provider": "google", "kind": "oauth2", "secret": {"refresh_token": "x" * 20}}, "secret.access_token"),
        ({"provider": "http", "kind": "api_key", "secret": {"token": "x" * 20}}, "secret.api_key"),
        ({"provider": "http", "kind": "bearer", "secret": {}}, "secret.token"),
        ({"provider": "http", "kind": "basic", "secret": {"username": "svc"}}, "secret.password"),
        ({"provider": "http", "kind": "bearer", "secret": "not an object"}, "secret"),
        ({"provider": "google", "kind": "api_key", "secret": {"api_key": "x" * 20}}, "kind"),
        ({"provider": "nowhere", "kind": "bearer", "secret": {"token": "x" * 20}}, "provider"),
        ({"provider": "http", "kind": "telepathy", "secret": {"token": "x" * 20}}, "kind"),
        (
            {"provider": "http", "kind": "api_key", "secret": {"api_key": "k" * 20}, "metadata": {"header_name": ""}},
            "metadata.header_name",
        ),
    ],
)
def test_create_with_a_wrong_body_answers_400_naming_the_field(api, body, field):
    response = api.post(URL, body, format="json")

    assert response.status_code == 400, response.content
    payload = response.json()
    assert payload["error_code"] == "INPUT_INVALID"
    assert field in payload["metadata"]["field_errors"], payload
    assert not Credential.objects.exists()


def test_refused_secret_is_not_echoed_in_the_error(api):
    secret = {"token": planted(), "tokne": planted()}  # a typo'd field holding a real secret

    response = api.post(URL, {"provider": "http", "kind": "bearer", "secret": secret}, format="json")

    assert response.status_code == 400, response.content
    assert "secret.tokne" in response.json()["metadata"]["field_errors"]
    assert_secret_absent(response.content, secret)


def test_credentials_need_a_signed_in_user():
    response = APIClient().post(URL, body_of_kind("bearer"), format="json")

    assert response.status_code == 401
    assert not Credential.objects.exists()


# --- list and retrieve ------------------------------------------------------------------


def test_list_and_retrieve_show_every_kind_without_any_secret(api):
    bodies = {kind: body_of_kind(kind) for kind in KINDS}
    created = {kind: create(api, body) for kind, body in bodies.items()}

    listed = api.get(URL)

    assert listed.status_code == 200
    results = listed.json()["results"]
    assert {item["id"] for item in results} == {item["id"] for item in created.values()}
    assert all(set(item) == PUBLIC_FIELDS for item in results)
    for body in bodies.values():
        assert_secret_absent(listed.content, body["secret"])
    for kind, item in created.items():
        detail = api.get(f"{URL}{item['id']}/")
        assert detail.status_code == 200
        assert detail.json() == item
        assert_secret_absent(detail.content, bodies[kind]["secret"])


def test_fingerprints_tell_two_secrets_apart(api):
    first = create(api, {"provider": "http", "kind": "bearer", "secret": {"token": planted()}})
    second = create(api, {"provider": "http", "kind": "bearer", "secret": {"token": planted()}})
    same_token = planted()
    third = create(api, {"provider": "http", "kind": "bearer", "label": "a", "secret": {"token": same_token}})
    fourth = create(api, {"provider": "http", "kind": "bearer", "label": "b", "secret": {"token": same_token}})

    assert first["fingerprint"] != second["fingerprint"]
    assert third["fingerprint"] == fourth["fingerprint"]
    assert third["fingerprint"] not in (first["fingerprint"], second["fingerprint"])


# --- update -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_update_changes_label_secret_and_expiry_without_echoing_the_secret(api, kind):
    body = body_of_kind(kind)
    created = create(api, body)
    url = f"{URL}{created['id']}/"

    renamed = api.patch(url, {"label": "Renamed"}, format="json")
    assert renamed.status_code == 200, renamed.content
    assert renamed.json()["label"] == "Renamed"
    assert renamed.json()["fingerprint"] == created["fingerprint"]

    new_secret = body_of_kind(kind)["secret"]
    rekeyed = api.patch(url, {"secret": new_secret}, format="json")
    assert rekeyed.status_code == 200, rekeyed.content
    assert "secret" not in rekeyed.json()
    assert rekeyed.json()["fingerprint"] != created["fingerprint"]
    assert_secret_absent(rekeyed.content, new_secret)
    assert_secret_absent(rekeyed.content, body["secret"])
    assert Credential.objects.get(pk=created["id"]).reveal_secret() == new_secret

    expires = timezone.now().replace(microsecond=0) + timedelta(days=3)
    dated = api.put(url, {"expires_at": expires.isoformat()}, format="json")
    assert dated.status_code == 200, dated.content
    assert Credential.objects.get(pk=created["id"]).expires_at == expires

    undated = api.patch(url, {"expires_at": None}, format="json")
    assert undated.status_code == 200, undated.content
    assert undated.json()["expires_at"] is None

    row = Credential.objects.get(pk=created["id"])
    assert (row.label, row.kind, row.provider, row.expires_at) == ("Renamed", kind, body["provider"], None)
    assert row.reveal_secret() == new_secret


def test_update_with_a_secret_of_the_wrong_shape_answers_400_and_keeps_the_old_one(api):
    body = body_of_kind("basic")
    created = create(api, body)

    response = api.patch(f"{URL}{created['id']}/", {"secret": {"username": "only"}}, format="json")

    assert response.status_code == 400, response.content
    assert "secret.password" in response.json()["metadata"]["field_errors"]
    assert Credential.objects.get(pk=created["id"]).reveal_secret() == body["secret"]


def test_a_new_secret_makes_an_expired_credential_active_again(api):
    created = create(api, body_of_kind("oauth2"))
    Credential.objects.filter(pk=created["id"]).update(
        status=Credential.Status.EXPIRED, last_error="Google answered invalid_grant"
    )

    response = api.patch(f"{URL}{created['id']}/", {"secret": {"access_token": planted()}}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "ACTIVE"
    assert response.json()["last_error"] == ""


# --- delete -----------------------------------------------------------------------------


def test_deleting_an_unused_credential_answers_204(api, catalog):
    created = create(api, body_of_kind("bearer"))

    response = api.delete(f"{URL}{created['id']}/")

    assert response.status_code == 204
    assert not Credential.objects.filter(pk=created["id"]).exists()
    assert api.get(f"{URL}{created['id']}/").status_code == 404


def test_deleting_a_credential_pinned_by_an_instance_answers_409_naming_the_instance(api, catalog):
    credential = create(api, body_of_kind("oauth2"))
    instance = create_google_sheet_instance(api, "Quarterly report reader")
    assert configure(api, instance["id"], {"OAUTH_TOKEN": credential["id"]}).status_code == 200

    response = api.delete(f"{URL}{credential['id']}/")

    assert response.status_code == 409, response.content
    body = response.json()
    assert body["success"] is False
    assert "Quarterly report reader" in body["error_message"]
    assert Credential.objects.filter(pk=credential["id"]).exists()
    assert ToolInstance.objects.get(pk=instance["id"]).credential_mappings == {"OAUTH_TOKEN": credential["id"]}


def test_deleting_the_only_credential_of_a_mapped_provider_answers_409_naming_the_instance(api, catalog):
    credential = create(api, body_of_kind("oauth2"))
    instance = create_google_sheet_instance(api, "Invoices from Drive")
    assert configure(api, instance["id"], {"OAUTH_TOKEN": "google"}).status_code == 200

    response = api.delete(f"{URL}{credential['id']}/")

    assert response.status_code == 409, response.content
    assert "Invoices from Drive" in response.json()["error_message"]
    assert Credential.objects.filter(pk=credential["id"]).exists()


def test_deleting_one_of_two_google_credentials_behind_a_provider_mapping_answers_204(api, catalog):
    older = create(api, body_of_kind("oauth2"))
    create(api, body_of_kind("oauth2"))
    instance = create_google_sheet_instance(api, "Invoices from Drive")
    assert configure(api, instance["id"], {"OAUTH_TOKEN": "google"}).status_code == 200

    response = api.delete(f"{URL}{older['id']}/")

    assert response.status_code == 204, response.content
    assert api.get(f"/api/v1/instances/{instance['id']}/validate-execution").json()["is_ready"] is True


# --- tenant isolation -------------------------------------------------------------------


def test_another_users_credential_answers_404_everywhere_and_stays_unchanged(api, other_api):
    body = body_of_kind("oauth2")
    created = create(api, body)
    url = f"{URL}{created['id']}/"
    before = Credential.objects.get(pk=created["id"])

    answers = [
        other_api.get(url),
        other_api.patch(url, {"label": "mine now", "secret": {"access_token": planted()}}, format="json"),
        other_api.put(url, {"label": "mine now", "expires_at": None}, format="json"),
        other_api.delete(url),
    ]

    for response in answers:
        assert response.status_code == 404, response.content
        assert response.json()["error_code"] == "NOT_FOUND"
        assert_secret_absent(response.content, body["secret"])
    after = Credential.objects.get(pk=created["id"])
    assert (after.owner_id, after.label, after.expires_at, after.secret, after.fingerprint, after.updated_at) == (
        before.owner_id,
        before.label,
        before.expires_at,
        before.secret,
        before.fingerprint,
        before.updated_at,
    )
    assert after.reveal_secret() == body["secret"]


def test_each_user_lists_only_their_own_credentials(api, other_api):
    mine = create(api, body_of_kind("bearer"))
    theirs = create(other_api, body_of_kind("basic"))

    assert [item["id"] for item in api.get(URL).json()["results"]] == [mine["id"]]
    assert [item["id"] for item in other_api.get(URL).json()["results"]] == [theirs["id"]]
