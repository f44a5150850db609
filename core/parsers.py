"""Request body parsers. Kept apart from the views: DRF imports these while it builds APIView."""

from __future__ import annotations

from typing import IO, Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

# Deeper than any tool's inputs need, and far from Python's recursion limit, which JSON nested
# near it would reach later, in the code that walks the value (input checks, redaction).
MAX_JSON_DEPTH = 100


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, refusing JSON nested more than MAX_JSON_DEPTH levels as it refuses
    malformed JSON (400), instead of failing with a RecursionError (500)."""

    def parse(self, stream: IO[bytes], media_type: str | None = None, parser_context: Any = None) -> Any:
        too_deep = ParseError(f"JSON parse error - nested more than {MAX_JSON_DEPTH} levels deep.")
        try:
            value = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise too_deep from None
        if json_deeper_than(value, MAX_JSON_DEPTH):
            raise too_deep
        return value


def json_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest more than ``limit`` levels; without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False
