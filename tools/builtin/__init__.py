"""Built-in tools. Importing this package registers them."""

from . import demo_long_task, json_transform  # noqa: F401
