"""Uploaded files through HTTP: POST /api/v1/files/ (multipart), list, retrieve, delete.

Owner-scoped (another user's id answers 404, like an absent one); stored under a name made
from the id, never the user's file name; hashed while stored; TOOLEXEC_MAX_UPLOAD_BYTES
refused with 413 FILE_TOO_LARGE in the envelope, before the body is read when its declared
length already says so, and while it streams otherwise."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.middleware.csrf import _get_new_csrf_string
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from core.words import bytes_words
from instances.models import UploadedFile
from instances.services.files import FileTooLarge, file_upload
from tests.factories import PASSWORD

pytestmark = pytest.mark.django_db

FILES = "/api/v1/files/"
ABSENT_ID = "0b8f1c1e-2f1a-4c52-9a57-2f4f1f0e9d11"
CSV_BYTES = b"name,age\nAda,36\nLinus,28\n"


# --- helpers ----------------------------------------------------------------------------


def upload(client: APIClient, content: bytes = CSV_BYTES, name: str = "people.csv", **extra: Any) -> Any:
    return client.post(FILES, {"file": SimpleUploadedFile(name, content, "text/csv")}, format="multipart", **extra)


def uploaded(client: APIClient, content: bytes = CSV_BYTES, name: str = "people.csv") -> dict[str, Any]:
    response = upload(client, content, name)
    assert response.status_code == 201, response.content
    return response.json()


def stored_files() -> set[Path]:
    root = Path(django_settings.MEDIA_ROOT)
    return {path for path in root.rglob("*") if path.is_file()}


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == code
    message = body["error_message"]
    assert isinstance(message, str) and message.strip() and "{" not in message
    assert isinstance(body["metadata"]["action_items"], list)
    assert isinstance(body["metadata"]["can_retry"], bool)
    return body


class UnreadBody(io.RawIOBase):
    """A request body that fails the test if anyone reads it."""

    read_at_all = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        UnreadBody.read_at_all = True
        raise AssertionError("the request body was read")


# --- uploading --------------------------------------------------------------------------


def test_upload_answers_the_file_with_its_size_type_and_sha256(api) -> None:
    body = uploaded(api)

    assert set(body) == {"id", "name", "size_bytes", "content_type", "sha256", "created_at"}
    assert body["name"] == "people.csv"
    assert body["size_bytes"] == len(CSV_BYTES)
    assert body["content_type"] == "text/csv"
    assert body["sha256"] == hashlib.sha256(CSV_BYTES).hexdigest()
    row = UploadedFile.objects.get(pk=body["id"])
    assert row.owner == api.user
    with row.file.open("rb") as handle:
        assert handle.read() == CSV_BYTES


def test_the_stored_name_comes_from_the_id_never_the_users_file_name(api) -> None:
    body = uploaded(api, name="../../etc/passwd; rm -rf ~.csv")

    row = UploadedFile.objects.get(pk=body["id"])
    assert row.file.name == f"uploads/{row.pk.hex[:2]}/{row.pk}"
    assert "passwd" not in row.file.name and ".." not in row.file.name
    assert Path(row.file.path).resolve().is_relative_to(Path(django_settings.MEDIA_ROOT).resolve())
    assert "/" not in body["name"]  # Django keeps only the last part of a path


def test_a_large_upload_is_stored_whole(api) -> None:
    content = os.urandom(3 * 1024 * 1024)  # beyond FILE_UPLOAD_MAX_MEMORY_SIZE: a temporary file

    body = uploaded(api, content, name="big.bin")

    assert body["size_bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    with UploadedFile.objects.get(pk=body["id"]).file.open("rb") as handle:
        assert handle.read() == content


def test_a_request_without_a_file_names_the_field(api) -> None:
    body = assert_envelope(api.post(FILES, {}, format="multipart"), 400, "INPUT_INVALID")

    assert "file" in body["metadata"]["field_errors"]


def test_an_empty_file_is_refused(api) -> None:
    body = assert_envelope(upload(api, b""), 400, "INPUT_INVALID")

    assert "empty" in body["metadata"]["field_errors"]["file"][0]
    assert not UploadedFile.objects.exists()


def test_json_is_not_an_upload(api) -> None:
    assert_envelope(api.post(FILES, {"file": "abc"}, format="json"), 415, "UNSUPPORTED_MEDIA_TYPE")


def test_uploading_needs_a_sign_in() -> None:
    assert_envelope(upload(APIClient()), 401, "NOT_AUTHENTICATED")
    assert not UploadedFile.objects.exists()


# --- the size limit ---------------------------------------------------------------------


@pytest.fixture
def small_limit(settings) -> int:
    settings.TOOLEXEC_MAX_UPLOAD_BYTES = 1024
    return 1024


def assert_too_large(response: Any) -> None:
    body = assert_envelope(response, 413, "FILE_TOO_LARGE")
    assert body["error_message"] == "This file is too large: uploads may be at most 1 KB."
    assert body["metadata"]["max_bytes"] == 1024
    assert body["metadata"]["action_items"][0]["action"] == "reduce_file"


@pytest.fixture
def no_service_upload(monkeypatch) -> None:
    """The upload service must not be reached: the limit stops the body while it streams in."""

    def refuse(**kwargs: Any) -> None:
        raise AssertionError("the whole body was read and handed to file_upload")

    monkeypatch.setattr("instances.files_api.file_upload", refuse)


def test_a_file_over_the_limit_is_refused_with_413_and_nothing_is_kept(api, small_limit, no_service_upload) -> None:
    before = stored_files()

    assert_too_large(upload(api, b"x" * (small_limit + 1)))

    assert not UploadedFile.objects.exists()
    assert stored_files() == before


def test_a_file_exactly_at_the_limit_is_taken(api, small_limit) -> None:
    assert uploaded(api, b"x" * small_limit)["size_bytes"] == small_limit


def test_a_body_declared_too_large_is_refused_before_it_is_read(api, small_limit) -> None:
    UnreadBody.read_at_all = False

    response = api.generic(
        "POST",
        FILES,
        content_type="multipart/form-data; boundary=xyz",
        CONTENT_LENGTH=str(10 * 1024 * 1024 * 1024),
        **{"wsgi.input": io.BufferedReader(UnreadBody())},
    )

    assert_too_large(response)
    assert UnreadBody.read_at_all is False


@pytest.fixture
def session_client(user) -> APIClient:
    """Signed in with a session, as the browsable API is, with a CSRF cookie and header."""
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username=user.username, password=PASSWORD)
    token = _get_new_csrf_string()
    client.cookies[django_settings.CSRF_COOKIE_NAME] = token
    client.credentials(HTTP_X_CSRFTOKEN=token)
    return client


def test_a_session_can_upload(session_client) -> None:
    assert uploaded(session_client)["size_bytes"] == len(CSV_BYTES)


def test_a_session_upload_over_the_limit_is_refused_too(session_client, small_limit, no_service_upload) -> None:
    before = stored_files()

    # The session's CSRF check reads the form first; the limit is in place before it does.
    assert_too_large(upload(session_client, b"x" * (small_limit + 1)))

    assert not UploadedFile.objects.exists()
    assert stored_files() == before


def test_an_upload_that_understates_its_size_is_cut_off_while_stored(user, settings) -> None:
    settings.TOOLEXEC_MAX_UPLOAD_BYTES = 1000
    lying = SimpleUploadedFile("lies.csv", b"y" * 5000, "text/csv")
    lying.size = 10
    before = stored_files()

    with pytest.raises(FileTooLarge):
        file_upload(owner=user, uploaded=lying)

    assert not UploadedFile.objects.exists()
    assert stored_files() == before  # the part written before the limit was removed


@pytest.mark.parametrize(
    ("size", "words"),
    [(50 * 1024 * 1024, "50 MB"), (1536 * 1024, "1.5 MB"), (300 * 1024, "300 KB"), (2 << 30, "2 GB"), (12, "12 bytes")],
)
def test_sizes_in_words(size: int, words: str) -> None:
    assert bytes_words(size) == words


def test_the_default_limit_is_50_mb() -> None:
    assert django_settings.TOOLEXEC_MAX_UPLOAD_BYTES == 50 * 1024 * 1024


# --- listing, reading, deleting ---------------------------------------------------------


def test_list_is_newest_first_cursor_paginated_and_only_ones_own(api, other_api) -> None:
    mine = [uploaded(api, name=f"file{i}.csv")["id"] for i in range(3)]
    uploaded(other_api, name="theirs.csv")

    first = api.get(FILES, {"page_size": 2}).json()
    second = api.get(first["next"]).json()

    assert [f["id"] for f in first["results"]] == mine[::-1][:2]
    assert [f["id"] for f in second["results"]] == mine[:1]
    assert second["next"] is None
    assert "count" not in first  # keyset pagination: no COUNT(*)


def test_the_list_takes_the_same_queries_for_few_or_many_files(api) -> None:
    uploaded(api)
    with CaptureQueriesContext(connection) as few:
        assert api.get(FILES).status_code == 200
    for i in range(5):
        uploaded(api, name=f"more{i}.csv")
    with CaptureQueriesContext(connection) as many:
        assert len(api.get(FILES).json()["results"]) == 6

    assert len(many) == len(few)


def test_retrieve_ones_own_file(api) -> None:
    body = uploaded(api)

    assert api.get(f"{FILES}{body['id']}/").json() == body


@pytest.mark.parametrize("method", ["get", "delete"])
def test_another_users_file_answers_404_like_an_absent_one(api, other_api, method: str) -> None:
    theirs = uploaded(other_api)

    for file_id in (theirs["id"], ABSENT_ID):
        body = assert_envelope(getattr(api, method)(f"{FILES}{file_id}/"), 404, "NOT_FOUND")
        assert "people.csv" not in str(body)
    assert UploadedFile.objects.filter(pk=theirs["id"]).exists()


def test_delete_removes_the_record_and_the_stored_bytes(api, django_capture_on_commit_callbacks) -> None:
    body = uploaded(api)
    path = Path(UploadedFile.objects.get(pk=body["id"]).file.path)
    assert path.exists()

    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(f"{FILES}{body['id']}/")

    assert response.status_code == 204
    assert not UploadedFile.objects.filter(pk=body["id"]).exists()
    assert not path.exists()


# --- the admin --------------------------------------------------------------------------


@pytest.fixture
def admin_client(db, client):
    get_user_model().objects.create_superuser("root", "root@example.com", PASSWORD)
    assert client.login(username="root", password=PASSWORD)
    return client


def test_admin_lists_files_read_only_and_deleting_there_removes_the_bytes(
    api, admin_client, django_capture_on_commit_callbacks
) -> None:
    body = uploaded(api)
    row = UploadedFile.objects.get(pk=body["id"])
    path = Path(row.file.path)

    changelist = admin_client.get("/admin/instances/uploadedfile/")
    detail = admin_client.get(f"/admin/instances/uploadedfile/{row.pk}/change/")
    assert changelist.status_code == 200 and b"people.csv" in changelist.content
    assert detail.status_code == 200 and row.file.name.encode() in detail.content
    assert b'name="_save"' not in detail.content  # read-only
    assert admin_client.get("/admin/instances/uploadedfile/add/").status_code == 403

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/instances/uploadedfile/",
            {"action": "delete_selected", "_selected_action": [str(row.pk)], "post": "yes"},
        )

    assert response.status_code == 302
    assert not UploadedFile.objects.exists()
    assert not path.exists()
