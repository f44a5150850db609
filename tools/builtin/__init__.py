"""Built-in tools. Importing this package registers them."""

from . import demo_long_task, http_request, json_transform  # noqa: F401
