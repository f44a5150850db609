"""An idle WebSocket costs nothing (issue 23): with sockets open on running jobs that publish
nothing, the ASGI server makes no database query and sends Redis no command beyond its
subscription. bench/websocket_fanout.py measures the same with 1,000 sockets.

Counted outside the product, on the server production runs (``DATABASE_CONN_MAX_AGE=0 daphne
toolexec.asgi:application``, README): its queries from PostgreSQL's statistics of the test
database (with no persistent connection, every query opens a session, and ``sessions`` counts
client sessions only, not autovacuum's), its connections from ``pg_stat_activity`` by an
``application_name`` of its own; its Redis commands from ``INFO commandstats`` of a redis-server
of the test's own (tests/test_queue_recovery.py's), so that nothing else is counted.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings as django_settings
from django.db import connection

from core.models import ApiToken
from executions import events
from executions.models import Job
from executions.services.enqueue import execution_enqueue
from executions.services.jobs import job_claim
from scripts.run import free_port, production_asgi_command
from tests.conftest import _database_url, web_server
from tests.test_queue_recovery import PrivateRedis
from tests.ws_client import PlainWebSocket

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

JOBS = 4  # an owner's share of running jobs (TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER)
SOCKETS_PER_JOB = 5
IDLE_SECONDS = 3
APP_NAME = "toolexec-test-idle-asgi"  # the server's application_name in pg_stat_activity


@pytest.fixture
def private_redis(tmp_path: Path, settings: Any) -> Iterator[PrivateRedis]:
    """A redis-server of the test's own; this process publishes to it (as the server listens on it)."""
    server = PrivateRedis(tmp_path)
    server.start()
    settings.RQ_QUEUES = {"default": {**settings.RQ_QUEUES["default"], "URL": server.url}}
    yield server
    server.kill()


@pytest.fixture
def production_asgi_server(transactional_db: Any, private_redis: PrivateRedis, tmp_path: Path) -> Iterator[int]:
    """The README's production ASGI server (``production_asgi_command``: uvicorn) with
    ``DATABASE_CONN_MAX_AGE=0``, as production runs it, on the test database and the private
    Redis; its port."""
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": _database_url(connection.settings_dict),
        "DATABASE_CONN_MAX_AGE": "0",
        "PGAPPNAME": APP_NAME,
        "REDIS_URL": private_redis.url,
        "SECRET_KEY": django_settings.SECRET_KEY,
        "TOOLEXEC_ENCRYPTION_KEYS": ",".join(django_settings.TOOLEXEC_ENCRYPTION_KEYS),
        "PYTHONUNBUFFERED": "1",
    }
    with web_server(production_asgi_command(port), port=port, env=env, log_path=tmp_path / "asgi.log"):
        yield port


class OutsideCounts:
    """What the server costs, read from PostgreSQL (a connection to the ``postgres`` database:
    these readings count in no test-database figure) and from the private Redis."""

    def __init__(self, private_redis: PrivateRedis) -> None:
        settings_dict = connection.settings_dict
        self.database = settings_dict["NAME"]
        self.pg = psycopg.connect(_database_url({**settings_dict, "NAME": "postgres"}))
        self.pg.autocommit = True
        self.redis = private_redis.client()

    def database_now(self) -> dict[str, int]:
        with self.pg.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT sessions, xact_commit + xact_rollback, (SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = %s) FROM pg_stat_database WHERE datname = %s",
                (self.database, APP_NAME, self.database),
            )
            sessions, transactions, held = cursor.fetchone()
        return {"sessions": sessions, "transactions": transactions, "held": held}

    def database_settled(self, quiet: float = 1.5) -> dict[str, int]:
        """Once the counters have not moved for ``quiet`` s (a backend reports within about a
        second of going idle, or when it exits)."""
        last, since = self.database_now(), time.monotonic()
        while time.monotonic() - since < quiet:
            time.sleep(0.25)
            now = self.database_now()
            if (now["sessions"], now["transactions"]) != (last["sessions"], last["transactions"]):
                since = time.monotonic()
            last = now
        return last

    def commands(self) -> Counter[str]:
        stats = self.redis.info("commandstats")
        return Counter({name.removeprefix("cmdstat_"): stat["calls"] for name, stat in stats.items()})

    def around(self, seconds: float = 0.0, *, then: Any = None) -> dict[str, Any]:
        """The counts over ``seconds`` of nothing, or over ``then()``: sessions opened, the
        server's connections at either end, transactions (autovacuum's too), Redis commands by
        name (less the INFO that read the first count)."""
        before = self.database_settled()
        commands_before = self.commands()
        if then is not None:
            then()
        time.sleep(seconds)
        commands = self.commands() - commands_before
        after = self.database_settled()
        commands["info"] -= 1
        return {
            "sessions": after["sessions"] - before["sessions"],
            "held": max(before["held"], after["held"]),
            "transactions": after["transactions"] - before["transactions"],
            "commands": {name: calls for name, calls in commands.items() if calls > 0},
        }

    def close(self) -> None:
        self.pg.close()


def running_jobs(make_instance: Any, user: Any) -> list[str]:
    """Jobs accepted as execute-async accepts them and claimed as a worker claims them; no
    worker runs them, so they stay RUNNING and quiet."""
    instance = make_instance("demo-long-task", owner=user)
    jobs = []
    for steps in range(JOBS):
        job = execution_enqueue(instance=instance, inputs={"steps": steps + 3}).job
        assert job_claim(job_id=str(job.pk), worker_name="test") is not None
        jobs.append(str(job.pk))
    return jobs


def test_idle_websockets_cost_the_asgi_server_no_database_query_and_no_redis_command(
    production_asgi_server, private_redis, make_instance, user
):
    jobs = running_jobs(make_instance, user)
    _, token = ApiToken.issue(user=user)

    def follow(job_id: str) -> PlainWebSocket:
        socket = PlainWebSocket(
            "127.0.0.1", production_asgi_server, f"/ws/v1/jobs/{job_id}/", subprotocols=["toolexec.token", token]
        )
        kind, text = socket.receive()
        assert kind == "text" and json.loads(text)["status"] == Job.Status.RUNNING, text
        return socket

    sockets = [follow(job_id) for job_id in jobs for _ in range(SOCKETS_PER_JOB)]
    counts = OutsideCounts(private_redis)
    try:
        idle = counts.around(IDLE_SECONDS)
        # The counters see the server when it works: one more socket's opening reads the
        # database and the job's stream.
        opening = counts.around(then=lambda: sockets.append(follow(jobs[0])))
        for number, job_id in enumerate(jobs):
            events.publish(job_id, {"event": "progress", "status": "RUNNING", "progress": 50, "n": number})
        heard = [json.loads(socket.receive()[1]) for socket in sockets]
    finally:
        counts.close()
        for socket in sockets:
            socket.close()

    assert idle["sessions"] == 0 and idle["held"] == 0, f"the idle server queried the database: {idle}"
    assert not {name for name in idle["commands"] if name != "ping"}, f"the idle server used Redis: {idle}"
    assert idle["commands"].get("ping", 0) <= IDLE_SECONDS, f"more than a keep-alive a second: {idle}"
    assert opening["sessions"] >= 1 and opening["commands"].get("xrevrange", 0) >= 1, opening
    # Every socket was open and subscribed all along: each gets its job's next event.
    assert [event["n"] for event in heard] == [number for number in range(JOBS) for _ in range(SOCKETS_PER_JOB)] + [0]
