"""The Tool SDK (DESIGN.md §6): what a tool author writes against.

A tool is a subclass of :class:`Tool` with a slug, a JSON Schema for its inputs, its
credential slots, the modes it supports and its pricing, and a ``run(inputs, ctx)`` method.
It never touches the database: everything it needs from the platform comes through the
:class:`ExecutionContext`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import IO, Any, ClassVar

from .errors import Cancelled, CredentialExpired, CredentialMissing, InputInvalid, ToolTimeout

SYNC = "sync"
ASYNC = "async"
MODES = (SYNC, ASYNC)

CREDIT_PLACES = Decimal("0.0001")


@dataclass(frozen=True)
class CredentialSlot:
    """A named credential a tool needs, e.g. ``CredentialSlot("OAUTH_TOKEN", provider="google",
    kind="oauth2", scopes=(...))``. ``kind`` may be one kind or a tuple of accepted kinds."""

    name: str
    provider: str
    kind: str | tuple[str, ...]
    scopes: tuple[str, ...] = ()
    required: bool = True
    description: str = ""

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provider": self.provider,
            "kinds": list(self.kinds),
            "scopes": list(self.scopes),
            "required": self.required,
            "description": self.description,
        }


class Tool:
    """Base class of every tool. Subclasses set the class attributes and implement ``run``."""

    slug: ClassVar[str]
    name: ClassVar[str]
    description: ClassVar[str] = ""
    version: ClassVar[str] = "1.0.0"
    category: ClassVar[str] = "general"
    input_schema: ClassVar[dict[str, Any]] = {"type": "object"}
    output_schema: ClassVar[dict[str, Any]] = {}
    credential_slots: ClassVar[tuple[CredentialSlot, ...]] = ()
    modes: ClassVar[frozenset[str]] = frozenset({SYNC})
    timeout_seconds: ClassVar[int] = 30
    base_credits: ClassVar[Decimal] = Decimal("0")
    credits_per_unit: ClassVar[Decimal] = Decimal("0")
    unit: ClassVar[str] = ""
    # Result caching (DESIGN.md §9). Only a tool whose run has no side effects is cacheable;
    # ``is_cacheable`` refines it per call and ``cache_exclude_inputs`` names the inputs that do
    # not change the result. A new instance caches when ``cache_by_default`` (else its owner
    # turns it on), for ``cache_ttl_default`` seconds unless it picks another TTL, at most
    # ``cache_ttl_max``.
    cacheable: ClassVar[bool] = False
    cache_by_default: ClassVar[bool] = True
    cache_ttl_default: ClassVar[int] = 300
    cache_ttl_max: ClassVar[int] = 24 * 3600
    cache_exclude_inputs: ClassVar[frozenset[str]] = frozenset()
    # Whether running the same inputs twice is harmless (decides automatic retries).
    idempotent: ClassVar[bool] = True
    # Async runs that fail with one of these codes are tried again (idempotent tools only),
    # up to max_attempts in all, waiting retry_backoff_seconds × 2^(attempt-1) between tries.
    retry_on: ClassVar[frozenset[str]] = frozenset()
    max_attempts: ClassVar[int] = 1
    retry_backoff_seconds: ClassVar[float] = 2.0

    def validate(self, inputs: dict[str, Any]) -> None:
        """Checks beyond the JSON Schema, run before the execution is recorded.

        Raise :class:`~tools.errors.InputInvalid` with ``field_errors`` to refuse the inputs.
        """

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        raise NotImplementedError

    def is_cacheable(self, inputs: dict[str, Any]) -> bool:
        """Whether a run with these (effective) inputs may answer from, and go to, the cache."""
        return self.cacheable

    def is_cacheable_result(self, output: dict[str, Any]) -> bool:
        """Whether a completed run's output may be kept (an error the upstream answered, say, is not)."""
        return True

    def cache_key_extra(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """What else identifies the result beyond the inputs (a file's version, say), put into
        the cache key; nothing by default."""
        return {}

    @classmethod
    def credits_for(cls, units: Decimal) -> Decimal:
        return (cls.base_credits + cls.credits_per_unit * units).quantize(CREDIT_PLACES)


ProgressSink = Callable[[int, str, int | None, int | None], None]


@dataclass
class ExecutionContext:
    """What a running tool gets from the platform.

    ``progress_sink`` receives every progress change (the async runner coalesces database
    writes there); ``cancel_probe`` is asked by :meth:`check_cancelled` whether someone
    cancelled the run. A ``deadline`` (monotonic seconds) turns the next check after it into
    :class:`~tools.errors.ToolTimeout`.
    """

    execution_id: str
    tool_slug: str = ""
    credentials: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    # The non-secret metadata of each slot's credential (an API key's header_name, scopes, email).
    credential_info: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    deadline: float | None = None
    timeout_seconds: int | None = None
    progress_sink: ProgressSink | None = None
    cancel_probe: Callable[[], bool] | None = None
    # Given a slot, returns a freshly refreshed secret for it (or raises CredentialExpired).
    refresher: Callable[[str], dict[str, Any]] | None = None
    # Given an uploaded file's id, returns its metadata and its opened bytes, if the run's owner
    # has such a file (or raises InputInvalid naming file_id).
    files: Callable[[str], tuple[dict[str, Any], IO[bytes]]] | None = None
    percent: int = 0
    step: str = ""
    step_index: int | None = None
    steps_total: int | None = None
    units: Decimal = Decimal("0")
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _stop_reason: str = ""

    def __post_init__(self) -> None:
        self.logger = logging.LoggerAdapter(
            logging.getLogger(f"toolexec.tool.{self.tool_slug or 'unknown'}"),
            {"execution_id": self.execution_id},
        )

    def credential(self, slot: str) -> dict[str, Any]:
        """The decrypted secret mapped to ``slot`` for this run."""
        try:
            return dict(self.credentials[slot])
        except KeyError:
            raise CredentialMissing(slot=slot) from None

    def credential_metadata(self, slot: str) -> dict[str, Any]:
        """The non-secret metadata of the credential mapped to ``slot`` (empty when none)."""
        return dict(self.credential_info.get(slot, {}))

    def refresh_credential(self, slot: str) -> dict[str, Any]:
        """A fresh secret for ``slot`` after the provider refused the current one (say, HTTP 401).

        Raises :class:`~tools.errors.CredentialExpired` when the credential cannot be refreshed.
        """
        if self.refresher is None or slot not in self.credentials:
            raise CredentialExpired(slot=slot)
        secret = self.refresher(slot)
        self.credentials = {**self.credentials, slot: secret}
        return dict(secret)

    def open_file(self, file_id: str) -> tuple[dict[str, Any], IO[bytes]]:
        """An uploaded file of the run's owner: its metadata (``id``, ``name``, ``size_bytes``,
        ``content_type``, ``sha256``) and a binary stream of its bytes, which the tool closes.

        Raises :class:`~tools.errors.InputInvalid` naming ``file_id`` when the owner has no
        file with this id.
        """
        if self.files is None:
            raise InputInvalid(
                "No uploaded file with this id.", field_errors={"file_id": ["No uploaded file with this id."]}
            )
        return self.files(file_id)

    def progress(
        self, percent: float, step: str | None = None, *, step_index: int | None = None, steps_total: int | None = None
    ) -> None:
        """Report progress (0–100, never going down), the current step and, optionally, step i of
        n. Cheap to call often: only changes go further, and the platform coalesces its writes."""
        value = max(self.percent, min(100, int(percent)))
        new_step = self.step if step is None else step
        index = self.step_index if step_index is None else step_index
        total = self.steps_total if steps_total is None else steps_total
        if (value, new_step, index, total) != (self.percent, self.step, self.step_index, self.steps_total):
            self.percent, self.step, self.step_index, self.steps_total = value, new_step, index, total
            if self.progress_sink is not None:
                self.progress_sink(value, new_step, index, total)
        self.check_cancelled()

    def usage(self, units: float | Decimal | int) -> None:
        """Add ``units`` of work (the tool's pricing unit) to what this run is charged."""
        self.units += Decimal(str(units))

    def check_cancelled(self) -> None:
        """Raise if the run was cancelled or has run out of time; tools call it between steps."""
        if self._stop.is_set():
            self._raise_stop()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stop("timeout")
            self._raise_stop()
        if self.cancel_probe is not None and self.cancel_probe():
            self.stop("cancelled")
            self._raise_stop()

    def sleep(self, seconds: float) -> None:
        """Wait, waking at once when the run is stopped or its time is up (instead of ``time.sleep``)."""
        if self.deadline is not None:
            seconds = min(seconds, max(0.0, self.deadline - time.monotonic()))
        self._stop.wait(seconds)
        self.check_cancelled()

    def stop(self, reason: str) -> None:
        """Ask the tool to stop at its next check (``reason``: "timeout" or "cancelled")."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _raise_stop(self) -> None:
        if self._stop_reason == "timeout":
            raise ToolTimeout(seconds=self.timeout_seconds or "")
        raise Cancelled()
