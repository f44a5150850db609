"""The benchmarks' own tables (bench settings only; never in the product's database).

- ``WarmFloorJob``: the row the *warm floor* job claims and records (bench/floor_warm.py);
- ``FloorAccount``, ``FloorInstance``, ``FloorExecution``, ``FloorLedgerEntry``: the shape of the
  product's credit account, instance statistics, execution and ledger entry (same columns,
  indexes and constraints), written by the *guarded DRF floor* of benchmark 1
  (bench/baseline/views.py) with the statements ``execution_record_start`` and
  ``execution_finish`` issue, so the floor pays for the same writes as the product.
"""

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class WarmFloorJob(models.Model):  # noqa: DJ008  (bench tables, never displayed)
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    status = models.CharField(max_length=10, default="QUEUED")
    started_at = models.DateTimeField(null=True)
    finished_at = models.DateTimeField(null=True)


class FloorAccount(models.Model):  # noqa: DJ008  (bench tables, never displayed)
    # Keyed by its owner, so the floor writes it (and its ledger) by the authenticated user's id.
    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, primary_key=True, related_name="+")
    balance = models.DecimalField(max_digits=14, decimal_places=4, default=Decimal("0"))
    is_unlimited = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)


class FloorInstance(models.Model):  # noqa: DJ008  (bench tables, never displayed)
    """The statistics columns of ``instances.ToolInstance`` (what ``execution_finish`` updates)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    execution_count = models.PositiveBigIntegerField(default=0)
    success_count = models.PositiveBigIntegerField(default=0)
    failure_count = models.PositiveBigIntegerField(default=0)
    credits_consumed = models.DecimalField(max_digits=14, decimal_places=4, default=Decimal("0"))
    total_duration_ms = models.PositiveBigIntegerField(default=0)
    last_executed_at = models.DateTimeField(null=True, blank=True)


class FloorExecution(models.Model):  # noqa: DJ008  (bench tables, never displayed)
    """``executions.Execution``'s columns, indexes and constraint."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    instance = models.ForeignKey(FloorInstance, on_delete=models.SET_NULL, null=True, related_name="+")
    tool = models.ForeignKey("tools.ToolDefinition", on_delete=models.PROTECT, related_name="+")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    mode = models.CharField(max_length=5)
    status = models.CharField(max_length=10, default="PENDING")
    input_data = models.JSONField(default=dict, blank=True)
    output_data = models.JSONField(null=True, blank=True)
    error_code = models.CharField(max_length=40, blank=True)
    error_message = models.TextField(blank=True)
    error_metadata = models.JSONField(default=dict, blank=True)
    credits_consumed = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    credits_held = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=255, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True)
    cache_hit = models.BooleanField(default=False)
    ledger_entry = models.OneToOneField(
        "FloorLedgerEntry", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="bench_floor_owner_created_idx"),
            models.Index(fields=["instance", "-created_at"], name="bench_floor_inst_created_idx"),
            models.Index(fields=["owner", "status", "-created_at"], name="bench_floor_owner_status_idx"),
            models.Index(fields=["-created_at"], name="bench_floor_created_idx"),
            models.Index(
                fields=["-created_at"],
                condition=Q(status__in=["PENDING", "RUNNING"]),
                name="bench_floor_unfinished_idx",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="bench_floor_idempotency_unique",
            ),
        ]


class FloorLedgerEntry(models.Model):  # noqa: DJ008  (bench tables, never displayed)
    account = models.ForeignKey(FloorAccount, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=12)
    amount = models.DecimalField(max_digits=14, decimal_places=4)
    reason = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["account", "-created_at"], name="bench_floor_ledger_idx")]
