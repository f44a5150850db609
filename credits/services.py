"""Credits: an owner's account, the hold a run takes when it is recorded, the settlement when
it ends, and an operator's adjustments. Callers commit a hold and a settlement with what they
pay for; every balance moves with F()."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from tools.errors import InputInvalid

from .models import CreditAccount, CreditLedgerEntry


def credit_account_for(*, owner: AbstractBaseUser) -> CreditAccount:
    """The owner's credit account, opened with TOOLEXEC_DEFAULT_CREDITS the first time."""
    account, _ = CreditAccount.objects.get_or_create(
        owner=owner, defaults={"balance": settings.TOOLEXEC_DEFAULT_CREDITS}
    )
    return account


def credits_balance(*, account: CreditAccount) -> Decimal:
    return CreditAccount.objects.filter(pk=account.pk).values_list("balance", flat=True).get()


def credits_hold(*, account: CreditAccount, amount: Decimal) -> int:
    """Take ``amount`` off the balance if the balance covers it: a conditional update, so
    concurrent holds never spend the same credits twice. Returns the rows changed: 0 when the
    balance does not cover it (nothing is taken). The caller commits it with what it pays for."""
    covered = CreditAccount.objects.filter(pk=account.pk, balance__gte=amount)
    return covered.update(balance=F("balance") - amount, updated_at=timezone.now())


def credits_settle(*, account: CreditAccount, held: Decimal, charge: Decimal) -> None:
    """Turn a hold into the real charge: give back what was held beyond the charge, or take the
    rest (usage beyond the hold may take the balance below zero; the work was done). No write
    when there is nothing to move, and none on an unlimited account. The caller commits it with
    the outcome it settles."""
    difference = Decimal("0") if account.is_unlimited else charge - held
    if difference:
        CreditAccount.objects.filter(pk=account.pk).update(balance=F("balance") - difference, updated_at=timezone.now())


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
