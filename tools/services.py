"""Catalog operations: turning registered implementations into ToolDefinition rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.db import connection, transaction
from django.utils import timezone

from . import registry
from .models import ToolDefinition
from .sdk import MODES, Tool

logger = logging.getLogger(__name__)


@dataclass
class SyncReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)


def _definition_fields(tool: type[Tool]) -> dict:
    return {
        "name": tool.name,
        "description": tool.description,
        "version": tool.version,
        "category": tool.category,
        "input_schema": tool.input_schema,
        "output_schema": tool.output_schema,
        "credential_slots": [slot.as_dict() for slot in tool.credential_slots],
        "modes": [mode for mode in MODES if mode in tool.modes],
        "timeout_seconds": tool.timeout_seconds,
        "base_credits": tool.base_credits,
        "credits_per_unit": tool.credits_per_unit,
        "unit": tool.unit,
        "cacheable": tool.cacheable,
        "cache_by_default": tool.cache_by_default,
        "cache_ttl_default": tool.cache_ttl_default,
        "cache_ttl_max": tool.cache_ttl_max,
        "cache_exclude_inputs": sorted(tool.cache_exclude_inputs),
        "idempotent": tool.idempotent,
        "implementation": registry.implementation_path(tool),
        "is_available": True,
        "unavailable_reason": "",
    }


@transaction.atomic
def catalog_sync() -> SyncReport:
    """Upsert a definition for every registered tool; mark the rest unavailable.

    A stored definition whose tool is not registered gets one chance: its ``implementation``
    path is imported (and registered if it loads). If that fails the definition stays in the
    catalog, unavailable, with the reason, so instances keep their history and start-up never
    fails on a missing plug-in. ``is_active`` is the operators' choice and is left alone.
    """
    report = SyncReport()
    _lock_catalog()
    now = timezone.now()
    stored = {d.slug: d for d in ToolDefinition.objects.select_for_update()}

    for slug, definition in stored.items():
        if registry.get_tool(slug) is None:
            try:
                loaded = registry.load_implementation(definition.implementation)
                reason = "" if loaded.slug == slug else f"{definition.implementation} now registers as {loaded.slug!r}."
            except ImportError as exc:
                reason = f"The implementation {definition.implementation!r} could not be imported: {exc}"
            if reason:
                report.unavailable[slug] = reason
                if definition.is_available or definition.unavailable_reason != reason:
                    logger.warning("Tool %s is unavailable: %s", slug, reason)
                ToolDefinition.objects.filter(pk=definition.pk).update(
                    is_available=False, unavailable_reason=reason, synced_at=now, updated_at=now
                )

    for slug, tool in registry.registered_tools().items():
        values = {**_definition_fields(tool), "synced_at": now}
        if slug in stored:
            ToolDefinition.objects.filter(pk=stored[slug].pk).update(**values, updated_at=now)
            report.updated.append(slug)
        else:
            ToolDefinition.objects.create(slug=slug, **values)
            report.created.append(slug)
    return report


def _lock_catalog() -> None:
    """Serialise concurrent syncs (two processes starting at once, migrate beside sync_tools):
    without it both would insert the same new slug."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext('toolexec.catalog_sync'))")


def tool_set_active(*, definition: ToolDefinition, is_active: bool) -> None:
    ToolDefinition.objects.filter(pk=definition.pk).update(is_active=is_active, updated_at=timezone.now())
    definition.is_active = is_active
