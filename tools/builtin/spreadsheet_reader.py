import uuid
from decimal import Decimal
from typing import Any

from ..errors import InputInvalid
from ..registry import register
from ..sdk import ASYNC, SYNC, ExecutionContext, Tool
from ..tabular import parse_table

PROGRESS_EVERY_ROWS = 1000
MAX_ROWS_DEFAULT = 10_000
MAX_ROWS_LIMIT = 100_000


@register
class SpreadsheetReader(Tool):
    """Reads an uploaded CSV or XLSX file (POST /api/v1/files/) into rows keyed by its header."""

    slug = "spreadsheet-reader"
    name = "Spreadsheet Reader"
    description = (
        "Read the rows of an uploaded CSV (UTF-8) or Excel (.xlsx) file as JSON objects keyed by the "
        "header row. Upload the file with POST /api/v1/files/ first and pass its id."
    )
    category = "data"
    input_schema = {
        "type": "object",
        "properties": {
            "file_id": {
                "type": "string",
                "description": "The id of a file you uploaded with POST /api/v1/files/.",
            },
            "sheet_name": {
                "type": "string",
                "minLength": 1,
                "description": "XLSX only: the sheet to read (the first sheet by default). Ignored for CSV.",
            },
            "header_row": {
                "type": "integer",
                "minimum": 1,
                "default": 1,
                "description": "The row that holds the column names, counted from 1; rows above it are skipped.",
            },
            "max_rows": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_ROWS_LIMIT,
                "default": MAX_ROWS_DEFAULT,
                "description": "At most this many rows are returned; row_count still counts them all.",
            },
        },
        "required": ["file_id"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {
            "file": {
                "type": "object",
                "description": "The uploaded file: id, name, size_bytes, content_type, sha256.",
            },
            "format": {"enum": ["csv", "xlsx"]},
            "sheet_name": {"type": ["string", "null"], "description": "The sheet read (XLSX), else null."},
            "sheets": {"type": "array", "items": {"type": "string"}, "description": "Every sheet of the workbook."},
            "columns": {"type": "array", "items": {"type": "string"}},
            "rows": {"type": "array", "items": {"type": "object"}},
            "row_count": {"type": "integer", "description": "Every data row in the file, returned or not."},
            "truncated": {"type": "boolean", "description": "Whether max_rows left rows out."},
        },
        "required": ["file", "format", "sheet_name", "sheets", "columns", "rows", "row_count", "truncated"],
    }
    modes = frozenset({SYNC, ASYNC})
    cacheable = True  # an uploaded file never changes
    # Sync runs get TOOLEXEC_SYNC_TIMEOUT_SECONDS at most; a big workbook wants async time.
    timeout_seconds = 1800
    base_credits = Decimal("0.01")
    credits_per_unit = Decimal("0.01")
    unit = "1,000 rows"

    def validate(self, inputs: dict[str, Any]) -> None:
        try:
            uuid.UUID(inputs["file_id"])
        except ValueError:
            message = "Must be the id of a file you uploaded with POST /api/v1/files/."
            raise InputInvalid(
                "file_id is not the id of an uploaded file.", field_errors={"file_id": [message]}
            ) from None

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        meta, stream = ctx.open_file(inputs["file_id"])
        progress = _RowProgress(ctx, meta["name"])
        ctx.progress(0, f"Reading {meta['name']}")
        with stream:
            table = parse_table(
                stream,
                name=meta["name"],
                content_type=meta.get("content_type", ""),
                sheet_name=inputs.get("sheet_name"),
                header_row=inputs.get("header_row", 1),
                max_rows=inputs.get("max_rows", MAX_ROWS_DEFAULT),
                on_row=progress.row,
                on_total=progress.total,
            )
        ctx.usage(Decimal(table.row_count) / 1000)
        ctx.progress(100, f"Read {table.row_count:,} rows")
        return {
            "file": meta,
            "format": table.format,
            "sheet_name": table.sheet_name,
            "sheets": table.sheets,
            "columns": table.columns,
            "rows": table.rows,
            "row_count": table.row_count,
            "truncated": table.truncated,
        }


class _RowProgress:
    """Progress every PROGRESS_EVERY_ROWS rows: a percentage of the estimated total when the
    file gives one (held below 100 until the end, as estimates run short), and the count."""

    def __init__(self, ctx: ExecutionContext, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.expected: int | None = None

    def total(self, expected: int) -> None:
        self.expected = expected or None

    def row(self, count: int) -> None:
        if count % PROGRESS_EVERY_ROWS:
            return
        if self.expected:
            percent = min(99, count * 100 // self.expected)
            self.ctx.progress(percent, f"Read {count:,} of about {self.expected:,} rows of {self.name}")
        else:
            self.ctx.progress(self.ctx.percent, f"Read {count:,} rows of {self.name}")
