"""Credential secrets at rest (DESIGN.md §1, §8): MultiFernet with TOOLEXEC_ENCRYPTION_KEYS (the
first key encrypts, all decrypt); the sealed plaintext names the credential and its owner, so a
ciphertext copied onto another row does not open there; ``manage.py rotate_encryption_keys``
re-encrypts every secret with the first key and can run again safely."""

from __future__ import annotations

import json
import secrets
from io import StringIO
from typing import Any

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from rest_framework.test import APIClient

from instances.crypto import SecretUnreadable
from instances.models import Credential

pytestmark = pytest.mark.django_db


# --- helpers ----------------------------------------------------------------------------


def new_key() -> str:
    return Fernet.generate_key().decode()


def google_secret() -> dict[str, str]:
    return {"access_token": secrets.token_urlsafe(24), "refresh_token": secrets.token_urlsafe(24)}


def create_credential(api: APIClient, secret: dict[str, str], **overrides: Any) -> dict[str, Any]:
    body = {"provider": "google", "kind": "oauth2", "label": "Google", "secret": secret, **overrides}
    response = api.post("/api/v1/credentials/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def stored_ciphertext(credential_id: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT secret FROM instances_credential WHERE id = %s", [credential_id])
        return cursor.fetchone()[0]


def pinned_instance(api: APIClient, credential_id: str) -> str:
    response = api.post(
        "/api/v1/instances/",
        {"tool_definition_id": "test-google-sheet", "workflow_id": "wf-1", "name": "Drive import"},
        format="json",
    )
    assert response.status_code == 201, response.content
    instance_id = response.json()["id"]
    configured = api.post(
        f"/api/v1/instances/{instance_id}/configure-credentials",
        {"credential_mappings": {"OAUTH_TOKEN": credential_id}},
        format="json",
    )
    assert configured.status_code == 200, configured.content
    return instance_id


def execute(api: APIClient, instance_id: str) -> Any:
    return api.post(f"/api/v1/instances/{instance_id}/execute-sync", {"file_id": "abc"}, format="json")


def rotate() -> str:
    out = StringIO()
    call_command("rotate_encryption_keys", stdout=out)
    return out.getvalue()


# --- at rest ----------------------------------------------------------------------------


def test_database_column_holds_ciphertext_that_names_the_credential_and_its_owner(api, user, settings):
    secret = google_secret()
    credential = create_credential(api, secret)

    ciphertext = stored_ciphertext(credential["id"])

    assert ciphertext.startswith("gAAAAA")  # a Fernet token
    for value in secret.values():
        assert value not in ciphertext
    [key] = settings.TOOLEXEC_ENCRYPTION_KEYS
    payload = json.loads(Fernet(key.encode()).decrypt(ciphertext.encode()))
    assert payload["secret"] == secret
    assert payload["credential"] == credential["id"]
    assert payload["owner"] == user.pk


def test_the_secret_column_refuses_plaintext(user):
    credential = Credential(owner=user, provider="http", kind="bearer")
    credential.secret = json.dumps({"token": "in the clear"})

    with pytest.raises(ValueError, match="ciphertext"), transaction.atomic():
        credential.save()

    assert not Credential.objects.exists()


@pytest.mark.parametrize("target_owner", ["same owner", "another owner"])
def test_ciphertext_copied_onto_another_row_does_not_decrypt_there(api, other_api, target_owner):
    source_secret = google_secret()
    source = create_credential(api, source_secret)
    target_api = api if target_owner == "same owner" else other_api
    target = create_credential(target_api, google_secret())

    Credential.objects.filter(pk=target["id"]).update(secret=stored_ciphertext(source["id"]))

    with pytest.raises(SecretUnreadable):
        Credential.objects.get(pk=target["id"]).reveal_secret()
    assert Credential.objects.get(pk=source["id"]).reveal_secret() == source_secret


def test_run_with_a_copied_ciphertext_is_refused_and_marks_the_credential(api, catalog):
    source_secret = google_secret()
    source = create_credential(api, source_secret, label="source")
    target = create_credential(api, google_secret(), label="target")
    Credential.objects.filter(pk=target["id"]).update(secret=stored_ciphertext(source["id"]))
    instance_id = pinned_instance(api, target["id"])

    response = execute(api, instance_id)

    assert response.status_code == 409, response.content
    body = response.json()
    assert body["error_code"] == "CREDENTIAL_INVALID"
    assert body["error_message"].endswith("The stored secret can no longer be read; enter it again.")
    for value in source_secret.values():
        assert value not in response.content.decode()
    row = Credential.objects.get(pk=target["id"])
    assert row.status == Credential.Status.ERROR
    assert row.last_error
    assert Credential.objects.get(pk=source["id"]).status == Credential.Status.ACTIVE
    readiness = api.get(f"/api/v1/instances/{instance_id}/validate-execution").json()
    assert readiness["is_ready"] is False
    assert readiness["error_code"] == "CREDENTIAL_INVALID"


def test_refusal_for_an_unreadable_secret_names_the_tool(api, catalog):
    source = create_credential(api, google_secret(), label="source")
    target = create_credential(api, google_secret(), label="target")
    Credential.objects.filter(pk=target["id"]).update(secret=stored_ciphertext(source["id"]))
    instance_id = pinned_instance(api, target["id"])

    body = execute(api, instance_id).json()

    assert body["error_message"] == (
        "Google Drive Reader could not use your Google account: "
        "The stored secret can no longer be read; enter it again."
    )


# --- keys -------------------------------------------------------------------------------


def test_the_first_key_encrypts_and_every_key_decrypts(api, settings):
    old, new = new_key(), new_key()
    settings.TOOLEXEC_ENCRYPTION_KEYS = [old]
    old_secret = google_secret()
    made_with_old = create_credential(api, old_secret)

    settings.TOOLEXEC_ENCRYPTION_KEYS = [new, old]
    new_secret = google_secret()
    made_with_new = create_credential(api, new_secret)

    Fernet(new.encode()).decrypt(stored_ciphertext(made_with_new["id"]).encode())
    with pytest.raises(InvalidToken):
        Fernet(old.encode()).decrypt(stored_ciphertext(made_with_new["id"]).encode())
    assert Credential.objects.get(pk=made_with_old["id"]).reveal_secret() == old_secret
    assert Credential.objects.get(pk=made_with_new["id"]).reveal_secret() == new_secret


def test_a_secret_whose_key_was_dropped_refuses_the_run(api, catalog, settings):
    old, new = new_key(), new_key()
    settings.TOOLEXEC_ENCRYPTION_KEYS = [old]
    credential = create_credential(api, google_secret())
    instance_id = pinned_instance(api, credential["id"])

    settings.TOOLEXEC_ENCRYPTION_KEYS = [new]  # the old key dropped before rotating
    response = execute(api, instance_id)

    assert response.status_code == 409, response.content
    assert response.json()["error_code"] == "CREDENTIAL_INVALID"
    assert Credential.objects.get(pk=credential["id"]).status == Credential.Status.ERROR


def test_rotation_re_encrypts_with_the_new_first_key_and_old_rows_decrypt_before_and_after(
    api, other_api, catalog, settings
):
    old, new = new_key(), new_key()
    settings.TOOLEXEC_ENCRYPTION_KEYS = [old]
    secrets_by_id = {}
    for client in (api, api, other_api):
        secret = google_secret()
        secrets_by_id[create_credential(client, secret)["id"]] = secret
    before = {pk: stored_ciphertext(pk) for pk in secrets_by_id}
    fingerprints = {pk: Credential.objects.get(pk=pk).fingerprint for pk in secrets_by_id}
    instance_id = pinned_instance(api, next(iter(secrets_by_id)))

    settings.TOOLEXEC_ENCRYPTION_KEYS = [new, old]
    # Before rotating, rows sealed with the old key still open, and runs work.
    for pk, secret in secrets_by_id.items():
        assert Credential.objects.get(pk=pk).reveal_secret() == secret
    assert execute(api, instance_id).json()["success"] is True

    output = rotate()

    assert "Re-encrypted 3 credential secret(s)" in output
    for pk, secret in secrets_by_id.items():
        ciphertext = stored_ciphertext(pk)
        assert ciphertext != before[pk]
        Fernet(new.encode()).decrypt(ciphertext.encode())
        with pytest.raises(InvalidToken):
            Fernet(old.encode()).decrypt(ciphertext.encode())
        row = Credential.objects.get(pk=pk)
        assert row.reveal_secret() == secret
        assert row.fingerprint == fingerprints[pk]

    # Running it again is harmless.
    assert "Re-encrypted 3 credential secret(s)" in rotate()
    for pk, secret in secrets_by_id.items():
        assert Credential.objects.get(pk=pk).reveal_secret() == secret

    # Once rotated, the old key can go.
    settings.TOOLEXEC_ENCRYPTION_KEYS = [new]
    for pk, secret in secrets_by_id.items():
        assert Credential.objects.get(pk=pk).reveal_secret() == secret
    response = execute(api, instance_id)
    assert response.status_code == 200, response.content
    assert response.json()["success"] is True


def test_rotation_reports_a_row_it_cannot_read_and_still_rotates_the_others(api, settings):
    old, new = new_key(), new_key()
    settings.TOOLEXEC_ENCRYPTION_KEYS = [old]
    good_secret = google_secret()
    good = create_credential(api, good_secret, label="good")
    broken = create_credential(api, google_secret(), label="broken")
    Credential.objects.filter(pk=broken["id"]).update(secret=stored_ciphertext(good["id"]))
    broken_before = stored_ciphertext(broken["id"])
    settings.TOOLEXEC_ENCRYPTION_KEYS = [new, old]

    with pytest.raises(CommandError, match=broken["id"]):
        rotate()

    Fernet(new.encode()).decrypt(stored_ciphertext(good["id"]).encode())
    assert Credential.objects.get(pk=good["id"]).reveal_secret() == good_secret
    assert stored_ciphertext(broken["id"]) == broken_before
