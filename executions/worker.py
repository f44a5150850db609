"""The RQ worker class toolexec runs (`manage.py rqworker --worker-class executions.worker.ToolexecWorker`).

RQ's forking worker, with three additions so no job state lies:

- the process watching a work-horse reports the job alive every TOOLEXEC_JOB_HEARTBEAT_SECONDS;
- when a work-horse dies (SIGKILL, out of memory), its job ends at once (WORKER_LOST, or a
  retry where the tool allows one): RQ itself calls no failure callback then;
- the reaper, which ends jobs whose worker vanished altogether and enforces overdue
  cancellations, runs between jobs, every maintenance interval while idle, and at every
  heartbeat while this worker watches a job (so a busy worker still reaps, and stops a
  cancelled job that never checks). It is two indexed queries over RUNNING jobs.

Job descriptions are not logged: the log carries job ids only.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import connections
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.worker import Worker

from .services import job_heartbeat, job_horse_lost, jobs_reap

logger = logging.getLogger(__name__)


class ToolexecWorker(Worker):
    log_job_description = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("job_monitoring_interval", settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS)
        kwargs.setdefault("maintenance_interval", settings.TOOLEXEC_JOB_STALE_SECONDS // 2 or 1)
        kwargs["log_job_description"] = False
        super().__init__(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        # Wake up while idle often enough to run maintenance (the reaper) on time.
        return max(1, min(super().dequeue_timeout, self.maintenance_interval))

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        # The work-horse is forked from this process: it must not inherit a database socket.
        connections.close_all()
        try:
            super().execute_job(job, queue)
        finally:
            connections.close_all()

    def maintain_heartbeats(self, job: RQJob) -> None:
        super().maintain_heartbeats(job)
        try:
            job_heartbeat(rq_job_id=job.id)
            jobs_reap()
        except Exception:
            # Watching the horse must go on; the next beat tries again.
            logger.exception("Heartbeat or reaping failed while watching job %s", job.id)

    def handle_work_horse_killed(self, job: RQJob, retpid: int, ret_val: int, rusage: Any) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        try:
            job_horse_lost(rq_job_id=job.id, reason=f"work-horse {retpid} ended with status {ret_val}")
        except Exception:
            # The reaper ends the job once its heartbeat is stale; the worker itself must live on.
            logger.exception("Could not record the loss of job %s", job.id)

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            jobs_reap()
        finally:
            connections.close_all()
