"""How many SQL queries the hot paths make: a sync run is a handful, and lists cost the same
whatever their length (no N+1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from core.models import ApiToken
from executions.models import Execution
from executions.services.sync import execution_run_sync
from instances.models import ToolInstance
from instances.selectors import instance_list
from tests.factories import UserFactory
from tools.models import ToolDefinition

# Counted as Django sees them, BEGIN and COMMIT included (each is a round trip), outside a test
# transaction as in production. The same writes run on PostgreSQL and SQLite.
#
# A free tool: the token with its user; the instance with its tool and the owner's credit
# account; the attempt (INSERT, alone: nothing to commit with it); the outcome in one
# transaction (BEGIN, the execution, the instance's statistics, COMMIT).
SYNC_RUN_BUDGET = 7
# A priced run holds its minimum price with the attempt in one transaction (BEGIN, the hold,
# the INSERT, COMMIT), so concurrent runs can't spend the same credits, and its outcome
# transaction adds the ledger entry.
PRICED_RUN_BUDGET = 11
# Priced by usage beyond the hold: the outcome also settles the rest on the balance.
USAGE_PRICED_RUN_BUDGET = 12
# A run of a cacheable tool (json-transform) also looks the result cache up (the entry of its
# key; on a miss, the newest entry of the same request, to say why) and keeps its
# result (one upsert, committed with the outcome).
CACHE_MISS_EXTRA = 3
# Answered from the cache: the token, the instance, the entry; then one transaction (BEGIN,
# the execution, recorded COMPLETED, the instance's statistics, the entry's hit count, COMMIT).
# Neither the tool nor its thread runs.
CACHE_HIT_BUDGET = 8
# Refused before anything is recorded: the token, the instance.
REFUSED_RUN_BUDGET = 2

pytestmark = pytest.mark.django_db


def _queries_of(call: Callable[[], object]) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        call()
    return [query["sql"] for query in captured.captured_queries]


def _assert_same_count(small: list[str], large: list[str]) -> None:
    assert len(small) == len(large), (
        f"{len(small)} queries for the short list, {len(large)} for the long one.\n"
        "short:\n  " + "\n  ".join(small) + "\nlong:\n  " + "\n  ".join(large)
    )


def _ok(response) -> dict:
    assert response.status_code == 200, response.content
    return response.json()


def _client_for(user) -> APIClient:
    _, key = ApiToken.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def _assert_length(response, expected: int) -> None:
    assert len(_ok(response)["results"]) == expected


def _executions_of(instance: ToolInstance, count: int, inputs: dict) -> None:
    instance = instance_list(owner=instance.owner).get(pk=instance.pk)
    for _ in range(count):
        _, outcome = execution_run_sync(instance=instance, inputs=inputs)
        assert outcome.error is None, outcome.error


# --- A sync run -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_sync_run_of_a_free_tool_stays_within_its_budget(api, user, make_instance, django_assert_num_queries):
    instance = make_instance("test-noop", owner=user)

    with django_assert_num_queries(SYNC_RUN_BUDGET):
        response = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", {"echo": "hi"}, format="json")

    assert _ok(response)["data"] == {"echo": "hi"}


@pytest.mark.django_db(transaction=True)
def test_sync_run_of_a_priced_tool_stays_within_its_budget(api, user, make_instance, django_assert_num_queries):
    instance = make_instance("json-transform", owner=user)

    with django_assert_num_queries(PRICED_RUN_BUDGET + CACHE_MISS_EXTRA):
        response = api.post(
            f"/api/v1/instances/{instance.pk}/execute-sync", {"expression": "a", "data": {"a": 1}}, format="json"
        )

    body = _ok(response)
    assert body["data"] == {"result": 1}
    assert body["credits_consumed"] == pytest.approx(0.01)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_sync_run_answered_from_the_cache_stays_within_its_budget(api, user, make_instance, django_assert_num_queries):
    instance = make_instance("json-transform", owner=user)
    path, body = f"/api/v1/instances/{instance.pk}/execute-sync", {"expression": "a", "data": {"a": 1}}
    assert _ok(api.post(path, body, format="json"))["cache"]["status"] == "MISS"

    with django_assert_num_queries(CACHE_HIT_BUDGET):
        response = api.post(path, body, format="json")

    assert _ok(response)["cache"]["status"] == "HIT"
    assert _ok(response)["data"] == {"result": 1}


@pytest.mark.django_db(transaction=True)
def test_sync_run_with_usage_pricing_stays_within_its_budget(api, user, make_instance, django_assert_num_queries):
    instance = make_instance("test-priced", owner=user)

    with django_assert_num_queries(USAGE_PRICED_RUN_BUDGET):
        response = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", {"units": 2}, format="json")

    assert _ok(response)["credits_consumed"] == pytest.approx(1.01)


def test_priced_sync_run_inside_a_transaction_uses_savepoints_not_more_statements(
    api, user, make_instance, django_assert_max_num_queries
):
    """Inside a test transaction the outcome's BEGIN and COMMIT become a savepoint and its
    release, and the hold joins the surrounding transaction: never more than in production."""
    instance = make_instance("json-transform", owner=user)

    with django_assert_max_num_queries(PRICED_RUN_BUDGET + CACHE_MISS_EXTRA):
        response = api.post(
            f"/api/v1/instances/{instance.pk}/execute-sync", {"expression": "a", "data": {"a": 1}}, format="json"
        )

    assert _ok(response)["success"] is True


def test_refused_run_is_cheaper_than_a_run(api, user, make_instance, django_assert_max_num_queries):
    instance = make_instance("test-noop", owner=user)
    ToolInstance.objects.filter(pk=instance.pk).update(status=ToolInstance.Status.DISABLED)

    with django_assert_max_num_queries(REFUSED_RUN_BUDGET):
        response = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", {}, format="json")

    assert response.status_code == 409
    assert response.json()["error_code"] == "INSTANCE_DISABLED"


# --- Lists ------------------------------------------------------------------------------


TOOLS_FOR_LISTS = ["test-noop", "json-transform", "test-priced", "test-google-sheet"]


def _instances(make_instance, owner, count: int) -> list[ToolInstance]:
    return [
        make_instance(TOOLS_FOR_LISTS[i % len(TOOLS_FOR_LISTS)], owner=owner, name=f"instance {i}")
        for i in range(count)
    ]


def test_instance_list_takes_the_same_queries_for_3_or_30_instances(make_instance):
    few_owner, many_owner = UserFactory(), UserFactory()
    _instances(make_instance, few_owner, 3)
    _instances(make_instance, many_owner, 30)
    few, many = _client_for(few_owner), _client_for(many_owner)

    small = _queries_of(lambda: _assert_length(few.get("/api/v1/instances/"), 3))
    large = _queries_of(lambda: _assert_length(many.get("/api/v1/instances/"), 30))

    _assert_same_count(small, large)
    assert len(small) <= 3, small


def _run_many(make_instance, owner, count: int) -> None:
    inputs = {
        "test-noop": {"echo": "x"},
        "json-transform": {"expression": "a", "data": {"a": 1}},
        "test-priced": {"units": 1},
    }
    slugs = list(inputs)
    instances = [make_instance(slug, owner=owner) for slug in slugs]
    for i in range(count):
        instance = instances[i % len(instances)]
        _executions_of(instance, 1, inputs[slugs[i % len(slugs)]])


def test_execution_list_takes_the_same_queries_for_3_or_30_executions(make_instance):
    few_owner, many_owner = UserFactory(), UserFactory()
    _run_many(make_instance, few_owner, 3)
    _run_many(make_instance, many_owner, 30)
    assert Execution.objects.filter(owner=many_owner).count() == 30
    few, many = _client_for(few_owner), _client_for(many_owner)

    small = _queries_of(lambda: _assert_length(few.get("/api/v1/executions/"), 3))
    large = _queries_of(lambda: _assert_length(many.get("/api/v1/executions/"), 30))

    _assert_same_count(small, large)
    assert len(small) <= 3, small


def test_filtered_execution_list_is_constant_too(make_instance):
    few_owner, many_owner = UserFactory(), UserFactory()
    _run_many(make_instance, few_owner, 3)
    _run_many(make_instance, many_owner, 30)
    few, many = _client_for(few_owner), _client_for(many_owner)

    small = _queries_of(lambda: _ok(few.get("/api/v1/executions/", {"status": "completed", "mode": "sync"})))
    large = _queries_of(lambda: _ok(many.get("/api/v1/executions/", {"status": "completed", "mode": "sync"})))

    _assert_same_count(small, large)


def test_validate_execution_takes_the_same_queries_whatever_the_tool_and_history(user, api, make_instance):
    quiet = make_instance("test-noop", owner=user)
    busy = make_instance("test-priced", owner=user)
    _executions_of(busy, 30, {"units": 1})
    needs_account = make_instance("test-google-sheet", owner=user)  # a DRAFT missing its credential

    counts = {}
    for instance in (quiet, busy, needs_account):
        queries = _queries_of(lambda i=instance: _ok(api.get(f"/api/v1/instances/{i.pk}/validate-execution")))
        counts[instance.tool.slug] = (len(queries), queries)
        queries = _queries_of(
            lambda i=instance: _ok(api.get(f"/api/v1/instances/{i.pk}/validate-execution", {"mode": "async"}))
        )
        counts[instance.tool.slug + "?mode=async"] = (len(queries), queries)

    assert len({n for n, _ in counts.values()}) == 1, counts
    assert counts["test-noop"][0] <= 3, counts["test-noop"][1]


def test_tools_list_takes_the_same_queries_for_few_or_many_tools(api):
    before = ToolDefinition.objects.filter(is_active=True).count()
    small = _queries_of(lambda: _ok(api.get("/api/v1/tools/")))

    for n in range(30):
        ToolDefinition.objects.create(
            slug=f"extra-tool-{n}",
            name=f"Extra tool {n}",
            implementation=f"extra.Tool{n}",
            modes=["sync"],
            credential_slots=[
                {
                    "name": "KEY",
                    "provider": "http",
                    "kinds": ["api_key"],
                    "scopes": [],
                    "required": True,
                    "description": "",
                }
            ],
        )
    large_body: list = []
    large = _queries_of(lambda: large_body.extend(_ok(api.get("/api/v1/tools/"))))

    assert len(large_body) == before + 30
    _assert_same_count(small, large)
    assert len(small) <= 2, small


def test_tool_detail_takes_two_queries(api, django_assert_num_queries):
    with django_assert_num_queries(2):
        _ok(api.get("/api/v1/tools/json-transform/"))


# A worker's side of an async run of a free tool. The claim, one transaction: BEGIN, the job
# loaded with its execution, tool, instance, owner and credit account while it locks the job's
# row and the owner's, the job's claim (conditional on the count of the owner's running jobs,
# in the same statement), its execution's start, COMMIT. Credentials: none. The outcome, one
# transaction: BEGIN, the job (with its last report and attempt log), the execution, the
# instance's statistics, COMMIT.
JOB_CLAIM_BUDGET = 5
JOB_OUTCOME_BUDGET = 5


def _sql(captured: CaptureQueriesContext) -> str:
    return "\n".join(q["sql"][:160] for q in captured.captured_queries)


@pytest.mark.django_db(transaction=True)
def test_a_worker_runs_a_free_job_within_its_budget(api, user, make_instance):
    from executions.models import Job
    from executions.services.jobs import job_run

    instance = make_instance("test-noop", owner=user)
    job_id = api.post(f"/api/v1/instances/{instance.pk}/execute-async", {}, format="json").json()["job_id"]

    with CaptureQueriesContext(connection) as captured:
        job_run(job_id=job_id, worker_name="budget")

    assert Job.objects.get(pk=job_id).status == Job.Status.COMPLETED
    assert len(captured) == JOB_CLAIM_BUDGET + JOB_OUTCOME_BUDGET, _sql(captured)
