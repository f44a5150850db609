"""The result cache through execute-sync (issue 21): a repeated run answers from the cache
without running the tool, never across owners or credentials, never past its TTL, honouring
Cache-Control, collapsing concurrent identical runs, and saying why it hit or missed. The
upstream is a real local HTTP server (pytest-httpserver) that counts the requests it gets."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from credits.models import CreditAccount, CreditLedgerEntry
from executions.models import CacheEntry, Execution
from instances.models import Credential, ToolInstance
from instances.services.credentials import credential_create, credential_update, instance_configure_credentials
from tests.conftest import token_client
from tests.factories import UserFactory
from tools.models import ToolDefinition

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

SECRET = "planted-secret-7d1f0c"


def url(server: HTTPServer, path: str = "/data") -> str:
    return f"http://localhost:{server.port}{path}"


def counting(server: HTTPServer, path: str = "/data", *, delay: float = 0, status: int = 200) -> list[Request]:
    """Answer ``path`` with JSON, after ``delay``; the requests seen."""
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        time.sleep(delay)
        return Response(json.dumps({"n": len(seen)}), status=status, content_type="application/json")

    server.expect_request(path).respond_with_handler(handler)
    return seen


def http_instance(make_instance: Any, owner: Any, *, ttl: int | None = None) -> ToolInstance:
    instance = make_instance("http-request", owner=owner)
    ToolInstance.objects.filter(pk=instance.pk).update(cache_enabled=True, cache_ttl_seconds=ttl)
    instance.refresh_from_db()
    return instance


def run(api: Any, instance: ToolInstance, body: dict[str, Any], **headers: str) -> Any:
    extra = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()}
    response = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", body, format="json", **extra)
    assert response.status_code == 200, response.content
    return response


def cache_of(response: Any) -> dict[str, Any]:
    return response.json()["cache"]


def test_the_same_body_twice_answers_the_second_from_the_cache(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}

    first = run(api, instance, body)
    second = run(api, instance, body)

    assert len(seen) == 1
    assert cache_of(first) == {
        "status": "MISS",
        "age_seconds": None,
        "ttl_seconds": 300,
        "source_execution_id": None,
        "miss_reason": "no_entry",
    }
    assert first["Cache-Status"] == 'toolexec; fwd=miss; stored; detail="no_entry"'
    hit = cache_of(second)
    assert hit["status"] == "HIT" and hit["source_execution_id"] == first.json()["execution_id"]
    assert 0 <= hit["age_seconds"] <= 2 and 298 <= hit["ttl_seconds"] <= 300 and hit["miss_reason"] is None
    assert second["Cache-Status"].startswith("toolexec; hit; ttl=")
    assert second.json()["data"] == first.json()["data"]
    assert second.json()["credits_consumed"] == 0.0
    recorded = Execution.objects.get(pk=second.json()["execution_id"])
    assert (recorded.status, recorded.cache_hit, str(recorded.source_execution_id)) == (
        "COMPLETED",
        True,
        first.json()["execution_id"],
    )
    assert recorded.cache["status"] == "HIT"
    instance.refresh_from_db()
    assert (instance.execution_count, instance.success_count) == (2, 2)
    entry = CacheEntry.objects.get()
    assert (entry.hits, entry.source_execution_id) == (1, recorded.source_execution_id)


def test_a_hit_costs_the_hit_price_with_its_own_ledger_line(api, user, make_instance, upstream, settings):
    settings.TOOLEXEC_CACHE_HIT_CREDITS = Decimal("0.5")
    counting(upstream)
    instance = http_instance(make_instance, user)
    run(api, instance, {"url": url(upstream)})
    before = CreditAccount.objects.get(owner=user).balance

    hit = run(api, instance, {"url": url(upstream)})

    assert cache_of(hit)["status"] == "HIT" and hit.json()["credits_consumed"] == 0.5
    assert CreditAccount.objects.get(owner=user).balance == before - Decimal("0.5")
    line = CreditLedgerEntry.objects.get(execution__pk=hit.json()["execution_id"])
    assert line.amount == Decimal("-0.5")


def test_another_owner_never_gets_your_entry(api, user, make_instance, upstream):
    seen = counting(upstream)
    body = {"url": url(upstream)}
    run(api, http_instance(make_instance, user), body)
    other = UserFactory()

    theirs = run(token_client(other), http_instance(make_instance, other), body)

    assert cache_of(theirs)["status"] == "MISS" and cache_of(theirs)["miss_reason"] == "no_entry"
    assert len(seen) == 2


def test_a_changed_credential_secret_misses(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = http_instance(make_instance, user)
    credential = credential_create(owner=user, provider="http", kind="bearer", secret={"token": "one"}, label="x")
    instance = instance_configure_credentials(instance=instance, mappings={"AUTH": str(credential.pk)})
    body = {"url": url(upstream)}
    run(api, instance, body)
    assert cache_of(run(api, instance, body))["status"] == "HIT"

    credential_update(credential=Credential.objects.get(pk=credential.pk), secret={"token": "two"})
    after = run(api, instance, body)

    assert (cache_of(after)["status"], cache_of(after)["miss_reason"]) == ("MISS", "credential_changed")
    assert len(seen) == 2


def test_a_changed_instance_config_misses(api, user, make_instance, upstream):
    counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}
    run(api, instance, body)

    response = api.patch(f"/api/v1/instances/{instance.pk}/", {"config": {"timeout_seconds": 7}}, format="json")
    assert response.status_code == 200, response.content
    after = run(api, instance, body)

    assert (cache_of(after)["status"], cache_of(after)["miss_reason"]) == ("MISS", "config_changed")


def test_a_new_tool_version_misses(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}
    run(api, instance, body)

    ToolDefinition.objects.filter(pk=instance.tool_id).update(version="99.0.0")  # as a deploy's catalog sync does
    after = run(api, instance, body)

    assert (cache_of(after)["status"], cache_of(after)["miss_reason"]) == ("MISS", "tool_version_changed")
    assert len(seen) == 2


def test_an_entry_past_its_ttl_misses_as_expired(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = http_instance(make_instance, user, ttl=1)
    body = {"url": url(upstream)}
    run(api, instance, body)
    time.sleep(1.2)

    after = run(api, instance, body)

    assert (cache_of(after)["status"], cache_of(after)["miss_reason"]) == ("MISS", "expired")
    assert len(seen) == 2


def test_no_cache_runs_and_replaces_the_entry_no_store_neither_reads_nor_writes(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}
    first = run(api, instance, body)

    refreshed = run(api, instance, body, **{"Cache-Control": "no-cache"})
    assert cache_of(refreshed)["status"] == "REFRESH" and refreshed["Cache-Status"].startswith("toolexec; fwd=request")
    entry = CacheEntry.objects.get()
    assert str(entry.source_execution_id) == refreshed.json()["execution_id"] != first.json()["execution_id"]

    bypassed = run(api, instance, body, **{"Cache-Control": "no-store"})
    assert cache_of(bypassed)["status"] == "BYPASS" and bypassed["Cache-Status"] == "toolexec; fwd=bypass"
    assert CacheEntry.objects.get().source_execution_id == entry.source_execution_id
    assert len(seen) == 3


def test_max_age_takes_only_a_young_enough_entry(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}
    run(api, instance, body)
    time.sleep(1.1)

    young = run(api, instance, body, **{"Cache-Control": "max-age=60"})
    too_old = run(api, instance, body, **{"Cache-Control": "max-age=0"})

    assert cache_of(young)["status"] == "HIT"
    assert (cache_of(too_old)["status"], cache_of(too_old)["miss_reason"]) == ("MISS", "expired")
    assert len(seen) == 2


def test_a_malformed_max_age_is_refused_naming_the_header(api, user, make_instance, upstream):
    instance = http_instance(make_instance, user)
    response = api.post(
        f"/api/v1/instances/{instance.pk}/execute-sync",
        {"url": url(upstream)},
        format="json",
        HTTP_CACHE_CONTROL="max-age=soon",
    )
    assert response.status_code == 400
    assert response.json()["error_code"] == "INPUT_INVALID"
    assert "Cache-Control" in response.json()["metadata"]["field_errors"]


def test_a_failed_run_is_not_stored(api, user, make_instance, upstream):
    seen = counting(upstream, status=500)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream)}

    first = run(api, instance, body)
    second = run(api, instance, body)

    assert first.json()["data"]["status_code"] == 500  # the upstream's error, not an answer to keep
    assert (cache_of(first)["status"], cache_of(first)["miss_reason"]) == ("MISS", "failed")
    assert cache_of(second)["status"] == "MISS" and len(seen) == 2
    assert not CacheEntry.objects.exists()


def test_an_output_over_the_size_limit_is_not_stored(api, user, make_instance, upstream, settings):
    settings.TOOLEXEC_CACHE_MAX_BYTES = 10
    counting(upstream)
    instance = http_instance(make_instance, user)

    response = run(api, instance, {"url": url(upstream)})

    assert (cache_of(response)["status"], cache_of(response)["miss_reason"]) == ("MISS", "too_large")
    assert not CacheEntry.objects.exists()


def test_a_post_is_never_cached(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = http_instance(make_instance, user)
    body = {"url": url(upstream), "method": "POST", "body": '{"a": 1}'}

    first, second = run(api, instance, body), run(api, instance, body)

    assert [cache_of(r)["miss_reason"] for r in (first, second)] == ["not_cacheable", "not_cacheable"]
    assert len(seen) == 2 and not CacheEntry.objects.exists()


def test_an_instance_with_caching_off_runs_every_time(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = make_instance("http-request", owner=user)  # http-request caches only when turned on

    first, second = run(api, instance, {"url": url(upstream)}), run(api, instance, {"url": url(upstream)})

    assert [cache_of(r)["miss_reason"] for r in (first, second)] == ["disabled", "disabled"]
    assert len(seen) == 2


def test_a_cacheable_tool_caches_by_default(api, user, make_instance):
    instance = make_instance("json-transform", owner=user)
    body = {"expression": "a", "data": {"a": 1}}

    first, second = run(api, instance, body), run(api, instance, body)

    assert [cache_of(r)["status"] for r in (first, second)] == ["MISS", "HIT"]


def _concurrently(count: int, call: Any) -> list[Any]:
    def one(index: int) -> Any:
        try:
            return call(index)
        finally:
            connection.close()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_ten_identical_calls_at_once_run_the_tool_once(user, make_instance, upstream):
    seen = counting(upstream, delay=1.0)
    instance = http_instance(make_instance, user)
    clients = [token_client(user) for _ in range(10)]

    responses = _concurrently(10, lambda i: run(clients[i], instance, {"url": url(upstream)}))

    assert len(seen) == 1
    statuses = sorted(cache_of(r)["status"] for r in responses)
    assert statuses == ["COLLAPSED"] * 9 + ["MISS"]
    assert all(r.json()["data"] == responses[0].json()["data"] for r in responses)
    assert all("collapsed" in r["Cache-Status"] for r in responses if cache_of(r)["status"] == "COLLAPSED")


def test_when_the_leader_fails_every_caller_still_gets_an_answer(user, make_instance, upstream):
    seen = counting(upstream, delay=0.5, status=503)
    instance = http_instance(make_instance, user)
    clients = [token_client(user) for _ in range(5)]

    responses = _concurrently(5, lambda i: run(clients[i], instance, {"url": url(upstream)}))

    assert all(r.json()["data"]["status_code"] == 503 for r in responses)
    assert all(cache_of(r)["miss_reason"] == "failed" for r in responses)
    assert len(seen) == 5  # the others ran themselves once the leader kept nothing


def test_no_secret_reaches_a_cache_entry_its_key_or_redis(api, user, make_instance, upstream):
    from core.redis import redis as redis_client

    counting(upstream)
    instance = http_instance(make_instance, user)
    credential = credential_create(owner=user, provider="http", kind="bearer", secret={"token": SECRET}, label="x")
    instance = instance_configure_credentials(instance=instance, mappings={"AUTH": str(credential.pk)})
    body = {"url": url(upstream)}
    run(api, instance, body)
    run(api, instance, body)

    rows = list(CacheEntry.objects.values())
    assert rows and SECRET not in json.dumps(rows, default=str)
    redis = redis_client()
    for key in redis.scan_iter("*"):
        assert SECRET.encode() not in key
        kind = redis.type(key)
        if kind == b"string":
            assert SECRET.encode() not in (redis.get(key) or b"")


def test_each_instance_has_entries_of_its_own(api, user, make_instance, upstream):
    """Its TTL, its switch and its DELETE …/cache are the instance's: another instance of the
    same tool, config and credentials does not answer from them."""
    seen = counting(upstream)
    first, second = http_instance(make_instance, user), http_instance(make_instance, user, ttl=60)

    run(api, first, {"url": url(upstream)})
    answer = run(api, second, {"url": url(upstream)})

    assert (cache_of(answer)["status"], cache_of(answer)["ttl_seconds"]) == ("MISS", 60) and len(seen) == 2


def test_a_lowered_ttl_applies_to_results_kept_before(api, user, make_instance, upstream):
    seen = counting(upstream)
    instance = http_instance(make_instance, user)
    run(api, instance, {"url": url(upstream)})
    time.sleep(1.1)

    ToolInstance.objects.filter(pk=instance.pk).update(cache_ttl_seconds=1)
    instance.refresh_from_db()
    after = run(api, instance, {"url": url(upstream)})

    assert (cache_of(after)["status"], cache_of(after)["miss_reason"]) == ("MISS", "expired") and len(seen) == 2
