from decimal import Decimal

from django.conf import settings
from django.db import models


class CreditAccount(models.Model):
    """An owner's credits, opened with TOOLEXEC_DEFAULT_CREDITS; moved only with F()."""

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="credit_account")
    balance = models.DecimalField(max_digits=14, decimal_places=4, default=Decimal("0"))
    is_unlimited = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.owner}: {'unlimited' if self.is_unlimited else self.balance}"

    def covers(self, amount: Decimal) -> bool:
        return self.is_unlimited or self.balance >= amount


class CreditLedgerEntry(models.Model):
    """One movement of an owner's credits; the account balance is their running sum.

    A run's charge is linked from the run (``Execution.ledger_entry``, read here as
    ``entry.execution``), so this app knows nothing of executions."""

    class Kind(models.TextChoices):
        EXECUTION = "EXECUTION", "Execution charge"
        ADJUSTMENT = "ADJUSTMENT", "Manual adjustment"
        GRANT = "GRANT", "Opening grant"

    account = models.ForeignKey(CreditAccount, on_delete=models.CASCADE, related_name="ledger")
    kind = models.CharField(max_length=12, choices=Kind.choices)
    amount = models.DecimalField(max_digits=14, decimal_places=4, help_text="Negative for a charge.")
    reason = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "credit ledger entries"
        indexes = [
            # An account's ledger, newest first (admin inline, statements).
            models.Index(fields=["account", "-created_at"], name="ledger_account_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount}"
