"""Google Drive Reader: a Drive file's details, a Google Sheet's rows, a Doc's text, or the
content of any other file (CSV and XLSX as rows), with the connected Google account."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django.conf import settings

from ..errors import InputInvalid, UpstreamError
from ..registry import register
from ..sdk import ASYNC, SYNC, CredentialSlot, ExecutionContext, Tool
from .google_api import PROVIDER, BadRequest, GoogleClient, a1_sheet_range, too_large

SLOT = "OAUTH_TOKEN"
MB = 1024 * 1024

GOOGLE_APPS = "application/vnd.google-apps."
GOOGLE_SHEET = "application/vnd.google-apps.spreadsheet"
# Google's own file types whose text Drive can export.
EXPORTABLE_AS_TEXT = {
    "application/vnd.google-apps.document": "Google Doc",
    "application/vnd.google-apps.presentation": "Google Slides presentation",
}
CSV_TYPES = frozenset({"text/csv", "application/csv", "text/comma-separated-values", "text/tab-separated-values"})
XLSX_TYPES = frozenset({"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"})
TEXT_TYPES = frozenset(
    {"application/json", "application/xml", "application/x-yaml", "application/yaml", "application/javascript"}
)

FILE_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "mime_type": {"type": "string"},
        "size_bytes": {"type": ["integer", "null"]},
        "modified_time": {"type": ["string", "null"], "format": "date-time"},
    },
}


@register
class GoogleDriveReader(Tool):
    slug = "google-drive-reader"
    name = "Google Drive Reader"
    description = (
        "Reads a file from Google Drive: its details; a Google Sheet's rows; with extract_content, "
        "a Google Doc's text or any other file's content (CSV and Excel files as rows)."
    )
    category = "data"
    input_schema = {
        "type": "object",
        "properties": {
            "file_id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "pattern": "^[A-Za-z0-9_-]+$",
                "description": "The Drive file id (the part after /d/ in the file's link).",
            },
            "sheet_name": {
                "type": "string",
                "minLength": 1,
                "maxLength": 100,
                "description": "The sheet (tab) to read; the first one when not given.",
            },
            "extract_content": {
                "type": "boolean",
                "default": False,
                "description": "Also read the content of a file that is not a Google Sheet.",
            },
            "max_rows": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1_000_000,
                "description": "Read at most this many rows (after the header row).",
            },
            "modified_time": {
                "type": "string",
                "format": "date-time",
                "maxLength": 40,
                "description": (
                    "The file's modifiedTime as a listing gave it: a cached read of another version of "
                    "the file is not used. Not sent to Google."
                ),
            },
        },
        "required": ["file_id"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {
            "file": FILE_SCHEMA,
            "sheet_name": {"type": ["string", "null"]},
            "columns": {"type": "array", "items": {"type": "string"}},
            "rows": {"type": "array", "items": {"type": "object"}},
            "row_count": {"type": "integer"},
            "truncated": {"type": "boolean"},
            "content": {"type": "string"},
            "content_bytes": {"type": "integer"},
        },
        "required": ["file"],
    }
    credential_slots = (
        CredentialSlot(
            SLOT,
            provider=PROVIDER,
            kind="oauth2",
            scopes=("drive.readonly", "spreadsheets.readonly"),
            description="A Google account that can read the file.",
        ),
    )
    modes = frozenset({SYNC, ASYNC})
    # Reads only. A file changes under the same id: a cached read lasts its TTL, or, given the
    # file's modified_time (from a listing), only as long as the file is that version.
    cacheable = True
    timeout_seconds = 300
    base_credits = Decimal("0.1")
    credits_per_unit = Decimal("0.05")
    unit = "MB"  # each megabyte of content read, or part of one
    idempotent = True
    retry_on = frozenset({"UPSTREAM_RATE_LIMITED"})
    max_attempts = 3
    retry_backoff_seconds = 5.0

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        client = GoogleClient(
            ctx.credential(SLOT)["access_token"],
            refresh=lambda: ctx.refresh_credential(SLOT)["access_token"],
        )
        file_id = inputs["file_id"]
        ctx.progress(5, "Reading the file's details")
        metadata = client.file_metadata(file_id)
        file = _file_summary(metadata)
        mime_type = file["mime_type"]
        limit = settings.TOOLEXEC_MAX_DOWNLOAD_BYTES
        reader = _Reader(client, ctx, file_id, limit)

        if mime_type == GOOGLE_SHEET:
            result = {"file": file, **reader.sheet(inputs.get("sheet_name"), inputs.get("max_rows"))}
        elif not inputs.get("extract_content"):
            result = {"file": file}
        elif mime_type in EXPORTABLE_AS_TEXT:
            content = reader.export_text()
            result = {"file": file, "content": _decode(content), "content_bytes": len(content)}
        else:
            kind = _content_kind(mime_type, file["name"])
            if kind is None:
                raise _not_readable(mime_type)
            if file["size_bytes"] is not None and file["size_bytes"] > limit:
                raise too_large(limit)
            content = reader.media(file["size_bytes"])
            if kind == "text":
                result = {"file": file, "content": _decode(content), "content_bytes": len(content)}
            else:
                ctx.progress(90, "Reading the rows")
                result = {"file": file, **_parsed_table(kind, content, inputs, reader.on_row)}
        if reader.bytes_read:
            ctx.usage(math.ceil(reader.bytes_read / MB))
        return result


class _Reader:
    """The content calls of one run, counting the bytes they read (what the run costs)."""

    def __init__(self, client: GoogleClient, ctx: ExecutionContext, file_id: str, limit: int) -> None:
        self.client, self.ctx, self.file_id, self.limit = client, ctx, file_id, limit
        self.bytes_read = 0

    def sheet(self, sheet_name: str | None, max_rows: int | None) -> dict[str, Any]:
        if sheet_name is None:
            self.ctx.progress(15, "Finding the first sheet")
            titles = self.client.sheet_titles(self.file_id)
            if not titles:
                raise UpstreamError("Google Sheets listed no sheets in this spreadsheet.", provider=PROVIDER)
            sheet_name = titles[0]
        self.ctx.progress(30, f"Reading sheet {sheet_name!r}")
        try:
            data, size = self.client.sheet_values(self.file_id, a1_sheet_range(sheet_name), limit=self.limit)
        except BadRequest:
            titles = self.client.sheet_titles(self.file_id)
            if sheet_name not in titles:
                raise _no_such_sheet(sheet_name, titles) from None
            raise
        self.bytes_read += size
        self.ctx.progress(90, "Building the rows")
        values = data.get("values")
        return _table_from_values(values if isinstance(values, list) else [], sheet_name, max_rows)

    def on_row(self, count: int) -> None:
        if count % 1000 == 0:  # a big file can still be cancelled, or stopped at its deadline
            self.ctx.check_cancelled()

    def export_text(self) -> bytes:
        self.ctx.progress(20, "Exporting the document as text")
        content = self.client.file_export(self.file_id, "text/plain", limit=self.limit)
        self.bytes_read += len(content)
        self.ctx.progress(90, "Reading the text")
        return content

    def media(self, size: int | None) -> bytes:
        self.ctx.progress(10, "Downloading the file")

        def on_bytes(total: int) -> None:
            # 10–85 % follows the bytes read, when Drive told us how many to expect.
            if size:
                self.ctx.progress(10 + 75 * min(total, size) / size)
            else:
                self.ctx.check_cancelled()

        content = self.client.file_media(self.file_id, limit=self.limit, on_bytes=on_bytes)
        self.bytes_read += len(content)
        return content


def _file_summary(metadata: dict[str, Any]) -> dict[str, Any]:
    size = metadata.get("size")
    return {
        "id": str(metadata.get("id", "")),
        "name": str(metadata.get("name", "")),
        "mime_type": str(metadata.get("mimeType", "")),
        # Drive sends the size as a string, and none for Google's own documents.
        "size_bytes": int(size) if isinstance(size, (str, int)) and str(size).isdigit() else None,
        "modified_time": metadata.get("modifiedTime"),
    }


def _content_kind(mime_type: str, name: str) -> str | None:
    lowered = name.lower()
    if mime_type in CSV_TYPES or (mime_type in ("", "application/octet-stream") and lowered.endswith(".csv")):
        return "csv"
    if mime_type in XLSX_TYPES or (mime_type in ("", "application/octet-stream") and lowered.endswith(".xlsx")):
        return "xlsx"
    if mime_type.startswith("text/") or mime_type in TEXT_TYPES:
        return "text"
    return None


def _not_readable(mime_type: str) -> InputInvalid:
    if mime_type.startswith(GOOGLE_APPS):
        what = "this kind of Google file"
    else:
        what = f"files of type {mime_type or 'unknown'}"
    message = (
        f"Google Drive Reader cannot read the content of {what}; it reads Google Sheets, Google Docs, "
        "CSV, Excel (.xlsx) and text files. Leave extract_content off to get the file's details only."
    )
    return InputInvalid(message, field_errors={"extract_content": [message]})


def _no_such_sheet(sheet_name: str, titles: list[str]) -> InputInvalid:
    existing = ", ".join(repr(t) for t in titles) or "none"
    message = f"The spreadsheet has no sheet named {sheet_name!r}; its sheets are: {existing}."
    return InputInvalid(message, field_errors={"sheet_name": [message]})


def _decode(content: bytes) -> str:
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError:
        return content.decode("latin-1")


def _cell_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _column_names(header: list[Any]) -> list[str]:
    """Header cells as column names, as tools.tabular names them: an empty one is
    ``column_<n>``, a repeated one ``name_2``, ``name_3``."""
    raw = [_cell_text(value) for value in header]
    while raw and not raw[-1]:
        raw.pop()
    reserved, taken, names = set(raw), set(), []
    for position, text in enumerate(raw, start=1):
        names.append(_unique(text or f"column_{position}", taken, reserved))
    return names


def _unique(base: str, taken: set[str], reserved: set[str]) -> str:
    name, suffix = base, 2
    while name in taken or (name != base and name in reserved):
        name, suffix = f"{base}_{suffix}", suffix + 1
    taken.add(name)
    return name


def _table_from_values(values: list[Any], sheet_name: str, max_rows: int | None) -> dict[str, Any]:
    """Sheets' ``values`` (rows of cells, trailing empty cells left out) as rows keyed by the
    header row, with the conventions of tools.tabular: empty rows are skipped, a cell past the
    header adds a column, a missing cell is None, ``row_count`` counts every data row."""
    grid = [row if isinstance(row, list) else [] for row in values]
    columns = _column_names(grid[0]) if grid else []
    taken = set(columns)
    data = [row for row in grid[1:] if any(_cell_text(cell) for cell in row)]
    for row in data:
        for position in range(len(columns), len(row)):
            if _cell_text(row[position]):
                while len(columns) <= position:
                    columns.append(_unique(f"column_{len(columns) + 1}", taken, set()))
    kept = data if max_rows is None else data[:max_rows]
    rows = [{column: (row[i] if i < len(row) else None) for i, column in enumerate(columns)} for row in kept]
    return {
        "sheet_name": sheet_name,
        "columns": columns,
        "rows": rows,
        "row_count": len(data),
        "truncated": len(rows) < len(data),
    }


def _parsed_table(kind: str, content: bytes, inputs: dict[str, Any], on_row: Callable[[int], None]) -> dict[str, Any]:
    from tools import tabular  # the CSV and XLSX parsers

    max_rows = inputs.get("max_rows")
    if kind == "csv":
        table = tabular.parse_csv(content, max_rows=max_rows, on_row=on_row)
    else:
        table = tabular.parse_xlsx(
            io.BytesIO(content), sheet_name=inputs.get("sheet_name"), max_rows=max_rows, on_row=on_row
        )
    return {
        "sheet_name": table.sheet_name,
        "columns": list(table.columns),
        "rows": table.rows,
        "row_count": table.row_count,
        "truncated": table.truncated,
    }
