"""The catalog: sync turns registered implementations into definitions, a definition whose
implementation is gone becomes unavailable (in words, never failing start-up), and
third-party tools arrive through the ``toolexec.tools`` entry-point group."""

from __future__ import annotations

import importlib
import logging
import sys
import textwrap
from decimal import Decimal
from importlib.metadata import entry_points
from io import StringIO
from pathlib import Path

import pytest
from django.apps import apps
from django.core.management import call_command

from executions.models import Execution
from instances.services.instances import instance_create
from tests.tools import AsyncOnlyTool, GoogleSheetTool, NoopTool, PricedTool, SlowTool
from tools import registry
from tools.apps import _sync_after_migrate
from tools.builtin.json_transform import JsonTransform
from tools.models import ToolDefinition
from tools.sdk import SYNC, Tool
from tools.services import catalog_sync

pytestmark = pytest.mark.django_db

MISSING_PATH = "no_such_module.Tool"


@pytest.fixture
def registered():
    """Registers tool classes for one test and always unregisters them afterwards."""
    slugs: list[str] = []

    def register(*tools: type[Tool]) -> None:
        for tool in tools:
            registry.register(tool)
            slugs.append(tool.slug)

    yield register
    for slug in slugs:
        registry.unregister(slug)


@pytest.fixture
def ghost(db) -> ToolDefinition:
    """A stored definition whose implementation cannot be imported on this server."""
    return ToolDefinition.objects.create(
        slug="ghost-tool",
        name="Ghost Tool",
        description="Installed once, gone now.",
        implementation=MISSING_PATH,
        modes=["sync"],
        input_schema={"type": "object"},
    )


def _assert_no_internal_path(text: str) -> None:
    for fragment in ("no_such_module", MISSING_PATH, "ImportError", "ModuleNotFoundError", "Traceback"):
        assert fragment not in text


# --- Upserting registered implementations -----------------------------------------------


def test_sync_writes_every_field_of_a_registered_tool(catalog):
    priced = catalog(PricedTool)

    assert priced.name == "Test Priced"
    assert priced.input_schema == PricedTool.input_schema
    assert priced.output_schema == {}
    assert priced.modes == ["sync"]
    assert priced.timeout_seconds == 30
    assert priced.base_credits == Decimal("0.01")
    assert priced.credits_per_unit == Decimal("0.5")
    assert priced.implementation == "tests.tools.PricedTool"
    assert priced.is_available is True
    assert priced.unavailable_reason == ""
    assert priced.synced_at is not None

    assert catalog(NoopTool).modes == ["sync", "async"]
    assert catalog(AsyncOnlyTool).modes == ["async"]
    assert catalog(SlowTool).timeout_seconds == 60
    assert catalog(GoogleSheetTool).credential_slots == [
        {
            "name": "OAUTH_TOKEN",
            "provider": "google",
            "kinds": ["oauth2"],
            "scopes": ["drive.readonly"],
            "required": True,
            "description": "",
        }
    ]


def test_sync_overwrites_stale_definitions_and_leaves_is_active_alone(catalog):
    ToolDefinition.objects.filter(slug=PricedTool.slug).update(
        name="Old name",
        input_schema={"type": "object", "properties": {}},
        credential_slots=[{"name": "OLD"}],
        modes=["async"],
        timeout_seconds=1,
        base_credits=Decimal("9"),
        credits_per_unit=Decimal("9"),
        unit="pages",
        implementation="somewhere.else.Old",
        is_available=False,
        unavailable_reason="stale",
        is_active=False,
    )

    report = catalog_sync()

    assert PricedTool.slug in report.updated
    priced = catalog(PricedTool)
    assert (priced.name, priced.modes, priced.timeout_seconds) == ("Test Priced", ["sync"], 30)
    assert priced.input_schema == PricedTool.input_schema
    assert priced.credential_slots == []
    assert (priced.base_credits, priced.credits_per_unit, priced.unit) == (Decimal("0.01"), Decimal("0.5"), "")
    assert priced.implementation == "tests.tools.PricedTool"
    assert (priced.is_available, priced.unavailable_reason) == (True, "")
    assert priced.is_active is False  # the operators' choice survives every sync


def test_sync_creates_a_definition_for_a_newly_registered_tool(db, registered):
    class FreshTool(Tool):
        slug = "test-fresh"
        name = "Test Fresh"
        modes = frozenset({SYNC})

    registered(FreshTool)
    report = catalog_sync()

    assert "test-fresh" in report.created
    assert "json-transform" in report.updated
    assert ToolDefinition.objects.get(slug="test-fresh").implementation.endswith("FreshTool")
    assert catalog_sync().created == []  # the second sync finds it stored


def test_sync_tools_command_reports_created_updated_and_unavailable(db, registered, ghost):
    class CommandTool(Tool):
        slug = "test-command"
        name = "Test Command"

    registered(CommandTool)
    out = StringIO()

    call_command("sync_tools", stdout=out)

    lines = out.getvalue().splitlines()
    assert "created      test-command" in lines
    assert "updated      json-transform" in lines
    assert any(line.startswith("unavailable  ghost-tool: ") and MISSING_PATH in line for line in lines)
    updated = sum(1 for line in lines if line.startswith("updated "))
    assert lines[-1] == f"Catalog synced: 1 created, {updated} updated, 1 unavailable."


# --- Implementations that are gone ------------------------------------------------------


def test_sync_marks_a_definition_with_a_missing_implementation_unavailable_with_the_reason(ghost, caplog):
    with caplog.at_level(logging.WARNING, logger="tools.services"):
        report = catalog_sync()

    ghost.refresh_from_db()
    assert ghost.is_available is False
    assert MISSING_PATH in ghost.unavailable_reason
    assert "could not be imported" in ghost.unavailable_reason
    assert "no_such_module" in report.unavailable["ghost-tool"]
    assert ghost.synced_at is not None
    assert any("ghost-tool" in record.getMessage() for record in caplog.records)


def test_an_unchanged_unavailable_reason_is_logged_once(ghost, caplog):
    catalog_sync()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tools.services"):
        catalog_sync()

    assert not [r for r in caplog.records if "ghost-tool" in r.getMessage()]


def test_every_kind_of_broken_implementation_is_unavailable_and_sync_never_raises(db, tmp_path, monkeypatch):
    (tmp_path / "exploding_plugin_h3.py").write_text("raise RuntimeError('the plug-in broke while importing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = {
        "missing-module": "no_such_module.Tool",
        "missing-class": "tools.sdk.NoSuchTool",
        "not-a-tool": "json.dumps",
        "not-a-path": "nodots",
        "raises-on-import": "exploding_plugin_h3.Tool",
    }
    for slug, path in broken.items():
        ToolDefinition.objects.create(slug=slug, name=slug, implementation=path, modes=["sync"])

    report = catalog_sync()
    _sync_after_migrate(apps.get_app_config("tools"))  # what `migrate` runs: no exception either

    assert set(report.unavailable) == set(broken)
    for definition in ToolDefinition.objects.filter(slug__in=broken):
        assert definition.is_available is False, definition.slug
        assert definition.unavailable_reason, definition.slug
    assert "the plug-in broke" in ToolDefinition.objects.get(slug="raises-on-import").unavailable_reason
    assert registry.get_tool("not-a-tool") is None
    assert ToolDefinition.objects.get(slug="json-transform").is_available is True
    assert "exploding_plugin_h3" not in sys.modules


def test_an_unavailable_tool_says_so_in_the_catalog_in_words(api, ghost):
    catalog_sync()

    detail = api.get("/api/v1/tools/ghost-tool/")
    listed = {tool["id"]: tool for tool in api.get("/api/v1/tools/").json()}

    assert detail.status_code == 200
    body = detail.json()
    assert body["is_available"] is False
    assert body["unavailable_reason"] == "The tool's implementation is not installed on this server."
    _assert_no_internal_path(detail.content.decode())
    assert listed["ghost-tool"]["is_available"] is False
    assert listed["json-transform"]["is_available"] is True
    assert listed["json-transform"]["unavailable_reason"] is None


def test_validate_execution_of_an_unavailable_tool_names_it_first(api, user, ghost):
    catalog_sync()
    ghost.refresh_from_db()
    instance = instance_create(owner=user, tool=ghost, name="ghost instance")

    response = api.get(f"/api/v1/instances/{instance.pk}/validate-execution")

    assert response.status_code == 200
    body = response.json()
    assert body["is_ready"] is False
    assert body["error_code"] == "TOOL_UNAVAILABLE"
    assert body["error_message"].startswith("Ghost Tool is not available")
    assert body["checks"][0]["name"] == "tool_available"
    assert body["checks"][0]["passed"] is False
    assert [item["action"] for item in body["action_items"]] == ["contact_support"]
    _assert_no_internal_path(response.content.decode())


def test_running_an_unavailable_tool_is_refused_with_409_in_words(api, user, ghost):
    catalog_sync()
    ghost.refresh_from_db()
    instance = instance_create(owner=user, tool=ghost, name="ghost instance")

    response = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", {}, format="json")

    assert response.status_code == 409
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "TOOL_UNAVAILABLE"
    assert body["error_message"] == (
        "Ghost Tool is not available on this server right now: its implementation is not installed."
    )
    _assert_no_internal_path(response.content.decode())
    assert not Execution.objects.filter(instance=instance).exists()


VANISHING_SOURCE = textwrap.dedent(
    """
    from tools.sdk import Tool


    class VanishingTool(Tool):
        slug = "test-vanishing"
        name = "Test Vanishing"

        def run(self, inputs, ctx):
            return {"here": True}
    """
)


@pytest.fixture
def vanishing_module(tmp_path: Path, monkeypatch):
    """A plug-in module on disk that a test can delete; forgotten again afterwards."""
    module_file = tmp_path / "vanishing_tool_h3.py"
    module_file.write_text(VANISHING_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module_file
    registry.unregister("test-vanishing")
    sys.modules.pop("vanishing_tool_h3", None)


def test_uninstalled_then_reinstalled_tool_goes_unavailable_and_back(api, user, vanishing_module):
    module = importlib.import_module("vanishing_tool_h3")
    registry.register(module.VanishingTool)
    catalog_sync()
    definition = ToolDefinition.objects.get(slug="test-vanishing")
    assert (definition.is_available, definition.implementation) == (True, "vanishing_tool_h3.VanishingTool")
    instance = instance_create(owner=user, tool=definition, name="vanishing")
    run_url = f"/api/v1/instances/{instance.pk}/execute-sync"
    assert api.post(run_url, {}, format="json").json()["data"] == {"here": True}

    # The package is uninstalled: the class is gone from the registry and from disk.
    registry.unregister("test-vanishing")
    sys.modules.pop("vanishing_tool_h3")
    vanishing_module.unlink()
    importlib.invalidate_caches()
    report = catalog_sync()

    assert "vanishing_tool_h3.VanishingTool" in report.unavailable["test-vanishing"]
    assert api.get("/api/v1/tools/test-vanishing/").json()["is_available"] is False
    refused = api.post(run_url, {}, format="json")
    assert (refused.status_code, refused.json()["error_code"]) == (409, "TOOL_UNAVAILABLE")

    # Reinstalled and registered again: the next sync makes it available.
    registry.register(module.VanishingTool)
    report = catalog_sync()

    assert "test-vanishing" in report.updated
    assert "test-vanishing" not in report.unavailable
    definition.refresh_from_db()
    assert (definition.is_available, definition.unavailable_reason) == (True, "")
    assert api.get("/api/v1/tools/test-vanishing/").json()["is_available"] is True
    again = api.post(run_url, {}, format="json")
    assert (again.status_code, again.json()["success"]) == (200, True)


def test_sync_imports_a_stored_implementation_that_is_installed_but_not_yet_registered(db, vanishing_module):
    ToolDefinition.objects.create(
        slug="test-vanishing",
        name="Test Vanishing",
        implementation="vanishing_tool_h3.VanishingTool",
        modes=["sync"],
        is_available=False,
        unavailable_reason="was missing",
    )

    report = catalog_sync()

    assert registry.get_tool("test-vanishing") is not None
    assert "test-vanishing" in report.updated
    definition = ToolDefinition.objects.get(slug="test-vanishing")
    assert (definition.is_available, definition.unavailable_reason) == (True, "")


def test_a_definition_whose_implementation_now_has_another_slug_is_unavailable(db):
    ToolDefinition.objects.create(
        slug="old-noop-slug", name="Old No-op", implementation="tests.tools.NoopTool", modes=["sync"]
    )
    try:
        report = catalog_sync()
    finally:
        registry.unregister(NoopTool.slug)

    old = ToolDefinition.objects.get(slug="old-noop-slug")
    assert "old-noop-slug" in report.unavailable
    assert (old.is_available, bool(old.unavailable_reason)) == (False, True)


# --- Entry points -----------------------------------------------------------------------

ENTRY_POINT_PACKAGE = textwrap.dedent(
    """
    from decimal import Decimal

    from tools.sdk import Tool

    NOT_A_TOOL = object()


    class EntryPointTool(Tool):
        slug = "test-entry-point"
        name = "Test Entry Point"
        category = "third-party"
        base_credits = Decimal("0.02")

        def run(self, inputs, ctx):
            return {"from": "a plug-in"}


    class Impostor(Tool):
        slug = "json-transform"
        name = "Not the real JSON Transform"
    """
)


@pytest.fixture
def plugin_distribution(tmp_path: Path, monkeypatch) -> Path:
    """A tiny installed distribution declaring tools in the ``toolexec.tools`` group."""
    package = tmp_path / "mypkg_h3"
    package.mkdir()
    (package / "__init__.py").write_text(ENTRY_POINT_PACKAGE)
    dist_info = tmp_path / "mypkg_h3-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg-h3\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[toolexec.tools]\n"
        "entry-tool = mypkg_h3:EntryPointTool\n"
        "missing = mypkg_h3_missing:Nope\n"
        "not-a-tool = mypkg_h3:NOT_A_TOOL\n"
        "impostor = mypkg_h3:Impostor\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    registry.unregister("test-entry-point")
    sys.modules.pop("mypkg_h3", None)


def test_the_distribution_is_visible_to_importlib_metadata(plugin_distribution):
    names = {ep.name for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}

    assert {"entry-tool", "missing", "not-a-tool", "impostor"} <= names


def test_load_entry_points_registers_a_third_party_tool(plugin_distribution, caplog):
    with caplog.at_level(logging.ERROR, logger="tools.registry"):
        registry.load_entry_points()

    tool = registry.get_tool("test-entry-point")
    assert tool is not None
    assert registry.implementation_path(tool) == "mypkg_h3.EntryPointTool"


def test_a_broken_entry_point_is_logged_not_raised(plugin_distribution, caplog):
    with caplog.at_level(logging.ERROR, logger="tools.registry"):
        registry.load_entry_points()

    messages = [record.getMessage() for record in caplog.records if record.name == "tools.registry"]
    assert any("mypkg_h3_missing:Nope" in message for message in messages)
    assert any("mypkg_h3:NOT_A_TOOL" in message for message in messages)
    assert any("mypkg_h3:Impostor" in message for message in messages)
    assert registry.get_tool("test-entry-point") is not None  # the good one still loaded


def test_a_plug_in_cannot_take_over_a_built_in_slug(plugin_distribution):
    registry.load_entry_points()

    assert registry.get_tool("json-transform") is JsonTransform


def test_app_start_up_loads_entry_points_without_raising(plugin_distribution):
    apps.get_app_config("tools").ready()

    assert registry.get_tool("test-entry-point") is not None


def test_an_entry_point_tool_syncs_into_the_catalog_and_runs(api, user, plugin_distribution):
    registry.load_entry_points()
    report = catalog_sync()

    assert "test-entry-point" in report.created
    definition = ToolDefinition.objects.get(slug="test-entry-point")
    assert (definition.category, definition.base_credits) == ("third-party", Decimal("0.02"))
    assert api.get("/api/v1/tools/test-entry-point/").json()["is_available"] is True
    instance = instance_create(owner=user, tool=definition, name="plug-in")
    response = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", {}, format="json")
    assert response.json()["data"] == {"from": "a plug-in"}
