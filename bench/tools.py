"""Tools that exist only for the benchmarks (registered by bench.apps.BenchConfig)."""

import time
from typing import Any

from tools.sdk import ASYNC, SYNC, ExecutionContext, Tool


class BenchNoopTool(Tool):
    """Does nothing: what execute-sync costs beyond the tool itself."""

    slug = "bench-noop"
    name = "Bench No-op"
    input_schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    modes = frozenset({SYNC, ASYNC})

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        return {"echo": inputs.get("echo")}


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


BENCH_TOOLS = [BenchNoopTool, BenchProgressTool]
