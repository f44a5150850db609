"""API plumbing shared by every endpoint: the error envelope, throttles, pagination, tokens."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView, set_rollback

from .auth import token_issue_for_login
from .errors import ErrorCode, ToolexecError, envelope, http_status
from .schema import error_responses
from .throttles import ScopedThrottle
from .ws_auth import TICKET_SECONDS, ws_ticket_issue

logger = logging.getLogger(__name__)


# --- Errors -----------------------------------------------------------------------------


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested error detail as ``{"path.to.field": ["message", ...]}``."""
    if isinstance(detail, dict):
        out: dict[str, list[str]] = {}
        for key, value in detail.items():
            name = "(root)" if key == api_settings.NON_FIELD_ERRORS_KEY else str(key)
            out.update(_flatten(value, f"{prefix}.{name}" if prefix else name))
        return out
    if isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            return {prefix or "(root)": [str(item) for item in detail]}
        out = {}
        for index, item in enumerate(detail):
            out.update(_flatten(item, f"{prefix}.{index}" if prefix else str(index)))
        return out
    return {prefix or "(root)": [str(detail)]}


def _drf_envelope(exc: exceptions.APIException) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, exceptions.ValidationError):
        field_errors = _flatten(exc.detail)
        message = "The request is not valid: " + "; ".join(
            f"{path}: {' '.join(messages)}" for path, messages in field_errors.items()
        )
        body = envelope(ErrorCode.INPUT_INVALID, {"detail": message}, metadata={"field_errors": field_errors})
        return 400, body
    if isinstance(exc, exceptions.ParseError):
        return 400, envelope(ErrorCode.INPUT_INVALID, {"detail": f"The request body could not be read: {exc.detail}"})
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
        code_status = exc.status_code
        detail = (
            "Sign in first: send an API token as 'Authorization: Token <key>'."
            if isinstance(exc, exceptions.NotAuthenticated)
            else str(exc.detail)
        )
        return code_status, envelope(ErrorCode.NOT_AUTHENTICATED, {"detail": detail})
    if isinstance(exc, exceptions.PermissionDenied):
        return 403, envelope(ErrorCode.PERMISSION_DENIED)
    if isinstance(exc, exceptions.NotFound):
        return 404, not_found_envelope()
    if isinstance(exc, exceptions.MethodNotAllowed):
        return 405, envelope(ErrorCode.METHOD_NOT_ALLOWED, {"detail": str(exc.detail)})
    if isinstance(exc, exceptions.Throttled):
        wait = int(exc.wait or 1)
        return 429, envelope(ErrorCode.THROTTLED, {"retry_after_seconds": wait}, metadata={"retry_after_seconds": wait})
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return 415, envelope(ErrorCode.UNSUPPORTED_MEDIA_TYPE, {"detail": str(exc.detail)})
    if isinstance(exc, exceptions.NotAcceptable):
        return 406, envelope(ErrorCode.NOT_ACCEPTABLE, {"detail": str(exc.detail)})
    if 400 <= exc.status_code < 500:
        return exc.status_code, envelope(ErrorCode.INPUT_INVALID, {"detail": str(exc.detail)})
    return exc.status_code, envelope(ErrorCode.INTERNAL_ERROR)


def not_found_envelope() -> dict[str, Any]:
    return envelope(ErrorCode.NOT_FOUND, {"detail": "Not found: nothing exists here, or it is not yours."})


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """Every API error in the envelope of DESIGN.md §5; no traceback ever leaves the server."""
    headers: dict[str, str] = {}
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        # A value the ORM refused (say, a malformed UUID in a filter a view passed on unchecked)
        # is the request's fault: 400 naming what Django names, never a 500 (HackSoft's handler).
        exc = exceptions.ValidationError(serializers.as_serializer_error(exc))
    elif isinstance(exc, SuspiciousOperation):
        # As Django answers one outside DRF (too many fields or files, a body too large): 400,
        # logged as a security event. Its message may name server paths, so it is not sent.
        logging.getLogger(f"django.security.{type(exc).__name__}").error(str(exc))
        exc = exceptions.ValidationError("The request has too many fields or files, or is too large, for this server.")

    if isinstance(exc, ToolexecError):
        # An error may answer with its own status (a workflow not ready: 409 whatever its first problem).
        code_status, body = getattr(exc, "status", None) or http_status(exc.code), exc.envelope()
    elif isinstance(exc, exceptions.APIException):
        code_status, body = _drf_envelope(exc)
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
            headers["Retry-After"] = str(int(exc.wait))
    else:
        view = context.get("view")
        logger.exception("Unhandled error in %s", type(view).__name__ if view else "an API view", exc_info=exc)
        code_status, body = 500, envelope(ErrorCode.INTERNAL_ERROR)
    set_rollback()
    return Response(body, status=code_status, headers=headers)


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse(not_found_envelope(), status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def handler500(request: HttpRequest) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse(envelope(ErrorCode.INTERNAL_ERROR), status=500)
    from django.views.defaults import server_error

    return server_error(request)


# --- Pagination -------------------------------------------------------------------------


class NewestFirstPagination(CursorPagination):
    """Keyset pagination on created_at: constant cost at any depth, no COUNT(*)."""

    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200

    def decode_cursor(self, request: Request) -> Any:
        invalid = exceptions.ValidationError(
            {self.cursor_query_param: ["Invalid cursor: use the next and previous links as given."]}
        )
        try:
            cursor = super().decode_cursor(request)
        except exceptions.NotFound:
            raise invalid from None
        # The position goes into a created_at filter as it came: it must be a time with its zone.
        if cursor is not None and cursor.position is not None:
            try:
                moment = parse_datetime(cursor.position)
            except ValueError:
                moment = None
            if moment is None or timezone.is_naive(moment):
                raise invalid
        return cursor


class QueryFilter(serializers.Serializer):
    """A list's query parameters, checked like a body before they reach a query: a value that
    is not valid (a malformed id, a NUL character, an unknown choice) answers 400 naming its
    parameter. An empty value is no filter; choices take any case (status=failed is FAILED)."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        values = {
            name: value.upper() if isinstance(self.fields[name], serializers.ChoiceField) else value
            for name, value in data.items()
            if name in self.fields and value != ""
        }
        return super().to_internal_value(values)


# --- Tokens -----------------------------------------------------------------------------


class TokenView(APIView):
    """Exchange a username and password for an API token (shown once; stored hashed)."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedThrottle]
    throttle_scope = "auth"

    class Input(serializers.Serializer):
        username = serializers.CharField()
        password = serializers.CharField(style={"input_type": "password"}, trim_whitespace=False)

    def get_serializer(self, *args: Any, **kwargs: Any) -> serializers.Serializer:
        return self.Input(*args, **kwargs)

    def get_authenticate_header(self, request: Request) -> str:
        # A failed sign-in is a 401 (with a challenge), not a 403.
        return "Token"

    @extend_schema(
        request=Input,
        responses={
            200: inline_serializer("Token", {"token": serializers.CharField()}),
            **error_responses(401),  # a wrong username or password; the view itself authenticates nothing
        },
        auth=[],
    )
    def post(self, request: Request) -> Response:
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        key = token_issue_for_login(request=request, **data.validated_data)
        return Response({"token": key}, status=status.HTTP_200_OK)


class WebsocketTicketView(APIView):
    """A single-use ticket for a WebSocket (``wss://…/ws/v1/…?ticket=…``), valid for 60 seconds:
    for a client that cannot send the token subprotocol. Authenticated and throttled like
    every API endpoint."""

    @extend_schema(
        request=None,
        responses={
            201: inline_serializer(
                "WebsocketTicket",
                {
                    "ticket": serializers.CharField(help_text="Pass it as ?ticket= when opening a WebSocket; once."),
                    "expires_in": serializers.IntegerField(help_text="Seconds it stays valid."),
                },
            )
        },
    )
    def post(self, request: Request) -> Response:
        ticket = ws_ticket_issue(user=request.user)
        return Response({"ticket": ticket, "expires_in": TICKET_SECONDS}, status=status.HTTP_201_CREATED)
