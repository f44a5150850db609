"""POST /api/v1/instances/{id}/execute-async and the jobs API (DESIGN.md §4, §5, §7): the
Idempotency-Key, a queue that is down, refusals in the one envelope, tenant isolation, the
jobs list, query budgets, and no credential secret in Redis.

Real PostgreSQL and Redis (this run's own database index); a real worker process where the
behaviour depends on one. Tests whose requests must really commit (the RQ job is queued on
commit) use ``django_db(transaction=True)``.
"""

from __future__ import annotations

import json
import pickle
import socket
import zlib
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient
from rq import Queue

from core.models import ApiToken
from credits.models import CreditAccount
from executions import events
from executions.models import Execution, Job
from executions.services.enqueue import execution_enqueue
from instances.models import ToolInstance
from instances.selectors import instance_list
from instances.services.credentials import credential_create, instance_configure_credentials
from tests.conftest import wait_for
from tests.test_concurrency import run_together
from tools.models import ToolDefinition
from tools.services import catalog_sync

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

BASE_URL = "https://toolexec.test"  # TOOLEXEC_BASE_URL in tests/settings.py
DEMO = "demo-long-task"  # async only, 0.01 credits a run
QUICK = {"steps": 1, "step_seconds": 0}

# execute-async of a priced tool, measured at 9: auth (1), the instance with its tool and
# account joined (1), readiness (0), the result cache's lookup (2 on a miss, as demo-long-task is
# cacheable: the entry of its key, then why there is none; issue 21), then one transaction:
# BEGIN, hold the credits (UPDATE), INSERT execution, INSERT job (with its cache plan), COMMIT
# (the attempt's writes join it: no savepoint). An Idempotency-Key adds its lookup (1).
EXECUTE_ASYNC_BUDGET = 9
EXECUTE_ASYNC_WITH_KEY_BUDGET = 10


# --- helpers ----------------------------------------------------------------------------


def execute_async(client: APIClient, instance: ToolInstance, inputs: Any, *, key: str | None = None) -> Any:
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post(f"/api/v1/instances/{instance.pk}/execute-async", inputs, format="json", **headers)


def accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.content
    return response.json()


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    """The DESIGN.md §5 envelope with ``code`` at ``status``, in words; returns the body."""
    assert response.status_code == status, response.content
    body = json.loads(response.content)
    assert body["success"] is False
    assert body["error_code"] == code
    message = body["error_message"]
    assert isinstance(message, str) and message.strip()
    assert "{" not in message and "}" not in message, f"an unfilled template: {message}"
    assert "Traceback" not in response.content.decode()
    metadata = body["metadata"]
    assert isinstance(metadata["can_retry"], bool)
    assert isinstance(metadata["action_items"], list)
    return body


def real_redis() -> redis.Redis:
    """This run's Redis database (REDIS_URL), whatever RQ_QUEUES says at the moment."""
    return redis.Redis.from_url(django_settings.REDIS_URL)


def queue_length() -> int:
    return Queue(events.QUEUE_NAME, connection=real_redis()).count


def counts() -> tuple[int, int, int]:
    return Execution.objects.count(), Job.objects.count(), queue_length()


def balance(user) -> Decimal:
    return CreditAccount.objects.get(owner=user).balance


def client_for(user) -> APIClient:
    _, key = ApiToken.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- 1. Idempotency-Key -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_same_key_and_body_replay_the_first_answer_and_create_nothing(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    first = accepted(execute_async(api, instance, QUICK, key="order-42"))
    assert counts() == (1, 1, 1)
    balance_after_first = balance(user)

    again = execute_async(api, instance, QUICK, key="order-42")

    replay = accepted(again)
    assert replay["job_id"] == first["job_id"]
    assert replay["execution_id"] == first["execution_id"]
    assert replay["progress_url"] == first["progress_url"]
    assert again["Idempotent-Replayed"] == "true"
    assert counts() == (1, 1, 1)
    assert balance(user) == balance_after_first  # nothing held a second time


@pytest.mark.django_db(transaction=True)
def test_same_key_with_a_different_body_is_refused_with_idempotency_conflict(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    accepted(execute_async(api, instance, QUICK, key="order-42"))

    response = execute_async(api, instance, {"steps": 2, "step_seconds": 0}, key="order-42")

    body = assert_envelope(response, 409, "IDEMPOTENCY_CONFLICT")
    assert "Idempotency-Key" in body["error_message"]
    assert "different request body" in body["error_message"]
    assert counts() == (1, 1, 1)


@pytest.mark.django_db(transaction=True)
def test_ten_concurrent_requests_with_one_key_make_exactly_one_job(user, make_instance):
    instance = make_instance(DEMO, owner=user)
    _, token = ApiToken.issue(user=user)
    start_balance = balance(user)

    def request(index: int) -> tuple[int, dict[str, Any]]:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        response = execute_async(client, instance, QUICK, key="the-same-key")
        return response.status_code, response.json()

    results = run_together(10, request)

    assert [status for status, _ in results] == [202] * 10, results
    job_ids = {body["job_id"] for _, body in results}
    assert len(job_ids) == 1
    assert counts() == (1, 1, 1)
    assert str(Job.objects.get().pk) == job_ids.pop()
    assert balance(user) == start_balance - Decimal("0.01")  # held once


@pytest.mark.django_db(transaction=True)
def test_another_owner_using_the_same_key_gets_their_own_job(api, other_api, user, other_user, make_instance):
    mine = make_instance(DEMO, owner=user)
    theirs = make_instance(DEMO, owner=other_user)

    first = accepted(execute_async(api, mine, QUICK, key="shared-key"))
    second = accepted(execute_async(other_api, theirs, QUICK, key="shared-key"))

    assert second["job_id"] != first["job_id"]
    assert Job.objects.get(pk=second["job_id"]).owner == other_user
    assert Job.objects.get(pk=first["job_id"]).owner == user
    assert counts() == (2, 2, 2)


@pytest.mark.django_db(transaction=True)
def test_a_key_older_than_24_hours_makes_a_new_job(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    first = accepted(execute_async(api, instance, QUICK, key="daily-report"))
    Execution.objects.filter(pk=first["execution_id"]).update(
        created_at=timezone.now() - timedelta(hours=24, minutes=1)
    )

    second = accepted(execute_async(api, instance, QUICK, key="daily-report"))

    assert second["job_id"] != first["job_id"]
    assert second["status"] == "QUEUED"
    # A new job; not on the queue itself, as the first (identical, still queued) leads their
    # cache key: the second waits for its result (the result cache's single flight, issue 21).
    assert counts() == (2, 2, 1)
    assert str(Job.objects.get(pk=second["job_id"]).follows_id) == first["job_id"]
    # The old run keeps its record; the key now belongs to the new one.
    assert (
        Execution.objects.get(idempotency_key="daily-report").pk == Execution.objects.get(pk=second["execution_id"]).pk
    )


@pytest.mark.django_db(transaction=True)
def test_a_key_just_inside_24_hours_still_replays(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    first = accepted(execute_async(api, instance, QUICK, key="daily-report"))
    Execution.objects.filter(pk=first["execution_id"]).update(
        created_at=timezone.now() - timedelta(hours=23, minutes=59)
    )

    second = accepted(execute_async(api, instance, QUICK, key="daily-report"))

    assert second["job_id"] == first["job_id"]
    assert counts() == (1, 1, 1)


@pytest.mark.django_db(transaction=True)
def test_a_replayed_answer_on_another_instance_never_points_at_urls_that_do_not_exist(api, user, make_instance):
    first_instance = make_instance(DEMO, owner=user, name="first")
    second_instance = make_instance(DEMO, owner=user, name="second")
    accepted(execute_async(api, first_instance, QUICK, key="k-1"))

    response = execute_async(api, second_instance, QUICK, key="k-1")

    # Either the key is refused for a different request, or the answer's links lead to its job.
    if response.status_code == 409:
        assert_envelope(response, 409, "IDEMPOTENCY_CONFLICT")
    else:
        body = accepted(response)
        assert api.get(body["progress_url"]).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_retrying_a_key_after_queue_unavailable_never_accepts_a_dead_job(api, user, make_instance, settings):
    instance = make_instance(DEMO, owner=user)
    real_queues = settings.RQ_QUEUES
    settings.RQ_QUEUES = {"default": {"URL": f"redis://127.0.0.1:{free_port()}/0", "DEFAULT_TIMEOUT": 600}}
    first = assert_envelope(execute_async(api, instance, QUICK, key="retry-me"), 503, "QUEUE_UNAVAILABLE")
    assert first["metadata"]["can_retry"] is True
    settings.RQ_QUEUES = real_queues

    retry = execute_async(api, instance, QUICK, key="retry-me")

    # Either the first answer again (503), or the run queued now that the queue is back; never
    # 202 "accepted" for a job that will not run.
    if retry.status_code == 503:
        assert_envelope(retry, 503, "QUEUE_UNAVAILABLE")
    else:
        body = accepted(retry)
        assert body["status"] == "QUEUED"
        assert Job.objects.get(pk=body["job_id"]).status == Job.Status.QUEUED
        assert queue_length() == 1


# --- 2. Redis down when the job is queued ------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_queue_down_answers_503_and_ends_the_run_failed_with_credits_returned(api, user, make_instance, settings):
    instance = make_instance(DEMO, owner=user)
    start_balance = balance(user)
    port = free_port()
    settings.RQ_QUEUES = {"default": {"URL": f"redis://127.0.0.1:{port}/0", "DEFAULT_TIMEOUT": 600}}
    # django_rq builds the connection from settings on every call (nothing cached): the app
    # really talks to the dead port now.
    assert events.redis().connection_pool.connection_kwargs["port"] == port
    assert events.queue().connection.connection_pool.connection_kwargs["port"] == port

    response = execute_async(api, instance, QUICK)

    body = assert_envelope(response, 503, "QUEUE_UNAVAILABLE")
    assert body["metadata"]["can_retry"] is True
    assert "Demo Long Task" in body["error_message"]
    execution = Execution.objects.get()
    job = Job.objects.get()
    assert body["metadata"]["execution_id"] == str(execution.pk)
    assert body["metadata"]["job_id"] == str(job.pk)
    assert execution.status == Execution.Status.FAILED
    assert execution.error_code == "QUEUE_UNAVAILABLE"
    assert execution.error_message == body["error_message"]
    assert execution.finished_at is not None
    assert job.status == Job.Status.FAILED
    assert job.finished_at is not None
    assert job.sealed_inputs.startswith("gAAAAA")  # a failed job keeps its inputs, sealed, for a retry
    assert not Job.objects.filter(status=Job.Status.QUEUED).exists()
    assert not Execution.objects.filter(status__in=["PENDING", "RUNNING"]).exists()
    assert balance(user) == start_balance
    assert execution.credits_consumed == 0
    instance.refresh_from_db()
    assert (instance.execution_count, instance.success_count, instance.failure_count) == (1, 0, 1)
    assert queue_length() == 0  # nothing reached this run's real Redis either


@pytest.mark.django_db(transaction=True)
def test_queue_down_then_back_the_next_request_is_queued(api, user, make_instance, settings):
    instance = make_instance(DEMO, owner=user)
    real_queues = settings.RQ_QUEUES
    settings.RQ_QUEUES = {"default": {"URL": f"redis://127.0.0.1:{free_port()}/0", "DEFAULT_TIMEOUT": 600}}
    assert_envelope(execute_async(api, instance, QUICK), 503, "QUEUE_UNAVAILABLE")
    settings.RQ_QUEUES = real_queues

    body = accepted(execute_async(api, instance, QUICK))

    assert Job.objects.get(pk=body["job_id"]).status == Job.Status.QUEUED
    assert queue_length() == 1


# --- 3. Refusals in the envelope ----------------------------------------------------------


@pytest.mark.django_db
def test_sync_only_tool_run_async_points_at_execute_sync(api, user, make_instance):
    instance = make_instance("test-priced", owner=user)

    response = execute_async(api, instance, {"units": 1})

    body = assert_envelope(response, 409, "MODE_NOT_SUPPORTED")
    assert body["error_message"] == "Test Priced cannot run async; it supports only sync execution."
    [item] = body["metadata"]["action_items"]
    assert item["action"] == "use_sync"
    assert item["url"] == f"{BASE_URL}/api/v1/instances/{instance.pk}/execute-sync"
    assert item["priority"] == "high"
    assert counts()[:2] == (0, 0)


@pytest.mark.django_db
def test_tool_whose_implementation_is_missing_answers_tool_unavailable(api, user, make_instance):
    definition = ToolDefinition.objects.create(
        slug="vanished-async-tool",
        name="Vanished Async Tool",
        implementation="vanished_plugin.tools.Vanished",
        modes=["async"],
    )
    instance = make_instance(definition.slug, owner=user)
    catalog_sync()  # finds the implementation missing and marks the definition unavailable

    response = execute_async(api, instance, {})

    body = assert_envelope(response, 409, "TOOL_UNAVAILABLE")
    assert "Vanished Async Tool" in body["error_message"]
    assert "vanished_plugin" not in response.content.decode()
    assert [item["action"] for item in body["metadata"]["action_items"]] == ["contact_support"]
    assert counts()[:2] == (0, 0)


@pytest.mark.django_db
def test_disabled_instance_asks_to_be_activated(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    assert api.post(f"/api/v1/instances/{instance.pk}/disable").status_code == 200

    response = execute_async(api, instance, QUICK)

    body = assert_envelope(response, 409, "INSTANCE_DISABLED")
    [item] = body["metadata"]["action_items"]
    assert item["action"] == "activate_instance"
    assert item["url"] == f"{BASE_URL}/api/v1/instances/{instance.pk}/activate"
    assert counts()[:2] == (0, 0)


@pytest.mark.django_db
def test_empty_balance_answers_402_insufficient_credits(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    CreditAccount.objects.filter(owner=user).update(balance=Decimal("0.005"))

    response = execute_async(api, instance, QUICK)

    body = assert_envelope(response, 402, "INSUFFICIENT_CREDITS")
    assert body["error_message"] == (
        "You do not have enough credits to run Demo Long Task: a run costs at least 0.01 and your balance is 0.005."
    )
    assert [item["action"] for item in body["metadata"]["action_items"]] == ["add_credits"]
    assert counts()[:2] == (0, 0)
    assert balance(user) == Decimal("0.005")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("steps", "message"),
    [(0, "Must be at least 1."), ("ten", "Must be of type integer."), (10_001, "Must be at most 10000.")],
)
def test_invalid_inputs_answer_400_naming_the_field(api, user, make_instance, steps, message):
    instance = make_instance(DEMO, owner=user)

    response = execute_async(api, instance, {"steps": steps, "step_seconds": 0})

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert body["metadata"]["field_errors"] == {"steps": [message]}
    assert "steps" in body["error_message"]
    assert counts()[:2] == (0, 0)


@pytest.mark.django_db
def test_a_body_that_is_not_an_object_answers_400(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)

    response = execute_async(api, instance, [1, 2, 3])

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert "(root)" in body["metadata"]["field_errors"]
    assert counts()[:2] == (0, 0)


@pytest.mark.django_db
def test_an_overlong_idempotency_key_answers_400(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)

    response = execute_async(api, instance, QUICK, key="k" * 256)

    body = assert_envelope(response, 400, "INPUT_INVALID")
    assert "Idempotency-Key" in body["metadata"]["field_errors"]
    assert counts()[:2] == (0, 0)


# --- 3. Tenant isolation ----------------------------------------------------------------


@pytest.mark.django_db
def test_running_another_users_instance_answers_404(api, other_api, user, make_instance):
    instance = make_instance(DEMO, owner=user)

    response = execute_async(other_api, instance, QUICK)

    assert_envelope(response, 404, "NOT_FOUND")
    assert counts()[:2] == (0, 0)


@pytest.mark.django_db
def test_another_users_job_is_404_under_their_own_instance_and_under_mine(
    api, other_api, user, other_user, make_instance
):
    mine = make_instance(DEMO, owner=user)
    theirs = make_instance(DEMO, owner=other_user)
    job_id = accepted(execute_async(api, mine, QUICK))["job_id"]

    for instance in (theirs, mine):
        base = f"/api/v1/instances/{instance.pk}/jobs"
        for response in (
            other_api.get(f"{base}/{job_id}/progress"),
            other_api.get(f"{base}/{job_id}/result"),
            other_api.post(f"{base}/{job_id}/cancel"),
            other_api.get(f"{base}/{job_id}/events", HTTP_ACCEPT="text/event-stream"),
            other_api.get(f"{base}/{job_id}"),
        ):
            assert response.status_code == 404, (response.request["PATH_INFO"], response.content)
            assert json.loads(response.content)["error_code"] == "NOT_FOUND"

    assert_envelope(other_api.get(f"/api/v1/instances/{mine.pk}/jobs"), 404, "NOT_FOUND")
    assert other_api.get(f"/api/v1/instances/{theirs.pk}/jobs").json()["results"] == []
    assert Job.objects.get(pk=job_id).status == Job.Status.QUEUED  # the cancel did nothing
    # The owner still reaches it.
    assert api.get(f"/api/v1/instances/{mine.pk}/jobs/{job_id}/progress").status_code == 200


@pytest.mark.django_db
def test_my_job_under_my_other_instance_is_404(api, user, make_instance):
    first = make_instance(DEMO, owner=user, name="first")
    second = make_instance(DEMO, owner=user, name="second")
    job_id = accepted(execute_async(api, first, QUICK))["job_id"]

    response = api.get(f"/api/v1/instances/{second.pk}/jobs/{job_id}/progress")

    assert_envelope(response, 404, "NOT_FOUND")


# --- 3. The jobs list ---------------------------------------------------------------------


def _accept_jobs(instance: ToolInstance, count: int) -> list[str]:
    """``count`` queued jobs through the service (in a test transaction: nothing reaches RQ)."""
    instance = instance_list(owner=instance.owner).get(pk=instance.pk)
    return [str(execution_enqueue(instance=instance, inputs=QUICK).job.pk) for _ in range(count)]


@pytest.mark.django_db
def test_jobs_list_is_newest_first_and_cursor_paginated(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    job_ids = _accept_jobs(instance, 5)

    seen: list[str] = []
    page = api.get(f"/api/v1/instances/{instance.pk}/jobs?page_size=2").json()
    pages = 1
    while True:
        assert len(page["results"]) <= 2
        assert "count" not in page  # keyset pagination: no COUNT(*)
        seen += [job["job_id"] for job in page["results"]]
        if not page["next"]:
            break
        assert "cursor=" in page["next"]
        page = api.get(page["next"]).json()
        pages += 1

    assert seen == list(reversed(job_ids))
    assert pages == 3
    first = api.get(f"/api/v1/instances/{instance.pk}/jobs").json()["results"][0]
    assert first["job_id"] == job_ids[-1]
    assert first["tool_definition_id"] == DEMO
    assert first["status"] == "QUEUED"
    assert first["instance_id"] == str(instance.pk)


@pytest.mark.django_db
def test_jobs_list_of_an_instance_shows_only_its_jobs(api, user, make_instance):
    first = make_instance(DEMO, owner=user, name="first")
    second = make_instance(DEMO, owner=user, name="second")
    first_jobs = _accept_jobs(first, 2)
    _accept_jobs(second, 3)

    results = api.get(f"/api/v1/instances/{first.pk}/jobs").json()["results"]

    assert {job["job_id"] for job in results} == set(first_jobs)


@pytest.mark.django_db
def test_a_bad_cursor_answers_400_in_the_envelope(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)

    response = api.get(f"/api/v1/instances/{instance.pk}/jobs?cursor=not-a-cursor")

    assert_envelope(response, 400, "INPUT_INVALID")


# --- 3. Query budgets ---------------------------------------------------------------------


def _queries(call) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        call()
    return [query["sql"] for query in captured.captured_queries]


@pytest.mark.django_db
def test_jobs_list_costs_the_same_for_3_and_30_jobs(user, make_instance):
    client = client_for(user)
    small = make_instance(DEMO, owner=user, name="small")
    large = make_instance(DEMO, owner=user, name="large")
    _accept_jobs(small, 3)
    _accept_jobs(large, 30)

    few = _queries(lambda: client.get(f"/api/v1/instances/{small.pk}/jobs"))
    many = _queries(lambda: client.get(f"/api/v1/instances/{large.pk}/jobs"))
    print(f"\njobs list: {len(few)} queries for 3 jobs, {len(many)} for 30")

    assert len(few) == len(many), "\n".join(["3 jobs:", *few, "30 jobs:", *many])
    assert len(many) <= 3, many  # auth, the instance exists, the page (with its tool joined)
    assert len(client.get(f"/api/v1/instances/{large.pk}/jobs").json()["results"]) == 30


@pytest.mark.django_db(transaction=True)
def test_execute_async_of_a_priced_tool_stays_within_its_query_budget(api, user, make_instance):
    """Outside a test transaction, as in production; the RQ job is queued on commit."""
    instance = make_instance(DEMO, owner=user)

    queries = _queries(lambda: accepted(execute_async(api, instance, QUICK)))

    print(f"\nexecute-async, priced tool, no key: {len(queries)} queries")
    assert len(queries) <= EXECUTE_ASYNC_BUDGET, "\n".join(queries)
    assert queue_length() == 1


@pytest.mark.django_db(transaction=True)
def test_execute_async_with_an_idempotency_key_stays_within_its_query_budget(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)

    queries = _queries(lambda: accepted(execute_async(api, instance, QUICK, key="budget")))
    replay = _queries(lambda: accepted(execute_async(api, instance, QUICK, key="budget")))
    print(f"\nexecute-async with a key: {len(queries)} queries; its replay: {len(replay)}")

    assert len(queries) <= EXECUTE_ASYNC_WITH_KEY_BUDGET, "\n".join(queries)
    assert len(replay) <= 3, "\n".join(replay)  # auth, the instance, the key's job


@pytest.mark.django_db
def test_progress_and_result_reads_take_a_few_queries(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    job_id = accepted(execute_async(api, instance, QUICK))["job_id"]
    base = f"/api/v1/instances/{instance.pk}/jobs/{job_id}"

    progress = _queries(lambda: api.get(f"{base}/progress"))
    result = _queries(lambda: api.get(f"{base}/result"))
    print(f"\nprogress: {len(progress)} queries, result: {len(result)}")

    assert len(progress) <= 2, progress
    assert len(result) <= 2, result


# --- 6. No secret in Redis ----------------------------------------------------------------


def _redis_blobs(client: redis.Redis) -> list[tuple[bytes, bytes]]:
    """Every key of this run's database with each value it holds, as raw bytes."""
    blobs: list[tuple[bytes, bytes]] = []
    for key in client.scan_iter(count=500):
        kind = client.type(key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                values += [field, value]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, entry in client.xrange(key):
                for field, value in entry.items():
                    values += [field, value]
        blobs.append((key, b""))
        blobs += [(key, value) for value in values]
    return blobs


def _readings(blob: bytes) -> list[bytes]:
    """The blob as stored, decompressed where it is zlib'd (RQ job data), and unpickled where it
    is a pickle (the raw search already sees a pickle's strings; unpickling catches the rest)."""
    readings = [blob]
    try:
        readings.append(zlib.decompress(blob))
    except zlib.error:
        pass  # not compressed: searched as stored
    for reading in list(readings):
        if reading.startswith(b"\x80"):  # the pickle protocol marker
            try:
                readings.append(repr(pickle.loads(reading)).encode())
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, KeyError):
                pass  # not a pickle after all: searched as raw bytes
    return readings


@pytest.mark.django_db(transaction=True)
def test_no_credential_secret_is_written_to_redis_during_an_async_run(rq_worker, api, user, make_instance):
    token = "ya29.PLANTED-secret-4f1c0e9d7b2a"
    credential = credential_create(
        owner=user, provider="google", kind="oauth2", secret={"access_token": token, "refresh_token": token + "-r"}
    )
    instance = make_instance("test-google-sheet", owner=user)
    instance_configure_credentials(instance=instance, mappings={"OAUTH_TOKEN": "google"})
    rq_worker()

    body = accepted(execute_async(api, instance, {"file_id": "sheet-1"}, key="secret-scan"))
    wait_for(lambda: Job.objects.get(pk=body["job_id"]).status in Job.TERMINAL, timeout=30, message="the job to finish")
    api.get(f"/api/v1/instances/{instance.pk}/jobs/{body['job_id']}/result")

    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.status == Execution.Status.COMPLETED, execution.error_message
    assert execution.output_data == {"file_id": "sheet-1"}
    credential.refresh_from_db()
    assert credential.last_used_at is not None  # the worker really decrypted and used it

    blobs = _redis_blobs(real_redis())
    keys = {key for key, _ in blobs}
    assert f"rq:job:{body['job_id']}".encode() in keys  # the scan saw the run's RQ job ...
    job_data = [value for key, value in blobs if key == f"rq:job:{body['job_id']}".encode() and value.startswith(b"x")]
    assert any(
        body["job_id"].encode() in reading for data in job_data for reading in _readings(data)[1:]
    )  # ... and read its data
    secret = token.encode()
    for key, value in blobs:
        assert secret not in key, key
        for reading in _readings(value):
            assert secret not in reading, (key, reading[:200])
