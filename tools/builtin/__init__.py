"""Built-in tools. Importing this package registers them."""

from . import demo_long_task, google_drive, http_request, json_transform, spreadsheet_reader  # noqa: F401
