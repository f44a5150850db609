import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from instances.models import EncryptedSecretField, ToolInstance
from tools.models import ToolDefinition


class Mode(models.TextChoices):
    SYNC = "SYNC"
    ASYNC = "ASYNC"


class Execution(models.Model):
    """One attempt to run a tool: an audit record, written by the execution service only."""

    class Status(models.TextChoices):
        PENDING = "PENDING"
        RUNNING = "RUNNING"
        COMPLETED = "COMPLETED"
        FAILED = "FAILED"
        CANCELLED = "CANCELLED"
        TIMED_OUT = "TIMED_OUT"

    TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT})

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Executions outlive the instance they ran on; owner and tool keep them attributable.
    instance = models.ForeignKey(ToolInstance, on_delete=models.SET_NULL, null=True, related_name="executions")
    tool = models.ForeignKey(ToolDefinition, on_delete=models.PROTECT, related_name="executions")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="executions")
    mode = models.CharField(max_length=5, choices=Mode.choices)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    input_data = models.JSONField(default=dict, blank=True)
    output_data = models.JSONField(null=True, blank=True)
    error_code = models.CharField(max_length=40, blank=True)
    error_message = models.TextField(blank=True)
    error_metadata = models.JSONField(default=dict, blank=True)
    credits_consumed = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    # Taken off the balance when the run was recorded; settled against the charge when it ends.
    credits_held = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=255, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True)
    cache_hit = models.BooleanField(default=False)
    # Who asked for the run when its owner did not call it directly: "workflow" for a workflow's
    # step (the step run points here). Receivers of executions.signals filter on it.
    origin = models.CharField(max_length=20, blank=True)
    # A run answered from the cache: the run whose result it gave.
    source_execution = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="cache_answers"
    )
    # What the result cache did for this run (the "cache" object of its answer), or null.
    cache = models.JSONField(null=True, blank=True)
    # The ledger line of what the run was charged, written with its outcome (none for a free
    # run). Linked from here so that credits knows nothing of executions; ``entry.execution``
    # reads it back. SET_NULL: either record may go on its own, as before the link was turned
    # around (PROTECT would refuse to delete an owner, whose account takes its ledger with it).
    ledger_entry = models.OneToOneField(
        "credits.CreditLedgerEntry", on_delete=models.SET_NULL, null=True, blank=True, related_name="execution"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # GET /api/v1/executions/ (owner's history, newest first, cursor on created_at).
            models.Index(fields=["owner", "-created_at"], name="execution_owner_created_idx"),
            # GET /api/v1/executions/?instance=... and an instance's recent runs.
            models.Index(fields=["instance", "-created_at"], name="execution_instance_created_idx"),
            # GET /api/v1/executions/?status=FAILED (latest failures).
            models.Index(fields=["owner", "status", "-created_at"], name="execution_owner_status_idx"),
            # Everyone's last 24 hours: the staff status overview and the admin's date hierarchy.
            models.Index(fields=["-created_at"], name="execution_created_idx"),
            # The admin's status filter on runs not yet ended: a handful of rows among millions,
            # which no index above finds without reading all of it.
            models.Index(
                fields=["-created_at"],
                condition=Q(status__in=["PENDING", "RUNNING"]),
                name="execution_unfinished_idx",
            ),
        ]
        constraints = [
            # Idempotency-Key: one execution per owner and key.
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="execution_idempotency_key_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tool_id} {self.mode} {self.status} {self.pk}"


class Job(models.Model):
    """The queued side of an ASYNC execution: what RQ runs and how far it got."""

    class Status(models.TextChoices):
        QUEUED = "QUEUED"
        RUNNING = "RUNNING"
        COMPLETED = "COMPLETED"
        FAILED = "FAILED"
        CANCELLED = "CANCELLED"
        TIMED_OUT = "TIMED_OUT"

    TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT})

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    execution = models.OneToOneField(Execution, on_delete=models.CASCADE, related_name="job")
    # Denormalised from the execution for the per-instance list and per-owner fairness.
    instance = models.ForeignKey(ToolInstance, on_delete=models.SET_NULL, null=True, related_name="jobs")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    queue = models.CharField(max_length=100, default="default")
    rq_job_id = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    progress = models.PositiveSmallIntegerField(default=0)
    current_step = models.CharField(max_length=300, blank=True)
    step_index = models.PositiveIntegerField(null=True, blank=True)
    steps_total = models.PositiveIntegerField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=1)
    # The run's real inputs (the Execution keeps a redacted copy), encrypted and bound to this
    # row, for the worker to read; blanked once the job ends.
    sealed_inputs = EncryptedSecretField(blank=True, editable=False)
    # One entry per finished attempt: {"attempt", "worker", "started_at", "finished_at", "error_code"};
    # and one each time the queue lost the job: {"event": "queue_lost", "message", "queued_again_at"}.
    attempt_log = models.JSONField(default=list, blank=True)
    worker_name = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # When the job was last handed to RQ: accepted, retried, sent to wait for a fair-share turn,
    # or queued again after Redis lost it. A QUEUED job RQ does not know is queued again only
    # once this is TOOLEXEC_QUEUE_RECOVERY_SECONDS old, so one between its commit and its
    # enqueue is not doubled (jobs_requeue_lost).
    enqueued_at = models.DateTimeField(null=True, blank=True)
    # When a job queued for later (a retry's backoff, a fair-share wait) is due, as RQ's schedule
    # says: kept here so that a schedule Redis lost is made again with its original time. Null
    # for a job queued to run at once; in the past once it is due.
    run_after = models.DateTimeField(null=True, blank=True)
    # What the result cache does with the run (DESIGN.md §9), for the worker that runs it: the
    # parts of its key (hashes only, never a secret), the TTL and the report of its accept
    # (CachePlan.as_dict). Null for a job accepted before the cache, or answered from it.
    cache_plan = models.JSONField(null=True, blank=True)
    # An identical job that was queued or running when this one was accepted (it held the lead on
    # their cache key): this one waits for it instead of going to RQ, and ends from its cache entry
    # (COLLAPSED), or goes to RQ to run itself when the leader kept none. The FK's own index
    # finds a leader's waiting followers when it ends (job_followers_settle).
    follows = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="followers")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # GET /api/v1/instances/{id}/jobs/ (newest first).
            models.Index(fields=["instance", "-created_at"], name="job_instance_created_idx"),
            # Fairness: how many RUNNING jobs an owner has.
            models.Index(fields=["owner", "status"], name="job_owner_status_idx"),
            # The reaper: RUNNING jobs (it then checks heartbeat_at, which is left out of every
            # index so that progress and heartbeat writes stay heap-only updates).
            models.Index(fields=["created_at"], condition=Q(status="RUNNING"), name="job_running_idx"),
            # Jobs in flight that have not started yet (status overview, oldest first), and the
            # reaper's look for queued jobs Redis lost (jobs_requeue_lost: oldest first, then
            # enqueued_at checked on the rows it reads).
            models.Index(fields=["created_at"], condition=Q(status="QUEUED"), name="job_queued_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(progress__lte=100), name="job_progress_at_most_100"),
        ]

    def __str__(self) -> str:
        return f"job {self.pk} {self.status} {self.progress}%"


class CacheEntry(models.Model):
    """A COMPLETED run's output, kept to answer the same run again until ``expires_at``
    (DESIGN.md §9). ``key`` is a hash over the tool's version and source, the effective inputs,
    the owner, the instance and the identity of each credential used (its id and its secret's fingerprint,
    never the secret). The part hashes say why a later run missed: the same request
    (``request_hash``: tool and body) with another tool version, other credentials or another
    instance config."""

    key = models.CharField(max_length=64, unique=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    instance = models.ForeignKey(ToolInstance, on_delete=models.CASCADE, related_name="cache_entries")
    tool = models.ForeignKey(ToolDefinition, on_delete=models.CASCADE, related_name="cache_entries")
    tool_version = models.CharField(max_length=100, help_text="The tool's version and a hash of its source.")
    request_hash = models.CharField(max_length=64)
    version_hash = models.CharField(max_length=64)
    config_hash = models.CharField(max_length=64)
    credentials_hash = models.CharField(max_length=64)
    source_execution = models.ForeignKey(
        Execution, on_delete=models.SET_NULL, null=True, blank=True, related_name="cache_entries"
    )
    output = models.JSONField()
    size_bytes = models.PositiveIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    hits = models.PositiveBigIntegerField(default=0)
    last_hit_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "cache entries"
        indexes = [
            # Why a run missed: the newest entry of the same request on the instance.
            models.Index(fields=["instance", "request_hash", "-created_at"], name="cache_request_idx"),
            # The purge of expired entries, oldest first.
            models.Index(fields=["expires_at"], name="cache_expires_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.tool_id} cache entry {self.key[:12]}"
