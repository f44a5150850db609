"""Operator console: credit accounts with their newest ledger entries and the adjust-balance
action (through credits_adjust), and the ledger itself, read-only."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from core.admin_site import ReadOnlyAdmin, ReadOnlyMixin

from .models import CreditAccount, CreditLedgerEntry
from .services import credits_adjust

LEDGER_INLINE_LIMIT = 50


@admin.register(CreditLedgerEntry)
class CreditLedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "account", "kind", "amount", "execution", "reason", "created_by"]
    list_filter = ["created_at", "kind"]
    search_fields = ["account__owner__username", "reason"]
    list_select_related = ["account__owner", "execution", "created_by"]


class LedgerInline(ReadOnlyMixin, admin.TabularInline):
    """The account's newest ledger entries (the full ledger is under Credit ledger entries)."""

    model = CreditLedgerEntry
    fields = ["created_at", "kind", "amount", "reason", "execution", "created_by"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-created_at", "-id"]
    verbose_name_plural = f"ledger (newest {LEDGER_INLINE_LIMIT})"

    def get_queryset(self, request: HttpRequest) -> QuerySet[CreditLedgerEntry]:
        qs = super().get_queryset(request).select_related("execution", "created_by")
        match = request.resolver_match
        account_id = match.kwargs.get("object_id") if match else None
        if account_id and str(account_id).isdigit():
            newest = CreditLedgerEntry.objects.filter(account_id=account_id).order_by("-created_at", "-id")
            qs = qs.filter(pk__in=newest.values("pk")[:LEDGER_INLINE_LIMIT])
        return qs

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("credits.view_creditaccount")


class AdjustBalanceForm(forms.Form):
    amount = forms.DecimalField(max_digits=14, decimal_places=4, help_text="Credits to add; negative to take away.")
    reason = forms.CharField(max_length=300, help_text="Written to the ledger, e.g. “refund for outage 2026-11-20”.")

    def clean_amount(self) -> Decimal:
        amount = self.cleaned_data["amount"]
        if not amount:
            raise forms.ValidationError("Must not be zero.")
        return amount


@admin.register(CreditAccount)
class CreditAccountAdmin(admin.ModelAdmin):
    list_display = ["owner", "balance", "is_unlimited", "updated_at"]
    list_filter = ["is_unlimited"]
    search_fields = ["owner__username"]
    list_select_related = ["owner"]
    fields = ["owner", "balance", "is_unlimited", "created_at", "updated_at"]
    readonly_fields = ["owner", "balance", "created_at", "updated_at"]
    inlines = [LedgerInline]
    actions = ["adjust_balance"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # an account opens with its owner's first instance

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the ledger is the account's history; balances move only by adjustments

    @admin.action(description="Adjust balance…", permissions=["change"])
    def adjust_balance(self, request: HttpRequest, queryset: QuerySet[CreditAccount]) -> HttpResponse | None:
        form = AdjustBalanceForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            for account in queryset:
                credits_adjust(
                    account=account,
                    amount=form.cleaned_data["amount"],
                    reason=form.cleaned_data["reason"],
                    actor=request.user,
                )
                self.message_user(
                    request, f"{account.owner}: balance adjusted by {form.cleaned_data['amount']}.", messages.SUCCESS
                )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Adjust balance",
            "opts": self.model._meta,
            "accounts": queryset.select_related("owner"),
            "form": form,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/credits/creditaccount/adjust_balance.html", context)
