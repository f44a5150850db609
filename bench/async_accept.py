"""Benchmark 2: execute-async of a no-op tool through gunicorn (2 sync workers) against the same
endpoint in a second gunicorn whose enqueue is switched off (``BENCH_ENQUEUE_OFF=1``, read only
by bench/apps.py), with wrk at 1 and 8 connections, alternating the arms; and the Redis work of
one enqueue, counted two ways: round trips and commands in-process, commands from
``INFO commandstats``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.redis_trips import redis_round_trips

from .common import (
    REDIS_URL,
    ROUNDS,
    Arms,
    Gunicorn,
    ab_rounds,
    accepted_jobs_discard,
    free_port,
    ms,
    redis_flush,
    verdict,
    wrk,
)

TITLE = "benchmark 2: async accept latency"
ROUND_SECONDS = 5
CONNECTIONS = (1, 8)
BODY = '{"echo": "bench"}'
ARMS = ("product", "enqueue off")
ENQUEUE_OFF = "BENCH_ENQUEUE_OFF"  # read by bench/apps.py, never by the product
TARGET = {"ratio_max": 1.3, "round_trips": 2}


# --- The switch ------------------------------------------------------------------------------


def _enqueue_nothing(*args: Any, **kwargs: Any) -> None:
    return None


def enqueue_switch_off() -> Callable[[], None]:
    """From now on ``executions.events.queue()`` hands out the real queue with ``enqueue_call``
    doing nothing, so the accept path keeps everything else (the checks, both inserts in their
    transaction, the on_commit callback, ``_enqueue`` and the response). Returns the undo."""
    from executions import events

    real = events.queue

    def queue_switched_off() -> Any:
        queue = real()
        queue.enqueue_call = _enqueue_nothing  # type: ignore[method-assign]
        return queue

    events.queue = queue_switched_off  # type: ignore[assignment]

    def undo() -> None:
        events.queue = real  # type: ignore[assignment]

    return undo


# --- Fixtures ----------------------------------------------------------------------------------


def fixtures() -> tuple[str, str]:
    """A user with an API token and an ACTIVE instance of the bench no-op tool (sync and async):
    the token and the execute-async path."""
    from django.contrib.auth import get_user_model

    from core.models import ApiToken
    from instances.services.instances import instance_create
    from tools.models import ToolDefinition

    user = get_user_model().objects.create_user(username=f"bench-async-{time.time_ns()}", password=None)
    _, key = ApiToken.issue(user=user, name="bench")
    instance = instance_create(
        owner=user, tool=ToolDefinition.objects.get(slug="bench-noop"), name="bench async no-op", workflow_id="bench"
    )
    return key, f"/api/v1/instances/{instance.pk}/execute-async"


# --- Redis, in-process: round trips and commands ---------------------------------------------


def redis_in_process(path: str, token: str, requests: int = 20) -> dict[str, dict[str, Any]]:
    """Django's test client in this process (same settings, the bench Redis index): round trips
    and commands per accept, by arm, after a warm-up request (connection set-up and RQ's one
    INFO per connection are not per request). Checks that the product arm really queued its jobs."""
    from django.test import Client

    from executions import events

    client = Client(SERVER_NAME="127.0.0.1")
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"}
    result = {}
    for arm in ARMS:
        undo = enqueue_switch_off() if arm == "enqueue off" else (lambda: None)
        try:
            client.post(path, BODY, content_type="application/json", **headers)
            queued = events.queue().count
            per_request = []
            for _ in range(requests):
                with redis_round_trips() as sent:
                    response = client.post(path, BODY, content_type="application/json", **headers)
                assert response.status_code == 202, response.content
                per_request.append([[command[0].decode().upper() for command in trip] for trip in sent])
            queued = events.queue().count - queued
        finally:
            undo()
        assert queued == (requests if arm == "product" else 0), (arm, queued)
        result[arm] = {
            "round_trips": sum(len(trips) for trips in per_request) / requests,
            "commands": sum(len(trip) for trips in per_request for trip in trips) / requests,
            "trips": per_request[-1],
        }
    redis_flush()
    return result


# --- Redis, from the server: INFO commandstats ---------------------------------------------------


class PrivateRedis:
    """A throw-away redis-server on a free port of 127.0.0.1 (no persistence): INFO commandstats
    is server-wide, so on a shared server other clients' commands would be counted too."""

    def __init__(self) -> None:
        import redis

        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _post(url: str, token: str) -> None:
    request = urllib.request.Request(
        url, data=BODY.encode(), method="POST",
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202, response.status


def commandstats_per_request(path: str, token: str, requests: int = 100) -> dict[str, Any]:
    """Commands per accept from ``INFO commandstats`` (calls by command, after minus before,
    less the reading INFO itself), over ``requests`` sequential requests to a 1-worker gunicorn of
    each arm after a warm-up. On a private redis-server when there is one to start, else on the
    bench Redis (then other clients' commands count too)."""
    import redis

    private = PrivateRedis() if shutil.which("redis-server") else None
    url = private.url if private else REDIS_URL
    counts: dict[str, dict[str, float]] = {}
    try:
        client = redis.Redis.from_url(url)

        def calls() -> Counter[str]:
            return Counter(
                {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in client.info("commandstats").items()}
            )

        for arm in ARMS:
            server = Gunicorn(workers=1, env={"REDIS_URL": url, **({ENQUEUE_OFF: "1"} if arm == "enqueue off" else {})})
            try:
                for _ in range(3):
                    _post(server.url(path), token)
                before = calls()
                for _ in range(requests):
                    _post(server.url(path), token)
                after = calls()
            finally:
                server.stop()
            delta = after - before
            delta["info"] -= 1  # the INFO that read "before"
            counts[arm] = {name: n / requests for name, n in sorted(delta.items()) if n > 0}
        if not private:
            client.flushdb()
    finally:
        if private:
            private.stop()
    return {"server": "private" if private else "shared", "requests": requests, "counts": counts}


# --- Latency ---------------------------------------------------------------------------------------


def measure() -> dict[str, Any]:
    token, path = fixtures()
    in_process = redis_in_process(path, token)
    stats = commandstats_per_request(path, token)
    servers = {"product": Gunicorn(), "enqueue off": Gunicorn(env={ENQUEUE_OFF: "1"})}
    by_connections: dict[int, Arms] = {}
    try:
        for connections in CONNECTIONS:

            def arm(name: str, connections: int = connections) -> Callable[[], dict[str, float]]:
                def one_round() -> dict[str, float]:
                    redis_flush()  # no worker drains the queue: every round starts from an empty Redis
                    return wrk(
                        servers[name].url(path), token=token, body=BODY, connections=connections, seconds=ROUND_SECONDS
                    )

                return one_round

            by_connections[connections] = ab_rounds({name: arm(name) for name in ARMS})
    finally:
        for server in servers.values():
            server.stop()
        redis_flush()
        accepted_jobs_discard()
    return {"arms": by_connections, "in_process": in_process, "commandstats": stats, "round_seconds": ROUND_SECONDS}


# --- The document ------------------------------------------------------------------------------------


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    lines = [
        "## 2. Async accept latency",
        "",
        "`POST /api/v1/instances/{id}/execute-async` of a no-op tool (`bench-noop`) with a token, "
        "through gunicorn (2 sync workers, 127.0.0.1), against the same endpoint in a second gunicorn "
        f"started with `{ENQUEUE_OFF}=1`: bench/apps.py then makes RQ's `enqueue_call` a no-op, and "
        "everything else on the path stays (readiness, both inserts in one transaction, the on_commit "
        "callback, the 202 answer). No worker runs, so Redis is flushed before every round, and at the "
        "end the jobs accepted are ended CANCELLED (`accepted_jobs_discard`: left QUEUED, a later "
        "benchmark's worker would run them). "
        f"wrk with a JSON body, {result['round_seconds']} s per round, one warm-up round per arm, then "
        f"{ROUNDS} rounds alternating the order (A B, B A, …). Latency figures are the median "
        "and the p99 *over rounds* of each round's own p50 / p99 from wrk; throughput likewise.",
        "",
        "| connections | arm | p50 ms (median) | p50 ms (p99 of rounds) | p99 ms (median) | p99 ms (p99 of rounds) "
        "| req/s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    limit = TARGET["ratio_max"]
    for connections in CONNECTIONS:
        arms = result["arms"][connections]
        for arm in ARMS:
            lines.append(
                f"| {connections} | {arm} | {ms(arms.median(arm, 'p50_ms'))} | {ms(arms.p99(arm, 'p50_ms'))} | "
                f"{ms(arms.median(arm, 'p99_ms'))} | {ms(arms.p99(arm, 'p99_ms'))} | {arms.median(arm, 'rps'):.0f} |"
            )
        for figure in ("p50", "p99"):
            key = f"{figure}_ms"
            ratio = arms.median("product", key) / arms.median("enqueue off", key)
            verdicts.append(
                f"| 2. async accept, {connections} conn | {figure} product / enqueue off | {ratio:.2f}× | "
                f"≤ {limit}× | {verdict(ratio <= limit)} |"
            )

    inp, stats = result["in_process"], result["commandstats"]
    counts = stats["counts"]
    trips = inp["product"]["round_trips"] - inp["enqueue off"]["round_trips"]
    commands = inp["product"]["commands"] - inp["enqueue off"]["commands"]
    stat_commands = sum(counts["product"].values()) - sum(counts["enqueue off"].values())
    verdicts += [
        f"| 2. async accept | Redis round trips per enqueue | {trips:g} | = {TARGET['round_trips']} | "
        f"{verdict(trips == TARGET['round_trips'])} |",
        f"| 2. async accept | Redis commands per enqueue (INFO commandstats) | {stat_commands:g} | "
        f"= in-process count ({commands:g}) | {verdict(stat_commands == commands)} |",
    ]

    def shape(trips: list[list[str]]) -> str:
        return " · ".join(" ".join(trip) for trip in trips) or "—"

    lines += [
        "",
        "Redis per request, by arm:",
        "",
        "| arm | round trips (in-process) | commands (in-process) | commands (INFO commandstats) "
        "| what one request sends, a round trip per group |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        lines.append(
            f"| {arm} | {inp[arm]['round_trips']:g} | {inp[arm]['commands']:g} | {sum(counts[arm].values()):g} | "
            f"{shape(inp[arm]['trips'])} |"
        )
    difference = {
        name: counts["product"].get(name, 0) - counts["enqueue off"].get(name, 0)
        for name in sorted(set(counts["product"]) | set(counts["enqueue off"]))
    }
    lines += [
        f"| **per enqueue** (difference) | **{trips:g}** | **{commands:g}** | **{stat_commands:g}** "
        f"({', '.join(f'{name} {n:g}' for name, n in difference.items() if n)}) | |",
        "",
        "*In-process*: Django's test client in the bench process (same settings and Redis index), 20 "
        "requests per arm after a warm-up, every write redis-py makes to a Redis socket recorded; a pipeline "
        "(MULTI … EXEC) is one write, so one round trip. The product arm's jobs are checked to be on the RQ "
        "queue. *INFO commandstats*: calls by command, after minus before, over "
        f"{stats['requests']} sequential requests to a 1-worker gunicorn of each arm after a warm-up "
        "(connection set-up and RQ's one `INFO server` per connection are not per request), "
        + (
            "on a private `redis-server` started for the count, since the statistics are server-wide."
            if stats["server"] == "private"
            else "on the bench Redis: other clients of that server are counted too."
        )
        + " Commands inside MULTI … EXEC are counted one by one, MULTI and EXEC included; the throttle's "
        "INCRBY and EXPIRE (one pipelined round trip) are the same in both arms.",
        "",
    ]
    return lines, verdicts
