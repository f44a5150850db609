from django.urls.converters import SlugConverter
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import mixins, serializers, viewsets

from .models import ToolDefinition


class PricingSerializer(serializers.Serializer):
    base_credits = serializers.DecimalField(max_digits=12, decimal_places=4)
    credits_per_unit = serializers.DecimalField(max_digits=12, decimal_places=4)
    unit = serializers.CharField()


class CredentialSlotSerializer(serializers.Serializer):
    name = serializers.CharField()
    provider = serializers.CharField()
    kinds = serializers.ListField(child=serializers.CharField())
    scopes = serializers.ListField(child=serializers.CharField())
    required = serializers.BooleanField()
    description = serializers.CharField()


class ToolCacheSerializer(serializers.Serializer):
    """Whether and how the result cache answers runs of a tool (DESIGN.md §9)."""

    cacheable = serializers.BooleanField(
        help_text="Whether a repeated run may be answered from the cache. The tool may still run some "
        "calls every time (http-request caches GET and HEAD only)."
    )
    enabled_by_default = serializers.SerializerMethodField(
        help_text="Whether a new instance of the tool caches until its owner says otherwise."
    )
    ttl_default_seconds = serializers.IntegerField(
        source="cache_ttl_default", help_text="How long a result stays cached unless the instance says otherwise."
    )
    ttl_max_seconds = serializers.IntegerField(
        source="cache_ttl_max", help_text="The longest cache.ttl_seconds an instance may set."
    )
    excluded_inputs = serializers.ListField(
        child=serializers.CharField(),
        source="cache_exclude_inputs",
        help_text="Inputs that do not change the result: runs that differ only in them share a cached result.",
    )

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_enabled_by_default(self, tool: ToolDefinition) -> bool:
        return tool.cacheable and tool.cache_by_default


class ToolDefinitionSerializer(serializers.ModelSerializer):
    id = serializers.SlugField(source="slug", help_text="The tool's slug; use it as tool_definition_id.")
    credential_slots = CredentialSlotSerializer(many=True)
    modes = serializers.ListField(child=serializers.ChoiceField(choices=["sync", "async"]))
    pricing = PricingSerializer(source="*", read_only=True)
    cache = ToolCacheSerializer(source="*", read_only=True)
    unavailable_reason = serializers.SerializerMethodField()

    class Meta:
        model = ToolDefinition
        fields = [
            "id",
            "name",
            "description",
            "version",
            "category",
            "input_schema",
            "output_schema",
            "credential_slots",
            "modes",
            "timeout_seconds",
            "pricing",
            "cacheable",
            "cache",
            "is_available",
            "unavailable_reason",
        ]

    def get_unavailable_reason(self, tool: ToolDefinition) -> str | None:
        # The stored reason names module paths: it is for operators, not API clients.
        if tool.is_available:
            return None
        return "The tool's implementation is not installed on this server."


class ToolViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The tool catalog: what each tool takes, needs, costs, whether and how its results are
    cached, and whether it can run here."""

    serializer_class = ToolDefinitionSerializer
    queryset = ToolDefinition.objects.filter(is_active=True).order_by("name")
    lookup_field = "slug"
    lookup_url_kwarg = "slug"
    lookup_value_regex = SlugConverter.regex  # what a SlugField holds; the router's default is a UUID
    pagination_class = None
