"""The result cache (DESIGN.md §9): a repeated run of a side-effect-free tool answers from the
result of an earlier one, keyed so that it never crosses owners or credentials, never served
past its TTL, and saying why it hit or missed.

A run asks ``cache_plan`` before it starts. A HIT carries the entry it answers from; otherwise
the plan says whether the result may go to the cache (``key`` set) and the report to give.
After the run, ``cache_report_for`` settles the report (a failed or too large result is not
kept) and ``cache_store`` keeps the result. Concurrent identical runs take turns on a Redis
lock held while the first of them runs (``cache_lead``); the others wait for its entry
(``cache_wait``) and report COLLAPSED. Without Redis nothing collapses and nothing fails.
An async run carries its plan to its worker in its job (``CachePlan.as_dict``); its job holds
the lead under its own id, and identical jobs wait for it as its followers, settled when it
ends from its entry (``cache_collapsed``) or sent to run themselves (services.jobs).

Stored in PostgreSQL (``CacheEntry``): durable, inspectable, and it survives Redis losing its
data. No secret goes into a key or an entry: a credential takes part by its id and the
fingerprint of its secret (an HMAC kept on the credential row).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import Any

from django.conf import settings
from django.db.models import F
from django.utils import timezone
from redis.exceptions import RedisError

from instances.models import Credential, ToolInstance
from tools.errors import InputInvalid
from tools.sdk import Tool

from .. import events
from ..models import CacheEntry, Execution

logger = logging.getLogger(__name__)

WAIT_POLL_SECONDS = 0.05  # how often a collapsed run looks for the first run's entry
PURGE_BATCH = 1000  # expired entries deleted per maintenance round
# What a hit reads of its entry (not the part hashes, the owner, the instance or the tool).
HIT_FIELDS = ("id", "key", "output", "created_at", "expires_at", "source_execution_id")
# What storing a result sets on an entry that exists already (its key and owner stay).
STORED_FIELDS = [
    *("instance", "tool", "tool_version", "request_hash", "version_hash", "config_hash", "credentials_hash"),
    *("source_execution", "output", "size_bytes", "created_at", "expires_at", "hits", "last_hit_at"),
]


class Status(StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    REFRESH = "REFRESH"  # Cache-Control: no-cache: run, and replace the entry
    BYPASS = "BYPASS"  # Cache-Control: no-store: run, neither read nor write the cache
    COLLAPSED = "COLLAPSED"  # answered from the entry of an identical run that ran meanwhile


class MissReason(StrEnum):
    NO_ENTRY = "no_entry"
    EXPIRED = "expired"
    TOOL_VERSION_CHANGED = "tool_version_changed"
    CREDENTIAL_CHANGED = "credential_changed"
    CONFIG_CHANGED = "config_changed"
    NOT_CACHEABLE = "not_cacheable"
    DISABLED = "disabled"
    TOO_LARGE = "too_large"
    FAILED = "failed"


@dataclass(frozen=True)
class CacheControl:
    """The request's ``Cache-Control`` (RFC 9111 §5.2.1): the directives a run honours."""

    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None

    @classmethod
    def parse(cls, header: str | None) -> CacheControl:
        """Directives other than these three are ignored, as a cache ignores what it does not
        implement; a ``max-age`` that is not a whole number of seconds is refused."""
        no_cache = no_store = False
        max_age = None
        for part in (header or "").split(","):
            name, _, value = part.strip().partition("=")
            name = name.strip().lower()
            if name == "no-cache":
                no_cache = True
            elif name == "no-store":
                no_store = True
            elif name == "max-age":
                value = value.strip().strip('"')
                if not value.isdigit():
                    raise InputInvalid(
                        "Cache-Control max-age must be a whole number of seconds.",
                        field_errors={"Cache-Control": ["max-age must be a whole number of seconds, like max-age=60."]},
                    )
                max_age = int(value)
        return cls(no_cache=no_cache, no_store=no_store, max_age=max_age)


@dataclass(frozen=True)
class CacheKey:
    """The key of a run's result, and the hashes of its parts that say why a run missed."""

    key: str
    tool_version: str
    request_hash: str  # the tool and the body: "the same request"
    version_hash: str
    config_hash: str
    credentials_hash: str


@dataclass
class CacheReport:
    """The ``cache`` object of a run's answer, and its ``Cache-Status`` header (RFC 9211)."""

    status: str
    miss_reason: str | None = None
    ttl_seconds: int | None = None
    age_seconds: int | None = None
    source_execution_id: str | None = None
    stored: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "age_seconds": self.age_seconds,
            "ttl_seconds": self.ttl_seconds,
            "source_execution_id": self.source_execution_id,
            "miss_reason": self.miss_reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheReport:
        return cls(
            **{
                name: data.get(name)
                for name in ("status", "miss_reason", "ttl_seconds", "age_seconds", "source_execution_id")
            }
        )

    def header(self) -> str:
        parts = ["toolexec"]
        if self.status in (Status.HIT, Status.COLLAPSED):
            parts.append("hit")
            if self.status == Status.COLLAPSED:
                parts.append("collapsed")
            if self.ttl_seconds is not None:
                parts.append(f"ttl={self.ttl_seconds}")
            return "; ".join(parts)
        parts.append({Status.BYPASS: "fwd=bypass", Status.REFRESH: "fwd=request"}.get(self.status, "fwd=miss"))
        if self.stored:
            parts.append("stored")
        if self.miss_reason:
            parts.append(f'detail="{self.miss_reason}"')
        return "; ".join(parts)


@dataclass
class CachePlan:
    """What a run does with the cache: answer from ``entry`` (a HIT), or run, and keep the
    result under ``key`` when there is one."""

    report: CacheReport
    key: CacheKey | None = None
    ttl: int = 0
    entry: CacheEntry | None = None
    lead: Any = field(default=None, repr=False)  # the single-flight lock this run holds

    @property
    def hit(self) -> bool:
        return self.entry is not None

    def as_dict(self) -> dict[str, Any]:
        """What an async run's job carries to its worker (``Job.cache_plan``): the key's parts,
        all hashes, the TTL and the report. Never an entry, a lead or a secret."""
        return {
            "key": asdict(self.key) if self.key is not None else None,
            "ttl": self.ttl,
            "report": self.report.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CachePlan:
        key = data.get("key")
        return cls(
            CacheReport.from_dict(data["report"]),
            key=CacheKey(**key) if key else None,
            ttl=int(data.get("ttl") or 0),
        )


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@cache
def source_hash(tool_class: type[Tool]) -> str:
    """A hash of the module that implements the tool: a deploy that changes it misses."""
    try:
        source = inspect.getsource(sys.modules[tool_class.__module__])
    except (OSError, TypeError, KeyError):
        source = tool_class.__qualname__
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def cache_key(
    *,
    instance: ToolInstance,
    tool: Tool,
    inputs: dict[str, Any],
    merged: dict[str, Any],
    credentials: dict[str, Credential | None],
) -> CacheKey:
    """The key of a run with the body ``inputs`` (``merged``: overlaid on the instance's config)
    and the resolved ``credentials`` of its slots. It names the instance too: its TTL, its
    switch and its ``DELETE …/cache`` are the instance's, so its entries are its own."""
    definition = instance.tool
    excluded = tool.cache_exclude_inputs

    def kept(values: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in values.items() if name not in excluded}

    tool_version = f"{definition.version}+{source_hash(type(tool))}"
    identities = {
        slot: [str(credential.pk), credential.fingerprint] if credential is not None else None
        for slot, credential in credentials.items()
    }
    return CacheKey(
        key=_digest(
            {
                "tool": definition.slug,
                "version": tool_version,
                "inputs": kept(merged),
                "extra": tool.cache_key_extra(merged),
                "owner": instance.owner_id,
                "instance": str(instance.pk),
                "credentials": identities,
            }
        ),
        tool_version=tool_version,
        request_hash=_digest({"tool": definition.slug, "inputs": kept(inputs)}),
        version_hash=_digest(tool_version),
        config_hash=_digest(kept(instance.config)),
        credentials_hash=_digest(identities),
    )


def cache_plan(
    *,
    instance: ToolInstance,
    tool: Tool,
    inputs: dict[str, Any],
    merged: dict[str, Any],
    credentials: dict[str, Credential | None],
    control: CacheControl,
) -> CachePlan:
    """Look the run up: one query when the instance caches (two on a miss, to say why)."""
    if not instance.tool.cacheable or not tool.is_cacheable(merged):
        return CachePlan(CacheReport(Status.MISS, MissReason.NOT_CACHEABLE))
    if not instance.caches:
        return CachePlan(CacheReport(Status.MISS, MissReason.DISABLED))
    if control.no_store:
        return CachePlan(CacheReport(Status.BYPASS))
    ttl = instance.cache_ttl
    key = cache_key(instance=instance, tool=tool, inputs=inputs, merged=merged, credentials=credentials)
    if control.no_cache:
        return CachePlan(CacheReport(Status.REFRESH, ttl_seconds=ttl), key=key, ttl=ttl)
    now = timezone.now()
    entry = CacheEntry.objects.filter(key=key.key).only(*HIT_FIELDS).first()
    if entry is None:
        return CachePlan(CacheReport(Status.MISS, _miss_reason(instance, key), ttl_seconds=ttl), key=key, ttl=ttl)
    age = max(0, int((now - entry.created_at).total_seconds()))
    # Younger than the instance's TTL too: one lowered since the entry was kept applies to it.
    if entry.expires_at > now and age < ttl and (control.max_age is None or age <= control.max_age):
        return CachePlan(_hit_report(entry, now, Status.HIT), key=key, ttl=ttl, entry=entry)
    return CachePlan(CacheReport(Status.MISS, MissReason.EXPIRED, ttl_seconds=ttl), key=key, ttl=ttl)


def _hit_report(entry: CacheEntry, now: datetime, status: str) -> CacheReport:
    return CacheReport(
        status,
        ttl_seconds=max(0, int((entry.expires_at - now).total_seconds())),
        age_seconds=max(0, int((now - entry.created_at).total_seconds())),
        source_execution_id=str(entry.source_execution_id) if entry.source_execution_id else None,
    )


def _miss_reason(instance: ToolInstance, key: CacheKey) -> str:
    """Why there is no entry (a second query, on a miss only): the newest entry of the same
    request on this instance, if any, was made by another tool version, with other credentials
    or another config."""
    previous = (
        CacheEntry.objects.filter(instance=instance, request_hash=key.request_hash)
        .order_by("-created_at")
        .values("version_hash", "credentials_hash", "config_hash")
        .first()
    )
    if previous is None:
        return MissReason.NO_ENTRY
    if previous["version_hash"] != key.version_hash:
        return MissReason.TOOL_VERSION_CHANGED
    if previous["credentials_hash"] != key.credentials_hash:
        return MissReason.CREDENTIAL_CHANGED
    if previous["config_hash"] != key.config_hash:
        return MissReason.CONFIG_CHANGED
    return MissReason.NO_ENTRY


def _encoded_size(output: Any) -> int:
    return len(json.dumps(output, separators=(",", ":")).encode())


def cache_report_for(plan: CachePlan, *, tool: Tool, status: str, output: Any) -> CacheReport:
    """The report of a run that ran: whether its result can be kept (a COMPLETED run whose
    output the tool calls an answer, at most TOOLEXEC_CACHE_MAX_BYTES and not flagged
    truncated), and if not, why."""
    report = plan.report
    if plan.key is None:
        return report
    if status != Execution.Status.COMPLETED or not tool.is_cacheable_result(output):
        report.miss_reason = MissReason.FAILED
    elif (isinstance(output, dict) and output.get("truncated") is True) or _encoded_size(
        output
    ) > settings.TOOLEXEC_CACHE_MAX_BYTES:
        report.miss_reason = MissReason.TOO_LARGE
    else:
        report.stored = True
    return report


def cache_store(*, plan: CachePlan, execution: Execution, output: Any) -> None:
    """Keep a result the report says can be kept: one upsert on the key, which the caller
    commits with the run's outcome (execution_finish)."""
    if plan.key is None or not plan.report.stored:
        return
    now = timezone.now()
    entry = CacheEntry(
        key=plan.key.key,
        owner_id=execution.owner_id,
        instance_id=execution.instance_id,
        tool_id=execution.tool_id,
        tool_version=plan.key.tool_version,
        request_hash=plan.key.request_hash,
        version_hash=plan.key.version_hash,
        config_hash=plan.key.config_hash,
        credentials_hash=plan.key.credentials_hash,
        source_execution=execution,
        output=output,
        size_bytes=_encoded_size(output),
        created_at=now,
        expires_at=now + timedelta(seconds=plan.ttl),
    )
    # One statement (INSERT … ON CONFLICT (key) DO UPDATE): a REFRESH, or a run that raced
    # another to the same key, replaces the entry.
    CacheEntry.objects.bulk_create([entry], update_conflicts=True, unique_fields=["key"], update_fields=STORED_FIELDS)


def cache_entry_hit(entry: CacheEntry, now: datetime) -> None:
    """Count a hit on ``entry`` (its caller commits it with the run it answers)."""
    CacheEntry.objects.filter(pk=entry.pk).update(hits=F("hits") + 1, last_hit_at=now)


def cache_clear(*, instance: ToolInstance) -> int:
    """Delete the instance's entries; how many."""
    deleted, _ = CacheEntry.objects.filter(instance=instance).delete()
    return deleted


def cache_purge_expired(*, now: datetime | None = None, batch: int = PURGE_BATCH) -> int:
    """Delete up to ``batch`` expired entries, oldest first (run by the workers' maintenance)."""
    now = now or timezone.now()
    expired = CacheEntry.objects.filter(expires_at__lte=now).order_by("expires_at").values_list("pk", flat=True)
    deleted, _ = CacheEntry.objects.filter(pk__in=list(expired[:batch])).delete()
    return deleted


# --- Single flight ----------------------------------------------------------------------


def _lead_key(key: CacheKey) -> str:
    return f"toolexec:cache:lead:{key.key}"


def cache_lead(plan: CachePlan, *, seconds: int, holder: str) -> str | None:
    """Take the lead of the runs of ``plan``'s key for ``seconds`` (the tool's timeout). Returns
    None when this run leads (or nothing can collapse: no key, Redis down); else who leads."""
    if plan.key is None:
        return None
    try:
        redis = events.redis()
        if redis.set(_lead_key(plan.key), holder, nx=True, ex=max(1, seconds)):
            plan.lead = holder
            return None
        leader = redis.get(_lead_key(plan.key))
    except RedisError:
        logger.warning("Redis is unavailable; identical runs are not collapsed")
        return None
    if leader is None:  # it ended just now: lead after all
        return cache_lead(plan, seconds=seconds, holder=holder)
    return leader.decode() if isinstance(leader, bytes) else str(leader)


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def cache_release(plan: CachePlan) -> None:
    """End the lead (only the holder's own: a lock that expired and was taken is left)."""
    if plan.key is None or plan.lead is None:
        return
    try:
        events.redis().eval(_RELEASE, 1, _lead_key(plan.key), plan.lead)
    except RedisError:
        logger.warning("Redis is unavailable; the lead on a cache key ends when it expires")
    plan.lead = None


def cache_collapsed(plan: CachePlan) -> CachePlan | None:
    """The plan of a COLLAPSED answer from the entry the run that led ``plan``'s key kept (its
    outcome committed), or None when there is none: then the run runs itself."""
    if plan.key is None:
        return None
    entry = CacheEntry.objects.filter(key=plan.key.key, expires_at__gt=timezone.now()).first()
    if entry is None:
        return None
    return CachePlan(_hit_report(entry, timezone.now(), Status.COLLAPSED), plan.key, plan.ttl, entry)


def cache_wait(plan: CachePlan, *, deadline: float) -> CachePlan | None:
    """Wait (until ``deadline``, a ``time.monotonic()``) for the entry of the run that leads:
    the plan of a COLLAPSED answer, or None when the lead ended without one (it failed) or
    the time is up: then this run runs itself."""
    assert plan.key is not None
    try:
        redis = events.redis()
        while time.monotonic() < deadline:
            # The lead first, then the entry: a leader keeps its entry before its lead ends, so a
            # lead seen gone means the look that follows finds the entry if it was kept.
            leading = redis.exists(_lead_key(plan.key))
            collapsed = cache_collapsed(plan)
            if collapsed is not None or not leading:
                return collapsed
            time.sleep(WAIT_POLL_SECONDS)
    except RedisError:
        return None
    return None
