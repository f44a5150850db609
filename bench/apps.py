import os

from django.apps import AppConfig


class BenchConfig(AppConfig):
    name = "bench"
    verbose_name = "Benchmarks"

    def ready(self) -> None:
        from tools import registry

        from .tools import BENCH_TOOLS

        for tool in BENCH_TOOLS:
            registry.register(tool)
        if os.environ.get("BENCH_ENQUEUE_OFF") == "1":
            # Benchmark 2's baseline arm: the accept path without RQ's enqueue (bench code only).
            from .async_accept import enqueue_switch_off

            enqueue_switch_off()
