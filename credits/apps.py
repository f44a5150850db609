from django.apps import AppConfig


class CreditsConfig(AppConfig):
    """Owners' credit accounts, holds and settlement, the ledger and adjustments. It imports
    no app above it (instances, executions): a run's ledger line is linked from the run's side
    (``Execution.ledger_entry``)."""

    name = "credits"
    verbose_name = "Billing"
