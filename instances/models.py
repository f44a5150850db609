import uuid
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import models

from tools.models import ToolDefinition

FERNET_PREFIX = "gAAAAA"  # every Fernet token starts with version byte 0x80 and a timestamp


class EncryptedSecretField(models.TextField):
    """Holds a Fernet token made by ``instances.crypto.seal``, never a plaintext secret.

    Saving anything that is not a token is refused, so a secret can't land in the column by
    mistake; reading gives the token back, which only ``crypto.unseal`` opens.
    """

    description = "Encrypted secret (Fernet token)"

    def pre_save(self, model_instance: models.Model, add: bool) -> str:
        value = super().pre_save(model_instance, add)
        if value and not str(value).startswith(FERNET_PREFIX):
            raise ValueError(f"{self.name} must hold ciphertext; use Credential.set_secret().")
        return value


class Credential(models.Model):
    class Kind(models.TextChoices):
        OAUTH2 = "oauth2", "OAuth 2"
        API_KEY = "api_key", "API key"
        BEARER = "bearer", "Bearer token"
        BASIC = "basic", "Username and password"

    class Status(models.TextChoices):
        ACTIVE = "ACTIVE"
        EXPIRED = "EXPIRED"
        REVOKED = "REVOKED"
        ERROR = "ERROR"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="credentials")
    provider = models.CharField(max_length=50)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    label = models.CharField(max_length=200, blank=True)
    secret = EncryptedSecretField(editable=False)
    # Non-secret facts about the secret, kept beside it so no read needs to decrypt.
    fingerprint = models.CharField(max_length=16, editable=False)
    refreshable = models.BooleanField(default=False, editable=False, help_text="An OAuth refresh token is stored.")
    metadata = models.JSONField(default=dict, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            # Resolving a provider key: the owner's newest ACTIVE credential of a provider.
            models.Index(fields=["owner", "provider", "status", "-updated_at"], name="credential_resolve_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.provider}/{self.kind}: {self.label or self.pk}"

    def set_secret(self, secret: dict) -> None:
        from .crypto import fingerprint, seal

        self.secret = seal(secret, row_id=str(self.pk), owner_id=self.owner_id)
        self.fingerprint = fingerprint(secret)
        self.refreshable = self.kind == self.Kind.OAUTH2 and bool(secret.get("refresh_token"))

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def reveal_secret(self) -> dict:
        from .crypto import unseal

        return unseal(self.secret, row_id=str(self.pk), owner_id=self.owner_id)


class CredentialAuditEntry(models.Model):
    """Who changed a credential, when, and which fields: never the values."""

    class Action(models.TextChoices):
        CREATED = "created"
        UPDATED = "updated"
        REVOKED = "revoked"
        REFRESHED = "refreshed"
        TESTED = "tested"
        REENCRYPTED = "reencrypted"
        DELETED = "deleted"
        STATUS_CHANGED = "status_changed"

    # The entry outlives the credential: the id stays beside the (then empty) link.
    credential = models.ForeignKey(
        Credential, on_delete=models.SET_NULL, null=True, blank=True, related_name="audit_entries"
    )
    credential_ref = models.UUIDField(help_text="The credential's id, kept after it is deleted.")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    action = models.CharField(max_length=20, choices=Action.choices)
    fields = models.JSONField(default=list, blank=True, help_text="Names of the changed fields, never their values.")
    note = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "credential audit entries"
        indexes = [
            # A credential's audit log, newest first (the credential's admin page).
            models.Index(fields=["credential_ref", "-created_at"], name="credaudit_cred_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.credential_ref}"


class ToolInstance(models.Model):
    class Status(models.TextChoices):
        DRAFT = "DRAFT"
        ACTIVE = "ACTIVE"
        DISABLED = "DISABLED"
        ERROR = "ERROR"

    # The only moves a status may make (DESIGN.md §3: DRAFT → ACTIVE ⇄ DISABLED, ERROR).
    TRANSITIONS: dict[str, frozenset[str]] = {
        Status.DRAFT: frozenset({Status.ACTIVE, Status.DISABLED, Status.ERROR}),
        Status.ACTIVE: frozenset({Status.DISABLED, Status.ERROR}),
        Status.DISABLED: frozenset({Status.ACTIVE}),
        Status.ERROR: frozenset({Status.ACTIVE, Status.DISABLED}),
    }

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tool_instances")
    tool = models.ForeignKey(ToolDefinition, on_delete=models.PROTECT, related_name="instances")
    workflow_id = models.CharField(max_length=200, blank=True)
    name = models.CharField(max_length=200)
    config = models.JSONField(default=dict, blank=True, help_text="Default inputs, overridden per run.")
    credential_mappings = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DRAFT)
    status_reason = models.TextField(blank=True)
    # The result cache (DESIGN.md §9): null means the tool's default (on for a cacheable tool
    # unless it says otherwise, for its default TTL).
    cache_enabled = models.BooleanField(null=True, blank=True)
    cache_ttl_seconds = models.PositiveIntegerField(null=True, blank=True)
    # Statistics, moved only with F() expressions by the execution service.
    execution_count = models.PositiveBigIntegerField(default=0)
    success_count = models.PositiveBigIntegerField(default=0)
    failure_count = models.PositiveBigIntegerField(default=0)
    credits_consumed = models.DecimalField(max_digits=14, decimal_places=4, default=Decimal("0"))
    total_duration_ms = models.PositiveBigIntegerField(default=0)
    last_executed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # GET /api/v1/instances/ (newest first, cursor-paginated).
            models.Index(fields=["owner", "-created_at"], name="instance_owner_created_idx"),
            # GET /api/v1/instances/?workflow_id=...
            models.Index(fields=["owner", "workflow_id"], name="instance_owner_workflow_idx"),
        ]

    def __str__(self) -> str:
        return self.name

    def can_move_to(self, status: str) -> bool:
        return status in self.TRANSITIONS[self.status]

    @property
    def caches(self) -> bool:
        """Whether runs of this instance use the result cache (its tool must be cacheable)."""
        enabled = self.tool.cache_by_default if self.cache_enabled is None else self.cache_enabled
        return self.tool.cacheable and enabled

    @property
    def cache_ttl(self) -> int:
        """Seconds a cached result of this instance lives."""
        ttl = self.tool.cache_ttl_default if self.cache_ttl_seconds is None else self.cache_ttl_seconds
        return min(ttl, self.tool.cache_ttl_max)

    @property
    def failure_rate(self) -> float:
        return self.failure_count / self.execution_count if self.execution_count else 0.0


def upload_path(upload: "UploadedFile", filename: str) -> str:
    """Where an upload's bytes are stored: named by its id, never by the name the user gave it."""
    return f"uploads/{upload.pk.hex[:2]}/{upload.pk}"


class UploadedFile(models.Model):
    """A file an owner uploaded for tools to read (POST /api/v1/files/); tools take its id."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="uploaded_files")
    name = models.CharField(max_length=255, help_text="The file name the uploader gave; only for display.")
    size_bytes = models.PositiveBigIntegerField()
    content_type = models.CharField(max_length=255, blank=True)
    sha256 = models.CharField(max_length=64)
    file = models.FileField(upload_to=upload_path, max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # GET /api/v1/files/ (the owner's files, newest first, cursor-paginated).
            models.Index(fields=["owner", "-created_at"], name="uploadedfile_owner_created_idx"),
        ]

    def __str__(self) -> str:
        return self.name
