"""How amounts read for people: in error messages (the catalog's ``{needed:credits}``,
``{limit:bytes}``) and on the status pages. Services pass numbers; these turn them into words."""

from __future__ import annotations

from decimal import Decimal


def credits_words(amount: Decimal) -> str:
    """A credit amount as people write it: 0.01, 2, 99.5."""
    return f"{amount.normalize():f}"


def bytes_words(size: int) -> str:
    """A size as people write it: 50 MB, 1.5 MB, 300 KB, 12 bytes (1 MB = 1,048,576 bytes)."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} byte{'s' if size != 1 else ''}"
