"""The result cache through execute-async (issue 21): a hit answers 202 with a job already
COMPLETED that no worker runs; identical jobs accepted while one runs wait for it (they follow
it) and end from its entry (COLLAPSED), or run themselves when it kept none, however it ended;
a follower whose leader vanished is queued by the reaper; without Redis nothing collapses and
nothing fails; the reaper purges expired entries.

Real PostgreSQL and Redis; a real worker process (``rq_worker``) where a job must run; the
upstream a real local HTTP server (pytest-httpserver) that counts the requests it gets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob

from credits.models import CreditAccount
from executions import events
from executions.models import CacheEntry, Execution, Job
from executions.services.recovery import jobs_reap, jobs_requeue_lost
from instances.models import ToolInstance
from tests.conftest import token_client, wait_for
from tests.test_async_worker import get_result, job_row, wait_status
from tests.test_queue_recovery import PrivateRedis
from tests.test_result_cache import _concurrently, counting, http_instance, url

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

DEMO = "demo-long-task"  # async only, cacheable by default
QUICK = {"steps": 1, "step_seconds": 0}
UPSTREAM_ALLOWED = {"TOOLEXEC_HTTP_ALLOWED_HOSTS": "localhost"}  # in the worker, as ``upstream`` does here
FAST_REAPER = {  # a worker whose reaper queues a lost job 2 s after it was handed to RQ
    "TOOLEXEC_QUEUE_RECOVERY_SECONDS": "2",
    "TOOLEXEC_JOB_STALE_SECONDS": "2",
    "TOOLEXEC_JOB_HEARTBEAT_SECONDS": "1",
}


@pytest.fixture
def private_redis(tmp_path: Any, settings: Any) -> Iterator[PrivateRedis]:
    """A redis-server of the test's own (never the machine's), which the test may kill; RQ,
    the leads and the events of this process use it."""
    server = PrivateRedis(tmp_path)
    server.start()
    settings.RQ_QUEUES = {"default": {**settings.RQ_QUEUES["default"], "URL": server.url}}
    yield server
    server.kill()


def accept(client: APIClient, instance: ToolInstance, body: dict[str, Any], **headers: str) -> Any:
    extra = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()}
    response = client.post(f"/api/v1/instances/{instance.pk}/execute-async", body, format="json", **extra)
    assert response.status_code == 202, response.content
    return response


def rq_has(rq_job_id: str) -> bool:
    try:
        RQJob.fetch(rq_job_id, connection=events.redis())
    except NoSuchJobError:
        return False
    return True


def queued_in_rq() -> list[str]:
    return events.queue().job_ids


def lead_keys() -> list[bytes]:
    return list(events.redis().scan_iter("toolexec:cache:lead:*"))


def balance(user: Any) -> Decimal:
    return CreditAccount.objects.get(owner=user).balance


# --- a hit ------------------------------------------------------------------------------


def test_the_same_body_twice_answers_the_second_job_completed_at_once(api, user, make_instance, upstream, rq_worker):
    seen = counting(upstream)
    instance = http_instance(make_instance, user)
    rq_worker(**UPSTREAM_ALLOWED)
    body = {"url": url(upstream)}

    first = accept(api, instance, body)
    assert first.json()["status"] == "QUEUED"
    assert first.json()["cache"] == {
        "status": "MISS",
        "age_seconds": None,
        "ttl_seconds": 300,
        "source_execution_id": None,
        "miss_reason": "no_entry",
    }
    assert first["Cache-Status"] == 'toolexec; fwd=miss; detail="no_entry"'
    wait_status(first.json()["job_id"], "COMPLETED")

    second = accept(api, instance, body)

    answer = second.json()
    assert answer["status"] == "COMPLETED"
    assert answer["cache"]["status"] == "HIT"
    assert answer["cache"]["source_execution_id"] == first.json()["execution_id"]
    assert second["Cache-Status"].startswith("toolexec; hit; ttl=")
    job = job_row(answer["job_id"])
    # Recorded done, and never handed to RQ, so no worker ran it.
    assert (job.status, job.progress, job.rq_job_id, job.attempts) == ("COMPLETED", 100, "", 0)
    assert not rq_has(answer["job_id"])
    assert len(seen) == 1
    assert (job.execution.cache_hit, str(job.execution.source_execution_id)) == (True, first.json()["execution_id"])
    progress = api.get(f"/api/v1/instances/{instance.pk}/jobs/{answer['job_id']}/progress").json()
    assert (progress["status"], progress["progress"]) == ("COMPLETED", 100)


def test_an_async_hit_shows_its_output_and_cache_in_the_job_result(api, user, make_instance, upstream):
    counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}
    sync = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", body, format="json").json()
    assert sync["cache"]["status"] == "MISS"  # its result is kept, for sync and async runs alike

    hit = accept(api, instance, body).json()
    result = get_result(api, instance, hit["job_id"])

    assert result["status"] == "COMPLETED"
    assert result["result"] == sync["data"]
    assert result["cache"]["status"] == "HIT"
    assert result["cache"]["source_execution_id"] == sync["execution_id"]
    assert result["credits_consumed"] == 0.0


def test_a_replayed_idempotency_key_gives_back_the_hit_job(api, user, make_instance, upstream):
    counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}
    api.post(f"/api/v1/instances/{instance.pk}/execute-sync", body, format="json")

    first = accept(api, instance, body, **{"Idempotency-Key": "k1"}).json()
    again = accept(api, instance, body, **{"Idempotency-Key": "k1"})

    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["job_id"] == first["job_id"]
    assert (again.json()["status"], again.json()["cache"]["status"]) == ("COMPLETED", "HIT")
    assert Job.objects.count() == 1


def test_cache_control_no_store_bypasses_and_no_cache_refreshes(api, user, make_instance, upstream):
    counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}
    api.post(f"/api/v1/instances/{instance.pk}/execute-sync", body, format="json")

    bypassed = accept(api, instance, body, **{"Cache-Control": "no-store"})
    refreshed = accept(api, instance, body, **{"Cache-Control": "no-cache"})

    assert (bypassed.json()["status"], bypassed.json()["cache"]["status"]) == ("QUEUED", "BYPASS")
    assert bypassed["Cache-Status"] == "toolexec; fwd=bypass"
    assert job_row(bypassed.json()["job_id"]).cache_plan["key"] is None  # nothing to keep
    assert (refreshed.json()["status"], refreshed.json()["cache"]["status"]) == ("QUEUED", "REFRESH")
    assert refreshed["Cache-Status"].startswith("toolexec; fwd=request")
    assert job_row(refreshed.json()["job_id"]).cache_plan["key"]["key"] == CacheEntry.objects.get().key
    # Neither follows the other: a bypass takes no lead.
    assert queued_in_rq() == [bypassed.json()["job_id"], refreshed.json()["job_id"]]


def test_a_malformed_max_age_is_refused_naming_the_header(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)

    response = api.post(
        f"/api/v1/instances/{instance.pk}/execute-async", QUICK, format="json", HTTP_CACHE_CONTROL="max-age=later"
    )

    assert response.status_code == 400
    assert "Cache-Control" in response.json()["metadata"]["field_errors"]
    assert not Job.objects.exists()


def test_a_post_is_never_collapsed(api, user, make_instance, upstream):
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream), "method": "POST", "body": "{}"}

    first, second = accept(api, instance, body).json(), accept(api, instance, body).json()

    assert [first["cache"]["miss_reason"], second["cache"]["miss_reason"]] == ["not_cacheable", "not_cacheable"]
    assert queued_in_rq() == [first["job_id"], second["job_id"]]
    assert not lead_keys()


# --- single flight ----------------------------------------------------------------------


def test_two_identical_calls_while_the_first_runs_run_the_tool_once(api, user, make_instance, upstream, rq_worker):
    seen = counting(upstream, delay=1.5)
    instance = http_instance(make_instance, user)
    rq_worker(**UPSTREAM_ALLOWED)
    body = {"url": url(upstream)}
    before = balance(user)

    leader = accept(api, instance, body).json()
    wait_for(lambda: seen, message="the leader to call the upstream")
    follower = accept(api, instance, body).json()

    assert follower["status"] == "QUEUED"
    waiting = job_row(follower["job_id"])
    assert str(waiting.follows_id) == leader["job_id"] and waiting.current_step == "Waiting for an identical run"
    wait_status(leader["job_id"], "COMPLETED")
    done = wait_status(follower["job_id"], "COMPLETED", timeout=10)
    assert len(seen) == 1
    assert not rq_has(follower["job_id"])  # it never went to RQ
    result = get_result(api, instance, follower["job_id"])
    assert result["result"] == get_result(api, instance, leader["job_id"])["result"]
    assert result["cache"]["status"] == "COLLAPSED"
    assert result["cache"]["source_execution_id"] == leader["execution_id"]
    assert (done.progress, done.execution.cache_hit) == (100, True)
    assert done.execution.started_at is not None and done.started_at is not None
    assert str(done.execution.source_execution_id) == leader["execution_id"]
    # The follower's hold came back; it paid the hit price (0), the leader its run.
    assert balance(user) == before - instance.tool.base_credits
    assert CacheEntry.objects.get().hits == 1
    assert not lead_keys()


def test_six_identical_calls_at_once_run_the_tool_once(user, make_instance, upstream, rq_worker):
    seen = counting(upstream, delay=1.5)
    instance = http_instance(make_instance, user)
    rq_worker(**UPSTREAM_ALLOWED)
    clients = [token_client(user) for _ in range(6)]

    accepted = _concurrently(6, lambda i: accept(clients[i], instance, {"url": url(upstream)}).json())

    jobs = [wait_status(body["job_id"], "COMPLETED", timeout=20) for body in accepted]
    assert len(seen) == 1
    assert sorted(job.execution.cache["status"] for job in jobs) == ["COLLAPSED"] * 5 + ["MISS"]
    [leader] = [job for job in jobs if job.follows_id is None]
    assert {str(job.follows_id) for job in jobs if job != leader} == {str(leader.pk)}
    assert len({json.dumps(job.execution.output_data, sort_keys=True) for job in jobs}) == 1


def test_a_sync_call_while_an_async_job_leads_waits_for_its_entry(api, user, make_instance, upstream, rq_worker):
    seen = counting(upstream, delay=1.0)
    instance = http_instance(make_instance, user)
    rq_worker(**UPSTREAM_ALLOWED)
    body = {"url": url(upstream)}

    leader = accept(api, instance, body).json()
    sync = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", body, format="json").json()

    assert sync["cache"]["status"] == "COLLAPSED"
    assert sync["cache"]["source_execution_id"] == leader["execution_id"]
    assert len(seen) == 1


def test_when_the_leader_keeps_nothing_its_follower_runs_itself(api, user, make_instance, upstream, rq_worker):
    seen = counting(upstream, delay=1.0, status=503)
    instance = http_instance(make_instance, user)
    rq_worker(**UPSTREAM_ALLOWED)
    body = {"url": url(upstream)}

    leader = accept(api, instance, body).json()
    follower = accept(api, instance, body).json()
    assert str(job_row(follower["job_id"]).follows_id) == leader["job_id"]

    wait_status(leader["job_id"], "COMPLETED")
    wait_status(follower["job_id"], "COMPLETED", timeout=15)
    assert len(seen) == 2
    for job_id in (leader["job_id"], follower["job_id"]):
        result = get_result(api, instance, job_id)
        assert result["result"]["status_code"] == 503  # the upstream's error: not an answer to keep
        assert (result["cache"]["status"], result["cache"]["miss_reason"]) == ("MISS", "failed")
    assert not CacheEntry.objects.exists()


def test_a_leader_cancelled_while_running_lets_its_follower_run(api, user, make_instance, rq_worker):
    instance = make_instance(DEMO, owner=user)
    rq_worker()
    body = {"steps": 20, "step_seconds": 0.2}
    leader = accept(api, instance, body).json()
    wait_status(leader["job_id"], "RUNNING")
    follower = accept(api, instance, body).json()
    assert str(job_row(follower["job_id"]).follows_id) == leader["job_id"]

    response = api.post(f"/api/v1/instances/{instance.pk}/jobs/{leader['job_id']}/cancel")
    assert response.status_code == 202

    wait_status(leader["job_id"], "CANCELLED")
    done = wait_status(follower["job_id"], "COMPLETED", timeout=20)
    assert done.attempts == 1  # it ran itself
    assert done.execution.output_data == {"steps_completed": 20, "seconds": 4.0}
    assert (done.execution.cache["status"], done.execution.cache_hit) == ("MISS", False)
    assert get_result(api, instance, leader["job_id"])["cache"]["miss_reason"] == "failed"


def test_a_queued_leader_cancelled_hands_its_follower_to_rq_and_its_lead_ends(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    leader = accept(api, instance, QUICK).json()
    follower = accept(api, instance, QUICK).json()
    assert queued_in_rq() == [leader["job_id"]]

    assert api.post(f"/api/v1/instances/{instance.pk}/jobs/{leader['job_id']}/cancel").status_code == 202

    assert queued_in_rq() == [follower["job_id"]]
    job = job_row(follower["job_id"])
    assert (job.status, job.current_step) == ("QUEUED", "")
    # The lead ended with the leader: the next identical call leads itself.
    third = accept(api, instance, QUICK).json()
    assert job_row(third["job_id"]).follows_id is None
    assert queued_in_rq() == [follower["job_id"], third["job_id"]]


def test_a_leader_whose_worker_is_lost_hands_its_follower_to_rq(api, user, make_instance, settings):
    instance = make_instance(DEMO, owner=user)
    leader = accept(api, instance, QUICK).json()
    follower = accept(api, instance, QUICK).json()
    stale = timezone.now() - timedelta(seconds=settings.TOOLEXEC_JOB_STALE_SECONDS + 5)
    Job.objects.filter(pk=leader["job_id"]).update(status=Job.Status.RUNNING, started_at=stale, heartbeat_at=stale)
    Execution.objects.filter(pk=leader["execution_id"]).update(status=Execution.Status.RUNNING)

    assert jobs_reap()["lost"] == 1

    assert job_row(leader["job_id"]).status == "FAILED"
    assert follower["job_id"] in queued_in_rq()
    assert not lead_keys()


def test_a_follower_whose_leader_vanished_is_queued_by_the_reaper_and_runs(api, user, make_instance, rq_worker):
    instance = make_instance(DEMO, owner=user)
    leader = accept(api, instance, QUICK).json()
    follower = accept(api, instance, QUICK).json()
    waiting = job_row(follower["job_id"])
    assert waiting.rq_job_id and waiting.enqueued_at  # what the reaper needs to find it
    # Waiting on purpose while its leader is queued: the reaper leaves it alone.
    assert jobs_requeue_lost(now=timezone.now() + timedelta(hours=1)) == 0

    # The leader vanishes: it ends without settling its followers, its lead gone with it.
    Job.objects.filter(pk=leader["job_id"]).update(status=Job.Status.FAILED, finished_at=timezone.now())
    Execution.objects.filter(pk=leader["execution_id"]).update(status=Execution.Status.FAILED)
    events.redis().delete(*lead_keys())
    rq_worker(**FAST_REAPER)

    done = wait_status(follower["job_id"], "COMPLETED", timeout=20)
    assert done.attempts == 1
    assert [entry["event"] for entry in done.attempt_log if "event" in entry] == ["queue_lost"]
    assert done.execution.output_data == {"steps_completed": 1, "seconds": 0.0}
    assert job_row(leader["job_id"]).attempts == 0  # its RQ delivery found it ended and ran nothing


def test_a_follower_whose_leader_row_was_deleted_is_queued_by_the_reaper(api, user, make_instance):
    instance = make_instance(DEMO, owner=user)
    leader = accept(api, instance, QUICK).json()
    follower = accept(api, instance, QUICK).json()

    Execution.objects.filter(pk=leader["execution_id"]).delete()  # and its job with it

    assert job_row(follower["job_id"]).follows_id is None
    assert jobs_requeue_lost(now=timezone.now() + timedelta(hours=1)) == 1
    assert follower["job_id"] in queued_in_rq()


# --- without Redis ----------------------------------------------------------------------


def test_with_redis_down_a_hit_still_answers_and_a_miss_is_refused_in_the_envelope(
    api, user, make_instance, upstream, private_redis
):
    counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}
    private_redis.kill()
    # A sync run keeps its result without Redis (it just cannot collapse).
    assert api.post(f"/api/v1/instances/{instance.pk}/execute-sync", body, format="json").status_code == 200

    hit = accept(api, instance, body)
    miss = api.post(f"/api/v1/instances/{instance.pk}/execute-async", {"url": url(upstream, "/other")}, format="json")

    assert (hit.json()["status"], hit.json()["cache"]["status"]) == ("COMPLETED", "HIT")
    assert miss.status_code == 503
    assert miss.json()["error_code"] == "QUEUE_UNAVAILABLE"
    failed = Job.objects.get(pk=miss.json()["metadata"]["job_id"])
    assert (failed.status, failed.follows_id) == ("FAILED", None)


def test_a_lead_lost_with_redis_collapses_nothing_and_fails_nothing(api, user, make_instance, private_redis):
    instance = make_instance(DEMO, owner=user)
    first = accept(api, instance, QUICK).json()
    private_redis.restart_empty()  # the first job's lead and its RQ job are gone

    second = accept(api, instance, QUICK).json()

    assert job_row(second["job_id"]).follows_id is None
    assert private_redis.queue().job_ids == [second["job_id"]]
    assert first["job_id"] != second["job_id"]


# --- purge ------------------------------------------------------------------------------


def test_the_reaper_purges_expired_entries_only(api, user, make_instance):
    instance = make_instance("json-transform", owner=user)
    for data in (1, 2):
        body = {"expression": "a", "data": {"a": data}}
        assert api.post(f"/api/v1/instances/{instance.pk}/execute-sync", body, format="json").status_code == 200
    expired, live = CacheEntry.objects.order_by("created_at")
    CacheEntry.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    counts = jobs_reap()

    assert counts["cache_purged"] == 1
    assert list(CacheEntry.objects.values_list("pk", flat=True)) == [live.pk]
    assert jobs_reap()["cache_purged"] == 0
