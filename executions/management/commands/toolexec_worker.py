"""`manage.py toolexec_worker [queue ...] [--processes N]`: the warm worker (executions/worker.py).

A supervisor that runs N job processes, each running many jobs, and RQ's scheduler; SIGTERM
finishes the jobs in progress and stops.
"""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from executions.worker import WorkerSupervisor


class Command(BaseCommand):
    help = "Run toolexec's warm worker: a supervisor and its job processes (RQ SimpleWorkers)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("queues", nargs="*", default=["default"], help="RQ queues to work on (default: default)")
        parser.add_argument(
            "--processes",
            type=int,
            default=settings.TOOLEXEC_WORKER_PROCESSES,
            help="job processes to run (default: TOOLEXEC_WORKER_PROCESSES)",
        )
        parser.add_argument(
            "--without-scheduler", action="store_true", help="run no RQ scheduler (jobs scheduled for later wait)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["processes"] < 1:
            raise CommandError("--processes must be at least 1")
        supervisor = WorkerSupervisor(
            options["queues"], processes=options["processes"], with_scheduler=not options["without_scheduler"]
        )
        supervisor.run()
