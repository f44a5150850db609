"""Built-in tools. Importing this package registers them."""

from . import json_transform  # noqa: F401
