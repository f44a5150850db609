from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import NewestFirstPagination, QueryFilter
from core.schema import error_responses
from tools.api import CredentialSlotSerializer, PricingSerializer, ToolCacheSerializer
from tools.models import ToolDefinition

from .models import Credential, ToolInstance
from .readiness import readiness_check
from .selectors import credential_list, instance_list
from .services.credentials import (
    credential_create,
    credential_delete,
    credential_update,
    instance_configure_credentials,
)
from .services.instances import instance_create, instance_delete, instance_transition, instance_update


class StatisticsSerializer(serializers.Serializer):
    execution_count = serializers.IntegerField()
    success_count = serializers.IntegerField()
    failure_count = serializers.IntegerField()
    failure_rate = serializers.FloatField()
    credits_consumed = serializers.DecimalField(max_digits=14, decimal_places=4)
    total_duration_ms = serializers.IntegerField()
    last_executed_at = serializers.DateTimeField(allow_null=True)


class InstanceCacheSerializer(serializers.Serializer):
    """The instance's result-cache setting as it applies: the tool's defaults where it sets none."""

    enabled = serializers.BooleanField(
        source="caches",
        help_text="Whether repeated runs are answered from the cache (never for a tool that is not cacheable).",
    )
    ttl_seconds = serializers.IntegerField(source="cache_ttl", help_text="How long a result stays cached.")


class InstanceCacheInputSerializer(serializers.Serializer):
    """Either key, or both; null goes back to the tool's default."""

    enabled = serializers.BooleanField(
        required=False,
        allow_null=True,
        help_text="Answer repeated runs from the cache. Only a cacheable tool can (see the catalog's cache).",
    )
    ttl_seconds = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        help_text="How long a result stays cached: 1 up to the tool's cache.ttl_max_seconds. A shorter TTL also "
        "applies to the results the instance already cached.",
    )


def _cache_setting(data: dict[str, Any]) -> dict[str, Any]:
    """The service's arguments of a ``cache`` input: only the keys given."""
    names = {"enabled": "cache_enabled", "ttl_seconds": "cache_ttl_seconds"}
    return {names[key]: value for key, value in data.pop("cache", {}).items()}


class InstanceSerializer(serializers.ModelSerializer):
    tool_definition_id = serializers.SlugField(source="tool.slug")
    tool_name = serializers.CharField(source="tool.name")
    statistics = StatisticsSerializer(source="*")
    cache = InstanceCacheSerializer(source="*", read_only=True)

    class Meta:
        model = ToolInstance
        fields = [
            "id",
            "tool_definition_id",
            "tool_name",
            "workflow_id",
            "name",
            "config",
            "credential_mappings",
            "status",
            "cache",
            "statistics",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class InstanceCreateSerializer(serializers.Serializer):
    tool_definition_id = serializers.SlugRelatedField(
        slug_field="slug",
        queryset=ToolDefinition.objects.filter(is_active=True),
        help_text="The slug of the tool, e.g. json-transform.",
        error_messages={"does_not_exist": "There is no active tool {slug_name}={value}."},
    )
    workflow_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    name = serializers.CharField(max_length=200)
    config = serializers.JSONField(required=False, default=dict, help_text="Default inputs for every run.")
    cache = InstanceCacheInputSerializer(required=False, help_text="The result cache; the tool's defaults if left out.")


class InstanceUpdateSerializer(serializers.Serializer):
    workflow_id = serializers.CharField(max_length=200, required=False, allow_blank=True)
    name = serializers.CharField(max_length=200, required=False)
    config = serializers.JSONField(required=False)
    cache = InstanceCacheInputSerializer(required=False, help_text="The result cache; unchanged if left out.")


class ConfigureCredentialsSerializer(serializers.Serializer):
    credential_mappings = serializers.DictField(
        child=serializers.CharField(allow_null=True),
        help_text='Slot → provider key (e.g. "google") or credential id; null removes a mapping.',
    )


class CheckSerializer(serializers.Serializer):
    name = serializers.CharField()
    passed = serializers.BooleanField()
    message = serializers.CharField()
    error_code = serializers.CharField(allow_null=True)
    action_items = serializers.ListField(child=serializers.DictField())


class ReadinessSerializer(serializers.Serializer):
    is_ready = serializers.BooleanField()
    error_code = serializers.CharField(allow_null=True)
    error_message = serializers.CharField(allow_null=True)
    action_items = serializers.ListField(child=serializers.DictField())
    checks = CheckSerializer(many=True)


class CapabilitiesCacheSerializer(ToolCacheSerializer):
    """How the tool caches, and the instance's own setting (as the instance's ``cache`` says)."""

    enabled = serializers.BooleanField(help_text="Whether this instance answers repeated runs from the cache.")
    ttl_seconds = serializers.IntegerField(help_text="How long this instance keeps a result cached.")


class CapabilitiesSerializer(serializers.Serializer):
    tool_definition_id = serializers.CharField()
    name = serializers.CharField()
    modes = serializers.ListField(child=serializers.CharField())
    input_schema = serializers.DictField()
    output_schema = serializers.DictField()
    defaults = serializers.DictField()
    credential_slots = CredentialSlotSerializer(many=True)
    credential_mappings = serializers.DictField()
    timeout_seconds = serializers.IntegerField()
    pricing = PricingSerializer()
    cache = CapabilitiesCacheSerializer()
    is_available = serializers.BooleanField()


class InstanceFilter(QueryFilter):
    workflow_id = serializers.CharField(max_length=200, required=False, help_text="Only instances of this workflow.")
    status = serializers.ChoiceField(choices=ToolInstance.Status.choices, required=False)


@extend_schema_view(
    list=extend_schema(parameters=[InstanceFilter]),
    create=extend_schema(request=InstanceCreateSerializer, responses={201: InstanceSerializer}),
    update=extend_schema(request=InstanceUpdateSerializer, responses=InstanceSerializer),
    partial_update=extend_schema(request=InstanceUpdateSerializer, responses=InstanceSerializer),
)
class InstanceViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your tool instances: create, configure, check readiness, activate and disable."""

    serializer_class = InstanceSerializer
    pagination_class = NewestFirstPagination

    def get_queryset(self) -> QuerySet[ToolInstance]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return ToolInstance.objects.none()
        if self.action != "list":
            return instance_list(owner=self.request.user)
        params = InstanceFilter(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        return instance_list(owner=self.request.user, **params.validated_data)

    def get_serializer_class(self) -> type[serializers.Serializer]:
        if self.action == "configure_credentials":
            return ConfigureCredentialsSerializer
        if self.action == "create":
            return InstanceCreateSerializer
        if self.action in ("update", "partial_update"):
            return InstanceUpdateSerializer
        return InstanceSerializer

    def create(self, request: Request) -> Response:
        data = InstanceCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        cache = _cache_setting(values)
        instance = instance_create(owner=request.user, tool=values.pop("tool_definition_id"), **values, **cache)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_201_CREATED)

    def update(self, request: Request, pk: str | None = None, partial: bool = False) -> Response:
        instance = self.get_object()
        data = InstanceUpdateSerializer(data=request.data, partial=partial)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        cache = _cache_setting(values)
        instance = instance_update(instance=instance, **values, **cache)
        return Response(InstanceSerializer(instance).data)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        return self.update(request, pk, partial=True)

    def perform_destroy(self, instance: ToolInstance) -> None:
        instance_delete(instance=instance)

    @extend_schema(request=None, responses={200: InstanceSerializer, **error_responses(409)})
    @action(detail=True, methods=["post"])
    def activate(self, request: Request, pk: str | None = None) -> Response:
        instance = instance_transition(instance=self.get_object(), to=ToolInstance.Status.ACTIVE)
        return Response(InstanceSerializer(instance).data)

    @extend_schema(request=None, responses={200: InstanceSerializer, **error_responses(409)})
    @action(detail=True, methods=["post"])
    def disable(self, request: Request, pk: str | None = None) -> Response:
        instance = instance_transition(instance=self.get_object(), to=ToolInstance.Status.DISABLED)
        return Response(InstanceSerializer(instance).data)

    @extend_schema(request=ConfigureCredentialsSerializer, responses=InstanceSerializer)
    @action(detail=True, methods=["post"], url_path="configure-credentials")
    def configure_credentials(self, request: Request, pk: str | None = None) -> Response:
        data = ConfigureCredentialsSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        instance = instance_configure_credentials(
            instance=self.get_object(), mappings=data.validated_data["credential_mappings"]
        )
        return Response(InstanceSerializer(instance).data)

    @extend_schema(responses=CapabilitiesSerializer)
    @action(detail=True, methods=["get"])
    def capabilities(self, request: Request, pk: str | None = None) -> Response:
        instance = self.get_object()
        tool = instance.tool
        return Response(
            {
                "tool_definition_id": tool.slug,
                "name": tool.name,
                "modes": tool.modes,
                "input_schema": tool.input_schema,
                "output_schema": tool.output_schema,
                "defaults": instance.config,
                "credential_slots": tool.credential_slots,
                "credential_mappings": instance.credential_mappings,
                "timeout_seconds": tool.timeout_seconds,
                "pricing": PricingSerializer(tool).data,
                "cache": {
                    **ToolCacheSerializer(tool).data,
                    "enabled": instance.caches,
                    "ttl_seconds": instance.cache_ttl,
                },
                "is_available": tool.is_available,
            }
        )

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "mode", str, enum=["sync", "async"], description="Also check that the tool runs in this mode."
            )
        ],
        responses=ReadinessSerializer,
    )
    @action(detail=True, methods=["get"], url_path="validate-execution")
    def validate_execution(self, request: Request, pk: str | None = None) -> Response:
        mode = request.query_params.get("mode") or None
        if mode not in (None, "sync", "async"):
            raise serializers.ValidationError({"mode": ["Must be sync or async."]})
        readiness = readiness_check(instance=self.get_object(), mode=mode)
        return Response(readiness.as_dict())


_FORM_FIELDS: dict[str, type[serializers.Field]] = {
    "string": serializers.CharField,
    "integer": serializers.IntegerField,
    "number": serializers.FloatField,
    "boolean": serializers.BooleanField,
}


def tool_inputs_serializer(instance: ToolInstance, **kwargs: Any) -> serializers.Serializer:
    """A serializer whose fields are the tool's inputs: the browsable API's form for a run.

    Plain strings, numbers and booleans get their own inputs; anything else is typed as JSON.
    The JSON Schema check still decides what is valid.
    """
    schema: dict[str, Any] = instance.tool.input_schema
    required = set(schema.get("required", []))
    fields = {}
    for name, prop in schema.get("properties", {}).items():
        field_class = _FORM_FIELDS.get(
            prop.get("type") if isinstance(prop.get("type"), str) else "", serializers.JSONField
        )
        options: dict[str, Any] = {
            "required": name in required and name not in instance.config,
            "help_text": prop.get("description", ""),
            "initial": instance.config.get(name, prop.get("default")),
        }
        if field_class is serializers.CharField:
            options["allow_blank"] = True
        fields[name] = field_class(**options)
    return type("ToolInputs", (serializers.Serializer,), fields)(**kwargs)


# --- Credentials --------------------------------------------------------------------------


class CredentialSerializer(serializers.ModelSerializer):
    class Meta:
        model = Credential
        fields = [
            "id",
            "provider",
            "kind",
            "label",
            "metadata",
            "expires_at",
            "status",
            "fingerprint",
            "last_used_at",
            "last_error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class CredentialCreateSerializer(serializers.Serializer):
    provider = serializers.CharField(max_length=50, help_text="A provider key, e.g. google or http.")
    kind = serializers.ChoiceField(choices=Credential.Kind.choices)
    label = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    secret = serializers.JSONField(
        write_only=True,
        style={"input_type": "password", "base_template": "textarea.html"},
        help_text='oauth2 {"access_token", "refresh_token"?}; api_key {"api_key"}; bearer {"token"}; '
        'basic {"username", "password"}. Never shown again.',
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
    metadata = serializers.JSONField(required=False, default=dict, help_text='e.g. {"header_name": "X-API-Key"}')


class CredentialUpdateSerializer(serializers.Serializer):
    label = serializers.CharField(max_length=200, required=False, allow_blank=True)
    secret = serializers.JSONField(
        write_only=True, required=False, style={"input_type": "password", "base_template": "textarea.html"}
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    metadata = serializers.JSONField(required=False)


class CredentialFilter(QueryFilter):
    provider = serializers.CharField(max_length=50, required=False, help_text="Only credentials of this provider.")


@extend_schema_view(
    list=extend_schema(parameters=[CredentialFilter]),
    create=extend_schema(request=CredentialCreateSerializer, responses={201: CredentialSerializer}),
    update=extend_schema(request=CredentialUpdateSerializer, responses=CredentialSerializer),
    partial_update=extend_schema(request=CredentialUpdateSerializer, responses=CredentialSerializer),
    destroy=extend_schema(responses={204: None, **error_responses(409)}),  # 409: an instance pins it
)
class CredentialViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your credentials. Secrets are write-only: a fingerprint tells two apart."""

    serializer_class = CredentialSerializer
    pagination_class = NewestFirstPagination

    def get_queryset(self) -> QuerySet[Credential]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return Credential.objects.none()
        if self.action != "list":
            return credential_list(owner=self.request.user)
        params = CredentialFilter(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        return credential_list(owner=self.request.user, **params.validated_data)

    def get_serializer_class(self) -> type[serializers.Serializer]:
        if self.action == "create":
            return CredentialCreateSerializer
        if self.action in ("update", "partial_update"):
            return CredentialUpdateSerializer
        return CredentialSerializer

    def create(self, request: Request) -> Response:
        data = CredentialCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        credential = credential_create(owner=request.user, actor=request.user, **data.validated_data)
        return Response(CredentialSerializer(credential).data, status=status.HTTP_201_CREATED)

    def update(self, request: Request, pk: str | None = None, partial: bool = False) -> Response:
        credential = self.get_object()
        data = CredentialUpdateSerializer(data=request.data, partial=partial)
        data.is_valid(raise_exception=True)
        credential = credential_update(credential=credential, actor=self.request.user, **data.validated_data)
        return Response(CredentialSerializer(credential).data)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        return self.update(request, pk, partial=True)

    def perform_destroy(self, credential: Credential) -> None:
        credential_delete(credential=credential, actor=self.request.user)
