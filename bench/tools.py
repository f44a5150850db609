"""Tools that exist only for the benchmarks (registered by bench.apps.BenchConfig)."""

import time
from typing import Any

from executions import events
from tools.sdk import ASYNC, SYNC, ExecutionContext, Tool

from .bare_rq import first_line_record


class BenchNoopTool(Tool):
    """Does nothing: what execute-sync costs beyond the tool itself."""

    slug = "bench-noop"
    name = "Bench No-op"
    input_schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    modes = frozenset({SYNC, ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        return {"echo": inputs.get("echo")}


class BenchCachedNoopTool(BenchNoopTool):
    """The no-op, cacheable, its results kept a day (longer than any run of the benchmarks):
    benchmark 9's cache hits."""

    slug = "bench-cached-noop"
    name = "Bench Cached No-op"
    cacheable = True
    cache_ttl_default = 24 * 3600


class BenchProgressTool(Tool):
    """Loops ``n`` times, calling ``ctx.progress(i * 100 / n)`` on each turn when ``progress``
    is true and nothing otherwise; with ``spread_seconds``, pauses a hundred times along the
    way so the loop lasts that long. Returns how long the loop took."""

    slug = "bench-progress"
    name = "Bench Progress"
    input_schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 100},
            "progress": {"type": "boolean"},
            "spread_seconds": {"type": "number", "minimum": 0},
        },
        "required": ["n", "progress"],
    }
    modes = frozenset({ASYNC})
    timeout_seconds = 600

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        n, report, spread = inputs["n"], inputs["progress"], inputs.get("spread_seconds", 0)
        pause_every, pause = n // 100, spread / 100
        started = time.perf_counter()
        if report:
            for i in range(n):
                ctx.progress(i * 100 / n)
                if pause and i % pause_every == 0:
                    time.sleep(pause)
        else:
            for i in range(n):
                if pause and i % pause_every == 0:
                    time.sleep(pause)
        return {"loop_seconds": time.perf_counter() - started}


class BenchFirstLineTool(Tool):
    """Records the wall-clock time of its first line (and its process, and with ``rss`` its
    resident memory) in the Redis list ``key``, then does nothing: the worker benchmarks."""

    slug = "bench-first-line"
    name = "Bench First Line"
    input_schema = {
        "type": "object",
        "properties": {"key": {"type": "string"}, "rss": {"type": "boolean"}},
        "required": ["key"],
    }
    modes = frozenset({ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        ts = time.time()
        first_line_record(events.redis(), inputs["key"], ts=ts, ident=ctx.execution_id, rss=inputs.get("rss", False))
        return {}


class BenchLastLineTool(Tool):
    """Returns the wall-clock times of its first and last lines as its output, which the
    product records with its execution: nothing of the tool runs after the last line but the
    return. Benchmark 10's first step, whose end its dependent's start is measured from."""

    slug = "bench-last-line"
    name = "Bench Last Line"
    input_schema = {"type": "object", "properties": {}}
    modes = frozenset({ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        first_line = time.time()
        return {"first_line": first_line, "last_line": time.time()}


BENCH_TOOLS = [BenchNoopTool, BenchCachedNoopTool, BenchProgressTool, BenchFirstLineTool, BenchLastLineTool]
