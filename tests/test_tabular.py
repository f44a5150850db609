"""tools/tabular.py: CSV and XLSX files read as tables, and every file that can't be read
refused with InputInvalid in words. Workbooks are made in the test with openpyxl."""

from __future__ import annotations

import csv
import io
import zipfile
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pytest
from openpyxl import Workbook
from openpyxl.chart import BarChart, Reference

from tools.errors import InputInvalid
from tools.tabular import Table, json_safe, parse_csv, parse_table, parse_xlsx, sniff_kind

# --- helpers ----------------------------------------------------------------------------


def xlsx(*sheets: tuple[str, list[list[Any]]], write_only: bool = False) -> bytes:
    """A workbook with the given sheets (name, rows), as the bytes of an .xlsx file."""
    workbook = Workbook(write_only=write_only)
    if not write_only:
        workbook.remove(workbook.active)
    for title, rows in sheets:
        sheet = workbook.create_sheet(title)
        for row in rows:
            sheet.append(row)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def rewrite_member(data: bytes, suffix: str, change: Any) -> bytes:
    """The zip ``data`` with the member whose name ends in ``suffix`` passed through ``change``."""
    source, target = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in source.infolist():
            content = source.read(item.filename)
            out.writestr(item, change(content) if item.filename.endswith(suffix) else content)
    return target.getvalue()


def refusal(call: Any, *args: Any, **kwargs: Any) -> InputInvalid:
    with pytest.raises(InputInvalid) as caught:
        call(*args, **kwargs)
    error = caught.value
    assert error.detail and "{" not in error.detail
    assert "Traceback" not in error.detail and "Error" not in error.detail.split()[0]
    return error


PEOPLE_CSV = b"name,age,city\nAda,36,London\nLinus,28,Helsinki\n"


# --- CSV --------------------------------------------------------------------------------


def test_csv_rows_are_keyed_by_the_header_and_stay_strings() -> None:
    table = parse_csv(PEOPLE_CSV)

    assert table == Table(
        columns=["name", "age", "city"],
        rows=[
            {"name": "Ada", "age": "36", "city": "London"},
            {"name": "Linus", "age": "28", "city": "Helsinki"},
        ],
        row_count=2,
        truncated=False,
        sheet_name=None,
        sheets=[],
    )


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_csv_delimiter_is_sniffed(delimiter: str) -> None:
    data = f"id{delimiter}label\n1{delimiter}one, two\n2{delimiter}three\n".encode()
    if delimiter == ",":
        data = b'id,label\n1,"one, two"\n2,three\n'

    table = parse_csv(data)

    assert table.columns == ["id", "label"]
    assert table.rows[0] == {"id": "1", "label": "one, two"}


def test_ragged_rows_still_get_the_headers_delimiter() -> None:
    table = parse_csv(b"a;b;c\n1;2\n3;4;5;6\n")

    assert table.columns == ["a", "b", "c", "column_4"]
    assert table.rows == [
        {"a": "1", "b": "2", "c": None, "column_4": None},
        {"a": "3", "b": "4", "c": "5", "column_4": "6"},
    ]


def test_a_single_column_file_reads() -> None:
    assert parse_csv(b"email\nada@example.com\n").rows == [{"email": "ada@example.com"}]


def test_utf8_bom_is_stripped_and_text_kept() -> None:
    table = parse_csv("\ufeffnom,ville\nZoë,Zürich\n".encode())

    assert table.columns == ["nom", "ville"]
    assert table.rows == [{"nom": "Zoë", "ville": "Zürich"}]


def test_quoted_cells_may_hold_line_breaks_and_quotes() -> None:
    table = parse_csv(b'note,n\r\n"first line\r\nsecond ""quoted""",1\r\n')

    assert table.rows == [{"note": 'first line\r\nsecond "quoted"', "n": "1"}]


def test_empty_and_repeated_header_names_are_made_unique() -> None:
    table = parse_csv(b"name,,name,a,a,a_2\n1,2,3,4,5,6\n")

    assert table.columns == ["name", "column_2", "name_2", "a", "a_3", "a_2"]
    assert table.rows[0] == {"name": "1", "column_2": "2", "name_2": "3", "a": "4", "a_3": "5", "a_2": "6"}


def test_header_row_skips_the_rows_above_it() -> None:
    table = parse_csv(b"Quarterly report\n\nregion,total\nnorth,10\n", header_row=3)

    assert table.columns == ["region", "total"]
    assert table.rows == [{"region": "north", "total": "10"}]


def test_blank_rows_are_skipped_and_not_counted() -> None:
    table = parse_csv(b"a,b\n1,2\n\n,\n3,4\n")

    assert table.row_count == 2
    assert [row["a"] for row in table.rows] == ["1", "3"]


def test_max_rows_keeps_the_first_rows_and_counts_them_all() -> None:
    data = "n\n" + "".join(f"{i}\n" for i in range(1, 2501))

    table = parse_csv(data.encode(), max_rows=3)

    assert [row["n"] for row in table.rows] == ["1", "2", "3"]
    assert table.row_count == 2500
    assert table.truncated is True
    assert parse_csv(data.encode(), max_rows=2500).truncated is False
    assert parse_csv(data.encode(), max_rows=0).rows == []


def test_on_row_is_called_for_every_data_row_and_on_total_estimates_them() -> None:
    data = "n,word\n" + "".join(f"{i},word{i % 10}\n" for i in range(5000))
    seen: list[int] = []
    totals: list[int] = []

    parse_csv(io.BytesIO(data.encode()), on_row=seen.append, on_total=totals.append, max_rows=1)

    assert seen == list(range(1, 5001))
    assert len(totals) == 1 and 4000 <= totals[0] <= 6000


def test_what_on_row_raises_stops_the_read() -> None:
    class Stop(Exception):
        pass

    def stop_at_two(n: int) -> None:
        if n == 2:
            raise Stop

    with pytest.raises(Stop):
        parse_csv(PEOPLE_CSV, on_row=stop_at_two)


def test_a_stream_reads_like_bytes() -> None:
    assert parse_csv(io.BytesIO(PEOPLE_CSV)) == parse_csv(PEOPLE_CSV)


def test_a_large_csv_streams() -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "name", "amount"])
    writer.writerows([i, f"name {i}", i * 1.5] for i in range(100_000))

    table = parse_csv(io.BytesIO(out.getvalue().encode()), max_rows=10)

    assert table.row_count == 100_000
    assert table.rows[9] == {"id": "9", "name": "name 9", "amount": "13.5"}


def test_non_utf8_text_is_refused_in_words() -> None:
    error = refusal(parse_csv, "name\nZoë\n".encode("latin-1"))

    assert "not UTF-8" in error.detail
    assert error.metadata["field_errors"] == {"file_id": [error.detail]}


def test_non_utf8_bytes_far_into_the_file_are_refused_too() -> None:
    data = b"a,b\n" + b"x,y\n" * 50_000 + "Zoë,z\n".encode("cp1252")

    assert "not UTF-8" in refusal(parse_csv, io.BytesIO(data)).detail


def test_utf16_text_is_refused_with_what_to_do() -> None:
    error = refusal(parse_csv, "name\nAda\n".encode("utf-16"))

    assert "UTF-16" in error.detail and "UTF-8" in error.detail


def test_binary_data_is_refused() -> None:
    assert "binary" in refusal(parse_csv, b"\x00\x01\x02garbage").detail


def test_a_nul_byte_far_into_the_file_is_refused() -> None:
    data = b"a,b\n" + b"x,y\n" * 20_000 + b"x\x00,y\n"

    assert "binary" in refusal(parse_csv, data).detail


def test_an_empty_file_has_no_header() -> None:
    error = refusal(parse_csv, b"")

    assert error.detail == "The file is empty: there is no header row to read."
    assert "file_id" in error.metadata["field_errors"]


def test_a_header_row_past_the_end_is_refused_naming_the_field() -> None:
    error = refusal(parse_csv, PEOPLE_CSV, header_row=7)

    assert "has 3 rows" in error.detail and "row 7" in error.detail
    assert list(error.metadata["field_errors"]) == ["header_row"]


def test_a_cell_too_large_for_csv_is_refused() -> None:
    data = b"a\n" + b"x" * (csv.field_size_limit() + 10) + b"\n"

    assert "could not be read as CSV" in refusal(parse_csv, data).detail


def test_the_field_named_in_errors_can_be_chosen() -> None:
    error = refusal(parse_csv, b"", file_field="drive_file_id")

    assert list(error.metadata["field_errors"]) == ["drive_file_id"]


def test_bad_options_are_refused() -> None:
    assert "header_row" in refusal(parse_csv, PEOPLE_CSV, header_row=0).metadata["field_errors"]
    assert "max_rows" in refusal(parse_csv, PEOPLE_CSV, max_rows=-1).metadata["field_errors"]


# --- XLSX -------------------------------------------------------------------------------


def test_xlsx_first_sheet_by_default_with_json_safe_values() -> None:
    data = xlsx(
        (
            "People",
            [
                ["Name", "Born", "Seen", "At", "Took", "Score", "Member", "Big"],
                [
                    "Ada",
                    date(1815, 12, 10),
                    datetime(2024, 5, 1, 9, 30, 15),
                    time(13, 45),
                    timedelta(hours=26, minutes=3, seconds=4),
                    1.5,
                    True,
                    Decimal("12.25"),
                ],
                ["Linus", None, None, None, None, 7, False, None],
            ],
        ),
        ("Other", [["x"], [1]]),
    )

    table = parse_xlsx(data)

    assert table.sheet_name == "People" and table.format == "xlsx"
    assert table.sheets == ["People", "Other"]
    assert table.columns == ["Name", "Born", "Seen", "At", "Took", "Score", "Member", "Big"]
    assert table.rows[0] == {
        "Name": "Ada",
        "Born": "1815-12-10T00:00:00",
        "Seen": "2024-05-01T09:30:15",
        "At": "13:45:00",
        "Took": "26:03:04",
        "Score": 1.5,
        "Member": True,
        "Big": 12.25,
    }
    assert table.rows[1]["Score"] == 7 and table.rows[1]["Born"] is None
    assert table.row_count == 2 and table.truncated is False


def test_xlsx_named_sheet_and_header_row() -> None:
    data = xlsx(("Summary", [["nothing"]]), ("Detail", [["Detail report"], [], ["sku", "qty"], ["A-1", 3]]))

    table = parse_xlsx(io.BytesIO(data), sheet_name="Detail", header_row=3)

    assert table.sheet_name == "Detail"
    assert table.rows == [{"sku": "A-1", "qty": 3}]


def test_xlsx_headers_that_are_numbers_or_missing_get_names() -> None:
    data = xlsx(("S", [[2024, 2025.0, None, "total", "total"], [1, 2, 3, 4, 5]]))

    assert parse_xlsx(data).columns == ["2024", "2025", "column_3", "total", "total_2"]


def test_xlsx_blank_rows_and_trailing_empty_columns_are_skipped() -> None:
    data = xlsx(("S", [["a", "b", None, None], [1, None, None, None], [None, None, None, None], [None, 2, None, "x"]]))

    table = parse_xlsx(data)

    assert table.columns == ["a", "b", "column_3", "column_4"]
    assert table.rows == [
        {"a": 1, "b": None, "column_3": None, "column_4": None},
        {"a": None, "b": 2, "column_3": None, "column_4": "x"},
    ]
    assert table.row_count == 2


def test_xlsx_max_rows_counts_every_row_and_reports_progress() -> None:
    data = xlsx(("S", [["n"]] + [[i] for i in range(1, 2501)]))
    seen: list[int] = []
    totals: list[int] = []

    table = parse_xlsx(data, max_rows=5, on_row=seen.append, on_total=totals.append)

    assert [row["n"] for row in table.rows] == [1, 2, 3, 4, 5]
    assert table.row_count == 2500 and table.truncated is True
    assert seen[-1] == 2500 and len(seen) == 2500
    assert totals == [2500]


def test_xlsx_without_a_stored_dimension_is_counted_for_the_estimate() -> None:
    data = xlsx(("S", [["n"]] + [[i] for i in range(1, 1201)]), write_only=True)
    totals: list[int] = []

    table = parse_xlsx(data, on_total=totals.append, max_rows=0)

    assert table.row_count == 1200
    assert totals == [1200]


def test_xlsx_with_a_wrong_stored_dimension_is_read_to_the_end() -> None:
    data = xlsx(("S", [["n"], [1], [2], [3]]))
    data = rewrite_member(
        data, "sheet1.xml", lambda xml: xml.replace(b'<dimension ref="A1:A4"/>', b'<dimension ref="A1"/>')
    )

    assert parse_xlsx(data).row_count == 3


def test_unknown_sheet_is_refused_naming_the_sheets_there_are() -> None:
    data = xlsx(("Orders", [["a"]]), ("Customers", [["b"]]))

    error = refusal(parse_xlsx, data, sheet_name="orders")

    assert error.detail == "The workbook has no sheet named 'orders'; its sheets are: 'Orders', 'Customers'."
    assert error.metadata["field_errors"] == {"sheet_name": [error.detail]}


def test_a_chart_sheet_is_refused() -> None:
    workbook = Workbook()
    workbook.active.title = "Data"
    workbook.active.append([1])
    chart = BarChart()
    chart.add_data(Reference(workbook.active, min_col=1, min_row=1, max_row=1))
    workbook.create_chartsheet("Chart").add_chart(chart)
    buffer = io.BytesIO()
    workbook.save(buffer)

    error = refusal(parse_xlsx, buffer.getvalue(), sheet_name="Chart")

    assert "is a chart" in error.detail and "'Data'" in error.detail


def test_an_empty_sheet_has_no_header() -> None:
    data = xlsx(("Empty", []))

    assert refusal(parse_xlsx, data).detail == "The sheet 'Empty' is empty: there is no header row to read."


def test_an_xlsx_header_row_past_the_end_is_refused() -> None:
    data = xlsx(("S", [["a"], [1]]))

    error = refusal(parse_xlsx, data, header_row=9)

    assert "no row 9" in error.detail and list(error.metadata["field_errors"]) == ["header_row"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"PK\x03\x04" + b"\x00" * 200, id="zip header only"),
        pytest.param(lambda data: b"not a zip at all", id="not a zip"),
    ],
)
def test_a_corrupt_workbook_is_refused_in_words(damage: Any) -> None:
    data = damage(xlsx(("S", [["a"], [1]])))

    error = refusal(parse_xlsx, data)

    assert error.detail == (
        "The file could not be opened as an Excel workbook (.xlsx): it is damaged or not a workbook."
    )
    assert "file_id" in error.metadata["field_errors"]


def test_a_chart_sheet_without_a_chart_is_refused_as_unreadable() -> None:
    workbook = Workbook()
    workbook.create_chartsheet("Chart")  # openpyxl itself cannot open this file again
    buffer = io.BytesIO()
    workbook.save(buffer)

    assert "could not be opened" in refusal(parse_xlsx, buffer.getvalue()).detail


def test_a_zip_that_is_no_workbook_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")

    assert "not a workbook" in refusal(parse_xlsx, buffer.getvalue()).detail


def test_a_damaged_sheet_inside_a_workbook_is_refused() -> None:
    data = xlsx(("S", [["n"]] + [[i] for i in range(500)]))
    data = rewrite_member(data, "sheet1.xml", lambda xml: xml[: len(xml) // 2])

    error = refusal(parse_xlsx, data)

    assert error.detail == "The sheet 'S' could not be read: the workbook is damaged."


# --- Which kind of file, and parse_table ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content_type", "head", "kind"),
    [
        ("people.csv", "text/csv", b"a,b\n1,2\n", "csv"),
        ("export.xls", "application/vnd.ms-excel", b"a\tb\n1\t2\n", "csv"),  # TSV named .xls: read it
        ("data", "", "\ufeffname\n".encode(), "csv"),
        ("people.xlsx", "", b"PK\x03\x04rest", "xlsx"),
        ("people.csv", "", b"PK\x03\x04rest", "xlsx"),  # the content decides
        ("empty.csv", "", b"", "csv"),
        ("empty.xlsx", "", b"", "xlsx"),
        ("empty", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", b"", "xlsx"),
        ("empty", "", b"", None),
        ("report.pdf", "application/pdf", b"%PDF-1.7\n", None),
        ("old.xls", "", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00", None),
        ("photo.png", "image/png", b"\x89PNG\r\n\x1a\n", None),
        ("blob", "", b"\x01\x02\x00\x03", None),
        (
            "sheet.ods",
            "",
            b"PK\x03\x04" + b"\x00" * 26 + b"mimetypeapplication/vnd.oasis.opendocument.spreadsheet",
            None,
        ),
    ],
)
def test_sniff_kind(name: str, content_type: str, head: bytes, kind: str | None) -> None:
    assert sniff_kind(name, content_type, head) == kind


def test_parse_table_reads_either_kind() -> None:
    csv_table = parse_table(io.BytesIO(PEOPLE_CSV), name="people.csv", sheet_name="ignored for CSV")
    xlsx_table = parse_table(io.BytesIO(xlsx(("P", [["name"], ["Ada"]]))), name="people.xlsx")

    assert csv_table.row_count == 2 and csv_table.sheet_name is None and csv_table.format == "csv"
    assert xlsx_table.rows == [{"name": "Ada"}] and xlsx_table.sheets == ["P"]


@pytest.mark.parametrize(
    ("head", "words"),
    [
        (b"%PDF-1.7\n%binary", "'report.bin' is a PDF document, not a spreadsheet."),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00", "'report.bin' is an Excel 97–2003 workbook (.xls)"),
        (b"PK\x03\x04" + b"\x00" * 26 + b"mimetypeapplication/vnd.oasis.opendocument.spreadsheet", "(.ods)"),
        (b"\x7fELF\x02\x01\x01\x00", "'report.bin' is a binary file, not a spreadsheet."),
        (b"", "'report.bin' is empty."),
    ],
)
def test_parse_table_says_what_a_file_is_when_it_is_no_spreadsheet(head: bytes, words: str) -> None:
    error = refusal(parse_table, io.BytesIO(head), name="report.bin")

    assert words in error.detail
    assert error.metadata["field_errors"] == {"file_id": [error.detail]}


def test_json_safe_values() -> None:
    assert json_safe(float("nan")) is None
    assert json_safe(float("inf")) is None
    assert json_safe(Decimal("NaN")) is None
    assert json_safe(Decimal("1.10")) == 1.1
    assert json_safe(timedelta(seconds=-90)) == "-0:01:30"
    assert json_safe(timedelta(seconds=1.5)) == "0:00:01.5"
    assert json_safe(object.__new__(type("Odd", (), {"__str__": lambda self: "odd"}))) == "odd"
