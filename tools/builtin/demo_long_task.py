from decimal import Decimal
from typing import Any

from ..registry import register
from ..sdk import ASYNC, ExecutionContext, Tool


@register
class DemoLongTask(Tool):
    """Counts through ``steps`` steps of ``step_seconds`` each, reporting progress as it goes.

    For demos and tests of the async path: it honours cancellation between steps and while
    waiting, and stops at its deadline.
    """

    slug = "demo-long-task"
    name = "Demo Long Task"
    description = "Waits through a number of steps, reporting progress; for trying out async runs."
    category = "demo"
    input_schema = {
        "type": "object",
        "properties": {
            "steps": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 10},
            "step_seconds": {"type": "number", "minimum": 0, "maximum": 60, "default": 1},
        },
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {"steps_completed": {"type": "integer"}, "seconds": {"type": "number"}},
    }
    modes = frozenset({ASYNC})
    cacheable = True  # so caching can be watched on a slow tool
    timeout_seconds = 3600
    base_credits = Decimal("0.01")

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        steps = int(inputs.get("steps", 10))
        step_seconds = float(inputs.get("step_seconds", 1))
        ctx.progress(0, "Starting", step_index=0, steps_total=steps)
        for index in range(1, steps + 1):
            ctx.sleep(step_seconds)
            ctx.progress(index * 100 / steps, f"Step {index} of {steps}", step_index=index, steps_total=steps)
        return {"steps_completed": steps, "seconds": round(steps * step_seconds, 3)}
