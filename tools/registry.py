"""The registry of tool implementations, keyed by slug.

Built-in tools register themselves with :func:`register` when ``tools.builtin`` is imported;
third-party packages declare their tools in the ``toolexec.tools`` entry-point group. The
catalog sync (``tools.services.catalog_sync``) turns what is registered here into
ToolDefinition rows.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from django.utils.module_loading import import_string
from jsonschema import Draft202012Validator

from .sdk import MODES, Tool

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "toolexec.tools"

_tools: dict[str, type[Tool]] = {}


def implementation_path(tool: type[Tool]) -> str:
    return f"{tool.__module__}.{tool.__qualname__}"


def register(tool: type[Tool]) -> type[Tool]:
    """Add ``tool`` to the registry (usable as a class decorator)."""
    if not (isinstance(tool, type) and issubclass(tool, Tool)):
        raise TypeError(f"{tool!r} is not a Tool subclass.")
    if not getattr(tool, "slug", "") or not getattr(tool, "name", ""):
        raise ValueError(f"{implementation_path(tool)} needs a slug and a name.")
    if not tool.modes or not set(tool.modes) <= set(MODES):
        raise ValueError(f"{tool.slug}: modes must be a non-empty subset of {MODES}.")
    Draft202012Validator.check_schema(tool.input_schema)
    existing = _tools.get(tool.slug)
    if existing is not None and implementation_path(existing) != implementation_path(tool):
        raise ValueError(f"Tool slug {tool.slug!r} is already registered by {implementation_path(existing)}.")
    _tools[tool.slug] = tool
    return tool


def unregister(slug: str) -> None:
    _tools.pop(slug, None)


def get_tool(slug: str) -> type[Tool] | None:
    return _tools.get(slug)


def registered_tools() -> dict[str, type[Tool]]:
    return dict(_tools)


def load_implementation(path: str) -> type[Tool]:
    """Import a tool class by dotted path and register it; raises ImportError if it can't."""
    try:
        tool = import_string(path)
    except ImportError:
        raise
    except Exception as exc:  # a module that fails while importing is as missing as an absent one
        raise ImportError(f"{type(exc).__name__}: {exc}") from exc
    try:
        return register(tool)
    except (TypeError, ValueError) as exc:
        raise ImportError(str(exc)) from exc


def load_entry_points() -> None:
    """Register the tools third-party packages declare; a broken one is logged, not fatal."""
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(entry_point.load())
        except Exception:
            logger.exception("Could not load the tool entry point %r", entry_point.value)
