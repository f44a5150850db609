"""The error catalog (DESIGN.md §5) and the error every typed error derives from.

One source of truth: an error code maps to an HTTP status, a message template written for a
person (with the tool's and provider's display names) and the action items that say what to
do about it. Every error answer and every failed execution is rendered from here. The typed
errors tools and services raise are the SDK's (tools/errors.py).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.urls import NoReverseMatch, reverse

from .words import bytes_words, credits_words


class ErrorCode(StrEnum):
    CREDENTIAL_MISSING = "CREDENTIAL_MISSING"
    CREDENTIAL_EXPIRED = "CREDENTIAL_EXPIRED"
    CREDENTIAL_REVOKED = "CREDENTIAL_REVOKED"
    CREDENTIAL_INVALID = "CREDENTIAL_INVALID"
    INSTANCE_DISABLED = "INSTANCE_DISABLED"
    INSTANCE_ERROR = "INSTANCE_ERROR"
    INSTANCE_DRAFT = "INSTANCE_DRAFT"
    INVALID_TRANSITION = "INVALID_TRANSITION"
    TOOL_INACTIVE = "TOOL_INACTIVE"
    TOOL_UNAVAILABLE = "TOOL_UNAVAILABLE"
    TOOL_ERROR = "TOOL_ERROR"
    MODE_NOT_SUPPORTED = "MODE_NOT_SUPPORTED"
    INPUT_INVALID = "INPUT_INVALID"
    INSUFFICIENT_CREDITS = "INSUFFICIENT_CREDITS"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    UPSTREAM_RATE_LIMITED = "UPSTREAM_RATE_LIMITED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"
    QUEUE_UNAVAILABLE = "QUEUE_UNAVAILABLE"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    NOT_AUTHENTICATED = "NOT_AUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    NOT_ACCEPTABLE = "NOT_ACCEPTABLE"
    THROTTLED = "THROTTLED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    FILE_TOO_LARGE = "FILE_TOO_LARGE"


@dataclass(frozen=True)
class Route:
    """An API URL by its route name, built with reverse() when an error is rendered: the name
    and the ``pk`` come from the error's params (``pk`` names the param that holds it)."""

    name: str
    pk: str = "instance_id"


@dataclass(frozen=True)
class Action:
    action: str
    message: str
    # Where to do it: a Route, or a path from the error's params (a provider's reconnect page);
    # made absolute with TOOLEXEC_BASE_URL.
    path: Route | str = ""
    priority: str = "medium"


@dataclass(frozen=True)
class CatalogEntry:
    status: int
    message: str
    can_retry: bool = False
    actions: tuple[Action, ...] = ()


CATALOG: dict[ErrorCode, CatalogEntry] = {
    ErrorCode.CREDENTIAL_MISSING: CatalogEntry(
        409,
        "{tool} needs your {provider} account before it can run.",
        actions=(
            Action(
                "fix_credential",
                "Connect your {provider} account and map it to this instance",
                Route("instance-configure-credentials"),
                "high",
            ),
        ),
    ),
    ErrorCode.CREDENTIAL_EXPIRED: CatalogEntry(
        409,
        "Your {provider} account access for {tool} has expired and needs to be renewed.",
        actions=(
            Action(
                "fix_credential",
                "Click the link below to reconnect your {provider} account",
                "{reconnect_path}",
                "high",
            ),
        ),
    ),
    ErrorCode.CREDENTIAL_REVOKED: CatalogEntry(
        409,
        "Your {provider} account access for {tool} was revoked. Connect the account again to keep using it.",
        actions=(
            Action(
                "fix_credential",
                "Click the link below to reconnect your {provider} account",
                "{reconnect_path}",
                "high",
            ),
        ),
    ),
    ErrorCode.CREDENTIAL_INVALID: CatalogEntry(
        409,
        "{tool} could not use your {provider} account: {detail}",
        actions=(
            Action(
                "fix_credential",
                "Click the link below to reconnect your {provider} account",
                "{reconnect_path}",
                "high",
            ),
        ),
    ),
    ErrorCode.INSTANCE_DISABLED: CatalogEntry(
        409,
        "This {tool} instance is disabled. Activate it to run it again.",
        actions=(Action("activate_instance", "Activate the instance", Route("instance-activate"), "high"),),
    ),
    ErrorCode.INSTANCE_ERROR: CatalogEntry(
        409,
        "This {tool} instance is in an error state and cannot run. Activate it again once the problem is fixed.",
        actions=(Action("activate_instance", "Activate the instance", Route("instance-activate"), "high"),),
    ),
    ErrorCode.INSTANCE_DRAFT: CatalogEntry(
        409,
        "This {tool} instance is a draft: it becomes active once its credentials are mapped.",
        actions=(
            Action(
                "fix_credential",
                "Map the credentials this instance needs",
                Route("instance-configure-credentials"),
                "high",
            ),
        ),
    ),
    ErrorCode.INVALID_TRANSITION: CatalogEntry(409, "{detail}"),
    ErrorCode.TOOL_INACTIVE: CatalogEntry(
        409,
        "{tool} has been switched off by the operators and cannot run right now.",
        actions=(Action("contact_support", "Ask your administrator to turn the tool back on", "", "medium"),),
    ),
    ErrorCode.TOOL_UNAVAILABLE: CatalogEntry(
        409,
        "{tool} is not available on this server right now: its implementation is not installed.",
        actions=(Action("contact_support", "Ask your administrator to install the tool", "", "medium"),),
    ),
    ErrorCode.TOOL_ERROR: CatalogEntry(
        500,
        "{tool} stopped because of an unexpected error. The error was logged; try again, and "
        "contact support if it keeps happening.",
        can_retry=True,
    ),
    ErrorCode.MODE_NOT_SUPPORTED: CatalogEntry(
        409,
        "{tool} cannot run {mode}; it supports only {supported_modes} execution.",
        actions=(
            Action(
                "use_{other_mode}",
                "Run it with execute-{other_mode} instead",
                Route("instance-run-execute-{other_mode}"),
                "high",
            ),
        ),
    ),
    ErrorCode.INPUT_INVALID: CatalogEntry(
        400,
        "{detail}",
        actions=(Action("fix_input", "Correct the fields listed in field_errors and try again", "", "high"),),
    ),
    ErrorCode.INSUFFICIENT_CREDITS: CatalogEntry(
        402,
        "You do not have enough credits to run {tool}: a run costs at least {needed:credits} and your balance is "
        "{balance:credits}.",
        actions=(Action("add_credits", "Ask your administrator to add credits to your account", "", "high"),),
    ),
    ErrorCode.UPSTREAM_ERROR: CatalogEntry(
        502, "{provider} answered with an error while {tool} was running: {detail}", can_retry=True
    ),
    ErrorCode.UPSTREAM_RATE_LIMITED: CatalogEntry(
        429,
        "{provider} is limiting requests from {tool} right now. Try again in a little while.",
        can_retry=True,
    ),
    ErrorCode.TIMEOUT: CatalogEntry(
        504,
        "{tool} did not finish within {seconds} seconds and was stopped.",
        can_retry=True,
        actions=(
            Action(
                "use_async",
                "Run long work with execute-async, which has more time",
                Route("instance-run-execute-async"),
                "medium",
            ),
        ),
    ),
    ErrorCode.CANCELLED: CatalogEntry(409, "This run of {tool} was cancelled."),
    ErrorCode.WORKER_LOST: CatalogEntry(
        500, "The worker running {tool} stopped unexpectedly before the run finished.", can_retry=True
    ),
    ErrorCode.QUEUE_UNAVAILABLE: CatalogEntry(
        503, "The job queue is unavailable right now, so {tool} could not be started.", can_retry=True
    ),
    ErrorCode.IDEMPOTENCY_CONFLICT: CatalogEntry(
        409,
        "This Idempotency-Key was already used with a different request body. Send the same body to get "
        "the first answer again, or use a new key for a new run.",
    ),
    ErrorCode.NOT_AUTHENTICATED: CatalogEntry(401, "{detail}"),
    ErrorCode.PERMISSION_DENIED: CatalogEntry(403, "You are not allowed to do this."),
    ErrorCode.NOT_FOUND: CatalogEntry(404, "{detail}"),
    ErrorCode.METHOD_NOT_ALLOWED: CatalogEntry(405, "{detail}"),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: CatalogEntry(415, "{detail}"),
    ErrorCode.NOT_ACCEPTABLE: CatalogEntry(406, "{detail}"),
    ErrorCode.THROTTLED: CatalogEntry(
        429, "Too many requests. Try again in {retry_after_seconds} seconds.", can_retry=True
    ),
    ErrorCode.INTERNAL_ERROR: CatalogEntry(
        500, "Something went wrong on our side. The error was logged; please try again.", can_retry=True
    ),
    ErrorCode.FILE_TOO_LARGE: CatalogEntry(
        413,
        "This file is too large: uploads may be at most {limit:bytes}.",
        actions=(
            Action("reduce_file", "Upload a smaller file: split it, or leave out what you don't need", "", "high"),
        ),
    ),
}

_DEFAULT_PARAMS = {"tool": "This tool", "provider": "the provider", "detail": ""}


class _Params(dict):
    def __missing__(self, key: str) -> str:
        return _DEFAULT_PARAMS.get(key, "")


# Format specs that say a number in words: "{needed:credits}", "{limit:bytes}". Errors carry
# the numbers (Decimal, int); how they read is decided here, when the message is rendered.
_WORDS: dict[str, Callable[[Any], str]] = {
    "credits": lambda amount: credits_words(Decimal(amount)),
    "bytes": bytes_words,
}


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec in _WORDS:
            is_number = isinstance(value, int | Decimal) and not isinstance(value, bool)
            return _WORDS[format_spec](value) if is_number else str(value)
        return super().format_field(value, format_spec)


_formatter = _Formatter()


def _format(template: str, params: dict[str, Any]) -> str:
    return _formatter.vformat(template, (), _Params(params)).strip()


def absolute_url(path: str) -> str:
    if not path or path.startswith(("http://", "https://")):
        return path
    return settings.TOOLEXEC_BASE_URL + path


def _url(path: Route | str, params: dict[str, Any]) -> str:
    """The action's absolute URL, or "" when it needs a param the error does not have."""
    template = path.name if isinstance(path, Route) else path
    needed = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    if isinstance(path, Route):
        needed.append(path.pk)
    if not all(params.get(name) for name in needed):
        return ""
    if not isinstance(path, Route):
        return absolute_url(_format(path, params))
    try:
        return absolute_url(reverse(_format(path.name, params), kwargs={"pk": params[path.pk]}))
    except NoReverseMatch:
        return ""  # params that name no route (a mode that has none): the action, without a link


def action_items(code: ErrorCode, params: dict[str, Any]) -> list[dict[str, str]]:
    items = []
    for action in CATALOG[code].actions:
        url = _url(action.path, params)
        item = {
            "action": _format(action.action, params),
            "message": _format(action.message, params),
            "priority": action.priority,
        }
        if url:
            item["url"] = url
        items.append(item)
    return items


def http_status(code: ErrorCode | str) -> int:
    return CATALOG[ErrorCode(code)].status


def envelope(
    code: ErrorCode | str,
    params: dict[str, Any] | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    items: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The error body of DESIGN.md §5 for ``code``, in words, with its action items."""
    code = ErrorCode(code)
    params = params or {}
    entry = CATALOG[code]
    meta: dict[str, Any] = {
        "action_items": items if items is not None else action_items(code, params),
        "can_retry": entry.can_retry,
    }
    meta.update(metadata or {})
    return {
        "success": False,
        "error_code": code.value,
        "error_message": _format(entry.message, params),
        "metadata": meta,
    }


class ToolexecError(Exception):
    """An error with a catalog code. ``params`` fill the message; ``metadata`` goes beside
    the action items (``field_errors``, ``retry_after_seconds``)."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        detail: str = "",
        *,
        provider: str = "",
        field_errors: dict[str, list[str]] | None = None,
        retry_after_seconds: int | None = None,
        metadata: dict[str, Any] | None = None,
        **params: Any,
    ) -> None:
        super().__init__(detail or self.code.value)
        self.detail = detail
        self.provider = provider
        self.params: dict[str, Any] = dict(params)
        if provider:
            self.params["provider"] = provider
        if detail:
            self.params["detail"] = detail
        self.metadata: dict[str, Any] = {}
        if field_errors:
            self.metadata["field_errors"] = field_errors
        if retry_after_seconds is not None:
            self.metadata["retry_after_seconds"] = retry_after_seconds
        self.metadata.update(metadata or {})

    def envelope(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        # The caller knows display names and links better than the tool; the tool knows the detail.
        merged = {**self.params, **(params or {})}
        return envelope(self.code, merged, metadata=self.metadata)
