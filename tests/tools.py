"""Tools that exist only for the tests, and a fixture-friendly way to register them.

Register one with the ``catalog`` fixture (see conftest.py): it adds the tools to the registry,
syncs the catalog, and removes them again after the test.
"""

from decimal import Decimal
from typing import Any

from tools.errors import UpstreamError
from tools.sdk import ASYNC, SYNC, CredentialSlot, ExecutionContext, Tool


class NoopTool(Tool):
    slug = "test-noop"
    name = "Test No-op"
    input_schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    modes = frozenset({SYNC, ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        return {"echo": inputs.get("echo")}


class PricedTool(Tool):
    """Costs 0.01 a run plus 0.5 per unit of usage it reports."""

    slug = "test-priced"
    name = "Test Priced"
    input_schema = {
        "type": "object",
        "properties": {"units": {"type": "number", "minimum": 0}},
        "required": ["units"],
        "additionalProperties": False,
    }
    modes = frozenset({SYNC})
    base_credits = Decimal("0.01")
    credits_per_unit = Decimal("0.5")

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        ctx.usage(inputs["units"])
        return {"ok": True}


class AsyncOnlyTool(Tool):
    slug = "test-async-only"
    name = "Test Async Only"
    modes = frozenset({ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        return {}


class ExplodingTool(Tool):
    slug = "test-exploding"
    name = "Test Exploding"
    modes = frozenset({SYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        raise RuntimeError("boom at /srv/secret/path.py line 3")


class UpstreamFailingTool(Tool):
    slug = "test-upstream-failing"
    name = "Test Upstream Failing"
    modes = frozenset({SYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        raise UpstreamError("the server answered 502 Bad Gateway", provider="Example API")


class SlowTool(Tool):
    """Sleeps ``seconds`` in steps, checking for a stop between them."""

    slug = "test-slow"
    name = "Test Slow"
    input_schema = {"type": "object", "properties": {"seconds": {"type": "number"}}}
    modes = frozenset({SYNC, ASYNC})
    timeout_seconds = 60

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        ctx.sleep(float(inputs.get("seconds", 5)))
        return {"slept": True}


class GoogleSheetTool(Tool):
    """Stands in for a tool that needs a Google account."""

    slug = "test-google-sheet"
    name = "Google Drive Reader"
    input_schema = {"type": "object", "properties": {"file_id": {"type": "string"}}, "required": ["file_id"]}
    credential_slots = (CredentialSlot("OAUTH_TOKEN", provider="google", kind="oauth2", scopes=("drive.readonly",)),)
    modes = frozenset({SYNC, ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        ctx.credential("OAUTH_TOKEN")
        return {"file_id": inputs["file_id"]}


ALL_TEST_TOOLS = [NoopTool, PricedTool, AsyncOnlyTool, ExplodingTool, UpstreamFailingTool, SlowTool, GoogleSheetTool]
