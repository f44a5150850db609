"""Google Drive Reader against a stand-in Google (pytest-httpserver) that answers Drive v3,
Sheets v4 and the OAuth token endpoint the way Google's API reference shows, errors included.

Everything goes through HTTP with the API client: credentials, instances, validate-execution,
execute-sync and execute-async.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import threading
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from pytest_httpserver import HTTPServer
from rest_framework.test import APIClient
from werkzeug import Request, Response

from executions.models import Execution, Job
from executions.services.jobs import job_run
from instances.models import Credential
from tests.conftest import wait_for
from tests.job_events import Listener
from tools.builtin import google_drive  # noqa: F401 - registers the tool for the catalog fixture

pytestmark = pytest.mark.django_db

EXPIRED_MESSAGE = "Your Google account access for Google Drive Reader has expired and needs to be renewed."
NOT_FOUND_MESSAGE = "We couldn't find that file in your Google Drive, or it isn't shared with the connected account."
SHEET = "application/vnd.google-apps.spreadsheet"
DOC = "application/vnd.google-apps.document"
CLIENT_ID = "toolexec-test.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-test-client-secret"


# --- The stand-in Google ----------------------------------------------------------------


def google_error(code: int, message: str, status: str, reason: str = "", domain: str = "global") -> dict[str, Any]:
    """An error body as Google's JSON APIs send it."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if reason:
        error["errors"] = [{"message": message, "domain": domain, "reason": reason}]
    return {"error": error}


def id_token(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'kid': 'test'})}.{part(claims)}.c2lnbmF0dXJl"


class FakeGoogle:
    """Drive files, spreadsheets and OAuth tokens, answering like Google does.

    Only requests with an access token it issued get past the 401; ``failures`` makes a
    file answer an error instead (status, body, headers).
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.sheets: dict[str, dict[str, list[list[Any]]]] = {}
        self.failures: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {}
        self.access_tokens: set[str] = set()
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> account email
        self.codes: dict[str, str] = {}  # authorization code -> account email
        self.userinfo: dict[str, str] = {}  # access token -> email, for the userinfo endpoint
        self.requests: list[dict[str, Any]] = []
        self.token_requests: list[dict[str, str]] = []
        self.token_delay = 0.0
        self.token_down = False
        self.token_rate_limited = False
        self.send_id_token = True
        self.send_userinfo = True
        self.rotate_refresh_tokens = False
        self.scope_granted = (
            "openid https://www.googleapis.com/auth/userinfo.email "
            "https://www.googleapis.com/auth/drive.readonly https://www.googleapis.com/auth/spreadsheets.readonly"
        )
        self._lock = threading.Lock()
        server.expect_request("/token", method="POST").respond_with_handler(self._token)
        server.expect_request("/userinfo").respond_with_handler(self._userinfo)
        server.expect_request(re.compile("^/drive/v3/files/"), method="GET").respond_with_handler(self._drive)
        server.expect_request(re.compile("^/v4/spreadsheets/"), method="GET").respond_with_handler(self._sheets)

    # set-up

    def issue_token(self) -> str:
        token = "ya29." + secrets.token_urlsafe(24)
        self.access_tokens.add(token)
        return token

    def issue_refresh_token(self, email: str = "ada@example.com") -> str:
        token = "1//" + secrets.token_urlsafe(24)
        self.refresh_tokens[token] = email
        return token

    def add_file(self, file_id: str, name: str, mime_type: str, content: bytes | None = None, **extra: Any) -> None:
        meta = {
            "kind": "drive#file",
            "id": file_id,
            "name": name,
            "mimeType": mime_type,
            "modifiedTime": "2026-11-20T09:30:00.000Z",
        }
        if content is not None and not mime_type.startswith("application/vnd.google-apps."):
            meta["size"] = str(len(content))
        meta.update(extra)
        self.files[file_id] = meta
        if content is not None:
            self.contents[file_id] = content

    def add_sheet(self, file_id: str, name: str, sheets: dict[str, list[list[Any]]]) -> None:
        self.add_file(file_id, name, SHEET)
        self.sheets[file_id] = sheets

    def calls(self, path_part: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if path_part in r["path"]]

    # handlers

    def _authorized(self, request: Request) -> Response | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and header[7:] in self.access_tokens:
            return None
        return _json(
            google_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
                "other valid authentication credential.",
                "UNAUTHENTICATED",
                "authError",
            ),
            401,
            {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'},
        )

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(
                {"path": request.path, "args": request.args.to_dict(), "auth": request.headers.get("Authorization")}
            )

    def _drive(self, request: Request) -> Response:
        self._record(request)
        refused = self._authorized(request)
        if refused:
            return refused
        rest = request.path.removeprefix("/drive/v3/files/")
        file_id, _, action = rest.partition("/")
        if file_id in self.failures:
            status, body, headers = self.failures[file_id]
            return _json(body, status, headers)
        meta = self.files.get(file_id)
        if meta is None:
            message = f"File not found: {file_id}."
            body = google_error(404, message, "NOT_FOUND", "notFound")
            body["error"]["errors"][0].update({"location": "fileId", "locationType": "parameter"})
            return _json(body, 404)
        if action == "export":
            if not meta["mimeType"].startswith("application/vnd.google-apps."):
                return _json(
                    google_error(
                        403,
                        "Export only supports Docs Editors files.",
                        "PERMISSION_DENIED",
                        "fileNotExportable",
                    ),
                    403,
                )
            return Response(self.contents[file_id], 200, content_type=request.args["mimeType"])
        if request.args.get("alt") == "media":
            if meta["mimeType"].startswith("application/vnd.google-apps."):
                return _json(
                    google_error(
                        403,
                        "Only files with binary content can be downloaded. Use Export with Docs Editors files.",
                        "PERMISSION_DENIED",
                        "fileNotDownloadable",
                    ),
                    403,
                )
            return Response(self.contents[file_id], 200, content_type=meta["mimeType"])
        fields = request.args.get("fields")
        selected = meta if fields is None else {k: v for k, v in meta.items() if k in fields.split(",")}
        return _json(selected)

    def _sheets(self, request: Request) -> Response:
        self._record(request)
        refused = self._authorized(request)
        if refused:
            return refused
        rest = request.path.removeprefix("/v4/spreadsheets/")
        spreadsheet_id, _, values_path = rest.partition("/values/")
        if spreadsheet_id in self.failures:
            status, body, headers = self.failures[spreadsheet_id]
            return _json(body, status, headers)
        sheets = self.sheets.get(spreadsheet_id)
        if sheets is None:
            return _json(google_error(404, "Requested entity was not found.", "NOT_FOUND"), 404)
        if not values_path:
            assert request.args.get("fields") == "sheets.properties"
            return _json(
                {
                    "sheets": [
                        {
                            "properties": {
                                "sheetId": 1000 + index,
                                "title": title,
                                "index": index,
                                "sheetType": "GRID",
                                "gridProperties": {"rowCount": 1000, "columnCount": 26},
                            }
                        }
                        for index, title in enumerate(sheets)
                    ]
                }
            )
        title = _a1_sheet_title(values_path)
        if title not in sheets:
            return _json(google_error(400, f"Unable to parse range: {values_path}", "INVALID_ARGUMENT"), 400)
        rows = sheets[title]
        # Google leaves out trailing empty cells and trailing empty rows.
        trimmed = [_rstrip(row) for row in rows]
        while trimmed and not trimmed[-1]:
            trimmed.pop()
        body: dict[str, Any] = {"range": f"{values_path}!A1:Z1000", "majorDimension": "ROWS"}
        if trimmed:
            body["values"] = trimmed
        return _json(body)

    def _token(self, request: Request) -> Response:
        form = request.form.to_dict()
        with self._lock:
            self.token_requests.append(form)
        if self.token_delay:
            time.sleep(self.token_delay)
        if self.token_down:
            return _json({"error": "internal_failure"}, 503)
        if self.token_rate_limited:
            return _json({"error": "rate_limit_exceeded", "error_description": "Rate limit exceeded."}, 429)
        if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
            return _json({"error": "invalid_client", "error_description": "The OAuth client was not found."}, 401)
        if form.get("grant_type") == "refresh_token":
            email = self.refresh_tokens.get(form.get("refresh_token", ""))
            if email is None:
                return _json({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}, 400)
            answer = {
                "access_token": self.issue_token(),
                "expires_in": 3599,
                "scope": self.scope_granted,
                "token_type": "Bearer",
            }
            if self.rotate_refresh_tokens:
                answer["refresh_token"] = self.issue_refresh_token(email)
            return _json(answer)
        if form.get("grant_type") == "authorization_code":
            email = self.codes.pop(form.get("code", ""), None)
            if email is None:
                return _json({"error": "invalid_grant", "error_description": "Bad Request"}, 400)
            access = self.issue_token()
            if self.send_userinfo:
                self.userinfo[access] = email
            answer = {
                "access_token": access,
                "expires_in": 3599,
                "refresh_token": self.issue_refresh_token(email),
                "scope": self.scope_granted,
                "token_type": "Bearer",
            }
            if self.send_id_token:
                answer["id_token"] = id_token(
                    {"iss": "https://accounts.google.com", "aud": CLIENT_ID, "sub": "1234567890", "email": email}
                )
            return _json(answer)
        return _json({"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}, 400)

    def _userinfo(self, request: Request) -> Response:
        email = self.userinfo.get(request.headers.get("Authorization", "").removeprefix("Bearer "))
        if email is None:
            return _json({"error": "invalid_request", "error_description": "Invalid Credentials"}, 401)
        return _json({"sub": "1234567890", "email": email, "email_verified": True})


def _a1_sheet_title(a1_range: str) -> str | None:
    if a1_range.startswith("'") and a1_range.endswith("'") and len(a1_range) >= 2:
        return a1_range[1:-1].replace("''", "'")
    if "'" in a1_range or " " in a1_range:
        return None  # unquoted names with spaces or quotes do not parse
    return a1_range.split("!")[0]


def _rstrip(row: list[Any]) -> list[Any]:
    row = list(row)
    while row and row[-1] in ("", None):
        row.pop()
    return row


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status, headers=headers, content_type="application/json; charset=UTF-8")


@pytest.fixture
def google(httpserver: HTTPServer, settings) -> FakeGoogle:
    return fake_google(httpserver, settings)


def fake_google(httpserver: HTTPServer, settings) -> FakeGoogle:
    """The stand-in Google, with every GOOGLE_* setting pointing at it."""
    settings.GOOGLE_DRIVE_API_URL = httpserver.url_for("/drive/v3")
    settings.GOOGLE_SHEETS_API_URL = httpserver.url_for("/v4")
    settings.GOOGLE_OAUTH_TOKEN_URL = httpserver.url_for("/token")
    settings.GOOGLE_OAUTH_USERINFO_URL = httpserver.url_for("/userinfo")
    settings.GOOGLE_OAUTH_AUTHORIZE_URL = httpserver.url_for("/o/oauth2/v2/auth")
    settings.GOOGLE_OAUTH_CLIENT_ID = CLIENT_ID
    settings.GOOGLE_OAUTH_CLIENT_SECRET = CLIENT_SECRET
    return FakeGoogle(httpserver)


# --- API helpers ------------------------------------------------------------------------


def connect_google(
    api: APIClient,
    google: FakeGoogle,
    *,
    access_token: str | None = None,
    refresh_token: str | None = "issue",
    expires_in: timedelta | None = timedelta(hours=1),
) -> Credential:
    secret = {"access_token": access_token or google.issue_token()}
    if refresh_token == "issue":
        refresh_token = google.issue_refresh_token()
    if refresh_token:
        secret["refresh_token"] = refresh_token
    body: dict[str, Any] = {"provider": "google", "kind": "oauth2", "label": "Ada's Google", "secret": secret}
    if expires_in is not None:
        body["expires_at"] = (timezone.now() + expires_in).isoformat()
    response = api.post("/api/v1/credentials/", body, format="json")
    assert response.status_code == 201, response.content
    return Credential.objects.get(pk=response.json()["id"])


def drive_instance(api: APIClient, catalog) -> str:
    response = api.post(
        "/api/v1/instances/",
        {"tool_definition_id": "google-drive-reader", "workflow_id": "wf-drive", "name": "Drive import"},
        format="json",
    )
    assert response.status_code == 201, response.content
    instance_id = response.json()["id"]
    response = api.post(
        f"/api/v1/instances/{instance_id}/configure-credentials",
        {"credential_mappings": {"OAUTH_TOKEN": "google"}},
        format="json",
    )
    assert response.status_code == 200, response.content
    return instance_id


def run(api: APIClient, instance_id: str, inputs: dict[str, Any]) -> dict[str, Any]:
    response = api.post(f"/api/v1/instances/{instance_id}/execute-sync", inputs, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def failed(body: dict[str, Any], code: str) -> dict[str, Any]:
    assert body["success"] is False, body
    assert body["error_code"] == code, body
    return body


@pytest.fixture
def drive(api, catalog, google):
    """A connected Google account and a Drive Reader instance mapped to it."""
    credential = connect_google(api, google)
    return {"instance": drive_instance(api, catalog), "credential": credential}


PLAN = [
    ["Region", "Owner", "Target", "Notes"],
    ["North", "Ada", "120", "on track"],
    ["South", "Linus", "80"],  # trailing empty cells are left out by Google
    [],
    ["East", "", "95", ""],
]


# --- The catalog --------------------------------------------------------------------------


def test_the_catalog_describes_google_drive_reader(api, catalog):
    body = api.get("/api/v1/tools/google-drive-reader/").json()
    assert body["name"] == "Google Drive Reader"
    assert set(body["modes"]) == {"sync", "async"}
    slot = body["credential_slots"][0]
    assert (slot["name"], slot["provider"], slot["kinds"]) == ("OAUTH_TOKEN", "google", ["oauth2"])
    assert set(slot["scopes"]) == {"drive.readonly", "spreadsheets.readonly"}
    assert set(body["input_schema"]["properties"]) == {
        "file_id",
        "sheet_name",
        "extract_content",
        "max_rows",
        "modified_time",
    }
    assert body["input_schema"]["required"] == ["file_id"]


# --- Sheets -------------------------------------------------------------------------------


def test_reads_a_sheet_by_its_name_quoted_as_the_sheets_api_requires(api, drive, google):
    google.add_sheet("sheet-1", "Sales plan", {"Summary": [["x"]], "Q1 'Plan'": PLAN})
    body = run(api, drive["instance"], {"file_id": "sheet-1", "sheet_name": "Q1 'Plan'"})

    assert body["success"] is True, body
    data = body["data"]
    assert data["file"] == {
        "id": "sheet-1",
        "name": "Sales plan",
        "mime_type": SHEET,
        "size_bytes": None,
        "modified_time": "2026-11-20T09:30:00.000Z",
    }
    assert data["sheet_name"] == "Q1 'Plan'"
    assert data["columns"] == ["Region", "Owner", "Target", "Notes"]
    assert data["rows"] == [
        {"Region": "North", "Owner": "Ada", "Target": "120", "Notes": "on track"},
        {"Region": "South", "Owner": "Linus", "Target": "80", "Notes": None},
        {"Region": "East", "Owner": "", "Target": "95", "Notes": None},
    ]
    assert (data["row_count"], data["truncated"]) == (3, False)
    assert body["credits_consumed"] == 0.15  # 0.1 a call + 0.05 for the (first) megabyte read

    (values_call,) = google.calls("/values/")
    assert values_call["path"] == "/v4/spreadsheets/sheet-1/values/'Q1 ''Plan'''"
    assert values_call["args"] == {"majorDimension": "ROWS"}
    (metadata_call,) = google.calls("/drive/v3/files/sheet-1")
    assert metadata_call["args"]["supportsAllDrives"] == "true"
    assert set(metadata_call["args"]["fields"].split(",")) == {"id", "name", "mimeType", "size", "modifiedTime"}
    assert not [r for r in google.requests if r["path"] == "/v4/spreadsheets/sheet-1"]  # no sheet lookup needed


def test_reads_the_first_sheet_when_none_is_named(api, drive, google):
    google.add_sheet("sheet-2", "Budget", {"2026": [["Item", "Cost"], ["Laptops", "4000"]], "2025": [["Old"]]})
    data = run(api, drive["instance"], {"file_id": "sheet-2"})["data"]

    assert data["sheet_name"] == "2026"
    assert data["rows"] == [{"Item": "Laptops", "Cost": "4000"}]
    lookups = [r for r in google.requests if r["path"] == "/v4/spreadsheets/sheet-2"]
    assert [r["args"] for r in lookups] == [{"fields": "sheets.properties"}]
    assert google.calls("/values/")[0]["path"].endswith("/values/'2026'")


def test_max_rows_keeps_the_first_rows_and_says_the_rest_were_cut(api, drive, google):
    rows = [["n", "square"]] + [[str(i), str(i * i)] for i in range(1, 11)]
    google.add_sheet("sheet-3", "Squares", {"Sheet1": rows})
    data = run(api, drive["instance"], {"file_id": "sheet-3", "max_rows": 4})["data"]

    assert [row["n"] for row in data["rows"]] == ["1", "2", "3", "4"]
    assert (data["row_count"], data["truncated"]) == (10, True)


def test_blank_and_repeated_headers_get_names_like_the_file_readers_give(api, drive, google):
    values = [["Name", "", "Name"], ["a", "b", "c", "d"]]
    google.add_sheet("sheet-4", "Messy", {"Sheet1": values})
    data = run(api, drive["instance"], {"file_id": "sheet-4"})["data"]

    assert data["columns"] == ["Name", "column_2", "Name_2", "column_4"]
    assert data["rows"] == [{"Name": "a", "column_2": "b", "Name_2": "c", "column_4": "d"}]


def test_an_unknown_sheet_is_refused_naming_the_sheets_that_exist(api, drive, google):
    google.add_sheet("sheet-5", "Budget", {"2026": [["a"]], "Notes": [["b"]]})
    body = failed(run(api, drive["instance"], {"file_id": "sheet-5", "sheet_name": "2027"}), "INPUT_INVALID")

    assert body["error_message"] == "The spreadsheet has no sheet named '2027'; its sheets are: '2026', 'Notes'."
    assert body["metadata"]["field_errors"] == {"sheet_name": [body["error_message"]]}


# --- Docs and other files -------------------------------------------------------------------


def test_exports_a_google_doc_as_plain_text(api, drive, google):
    text = "Meeting notes\r\n\r\nAgenda: café budget ✓\r\n"
    google.add_file("doc-1", "Notes", DOC, text.encode())
    body = run(api, drive["instance"], {"file_id": "doc-1", "extract_content": True})

    assert body["success"] is True, body
    assert body["data"] == {
        "file": {
            "id": "doc-1",
            "name": "Notes",
            "mime_type": DOC,
            "size_bytes": None,
            "modified_time": "2026-11-20T09:30:00.000Z",
        },
        "content": text,
        "content_bytes": len(text.encode()),
    }
    (export,) = google.calls("/export")
    assert export["path"] == "/drive/v3/files/doc-1/export"
    assert export["args"] == {"mimeType": "text/plain"}
    assert body["credits_consumed"] == 0.15


def test_without_extract_content_a_doc_gives_its_details_only(api, drive, google):
    google.add_file("doc-2", "Notes", DOC, b"secret plans")
    body = run(api, drive["instance"], {"file_id": "doc-2"})

    assert list(body["data"]) == ["file"]
    assert body["credits_consumed"] == 0.1  # a call, nothing read
    assert not google.calls("/export")


def test_a_text_file_is_downloaded_as_text(api, drive, google):
    google.add_file("txt-1", "readme.txt", "text/plain", "hello\nwörld\n".encode())
    data = run(api, drive["instance"], {"file_id": "txt-1", "extract_content": True})["data"]

    assert (data["content"], data["content_bytes"]) == ("hello\nwörld\n", 13)
    assert data["file"]["size_bytes"] == 13
    (download,) = [r for r in google.requests if r["args"].get("alt") == "media"]
    assert download["args"] == {"alt": "media", "supportsAllDrives": "true"}


def test_a_csv_file_is_downloaded_and_read_as_rows(api, drive, google):
    pytest.importorskip("tools.tabular")
    csv = "city,population\r\nLisbon,545000\r\nPorto,232000\r\n"
    google.add_file("csv-1", "cities.csv", "text/csv", csv.encode())
    body = run(api, drive["instance"], {"file_id": "csv-1", "extract_content": True})

    assert body["success"] is True, body
    data = body["data"]
    assert data["columns"] == ["city", "population"]
    assert data["rows"] == [{"city": "Lisbon", "population": "545000"}, {"city": "Porto", "population": "232000"}]
    assert (data["row_count"], data["truncated"], data["sheet_name"]) == (2, False, None)
    assert data["file"]["size_bytes"] == len(csv)


def test_an_xlsx_file_is_downloaded_and_read_as_rows(api, drive, google):
    pytest.importorskip("tools.tabular")
    from openpyxl import Workbook

    workbook = Workbook()
    workbook.active.title = "Summary"
    workbook.active.append(["ignored"])
    sheet = workbook.create_sheet("Orders")
    sheet.append(["order", "qty"])
    sheet.append(["A-1", 3])
    sheet.append(["A-2", 5])
    buffer = io.BytesIO()
    workbook.save(buffer)
    xlsx = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    google.add_file("xlsx-1", "orders.xlsx", xlsx, buffer.getvalue())

    body = run(api, drive["instance"], {"file_id": "xlsx-1", "extract_content": True, "sheet_name": "Orders"})
    assert body["success"] is True, body
    data = body["data"]
    assert (data["sheet_name"], data["columns"]) == ("Orders", ["order", "qty"])
    assert data["rows"] == [{"order": "A-1", "qty": 3}, {"order": "A-2", "qty": 5}]


def test_a_file_whose_content_cannot_be_read_is_refused_before_downloading_it(api, drive, google):
    google.add_file("pdf-1", "scan.pdf", "application/pdf", b"%PDF-1.7 ...")
    body = failed(run(api, drive["instance"], {"file_id": "pdf-1", "extract_content": True}), "INPUT_INVALID")

    assert "cannot read the content of files of type application/pdf" in body["error_message"]
    assert "extract_content" in body["metadata"]["field_errors"]
    assert not [r for r in google.requests if r["args"].get("alt") == "media"]


def test_a_file_larger_than_the_download_limit_is_refused_before_downloading(api, drive, google, settings):
    settings.TOOLEXEC_MAX_DOWNLOAD_BYTES = 1024
    google.add_file("big-1", "big.csv", "text/csv", b"a,b\n" + b"1,2\n" * 1000)
    body = failed(run(api, drive["instance"], {"file_id": "big-1", "extract_content": True}), "INPUT_INVALID")

    assert body["error_message"] == "The file is larger than 1 KB, the most Google Drive Reader reads."
    assert not [r for r in google.requests if r["args"].get("alt") == "media"]


def test_a_download_that_grows_past_the_limit_is_stopped(api, drive, google, settings):
    settings.TOOLEXEC_MAX_DOWNLOAD_BYTES = 200 * 1024
    # Drive's size says small; the content is not: the stream itself is counted.
    google.add_file("big-2", "grows.txt", "text/plain", b"x" * (1024 * 1024))
    google.files["big-2"]["size"] = "10"
    body = failed(run(api, drive["instance"], {"file_id": "big-2", "extract_content": True}), "INPUT_INVALID")

    assert "larger than 200 KB" in body["error_message"]
    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.credits_consumed == 0  # a refused run costs nothing beyond the hold it gives back


# --- Errors -----------------------------------------------------------------------------------


def test_a_missing_file_is_explained_in_words(api, drive, google):
    body = failed(run(api, drive["instance"], {"file_id": "nope"}), "NOT_FOUND")

    assert body["error_message"] == NOT_FOUND_MESSAGE
    assert body["metadata"]["can_retry"] is False
    assert body["metadata"]["field_errors"] == {"file_id": [NOT_FOUND_MESSAGE]}


def test_a_429_is_a_rate_limit_with_googles_retry_after(api, drive, google):
    google.add_sheet("sheet-rl", "Busy", {"Sheet1": PLAN})
    google.failures["sheet-rl"] = (
        429,
        google_error(
            429,
            "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per minute per user'.",
            "RESOURCE_EXHAUSTED",
            "rateLimitExceeded",
        ),
        {"Retry-After": "17"},
    )
    body = failed(run(api, drive["instance"], {"file_id": "sheet-rl"}), "UPSTREAM_RATE_LIMITED")

    assert body["error_message"] == (
        "Google is limiting requests from Google Drive Reader right now. Try again in a little while."
    )
    assert body["metadata"]["retry_after_seconds"] == 17
    assert body["metadata"]["can_retry"] is True


@pytest.mark.parametrize("reason", ["userRateLimitExceeded", "rateLimitExceeded"])
def test_a_403_rate_limit_is_a_rate_limit_too(api, drive, google, reason):
    google.add_file("busy", "Busy", DOC, b"text")
    google.failures["busy"] = (
        403,
        google_error(403, "User Rate Limit Exceeded", "PERMISSION_DENIED", reason, domain="usageLimits"),
        {},
    )
    body = failed(run(api, drive["instance"], {"file_id": "busy"}), "UPSTREAM_RATE_LIMITED")
    assert body["metadata"]["retry_after_seconds"] == 30  # Google sent no Retry-After


def test_insufficient_scopes_ask_to_reconnect_the_account(api, drive, google):
    google.add_file("scoped", "Notes", DOC, b"text")
    body = google_error(
        403, "Request had insufficient authentication scopes.", "PERMISSION_DENIED", "insufficientPermissions"
    )
    body["error"]["details"] = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
            "domain": "googleapis.com",
            "metadata": {"service": "drive.googleapis.com", "method": "google.apps.drive.v3.DriveFiles.Get"},
        }
    ]
    google.failures["scoped"] = (403, body, {})
    credential = drive["credential"]
    answer = failed(run(api, drive["instance"], {"file_id": "scoped"}), "CREDENTIAL_INVALID")

    assert answer["error_message"].startswith("Google Drive Reader could not use your Google account: the access")
    (item,) = answer["metadata"]["action_items"]
    assert item["action"] == "fix_credential"
    assert item["url"] == f"https://toolexec.test/credentials/oauth/google/connect/?credential={credential.pk}"
    credential.refresh_from_db()
    assert credential.status == Credential.Status.ERROR


def test_a_google_server_error_is_an_upstream_error_worth_retrying(api, drive, google):
    google.add_file("flaky", "Flaky", DOC, b"text")
    google.failures["flaky"] = (503, google_error(503, "The service is currently unavailable.", "UNAVAILABLE"), {})
    body = failed(run(api, drive["instance"], {"file_id": "flaky"}), "UPSTREAM_ERROR")

    assert body["error_message"] == (
        "Google answered with an error while Google Drive Reader was running: Google Drive is having trouble "
        "right now (HTTP 503); try again in a little while."
    )
    assert body["metadata"]["can_retry"] is True


@pytest.mark.parametrize(
    ("status", "body", "code", "words", "can_retry"),
    [
        (
            403,
            google_error(403, "Daily Limit Exceeded", "PERMISSION_DENIED", "dailyLimitExceeded", "usageLimits"),
            "UPSTREAM_RATE_LIMITED",
            "Google is limiting requests from Google Drive Reader right now.",
            True,
        ),
        (
            403,
            google_error(
                403, "The user has not granted the app read access.", "PERMISSION_DENIED", "cannotDownloadFile"
            ),
            "UPSTREAM_ERROR",
            "the owner of this file has turned off downloading it.",
            False,
        ),
        (
            403,
            google_error(403, "The caller does not have permission", "PERMISSION_DENIED", "forbidden"),
            "UPSTREAM_ERROR",
            "Google Drive refused the request: The caller does not have permission.",
            False,
        ),
        (
            400,
            google_error(400, "Invalid field selection nope", "INVALID_ARGUMENT", "invalidParameter"),
            "UPSTREAM_ERROR",
            "Google Drive could not handle the request: Invalid field selection nope.",
            False,
        ),
        (
            409,
            google_error(409, "Conflict", "ABORTED"),
            "UPSTREAM_ERROR",
            "Google Drive answered HTTP 409: Conflict.",
            False,
        ),
    ],
    ids=["daily-quota", "download-disabled", "forbidden", "bad-request", "other-status"],
)
def test_other_google_errors_are_told_in_words(api, drive, google, status, body, code, words, can_retry):
    google.add_file("odd", "Odd", DOC, b"text")
    google.failures["odd"] = (status, body, {})
    answer = failed(run(api, drive["instance"], {"file_id": "odd"}), code)

    assert words in answer["error_message"]
    assert answer["metadata"]["can_retry"] is can_retry
    if code == "UPSTREAM_RATE_LIMITED":
        assert answer["metadata"]["retry_after_seconds"] == 3600  # a daily quota: try much later
    assert drive["credential"].status == Credential.Status.ACTIVE


def test_an_answer_that_is_not_json_is_an_upstream_error(api, drive, google, httpserver):
    httpserver.expect_oneshot_request("/drive/v3/files/html").respond_with_data(
        "<html>Bad gateway</html>", content_type="text/html"
    )
    body = failed(run(api, drive["instance"], {"file_id": "html"}), "UPSTREAM_ERROR")
    assert "Google Drive answered with something that is not JSON." in body["error_message"]


def test_google_too_slow_to_answer_is_an_upstream_error(api, drive, google, httpserver, monkeypatch):
    import urllib3

    from tools.builtin import google_api

    monkeypatch.setattr(
        google_api, "http", urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=0.3))
    )
    httpserver.expect_oneshot_request("/drive/v3/files/slow").respond_with_handler(
        lambda request: time.sleep(1) or _json({"id": "slow"})
    )
    body = failed(run(api, drive["instance"], {"file_id": "slow"}), "UPSTREAM_ERROR")
    assert "Google Drive did not answer in time" in body["error_message"]
    assert body["metadata"]["can_retry"] is True


def test_google_out_of_reach_is_an_upstream_error(api, drive, google, settings):
    settings.GOOGLE_DRIVE_API_URL = "http://127.0.0.1:9/drive/v3"  # the discard port: nothing listens
    body = failed(run(api, drive["instance"], {"file_id": "any"}), "UPSTREAM_ERROR")
    assert "Google Drive could not be reached" in body["error_message"]


def test_a_file_id_that_is_not_an_id_is_refused_before_any_call(api, drive, google):
    response = api.post(
        f"/api/v1/instances/{drive['instance']}/execute-sync", {"file_id": "../../about"}, format="json"
    )
    assert response.status_code == 400
    assert "file_id" in response.json()["metadata"]["field_errors"]
    assert google.requests == []


# --- Tokens: refreshed on a 401, refused refreshes, refreshed ahead of use ---------------------


@pytest.mark.django_db(transaction=True)
def test_an_expired_access_token_is_refreshed_once_and_the_call_retried(api, catalog, google):
    stale = "ya29.stale-" + secrets.token_urlsafe(8)  # Google no longer takes it
    credential = connect_google(api, google, access_token=stale)
    instance_id = drive_instance(api, catalog)
    google.add_sheet("sheet-r", "Plan", {"Sheet1": PLAN})

    body = run(api, instance_id, {"file_id": "sheet-r"})

    assert body["success"] is True, body
    assert body["data"]["row_count"] == 3
    (refresh,) = google.token_requests
    assert refresh["grant_type"] == "refresh_token"
    assert (refresh["client_id"], refresh["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)
    assert refresh["refresh_token"] == credential.reveal_secret()["refresh_token"]
    assert [r["auth"] for r in google.requests][0] == f"Bearer {stale}"
    new_token = google.requests[-1]["auth"].removeprefix("Bearer ")
    assert new_token != stale and new_token in google.access_tokens

    credential.refresh_from_db()
    assert credential.reveal_secret()["access_token"] == new_token
    assert credential.status == Credential.Status.ACTIVE
    assert timedelta(minutes=55) < credential.expires_at - timezone.now() <= timedelta(seconds=3599)
    execution = Execution.objects.get(pk=body["execution_id"])
    assert new_token not in json.dumps(execution.output_data)


@pytest.mark.django_db(transaction=True)
def test_a_refused_refresh_expires_the_credential_and_asks_to_reconnect(api, catalog, google):
    stale = "ya29.stale-" + secrets.token_urlsafe(8)
    credential = connect_google(api, google, access_token=stale, refresh_token="1//revoked-" + "x" * 20)
    instance_id = drive_instance(api, catalog)
    google.add_sheet("sheet-x", "Plan", {"Sheet1": PLAN})

    body = failed(run(api, instance_id, {"file_id": "sheet-x"}), "CREDENTIAL_EXPIRED")

    assert body["error_message"] == EXPIRED_MESSAGE
    reconnect = f"https://toolexec.test/credentials/oauth/google/connect/?credential={credential.pk}"
    assert body["metadata"]["action_items"] == [
        {
            "action": "fix_credential",
            "message": "Click the link below to reconnect your Google account",
            "priority": "high",
            "url": reconnect,
        }
    ]
    assert len(google.token_requests) == 1  # refreshed once, not again
    credential.refresh_from_db()
    assert credential.status == Credential.Status.EXPIRED
    assert "Token has been expired or revoked." in credential.last_error

    readiness = api.get(f"/api/v1/instances/{instance_id}/validate-execution").json()
    assert readiness["is_ready"] is False
    assert (readiness["error_code"], readiness["error_message"]) == ("CREDENTIAL_EXPIRED", EXPIRED_MESSAGE)
    assert readiness["action_items"][0]["url"] == reconnect


@pytest.mark.django_db(transaction=True)
def test_a_401_without_a_refresh_token_expires_the_credential(api, catalog, google):
    credential = connect_google(api, google, access_token="ya29.stale-token", refresh_token=None)
    instance_id = drive_instance(api, catalog)

    body = failed(run(api, instance_id, {"file_id": "any"}), "CREDENTIAL_EXPIRED")

    assert body["error_message"] == EXPIRED_MESSAGE
    assert body["metadata"]["action_items"][0]["url"].endswith(f"?credential={credential.pk}")
    assert google.token_requests == []
    credential.refresh_from_db()
    assert credential.status == Credential.Status.EXPIRED


def test_a_token_expiring_within_five_minutes_is_refreshed_before_the_run(api, catalog, google):
    credential = connect_google(api, google, expires_in=timedelta(minutes=4))
    google.rotate_refresh_tokens = True
    instance_id = drive_instance(api, catalog)
    google.add_sheet("sheet-e", "Plan", {"Sheet1": PLAN})

    body = run(api, instance_id, {"file_id": "sheet-e"})

    assert body["success"] is True, body
    assert len(google.token_requests) == 1
    credential.refresh_from_db()
    secret = credential.reveal_secret()
    assert {r["auth"] for r in google.requests} == {f"Bearer {secret['access_token']}"}  # only the new token used
    assert secret["refresh_token"] in google.refresh_tokens  # Google's new refresh token was kept
    assert credential.expires_at - timezone.now() > timedelta(minutes=55)


def test_a_token_with_time_left_is_not_refreshed(api, drive, google):
    google.add_sheet("sheet-t", "Plan", {"Sheet1": PLAN})
    assert run(api, drive["instance"], {"file_id": "sheet-t"})["success"] is True
    assert google.token_requests == []


def test_an_expired_token_whose_refresh_is_refused_is_refused_before_the_run(api, catalog, google):
    credential = connect_google(api, google, refresh_token="1//revoked-" + "y" * 20, expires_in=timedelta(minutes=-3))
    instance_id = drive_instance(api, catalog)

    response = api.post(f"/api/v1/instances/{instance_id}/execute-sync", {"file_id": "any"}, format="json")

    assert response.status_code == 409
    body = failed(response.json(), "CREDENTIAL_EXPIRED")
    assert body["error_message"] == EXPIRED_MESSAGE
    assert body["metadata"]["action_items"][0]["url"].endswith(f"?credential={credential.pk}")
    assert google.requests == []  # Drive never asked
    assert not Execution.objects.exists()
    credential.refresh_from_db()
    assert credential.status == Credential.Status.EXPIRED
    assert api.get(f"/api/v1/instances/{instance_id}/validate-execution").json()["is_ready"] is False


def test_when_google_cannot_renew_ahead_of_time_the_still_valid_token_is_used(api, catalog, google):
    credential = connect_google(api, google, expires_in=timedelta(minutes=3))
    instance_id = drive_instance(api, catalog)
    google.add_sheet("sheet-d", "Plan", {"Sheet1": PLAN})
    google.token_down = True

    body = run(api, instance_id, {"file_id": "sheet-d"})

    assert body["success"] is True, body
    assert len(google.token_requests) == 1
    credential.refresh_from_db()
    assert credential.status == Credential.Status.ACTIVE


@pytest.mark.django_db(transaction=True)  # the refresh after a 401 runs in the tool's thread
def test_an_expired_token_that_google_cannot_renew_now_ends_the_run_in_words(api, catalog, google):
    # The run goes ahead with the token it has; Google refuses it, and the renewal fails again.
    credential = connect_google(api, google, access_token="ya29.expired-token", expires_in=timedelta(minutes=-1))
    instance_id = drive_instance(api, catalog)
    google.token_down = True

    body = failed(run(api, instance_id, {"file_id": "any"}), "UPSTREAM_ERROR")

    assert "Google's sign-in service is having trouble right now." in body["error_message"]
    assert body["metadata"]["can_retry"] is True
    assert len(google.token_requests) == 2  # ahead of the run, and after the 401
    credential.refresh_from_db()
    assert credential.status == Credential.Status.ACTIVE  # nothing is wrong with the account


def test_a_rate_limited_renewal_ahead_of_the_run_uses_the_token_it_has(api, catalog, google):
    connect_google(api, google, expires_in=timedelta(minutes=2))
    instance_id = drive_instance(api, catalog)
    google.add_sheet("sheet-q", "Plan", {"Sheet1": PLAN})
    google.token_rate_limited = True

    body = run(api, instance_id, {"file_id": "sheet-q"})

    assert body["success"] is True, body
    assert len(google.token_requests) == 1


@pytest.mark.django_db(transaction=True)  # the refresh after a 401 runs in the tool's thread
def test_a_refresh_refused_for_this_servers_client_settings_leaves_the_credential_alone(api, catalog, google, settings):
    credential = connect_google(api, google, access_token="ya29.expired-token", expires_in=timedelta(minutes=-1))
    settings.GOOGLE_OAUTH_CLIENT_SECRET = "wrong"
    instance_id = drive_instance(api, catalog)

    body = failed(run(api, instance_id, {"file_id": "any"}), "UPSTREAM_ERROR")

    assert "refused this server's sign-in settings (invalid_client)" in body["error_message"]
    assert body["metadata"]["can_retry"] is False
    credential.refresh_from_db()
    assert credential.status == Credential.Status.ACTIVE  # the person's account is fine


# --- Async ------------------------------------------------------------------------------------


def test_an_async_csv_download_reports_progress_by_bytes(api, drive, google):
    pytest.importorskip("tools.tabular")
    lines = ["id,name,score"] + [f"{i},person {i},{i % 100}" for i in range(60_000)]
    csv = ("\n".join(lines) + "\n").encode()
    assert len(csv) > 1024 * 1024  # more than a megabyte: many chunks, two megabytes charged
    google.add_file("csv-big", "people.csv", "text/csv", csv)

    response = api.post(
        f"/api/v1/instances/{drive['instance']}/execute-async",
        {"file_id": "csv-big", "extract_content": True, "max_rows": 5},
        format="json",
    )
    assert response.status_code == 202, response.content
    job_id = response.json()["job_id"]
    listener = Listener(job_id)
    job_run(job_id=job_id, worker_name="test")  # the worker's side, in this process
    events = listener.wait_for_terminal()

    downloading = [e["progress"] for e in events if e.get("current_step") == "Downloading the file"]
    assert len(downloading) >= 10, events
    assert downloading == sorted(downloading)
    assert downloading[0] == 10 and downloading[-1] == 85
    assert events[-1]["status"] == "COMPLETED"

    result = api.get(f"/api/v1/instances/{drive['instance']}/jobs/{job_id}/result").json()
    assert result["status"] == "COMPLETED", result
    assert result["result"]["rows"][0] == {"id": "0", "name": "person 0", "score": "0"}
    assert (result["result"]["row_count"], result["result"]["truncated"]) == (60_000, True)
    assert result["credits_consumed"] == 0.2  # 0.1 + 2 × 0.05 (two megabytes begun)
    assert Job.objects.get(pk=job_id).progress == 100


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_an_async_sheet_read_on_a_real_worker(rq_worker, api, catalog, google, httpserver):
    connect_google(api, google)
    instance_id = drive_instance(api, catalog)
    google.add_sheet("sheet-w", "Plan", {"Sheet1": PLAN})
    rq_worker(
        GOOGLE_DRIVE_API_URL=httpserver.url_for("/drive/v3"),
        GOOGLE_SHEETS_API_URL=httpserver.url_for("/v4"),
        GOOGLE_OAUTH_TOKEN_URL=httpserver.url_for("/token"),
    )

    response = api.post(f"/api/v1/instances/{instance_id}/execute-async", {"file_id": "sheet-w"}, format="json")
    assert response.status_code == 202, response.content
    job_id = response.json()["job_id"]
    wait_for(lambda: Job.objects.get(pk=job_id).status in Job.TERMINAL, timeout=30, message="the job to end")

    result = api.get(f"/api/v1/instances/{instance_id}/jobs/{job_id}/result").json()
    assert result["status"] == "COMPLETED", result
    assert result["result"]["columns"] == ["Region", "Owner", "Target", "Notes"]
    assert result["credits_consumed"] == 0.15
    assert Decimal(str(result["credits_consumed"])) == Decimal("0.15")
