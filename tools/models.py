from decimal import Decimal

from django.db import models


class ToolDefinition(models.Model):
    """A tool in the catalog, upserted from its registered implementation by catalog sync.

    Operators may switch a tool off (``is_active``); the sync records whether its
    implementation can be loaded on this server (``is_available``), with the reason when not.
    """

    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    version = models.CharField(max_length=50, default="1.0.0")
    category = models.CharField(max_length=100, blank=True)
    input_schema = models.JSONField(default=dict)
    output_schema = models.JSONField(default=dict, blank=True)
    credential_slots = models.JSONField(default=list, blank=True)
    modes = models.JSONField(default=list)
    timeout_seconds = models.PositiveIntegerField(default=30)
    base_credits = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    credits_per_unit = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    unit = models.CharField(max_length=50, blank=True)
    cacheable = models.BooleanField(default=False)
    cache_by_default = models.BooleanField(default=True, help_text="Whether a new instance caches.")
    cache_ttl_default = models.PositiveIntegerField(default=300)
    cache_ttl_max = models.PositiveIntegerField(default=24 * 3600)
    cache_exclude_inputs = models.JSONField(default=list, blank=True)
    idempotent = models.BooleanField(default=True)
    implementation = models.CharField(max_length=300, help_text="Dotted path of the Tool class.")
    is_active = models.BooleanField(default=True, help_text="Operators switch a tool off here.")
    is_available = models.BooleanField(default=True)
    unavailable_reason = models.TextField(blank=True)
    synced_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def supports(self, mode: str) -> bool:
        return mode in self.modes

    @property
    def required_slots(self) -> list[dict]:
        return [slot for slot in self.credential_slots if slot.get("required", True)]
