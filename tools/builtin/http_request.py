"""http-request: one HTTP request to a public address, with an optional credential.

The request goes through :func:`tools.net.guarded_request`, which refuses private, loopback and
other internal destinations (also after redirects). Whatever the target answers — 404, 429 or
500 included — is the result; only failing to get an answer is an error.
"""

from __future__ import annotations

import base64
import json
import re
import time
from decimal import Decimal
from email.message import Message
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from django.conf import settings

from core.redaction import secrets_add

from ..errors import CredentialInvalid, FieldErrors, InputInvalid
from ..net import DestinationRefused, destination_check, guarded_request, parse_url_strict
from ..registry import register
from ..schemas import summary
from ..sdk import ASYNC, SYNC, CredentialSlot, ExecutionContext, Tool

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
AUTH_SLOT = "AUTH"
DEFAULT_API_KEY_HEADER = "X-API-Key"
MAX_TIMEOUT_SECONDS = 30
MAX_URL_INPUT_LENGTH = 2048
DEFAULT_TIMEOUT_SECONDS = 10
# The platform sets these itself: a caller's value would contradict the URL or the body.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Leave the platform a moment to record the outcome before its own deadline.
_DEADLINE_MARGIN_SECONDS = 0.5
# Deeper JSON answers are given as text: storing and serialising them would recurse too far.
MAX_JSON_DEPTH = 200


@register
class HttpRequest(Tool):
    slug = "http-request"
    name = "HTTP Request"
    description = (
        "Send one HTTP request to a public URL and return the status code, headers and body. "
        "Private, loopback and cloud-metadata addresses are refused, also after redirects."
    )
    category = "http"
    input_schema = {
        "type": "object",
        "properties": {
            "method": {"type": "string", "enum": list(METHODS), "default": "GET"},
            "url": {
                "type": "string",
                "format": "uri",
                "minLength": 1,
                "maxLength": MAX_URL_INPUT_LENGTH,
                "description": "An absolute http or https URL of a public server.",
            },
            "headers": {
                "type": "object",
                "additionalProperties": {"type": "string", "maxLength": 8192},
                "maxProperties": 100,
                "description": "Request headers. Authorization comes from the AUTH credential when one is mapped.",
            },
            "query": {
                "type": "object",
                "additionalProperties": {"type": ["string", "number", "boolean"]},
                "description": "Query parameters, added to those already in the URL.",
            },
            "json": {"description": "A JSON body (sent as application/json). Give json or body, not both."},
            "body": {"type": "string", "description": "A text body. Give json or body, not both."},
            "timeout_seconds": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": MAX_TIMEOUT_SECONDS,
                "default": DEFAULT_TIMEOUT_SECONDS,
                "description": "How long the whole exchange may take, redirects included.",
            },
        },
        "required": ["url"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {
            "status_code": {"type": "integer"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "json": {"description": "The body, when the answer is JSON."},
            "text": {"type": "string", "description": "The body as text, when it is not JSON."},
            "truncated": {"type": "boolean", "description": "The body was cut at the size limit."},
            "url": {"type": "string", "description": "The URL that answered, after redirects."},
            "elapsed_ms": {"type": "integer"},
        },
        "required": ["status_code", "headers", "truncated", "url", "elapsed_ms"],
    }
    credential_slots = (
        CredentialSlot(
            AUTH_SLOT,
            provider="http",
            kind=("bearer", "api_key", "basic"),
            required=False,
            description="Optional: sent as Authorization: Bearer, an API key header, or Authorization: Basic.",
        ),
    )
    modes = frozenset({SYNC, ASYNC})
    # Only GET and HEAD may answer from the cache, and only once the instance turns it on:
    # whether a URL's answer may be reused is the caller's to say.
    cacheable = True
    cache_by_default = False
    # The request itself has at most 30 s; the rest is room to record the outcome.
    timeout_seconds = MAX_TIMEOUT_SECONDS + 5
    base_credits = Decimal("0.02")
    # A POST may have had its effect before the connection broke: never retried on our own.
    idempotent = False

    def validate(self, inputs: dict[str, Any]) -> None:
        errors = FieldErrors()
        if "json" in inputs and "body" in inputs:
            message = "Give either json or body, not both."
            errors.add("json", message)
            errors.add("body", message)
        try:
            destination_check(parse_url_strict(inputs["url"]))
            if inputs.get("query"):
                parse_url_strict(_with_query(inputs["url"], inputs["query"]))
        except DestinationRefused as exc:
            errors.add("url", exc.reason)
        for name, value in (inputs.get("headers") or {}).items():
            problem = _header_problem(name, value)
            if problem:
                errors.add(f"headers.{name}", problem)
        if errors:
            raise InputInvalid(summary(errors.errors), field_errors=errors.errors)

    def is_cacheable(self, inputs: dict[str, Any]) -> bool:
        return str(inputs.get("method", "GET")).upper() in ("GET", "HEAD")

    def is_cacheable_result(self, output: dict[str, Any]) -> bool:
        return int(output.get("status_code", 500)) < 500  # a server error is not an answer to keep

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        method = inputs.get("method", "GET")
        url = _with_query(inputs["url"], inputs.get("query") or {})
        headers = dict(inputs.get("headers") or {})
        body: bytes | None = None
        if "json" in inputs:
            body = json.dumps(inputs["json"], ensure_ascii=False).encode("utf-8")
            _set_default(headers, "Content-Type", "application/json")
        elif "body" in inputs:
            body = inputs["body"].encode("utf-8")
            _set_default(headers, "Content-Type", "text/plain; charset=utf-8")
        credential_headers: list[str] = []
        if AUTH_SLOT in ctx.credentials:
            auth = _auth_headers(ctx.credential(AUTH_SLOT), ctx.credential_metadata(AUTH_SLOT))
            headers = {k: v for k, v in headers.items() if k.lower() not in {a.lower() for a in auth}}
            headers.update(auth)
            credential_headers = list(auth)

        timeout = float(inputs.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS))
        if ctx.deadline is not None:
            timeout = max(0.1, min(timeout, ctx.deadline - time.monotonic() - _DEADLINE_MARGIN_SECONDS))
        ctx.progress(10, f"Sending the {method} request")
        response = guarded_request(
            method,
            url,
            headers=headers,
            body=body,
            timeout=timeout,
            max_bytes=settings.TOOLEXEC_HTTP_MAX_RESPONSE_BYTES,
            credential_headers=credential_headers,
            check_stop=ctx.check_cancelled,
        )
        result: dict[str, Any] = {
            "status_code": response.status_code,
            "headers": _json_safe(response.headers),
            "truncated": response.truncated,
            "url": response.url,
            "elapsed_ms": response.elapsed_ms,
        }
        result.update(_decoded_body(response.body, response.headers, truncated=response.truncated))
        return result


def _header_problem(name: str, value: str) -> str:
    if not _HEADER_NAME.match(name):
        return "Is not a valid header name."
    if name.lower() in _RESERVED_HEADERS:
        return f"{name} is set from the URL and the body; leave it out."
    if _BAD_HEADER_VALUE.search(value):
        return "The value must not contain line breaks or control characters."
    return ""


def _set_default(headers: dict[str, str], name: str, value: str) -> None:
    if not any(k.lower() == name.lower() for k in headers):
        headers[name] = value


def _query_value(value: str | float | bool) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _with_query(url: str, query: dict[str, Any]) -> str:
    if not query:
        return url
    parts = urlsplit(url)
    extra = urlencode([(name, _query_value(value)) for name, value in query.items()])
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra, fragment=""))


def _auth_headers(secret: dict[str, Any], metadata: dict[str, Any]) -> dict[str, str]:
    """The header the AUTH credential becomes. The secret's shape tells its kind: ``token``
    (bearer), ``api_key`` (sent in the credential's ``metadata.header_name``, X-API-Key by
    default), or ``username`` and ``password``."""
    if secret.get("token"):
        headers = {"Authorization": f"Bearer {secret['token']}"}
    elif secret.get("api_key"):
        headers = {str(metadata.get("header_name") or DEFAULT_API_KEY_HEADER): str(secret["api_key"])}
    elif "username" in secret and "password" in secret:
        username, password = str(secret["username"]), str(secret["password"])
        if ":" in username:
            raise CredentialInvalid("a user name for basic authentication must not contain a colon.", slot=AUTH_SLOT)
        encoded = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        # An echoing server must not hand the encoded pair back in the output.
        secrets_add(encoded)
        headers = {"Authorization": f"Basic {encoded}"}
    else:
        raise CredentialInvalid("it is not a bearer token, an API key or a user name and password.", slot=AUTH_SLOT)
    for name, value in headers.items():
        if not _HEADER_NAME.match(name) or _BAD_HEADER_VALUE.search(value):
            raise CredentialInvalid("it holds characters that cannot be sent in an HTTP header.", slot=AUTH_SLOT)
    return headers


def _content_type(headers: dict[str, str]) -> tuple[str, str | None]:
    message = Message()
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if content_type:
        message["Content-Type"] = content_type
    return message.get_content_type(), message.get_content_charset()


def _is_json(content_type: str) -> bool:
    return content_type in ("application/json", "text/json") or content_type.endswith("+json")


def _decoded_body(body: bytes, headers: dict[str, str], *, truncated: bool) -> dict[str, Any]:
    """``{"json": …}`` for a complete JSON answer that parses, else ``{"text": …}``."""
    content_type, charset = _content_type(headers)
    if _is_json(content_type) and not truncated and body:
        try:
            return {"json": _json_safe(json.loads(body.decode(charset) if charset else body))}
        except (ValueError, LookupError, RecursionError):
            pass  # not JSON after all (or too deep to keep as JSON): given as text
    try:
        text = body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    return {"text": _json_safe(text)}


def _json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with what PostgreSQL cannot store in JSON (NUL, lone surrogates) replaced.

    Raises ValueError for JSON nested deeper than MAX_JSON_DEPTH, which is then given as text.
    """
    if depth > MAX_JSON_DEPTH:
        raise ValueError("nested too deeply")
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", errors="replace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_json_safe(str(k)): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(item, depth + 1) for item in value]
    return value
