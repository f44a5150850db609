"""RQ entry points. They take ids only, and call one service each."""

import os

from django.db import close_old_connections

from .services import job_run, jobs_reap


def run(job_id: str) -> None:
    close_old_connections()
    job_run(job_id=job_id, worker_name=os.environ.get("RQ_WORKER_ID", ""))


def reap() -> dict[str, int]:
    return jobs_reap()
