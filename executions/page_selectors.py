"""Reads for the status pages (executions/pages.py).

Each widget of the overview is one query, aggregated in the database: the last 24 hours are
filtered on ``created_at`` (the owner's index for a person; see the note in the report for
staff), bucketed with ``TruncHour``, and summarised with PostgreSQL's ``percentile_cont``, or,
on SQLite (``make run``), with the same interpolation done in Python. Queues and workers come
from RQ, read-only, and a Redis that does not answer is reported in words, never raised.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import django_rq
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connections
from django.db.models import Aggregate, Avg, Count, FloatField, Q, QuerySet, Sum
from django.db.models.functions import TruncHour
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.worker import Worker

from instances.models import ToolInstance

from .models import Execution, Job

WINDOW = timedelta(hours=24)
# Failures in the overview: runs that went wrong. A cancelled run is someone's choice, not a failure.
FAILED = (Execution.Status.FAILED, Execution.Status.TIMED_OUT)
ENDED = (Execution.Status.COMPLETED, *FAILED, Execution.Status.CANCELLED)
IN_FLIGHT = (Job.Status.QUEUED, Job.Status.RUNNING)
REDIS_TIMEOUT_SECONDS = 2.0  # a status page must answer even when Redis hangs

User = AbstractBaseUser | AnonymousUser


# --- What a person may see ------------------------------------------------------------------


def executions_visible(*, user: User) -> QuerySet[Execution]:
    """Staff see everyone's executions; anyone else only their own."""
    qs = Execution.objects.all()
    return qs if user.is_staff else qs.filter(owner_id=user.pk)


def jobs_visible(*, user: User) -> QuerySet[Job]:
    qs = Job.objects.select_related("execution__tool", "instance", "owner")
    return qs if user.is_staff else qs.filter(owner_id=user.pk)


def instances_visible(*, user: User) -> QuerySet[ToolInstance]:
    """With what readiness and the runs touch already joined (as instances.selectors.instance_list)."""
    qs = ToolInstance.objects.select_related("tool", "owner__credit_account")
    return qs if user.is_staff else qs.filter(owner_id=user.pk)


# --- Percentiles ------------------------------------------------------------------------------


class PercentileCont(Aggregate):
    """PostgreSQL's ``percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)``."""

    function = "PERCENTILE_CONT"
    name = "PercentileCont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: Any, fraction: float, **extra: Any) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError("fraction must be between 0 and 1")
        super().__init__(expression, fraction=repr(float(fraction)), **extra)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """``percentile_cont`` in Python: linear interpolation between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower, upper = math.floor(position), math.ceil(position)
    return float(ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower))


def native_percentiles(qs: QuerySet[Any]) -> bool:
    return connections[qs.db].vendor == "postgresql"


# --- The last 24 hours --------------------------------------------------------------------------


@dataclass
class WindowSummary:
    runs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    credits: Decimal = Decimal("0")
    p50_ms: float | None = None
    p95_ms: float | None = None

    @property
    def unfinished(self) -> int:
        return self.runs - self.completed - self.failed - self.cancelled

    @property
    def failure_rate(self) -> float | None:
        ended = self.completed + self.failed + self.cancelled
        return self.failed / ended if ended else None


def _window(executions: QuerySet[Execution], since: datetime) -> QuerySet[Execution]:
    return executions.filter(created_at__gte=since).order_by()


def _counts() -> dict[str, Any]:
    return {
        "runs": Count("id"),
        "completed": Count("id", filter=Q(status=Execution.Status.COMPLETED)),
        "failed": Count("id", filter=Q(status__in=FAILED)),
        "cancelled": Count("id", filter=Q(status=Execution.Status.CANCELLED)),
        "credits": Sum("credits_consumed"),
    }


def window_summary(*, executions: QuerySet[Execution], since: datetime, native: bool | None = None) -> WindowSummary:
    """Runs, outcomes, credits and p50/p95 duration since ``since``: one query (two on SQLite)."""
    window = _window(executions, since)
    native = native_percentiles(window) if native is None else native
    aggregates = _counts()
    if native:
        aggregates["p50_ms"] = PercentileCont("duration_ms", 0.5)
        aggregates["p95_ms"] = PercentileCont("duration_ms", 0.95)
    row = window.aggregate(**aggregates)
    row["credits"] = row["credits"] or Decimal("0")
    if not native:
        durations = list(window.filter(duration_ms__isnull=False).values_list("duration_ms", flat=True))
        row["p50_ms"], row["p95_ms"] = percentile(durations, 0.5), percentile(durations, 0.95)
    return WindowSummary(**row)


@dataclass
class HourBucket:
    hour: datetime
    runs: int
    failed: int


def hourly_buckets(*, executions: QuerySet[Execution], now: datetime, hours: int = 24) -> list[HourBucket]:
    """Runs and failures per hour for the last ``hours`` hours, oldest first, empty hours included."""
    current = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    first = current - timedelta(hours=hours - 1)
    rows = (
        _window(executions, first)
        .annotate(hour=TruncHour("created_at", tzinfo=UTC))
        .values("hour")
        .annotate(runs=Count("id"), failed=Count("id", filter=Q(status__in=FAILED)))
        .order_by("hour")
    )
    found = {row["hour"]: row for row in rows}
    buckets = []
    for offset in range(hours):
        hour = first + timedelta(hours=offset)
        row = found.get(hour, {})
        buckets.append(HourBucket(hour=hour, runs=row.get("runs", 0), failed=row.get("failed", 0)))
    return buckets


@dataclass
class ToolRow:
    slug: str
    name: str
    runs: int
    completed: int
    failed: int
    cancelled: int
    credits: Decimal
    avg_ms: float | None
    p50_ms: float | None = None
    p95_ms: float | None = None

    @property
    def failure_rate(self) -> float | None:
        ended = self.completed + self.failed + self.cancelled
        return self.failed / ended if ended else None


def tool_table(*, executions: QuerySet[Execution], since: datetime, native: bool | None = None) -> list[ToolRow]:
    """Per tool since ``since``, busiest first: one query (two on SQLite)."""
    window = _window(executions, since)
    native = native_percentiles(window) if native is None else native
    aggregates = {**_counts(), "avg_ms": Avg("duration_ms")}
    if native:
        aggregates["p50_ms"] = PercentileCont("duration_ms", 0.5)
        aggregates["p95_ms"] = PercentileCont("duration_ms", 0.95)
    rows = list(
        window.values("tool_id", "tool__slug", "tool__name").annotate(**aggregates).order_by("-runs", "tool__name")
    )
    durations: dict[int, list[int]] = defaultdict(list)
    if not native:
        for tool_id, duration in window.filter(duration_ms__isnull=False).values_list("tool_id", "duration_ms"):
            durations[tool_id].append(duration)
    table = []
    for row in rows:
        tool_id = row.pop("tool_id")
        if not native:
            row["p50_ms"] = percentile(durations[tool_id], 0.5)
            row["p95_ms"] = percentile(durations[tool_id], 0.95)
        table.append(
            ToolRow(
                slug=row.pop("tool__slug"),
                name=row.pop("tool__name"),
                **{**row, "credits": row["credits"] or Decimal("0")},
            )
        )
    return table


def latest_failures(*, executions: QuerySet[Execution], limit: int = 10) -> list[Execution]:
    return list(
        executions.filter(status__in=FAILED)
        .select_related("tool", "instance", "job")
        .order_by("-created_at", "-id")[:limit]
    )


def jobs_in_flight(*, jobs: QuerySet[Job], limit: int = 50) -> list[Job]:
    """Queued and running jobs, oldest first; ``limit + 1`` rows tell whether there are more."""
    return list(jobs.filter(status__in=IN_FLIGHT).order_by("created_at", "id")[: limit + 1])


# --- Queues and workers (RQ, read-only) -------------------------------------------------------


@dataclass
class QueueInfo:
    name: str
    waiting: int
    scheduled: int
    running: int
    oldest_enqueued_at: datetime | None


@dataclass
class WorkerInfo:
    name: str
    state: str
    queues: list[str]
    current_job_id: str | None
    last_heartbeat: datetime | None

    @property
    def job_uuid(self) -> str | None:
        """Our Job's id when the worker runs one of ours (RQ ids are ``<uuid>`` or ``<uuid>:<n>``)."""
        if not self.current_job_id:
            return None
        try:
            return str(uuid.UUID(self.current_job_id.split(":", 1)[0]))
        except ValueError:
            return None


@dataclass
class QueueReport:
    available: bool
    queues: list[QueueInfo] = field(default_factory=list)
    workers: list[WorkerInfo] = field(default_factory=list)
    problem: str = ""


def _connection(name: str) -> Any:
    connection = django_rq.get_connection(name)
    # A fresh client: bound how long this page may wait for Redis.
    connection.connection_pool.connection_kwargs.update(
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS, socket_timeout=REDIS_TIMEOUT_SECONDS
    )
    return connection


def _oldest_enqueued_at(queue: Any) -> datetime | None:
    for rq_job_id in queue.get_job_ids(0, 1):
        try:
            return RQJob.fetch(rq_job_id, connection=queue.connection).enqueued_at
        except NoSuchJobError:
            return None
    return None


def queue_report(*, queue_names: Iterable[str] | None = None) -> QueueReport:
    """Depth and oldest waiting job per queue, and every worker: read from RQ, never written."""
    names = list(queue_names if queue_names is not None else settings.RQ_QUEUES)
    report = QueueReport(available=True)
    seen_workers: set[str] = set()
    try:
        for name in names:
            queue = django_rq.get_queue(name, connection=_connection(name))
            report.queues.append(
                QueueInfo(
                    name=name,
                    waiting=queue.count,
                    scheduled=ScheduledJobRegistry(queue=queue).get_job_count(cleanup=False),
                    running=StartedJobRegistry(queue=queue).get_job_count(cleanup=False),
                    oldest_enqueued_at=_oldest_enqueued_at(queue),
                )
            )
            for worker in Worker.all(queue=queue):
                if worker.name in seen_workers:
                    continue
                seen_workers.add(worker.name)
                report.workers.append(
                    WorkerInfo(
                        name=worker.name,
                        state=worker.get_state(),
                        queues=worker.queue_names(),
                        current_job_id=worker.get_current_job_id(),
                        last_heartbeat=worker.last_heartbeat,
                    )
                )
    except (RedisError, OSError) as exc:
        return QueueReport(available=False, problem=type(exc).__name__)
    report.workers.sort(key=lambda w: w.name)
    return report


# --- Execution history, keyset-paginated ------------------------------------------------------


class BadCursor(ValueError):
    pass


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def cursor_of(execution: Execution) -> str:
    """``<microseconds since the epoch>.<id>``: exact, so no row is skipped or repeated."""
    return f"{(execution.created_at - _EPOCH) // _MICROSECOND}.{execution.pk.hex}"


def cursor_parse(value: str) -> tuple[datetime, uuid.UUID]:
    try:
        micros, pk = value.split(".", 1)
        return _EPOCH + int(micros) * _MICROSECOND, uuid.UUID(hex=pk)
    except (ValueError, OverflowError):
        raise BadCursor(value) from None


@dataclass
class HistoryPage:
    items: list[Execution]
    newer: str | None  # cursor for the page of newer executions
    older: str | None  # cursor for the page of older ones


def execution_history(
    *,
    executions: QuerySet[Execution],
    before: str = "",
    after: str = "",
    size: int = 25,
) -> HistoryPage:
    """One page of ``executions``, newest first, after or before a cursor: one query, no COUNT.

    The cursor's ``created_at`` bound is also given on its own: it is the index's range, so the
    page costs the same at any depth; the ``(created_at, id)`` comparison beside it only sorts
    out the rows of the cursor's own microsecond (PostgreSQL cannot range-scan an ``OR``)."""
    qs = executions.select_related("tool", "instance", "job", "owner")
    if after:
        moment, pk = cursor_parse(after)
        newer = qs.filter(created_at__gte=moment).filter(Q(created_at__gt=moment) | Q(created_at=moment, id__gt=pk))
        rows = list(newer.order_by("created_at", "id")[: size + 1])
        more_newer = len(rows) > size
        items = list(reversed(rows[:size]))
        return HistoryPage(
            items=items,
            newer=cursor_of(items[0]) if more_newer and items else None,
            older=cursor_of(items[-1]) if items else None,
        )
    if before:
        moment, pk = cursor_parse(before)
        qs = qs.filter(created_at__lte=moment).filter(Q(created_at__lt=moment) | Q(created_at=moment, id__lt=pk))
    rows = list(qs.order_by("-created_at", "-id")[: size + 1])
    items = rows[:size]
    return HistoryPage(
        items=items,
        newer=cursor_of(items[0]) if before and items else None,
        older=cursor_of(items[-1]) if len(rows) > size else None,
    )


@dataclass
class CacheSummary:
    """What the result cache did for an instance's runs in a window (``instance_cache_summary``)."""

    runs: int = 0
    hits: int = 0
    credits_saved: Decimal = Decimal("0")

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.runs if self.runs else None


def instance_cache_summary(*, instance: ToolInstance, since: datetime) -> CacheSummary:
    """The instance's runs since ``since``, how many of them the cache answered (a HIT, or
    COLLAPSED onto an identical run), and the credits that saved: one query, on the
    ``(instance, -created_at)`` index.

    Credits saved = what the hits would have cost as runs − what they cost. What a hit would
    have cost as a run is what the run that produced its result was charged (the same tool,
    inputs and pricing); for a hit whose producing run is no longer recorded, the tool's base
    price. What it cost is its own charge (``TOOLEXEC_CACHE_HIT_CREDITS``, 0 by default)."""
    hit = Q(cache_hit=True)
    row = (
        Execution.objects.filter(instance_id=instance.pk, created_at__gte=since)
        .order_by()
        .aggregate(
            runs=Count("id"),
            hits=Count("id", filter=hit),
            orphans=Count("id", filter=hit & Q(source_execution__isnull=True)),
            would_cost=Sum("source_execution__credits_consumed", filter=hit),
            cost=Sum("credits_consumed", filter=hit),
        )
    )
    would_cost = (row["would_cost"] or Decimal("0")) + row["orphans"] * instance.tool.base_credits
    saved = would_cost - (row["cost"] or Decimal("0"))
    return CacheSummary(runs=row["runs"], hits=row["hits"], credits_saved=saved)


def instance_recent_executions(*, instance: ToolInstance, limit: int = 10) -> list[Execution]:
    return list(
        Execution.objects.filter(instance_id=instance.pk)
        .select_related("tool", "job")
        .order_by("-created_at", "-id")[:limit]
    )
