"""Tools that exist only for the tests, and a fixture-friendly way to register them.

Register one with the ``catalog`` fixture (see conftest.py): it adds the tools to the registry,
syncs the catalog, and removes them again after the test.
"""

import time
from decimal import Decimal
from typing import Any

from tools.errors import UpstreamError, UpstreamRateLimited
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


# --- Async worker tests (tests/test_async_worker.py, tests/test_async_recovery.py) -----------


class HardSleepTool(Tool):
    """Sleeps with ``time.sleep`` (no checks at all), so only RQ's job timeout or its stop-job
    command can end it early; with ``cooperative`` it waits with ``ctx.sleep`` instead."""

    slug = "test-hard-sleep"
    name = "Test Hard Sleep"
    input_schema = {
        "type": "object",
        "properties": {"seconds": {"type": "number"}, "cooperative": {"type": "boolean"}},
    }
    modes = frozenset({ASYNC})
    timeout_seconds = 2

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        seconds = float(inputs.get("seconds", 30))
        if inputs.get("cooperative"):
            ctx.sleep(seconds)
        else:
            import time

            ctx.progress(1, "Sleeping without looking up")
            time.sleep(seconds)
        return {"slept": seconds}


class StubbornTool(Tool):
    """Reports progress once, then sleeps with ``time.sleep`` and never checks for a stop."""

    slug = "test-stubborn"
    name = "Test Stubborn"
    input_schema = {"type": "object", "properties": {"seconds": {"type": "number"}}}
    modes = frozenset({ASYNC})
    timeout_seconds = 120

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        import time

        ctx.progress(5, "Working without looking up")
        time.sleep(float(inputs.get("seconds", 60)))
        return {"done": True}


def attempts_key(execution_id: str) -> str:
    return f"toolexec-test:attempts:{execution_id}"


class FlakyTool(Tool):
    """Fails with UPSTREAM_RATE_LIMITED on its first ``failures`` attempts (counted in Redis per
    execution), then succeeds."""

    slug = "test-flaky"
    name = "Test Flaky"
    input_schema = {"type": "object", "properties": {"failures": {"type": "integer", "minimum": 0}}}
    modes = frozenset({ASYNC})
    idempotent = True
    retry_on = frozenset({"UPSTREAM_RATE_LIMITED"})
    max_attempts = 3
    retry_backoff_seconds = 0.5

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        import django_rq

        attempt = django_rq.get_connection("default").incr(attempts_key(ctx.execution_id))
        if attempt <= int(inputs.get("failures", 1)):
            raise UpstreamRateLimited("the server answered 429 Too Many Requests", provider="Example API")
        return {"attempt": attempt}


class FlakyUnsafeTool(FlakyTool):
    """The same, but running it twice is not harmless: never retried automatically."""

    slug = "test-flaky-unsafe"
    name = "Test Flaky Unsafe"
    idempotent = False


ALL_TEST_TOOLS += [HardSleepTool, StubbornTool, FlakyTool, FlakyUnsafeTool]


class ResumableTool(Tool):
    """An idempotent tool that asks to be retried when its worker is lost: its first attempt
    (counted in Redis per execution) waits ``seconds``, a later one finishes at once."""

    slug = "test-resumable"
    name = "Test Resumable"
    input_schema = {"type": "object", "properties": {"seconds": {"type": "number"}}}
    modes = frozenset({ASYNC})
    idempotent = True
    retry_on = frozenset({"WORKER_LOST"})
    max_attempts = 2
    retry_backoff_seconds = 0.5

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        import django_rq

        attempt = django_rq.get_connection("default").incr(attempts_key(ctx.execution_id))
        if attempt == 1:
            ctx.progress(10, "First attempt")
            ctx.sleep(float(inputs.get("seconds", 30)))
        return {"attempt": attempt}


ALL_TEST_TOOLS += [ResumableTool]


# --- Queue recovery (tests/test_queue_recovery.py) -------------------------------------------


def runs_recorded(runs_file: str) -> list[tuple[str, float]]:
    """The runs CountedTool recorded in ``runs_file``: (execution id, when), in order."""
    try:
        with open(runs_file) as handle:
            return [(line.split()[0], float(line.split()[1])) for line in handle if line.strip()]
    except FileNotFoundError:
        return []


class CountedTool(Tool):
    """Records each run as a line in the file named by ``runs_file`` (outside Redis: a Redis that
    loses its data must not lose the count); fails with UPSTREAM_RATE_LIMITED on an execution's
    first ``failures`` runs, and is retried after ``retry_backoff_seconds``."""

    slug = "test-counted"
    name = "Test Counted"
    input_schema = {
        "type": "object",
        "properties": {"runs_file": {"type": "string"}, "failures": {"type": "integer", "minimum": 0}},
        "required": ["runs_file"],
    }
    modes = frozenset({ASYNC})
    base_credits = Decimal("0.01")
    idempotent = True
    retry_on = frozenset({"UPSTREAM_RATE_LIMITED"})
    max_attempts = 2
    retry_backoff_seconds = 8

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        # One short append: whole lines even with several work-horses writing at once.
        with open(inputs["runs_file"], "a") as handle:
            handle.write(f"{ctx.execution_id} {time.time():.3f}\n")
        runs = [run for run in runs_recorded(inputs["runs_file"]) if run[0] == ctx.execution_id]
        if len(runs) <= int(inputs.get("failures", 0)):
            raise UpstreamRateLimited("the server answered 429 Too Many Requests", provider="Example API")
        return {"run": len(runs)}


ALL_TEST_TOOLS += [CountedTool]


# --- Warm worker tests (tests/test_warm_worker.py); registered by that module and the worker -------


class WhoAmITool(Tool):
    """Answers with the pid of the process that ran it."""

    slug = "test-whoami"
    name = "Test Who Am I"
    input_schema = {"type": "object"}
    modes = frozenset({ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        import os

        return {"pid": os.getpid()}


class NeverReturnsTool(Tool):
    """Never returns to a check point, in the way ``how`` says: ``sleep`` (``time.sleep``),
    ``socket`` (a read with no timeout from a peer that never writes), ``regex`` (catastrophic
    backtracking), ``masked`` (with the signals that could interrupt it blocked) or ``gil`` (a C
    loop that holds the GIL for hours and never returns to the interpreter, so that neither a
    signal handler nor another thread of its process runs)."""

    slug = "test-never-returns"
    name = "Test Never Returns"
    input_schema = {"type": "object", "properties": {"how": {"enum": ["sleep", "socket", "regex", "masked", "gil"]}}}
    modes = frozenset({ASYNC})
    timeout_seconds = 2

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        import os
        import re
        import signal
        import socket

        ctx.progress(1, f"Running in {os.getpid()}")
        how = inputs.get("how", "sleep")
        if how == "socket":
            reader, writer = socket.socketpair()
            reader.settimeout(None)
            reader.recv(1)
        elif how == "regex":
            re.match(r"(a+)+$", "a" * 64 + "b")
        elif how == "gil":
            time.sleep(1.2)  # first the progress report reaches the database (a thread writes it)
            sum(range(10**13))
        else:
            if how == "masked":
                signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
            time.sleep(10**6)
        return {"returned": True}


class NeverReturnsLongTool(NeverReturnsTool):
    slug = "test-never-returns-long"
    name = "Test Never Returns Long"
    timeout_seconds = 120


class SecretKeeperTool(Tool):
    """Holds its credential and its ``note`` input in locals, then fails: the traceback keeps
    them alive as long as anything keeps the failure."""

    slug = "test-secret-keeper"
    name = "Test Secret Keeper"
    input_schema = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}
    credential_slots = (CredentialSlot("OAUTH_TOKEN", provider="google", kind="oauth2"),)
    modes = frozenset({ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        kept = {"token": ctx.credential("OAUTH_TOKEN")["access_token"], "note": inputs["note"]}
        raise RuntimeError(f"failed while holding {len(kept)} values")


class SecretHunterTool(Tool):
    """Searches its own process for strings: every object the garbage collector tracks, every
    module's globals and the context variables. Takes them reversed, so that its own inputs do
    not contain them; answers with where it found them."""

    slug = "test-secret-hunter"
    name = "Test Secret Hunter"
    input_schema = {"type": "object", "properties": {"reversed": {"type": "array", "items": {"type": "string"}}}}
    modes = frozenset({ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        import contextvars
        import gc
        import os
        import sys

        wanted = [text[::-1] for text in inputs["reversed"]]
        wanted_bytes = [text.encode() for text in wanted]

        def holds(value: Any) -> bool:
            if isinstance(value, str):
                return any(text in value for text in wanted)
            if isinstance(value, bytes | bytearray):
                return any(text in value for text in wanted_bytes)
            return False

        found: list[str] = []
        for obj in gc.get_objects():
            if obj is wanted or obj is wanted_bytes:
                continue
            if isinstance(obj, dict):
                values = [*obj.keys(), *obj.values()]
            elif isinstance(obj, list | tuple | set | frozenset):
                values = list(obj)
            else:
                values = list(getattr(obj, "__dict__", {}).values()) if hasattr(obj, "__dict__") else []
            if any(holds(value) for value in values):
                found.append(f"a {type(obj).__name__}")
        for name, module in list(sys.modules.items()):
            if any(holds(value) for value in list(getattr(module, "__dict__", {}).values())):
                found.append(f"module {name}")
        found += [f"context variable {var.name}" for var, value in contextvars.copy_context().items() if holds(value)]
        return {"pid": os.getpid(), "found": found}


WARM_WORKER_TOOLS = [WhoAmITool, NeverReturnsTool, NeverReturnsLongTool, SecretKeeperTool, SecretHunterTool]


# --- Workflows (tests/test_workflow_engine.py) -----------------------------------------------


def gauge_key(name: str) -> str:
    return f"toolexec-test:gauge:{name}"


class GaugeTool(Tool):
    """Counts how many of its runs with the same ``gauge`` run at once: each adds one to a
    Redis counter while it sleeps ``seconds`` and records the count it saw (``gauge_key(name) +
    ":seen"``); gives back its ``value``."""

    slug = "test-gauge"
    name = "Test Gauge"
    input_schema = {
        "type": "object",
        "properties": {"gauge": {"type": "string"}, "seconds": {"type": "number"}, "value": {}},
        "required": ["gauge"],
    }
    modes = frozenset({ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        import django_rq

        redis, key = django_rq.get_connection("default"), gauge_key(inputs["gauge"])
        redis.rpush(f"{key}:seen", redis.incr(f"{key}:running"))
        try:
            ctx.progress(50, "Holding its place")
            ctx.sleep(float(inputs.get("seconds", 0.3)))
        finally:
            redis.decr(f"{key}:running")
        return {"value": inputs.get("value")}


class RateLimitedTool(Tool):
    """Fails with UPSTREAM_RATE_LIMITED on the first ``failures`` runs of its ``counter``
    (counted in Redis across executions), recording when each run began
    (``gauge_key(counter) + ":at"``); never retried by the job itself."""

    slug = "test-rate-limited"
    name = "Test Rate Limited"
    input_schema = {
        "type": "object",
        "properties": {"counter": {"type": "string"}, "failures": {"type": "integer", "minimum": 0}},
        "required": ["counter"],
    }
    modes = frozenset({ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        import django_rq

        redis, key = django_rq.get_connection("default"), gauge_key(inputs["counter"])
        redis.rpush(f"{key}:at", time.time())
        runs = redis.incr(f"{key}:runs")
        if runs <= int(inputs.get("failures", 0)):
            raise UpstreamRateLimited("the server answered 429 Too Many Requests", provider="Example API")
        return {"runs": runs}


ALL_TEST_TOOLS += [GaugeTool, RateLimitedTool]
