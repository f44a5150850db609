"""The result cache in the operator console and on the status pages (issue 21): a read-only
changelist of cache entries that never shows what an entry holds, an entry's output only to
staff with the permission to view cache entries, purging, clearing an instance's cache; an
instance page with its cache setting, hit rate and credits saved, and a run's page saying it
was served from the cache and linking the run that produced it."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from executions.models import CacheEntry, Execution, Job, Mode
from executions.services.sync import execution_run_sync
from instances.models import ToolInstance
from instances.selectors import instance_list
from tests.factories import UserFactory
from tests.test_admin import change, changelist, messages_of, run_action, staff

pytestmark = [pytest.mark.django_db, pytest.mark.postgres, pytest.mark.redis]

MARKER = "cached-output-marker-41c7"  # what an entry holds: shown on no page but to those allowed
INSTANCE_PAGE_QUERIES = 5  # as tests/test_status_pages.py's PAGE_BUDGETS["instance"]


def transform(make_instance: Any, owner: Any, **fields: Any) -> ToolInstance:
    instance = make_instance("json-transform", owner=owner, name=f"Reshape {owner.username}")
    if fields:
        ToolInstance.objects.filter(pk=instance.pk).update(**fields)
    return instance_list(owner=owner).get(pk=instance.pk)


def run(instance: ToolInstance, value: Any = MARKER) -> Execution:
    """A sync run through the service, as the API runs it: the first of some inputs stores its
    result, the next ones are answered from the cache."""
    execution, _ = execution_run_sync(instance=instance, inputs={"expression": "a", "data": {"a": value}})
    return execution


def text(response: Any) -> str:
    """The page's words, without its markup."""
    return " ".join(re.sub(r"<[^>]+>", " ", response.content.decode()).split())


# --- The cache entries changelist ---------------------------------------------------------


def test_the_changelist_lists_what_each_entry_is_and_how_it_is_used_never_its_output(admin_client, user, make_instance):
    instance = transform(make_instance, user)
    source = run(instance)
    run(instance)
    run(instance)
    entry = CacheEntry.objects.get()

    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(changelist("executions.cacheentry"))

    assert response.status_code == 200
    page = response.content.decode()
    words = text(response)
    assert MARKER not in page
    assert "JSON Transform" in words and user.username in words and instance.name in words
    assert f"{entry.size_bytes} bytes" in words
    columns = re.findall(r'<th scope="col" class="[^"]*column-(\w+)', page)
    assert columns == [
        "short_id",
        "tool",
        "owner",
        "instance",
        "size",
        "created_at",
        "expires_at",
        "hits",
        "last_hit_at",
    ]
    cells = re.findall(r'<td class="field-hits">(\d+)</td>', page)
    assert cells == ["2"]
    listing = next(q["sql"] for q in captured.captured_queries if 'FROM "executions_cacheentry"' in q["sql"])
    assert '"executions_cacheentry"."output"' not in listing
    assert source.pk == entry.source_execution_id


def test_an_entrys_page_shows_its_output_to_staff_who_may_view_cache_entries(user, make_instance):
    instance = transform(make_instance, user)
    source = run(instance)
    _, client = staff("executions.view_cacheentry")

    page = client.get(change("executions.cacheentry", CacheEntry.objects.get().pk)).content.decode()

    assert MARKER in page
    assert change("executions.execution", source.pk) in page
    assert change("instances.toolinstance", instance.pk) in page


def test_staff_without_the_view_permission_see_an_entry_but_never_its_output(user, make_instance):
    instance = transform(make_instance, user)
    run(instance)
    entry = CacheEntry.objects.get()
    _, client = staff("executions.view_execution")

    listing = client.get(changelist("executions.cacheentry"))
    response = client.get(change("executions.cacheentry", entry.pk))

    assert listing.status_code == response.status_code == 200
    assert MARKER not in listing.content.decode() and MARKER not in response.content.decode()
    assert "Not shown: seeing a cached output takes the “Can view cache entry” permission." in text(response)
    assert entry.key in response.content.decode()


def test_staff_who_may_view_neither_entries_nor_runs_see_no_cache_entries(user, make_instance):
    run(transform(make_instance, user))
    _, client = staff("instances.view_toolinstance")

    assert client.get(changelist("executions.cacheentry")).status_code == 403
    assert client.get(change("executions.cacheentry", CacheEntry.objects.get().pk)).status_code == 403
    assert "Cache entries" not in client.get("/admin/").content.decode()


def test_cache_entries_are_read_only(admin_client, user, make_instance):
    run(transform(make_instance, user))
    entry = CacheEntry.objects.get()

    assert admin_client.get(changelist("executions.cacheentry") + "add/").status_code == 403
    assert admin_client.post(change("executions.cacheentry", entry.pk), {"hits": 99}).status_code == 403
    assert admin_client.post(change("executions.cacheentry", entry.pk) + "delete/", {"post": "yes"}).status_code == 403
    entry.refresh_from_db()
    assert entry.hits == 0


def test_purge_deletes_the_selected_entries_and_every_expired_one(admin_client, user, make_instance):
    instance = transform(make_instance, user)
    for value in ("selected", "expired", "kept"):
        run(instance, value)
    by_value = {entry.output["result"]: entry for entry in CacheEntry.objects.all()}
    CacheEntry.objects.filter(pk=by_value["expired"].pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    response = run_action(admin_client, "executions.cacheentry", "purge", [by_value["selected"].pk])

    assert messages_of(response) == ["Purged 1 selected and 1 expired cache entries."]
    assert [entry.output["result"] for entry in CacheEntry.objects.all()] == ["kept"]


def test_the_expiry_filter_finds_the_expired_entries(admin_client, user, make_instance):
    instance = transform(make_instance, user)
    run(instance, "fresh")
    run(instance, "stale")
    CacheEntry.objects.filter(output__result="stale").update(expires_at=timezone.now() - timedelta(seconds=1))

    expired = admin_client.get(changelist("executions.cacheentry"), {"expired": "yes"})
    served = admin_client.get(changelist("executions.cacheentry"), {"expired": "no"})

    assert [e.output["result"] for e in expired.context["cl"].result_list] == ["stale"]
    assert [e.output["result"] for e in served.context["cl"].result_list] == ["fresh"]


def test_purging_takes_the_delete_permission_on_cache_entries(user, make_instance):
    run(transform(make_instance, user))
    _, viewer = staff("executions.view_cacheentry")
    _, purger = staff("executions.view_cacheentry", "executions.delete_cacheentry")
    pk = CacheEntry.objects.get().pk

    assert "purge" not in viewer.get(changelist("executions.cacheentry")).content.decode()
    run_action(viewer, "executions.cacheentry", "purge", [pk])
    assert CacheEntry.objects.exists()

    run_action(purger, "executions.cacheentry", "purge", [pk])
    assert not CacheEntry.objects.exists()


# --- Clearing an instance's cache -----------------------------------------------------------


def test_clear_cache_deletes_the_selected_instances_entries_only(admin_client, user, make_instance):
    cleared, kept = transform(make_instance, user), transform(make_instance, UserFactory())
    run(cleared, "one")
    run(cleared, "two")
    run(kept)

    response = run_action(admin_client, "instances.toolinstance", "clear_cache", [cleared.pk])

    assert messages_of(response) == [f"{cleared.name}: 2 cached results cleared."]
    assert [entry.instance_id for entry in CacheEntry.objects.all()] == [kept.pk]
    after = run(cleared, "one")
    assert (after.cache_hit, after.cache["miss_reason"]) == (False, "no_entry")


def test_clearing_an_instances_cache_takes_the_change_permission(user, make_instance):
    instance = transform(make_instance, user)
    run(instance)
    _, viewer = staff("instances.view_toolinstance")

    run_action(viewer, "instances.toolinstance", "clear_cache", [instance.pk])

    assert CacheEntry.objects.count() == 1


def test_an_instances_admin_page_says_its_cache_setting_and_links_its_entries(admin_client, user, make_instance):
    instance = transform(make_instance, user, cache_ttl_seconds=60)
    other = transform(make_instance, user)
    run(instance, "mine")
    run(other, "theirs")

    page = admin_client.get(change("instances.toolinstance", instance.pk)).content.decode()

    assert "on, results kept 60 s" in page
    link = re.search(r'href="([^"]*cacheentry/\?[^"]*)">its cache entries</a>', page)
    assert link
    entries = admin_client.get(link[1].replace("&amp;", "&"))
    assert [entry.output["result"] for entry in entries.context["cl"].result_list] == ["mine"]


def test_an_execution_served_from_the_cache_links_the_run_that_produced_it_in_the_admin(
    admin_client, user, make_instance
):
    instance = transform(make_instance, user)
    source = run(instance)
    hit = run(instance)

    page = admin_client.get(change("executions.execution", hit.pk)).content.decode()

    assert change("executions.execution", source.pk) in page
    assert "&quot;status&quot;: &quot;HIT&quot;" in page


# --- The status pages ---------------------------------------------------------------------


def cache_tiles(response: Any) -> dict[str, str]:
    return dict(re.findall(r'<dt>([^<]*)</dt><dd data-field="cache-[^"]*">([^<]*)</dd>', response.content.decode()))


def test_the_instance_page_shows_the_cache_setting_hit_rate_and_credits_saved(client, user, make_instance):
    instance = transform(make_instance, user)
    run(instance)  # a miss, charged the tool's 0.01 credits
    hits = [run(instance) for _ in range(3)]  # free
    Execution.objects.filter(pk=hits[0].pk).update(created_at=timezone.now() - timedelta(days=2))  # not today's
    client.force_login(user)

    response = client.get(f"/status/instances/{instance.pk}/")

    assert "On: results are kept 5 min" in text(response)
    assert cache_tiles(response) == {
        "Hit rate, last 24 h": "66.7 %",
        "Answered from the cache": "2 of 3",
        "Credits saved, last 24 h": "0.02",
    }


def test_credits_saved_are_what_the_hits_would_have_cost_as_runs_minus_what_they_cost(
    client, user, make_instance, settings
):
    settings.TOOLEXEC_CACHE_HIT_CREDITS = Decimal("0.004")
    instance = transform(make_instance, user)
    run(instance)
    run(instance)
    run(instance)
    orphan = run(instance)
    # A hit whose producing run is no longer recorded counts the tool's base price (0.01).
    Execution.objects.filter(pk=orphan.pk).update(source_execution=None)
    client.force_login(user)

    tiles = cache_tiles(client.get(f"/status/instances/{instance.pk}/"))

    assert tiles["Credits saved, last 24 h"] == "0.018"  # 3 × (0.01 − 0.004)


def test_an_instance_whose_cache_is_off_or_whose_tool_is_not_cacheable_says_so(client, user, make_instance):
    off = transform(make_instance, user, cache_enabled=False)
    noop = make_instance("test-noop", owner=user)
    client.force_login(user)

    turned_off = client.get(f"/status/instances/{off.pk}/")
    never = client.get(f"/status/instances/{noop.pk}/")

    assert 'data-field="cache-setting">Off</p>' in turned_off.content.decode()
    assert cache_tiles(turned_off) == {
        "Hit rate, last 24 h": "—",
        "Answered from the cache": "0 of 0",
        "Credits saved, last 24 h": "0",
    }
    assert "Off: this tool's runs are never cached." in never.content.decode().replace("&#x27;", "'")
    assert cache_tiles(never) == {}


def test_a_run_served_from_the_cache_says_so_and_links_the_run_that_produced_it(client, user, make_instance):
    instance = transform(make_instance, user)
    source = run(instance)
    hit = run(instance)
    client.force_login(user)

    page = client.get(f"/status/executions/{hit.pk}/").content.decode()
    first = client.get(f"/status/executions/{source.pk}/").content.decode()

    assert "Served from the cache" in page
    assert f'<a href="/status/executions/{source.pk}/">The run that produced this result</a>' in page
    assert "Served from the cache" not in first
    assert "Result cache: missed: no result of the same run was cached yet." in first


def test_a_hit_whose_producing_run_is_gone_says_so(client, user, make_instance):
    instance = transform(make_instance, user)
    source = run(instance)
    hit = run(instance)
    Execution.objects.filter(pk=source.pk).delete()
    client.force_login(user)

    page = client.get(f"/status/executions/{hit.pk}/").content.decode()

    assert "Served from the cache" in page and "The run that produced this result is no longer recorded" in page


def test_an_async_run_served_from_the_cache_says_so_on_its_job_page(client, user, make_instance):
    instance = transform(make_instance, user)
    source = run(instance)
    hit = Execution.objects.create(
        instance=instance,
        tool=instance.tool,
        owner=user,
        mode=Mode.ASYNC,
        status=Execution.Status.COMPLETED,
        output_data=source.output_data,
        cache_hit=True,
        source_execution=source,
        cache={"status": "HIT", "age_seconds": 4, "ttl_seconds": 296, "source_execution_id": str(source.pk)},
    )
    job = Job.objects.create(execution=hit, instance=instance, owner=user, status=Job.Status.COMPLETED, progress=100)
    client.force_login(user)

    page = client.get(f"/status/jobs/{job.pk}/").content.decode()

    assert "Served from the cache" in page
    assert f'<a href="/status/executions/{source.pk}/">The run that produced this result</a> ran 4 s before' in page


def test_try_it_answered_from_the_cache_says_so(client, user, make_instance):
    instance = transform(make_instance, user)
    client.force_login(user)
    form = {"in_expression": "a", "in_data": '{"a": 1}', "mode": "sync"}

    first = client.post(f"/status/instances/{instance.pk}/", form)
    second = client.post(f"/status/instances/{instance.pk}/", form)

    assert "Served from the cache" not in first.content.decode()
    assert "Served from the cache" in second.content.decode()
    assert cache_tiles(second)["Answered from the cache"] == "1 of 2"


def test_the_history_marks_the_runs_served_from_the_cache(client, user, make_instance):
    instance = transform(make_instance, user)
    run(instance)
    run(instance)
    client.force_login(user)

    page = client.get("/status/executions/").content.decode()

    assert page.count('title="Served from the cache">cached</span>') == 1


@pytest.mark.parametrize("hits", [3, 30])
def test_the_instance_page_costs_the_same_queries_however_many_runs_the_cache_answered(
    client, user, make_instance, hits, django_assert_max_num_queries
):
    instance = transform(make_instance, user)
    run(instance)
    for _ in range(hits):
        run(instance)
    client.force_login(user)

    with django_assert_max_num_queries(INSTANCE_PAGE_QUERIES):
        response = client.get(f"/status/instances/{instance.pk}/")

    assert cache_tiles(response)["Answered from the cache"] == f"{hits} of {hits + 1}"
