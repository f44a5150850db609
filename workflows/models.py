import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from executions.models import Execution


class Workflow(models.Model):
    """A named DAG of the owner's tool instances (DESIGN.md §10). Its definition lives in
    immutable versions; ``current_version`` is the one a new run uses. ``key`` is the name an
    instance's free-text ``workflow_id`` gives it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="workflows")
    key = models.SlugField(max_length=100, help_text="Unique per owner; an instance's workflow_id names it.")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    current_version = models.ForeignKey(
        "WorkflowVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # GET /api/v1/workflows/ (the owner's, newest first, cursor on created_at).
            models.Index(fields=["owner", "-created_at"], name="workflow_owner_created_idx"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["owner", "key"], name="workflow_owner_key_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.key})"


class WorkflowVersion(models.Model):
    """One saved definition of a workflow, validated when saved and never changed after: a
    run pins the version it started on."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    definition = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["workflow", "-number"]
        constraints = [
            # Also the index of GET /workflows/{id}/versions/ (newest first).
            models.UniqueConstraint(fields=["workflow", "number"], name="workflow_version_number_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.workflow_id} v{self.number}"


class WorkflowRun(models.Model):
    """One run of a workflow's version: its inputs, its steps (StepRun) and how it ended."""

    class Status(models.TextChoices):
        QUEUED = "QUEUED"
        RUNNING = "RUNNING"
        SUCCEEDED = "SUCCEEDED"
        FAILED = "FAILED"
        CANCELLING = "CANCELLING"
        CANCELLED = "CANCELLED"

    TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
    IN_FLIGHT = (Status.QUEUED, Status.RUNNING, Status.CANCELLING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="runs")
    version = models.ForeignKey(WorkflowVersion, on_delete=models.PROTECT, related_name="runs")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="workflow_runs")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    inputs = models.JSONField(default=dict, blank=True)
    output = models.JSONField(null=True, blank=True)
    # The error envelope of a failed run: the first step that failed, why, and what to do.
    error = models.JSONField(null=True, blank=True)
    # A run started by POST /workflow-runs/{id}/retry: the run whose succeeded steps it reuses.
    retry_of = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="retries")
    # The step a retry started from (it and what depends on it run again); blank for all that failed.
    retry_from_step = models.CharField(max_length=63, blank=True)
    idempotency_key = models.CharField(max_length=255, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True)
    # The sum of the credits its steps' executions were charged.
    credits_consumed = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # GET /api/v1/workflow-runs/ (the owner's, newest first) and its status filter.
            models.Index(fields=["owner", "-created_at"], name="wfrun_owner_created_idx"),
            # A workflow's runs (its page, ?workflow=).
            models.Index(fields=["workflow", "-created_at"], name="wfrun_workflow_created_idx"),
            # The reaper: runs not ended, a handful among many.
            models.Index(
                fields=["updated_at"],
                condition=Q(status__in=["QUEUED", "RUNNING", "CANCELLING"]),
                name="wfrun_in_flight_idx",
            ),
        ]
        constraints = [
            # Idempotency-Key: one run per owner and key.
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="wfrun_idempotency_key_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"Run {str(self.pk)[:8]} ({self.status.lower()})"


class StepRun(models.Model):
    """One step of a run, or one iteration of a ``for_each`` step: the execution it ran as
    (the latest attempt's), its resolved inputs (secrets redacted), output and error.

    PENDING rows wait for their turn (a fan-out's concurrency, a retry's); QUEUED ones have
    their execution accepted (``execution`` points to it); RUNNING once a worker claimed its
    job. REUSED: a retry took the output of the run it retries."""

    class Status(models.TextChoices):
        PENDING = "PENDING"
        QUEUED = "QUEUED"
        RUNNING = "RUNNING"
        SUCCEEDED = "SUCCEEDED"
        FAILED = "FAILED"
        SKIPPED = "SKIPPED"
        UPSTREAM_FAILED = "UPSTREAM_FAILED"
        CANCELLED = "CANCELLED"
        REUSED = "REUSED"

    TERMINAL = frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.SKIPPED, Status.UPSTREAM_FAILED, Status.CANCELLED, Status.REUSED}
    )
    IN_FLIGHT = (Status.QUEUED, Status.RUNNING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(WorkflowRun, on_delete=models.CASCADE, related_name="steps")
    step_id = models.CharField(max_length=63)
    iteration = models.PositiveIntegerField(default=0)
    # A for_each step: how many items it fanned out to (every iteration's row says it; a fan-out
    # over nothing is one row with 0) and this iteration's item. Null for a plain step.
    items_total = models.PositiveIntegerField(null=True, blank=True)
    item = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=15, choices=Status.choices, default=Status.PENDING)
    # The latest attempt's execution (a REUSED step: the one whose output it took).
    execution = models.ForeignKey(
        Execution, on_delete=models.SET_NULL, null=True, blank=True, related_name="workflow_steps"
    )
    attempt = models.PositiveSmallIntegerField(default=0)
    # When a retry is due (the step's backoff); null to run at once.
    run_after = models.DateTimeField(null=True, blank=True)
    inputs = models.JSONField(null=True, blank=True)
    output = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "iteration"]  # of a run: as created, a fan-out in item order
        constraints = [
            # Advancing twice creates nothing twice. Also the index of a run's steps.
            models.UniqueConstraint(fields=["run", "step_id", "iteration"], name="steprun_run_step_iteration_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.step_id}[{self.iteration}] {self.status}"
