"""Tables out of CSV and XLSX files, for the tools that read spreadsheets.

Plain functions over bytes or binary streams (no database, no Django models): a tool hands
them a file it got from the platform and gets back a :class:`Table` of rows keyed by the
header row. A file that cannot be read as a table raises
:class:`~tools.errors.InputInvalid` saying why, in words a person understands.

Conventions shared by both formats:

- ``header_row`` is the 1-based row number of the header, as a spreadsheet shows it; rows
  above it are skipped. Header names are stripped; an empty one becomes ``column_<n>`` (its
  1-based position) and a repeated one gets a suffix (``name``, ``name_2``, ``name_3``).
- Rows with no value at all are skipped and not counted. A cell beyond the header's columns
  adds a column (``column_<n>``) when it holds a value. A row shorter than the header has
  ``None`` for the cells it lacks.
- ``row_count`` counts every data row in the file; ``rows`` holds at most ``max_rows`` of
  them, and ``truncated`` says when that cut some off.
- ``on_row(n)`` is called after each data row is read (``n`` counts them from 1), so a tool
  can report progress and stop when it is cancelled; whatever it raises is not caught.
  ``on_total(estimate)`` is called once, before the first data row, with an estimate of the
  number of data rows when one is cheap to make.

CSV cells stay strings (no guessing: "02134" is a postcode, not a number); XLSX cells keep
their types, made JSON-safe: dates and times as ISO 8601 strings, durations as
``H:MM:SS``, Decimal as numbers, NaN and infinities as ``None``.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import IO, Any

from .errors import InputInvalid

CSV = "csv"
XLSX = "xlsx"

HEAD_BYTES = 8192  # what sniff_kind needs to see of a file
_SNIFF_CHARS = 32 * 1024  # the sample the CSV dialect is guessed from
_DELIMITERS = ",;\t|"
_ZIP_MAGIC = b"PK\x03\x04"
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # .xls, and Office files with a password
_BINARY_KINDS = (
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
)
_ODS_MIMETYPE = b"mimetypeapplication/vnd.oasis.opendocument.spreadsheet"
_CSV_HINTS = ("text/", "application/csv", "application/vnd.ms-excel")
_XLSX_HINTS = ("spreadsheetml", "ms-excel.sheet")
_SAVE_AS = "Save it as CSV (UTF-8) or as an Excel workbook (.xlsx) and upload it again."

OnRow = Callable[[int], None]
OnTotal = Callable[[int], None]


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]
    row_count: int
    truncated: bool
    sheet_name: str | None = None
    sheets: list[str] = field(default_factory=list)
    format: str = CSV  # "csv" or "xlsx"


# --- Which kind of file -------------------------------------------------------------------


def sniff_kind(name: str, content_type: str, head_bytes: bytes) -> str | None:
    """``"csv"``, ``"xlsx"`` or ``None`` (not a spreadsheet we read), from a file's first bytes.

    The content decides; the name and content type only decide for an empty file. Any zip
    archive counts as XLSX (``parse_xlsx`` then says if it is not a workbook); text without
    NUL bytes counts as CSV (``parse_csv`` then says if it is not UTF-8).
    """
    if head_bytes.startswith(_ZIP_MAGIC):
        return None if _ODS_MIMETYPE in head_bytes[:100] else XLSX
    if not head_bytes:
        hint = f"{name.lower()} {content_type.lower()}"
        if name.lower().endswith((".xlsx", ".xlsm")) or any(h in hint for h in _XLSX_HINTS):
            return XLSX
        if name.lower().endswith((".csv", ".tsv", ".txt")) or any(h in content_type.lower() for h in _CSV_HINTS):
            return CSV
        return None
    if head_bytes.startswith(_OLE2_MAGIC) or any(head_bytes.startswith(m) for m, _ in _BINARY_KINDS):
        return None
    if b"\x00" in head_bytes and not head_bytes.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return None
    return CSV


def not_a_spreadsheet(name: str, head_bytes: bytes) -> str:
    """Why a file ``sniff_kind`` refused is not something we read, in words."""
    what = f"'{name}'" if name else "The file"
    if not head_bytes:
        return f"{what} is empty."
    if head_bytes.startswith(_OLE2_MAGIC):
        return (
            f"{what} is an Excel 97–2003 workbook (.xls) or a password-protected file, which cannot be read. "
            + _SAVE_AS
        )
    if head_bytes.startswith(_ZIP_MAGIC):
        return f"{what} is an OpenDocument spreadsheet (.ods), which cannot be read. " + _SAVE_AS
    kind = next((words for magic, words in _BINARY_KINDS if head_bytes.startswith(magic)), "a binary file")
    return f"{what} is {kind}, not a spreadsheet. Upload a CSV (UTF-8) or Excel (.xlsx) file."


def parse_table(
    stream: IO[bytes],
    *,
    name: str = "",
    content_type: str = "",
    sheet_name: str | None = None,
    header_row: int = 1,
    max_rows: int | None = None,
    on_row: OnRow | None = None,
    on_total: OnTotal | None = None,
    file_field: str = "file_id",
) -> Table:
    """Sniff a seekable binary stream's kind and parse it; ``sheet_name`` is ignored for CSV.

    ``file_field`` names the input the file came from, for the field errors of a bad file.
    """
    head = stream.read(HEAD_BYTES)
    stream.seek(0)
    kind = sniff_kind(name, content_type, head)
    if kind is None:
        message = not_a_spreadsheet(name, head)
        raise InputInvalid(message, field_errors={file_field: [message]})
    options: dict[str, Any] = {
        "header_row": header_row,
        "max_rows": max_rows,
        "on_row": on_row,
        "on_total": on_total,
        "file_field": file_field,
    }
    if kind == XLSX:
        return parse_xlsx(stream, sheet_name=sheet_name, **options)
    return parse_csv(stream, **options)


# --- Shared: headers and rows -------------------------------------------------------------


def _header_names(cells: list[Any]) -> list[str]:
    raw = [_header_text(value) for value in cells]
    while raw and not raw[-1]:
        raw.pop()  # trailing empty header cells are not columns (a value below one adds it back)
    wanted = [text or f"column_{position}" for position, text in enumerate(raw, start=1)]
    # A repeated name gets a suffix no other column has or will have: "a", "a", "a_2" → a, a_3, a_2.
    avoid = set(wanted)
    names: list[str] = []
    for name in wanted:
        if name in names:
            name = _suffixed(name, avoid | set(names))
        names.append(name)
    return names


def _suffixed(base: str, taken: set[str]) -> str:
    suffix = 2
    while f"{base}_{suffix}" in taken:
        suffix += 1
    return f"{base}_{suffix}"


def _header_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(json_safe(value)).strip()


def _empty(value: Any) -> bool:
    return value is None or value == ""


class _Collector:
    """Turns cell lists into row dicts, counting all and keeping at most ``max_rows``."""

    def __init__(self, columns: list[str], max_rows: int | None, on_row: OnRow | None) -> None:
        self.columns = columns
        self.max_rows = max_rows
        self.on_row = on_row
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self._width = len(columns)

    def add(self, cells: list[Any] | tuple[Any, ...]) -> None:
        if all(_empty(value) for value in cells):
            return
        for position in range(self._width, len(cells)):
            if not _empty(cells[position]):
                self._widen(position + 1)
        self.count += 1
        if self.max_rows is None or len(self.rows) < self.max_rows:
            width = self._width
            values = list(cells[:width])
            if len(values) < width:
                values.extend([None] * (width - len(values)))
            self.rows.append(dict(zip(self.columns, values, strict=True)))
        if self.on_row is not None:
            self.on_row(self.count)

    def _widen(self, width: int) -> None:
        while self._width < width:
            self._width += 1
            name = f"column_{self._width}"
            self.columns.append(_suffixed(name, set(self.columns)) if name in self.columns else name)

    def table(self, *, sheet_name: str | None = None, sheets: list[str] | None = None) -> Table:
        if any(len(row) < self._width for row in self.rows):
            self.rows = [{**dict.fromkeys(self.columns), **row} for row in self.rows]
        return Table(
            columns=self.columns,
            rows=self.rows,
            row_count=self.count,
            truncated=self.max_rows is not None and self.count > len(self.rows),
            sheet_name=sheet_name,
            sheets=sheets or [],
            format=XLSX if sheets else CSV,
        )


def _check_options(header_row: int, max_rows: int | None) -> None:
    if header_row < 1:
        raise InputInvalid("header_row must be 1 or more.", field_errors={"header_row": ["Must be at least 1."]})
    if max_rows is not None and max_rows < 0:
        raise InputInvalid("max_rows must be 0 or more.", field_errors={"max_rows": ["Must be at least 0."]})


def _no_header(header_row: int, rows_seen: int, where: str, file_field: str) -> InputInvalid:
    if rows_seen == 0:
        return _invalid(file_field, f"{where} is empty: there is no header row to read.")
    message = (
        f"{where} has {rows_seen} row{'s' if rows_seen != 1 else ''}, so there is no row {header_row} to use as "
        "the header. Set header_row to the row that holds the column names."
    )
    return InputInvalid(message, field_errors={"header_row": [message]})


# --- CSV ----------------------------------------------------------------------------------


def parse_csv(
    data: bytes | IO[bytes],
    *,
    header_row: int = 1,
    max_rows: int | None = None,
    on_row: OnRow | None = None,
    on_total: OnTotal | None = None,
    file_field: str = "file_id",
) -> Table:
    """Read UTF-8 CSV (with or without a BOM), guessing the delimiter and quoting from a sample.

    Refuses binary data and text in another encoding with InputInvalid, in words.
    """
    _check_options(header_row, max_rows)
    stream: IO[bytes] = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    total_bytes = _stream_size(stream)
    head = stream.read(4)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise _invalid(file_field, "The file is UTF-16 text, not UTF-8. " + _SAVE_AS)
    text = io.TextIOWrapper(io.BufferedReader(_Prepend(head, stream)), encoding="utf-8-sig", newline="")
    try:
        sample = text.read(_SNIFF_CHARS)
        if len(sample) == _SNIFF_CHARS:
            sample += text.readline()  # end the sample at a line break
    except UnicodeDecodeError:
        raise _not_utf8(file_field) from None
    if "\x00" in sample:
        raise _invalid(file_field, "The file holds binary data, not CSV text. " + _SAVE_AS)
    dialect = _dialect(sample)
    lines = _checked_lines(sample, text)
    reader = csv.reader(lines, dialect)

    record = 0
    header: list[str] | None = None
    while header is None:
        cells = _next_record(reader, record + 1, file_field)
        if cells is None:
            raise _no_header(header_row, record, "The file", file_field)
        record += 1
        if record == header_row:
            header = cells
    collector = _Collector(_header_names(header), max_rows, on_row)
    if on_total is not None and total_bytes and sample:
        sample_lines = max(1, sample.count("\n"))
        estimate = int(total_bytes * sample_lines / max(1, len(sample.encode())))
        on_total(max(0, estimate - header_row))
    while (cells := _next_record(reader, record + 1, file_field)) is not None:
        record += 1
        collector.add(cells)
    return collector.table()


def _next_record(reader: Iterator[list[str]], number: int, file_field: str) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except UnicodeDecodeError:
        raise _not_utf8(file_field) from None
    except csv.Error as exc:
        raise _invalid(file_field, f"Row {number} of the file could not be read as CSV: {exc}.") from None
    except _BinaryLine:
        raise _invalid(file_field, f"Row {number} of the file holds binary data (a NUL byte), not text.") from None


class _BinaryLine(Exception):
    pass


def _checked_lines(sample: str, rest: IO[str]) -> Iterator[str]:
    # PostgreSQL cannot store NUL in JSON text, and a NUL means this is no text file anyway.
    for line in io.StringIO(sample, newline=""):
        yield line
    for line in rest:
        if "\x00" in line:
            raise _BinaryLine()
        yield line


def _dialect(sample: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters=_DELIMITERS)
    except csv.Error:
        pass
    else:
        # The sniffer often misses doubled quotes ("say ""hi"""); every CSV writer uses them (RFC 4180).
        sniffed.doublequote = True
        return sniffed
    # The sniffer wants every line alike; ragged rows get the delimiter their header uses most.
    header = sample.lstrip("\r\n").splitlines()[0] if sample.strip() else ""
    counts = {delimiter: header.count(delimiter) for delimiter in _DELIMITERS}
    best = max(counts, key=lambda delimiter: counts[delimiter])
    if counts[best] == 0:
        return csv.excel  # one column: plain commas
    return type("Sniffed", (csv.excel,), {"delimiter": best})


def _stream_size(stream: IO[bytes]) -> int | None:
    try:
        position = stream.tell()
        size = stream.seek(0, io.SEEK_END)
        stream.seek(position)
    except (AttributeError, OSError, ValueError):
        return None
    return size - position


class _Prepend(io.RawIOBase):
    """``head`` followed by the rest of ``stream``: the bytes looked at are read again."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        if self._head:
            size = min(len(view), len(self._head))
            view[:size] = self._head[:size]
            self._head = self._head[size:]
            return size
        chunk = self._stream.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)


def _invalid(file_field: str, message: str) -> InputInvalid:
    return InputInvalid(message, field_errors={file_field: [message]})


def _not_utf8(file_field: str) -> InputInvalid:
    return _invalid(
        file_field,
        "The file is not UTF-8 text: it may be in another encoding, or not a CSV file at all. " + _SAVE_AS,
    )


# --- XLSX ---------------------------------------------------------------------------------

# What openpyxl raises on a damaged or foreign file; anything else is a bug and is not hidden.
_UNREADABLE = (zipfile.BadZipFile, zlib.error, KeyError, ValueError, TypeError, OSError, EOFError, SyntaxError)
# openpyxl trips over some valid-looking parts while opening (e.g. a chart sheet without a chart).
_UNOPENABLE = (*_UNREADABLE, AttributeError, IndexError)


def parse_xlsx(
    file_like: bytes | IO[bytes],
    *,
    sheet_name: str | None = None,
    header_row: int = 1,
    max_rows: int | None = None,
    on_row: OnRow | None = None,
    on_total: OnTotal | None = None,
    file_field: str = "file_id",
) -> Table:
    """Read one sheet of an XLSX workbook, streamed (openpyxl's read-only mode), first sheet by
    default. An unknown sheet, a chart sheet or a damaged file raises InputInvalid, in words."""
    from openpyxl import load_workbook  # imported here: only the tools that read XLSX pay for it

    _check_options(header_row, max_rows)
    stream: IO[bytes] = io.BytesIO(file_like) if isinstance(file_like, bytes | bytearray) else file_like
    try:
        workbook = load_workbook(stream, read_only=True, data_only=True)
    except _UNOPENABLE:
        raise _invalid(
            file_field, "The file could not be opened as an Excel workbook (.xlsx): it is damaged or not a workbook."
        ) from None
    try:
        sheets = list(workbook.sheetnames)
        worksheet = _worksheet(workbook, sheet_name, sheets, file_field)
        estimate = worksheet.max_row or _count_rows(workbook, worksheet)
        # The stored dimension can be wrong (some writers leave "A1"); read every row there is.
        worksheet.reset_dimensions()
        rows = worksheet.iter_rows(min_row=header_row, values_only=True)
        where = f"The sheet '{worksheet.title}'"
        header = _next_xlsx_row(rows, file_field, where)
        if header is None:
            raise _no_header(header_row, _rows_above(estimate, header_row), where, file_field)
        collector = _Collector(_header_names(list(header)), max_rows, on_row)
        if on_total is not None and estimate:
            on_total(max(0, estimate - header_row))
        while (cells := _next_xlsx_row(rows, file_field, where)) is not None:
            collector.add([json_safe(value) for value in cells])
        return collector.table(sheet_name=worksheet.title, sheets=sheets)
    finally:
        workbook.close()


def _worksheet(workbook: Any, sheet_name: str | None, sheets: list[str], file_field: str) -> Any:
    names = ", ".join(f"'{name}'" for name in sheets)
    if sheet_name is None:
        if not workbook.worksheets:
            raise _invalid(file_field, "The workbook has no sheet of cells to read, only charts.")
        return workbook.worksheets[0]
    if sheet_name not in sheets:
        message = f"The workbook has no sheet named '{sheet_name}'; its sheets are: {names}."
        raise InputInvalid(message, field_errors={"sheet_name": [message]})
    worksheet = workbook[sheet_name]
    if not hasattr(worksheet, "iter_rows"):
        message = f"'{sheet_name}' is a chart, not a sheet of cells; the workbook's sheets are: {names}."
        raise InputInvalid(message, field_errors={"sheet_name": [message]})
    return worksheet


def _next_xlsx_row(rows: Iterator[tuple[Any, ...]], file_field: str, where: str) -> tuple[Any, ...] | None:
    try:
        return next(rows)
    except StopIteration:
        return None
    except _UNREADABLE:
        raise _invalid(file_field, f"{where} could not be read: the workbook is damaged.") from None


def _rows_above(estimate: int | None, header_row: int) -> int:
    return min(estimate or 0, header_row - 1)


_ROW_TAG = re.compile(rb"<(?:\w+:)?row[\s>/]")


def _count_rows(workbook: Any, worksheet: Any) -> int | None:
    """The number of rows a sheet stores, counted in its XML without parsing it, when the sheet
    does not say (write-only writers leave out the dimension): cheap next to reading the cells."""
    archive = getattr(workbook, "_archive", None)
    path = getattr(worksheet, "_worksheet_path", None)
    if archive is None or path is None:
        return None
    count, tail = 0, b""
    try:
        with archive.open(path) as source:
            while chunk := source.read(1 << 20):
                data = tail + chunk
                count += len(_ROW_TAG.findall(data))
                # A tag cut off at the end of this chunk is counted with the next one.
                start = data.rfind(b"<", len(data) - 16)
                tail = data[start:] if start != -1 and not _ROW_TAG.match(data, start) else b""
    except _UNREADABLE:
        return None
    return count


def json_safe(value: Any) -> Any:
    """A cell value as JSON can hold it: see the module docstring."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return _duration(value)
    return str(value)


def _duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    sign = "-" if seconds < 0 else ""
    minutes, secs = divmod(abs(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    secs_text = f"{secs:02.0f}" if float(secs).is_integer() else f"{secs:06.3f}".rstrip("0")
    return f"{sign}{hours}:{minutes:02d}:{secs_text}"
