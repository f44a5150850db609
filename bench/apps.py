from django.apps import AppConfig


class BenchConfig(AppConfig):
    name = "bench"
    verbose_name = "Benchmarks"

    def ready(self) -> None:
        from tools import registry

        from .tools import BENCH_TOOLS

        for tool in BENCH_TOOLS:
            registry.register(tool)
