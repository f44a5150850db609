"""The spreadsheet reader through HTTP: upload a CSV or XLSX file (made here, with openpyxl
for workbooks), create an instance, run it sync and async, and read the rows; every bad file
answers INPUT_INVALID in words, never a 500; credits 0.01 plus 0.01 per 1,000 rows.

Runs are ``django_db(transaction=True)``: a sync run's tool works in a thread of its own (with
its own database connection) and an async one on a real worker process, and both must see
the uploaded file's row committed.
"""

from __future__ import annotations

import csv
import io
import re
from decimal import Decimal
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from openpyxl import Workbook
from rest_framework.test import APIClient

from executions.models import Execution
from instances.models import UploadedFile
from tests.conftest import wait_for
from tests.job_events import Listener
from tools.builtin.spreadsheet_reader import SpreadsheetReader
from tools.errors import InputInvalid
from tools.sdk import ExecutionContext

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PEOPLE_CSV = b"name,age,city\nAda,36,London\nLinus,28,Helsinki\n"
RESULT_KEYS = {"file", "format", "sheet_name", "sheets", "columns", "rows", "row_count", "truncated"}


# --- helpers ----------------------------------------------------------------------------


def workbook_bytes(*sheets: tuple[str, list[list[Any]]]) -> bytes:
    workbook = Workbook()
    workbook.remove(workbook.active)
    for title, rows in sheets:
        sheet = workbook.create_sheet(title)
        for row in rows:
            sheet.append(row)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def upload(client: APIClient, content: bytes, name: str, content_type: str = "text/csv") -> dict[str, Any]:
    response = client.post(
        "/api/v1/files/", {"file": SimpleUploadedFile(name, content, content_type)}, format="multipart"
    )
    assert response.status_code == 201, response.content
    return response.json()


@pytest.fixture
def reader(api, catalog) -> dict[str, Any]:
    """An instance of the spreadsheet reader, created through the API."""
    response = api.post(
        "/api/v1/instances/", {"tool_definition_id": "spreadsheet-reader", "name": "Read uploads"}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "ACTIVE"  # no credential needed
    return body


def run_sync(client: APIClient, instance: dict[str, Any], inputs: dict[str, Any]) -> Any:
    return client.post(f"/api/v1/instances/{instance['id']}/execute-sync", inputs, format="json")


def succeeded(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is True, body
    assert set(body["data"]) == RESULT_KEYS
    return body


def input_invalid(response: Any, *, status: int = 200) -> dict[str, Any]:
    """INPUT_INVALID in the envelope, in words; 200 when the tool ran and found the file bad."""
    assert response.status_code == status, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "INPUT_INVALID"
    message = body["error_message"]
    assert message.strip() and "{" not in message and "Traceback" not in message
    assert isinstance(body["metadata"]["field_errors"], dict)
    return body


def csv_of(rows: int, columns: int = 3) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([f"col{c}" for c in range(columns)])
    writer.writerows([f"r{i}c{c}" for c in range(columns)] for i in range(rows))
    return out.getvalue().encode()


# --- sync runs --------------------------------------------------------------------------


def test_a_csv_file_is_read_into_rows_keyed_by_its_header(api, reader) -> None:
    file = upload(api, PEOPLE_CSV, "people.csv")

    body = succeeded(run_sync(api, reader, {"file_id": file["id"]}))

    assert body["data"] == {
        "file": {
            "id": file["id"],
            "name": "people.csv",
            "size_bytes": len(PEOPLE_CSV),
            "content_type": "text/csv",
            "sha256": file["sha256"],
        },
        "format": "csv",
        "sheet_name": None,
        "sheets": [],
        "columns": ["name", "age", "city"],
        "rows": [
            {"name": "Ada", "age": "36", "city": "London"},
            {"name": "Linus", "age": "28", "city": "Helsinki"},
        ],
        "row_count": 2,
        "truncated": False,
    }
    assert body["credits_consumed"] == 0.01
    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.status == Execution.Status.COMPLETED
    assert execution.input_data == {"file_id": file["id"]}


def test_a_semicolon_csv_with_a_bom_reads(api, reader) -> None:
    file = upload(api, "\ufeffnom;ville\nZoë;Zürich\n".encode(), "villes.csv")

    data = succeeded(run_sync(api, reader, {"file_id": file["id"]}))["data"]

    assert data["rows"] == [{"nom": "Zoë", "ville": "Zürich"}]


def test_an_xlsx_sheet_is_read_with_typed_values(api, reader) -> None:
    content = workbook_bytes(
        ("Summary", [["Total"], [3]]),
        (
            "Orders",
            [["Orders, May 2024"], ["sku", "qty", "price", "shipped"], ["A-1", 2, 9.5, True], ["B-7", 1, 120, False]],
        ),
    )
    file = upload(api, content, "orders.xlsx", XLSX_TYPE)

    data = succeeded(run_sync(api, reader, {"file_id": file["id"], "sheet_name": "Orders", "header_row": 2}))["data"]

    assert data["format"] == "xlsx"
    assert data["sheet_name"] == "Orders"
    assert data["sheets"] == ["Summary", "Orders"]
    assert data["columns"] == ["sku", "qty", "price", "shipped"]
    assert data["rows"] == [
        {"sku": "A-1", "qty": 2, "price": 9.5, "shipped": True},
        {"sku": "B-7", "qty": 1, "price": 120, "shipped": False},
    ]


def test_the_first_sheet_is_read_by_default(api, reader) -> None:
    file = upload(api, workbook_bytes(("First", [["a"], [1]]), ("Second", [["b"], [2]])), "two.xlsx", XLSX_TYPE)

    data = succeeded(run_sync(api, reader, {"file_id": file["id"]}))["data"]

    assert data["sheet_name"] == "First" and data["rows"] == [{"a": 1}]


def test_max_rows_truncates_and_credits_count_every_row_read(api, reader, user) -> None:
    file = upload(api, csv_of(2500), "big.csv")

    body = succeeded(run_sync(api, reader, {"file_id": file["id"], "max_rows": 10}))

    assert len(body["data"]["rows"]) == 10
    assert body["data"]["rows"][0] == {"col0": "r0c0", "col1": "r0c1", "col2": "r0c2"}
    assert body["data"]["row_count"] == 2500
    assert body["data"]["truncated"] is True
    assert body["credits_consumed"] == 0.035  # 0.01 + 0.01 × 2.5
    assert Execution.objects.get(pk=body["execution_id"]).credits_consumed == Decimal("0.0350")


def test_the_catalog_describes_the_tool(api, catalog) -> None:
    body = api.get("/api/v1/tools/spreadsheet-reader/").json()

    assert body["name"] == "Spreadsheet Reader"
    assert set(body["modes"]) == {"sync", "async"}
    assert body["credential_slots"] == []
    assert body["input_schema"]["required"] == ["file_id"]


# --- bad files and bad inputs -------------------------------------------------------------


def test_a_file_that_is_no_spreadsheet_is_input_invalid(api, reader) -> None:
    file = upload(api, b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "report.pdf", "application/pdf")

    body = input_invalid(run_sync(api, reader, {"file_id": file["id"]}))

    assert body["error_message"] == (
        "'report.pdf' is a PDF document, not a spreadsheet. Upload a CSV (UTF-8) or Excel (.xlsx) file."
    )
    assert body["metadata"]["field_errors"] == {"file_id": [body["error_message"]]}
    assert Execution.objects.get(pk=body["execution_id"]).status == Execution.Status.FAILED


def test_an_old_xls_workbook_is_input_invalid_with_what_to_do(api, reader) -> None:
    file = upload(api, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 512, "old.xls", "application/vnd.ms-excel")

    body = input_invalid(run_sync(api, reader, {"file_id": file["id"]}))

    assert "Excel 97–2003" in body["error_message"] and ".xlsx" in body["error_message"]


def test_a_corrupt_xlsx_is_input_invalid(api, reader) -> None:
    content = workbook_bytes(("S", [["a"], [1]]))
    file = upload(api, content[: len(content) // 2], "broken.xlsx", XLSX_TYPE)

    body = input_invalid(run_sync(api, reader, {"file_id": file["id"]}))

    assert body["error_message"] == (
        "The file could not be opened as an Excel workbook (.xlsx): it is damaged or not a workbook."
    )


def test_an_unknown_sheet_is_input_invalid_naming_the_sheets(api, reader) -> None:
    file = upload(api, workbook_bytes(("Orders", [["a"]]), ("Customers", [["b"]])), "book.xlsx", XLSX_TYPE)

    body = input_invalid(run_sync(api, reader, {"file_id": file["id"], "sheet_name": "Invoices"}))

    assert body["error_message"] == (
        "The workbook has no sheet named 'Invoices'; its sheets are: 'Orders', 'Customers'."
    )
    assert list(body["metadata"]["field_errors"]) == ["sheet_name"]


def test_a_csv_in_another_encoding_is_input_invalid(api, reader) -> None:
    file = upload(api, "name\nZoë\n".encode("latin-1"), "latin1.csv")

    body = input_invalid(run_sync(api, reader, {"file_id": file["id"]}))

    assert "not UTF-8" in body["error_message"]


def test_a_header_row_past_the_end_is_input_invalid(api, reader) -> None:
    file = upload(api, PEOPLE_CSV, "people.csv")

    body = input_invalid(run_sync(api, reader, {"file_id": file["id"], "header_row": 10}))

    assert list(body["metadata"]["field_errors"]) == ["header_row"]


def test_another_users_file_is_no_file_at_all(api, other_api, reader) -> None:
    theirs = upload(other_api, PEOPLE_CSV, "their-secret-plans.csv")

    body = input_invalid(run_sync(api, reader, {"file_id": theirs["id"]}))

    assert body["metadata"]["field_errors"] == {"file_id": ["No uploaded file with this id."]}
    assert "their-secret-plans" not in str(body)


def test_a_deleted_file_is_no_file_at_all(api, reader) -> None:
    file = upload(api, PEOPLE_CSV, "people.csv")
    assert api.delete(f"/api/v1/files/{file['id']}/").status_code == 204

    body = input_invalid(run_sync(api, reader, {"file_id": file["id"]}))

    assert body["metadata"]["field_errors"] == {"file_id": ["No uploaded file with this id."]}


def test_a_file_whose_stored_bytes_are_gone_says_so(api, reader) -> None:
    file = upload(api, PEOPLE_CSV, "people.csv")
    row = UploadedFile.objects.get(pk=file["id"])
    row.file.storage.delete(row.file.name)

    body = input_invalid(run_sync(api, reader, {"file_id": file["id"]}))

    assert "no longer stored" in body["error_message"]
    assert row.file.name not in str(body)  # no internal path in the answer


def test_a_file_id_that_is_no_id_is_refused_before_running(api, reader) -> None:
    body = input_invalid(run_sync(api, reader, {"file_id": "people.csv"}), status=400)

    assert "file_id" in body["metadata"]["field_errors"]
    assert not Execution.objects.exists()


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({}, "file_id"),
        ({"file_id": "0b8f1c1e-2f1a-4c52-9a57-2f4f1f0e9d11", "max_rows": 100_001}, "max_rows"),
        ({"file_id": "0b8f1c1e-2f1a-4c52-9a57-2f4f1f0e9d11", "header_row": 0}, "header_row"),
        ({"file_id": "0b8f1c1e-2f1a-4c52-9a57-2f4f1f0e9d11", "sheet": "x"}, "sheet"),
    ],
)
def test_inputs_outside_the_schema_are_refused_naming_the_field(api, reader, inputs, field) -> None:
    body = input_invalid(run_sync(api, reader, inputs), status=400)

    assert field in body["metadata"]["field_errors"]


# --- the tool on its own ----------------------------------------------------------------


def test_progress_is_reported_every_thousand_rows_and_usage_counts_the_rows() -> None:
    reports: list[tuple[int, str]] = []
    meta = {"id": "f", "name": "rows.csv", "size_bytes": 0, "content_type": "text/csv", "sha256": ""}
    ctx = ExecutionContext(
        execution_id="test",
        files=lambda file_id: (meta, io.BytesIO(csv_of(4500))),
        progress_sink=lambda percent, step, index, total: reports.append((percent, step)),
    )

    result = SpreadsheetReader().run({"file_id": "f", "max_rows": 0}, ctx)

    assert result["row_count"] == 4500 and result["rows"] == [] and result["truncated"] is True
    steps = [step for _, step in reports]
    assert steps[0] == "Reading rows.csv"
    counted = [re.fullmatch(r"Read ([\d,]+) of about [\d,]+ rows of rows\.csv", step) for step in steps[1:-1]]
    assert [match and match[1] for match in counted] == ["1,000", "2,000", "3,000", "4,000"]
    assert steps[-1] == "Read 4,500 rows"
    percents = [percent for percent, _ in reports]
    assert percents == sorted(percents) and percents[-1] == 100 and 0 < percents[1] < 100
    assert ctx.units == Decimal("4.5")
    assert SpreadsheetReader.credits_for(ctx.units) == Decimal("0.0550")


def test_a_context_without_files_has_no_file() -> None:
    with pytest.raises(InputInvalid) as caught:
        ExecutionContext(execution_id="test").open_file("0b8f1c1e-2f1a-4c52-9a57-2f4f1f0e9d11")

    assert caught.value.metadata["field_errors"] == {"file_id": ["No uploaded file with this id."]}


# --- async, on a real worker --------------------------------------------------------------


@pytest.mark.redis
def test_a_100000_row_file_is_read_async_with_progress_rising_to_completed(api, reader, rq_worker) -> None:
    file = upload(api, csv_of(100_000, columns=12), "hundred-thousand.csv")

    accepted = api.post(
        f"/api/v1/instances/{reader['id']}/execute-async", {"file_id": file["id"], "max_rows": 5}, format="json"
    )
    assert accepted.status_code == 202, accepted.content
    job = accepted.json()
    # Every progress change is published live; the database gets the latest once a second,
    # which a read this quick may never need.
    listener = Listener(job["job_id"])
    rq_worker()

    seen: list[dict[str, Any]] = []

    def finished() -> bool:
        response = api.get(job["progress_url"])
        assert response.status_code == 200, response.content
        seen.append(response.json())
        return seen[-1]["status"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}

    wait_for(finished, timeout=120, interval=0.05, message="the read to finish")
    published = listener.wait_for_terminal()
    result = api.get(job["result_url"]).json()

    assert result["status"] == "COMPLETED", result
    assert result["result"]["row_count"] == 100_000
    assert result["result"]["truncated"] is True
    assert len(result["result"]["rows"]) == 5
    assert result["result"]["rows"][4]["col11"] == "r4c11"
    assert result["credits_consumed"] == 1.01  # 0.01 + 0.01 × 100
    progress = [p["progress"] for p in seen]
    assert progress == sorted(progress), progress
    assert seen[-1]["progress"] == 100
    rising = [e for e in published if e["event"] == "progress"]
    assert [e["progress"] for e in rising] == sorted(e["progress"] for e in rising)
    assert any(0 < e["progress"] < 100 for e in rising), published
    assert any(
        e["current_step"].startswith("Read ") and " rows of hundred-thousand.csv" in e["current_step"] for e in rising
    ), rising
    assert (published[-1]["status"], published[-1]["progress"]) == ("COMPLETED", 100)


@pytest.mark.redis
def test_a_bad_file_read_async_fails_with_input_invalid(api, reader, rq_worker) -> None:
    rq_worker()
    file = upload(api, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "photo.png", "image/png")

    accepted = api.post(f"/api/v1/instances/{reader['id']}/execute-async", {"file_id": file["id"]}, format="json")
    assert accepted.status_code == 202, accepted.content

    result = wait_for(
        lambda: (
            (body := api.get(accepted.json()["result_url"]).json())["status"] != "QUEUED"
            and body["status"] != "RUNNING"
            and body
        ),
        timeout=60,
        interval=0.2,
        message="the job to end",
    )
    assert result["status"] == "FAILED"
    assert result["error_code"] == "INPUT_INVALID"
    assert result["error_message"] == (
        "'photo.png' is a PNG image, not a spreadsheet. Upload a CSV (UTF-8) or Excel (.xlsx) file."
    )


def test_a_thousand_xlsx_rows_read_sync(api, reader) -> None:
    content = workbook_bytes(("S", [["n", "word"]] + [[i, f"w{i}"] for i in range(1000)]))
    file = upload(api, content, "thousand.xlsx", XLSX_TYPE)

    body = succeeded(run_sync(api, reader, {"file_id": file["id"]}))

    assert body["data"]["row_count"] == 1000 and body["data"]["rows"][-1] == {"n": 999, "word": "w999"}
    assert body["credits_consumed"] == 0.02
