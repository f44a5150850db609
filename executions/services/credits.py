from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from instances.models import CreditAccount
from tools.errors import InputInvalid

from ..models import CreditLedgerEntry


def credits_adjust(*, account: CreditAccount, amount: Decimal, reason: str, actor: Any = None) -> CreditLedgerEntry:
    """An operator's manual change of a balance (negative takes credits away), with its reason,
    in the ledger: one transaction, the balance moved with F()."""
    reason = (reason or "").strip()
    errors: dict[str, list[str]] = {}
    if not amount:
        errors["amount"] = ["Must not be zero."]
    if not reason:
        errors["reason"] = ["Say why the balance changes."]
    if errors:
        raise InputInvalid("The adjustment is not valid: " + "; ".join(errors), field_errors=errors)
    with transaction.atomic():
        CreditAccount.objects.filter(pk=account.pk).update(balance=F("balance") + amount, updated_at=timezone.now())
        entry = CreditLedgerEntry.objects.create(
            account=account,
            kind=CreditLedgerEntry.Kind.ADJUSTMENT,
            amount=amount,
            reason=reason[:300],
            created_by=actor if actor is not None and actor.is_authenticated else None,
        )
    return entry
