"""The result cache's settings through the API (issue 21): an instance's ``cache`` object (read
as it applies, written key by key, refused outside what its tool allows), ``DELETE
…/cache`` and what capabilities and the tool catalog say about how a tool caches."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient

from executions.models import CacheEntry
from instances.models import ToolInstance
from tools.models import ToolDefinition

pytestmark = [pytest.mark.django_db, pytest.mark.redis]

TRANSFORM_INPUTS = {"expression": "a", "data": {"a": 1}}


def create(api: APIClient, tool: str = "json-transform", **body: Any) -> Any:
    return api.post("/api/v1/instances/", {"tool_definition_id": tool, "name": "cached", **body}, format="json")


def created(api: APIClient, tool: str = "json-transform", **body: Any) -> dict[str, Any]:
    response = create(api, tool, **body)
    assert response.status_code == 201, response.content
    return response.json()


def patch(api: APIClient, instance_id: str, cache: Any) -> Any:
    return api.patch(f"/api/v1/instances/{instance_id}/", {"cache": cache}, format="json")


def run(api: APIClient, instance_id: str, inputs: dict[str, Any] = TRANSFORM_INPUTS) -> dict[str, Any]:
    response = api.post(f"/api/v1/instances/{instance_id}/execute-sync", inputs, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def field_errors(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 400, response.content
    body = response.json()
    assert (body["success"], body["error_code"]) == (False, "INPUT_INVALID")
    return body["metadata"]["field_errors"]


# --- Reading and writing the setting ---------------------------------------------------------


def test_a_new_instance_reads_its_tools_cache_defaults(api, catalog):
    assert created(api, "json-transform")["cache"] == {"enabled": True, "ttl_seconds": 300}
    assert created(api, "http-request")["cache"] == {"enabled": False, "ttl_seconds": 300}  # opt-in
    assert created(api, "test-noop")["cache"] == {"enabled": False, "ttl_seconds": 300}  # not cacheable


def test_the_setting_is_written_on_create_and_read_back_everywhere(api, catalog):
    instance = created(api, "http-request", cache={"enabled": True, "ttl_seconds": 60})

    assert instance["cache"] == {"enabled": True, "ttl_seconds": 60}
    assert api.get(f"/api/v1/instances/{instance['id']}/").json()["cache"] == instance["cache"]
    listed = api.get("/api/v1/instances/").json()["results"]
    assert [row["cache"] for row in listed] == [instance["cache"]]
    stored = ToolInstance.objects.get(pk=instance["id"])
    assert (stored.cache_enabled, stored.cache_ttl_seconds) == (True, 60)


def test_a_patch_changes_only_the_keys_it_gives(api, catalog):
    instance = created(api)

    after_ttl = patch(api, instance["id"], {"ttl_seconds": 30})
    after_off = patch(api, instance["id"], {"enabled": False})
    after_nothing = api.patch(f"/api/v1/instances/{instance['id']}/", {"name": "renamed"}, format="json")

    assert after_ttl.json()["cache"] == {"enabled": True, "ttl_seconds": 30}
    assert after_off.json()["cache"] == {"enabled": False, "ttl_seconds": 30}
    assert after_nothing.json()["cache"] == {"enabled": False, "ttl_seconds": 30}


def test_null_goes_back_to_the_tools_default(api, catalog):
    instance = created(api, cache={"enabled": False, "ttl_seconds": 30})

    response = patch(api, instance["id"], {"enabled": None, "ttl_seconds": None})

    assert response.status_code == 200, response.content
    assert response.json()["cache"] == {"enabled": True, "ttl_seconds": 300}
    stored = ToolInstance.objects.get(pk=instance["id"])
    assert (stored.cache_enabled, stored.cache_ttl_seconds) == (None, None)


def test_the_ttl_may_be_anything_from_1_second_to_the_tools_maximum(api, catalog):
    maximum = ToolDefinition.objects.get(slug="json-transform").cache_ttl_max
    instance = created(api, cache={"ttl_seconds": 1})

    assert instance["cache"]["ttl_seconds"] == 1
    assert patch(api, instance["id"], {"ttl_seconds": maximum}).json()["cache"]["ttl_seconds"] == maximum


@pytest.mark.parametrize("ttl", [0, -5, "max", 1.5, True], ids=["zero", "negative", "text", "fraction", "boolean"])
def test_a_ttl_that_is_not_a_whole_number_of_seconds_from_1_is_refused_naming_it(api, catalog, ttl):
    instance = created(api)

    refused_update = patch(api, instance["id"], {"ttl_seconds": ttl})
    refused_create = create(api, cache={"ttl_seconds": ttl})

    assert list(field_errors(refused_update)) == ["cache.ttl_seconds"]
    assert list(field_errors(refused_create)) == ["cache.ttl_seconds"]
    assert ToolInstance.objects.get(pk=instance["id"]).cache_ttl_seconds is None
    assert ToolInstance.objects.count() == 1


def test_a_ttl_over_the_tools_maximum_is_refused_saying_the_maximum(api, catalog):
    maximum = ToolDefinition.objects.get(slug="json-transform").cache_ttl_max
    instance = created(api)

    refused = patch(api, instance["id"], {"ttl_seconds": maximum + 1})

    errors = field_errors(refused)
    assert list(errors) == ["cache.ttl_seconds"]
    assert str(maximum) in errors["cache.ttl_seconds"][0]
    assert "cache.ttl_seconds" in refused.json()["error_message"]
    assert list(field_errors(create(api, cache={"ttl_seconds": maximum + 1}))) == ["cache.ttl_seconds"]
    assert ToolInstance.objects.get(pk=instance["id"]).cache_ttl_seconds is None


def test_turning_the_cache_on_for_a_tool_that_is_not_cacheable_is_refused_naming_it(api, catalog):
    instance = created(api, "test-noop")

    refused = patch(api, instance["id"], {"enabled": True})

    errors = field_errors(refused)
    assert list(errors) == ["cache.enabled"]
    assert "not cacheable" in errors["cache.enabled"][0]
    assert list(field_errors(create(api, "test-noop", cache={"enabled": True}))) == ["cache.enabled"]
    assert patch(api, instance["id"], {"enabled": False}).status_code == 200  # off is always fine
    assert ToolInstance.objects.get(pk=instance["id"]).caches is False


def test_both_refusals_are_named_at_once(api, catalog):
    errors = field_errors(create(api, "test-noop", cache={"enabled": True, "ttl_seconds": 10**9}))

    assert set(errors) == {"cache.enabled", "cache.ttl_seconds"}


def test_a_cache_that_is_turned_off_runs_the_tool_and_says_disabled(api, catalog):
    instance = created(api)
    run(api, instance["id"])
    assert run(api, instance["id"])["cache"]["status"] == "HIT"

    patch(api, instance["id"], {"enabled": False})
    after = run(api, instance["id"])

    assert (after["cache"]["status"], after["cache"]["miss_reason"]) == ("MISS", "disabled")


def test_a_shorter_ttl_applies_to_results_already_cached_and_a_longer_one_does_not_lengthen_them(api, catalog):
    instance = created(api)
    run(api, instance["id"])
    entry = CacheEntry.objects.get()
    assert entry.expires_at == entry.created_at + timedelta(seconds=300)
    time.sleep(1.1)

    patch(api, instance["id"], {"ttl_seconds": 1})
    shortened = run(api, instance["id"])["cache"]
    assert (shortened["status"], shortened["miss_reason"]) == ("MISS", "expired")

    patch(api, instance["id"], {"ttl_seconds": 600})  # the entry just kept lives 1 s, as it was kept
    time.sleep(1.1)
    lengthened = run(api, instance["id"])["cache"]
    assert (lengthened["status"], lengthened["miss_reason"]) == ("MISS", "expired")


# --- DELETE …/cache -----------------------------------------------------------------------


def test_deleting_the_cache_answers_204_and_the_next_run_misses_with_no_entry(api, catalog):
    instance = created(api)
    first = run(api, instance["id"])
    assert run(api, instance["id"])["cache"]["status"] == "HIT"

    response = api.delete(f"/api/v1/instances/{instance['id']}/cache")

    assert response.status_code == 204
    assert response.content == b""
    assert not CacheEntry.objects.exists()
    after = run(api, instance["id"])
    assert (after["cache"]["status"], after["cache"]["miss_reason"]) == ("MISS", "no_entry")
    assert after["execution_id"] != first["execution_id"]
    assert CacheEntry.objects.get().source_execution_id is not None  # cached again


def test_deleting_the_cache_leaves_other_instances_entries(api, catalog):
    cleared, kept = created(api), created(api)
    run(api, cleared["id"])
    # Other inputs: the owner's instances of one tool and config share entries (the key leaves
    # the instance out); an entry belongs to the instance whose run stored it.
    run(api, kept["id"], {"expression": "a", "data": {"a": 2}})

    assert api.delete(f"/api/v1/instances/{cleared['id']}/cache/").status_code == 204

    assert [str(entry.instance_id) for entry in CacheEntry.objects.all()] == [kept["id"]]
    assert api.delete(f"/api/v1/instances/{cleared['id']}/cache/").status_code == 204  # nothing left: still 204


def test_deleting_the_cache_of_another_owners_instance_answers_404_and_keeps_their_entries(api, other_api, catalog):
    theirs = created(other_api)
    run(other_api, theirs["id"])

    response = api.delete(f"/api/v1/instances/{theirs['id']}/cache")

    assert response.status_code == 404
    body = response.json()
    assert (body["success"], body["error_code"]) == (False, "NOT_FOUND")
    assert CacheEntry.objects.filter(instance_id=theirs["id"]).count() == 1
    assert run(other_api, theirs["id"])["cache"]["status"] == "HIT"


# --- Capabilities and the catalog -----------------------------------------------------------


def test_capabilities_say_how_the_tool_caches_and_what_the_instance_does(api, catalog):
    instance = created(api, "http-request", cache={"enabled": True, "ttl_seconds": 90})
    definition = ToolDefinition.objects.get(slug="http-request")

    body = api.get(f"/api/v1/instances/{instance['id']}/capabilities").json()

    assert body["cache"] == {
        "cacheable": True,
        "enabled_by_default": False,
        "ttl_default_seconds": definition.cache_ttl_default,
        "ttl_max_seconds": definition.cache_ttl_max,
        "excluded_inputs": definition.cache_exclude_inputs,
        "enabled": True,
        "ttl_seconds": 90,
    }


def test_capabilities_of_a_tool_that_is_not_cacheable_say_it_never_caches(api, catalog):
    instance = created(api, "test-noop")

    cache = api.get(f"/api/v1/instances/{instance['id']}/capabilities").json()["cache"]

    assert (cache["cacheable"], cache["enabled_by_default"], cache["enabled"]) == (False, False, False)


def test_the_catalog_says_whether_and_how_each_tool_caches(api, catalog):
    tools = {tool["id"]: tool for tool in api.get("/api/v1/tools/").json()}

    assert tools["json-transform"]["cache"] == {
        "cacheable": True,
        "enabled_by_default": True,
        "ttl_default_seconds": 300,
        "ttl_max_seconds": 24 * 3600,
        "excluded_inputs": [],
    }
    assert tools["http-request"]["cache"]["cacheable"] is True
    assert tools["http-request"]["cache"]["enabled_by_default"] is False
    assert tools["test-noop"]["cache"]["cacheable"] is False
    assert tools["test-noop"]["cache"]["enabled_by_default"] is False
    assert api.get("/api/v1/tools/json-transform/").json()["cache"] == tools["json-transform"]["cache"]


def test_the_schema_documents_the_setting_and_the_delete(api):
    schema = json.loads(APIClient().get("/api/schema/?format=json").content)

    clear = schema["paths"]["/api/v1/instances/{id}/cache/"]
    assert set(clear) == {"delete"}
    assert {"204", "401", "404"} <= set(clear["delete"]["responses"])
    components = schema["components"]["schemas"]
    assert set(components["InstanceCache"]["properties"]) == {"enabled", "ttl_seconds"}
    assert components["InstanceCacheInputRequest"]["properties"]["ttl_seconds"]["minimum"] == 1
    assert set(components["ToolCache"]["properties"]) == {
        "cacheable",
        "enabled_by_default",
        "ttl_default_seconds",
        "ttl_max_seconds",
        "excluded_inputs",
    }
    assert {"enabled", "ttl_seconds"} <= set(components["CapabilitiesCache"]["properties"])
