import json
from typing import Any

from django.db.models import QuerySet
from django.http import QueryDict, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import NewestFirstPagination, QueryFilter
from core.schema import ErrorEnvelopeSerializer, error_responses
from instances.api import tool_inputs_serializer
from instances.models import ToolInstance
from instances.selectors import instance_list

from .models import Execution, Job, Mode
from .selectors import execution_list, job_list, job_progress, utc_day
from .services.cache import CacheControl, MissReason, cache_clear
from .services.cache import Status as CacheStatus
from .services.control import job_cancel
from .services.enqueue import execution_enqueue
from .services.recovery import job_check_alive
from .services.sync import execution_run_sync
from .streams import RESUME_PARAMETERS, job_event_response


class ExecutionSerializer(serializers.ModelSerializer):
    instance_id = serializers.UUIDField(allow_null=True)
    tool_definition_id = serializers.SlugField(source="tool.slug")
    tool_name = serializers.CharField(source="tool.name")
    credits_consumed = serializers.DecimalField(max_digits=12, decimal_places=4, coerce_to_string=False)

    class Meta:
        model = Execution
        fields = [
            "id",
            "instance_id",
            "tool_definition_id",
            "tool_name",
            "mode",
            "status",
            "input_data",
            "output_data",
            "error_code",
            "error_message",
            "error_metadata",
            "credits_consumed",
            "started_at",
            "finished_at",
            "duration_ms",
            "cache_hit",
            "created_at",
        ]
        read_only_fields = fields


class ExecutionFilter(QueryFilter):
    instance = serializers.UUIDField(required=False)
    status = serializers.ChoiceField(choices=Execution.Status.choices, required=False)
    mode = serializers.ChoiceField(choices=Mode.choices, required=False)
    date = serializers.DateField(required=False, help_text="Only executions created on this day (UTC).")
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)

    def filters(self) -> dict[str, Any]:
        values = dict(self.validated_data)
        day = values.pop("date", None)
        if day is not None:
            start, end = utc_day(day)
            values["created_after"] = max(filter(None, [values.get("created_after"), start]))
            values["created_before"] = min(filter(None, [values.get("created_before"), end]), default=None)
        if "instance" in values:
            values["instance_id"] = values.pop("instance")
        return values


@extend_schema_view(list=extend_schema(parameters=[ExecutionFilter]))
class ExecutionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The history of your runs, newest first. Executions are records: read-only."""

    serializer_class = ExecutionSerializer
    pagination_class = NewestFirstPagination

    def get_queryset(self) -> QuerySet[Execution]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return Execution.objects.none()
        if self.action != "list":
            return execution_list(owner=self.request.user)
        params = ExecutionFilter(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        return execution_list(owner=self.request.user, **params.filters())


class CacheReportSerializer(serializers.Serializer):
    """What the result cache did for a run (DESIGN.md §9)."""

    status = serializers.ChoiceField(choices=[status.value for status in CacheStatus])
    age_seconds = serializers.IntegerField(allow_null=True, help_text="How old the answer's result is (a hit).")
    ttl_seconds = serializers.IntegerField(allow_null=True, help_text="How long the result stays in the cache.")
    source_execution_id = serializers.UUIDField(allow_null=True, help_text="The run whose result a hit gave.")
    miss_reason = serializers.ChoiceField(choices=[reason.value for reason in MissReason], allow_null=True)


SyncSuccess = inline_serializer(
    "SyncExecutionResult",
    {
        "success": serializers.BooleanField(),
        "data": serializers.DictField(),
        "credits_consumed": serializers.FloatField(),
        "execution_id": serializers.UUIDField(),
        "duration_ms": serializers.IntegerField(),
        "cache": CacheReportSerializer(),
    },
)


class SyncFailureSerializer(ErrorEnvelopeSerializer):
    """A run that started and failed answers 200 (DESIGN.md §5): the error envelope, with the run."""

    execution_id = serializers.UUIDField()
    cache = CacheReportSerializer()


CACHE_CONTROL = OpenApiParameter(
    "Cache-Control",
    str,
    OpenApiParameter.HEADER,
    description=(
        "`no-cache`: run the tool and replace the cached result (REFRESH); `no-store`: run it and "
        "neither read nor write the cache (BYPASS); `max-age=N`: answer from the cache only with a "
        "result at most N seconds old."
    ),
)
CACHE_STATUS = OpenApiParameter(
    "Cache-Status",
    str,
    OpenApiParameter.HEADER,
    response=[200],
    description="How the result cache took part (RFC 9211), e.g. `toolexec; hit; ttl=240` or `toolexec; fwd=miss`.",
)


SyncOutcome = PolymorphicProxySerializer(
    component_name="SyncExecutionOutcome",
    serializers=[SyncSuccess, SyncFailureSerializer],
    resource_type_field_name=None,  # told apart by "success"
)


AsyncAccepted = inline_serializer(
    "AsyncAccepted",
    {
        "job_id": serializers.UUIDField(),
        "execution_id": serializers.UUIDField(),
        "status": serializers.CharField(help_text="QUEUED, or COMPLETED already when answered from the cache."),
        "progress_url": serializers.CharField(),
        "result_url": serializers.CharField(),
        "events_url": serializers.CharField(),
        "cache": CacheReportSerializer(
            allow_null=True,
            help_text="What the result cache did: HIT (the job is COMPLETED), or why the job runs.",
        ),
    },
)
ASYNC_CACHE_STATUS = OpenApiParameter(
    "Cache-Status",
    str,
    OpenApiParameter.HEADER,
    response=[202],
    description="How the result cache took part (RFC 9211), e.g. `toolexec; hit; ttl=240` or `toolexec; fwd=miss`.",
)


class InstanceRunViewSet(viewsets.GenericViewSet):
    """Running an instance. The request body is the tool's inputs, a JSON object."""

    def get_queryset(self) -> QuerySet[ToolInstance]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return ToolInstance.objects.none()
        return instance_list(owner=self.request.user)

    def get_serializer(self, *args: Any, **kwargs: Any) -> serializers.Serializer:
        # The browsable API shows a form with the tool's inputs.
        if getattr(self, "swagger_fake_view", False) or "pk" not in self.kwargs:
            return serializers.Serializer()
        return tool_inputs_serializer(self.get_object())

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        parameters=[CACHE_CONTROL, CACHE_STATUS],
        responses={200: SyncOutcome, **error_responses(402, 409)},
    )
    @action(detail=True, methods=["post"], url_path="execute-sync")
    def execute_sync(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        control = CacheControl.parse(request.headers.get("Cache-Control"))
        execution, outcome = execution_run_sync(
            instance=instance, inputs=_form_inputs(request, instance), cache_control=control
        )
        cache = outcome.cache.as_dict() if outcome.cache is not None else None
        headers = {"Cache-Status": outcome.cache.header()} if outcome.cache is not None else {}
        if outcome.error is None:
            body = {
                "success": True,
                "data": outcome.output,
                "credits_consumed": float(outcome.credits),
                "execution_id": str(execution.pk),
                "duration_ms": execution.duration_ms,
                "cache": cache,
            }
            return Response(body, headers=headers)
        body = {**outcome.error, "execution_id": str(execution.pk), "cache": cache}
        body["metadata"] = {**body["metadata"], "execution_id": str(execution.pk)}
        return Response(body, headers=headers)

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                description="The same key and body within 24 hours return the first job instead of a new one.",
            ),
            CACHE_CONTROL,
            ASYNC_CACHE_STATUS,
        ],
        responses={202: AsyncAccepted, **error_responses(402, 409, 503)},
    )
    @action(detail=True, methods=["post"], url_path="execute-async")
    def execute_async(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        key = idempotency_key_of(request)
        control = CacheControl.parse(request.headers.get("Cache-Control"))
        accepted = execution_enqueue(
            instance=instance, inputs=_form_inputs(request, instance), idempotency_key=key, cache_control=control
        )
        job = accepted.job
        base = f"/api/v1/instances/{instance.pk}/jobs/{job.pk}"
        body = {
            "job_id": str(job.pk),
            "execution_id": str(job.execution_id),
            # QUEUED; COMPLETED already for a cache hit; a replay's job as it is now.
            "status": job.status,
            "progress_url": f"{base}/progress",
            "result_url": f"{base}/result",
            "events_url": f"{base}/events",
            "cache": accepted.cache.as_dict() if accepted.cache is not None else None,
        }
        headers = {"Idempotent-Replayed": "true"} if accepted.replayed else {}
        if accepted.cache is not None:
            headers["Cache-Status"] = accepted.cache.header()
        return Response(body, status=status.HTTP_202_ACCEPTED, headers=headers)

    @extend_schema(
        request=None,
        responses={
            204: OpenApiResponse(
                description="The instance's cached results are deleted: a repeated run runs the tool again."
            ),
            **error_responses(404),
        },
    )
    @action(detail=True, methods=["delete"], url_path="cache")
    def clear_cache(self, request: Request, pk: str | None = None) -> Response:
        """Delete the instance's cached results."""
        cache_clear(instance=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


_IDEMPOTENCY_KEY = serializers.CharField(max_length=255, allow_blank=True)  # stored: no NUL, not overlong


def idempotency_key_of(request: Request) -> str:
    try:
        return _IDEMPOTENCY_KEY.run_validation(request.headers.get("Idempotency-Key", ""))
    except serializers.ValidationError as exc:
        raise serializers.ValidationError({"Idempotency-Key": exc.detail}) from None


def _form_inputs(request: Request, instance: ToolInstance) -> Any:
    """The run's inputs: the JSON body, or the browsable API's HTML form decoded field by field."""
    if isinstance(request.data, QueryDict):
        form = tool_inputs_serializer(instance, data=request.data)
        form.is_valid(raise_exception=True)
        return form.validated_data
    return request.data


# --- Jobs ---------------------------------------------------------------------------------


class JobSerializer(serializers.ModelSerializer):
    job_id = serializers.UUIDField(source="id")
    execution_id = serializers.UUIDField()
    instance_id = serializers.UUIDField(allow_null=True)
    tool_definition_id = serializers.SlugField(source="execution.tool.slug")

    class Meta:
        model = Job
        fields = [
            "job_id",
            "execution_id",
            "instance_id",
            "tool_definition_id",
            "status",
            "progress",
            "current_step",
            "step_index",
            "steps_total",
            "attempts",
            "max_attempts",
            "cancel_requested_at",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class JobProgressSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=Job.Status.choices)
    progress = serializers.IntegerField()
    current_step = serializers.CharField()
    steps_total = serializers.IntegerField(allow_null=True)
    step_index = serializers.IntegerField(allow_null=True)
    eta_seconds = serializers.FloatField(allow_null=True)
    updated_at = serializers.DateTimeField()


# One of three shapes, by status: still running (result null, with progress), COMPLETED
# (result, credits_consumed, duration_ms, cache) or ended otherwise (success false, the error, cache).
JobResultSerializer = inline_serializer(
    "JobResult",
    {
        "cache": CacheReportSerializer(
            allow_null=True,
            required=False,
            help_text="What the result cache did for the run, once it ended (null if it took no part).",
        ),
        "status": serializers.ChoiceField(choices=Job.Status.choices),
        "result": serializers.DictField(allow_null=True, required=False),
        "credits_consumed": serializers.FloatField(required=False),
        "duration_ms": serializers.IntegerField(allow_null=True, required=False),
        "progress": JobProgressSerializer(required=False),
        "success": serializers.BooleanField(required=False),
        "error_code": serializers.CharField(required=False),
        "error_message": serializers.CharField(required=False),
        "metadata": serializers.DictField(required=False),
    },
)


class EventStreamRenderer(BaseRenderer):
    media_type = "text/event-stream"
    format = "event-stream"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        return json.dumps(data).encode()  # only errors are rendered; the stream itself is streamed


@extend_schema_view(list=extend_schema(parameters=[OpenApiParameter("instance_id", OpenApiTypes.UUID, "path")]))
class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """An instance's async jobs: progress, result, cancellation and a live event stream."""

    serializer_class = JobSerializer
    pagination_class = NewestFirstPagination

    def get_queryset(self) -> QuerySet[Job]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return Job.objects.none()
        return job_list(owner=self.request.user, instance_id=self.kwargs["instance_id"])

    def get_object(self) -> Job:
        return job_check_alive(job=super().get_object())

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not instance_list(owner=request.user).filter(pk=kwargs["instance_id"]).exists():
            raise NotFound()
        return super().list(request, *args, **kwargs)

    @extend_schema(responses=JobProgressSerializer)
    @action(detail=True, methods=["get"])
    def progress(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(job_progress(job=self.get_object()))

    @extend_schema(responses=JobResultSerializer)
    @action(detail=True, methods=["get"])
    def result(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        job = self.get_object()
        execution = job.execution
        if job.status == Job.Status.COMPLETED:
            return Response(
                {
                    "status": job.status,
                    "result": execution.output_data,
                    "credits_consumed": float(execution.credits_consumed),
                    "duration_ms": execution.duration_ms,
                    "cache": execution.cache,
                }
            )
        if job.status in Job.TERMINAL:
            return Response(
                {
                    "status": job.status,
                    "success": False,
                    "error_code": execution.error_code,
                    "error_message": execution.error_message,
                    "metadata": {**execution.error_metadata, "execution_id": str(execution.pk), "job_id": str(job.pk)},
                    "cache": execution.cache,
                }
            )
        return Response({"status": job.status, "result": None, "progress": job_progress(job=job)})

    @extend_schema(request=None, responses={202: JobProgressSerializer, **error_responses(409)})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        job = job_cancel(job=self.get_object())
        return Response(job_progress(job=job), status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses={(200, "text/event-stream"): OpenApiTypes.STR}, parameters=[*RESUME_PARAMETERS])
    # JSON first: an error answers in JSON unless the client asked for text/event-stream only.
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, EventStreamRenderer])
    def events(self, request: Request, *args: Any, **kwargs: Any) -> StreamingHttpResponse:
        return job_event_response(request, str(self.get_object().pk))
