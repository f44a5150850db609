"""Benchmark 11: WebSocket fan-out. 1,000 WebSockets following running jobs on one ASGI process
(the README's production server, uvicorn), each event published by ``executions.events.publish`` as a
worker publishes it: the publish-to-receive latency at each socket, against as many bare
``redis.asyncio`` pub/sub subscribers (of as many job channels, spread alike) in the same run
(issue 23); that every subscriber gets every event; the process's memory per idle socket; and
what an idle socket costs, counted outside the product: database sessions and transactions from
PostgreSQL's statistics, Redis commands from ``INFO commandstats`` of a redis-server of the
benchmark's own.

Run as ``python -m bench.websocket_fanout publish`` it is the publisher: a process of its own
(as a worker is), so that its blocking publishes never hold up the event loop that timestamps
what the subscribers receive.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from scripts.run import production_asgi_command
from tests.ws_client import AsyncWebSocket

from . import workers
from .async_accept import PrivateRedis
from .common import (
    BENCH_DB,
    ROOT,
    ROUNDS,
    Arms,
    ab_rounds,
    database_url,
    free_port,
    median,
    ms,
    p99,
    subprocess_env,
    verdict,
)

TITLE = "benchmark 11: WebSocket fan-out"
SUBSCRIBERS = int(os.environ.get("BENCH_WS_SUBSCRIBERS", "1000"))
# How the subscribers spread over running jobs: many sockets on each of a few jobs (a job many
# people watch), and one socket on each of as many jobs (each user watching their own).
SHAPES = {"fan-out": 10, "one each": SUBSCRIBERS}  # shape -> jobs followed
EVENTS_PER_SECOND = float(os.environ.get("BENCH_WS_EVENTS_PER_SECOND", "1"))  # that each subscriber gets
ROUND_SECONDS = float(os.environ.get("BENCH_WS_ROUND_SECONDS", "8"))
IDLE_SECONDS = float(os.environ.get("BENCH_WS_IDLE_SECONDS", "10"))
OPENING_CONCURRENCY = 20  # handshakes in flight at once (well within a listen backlog)
CALIBRATION_SOCKETS = 10  # opened after the idle window: what the counters see of a socket's opening
DRAIN_SECONDS = 15  # after the last publish, how long a round waits for every delivery
ASGI_APP_NAME = "toolexec-bench-asgi"  # the ASGI process's application_name in pg_stat_activity
TARGET = {"p50_ratio_max": 2.0, "lost": 0, "idle_sessions": 0, "idle_commands": 0}
ARMS = ("asgi", "bare")


# --- The jobs and the ASGI process ----------------------------------------------------------


def jobs_running(count: int) -> tuple[str, list[str]]:
    """An owner's API token and ``count`` RUNNING jobs of theirs, with their executions, as a
    worker's claim leaves them (written with the ORM: no worker runs them, the benchmark
    publishes their events)."""
    from django.utils import timezone

    from executions.models import Execution, Job, Mode

    instance = workers.product_instance("websocket")
    now = timezone.now()
    executions = Execution.objects.bulk_create(
        Execution(
            instance=instance,
            tool_id=instance.tool_id,
            owner_id=instance.owner_id,
            mode=Mode.ASYNC,
            status=Execution.Status.RUNNING,
            started_at=now,
        )
        for _ in range(count)
    )
    jobs = [
        Job(
            execution=execution,
            instance=instance,
            owner_id=instance.owner_id,
            status=Job.Status.RUNNING,
            attempts=1,
            worker_name="bench",
            enqueued_at=now,
            started_at=now,
            heartbeat_at=now,
        )
        for execution in executions
    ]
    for job in jobs:
        job.rq_job_id = str(job.pk)
    Job.objects.bulk_create(jobs)
    return workers.product_token(instance), [str(job.pk) for job in jobs]


class AsgiServer:
    """The README's production ASGI server (``scripts.run.production_asgi_command``: uvicorn, one
    process) on a free port of 127.0.0.1, with ``DATABASE_CONN_MAX_AGE=0`` as the README runs it,
    on the bench database and the given Redis; ready when built. Its connections to PostgreSQL
    carry ``ASGI_APP_NAME``."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="bench-asgi-", suffix=".log", delete=False)
        env = {
            **subprocess_env(),
            "REDIS_URL": redis_url,
            "DATABASE_CONN_MAX_AGE": "0",
            "PGAPPNAME": ASGI_APP_NAME,
        }
        command = production_asgi_command(self.port)
        self.process = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without a token)
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the ASGI server did not start:\n" + Path(self.log.name).read_text()) from None
                time.sleep(0.2)

    def status(self, field: str) -> int:
        """A ``kB`` figure of /proc/<pid>/status (VmRSS, RssAnon …), in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def local_ports_to(self, remote_port: int) -> set[int]:
        """The local ports of this process's TCP connections to ``remote_port`` (its file
        descriptors' socket inodes, looked up in /proc/net/tcp)."""
        inodes = set()
        fd_dir = Path(f"/proc/{self.process.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == remote_port:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- The publisher (a process of its own) --------------------------------------------------------


def publisher_serve() -> None:
    """Read plans from stdin, one JSON line each (``topics``, ``per_topic``, ``rate``,
    ``round``): publish ``per_topic`` progress events to each topic's job, round-robin, at
    ``rate`` events a second on a fixed schedule, with ``executions.events.publish``; answer
    one JSON line each."""
    import django

    django.setup()
    from executions import events

    for line in sys.stdin:
        plan = json.loads(line)
        topics, per_topic, rate = plan["topics"], plan["per_topic"], plan["rate"]
        started, failed, behind, index = time.monotonic(), 0, 0.0, 0
        for n in range(per_topic):
            for topic in topics:
                wait = started + index / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                else:
                    behind = max(behind, -wait)
                event = {
                    "event": "progress",
                    "status": "RUNNING",
                    "progress": round(100 * (n + 1) / (per_topic + 1), 1),
                    "current_step": f"step {n + 1} of {per_topic + 1}",
                    "step_index": n + 1,
                    "steps_total": per_topic + 1,
                    "round": plan["round"],
                    "n": n,
                    "sent_at": time.time(),
                }
                if events.publish(topic, event) is None:
                    failed += 1
                index += 1
        answer = {"published": index - failed, "failed": failed, "seconds": time.monotonic() - started}
        print(json.dumps({**answer, "behind_ms_max": behind * 1000}), flush=True)


class Publisher:
    """The publisher process, on the given Redis."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, redis_url: str) -> Publisher:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.websocket_fanout", "publish",
            cwd=str(ROOT), env={**subprocess_env(), "REDIS_URL": redis_url},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(process)

    async def publish(self, *, topics: list[str], per_topic: int, rate: float, round_id: int) -> dict[str, Any]:
        plan = {"topics": topics, "per_topic": per_topic, "rate": rate, "round": round_id}
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(plan) + "\n").encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), per_topic * len(topics) / rate + 60)
        if not line:
            raise RuntimeError("the publisher exited")
        return json.loads(line)

    async def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.wait_for(self.process.wait(), 30)


# --- The subscribers ------------------------------------------------------------------------------


class Tally:
    """What the subscribers received of one round: each subscriber must get the events ``n`` =
    0 … ``per_topic`` - 1 of that round once each."""

    def __init__(self, round_id: int, subscribers: int, per_topic: int) -> None:
        self.round_id, self.per_topic = round_id, per_topic
        self.seen: list[set[int]] = [set() for _ in range(subscribers)]
        self.latencies: list[float] = []
        self.received = self.duplicates = self.strays = 0
        self.expected = subscribers * per_topic

    def take(self, index: int, event: dict[str, Any], at: float) -> None:
        if event.get("round") != self.round_id:
            self.strays += 1  # another round's, or the other arm's
            return
        if event["n"] in self.seen[index]:
            self.duplicates += 1
            return
        self.seen[index].add(event["n"])
        self.received += 1
        self.latencies.append((at - event["sent_at"]) * 1000)


class Subscribers:
    """One arm's subscribers, subscriber ``i`` following ``topics[i % len(topics)]``; every
    event they receive goes to ``tally`` (the current round's)."""

    def __init__(self, topics: list[str], count: int) -> None:
        self.topics = topics
        self.count = count
        self.tally = Tally(0, count, 0)

    def topic_of(self, index: int) -> str:
        return self.topics[index % len(self.topics)]

    def received(self, index: int, data: bytes) -> None:
        at = time.time()
        self.tally.take(index, json.loads(data), at)


class SocketSubscribers(Subscribers):
    """WebSockets to ``/ws/v1/jobs/{id}/`` signed in with the token subprotocol pair; each
    first sends the job's state (its opening), then its events."""

    def __init__(self, topics: list[str], count: int, port: int, token: str) -> None:
        super().__init__(topics, count)
        self.port, self.token = port, token
        self.sockets: list[AsyncWebSocket] = []
        self.states: list[asyncio.Future[dict[str, Any]]] = []

    async def open_one(self, index: int) -> AsyncWebSocket:
        state: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_text(data: bytes) -> None:
            if state.done():
                self.received(index, data)
            else:
                state.set_result(json.loads(data))

        socket = await AsyncWebSocket.connect(
            "127.0.0.1",
            self.port,
            f"/ws/v1/jobs/{self.topic_of(index)}/",
            subprotocols=["toolexec.token", self.token],
            on_text=on_text,
        )
        first = await asyncio.wait_for(state, 30)
        assert first.get("event") == "state" and first.get("status") == "RUNNING", first
        return socket

    async def open(self) -> float:
        """Open every socket (OPENING_CONCURRENCY handshakes at a time) and wait for each one's
        state; the seconds it took."""
        started = time.monotonic()
        gate = asyncio.Semaphore(OPENING_CONCURRENCY)

        async def gated(index: int) -> AsyncWebSocket:
            async with gate:
                return await self.open_one(index)

        self.sockets = list(await asyncio.gather(*(gated(index) for index in range(self.count))))
        return time.monotonic() - started

    def still_open(self) -> int:
        return sum(not socket.closed.done() for socket in self.sockets)

    async def close(self) -> None:
        gate = asyncio.Semaphore(100)

        async def gated(socket: AsyncWebSocket) -> None:
            async with gate:
                try:
                    await socket.close()
                except TimeoutError:
                    pass  # its TCP connection is closed anyway

        await asyncio.gather(*(gated(socket) for socket in self.sockets))


class BareSubscribers(Subscribers):
    """``redis.asyncio`` pub/sub subscribers, each on a connection of its own (as each socket has
    its own), reading with ``listen()``."""

    def __init__(self, topics: list[str], count: int, redis_url: str) -> None:
        super().__init__(topics, count)
        from redis import asyncio as aioredis

        self.client = aioredis.Redis.from_url(redis_url, max_connections=count + 10)
        self.pubsubs: list[Any] = []
        self.readers: list[asyncio.Task[None]] = []

    async def open(self) -> float:
        from executions.events import Topic

        started = time.monotonic()
        for index in range(self.count):
            pubsub = self.client.pubsub()
            await pubsub.subscribe(Topic.job(self.topic_of(index)).channel)
            self.pubsubs.append(pubsub)
            self.readers.append(asyncio.get_running_loop().create_task(self.read(index, pubsub)))
        return time.monotonic() - started

    async def read(self, index: int, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                self.received(index, message["data"])

    async def close(self) -> None:
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        for pubsub in self.pubsubs:
            await pubsub.aclose()
        await self.client.aclose()


# --- Counting what the ASGI process costs, from outside --------------------------------------------


class Counters:
    """PostgreSQL's statistics of the bench database (read from the ``postgres`` database, so
    this reading is not counted) and Redis's ``INFO commandstats`` (server-wide: the benchmark's
    own redis-server)."""

    def __init__(self, redis_url: str) -> None:
        import psycopg
        import redis

        self.pg = psycopg.connect(database_url("postgres"))
        self.pg.autocommit = True
        self.redis = redis.Redis.from_url(redis_url)

    def database(self) -> dict[str, int]:
        """Sessions opened (regular backends only, autovacuum's not) and transactions on the
        bench database; the ASGI process's connections now."""
        with self.pg.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT sessions, xact_commit + xact_rollback, (SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = %s) FROM pg_stat_database WHERE datname = %s",
                (BENCH_DB, ASGI_APP_NAME, BENCH_DB),
            )
            sessions, transactions, connected = cursor.fetchone()
        return {"sessions": sessions, "transactions": transactions, "asgi_connections": connected}

    async def database_settled(self, quiet: float = 1.5, timeout: float = 30) -> dict[str, int]:
        """``database()`` once its counters have not moved for ``quiet`` seconds (a backend
        reports its counts within about a second, or when it exits)."""
        deadline = time.monotonic() + timeout
        last, since = self.database(), time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            value = self.database()
            if (value["sessions"], value["transactions"]) != (last["sessions"], last["transactions"]):
                since = time.monotonic()
            last = value
            if time.monotonic() - since >= quiet:
                break
        return last

    def commands(self) -> Counter[str]:
        return Counter(
            {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in self.redis.info("commandstats").items()}
        )

    async def around(self, work: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        """What ``await work()`` costs: sessions and transactions on the bench database, and
        Redis commands by name (less the INFO that read the first count)."""
        database_before = await self.database_settled()
        commands_before = self.commands()
        await work()
        commands_after = self.commands()
        database_after = await self.database_settled()
        commands = commands_after - commands_before
        commands["info"] -= 1
        return {
            "sessions": database_after["sessions"] - database_before["sessions"],
            "transactions": database_after["transactions"] - database_before["transactions"],
            "asgi_connections": max(database_before["asgi_connections"], database_after["asgi_connections"]),
            "commands": {name: calls for name, calls in sorted(commands.items()) if calls > 0},
        }

    def asgi_redis_connections(self, server: AsgiServer, redis_port: int) -> list[dict[str, Any]]:
        """The ASGI process's Redis connections as ``CLIENT LIST`` shows them."""
        ports = server.local_ports_to(redis_port)
        return [
            {"sub": int(client["sub"]), "cmd": client["cmd"], "idle": int(client["idle"])}
            for client in self.redis.client_list()
            if int(client["addr"].rsplit(":", 1)[1]) in ports
        ]

    def close(self) -> None:
        self.pg.close()
        self.redis.close()


# --- A shape: sockets, the idle window, the rounds ----------------------------------------------------


async def settle_rss(server: AsgiServer, seconds: float = 2.0) -> int:
    await asyncio.sleep(seconds)
    return server.status("VmRSS")


def shape_measure(
    loop: asyncio.AbstractEventLoop, private: PrivateRedis, token: str, jobs: list[str], rounds_start: int
) -> dict[str, Any]:
    """One shape on a fresh ASGI process: its memory before and with every socket open, the
    idle window, the calibration, then the alternating rounds."""
    from django.db import connection

    connection.close()  # the benchmark's own connection: nothing of this process in the counts
    run = loop.run_until_complete
    server = AsgiServer(private.url)
    counters = Counters(private.url)
    bare_topics = [str(uuid.uuid4()) for _ in jobs]  # channels of their own: each round reaches one arm
    sockets = SocketSubscribers(jobs, SUBSCRIBERS, server.port, token)
    bare = BareSubscribers(bare_topics, SUBSCRIBERS, private.url)
    publisher = run(Publisher.start(private.url))
    result: dict[str, Any] = {"jobs": len(jobs), "subscribers": SUBSCRIBERS}
    try:
        # Warm: a few sockets opened and closed (the hub connects, the thread pool starts).
        warm = SocketSubscribers(jobs, min(10, SUBSCRIBERS), server.port, token)
        run(warm.open())
        run(warm.close())
        result["rss_before_kib"] = run(settle_rss(server))
        result["open_seconds"] = run(sockets.open())
        result["rss_open_kib"] = run(settle_rss(server))
        cpu = server.cpu_seconds()
        result["idle"] = run(counters.around(lambda: asyncio.sleep(IDLE_SECONDS)))
        result["idle_cpu_ms"] = (server.cpu_seconds() - cpu) * 1000
        result["idle_seconds"] = IDLE_SECONDS
        result["asgi_redis"] = counters.asgi_redis_connections(server, private.port)
        result["open_after_idle"] = sockets.still_open()
        extra = SocketSubscribers(jobs, CALIBRATION_SOCKETS, server.port, token)
        result["calibration"] = run(counters.around(extra.open))
        run(extra.close())
        result["bare_open_seconds"] = run(bare.open())

        arms_of = {"asgi": sockets, "bare": bare}
        topics_of = {"asgi": jobs, "bare": bare_topics}
        per_topic = max(1, round(ROUND_SECONDS * EVENTS_PER_SECOND))
        rate = EVENTS_PER_SECOND * len(jobs)  # publishes a second: each subscriber gets EVENTS_PER_SECOND
        next_round = iter(range(rounds_start, rounds_start + 1000))

        def one_round(arm: str) -> dict[str, Any]:
            subscribers, round_id = arms_of[arm], next(next_round)
            subscribers.tally = tally = Tally(round_id, SUBSCRIBERS, per_topic)
            cpu, client_cpu = server.cpu_seconds(), time.process_time()
            published = run(publisher.publish(topics=topics_of[arm], per_topic=per_topic, rate=rate, round_id=round_id))
            run(drained(tally))
            return {
                "p50_ms": median(tally.latencies) if tally.latencies else float("nan"),
                "p99_ms": p99(tally.latencies) if tally.latencies else float("nan"),
                "latencies": tally.latencies,
                "expected": tally.expected,
                "received": tally.received,
                "lost": tally.expected - tally.received,
                "duplicates": tally.duplicates,
                "strays": tally.strays,
                "asgi_cpu_ms": (server.cpu_seconds() - cpu) * 1000,
                "client_cpu_ms": (time.process_time() - client_cpu) * 1000,
                "published": published["published"],
                "publish_seconds": published["seconds"],
                "behind_ms_max": published["behind_ms_max"],
            }

        result["arms"] = ab_rounds({arm: lambda arm=arm: one_round(arm) for arm in ARMS})
        result["per_topic"], result["rate"] = per_topic, rate
        result["rss_end_kib"] = server.status("VmRSS")
        result["open_at_end"] = sockets.still_open()
    finally:
        run(bare.close())
        run(sockets.close())
        run(publisher.stop())
        counters.close()
        server.stop()
    return result


async def drained(tally: Tally) -> None:
    deadline = time.monotonic() + DRAIN_SECONDS
    while tally.received < tally.expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # a duplicate would come now


def measure() -> dict[str, Any]:
    fixtures = {shape: jobs_running(count) for shape, count in SHAPES.items()}
    private = PrivateRedis()
    loop = asyncio.new_event_loop()
    shapes = {}
    try:
        for index, (shape, (token, jobs)) in enumerate(fixtures.items()):
            print(f"  {shape}: {SUBSCRIBERS} sockets over {len(jobs)} jobs …", flush=True)
            shapes[shape] = shape_measure(loop, private, token, jobs, rounds_start=1000 * (index + 1))
    finally:
        loop.close()
        private.stop()
    return {"shapes": shapes}


# --- The document ------------------------------------------------------------------------------------


def pooled(arms: Arms, arm: str) -> list[float]:
    return [value for latencies in arms.values(arm, "latencies") for value in latencies]  # type: ignore[union-attr]


def commands_words(commands: dict[str, int]) -> str:
    return ", ".join(f"{calls} {name.upper()}" for name, calls in commands.items()) or "none"


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    shapes = result["shapes"]
    first = next(iter(shapes.values()))
    lines = [
        "## 11. WebSocket fan-out",
        "",
        f"{SUBSCRIBERS:,} WebSockets open at once on one ASGI process: `DATABASE_CONN_MAX_AGE=0 uvicorn "
        "toolexec.asgi:application --host 127.0.0.1 --port … --lifespan off` (the README's production command, one "
        "process: uvicorn with uvloop, httptools and websockets), on the bench database "
        "and a redis-server of the benchmark's own (no persistence; `INFO commandstats` is server-wide, so nothing "
        "else may talk to it). Each socket follows one RUNNING job on `/ws/v1/jobs/{id}/`, signed in with the "
        '`["toolexec.token", "<token>"]` subprotocol pair; the jobs and their executions are rows written with '
        "the ORM, and no worker runs them: a publisher process started by the benchmark publishes their progress "
        "events with `executions.events.publish`, as a worker's progress sink does (one script: INCR, XADD, "
        "PUBLISH), each carrying the `time.time()` taken just before the call. Two shapes, each on a fresh ASGI "
        "process: *fan-out*, the sockets spread over 10 jobs (a job many people watch: each event goes to "
        f"{SUBSCRIBERS // SHAPES['fan-out']} sockets), and *one each*, a socket on each of {SUBSCRIBERS:,} jobs "
        "(everyone watching their own job: the process follows as many channels). *asgi*: the sockets, read by "
        "an asyncio RFC 6455 client in the benchmark's process (`tests/ws_client.py`); the latency runs from the "
        "publisher's timestamp to the client having the frame. *bare*: as many `redis.asyncio` pub/sub "
        "subscribers in the same process, each on a connection of its own (as each socket is), reading with "
        "`listen()`, subscribed to channels of as many other job ids (spread alike), so that each round's "
        "events reach one arm only; the latency runs to `listen()` giving the message. Events are published at "
        f"a steady rate so that every subscriber gets {EVENTS_PER_SECOND:g} a second: "
        f"{first.get('per_topic', '?')} events per job and round, round-robin over the jobs. One warm-up round "
        f"per arm, then {ROUNDS} rounds alternating the order; p50 and p99 over every delivery of an arm. Every "
        "subscriber must get every event of a round once (counted by the event's number; *lost* and "
        "*duplicates* below).",
        "",
        "| shape | arm | deliveries | p50 ms | p99 ms | round p50 ms (median) | max ms | lost | duplicates "
        "| ASGI process CPU ms / 1,000 deliveries | benchmark process CPU ms / 1,000 deliveries |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for shape, data in shapes.items():
        arms: Arms = data["arms"]
        for arm in ARMS:
            values = pooled(arms, arm)
            lost = sum(arms.values(arm, "lost"))
            duplicates = sum(arms.values(arm, "duplicates"))
            cpu = sum(arms.values(arm, "asgi_cpu_ms")) / max(1, len(values)) * 1000
            client_cpu = sum(arms.values(arm, "client_cpu_ms")) / max(1, len(values)) * 1000
            lines.append(
                f"| {shape} | {arm} | {len(values):,} | {ms(median(values))} | {ms(p99(values))} "
                f"| {ms(arms.median(arm, 'p50_ms'))} | {ms(max(values))} | {lost} | {duplicates} | {cpu:.0f} "
                f"| {client_cpu:.0f} |"
            )
    lines += [""]
    for shape, data in shapes.items():
        arms = data["arms"]
        p50 = {arm: median(pooled(arms, arm)) for arm in ARMS}
        p99s = {arm: p99(pooled(arms, arm)) for arm in ARMS}
        ratio = p50["asgi"] / p50["bare"]
        lost = sum(sum(arms.values(arm, "lost")) for arm in ARMS)
        expected = sum(sum(arms.values(arm, "expected")) for arm in ARMS)
        behind = max(max(arms.values(arm, "behind_ms_max")) for arm in ARMS)
        strays = sum(sum(arms.values(arm, "strays")) for arm in ARMS)
        lines.append(
            f"*{shape}* ({data['jobs']:,} jobs, {data['rate']:,g} publishes a second): p50 asgi / bare {ratio:.2f}×, "
            f"p99 {p99s['asgi'] / p99s['bare']:.2f}×; {lost} of {expected:,} deliveries lost, "
            f"{strays} from another round or arm; the publisher fell behind its schedule by at most {behind:.1f} ms; "
            f"{data['open_at_end']:,} of {data['subscribers']:,} sockets still open at the end."
        )
        verdicts.append(
            f"| 11. WebSocket fan-out | p50 asgi / bare `redis.asyncio` subscriber, {shape} "
            f"({SUBSCRIBERS:,} sockets over {data['jobs']:,} jobs) | {ratio:.2f}× | ≤ {TARGET['p50_ratio_max']}× "
            f"| {verdict(ratio <= TARGET['p50_ratio_max'])} |"
        )
        verdicts.append(
            f"| 11. WebSocket fan-out | deliveries lost, {shape} | {lost} of {expected:,} | {TARGET['lost']} "
            f"| {verdict(lost == TARGET['lost'])} |"
        )
    lines += [
        "",
        f"Memory and idle cost, measured before the rounds with {SUBSCRIBERS:,} sockets open and no event for "
        f"{first['idle_seconds']:g} s. RSS is the ASGI process's `VmRSS` (/proc), after 10 sockets were opened "
        "and closed (*before*) and 2 s after the last socket sent its state (*open*). Database: sessions "
        "opened on the bench database (`pg_stat_database.sessions`, which counts client connections only; with "
        "`DATABASE_CONN_MAX_AGE=0` every query of the ASGI process opens one) and its transactions (any client, "
        "autovacuum's visits included), read once the counters had not moved for 1.5 s; the ASGI process's open "
        "connections (`pg_stat_activity` by its `application_name`). Redis: `INFO commandstats` after minus "
        "before, less the INFO that read *before*. *Opening* is the same counts around opening "
        f"{CALIBRATION_SOCKETS} more sockets, per socket: what the counters see of the ASGI process when it does "
        "work.",
        "",
        "| shape | RSS before MiB | RSS open MiB | KiB per idle socket | sockets opened in s | idle: sessions "
        "| idle: transactions | idle: Redis commands | idle: ASGI CPU ms | ASGI Redis connections (channels "
        "subscribed) | opening, per socket: sessions, transactions, Redis commands |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, data in shapes.items():
        per_socket = (data["rss_open_kib"] - data["rss_before_kib"]) / data["subscribers"]
        idle, calibration = data["idle"], data["calibration"]
        connections = ", ".join(f"{client['cmd']} ({client['sub']})" for client in data["asgi_redis"])
        opening = {name: calls / CALIBRATION_SOCKETS for name, calls in calibration["commands"].items()}
        opening_words = ", ".join(f"{calls:g} {name.upper()}" for name, calls in opening.items()) or "none"
        lines.append(
            f"| {shape} | {data['rss_before_kib'] / 1024:.1f} | {data['rss_open_kib'] / 1024:.1f} | {per_socket:.1f} "
            f"| {data['open_seconds']:.1f} | {idle['sessions']} | {idle['transactions']} "
            f"| {commands_words(idle['commands'])} | {data['idle_cpu_ms']:.0f} | {len(data['asgi_redis'])}: "
            f"{connections} | {calibration['sessions'] / CALIBRATION_SOCKETS:g}, "
            f"{calibration['transactions'] / CALIBRATION_SOCKETS:g}, {opening_words} |"
        )
    lines += [""]
    idle_sessions = max(data["idle"]["sessions"] + data["idle"]["asgi_connections"] for data in shapes.values())
    idle_commands = max(sum(data["idle"]["commands"].values()) for data in shapes.values())
    worst_transactions = max(data["idle"]["transactions"] for data in shapes.values())
    verdicts += [
        f"| 11. WebSocket fan-out | idle sockets: database sessions opened and held by the ASGI process "
        f"({SUBSCRIBERS:,} sockets, {first['idle_seconds']:g} s; transactions on the database: "
        f"{worst_transactions}) | {idle_sessions} | {TARGET['idle_sessions']} "
        f"| {verdict(idle_sessions == TARGET['idle_sessions'])} |",
        f"| 11. WebSocket fan-out | idle sockets: Redis commands ({SUBSCRIBERS:,} sockets, "
        f"{first['idle_seconds']:g} s) | {idle_commands} | {TARGET['idle_commands']} "
        f"| {verdict(idle_commands == TARGET['idle_commands'])} |",
    ]
    return lines, verdicts


if __name__ == "__main__" and sys.argv[1:] == ["publish"]:
    publisher_serve()
