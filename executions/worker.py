"""The RQ worker class toolexec runs (`manage.py rqworker --worker-class executions.worker.ToolexecWorker`).

RQ's forking worker, with three additions so no job state lies:

- the process watching a work-horse reports the job alive every TOOLEXEC_JOB_HEARTBEAT_SECONDS;
- when a work-horse dies (SIGKILL, out of memory), its job ends at once (WORKER_LOST, or a
  retry where the tool allows one): RQ itself calls no failure callback then;
- the reaper, which ends jobs whose worker vanished altogether and enforces overdue
  cancellations, runs between jobs, every maintenance interval while idle, and at every
  heartbeat while this worker watches a job (so a busy worker still reaps, and stops a
  cancelled job that never checks), and queues again the jobs Redis lost. It is three indexed
  queries, and a Redis pipeline when a queued job is older than TOOLEXEC_QUEUE_RECOVERY_SECONDS.

and five so a work-horse starts quickly (docs/benchmarks.md, benchmarks 3 and 4):

- the worker keeps one PostgreSQL connection open, *lends* it to each work-horse it forks and
  takes it back when the horse reports that it left the connection idle. A horse would
  otherwise open its own connection per job: a new server process, whose catalog caches are
  cold for every table the job touches. While a horse has the connection, this process does
  not use it (heartbeats open a connection of their own, closed once the horse is done); a
  horse that did not hand it back (killed, timed out, failed mid-transaction) leaves a
  connection in an unknown state, which this process closes without a word to the server;
- it lends a Redis connection the same way, a second one beside its own (which it goes on
  using for heartbeats while the horse runs). redis-py's pool starts empty after fork(), so
  a horse's first command would otherwise connect and greet the server (two more round
  trips): in a freshly forked process that first command took 4.0 ms, and 1.6 ms on a
  connection it is given. A horse that does not hand it back (killed, or left it busy or
  disconnected) takes it with it: this process disconnects its copy;
- the worker claims and checks each job before it forks the horse (``job_claim_ahead``), on
  the session it then lends: the horse inherits the claimed job with its related rows, its
  readiness and its unsealed inputs. Built in the horse, those cost a freshly forked process
  3 ms of copied pages. If the claim fails here, the horse claims the job itself, as it always
  could; what the check raises, the horse raises;
- what the worker has built by the time it starts working (Django, the app, the catalog) is
  frozen out of the garbage collector's sight, so a collection in a horse does not walk, and
  copy page by page, the parent's whole heap;
- what every horse would otherwise do for itself the first time is done once here, before the
  first fork (``crypto_prepare``): the ciphers that open a job's sealed inputs are set up
  (OpenSSL looks them up on first use, 3 ms); and redis-py's name and version for its connection
  greeting are read once (it reads them from the installed package's metadata for every new
  connection, and a horse's first Redis command opens one).

Job descriptions are not logged: the log carries job ids only.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import time
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from redis.connection import ConnectionPool
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.worker import Worker

from instances.crypto import crypto_prepare

from . import jobs  # noqa: F401 - the jobs' entry points, imported once here rather than by every work-horse
from .services import (
    RUN,
    job_claim_ahead,
    job_claims_forget,
    job_heartbeat,
    job_horse_lost,
    jobs_reap,
)

logger = logging.getLogger(__name__)

HANDED_BACK = 1  # what a work-horse writes in a shared byte when it leaves a lent connection idle
DATABASE, REDIS = 0, 1  # which byte: the lent PostgreSQL connection's, the lent Redis connection's
HANDED_BACK_FRESH_SECONDS = 1.0  # a connection seen to work this recently is lent unchecked


class ToolexecWorker(Worker):
    log_job_description = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("job_monitoring_interval", settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS)
        kwargs.setdefault("maintenance_interval", settings.TOOLEXEC_JOB_STALE_SECONDS // 2 or 1)
        kwargs["log_job_description"] = False
        super().__init__(*args, **kwargs)
        self.connection.connection_pool.connection_kwargs.setdefault("driver_info", DriverInfo())
        # A byte per lent connection, shared with every work-horse (an anonymous shared
        # mapping outlives fork()).
        self._handback = mmap.mmap(-1, 2)
        self._lent: Any = None  # the driver connection the current horse was forked with
        self._lent_close_at: float | None = None
        self._vouched_at = float("-inf")  # when the connection to lend was last seen to work
        self._redis_spare: Any = None  # the Redis connection lent to every horse
        self._redis_lent_socket: Any = None  # its socket when the current horse was forked

    @property
    def dequeue_timeout(self) -> int:
        # Wake up while idle often enough to run maintenance (the reaper) on time.
        return max(1, min(super().dequeue_timeout, self.maintenance_interval))

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        crypto_prepare()
        # Once, not before every fork: what this process allocates later stays collectable.
        gc.collect()
        gc.freeze()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        # Connect while idle, so the next job's horse finds its connections ready.
        self._database_ready()
        self._redis_ready()
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        for other in connections.all(initialized_only=True):
            if other.alias != DEFAULT_DB_ALIAS or other.vendor != "postgresql":
                other.close()  # a horse inherits no other database socket
        self._database_ready()  # again: it may have died while this worker waited for the job
        self._redis_ready()
        self._claim_ahead(job)
        database = connections[DEFAULT_DB_ALIAS]
        self._lent, self._lent_close_at = database.connection, database.close_at
        self._redis_lent_socket = self._redis_spare._sock  # (redis-py keeps it private)
        self._handback[DATABASE] = self._handback[REDIS] = 0
        try:
            super().execute_job(job, queue)
        finally:
            job_claims_forget()
            self._database_return()
            self._redis_return()

    def fork_work_horse(self, job: RQJob, queue: Queue) -> None:
        super().fork_work_horse(job, queue)
        # Only this process gets here (the horse ends in os._exit()): the connection is the
        # horse's until it ends. Forgotten, not closed: closing would end the horse's session.
        connections[DEFAULT_DB_ALIAS].connection = None

    def main_work_horse(self, job: RQJob, queue: Queue) -> None:
        # The connection lent was checked by this worker, or seen to work a moment ago
        # (_database_ready): the horse, whose entry point closes old connections as a request
        # would, does not check it again.
        connections[DEFAULT_DB_ALIAS].health_check_enabled = False  # (a connection it opens itself resets it)
        if self._redis_spare is not None:
            _redis_adopt(self.connection.connection_pool, self._redis_spare)
        super().main_work_horse(job, queue)

    def perform_job(self, job: RQJob, queue: Queue) -> bool:
        try:
            return super().perform_job(job, queue)
        finally:
            if self.is_horse and self._lent is not None and _connection_idle(DEFAULT_DB_ALIAS, self._lent):
                self._handback[DATABASE] = HANDED_BACK
            pool, socket = self.connection.connection_pool, self._redis_lent_socket
            if self.is_horse and socket is not None and _redis_idle(pool, self._redis_spare, socket):
                self._handback[REDIS] = HANDED_BACK

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
        # RQ may fork its scheduler again here: no database socket may go with it.
        connections.close_all()
        super().run_maintenance_tasks()
        jobs_reap()

    def _claim_ahead(self, job: RQJob) -> None:
        """Claim and check a toolexec job before forking its horse (``job_claim_ahead``), on
        the session the horse is lent (PostgreSQL only: an SQLite connection must not cross
        fork(), so there the horse claims). If the claim fails, the horse claims the job, as it
        would anyway."""
        if job.func_name != RUN or connections[DEFAULT_DB_ALIAS].vendor != "postgresql":
            return
        try:
            job_claim_ahead(job_id=job.args[0], worker_name=self.name)
        except Exception:
            logger.exception("Could not claim job %s before forking; its work-horse will", job.id)

    def _database_ready(self) -> None:
        """An open, young, working connection to lend to the next horse (PostgreSQL only: an
        SQLite connection must not cross fork()). A database that does not answer now is the
        horse's to find out: it connects by itself and records the failure.

        Working: seen to answer a health check (CONN_HEALTH_CHECKS) here, unless a horse handed
        it back, or it was checked, less than HANDED_BACK_FRESH_SECONDS ago. The horse does not
        check it again: that would be a round trip per job."""
        database = connections[DEFAULT_DB_ALIAS]
        if database.vendor != "postgresql":
            database.close()
            return
        database.close_if_unusable_or_obsolete()  # errors, age
        fresh = database.connection is not None and time.monotonic() - self._vouched_at <= HANDED_BACK_FRESH_SECONDS
        database.health_check_done = fresh
        try:
            database.close_if_health_check_failed()
            database.ensure_connection()
        except DatabaseError:
            logger.warning("No database connection to lend to the next work-horse", exc_info=True)
        else:
            self._vouched_at = self._vouched_at if fresh else time.monotonic()

    def _database_return(self) -> None:
        """After a horse: take the lent connection back if the horse handed it back idle, else
        drop this process's copy of it."""
        database = connections[DEFAULT_DB_ALIAS]
        lent, self._lent = self._lent, None
        if lent is None or database.connection is lent:
            return  # nothing was lent, or the fork failed and it never left
        database.close()  # the connection this process opened meanwhile (heartbeats), if any
        if self._handback[DATABASE] != HANDED_BACK:
            _connection_forget(lent)
            return
        # Its state here is as it was at fork(), and the horse left the session that way: idle.
        database.connection = lent
        database.close_at = self._lent_close_at
        database.in_atomic_block = database.needs_rollback = database.closed_in_transaction = False
        database.savepoint_ids, database.atomic_blocks = [], []
        database.errors_occurred = False
        database.health_check_done = False
        self._vouched_at = time.monotonic()  # its last statement, the horse's, just worked

    def _redis_ready(self) -> None:
        """A connected Redis connection to lend to the next horse, made by the worker's own pool
        (same server, options and greeting) but kept out of it, so this process never uses it.
        One that fails to connect now is lent unconnected: the horse connects it, as it would
        have connected a connection of its own. One that the server closed meanwhile is
        noticed by the horse's pool before its first command (it reads the socket) and
        reconnected."""
        if self._redis_spare is None:
            self._redis_spare = self.connection.connection_pool.make_connection()
        try:
            self._redis_spare.connect()  # nothing to do while connected
        except (RedisError, OSError):
            logger.warning("No Redis connection to lend to the next work-horse", exc_info=True)

    def _redis_return(self) -> None:
        """After a horse: keep the lent Redis connection if the horse handed it back idle;
        else drop it (the horse has ended: nothing else uses the socket)."""
        if self._redis_spare is not None and self._handback[REDIS] != HANDED_BACK:
            self._redis_spare.disconnect()


def _redis_adopt(pool: ConnectionPool, lent: Any) -> None:
    """In a work-horse: the pool, emptied as its first use after fork() would empty it, with
    the lent connection as its one idle connection. (redis-py has no public way to hand a pool
    a connection; tests/test_worker_budget.py holds that a horse uses the lent one.)"""
    pool.reset()
    lent.pid = os.getpid()
    pool._available_connections.append(lent)
    pool._created_connections += 1


def _redis_idle(pool: ConnectionPool, lent: Any, socket: Any) -> bool:
    """Whether the horse leaves the lent Redis connection as it got it: back in the pool, on
    the socket it was lent. Not so if the horse still holds it, or if it was disconnected: an
    error while reading a reply disconnects it (redis-py), so no reply is left unread on it;
    and one the horse connected anew ends with the horse, while the worker holds the old one."""
    return lent in pool._available_connections and lent._sock is socket


def _connection_idle(alias: str, raw: Any) -> bool:
    """Whether the horse leaves the lent connection as it got it: the same one, open, no
    transaction, no error since its last commit."""
    database = connections[alias]
    if database.connection is not raw or database.in_atomic_block or database.errors_occurred:
        return False
    return not raw.closed and raw.info.transaction_status == 0  # idle: psycopg2 and psycopg 3 alike


def _connection_forget(raw: Any) -> None:
    """Close this process's copy of a connection a horse may have left in any state, without a
    word to the server: a Terminate message could land in the middle of whatever the horse left
    half-sent. The server sees the socket close and ends the session, rolling back what is open."""
    if raw.closed:
        return
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), raw.fileno())  # the driver's goodbye goes nowhere
    raw.close()
