"""The API's URL router."""

from __future__ import annotations

from typing import Any

from rest_framework.routers import DefaultRouter

# A UUID as the API writes them, in either case (RFC 4122 ids are case-insensitive on input).
# Django's own ``uuid`` converter takes lower case only, and path() cannot make the trailing
# slash optional, so the routes stay regular expressions.
UUID_PATTERN = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


class ApiRouter(DefaultRouter):
    """The API's router: every path takes DESIGN.md's form with and without a trailing slash,
    and an object id in a path is a UUID unless the viewset sets ``lookup_value_regex`` (tools
    are addressed by slug). A malformed id matches no route, so it answers 404 NOT_FOUND like
    an id that does not exist, before any view or query sees it."""

    include_format_suffixes = False

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"

    def get_lookup_regex(self, viewset: Any, lookup_prefix: str = "") -> str:
        # As SimpleRouter's, with UUID_PATTERN instead of "[^/.]+" when the viewset sets none.
        lookup_field = getattr(viewset, "lookup_field", "pk")
        lookup_url_kwarg = getattr(viewset, "lookup_url_kwarg", None) or lookup_field
        pattern = getattr(viewset, "lookup_value_regex", UUID_PATTERN)
        return f"(?P<{lookup_prefix}{lookup_url_kwarg}>{pattern})"
