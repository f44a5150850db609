"""Is an instance ready to run? Every check, in words, with what to do about each problem.

``readiness_check`` is what validate-execution shows and what execute-sync and
execute-async refuse on. Checks carry a rank: the lowest-ranked failing check is "the most
important problem" whose message and code an execution refusal uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from core.errors import ErrorCode, action_items, envelope, http_status
from credits.models import CreditAccount
from credits.services import credit_account_for
from tools import registry
from tools.sdk import MODES

from .models import Credential, ToolInstance
from .providers import provider_get, reconnect_path
from .selectors import slot_credentials, slot_credentials_many


@dataclass
class Check:
    name: str
    passed: bool
    message: str
    rank: int
    error_code: str = ""
    action_items: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "message": self.message,
            "error_code": self.error_code or None,
            "action_items": self.action_items,
        }


@dataclass
class Readiness:
    instance: ToolInstance
    checks: list[Check]
    params: dict[str, Any]
    account: CreditAccount
    credentials: dict[str, Credential | None] = field(default_factory=dict)

    @property
    def failures(self) -> list[Check]:
        return sorted((c for c in self.checks if not c.passed), key=lambda c: c.rank)

    @property
    def is_ready(self) -> bool:
        return not self.failures

    @property
    def action_items(self) -> list[dict[str, str]]:
        items, seen = [], set()
        for check in self.failures:
            for item in check.action_items:
                key = (item["action"], item.get("url", ""))
                if key not in seen:
                    seen.add(key)
                    items.append(item)
        order = {"high": 0, "medium": 1, "low": 2}
        return sorted(items, key=lambda item: order.get(item["priority"], 3))

    def as_dict(self) -> dict[str, Any]:
        failures = self.failures
        return {
            "is_ready": not failures,
            "error_code": failures[0].error_code if failures else None,
            "error_message": failures[0].message if failures else None,
            "action_items": self.action_items,
            "checks": [check.as_dict() for check in self.checks],
        }

    def refusal(self) -> tuple[int, dict[str, Any]]:
        """The error envelope (and HTTP status) that refuses a run on this readiness."""
        first = self.failures[0]
        body = envelope(first.error_code, self.params, items=self.action_items)
        body["error_message"] = first.message
        return http_status(first.error_code), body


def _failed(name: str, code: ErrorCode, rank: int, params: dict[str, Any]) -> Check:
    return Check(
        name=name,
        passed=False,
        message=envelope(code, params)["error_message"],
        rank=rank,
        error_code=code.value,
        action_items=action_items(code, params),
    )


def readiness_check(
    *,
    instance: ToolInstance,
    mode: str | None = None,
    credentials: dict[str, Credential | None] | None = None,
) -> Readiness:
    """All readiness checks for ``instance``; ``mode`` ("sync"/"async") adds the mode check.

    Expects ``instance.tool`` loaded (and ``instance.owner.credit_account`` where the caller
    can select it): it makes no query when both are. ``credentials`` are the slots' resolved
    credentials when the caller already has them (:func:`readiness_many`); else one query.
    """
    tool = instance.tool
    params: dict[str, Any] = {"tool": tool.name, "instance_id": str(instance.pk)}
    checks: list[Check] = []

    if tool.is_available and registry.get_tool(tool.slug) is not None:
        checks.append(Check("tool_available", True, f"{tool.name} is installed on this server.", 10))
    else:
        checks.append(_failed("tool_available", ErrorCode.TOOL_UNAVAILABLE, 10, params))

    if tool.is_active:
        checks.append(Check("tool_active", True, f"{tool.name} is switched on.", 20))
    else:
        checks.append(_failed("tool_active", ErrorCode.TOOL_INACTIVE, 20, params))

    status = instance.status
    if status == ToolInstance.Status.ACTIVE:
        checks.append(Check("instance_status", True, "The instance is active.", 30))
    elif status == ToolInstance.Status.DISABLED:
        checks.append(_failed("instance_status", ErrorCode.INSTANCE_DISABLED, 30, params))
    elif status == ToolInstance.Status.ERROR:
        checks.append(_failed("instance_status", ErrorCode.INSTANCE_ERROR, 30, params))
    else:  # DRAFT: it becomes active once its required credentials are mapped.
        checks.append(_failed("instance_status", ErrorCode.INSTANCE_DRAFT, 45, params))

    if credentials is None:
        credentials = slot_credentials(instance=instance) if tool.credential_slots else {}
    now = timezone.now()
    for slot in tool.credential_slots:
        # An optional slot is checked once it is mapped: a mapped credential must be usable.
        if slot.get("required", True) or instance.credential_mappings.get(slot["name"]):
            checks.append(_credential_check(slot, credentials.get(slot["name"]), instance, params, now))

    if mode is not None:
        supported = [m for m in MODES if tool.supports(m)]
        if tool.supports(mode):
            checks.append(Check("mode", True, f"{tool.name} runs {mode}.", 50))
        else:
            other = supported[0] if supported else "sync"
            mode_params = {
                **params,
                "mode": mode,
                "supported_modes": " and ".join(supported) or "no",
                "other_mode": other,
            }
            checks.append(_failed("mode", ErrorCode.MODE_NOT_SUPPORTED, 50, mode_params))

    account = getattr(instance.owner, "credit_account", None) or credit_account_for(owner=instance.owner)
    needed = tool.base_credits
    free = tool.base_credits == 0 and tool.credits_per_unit == 0
    if free or account.is_unlimited or (account.balance >= needed and account.balance > 0):
        checks.append(Check("credits", True, "Your credit balance covers a run.", 60))
    else:
        credit_params = {**params, "needed": needed, "balance": account.balance}
        checks.append(_failed("credits", ErrorCode.INSUFFICIENT_CREDITS, 60, credit_params))

    return Readiness(instance=instance, checks=checks, params=params, account=account, credentials=credentials)


def _credential_check(
    slot: dict[str, Any], credential: Credential | None, instance: ToolInstance, params: dict[str, Any], now: datetime
) -> Check:
    """Mapped, exists, belongs to the owner, ACTIVE, and not expired (or refreshable)."""
    provider = provider_get(slot["provider"])
    name = f"credential:{slot['name']}"
    slot_params = {
        **params,
        "provider": provider.display_name,
        "slot": slot["name"],
        "reconnect_path": reconnect_path(
            provider=provider.key, credential_id=str(credential.pk) if credential else None
        ),
    }
    if credential is None:
        return _failed(name, ErrorCode.CREDENTIAL_MISSING, 40, slot_params)
    status = credential.status
    if status == Credential.Status.REVOKED:
        return _failed(name, ErrorCode.CREDENTIAL_REVOKED, 40, slot_params)
    if status == Credential.Status.ERROR:
        detail = credential.last_error or "the provider refused it"
        return _failed(name, ErrorCode.CREDENTIAL_INVALID, 40, {**slot_params, "detail": detail})
    if status == Credential.Status.EXPIRED or (credential.is_expired(now) and not credential.refreshable):
        return _failed(name, ErrorCode.CREDENTIAL_EXPIRED, 40, slot_params)
    if credential.is_expired(now):
        message = f"Your {provider.display_name} access has expired and will be refreshed when the tool runs."
    else:
        message = f"Your {provider.display_name} account is connected for {slot['name']}."
    return Check(name, True, message, 40)


def readiness_many(instances: list[ToolInstance], *, mode: str | None = None) -> dict[str, Readiness]:
    """Readiness of many instances (a changelist page, a workflow's steps) keyed by instance
    id, with the ``mode`` check when given: the credentials of all of them in one query, then
    no query per instance (given ``tool`` and ``owner__credit_account`` selected)."""
    resolved = slot_credentials_many(instances)
    return {
        str(instance.pk): readiness_check(instance=instance, mode=mode, credentials=resolved.get(str(instance.pk), {}))
        for instance in instances
    }
