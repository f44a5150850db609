from django.apps import AppConfig


class WorkflowsConfig(AppConfig):
    """Versioned DAGs of an owner's tool instances (DESIGN.md §10). Every step runs as an
    ordinary async execution; the database advances a run: executions tells this app that a
    step's execution started or ended through its signals (executions/signals.py), and this app
    connects to them here, so that executions imports nothing of workflows."""

    name = "workflows"
    verbose_name = "Workflows"

    def ready(self) -> None:
        from executions import live

        from . import receivers  # noqa: F401  (connects the signal receivers)
        from .streams import runs_ended

        live.ENDED_LOOKUPS["workflow-run"] = runs_ended  # Topic.run's kind
