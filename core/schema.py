"""The OpenAPI schema's error answers (DESIGN.md §5): one ErrorEnvelope component, and on every
operation each error status it can give.

What follows from a view's shape is derived here, once, for every operation: 400 where it
takes input (a body, a query or header parameter), 401 where it authenticates, 403 where a
session's CSRF check guards an unsafe method, 404 where its path names an object, 415 where it
parses a body, 429 where it is throttled. What a service refuses (402, 409, 413, 503) is
declared on the action with :func:`error_responses`.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import SAFE_METHODS
from rest_framework.settings import api_settings

from .errors import CATALOG, ErrorCode
from .routers import UUID_PATTERN


@extend_schema_field({"type": "boolean", "enum": [False]})
class AlwaysFalseField(serializers.BooleanField):
    pass


class ActionItemSerializer(serializers.Serializer):
    action = serializers.CharField(help_text="What to do, as a key: fix_credential, add_credits, …")
    message = serializers.CharField(help_text="What to do, in words for a person.")
    url = serializers.URLField(required=False, help_text="Where to do it, when there is a place.")
    priority = serializers.ChoiceField(choices=["high", "medium", "low"])


class ErrorMetadataSerializer(serializers.Serializer):
    """What to do about the error; other keys may follow, as the error has them."""

    action_items = ActionItemSerializer(many=True)
    can_retry = serializers.BooleanField(help_text="Whether the same request may succeed later.")
    retry_after_seconds = serializers.IntegerField(
        required=False, help_text="When to retry (rate limits, queue pressure)."
    )
    field_errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text='INPUT_INVALID: {"path.to.field": ["message", …]}.',
    )
    execution_id = serializers.UUIDField(required=False, help_text="The run this error was recorded on.")
    job_id = serializers.UUIDField(required=False, help_text="The job this error was recorded on.")


class ErrorEnvelopeSerializer(serializers.Serializer):
    """Every error answer (DESIGN.md §5)."""

    success = AlwaysFalseField()
    error_code = serializers.ChoiceField(choices=[code.value for code in ErrorCode])
    error_message = serializers.CharField(help_text="What went wrong, in words for a person.")
    metadata = ErrorMetadataSerializer()


_REASONS = {
    400: "The request is not valid; metadata.field_errors names each field.",
    401: "Not signed in, or the API token is not valid.",
    402: "Not enough credits for this run.",
    403: "Refused: a session's request without its CSRF token.",
    404: "Nothing exists here, or it is not yours; a malformed id answers this too.",
    409: "Not possible in the current state; metadata.action_items says what to do.",
    413: "The upload is too large.",
    415: "The request body's media type is not accepted.",
    429: "Too many requests: retry after metadata.retry_after_seconds.",
    503: "The service needed for this is unavailable right now; retry later.",
}


def _description(status: int) -> str:
    codes = ", ".join(code.value for code, entry in CATALOG.items() if entry.status == status)
    return f"{_REASONS[status]} error_code is one of: {codes}."


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """``responses=`` entries for the error statuses a service gives beyond the derived ones."""
    return {status: OpenApiResponse(ErrorEnvelopeSerializer, description=_description(status)) for status in statuses}


_UUID_SCHEMA_PATTERN = f"^{UUID_PATTERN}$"


class ToolexecAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema, adding each operation's error answers."""

    def get_operation(
        self, path: str, path_regex: str, path_prefix: str, method: str, registry: Any
    ) -> dict[str, Any] | None:
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        for parameter in operation.get("parameters", []):
            # The router's UUID pattern (core.api.ApiRouter) is what "format: uuid" means.
            if parameter["in"] == "path" and parameter["schema"].get("pattern") == _UUID_SCHEMA_PATTERN:
                parameter["schema"] = {"type": "string", "format": "uuid"}
        responses = operation["responses"]
        envelope = {"schema": self.resolve_serializer(ErrorEnvelopeSerializer, "response").ref}
        # The envelope is rendered by whichever of the view's renderers the request negotiated.
        content = {media_type: envelope for media_type in self.map_renderers("media_type")}
        for status in sorted(self.derived_error_statuses(operation)):
            # A status the action declared (with its own description) is kept as declared.
            responses.setdefault(str(status), {"description": _description(status), "content": content})
        return operation

    def derived_error_statuses(self, operation: dict[str, Any]) -> set[int]:
        view = self.view
        # DRF's ?format= (a view with several renderers) answers an unknown format with 404, not 400.
        locations = {
            parameter["in"]
            for parameter in operation.get("parameters", [])
            if (parameter["in"], parameter["name"]) != ("query", api_settings.URL_FORMAT_OVERRIDE)
        }
        statuses: set[int] = set()
        if "requestBody" in operation:
            statuses |= {400, 415}
        if locations & {"query", "header"}:
            statuses.add(400)
        if "path" in locations:
            statuses.add(404)
        if view.authentication_classes:
            statuses.add(401)  # a token that is not valid, on any view that reads one
        if self.method not in SAFE_METHODS and any(
            issubclass(authentication, SessionAuthentication) for authentication in view.authentication_classes
        ):
            statuses.add(403)
        if view.throttle_classes:
            statuses.add(429)
        return statuses
