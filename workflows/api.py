"""The workflows API (DESIGN.md §10; issue 22): workflows and their versions, their readiness,
starting a run, and the runs themselves (detail, cancel, retry, a live event stream).

Every view is input serializer → service → output serializer; querysets are the owner's, so
another owner's id answers 404 like an absent one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db.models import QuerySet
from django.http import QueryDict, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import NewestFirstPagination, QueryFilter
from core.schema import ErrorEnvelopeSerializer, error_responses
from executions.api import EventStreamRenderer, idempotency_key_of
from executions.streams import RESUME_PARAMETERS
from instances.api import CheckSerializer

from .models import StepRun, Workflow, WorkflowRun, WorkflowVersion
from .selectors import run_detail, run_list, workflow_list
from .services.readiness import workflow_readiness
from .services.runs import run_cancel, run_retry, run_start
from .services.workflows import workflow_create, workflow_delete, workflow_update, workflow_version_create
from .streams import run_event_response

API = "/api/v1"


def _run_url(run_id: Any) -> str:
    return f"{API}/workflow-runs/{run_id}"


# --- Workflows ------------------------------------------------------------------------------

DEFINITION_HELP = (
    'The steps and how they connect: {"inputs": <JSON Schema>, "steps": [{"id", "instance", "inputs", '
    '"depends_on"?, "for_each"?, "concurrency"?, "when"?, "retry"?, "on_error"?}], "output"?}. References are '
    '{"$expr": "<JMESPath>"} and {"$template": "… {{ <JMESPath> }} …"} over input, steps.<id>.output|status|error, '
    "item and index."
)


class WorkflowSerializer(serializers.ModelSerializer):
    version = serializers.IntegerField(
        source="current_version.number", allow_null=True, help_text="The number of the version new runs use."
    )
    definition = serializers.JSONField(source="current_version.definition", allow_null=True, help_text="Its version's.")
    validate_url = serializers.SerializerMethodField(help_text="Whether every step is ready to run: GET it.")
    runs_url = serializers.SerializerMethodField(help_text="POST the workflow's inputs here to start a run.")

    class Meta:
        model = Workflow
        fields = [
            "id",
            "key",
            "name",
            "description",
            "version",
            "definition",
            "created_at",
            "updated_at",
            "validate_url",
            "runs_url",
        ]
        read_only_fields = fields

    def get_validate_url(self, workflow: Workflow) -> str:
        return f"{API}/workflows/{workflow.pk}/validate"

    def get_runs_url(self, workflow: Workflow) -> str:
        return f"{API}/workflows/{workflow.pk}/runs"


class WorkflowCreateSerializer(serializers.Serializer):
    key = serializers.SlugField(
        max_length=100, help_text="Unique among your workflows; an instance's workflow_id names it."
    )
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    definition = serializers.JSONField(help_text=DEFINITION_HELP)


class WorkflowUpdateSerializer(serializers.Serializer):
    """Its key, name or description. The definition changes by a new version."""

    key = serializers.SlugField(max_length=100, required=False)
    name = serializers.CharField(max_length=200, required=False)
    description = serializers.CharField(required=False, allow_blank=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.initial_data, Mapping) and "definition" in self.initial_data:
            raise serializers.ValidationError(
                {"definition": ["A definition changes by a new version: POST it to this workflow's versions."]}
            )
        return attrs


class WorkflowVersionSerializer(serializers.ModelSerializer):
    created_by = serializers.IntegerField(
        source="created_by_id", allow_null=True, help_text="The id of the user who saved it."
    )

    class Meta:
        model = WorkflowVersion
        fields = ["id", "number", "definition", "created_at", "created_by"]
        read_only_fields = fields


class WorkflowVersionCreateSerializer(serializers.Serializer):
    definition = serializers.JSONField(help_text=DEFINITION_HELP)


class ReadinessCreditsSerializer(serializers.Serializer):
    estimate = serializers.DecimalField(
        max_digits=14, decimal_places=4, help_text="What a run is expected to cost at least."
    )
    balance = serializers.DecimalField(
        max_digits=14, decimal_places=4, allow_null=True, help_text="Your balance; null when unlimited."
    )
    covered = serializers.BooleanField()


class StepReadinessSerializer(serializers.Serializer):
    step_id = serializers.CharField()
    instance_id = serializers.CharField()
    is_ready = serializers.BooleanField()
    checks = CheckSerializer(many=True)


class WorkflowReadinessSerializer(serializers.Serializer):
    """As an instance's validate-execution, for every step, with the credits of a whole run."""

    is_ready = serializers.BooleanField()
    error_code = serializers.CharField(allow_null=True, help_text="The most important problem's.")
    error_message = serializers.CharField(allow_null=True, help_text="Names the first step that is not ready.")
    action_items = serializers.ListField(child=serializers.DictField())
    credits = ReadinessCreditsSerializer()
    checks = StepReadinessSerializer(many=True, help_text="Each step's checks, in run order.")


RunAccepted = inline_serializer(
    "WorkflowRunAccepted",
    {
        "run_id": serializers.UUIDField(),
        "status": serializers.ChoiceField(choices=WorkflowRun.Status.choices),
        "run_url": serializers.CharField(),
        "events_url": serializers.CharField(),
    },
)

IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    description="The same key and body within 24 hours return the first run instead of a new one.",
)


def _accepted(run: WorkflowRun, *, replayed: bool = False) -> Response:
    url = _run_url(run.pk)
    body = {"run_id": str(run.pk), "status": run.status, "run_url": url, "events_url": f"{url}/events"}
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return Response(body, status=status.HTTP_202_ACCEPTED, headers=headers)


@extend_schema_view(
    create=extend_schema(request=WorkflowCreateSerializer, responses={201: WorkflowSerializer}),
    partial_update=extend_schema(request=WorkflowUpdateSerializer, responses=WorkflowSerializer),
    destroy=extend_schema(responses={204: None, **error_responses(409)}),  # 409: a run in flight
)
class WorkflowViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your workflows: DAGs of your instances, versioned; their readiness; starting a run."""

    serializer_class = WorkflowSerializer
    pagination_class = NewestFirstPagination

    def get_queryset(self) -> QuerySet[Workflow]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return Workflow.objects.none()
        return workflow_list(owner=self.request.user)

    def get_serializer_class(self) -> type[serializers.Serializer]:
        if self.action == "create":
            return WorkflowCreateSerializer
        if self.action == "partial_update":
            return WorkflowUpdateSerializer
        if self.action == "runs":
            return serializers.Serializer  # the body is the workflow's inputs
        return WorkflowSerializer

    def create(self, request: Request) -> Response:
        data = WorkflowCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        workflow = workflow_create(owner=request.user, **data.validated_data)
        return Response(WorkflowSerializer(workflow).data, status=status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        workflow = self.get_object()
        data = WorkflowUpdateSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        workflow = workflow_update(workflow=workflow, **data.validated_data)
        return Response(WorkflowSerializer(workflow).data)

    def perform_destroy(self, workflow: Workflow) -> None:
        workflow_delete(workflow=workflow)

    @extend_schema(responses=WorkflowReadinessSerializer)
    @action(detail=True, methods=["get"])
    def validate(self, request: Request, pk: str | None = None) -> Response:
        """Whether every step is ready to run (credentials, tool, mode) and your credits cover a run."""
        readiness = workflow_readiness(workflow=self.get_object())
        return Response(WorkflowReadinessSerializer(readiness.as_dict()).data)

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            202: RunAccepted,
            409: OpenApiResponse(
                ErrorEnvelopeSerializer,
                description="Nothing ran: a step is not ready, or the credits do not cover a run (error_code is the "
                "first problem's readiness code, e.g. CREDENTIAL_EXPIRED or INSUFFICIENT_CREDITS; metadata.step_id "
                "names the step and metadata.checks lists every step that is not ready); or IDEMPOTENCY_CONFLICT: "
                "the Idempotency-Key was used with another body.",
            ),
        },
    )
    @action(detail=True, methods=["post"])
    def runs(self, request: Request, pk: str | None = None) -> Response:
        """Start a run of the current version. The body is the workflow's inputs (its definition's
        inputs schema); nothing runs unless every step is ready."""
        workflow = self.get_object()
        key = idempotency_key_of(request)
        inputs = request.data.dict() if isinstance(request.data, QueryDict) else request.data
        started = run_start(workflow=workflow, inputs=inputs, idempotency_key=key)
        return _accepted(started.run, replayed=started.replayed)


@extend_schema_view(
    list=extend_schema(
        parameters=[OpenApiParameter("workflow_id", OpenApiTypes.UUID, "path")],
        description="The workflow's versions, newest first.",
    ),
    create=extend_schema(
        parameters=[OpenApiParameter("workflow_id", OpenApiTypes.UUID, "path")],
        request=WorkflowVersionCreateSerializer,
        responses={201: WorkflowVersionSerializer},
        description="Save a new definition: new runs use it; runs in flight keep theirs.",
    ),
)
class WorkflowVersionViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """A workflow's versions: immutable definitions, one of which each run pins."""

    serializer_class = WorkflowVersionSerializer
    pagination_class = NewestFirstPagination

    def workflow(self) -> Workflow:
        workflow = workflow_list(owner=self.request.user).filter(pk=self.kwargs["workflow_id"]).first()
        if workflow is None:
            raise NotFound()
        return workflow

    def get_queryset(self) -> QuerySet[WorkflowVersion]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return WorkflowVersion.objects.none()
        return WorkflowVersion.objects.filter(workflow__owner=self.request.user, workflow_id=self.kwargs["workflow_id"])

    def get_serializer_class(self) -> type[serializers.Serializer]:
        return WorkflowVersionCreateSerializer if self.action == "create" else WorkflowVersionSerializer

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        self.workflow()  # another owner's, or none: 404, not an empty list
        return super().list(request, *args, **kwargs)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        workflow = self.workflow()
        data = WorkflowVersionCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        version = workflow_version_create(
            workflow=workflow, definition=data.validated_data["definition"], actor=request.user
        )
        return Response(WorkflowVersionSerializer(version).data, status=status.HTTP_201_CREATED)


# --- Runs -----------------------------------------------------------------------------------


class StepRunSerializer(serializers.Serializer):
    """One step of a run, or one iteration of a for_each step."""

    step_id = serializers.CharField()
    iteration = serializers.IntegerField(help_text="A for_each step's item index; 0 otherwise.")
    items_total = serializers.IntegerField(allow_null=True, help_text="A for_each step's number of items.")
    status = serializers.ChoiceField(choices=StepRun.Status.choices)
    attempt = serializers.IntegerField(help_text="How many times it was handed to a worker.")
    execution_id = serializers.UUIDField(allow_null=True)
    job_id = serializers.UUIDField(allow_null=True)
    progress = serializers.IntegerField(allow_null=True, help_text="0-100, while it runs.")
    current_step = serializers.CharField(allow_blank=True, help_text="What the tool says it does now.")
    run_after = serializers.DateTimeField(allow_null=True, help_text="When its retry is due (its backoff).")
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    output = serializers.JSONField(allow_null=True, help_text="Its tool's output, as recorded.")
    error = serializers.JSONField(allow_null=True, help_text="The error envelope of a step that failed.")


class WorkflowRunDetailSerializer(serializers.Serializer):
    """A run and every step row (the selector's run_detail, rendered)."""

    run_id = serializers.UUIDField()
    workflow_id = serializers.UUIDField()
    version = serializers.IntegerField(help_text="The number of the version it pinned.")
    status = serializers.ChoiceField(choices=WorkflowRun.Status.choices)
    inputs = serializers.JSONField()
    output = serializers.JSONField(allow_null=True, help_text="The definition's output, once it succeeded.")
    error = serializers.JSONField(
        allow_null=True, help_text="A failed run's error envelope: the first step that failed, why, what to do."
    )
    credits_consumed = serializers.DecimalField(max_digits=12, decimal_places=4)
    retry_of = serializers.UUIDField(allow_null=True, help_text="The run this one retries.")
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    steps = StepRunSerializer(many=True)


class WorkflowRunSerializer(serializers.ModelSerializer):
    """A run in a list: as its detail, without its steps."""

    run_id = serializers.UUIDField(source="id")
    workflow_id = serializers.UUIDField()
    version = serializers.IntegerField(source="version.number")
    credits_consumed = serializers.DecimalField(max_digits=12, decimal_places=4)
    retry_of = serializers.UUIDField(source="retry_of_id", allow_null=True)

    class Meta:
        model = WorkflowRun
        fields = [
            "run_id",
            "workflow_id",
            "version",
            "status",
            "inputs",
            "output",
            "error",
            "credits_consumed",
            "retry_of",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class WorkflowRunFilter(QueryFilter):
    workflow = serializers.UUIDField(required=False, help_text="Only runs of this workflow.")
    status = serializers.ChoiceField(choices=WorkflowRun.Status.choices, required=False)
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)

    def filters(self) -> dict[str, Any]:
        values = dict(self.validated_data)
        if "workflow" in values:
            values["workflow_id"] = values.pop("workflow")
        return values


class RunRetrySerializer(serializers.Serializer):
    from_step = serializers.CharField(
        max_length=63,
        required=False,
        allow_null=True,
        help_text="Run this step and every step downstream of it again; by default only what did not succeed.",
    )


def _detail(run: WorkflowRun) -> dict[str, Any]:
    return WorkflowRunDetailSerializer(run_detail(run=run)).data


@extend_schema_view(
    list=extend_schema(parameters=[WorkflowRunFilter]),
    retrieve=extend_schema(responses=WorkflowRunDetailSerializer),
)
class WorkflowRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Your workflow runs, newest first: each step's state and output, cancel, retry, live events.
    Runs are records: read-only but for cancel and retry."""

    serializer_class = WorkflowRunSerializer
    pagination_class = NewestFirstPagination

    def get_queryset(self) -> QuerySet[WorkflowRun]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return WorkflowRun.objects.none()
        if self.action != "list":
            return run_list(owner=self.request.user)
        params = WorkflowRunFilter(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        return run_list(owner=self.request.user, **params.filters())

    def get_serializer_class(self) -> type[serializers.Serializer]:
        if self.action == "retry":
            return RunRetrySerializer
        if self.action == "cancel":
            return serializers.Serializer
        return WorkflowRunSerializer

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(_detail(self.get_object()))

    @extend_schema(request=None, responses={202: WorkflowRunDetailSerializer, **error_responses(409)})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Stop the run: nothing new starts and its steps in flight are cancelled; it ends CANCELLED
        once they have. 409 once it has ended."""
        run = run_cancel(run=self.get_object())
        return Response(_detail(run), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=RunRetrySerializer, responses={202: RunAccepted, **error_responses(409)})
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """A new run of the same version and inputs that reuses the steps that succeeded (but
        from_step and its downstream). 409 while the run is in flight."""
        run = self.get_object()
        data = RunRetrySerializer(data=request.data)
        data.is_valid(raise_exception=True)
        retry = run_retry(run=run, from_step=data.validated_data.get("from_step"))
        return _accepted(retry)

    @extend_schema(
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR, description="Every step's state and progress, then the run's terminal state."
            )
        },
        parameters=[*RESUME_PARAMETERS],
    )
    # JSON first: an error answers in JSON unless the client asked for text/event-stream only.
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, EventStreamRenderer])
    def events(self, request: Request, *args: Any, **kwargs: Any) -> StreamingHttpResponse:
        return run_event_response(request, str(self.get_object().pk))
