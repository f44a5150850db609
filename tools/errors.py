"""The typed errors tools and services raise (DESIGN.md §6): each names what happened, with
its parameters; the catalog (core/errors.py) turns it into words and action items."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import ErrorCode, ToolexecError


class InputInvalid(ToolexecError):
    code = ErrorCode.INPUT_INVALID


class CredentialMissing(ToolexecError):
    code = ErrorCode.CREDENTIAL_MISSING


class CredentialExpired(ToolexecError):
    code = ErrorCode.CREDENTIAL_EXPIRED


class CredentialRevoked(ToolexecError):
    code = ErrorCode.CREDENTIAL_REVOKED


class CredentialInvalid(ToolexecError):
    code = ErrorCode.CREDENTIAL_INVALID


class InsufficientCredits(ToolexecError):
    code = ErrorCode.INSUFFICIENT_CREDITS


class QueueUnavailable(ToolexecError):
    code = ErrorCode.QUEUE_UNAVAILABLE


class ToolUnavailable(ToolexecError):
    code = ErrorCode.TOOL_UNAVAILABLE


class IdempotencyConflict(ToolexecError):
    code = ErrorCode.IDEMPOTENCY_CONFLICT


class UpstreamError(ToolexecError):
    code = ErrorCode.UPSTREAM_ERROR


class UpstreamRateLimited(ToolexecError):
    code = ErrorCode.UPSTREAM_RATE_LIMITED


class ToolTimeout(ToolexecError):
    code = ErrorCode.TIMEOUT


class Cancelled(ToolexecError):
    code = ErrorCode.CANCELLED


@dataclass
class FieldErrors:
    """Collects field errors keyed by a dotted path, as INPUT_INVALID reports them."""

    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, path: str, message: str) -> None:
        self.errors.setdefault(path, []).append(message)

    def __bool__(self) -> bool:
        return bool(self.errors)
