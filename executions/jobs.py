"""RQ entry points. They take ids only, and call one service each."""

from django.db import close_old_connections
from rq import get_current_job

from .services.jobs import job_run
from .services.recovery import jobs_reap


def run(job_id: str) -> None:
    close_old_connections()
    current = get_current_job()
    job_run(job_id=job_id, worker_name=(current.worker_name or "") if current is not None else "")


def reap() -> dict[str, int]:
    return jobs_reap()
