"""The OpenAPI schema is a contract (issue 19): every operation of the live /api/schema/, driven
in-process as a signed-in user with generated and malformed requests, answers no 5xx, no status
the schema does not document, and every body as its documented schema says.

Schemathesis makes one test per operation from the schema and generates its requests (valid
and invalid ones, from a fixed seed, a few per operation). Path parameters name, about half the
time, objects that exist (an instance of several tools, a job in each state, a credential, a
file, an execution), so what real objects answer is checked too, not only 404s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import schemathesis
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis.config import SchemathesisConfig

from core.errors import ErrorCode, envelope
from core.models import ApiToken
from executions.models import Execution, Job
from tests.tools import ExplodingTool, GoogleSheetTool, NoopTool, PricedTool, UpstreamFailingTool

SEED = 19
EXAMPLES_PER_OPERATION = 12
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance"]

# The live schema, as /api/schema/ serves it, fetched through the project's WSGI application
# when the module is collected; requests go to the same application, in this process.
schema = schemathesis.openapi.from_wsgi(
    "/api/schema/",
    WSGIHandler(),
    config=SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {"mode": "all", "max-examples": EXAMPLES_PER_OPERATION, "database": "none"},
            # Fuzzing, and the coverage phase's deterministic boundary and malformed cases (a
            # bounded set, derived from the schema). No stateful phase: the schema declares no links.
            "phases": {"stateful": {"enabled": False}},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        }
    ),
)

# The objects the running test made (``real_objects``), which generated paths may name.
_REAL: dict[str, Any] = {}


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> st.SearchStrategy:
    real = _real_path_parameters(context.operation.path, context.operation.method.upper())
    return st.one_of(st.just(path_parameters), st.sampled_from(real)) if real else st.just(path_parameters)


def _real_path_parameters(path: str, method: str) -> list[dict[str, Any]]:
    if path.endswith("/jobs/{id}/events/"):
        # Never a real job: its stream holds the request open until the job ends, and no job
        # here ever runs. The stream is tested with a live worker (tests/test_job_progress.py);
        # here the operation answers for absent and malformed ids.
        return []
    if "/jobs/{id}/" in path:
        return [{"instance_id": instance, "id": job} for instance, job in _REAL["jobs"]]
    if "{instance_id}" in path:
        return [{"instance_id": instance} for instance in _REAL["instances"]]
    kind = path.split("/")[3]  # /api/v1/<kind>/{id}/…
    pool = _REAL["disposable"] if method == "DELETE" else _REAL
    name = "slug" if kind == "tools" else "id"
    return [{name: value} for value in pool.get(kind, [])]


@contextmanager
def in_test_transaction() -> Iterator[None]:
    """As Django's test client does around each request: a request through the WSGI
    application must not close the database connection, which holds the test's transaction."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def unthrottled(settings: Any) -> None:
    """Hundreds of requests a minute would otherwise all answer 429 after the first 1,200 and hide
    what is behind them. Throttling has its own tests (tests/test_throttling.py); the sign-in
    endpoint keeps its low rate here, so 429 is still checked against the schema."""
    rates = {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "1000000/min"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}


@pytest.fixture
def token(user: Any) -> str:
    _, key = ApiToken.issue(user=user)
    return key


@pytest.fixture
def real_objects(api: APIClient, catalog: Any) -> Iterator[None]:
    """``api``'s user's objects, made through the API; DELETE gets ``disposable`` ones, so the
    other operations still find theirs."""

    def instance(tool: Any, name: str = "contract") -> str:
        body = {"tool_definition_id": tool.slug, "name": name}
        return _answer(api.post("/api/v1/instances/", body, format="json"), 201)["id"]

    def credential() -> str:
        body = {"provider": "google", "kind": "oauth2", "label": "contract", "secret": {"access_token": "t0k3n"}}
        return _answer(api.post("/api/v1/credentials/", body, format="json"), 201)["id"]

    def upload() -> str:
        file = SimpleUploadedFile("people.csv", b"name\nAda\n", "text/csv")
        return _answer(api.post("/api/v1/files/", {"file": file}, format="multipart"), 201)["id"]

    def run(instance: str, mode: str, inputs: dict[str, Any]) -> dict[str, Any]:
        url = f"/api/v1/instances/{instance}/execute-{mode}"
        return _answer(api.post(url, inputs, format="json"), 202 if mode == "async" else 200)

    noop, sheet, disabled = instance(NoopTool), instance(GoogleSheetTool), instance(NoopTool, "disabled")
    pinned = credential()
    mappings = {"credential_mappings": {"OAUTH_TOKEN": pinned}}
    _answer(api.post(f"/api/v1/instances/{sheet}/configure-credentials", mappings, format="json"), 200)
    _answer(api.post(f"/api/v1/instances/{disabled}/disable"), 200)
    queued, completed, failed, cancelled = (run(noop, "async", {"echo": str(n)}) for n in range(4))
    _end(completed, Job.Status.COMPLETED, output_data={"echo": "1"}, duration_ms=12)
    failure = envelope(ErrorCode.UPSTREAM_ERROR, {"tool": NoopTool.name, "provider": "Google", "detail": "503"})
    _end(
        failed,
        Job.Status.FAILED,
        error_code=failure["error_code"],
        error_message=failure["error_message"],
        error_metadata=failure["metadata"],
        duration_ms=40,
    )
    _answer(api.post(f"/api/v1/instances/{noop}/jobs/{cancelled['job_id']}/cancel"), 202)
    runs = [queued, completed, failed, cancelled]

    _REAL.update(
        {
            "tools": [NoopTool.slug, ExplodingTool.slug, "json-transform"],
            "instances": [noop, sheet, disabled, instance(ExplodingTool), instance(UpstreamFailingTool)]
            + [instance(PricedTool)],
            "jobs": [(noop, accepted["job_id"]) for accepted in runs],
            "credentials": [pinned, credential()],
            "files": [upload()],
            "executions": [accepted["execution_id"] for accepted in runs]
            + [run(noop, "sync", {"echo": "now"})["execution_id"]],
            "disposable": {
                "instances": [instance(NoopTool, "doomed")],
                "credentials": [pinned, credential()],  # deleting the pinned one answers 409
                "files": [upload()],
            },
        }
    )
    yield
    _REAL.clear()


def _answer(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    return response.json()


def _end(accepted: dict[str, Any], status: str, **execution: Any) -> None:
    """Ends an accepted job as a worker records the end."""
    now = timezone.now()
    Job.objects.filter(pk=accepted["job_id"]).update(status=status, progress=100, finished_at=now)
    Execution.objects.filter(pk=accepted["execution_id"]).update(status=status, finished_at=now, **execution)


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_operation_answers_as_the_schema_documents(
    case: Any, token: str, real_objects: None, unthrottled: None
) -> None:
    with in_test_transaction():
        case.call_and_validate(headers={"Authorization": f"Token {token}"})
