from datetime import datetime, timedelta
from typing import Any

from django.db.models import QuerySet
from django.http import QueryDict
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view, inline_serializer
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from instances.api import tool_inputs_serializer
from instances.models import ToolInstance
from instances.selectors import instance_list
from toolexec.api import NewestFirstPagination

from .models import Execution, Mode
from .selectors import execution_list
from .services import NotReady, execution_run_sync


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


class ExecutionFilter(serializers.Serializer):
    instance = serializers.UUIDField(required=False)
    status = serializers.ChoiceField(choices=Execution.Status.choices, required=False)
    mode = serializers.ChoiceField(choices=Mode.choices, required=False)
    date = serializers.DateField(required=False, help_text="Only executions created on this day (UTC).")
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        data = {k: (v.upper() if k in ("status", "mode") else v) for k, v in data.items() if v != ""}
        return super().to_internal_value(data)

    def filters(self) -> dict[str, Any]:
        values = dict(self.validated_data)
        day = values.pop("date", None)
        if day is not None:
            start = timezone.make_aware(datetime.combine(day, datetime.min.time()))
            values["created_after"] = max(filter(None, [values.get("created_after"), start]))
            values["created_before"] = min(filter(None, [values.get("created_before"), start + timedelta(days=1)]))
        if "instance" in values:
            values["instance_id"] = values.pop("instance")
        return values


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("instance", OpenApiTypes.UUID),
            OpenApiParameter("status", str, enum=Execution.Status.values),
            OpenApiParameter("mode", str, enum=Mode.values),
            OpenApiParameter("date", OpenApiTypes.DATE),
            OpenApiParameter("created_after", OpenApiTypes.DATETIME),
            OpenApiParameter("created_before", OpenApiTypes.DATETIME),
        ]
    )
)
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


SyncSuccess = inline_serializer(
    "SyncExecutionResult",
    {
        "success": serializers.BooleanField(),
        "data": serializers.DictField(),
        "credits_consumed": serializers.FloatField(),
        "execution_id": serializers.UUIDField(),
        "duration_ms": serializers.IntegerField(),
    },
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

    @extend_schema(request=OpenApiTypes.OBJECT, responses={200: SyncSuccess})
    @action(detail=True, methods=["post"], url_path="execute-sync")
    def execute_sync(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        inputs = request.data
        if isinstance(inputs, QueryDict):  # the browsable API's HTML form: decode its JSON fields
            form = tool_inputs_serializer(instance, data=inputs)
            form.is_valid(raise_exception=True)
            inputs = form.validated_data
        try:
            execution, outcome = execution_run_sync(instance=instance, inputs=inputs)
        except NotReady as not_ready:
            code_status, body = not_ready.readiness.refusal()
            return Response(body, status=code_status)
        if outcome.error is None:
            return Response(
                {
                    "success": True,
                    "data": outcome.output,
                    "credits_consumed": float(outcome.credits),
                    "execution_id": str(execution.pk),
                    "duration_ms": execution.duration_ms,
                }
            )
        body = {**outcome.error, "execution_id": str(execution.pk)}
        body["metadata"] = {**body["metadata"], "execution_id": str(execution.pk)}
        return Response(body)
