"""Secrets stay secret (DESIGN.md §8): a secret planted in a credential turns up in no API
response of a whole flow (JSON or the browsable API's HTML), in no Execution record, in no log
line captured while tools log it or raise errors carrying it, and nowhere in the database but
as ciphertext."""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterable
from typing import Any

import pytest
from django.db import connection
from rest_framework.test import APIClient

from executions.models import Execution
from instances.models import Credential
from tools import registry
from tools.errors import CredentialInvalid, UpstreamError
from tools.sdk import SYNC, CredentialSlot, ExecutionContext, Tool
from tools.services import catalog_sync

pytestmark = pytest.mark.django_db

REDACTED = "[REDACTED]"
SECRET_FIELD = re.compile(r'<textarea name="secret"[^>]*>(?P<value>.*?)</textarea>', re.DOTALL)


# --- test-only tools --------------------------------------------------------------------


class TokenLoggingTool(Tool):
    """A careless tool: logs its token every way it can and puts it in its result."""

    slug = "test-token-logging"
    name = "Careless Drive Logger"
    input_schema = {"type": "object", "properties": {"file_id": {"type": "string"}}}
    credential_slots = (CredentialSlot("OAUTH_TOKEN", provider="google", kind="oauth2"),)
    modes = frozenset({SYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        secret = ctx.credential("OAUTH_TOKEN")
        token = secret["access_token"]
        ctx.logger.debug("Calling Drive with access token %s", token)
        ctx.logger.info("The whole credential: %r", secret)
        ctx.logger.warning("Request headers: Authorization: Bearer " + token)
        logging.getLogger("tests.careless_http_library").debug("POST /token refresh_token=%s", secret["refresh_token"])
        try:
            raise ValueError(f"Drive refused {token}")
        except ValueError:
            ctx.logger.exception("Retrying after an error")
        return {"file_id": inputs.get("file_id"), "token_used": token, "note": f"used {secret['refresh_token']}"}


class TokenInErrorTool(Tool):
    """Fails with its token in the error message: an upstream error, a crash, or a credential error."""

    slug = "test-token-in-error"
    name = "Leaky Drive Reader"
    input_schema = {
        "type": "object",
        "properties": {"file_id": {"type": "string"}, "failure": {"enum": ["upstream", "crash", "invalid"]}},
    }
    credential_slots = (CredentialSlot("OAUTH_TOKEN", provider="google", kind="oauth2"),)
    modes = frozenset({SYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        token = ctx.credential("OAUTH_TOKEN")["access_token"]
        failure = inputs.get("failure", "upstream")
        if failure == "upstream":
            raise UpstreamError(f"Drive answered 401 to the token {token}", provider="google")
        if failure == "invalid":
            raise CredentialInvalid(f"Google rejected the token {token}", provider="google")
        raise RuntimeError(f"unexpected reply while using {token}")


EXTRA_TOOLS = [TokenLoggingTool, TokenInErrorTool]


@pytest.fixture
def tools_here(catalog):
    for tool in EXTRA_TOOLS:
        registry.register(tool)
    catalog_sync()
    yield catalog
    for tool in EXTRA_TOOLS:
        registry.unregister(tool.slug)


@pytest.fixture
def planted() -> dict[str, str]:
    """The secret of the credential every test here plants."""
    return {"access_token": "ya29." + secrets.token_urlsafe(32), "refresh_token": "1//" + secrets.token_urlsafe(32)}


# --- helpers ----------------------------------------------------------------------------


def leaks(text: str | bytes, secret: dict[str, str]) -> list[str]:
    """The values of ``secret``, or 10-character pieces of them, that occur in ``text``."""
    if isinstance(text, bytes):
        text = text.decode()
    found = []
    for value in secret.values():
        core = value.split(".", 1)[-1].split("//", 1)[-1]  # the random part
        found += [core[i : i + 10] for i in range(len(core) - 9) if core[i : i + 10] in text]
    return found


def assert_clean(texts: Iterable[tuple[str, str | bytes]], secret: dict[str, str]) -> None:
    dirty = sorted(where for where, text in texts if leaks(text, secret))
    assert not dirty, f"the secret leaked into: {', '.join(dirty)}"


def create_credential(api: APIClient, secret: dict[str, str]) -> Any:
    return api.post(
        "/api/v1/credentials/",
        {"provider": "google", "kind": "oauth2", "label": "Work Google", "secret": secret},
        format="json",
    )


def create_instance(api: APIClient, tool: str, name: str) -> Any:
    return api.post(
        "/api/v1/instances/", {"tool_definition_id": tool, "workflow_id": "wf-1", "name": name}, format="json"
    )


def configured_instance(api: APIClient, tool: str, mapping: str) -> str:
    """An instance of ``tool`` with its OAUTH_TOKEN slot mapped to ``mapping`` (a provider or an id)."""
    created = create_instance(api, tool, f"{tool} instance")
    assert created.status_code == 201, created.content
    instance_id = created.json()["id"]
    configured = api.post(
        f"/api/v1/instances/{instance_id}/configure-credentials",
        {"credential_mappings": {"OAUTH_TOKEN": mapping}},
        format="json",
    )
    assert configured.status_code == 200, configured.content
    return instance_id


def execute(api: APIClient, instance_id: str, inputs: dict[str, Any]) -> Any:
    return api.post(f"/api/v1/instances/{instance_id}/execute-sync", inputs, format="json")


def whole_database() -> list[tuple[str, str]]:
    """Every row of every table, as JSON text."""
    rows = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT row_to_json(t)::text FROM "{table}" t')
            rows += [(table, row) for (row,) in cursor.fetchall()]
    return rows


def log_texts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    texts = [("caplog.text", caplog.text)]
    for record in caplog.records:
        texts.append((f"{record.name}: message", record.getMessage()))
        if record.exc_info:
            texts.append((f"{record.name}: traceback", logging.Formatter().formatException(record.exc_info)))
    return texts


# --- the whole flow ---------------------------------------------------------------------


def test_planted_secret_appears_in_no_response_record_log_or_column_of_a_whole_flow(api, tools_here, caplog, planted):
    caplog.set_level(logging.DEBUG)
    seen: list[tuple[str, bytes]] = []

    def keep(label: str, response: Any, status: int = 200) -> Any:
        assert response.status_code == status, (label, response.content)
        seen.append((label, response.content))
        return response

    credential_id = keep("create credential", create_credential(api, planted), 201).json()["id"]
    logging_id = configured_instance(api, "test-token-logging", "google")
    error_id = configured_instance(api, "test-token-in-error", credential_id)
    keep(
        "configure again",
        api.post(
            f"/api/v1/instances/{logging_id}/configure-credentials",
            {"credential_mappings": {"OAUTH_TOKEN": credential_id}},
            format="json",
        ),
    )
    for instance_id in (logging_id, error_id):
        readiness = keep("validate", api.get(f"/api/v1/instances/{instance_id}/validate-execution")).json()
        assert readiness["is_ready"] is True, readiness
        keep("instance detail", api.get(f"/api/v1/instances/{instance_id}/"))
        keep("capabilities", api.get(f"/api/v1/instances/{instance_id}/capabilities"))

    ran = keep("execute logging tool", execute(api, logging_id, {"file_id": "f-1"})).json()
    upstream = keep("execute upstream failure", execute(api, error_id, {"failure": "upstream"})).json()
    crash = keep("execute crash", execute(api, error_id, {"failure": "crash"})).json()

    keep("executions list", api.get("/api/v1/executions/"))
    for body in (ran, upstream, crash):
        keep("execution detail", api.get(f"/api/v1/executions/{body['execution_id']}/"))
    keep("credential list", api.get("/api/v1/credentials/"))
    keep("credential detail", api.get(f"/api/v1/credentials/{credential_id}/"))
    keep("credential list page", api.get("/api/v1/credentials/", HTTP_ACCEPT="text/html"))
    keep("credential detail page", api.get(f"/api/v1/credentials/{credential_id}/", HTTP_ACCEPT="text/html"))
    keep("instance run page", api.get(f"/api/v1/instances/{logging_id}/execute-sync", HTTP_ACCEPT="text/html"), 405)

    # The runs happened as expected, with the secret blanked where a tool put it.
    assert ran["success"] is True
    assert ran["data"]["token_used"] == REDACTED
    assert upstream["error_code"] == "UPSTREAM_ERROR"
    assert REDACTED in upstream["error_message"]
    assert crash["error_code"] == "TOOL_ERROR"
    assert b"<html" in seen[-2][1].lower()

    executions = list(Execution.objects.all())
    assert len(executions) == 3
    records = [
        (f"execution {e.pk}", repr({f.name: getattr(e, f.name) for f in Execution._meta.concrete_fields}))
        for e in executions
    ]
    logged = log_texts(caplog)
    assert any(REDACTED in text for _, text in logged), "the tool's log lines were captured, blanked"
    ciphertext = Credential.objects.get(pk=credential_id).secret
    assert ciphertext.startswith("gAAAAA")

    assert_clean(seen, planted)
    assert_clean(records, planted)
    assert_clean(logged, planted)
    assert_clean(whole_database(), planted)


# --- logs -------------------------------------------------------------------------------


def test_a_tool_logging_its_token_through_ctx_logger_logs_it_blanked(api, tools_here, caplog, planted):
    credential_id = create_credential(api, planted).json()["id"]
    instance_id = configured_instance(api, "test-token-logging", credential_id)
    caplog.set_level(logging.DEBUG)

    response = execute(api, instance_id, {"file_id": "f-1"})

    assert response.status_code == 200, response.content
    messages = {r.name: [] for r in caplog.records}
    for record in caplog.records:
        messages[record.name].append(record.getMessage())
    tool_lines = messages["toolexec.tool.test-token-logging"]
    assert "Calling Drive with access token [REDACTED]" in tool_lines
    assert "Request headers: Authorization: Bearer [REDACTED]" in tool_lines
    assert any(line.startswith("The whole credential: ") for line in tool_lines)
    assert any(line.startswith("Retrying after an error") for line in tool_lines)
    assert messages["tests.careless_http_library"] == ["POST /token refresh_token=[REDACTED]"]
    assert_clean(log_texts(caplog), planted)


def test_a_crash_whose_message_holds_the_token_is_logged_blanked(api, tools_here, caplog, planted):
    credential_id = create_credential(api, planted).json()["id"]
    instance_id = configured_instance(api, "test-token-in-error", credential_id)
    caplog.set_level(logging.DEBUG)

    response = execute(api, instance_id, {"failure": "crash"})

    body = response.json()
    assert body["error_code"] == "TOOL_ERROR"
    assert any("RuntimeError" in text for _, text in log_texts(caplog)), "the crash was logged with its traceback"
    assert_clean(log_texts(caplog), planted)
    assert_clean([("response", response.content)], planted)
    execution = Execution.objects.get(pk=body["execution_id"])
    assert_clean([("error_message", execution.error_message), ("metadata", str(execution.error_metadata))], planted)


# --- error messages ---------------------------------------------------------------------


def test_an_upstream_error_holding_the_token_is_recorded_and_answered_blanked(api, tools_here, planted):
    credential_id = create_credential(api, planted).json()["id"]
    instance_id = configured_instance(api, "test-token-in-error", credential_id)

    response = execute(api, instance_id, {"failure": "upstream"})

    body = response.json()
    assert body["error_code"] == "UPSTREAM_ERROR"
    assert body["error_message"].endswith("Drive answered 401 to the token [REDACTED]")
    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.error_message == body["error_message"]
    detail = api.get(f"/api/v1/executions/{execution.pk}/")
    assert_clean([("response", response.content), ("execution detail", detail.content)], planted)


def test_a_credential_error_holding_the_token_leaves_it_nowhere(api, tools_here, caplog, planted):
    caplog.set_level(logging.DEBUG)
    credential_id = create_credential(api, planted).json()["id"]
    instance_id = configured_instance(api, "test-token-in-error", credential_id)

    ran = execute(api, instance_id, {"failure": "invalid"})

    assert ran.json()["error_code"] == "CREDENTIAL_INVALID"
    assert Credential.objects.get(pk=credential_id).status == Credential.Status.ERROR
    responses = [
        ("execute", ran.content),
        ("credential detail", api.get(f"/api/v1/credentials/{credential_id}/").content),
        ("credential list", api.get("/api/v1/credentials/").content),
        ("validate", api.get(f"/api/v1/instances/{instance_id}/validate-execution").content),
        ("refused run", execute(api, instance_id, {"failure": "invalid"}).content),
    ]
    assert_clean(responses, planted)
    assert_clean(log_texts(caplog), planted)
    assert_clean(whole_database(), planted)


# --- execution input_data ---------------------------------------------------------------


def test_secret_looking_inputs_are_redacted_in_the_execution_record(api, tools_here, planted):
    credential_id = create_credential(api, planted).json()["id"]
    instance_id = configured_instance(api, "test-token-logging", credential_id)

    response = execute(
        api,
        instance_id,
        {"file_id": "f-1", "access_token": planted["access_token"], "headers": {"Authorization": "Bearer abc123"}},
    )

    execution_id = response.json()["execution_id"]
    execution = Execution.objects.get(pk=execution_id)
    assert execution.input_data == {
        "file_id": "f-1",
        "access_token": REDACTED,
        "headers": {"Authorization": REDACTED},
    }
    detail = api.get(f"/api/v1/executions/{execution_id}/")
    assert detail.json()["input_data"] == execution.input_data


def test_the_credentials_own_secret_is_redacted_from_inputs_under_any_key(api, tools_here, planted):
    credential_id = create_credential(api, planted).json()["id"]
    instance_id = configured_instance(api, "test-token-logging", credential_id)

    response = execute(api, instance_id, {"file_id": planted["access_token"]})

    execution_id = response.json()["execution_id"]
    assert Execution.objects.get(pk=execution_id).input_data == {"file_id": REDACTED}
    assert_clean(
        [("response", response.content), ("execution detail", api.get(f"/api/v1/executions/{execution_id}/").content)],
        planted,
    )


# --- the browsable API ------------------------------------------------------------------


def test_browsable_api_pages_and_forms_of_a_credential_never_show_its_secret(api, planted):
    created = create_credential(api, planted)
    credential_id = created.json()["id"]
    url = f"/api/v1/credentials/{credential_id}/"
    new_secret = {"access_token": "ya29." + secrets.token_urlsafe(32)}

    pages = [
        ("detail page", api.get(url, HTTP_ACCEPT="text/html")),
        ("list page", api.get("/api/v1/credentials/", HTTP_ACCEPT="text/html")),
        (
            "form post",
            api.post(
                "/api/v1/credentials/",
                {"provider": "google", "kind": "oauth2", "label": "From the form", "secret": json.dumps(planted)},
                format="multipart",
                HTTP_ACCEPT="text/html",
            ),
        ),
        (
            "refused form post",
            api.post(
                "/api/v1/credentials/",
                {"provider": "nowhere", "kind": "oauth2", "label": "x", "secret": json.dumps(planted)},
                format="multipart",
                HTTP_ACCEPT="text/html",
            ),
        ),
        (
            "form patch",
            api.patch(url, {"secret": json.dumps(new_secret)}, format="multipart", HTTP_ACCEPT="text/html"),
        ),
        (
            "refused form patch",
            api.patch(
                url,
                {"secret": json.dumps({"nope": planted["access_token"]})},
                format="multipart",
                HTTP_ACCEPT="text/html",
            ),
        ),
        ("detail page after update", api.get(url, HTTP_ACCEPT="text/html")),
    ]

    statuses = [response.status_code for _, response in pages]
    assert statuses == [200, 200, 201, 400, 200, 400, 200], statuses
    for label, response in pages:
        assert response["Content-Type"].startswith("text/html"), label
        for field in SECRET_FIELD.finditer(response.content.decode()):
            assert field.group("value").strip() in ("", "null"), (label, field.group(0))
    for label in ("detail page", "list page", "detail page after update"):
        assert SECRET_FIELD.search(dict(pages)[label].content.decode()), f"the {label} has a form with a secret field"
    assert_clean([(label, response.content) for label, response in pages], planted)
    assert_clean([(label, response.content) for label, response in pages], new_secret)
    assert Credential.objects.get(pk=credential_id).reveal_secret() == new_secret
