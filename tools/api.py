from django.urls.converters import SlugConverter
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


class ToolDefinitionSerializer(serializers.ModelSerializer):
    id = serializers.SlugField(source="slug", help_text="The tool's slug; use it as tool_definition_id.")
    credential_slots = CredentialSlotSerializer(many=True)
    modes = serializers.ListField(child=serializers.ChoiceField(choices=["sync", "async"]))
    pricing = PricingSerializer(source="*", read_only=True)
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
            "is_available",
            "unavailable_reason",
        ]

    def get_unavailable_reason(self, tool: ToolDefinition) -> str | None:
        # The stored reason names module paths: it is for operators, not API clients.
        if tool.is_available:
            return None
        return "The tool's implementation is not installed on this server."


class ToolViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The tool catalog: what each tool takes, needs, costs, and whether it can run here."""

    serializer_class = ToolDefinitionSerializer
    queryset = ToolDefinition.objects.filter(is_active=True).order_by("name")
    lookup_field = "slug"
    lookup_url_kwarg = "slug"
    lookup_value_regex = SlugConverter.regex  # what a SlugField holds; the router's default is a UUID
    pagination_class = None
