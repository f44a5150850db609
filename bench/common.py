"""What every benchmark shares: the bench database and Redis index, the environment of the
processes a benchmark starts, alternating A/B rounds, statistics and PostgreSQL's counters.

Only the database ``toolexec_bench`` and Redis index 13 are ever created, dropped or flushed
(``BENCH_DB`` and ``BENCH_REDIS_URL`` name others, to develop a benchmark beside a running one).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = os.environ.get("BENCH_DB", "toolexec_bench")
# The server the bench database lives on (the same one `make test` uses); only BENCH_DB is touched.
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def database_url(name: str = BENCH_DB) -> str:
    parts = urlsplit(POSTGRES_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))


@cache
def bench_env() -> dict[str, str]:
    """The environment of the bench process and every process it starts: production settings
    (DEBUG off) with generated keys, plain HTTP on 127.0.0.1, the bench database and Redis index."""
    from cryptography.fernet import Fernet

    return {
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "TOOLEXEC_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "SECURE_SSL_REDIRECT": "false",
        "ALLOWED_HOSTS": "127.0.0.1",
        "DATABASE_URL": database_url(),
        "REDIS_URL": REDIS_URL,
        # Throttling stays on (its cache round trips are part of the path) but must not refuse load.
        "TOOLEXEC_THROTTLE_USER": "100000000/min",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


def subprocess_env() -> dict[str, str]:
    return {**os.environ, **bench_env()}


def database_recreate() -> None:
    """Drop and create the bench database (nothing else on the server is touched)."""
    import psycopg

    conn = psycopg.connect(database_url("postgres"))
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        cursor.execute(f"CREATE DATABASE {BENCH_DB}")
    conn.close()


def redis_flush() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def accepted_jobs_discard() -> int:
    """End CANCELLED, with their executions, the jobs a benchmark accepted with no worker to run
    them (benchmarks 2 and 9), once it has flushed their RQ jobs; returns how many. Left QUEUED,
    they are what the product's reaper exists for (jobs_requeue_lost): every later benchmark's
    worker would queue them again, 100 at each round, and the jobs it measures would wait
    behind them (queue-to-start p99 near a second, a slower drain, more CPU per job)."""
    from django.db import transaction
    from django.utils import timezone

    from executions.models import Execution, Job

    now = timezone.now()
    with transaction.atomic():
        queued = Job.objects.filter(status=Job.Status.QUEUED)
        Execution.objects.filter(pk__in=queued.values("execution_id"), status=Execution.Status.PENDING).update(
            status=Execution.Status.CANCELLED, finished_at=now
        )
        return queued.update(status=Job.Status.CANCELLED, finished_at=now, updated_at=now)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- HTTP: gunicorn and wrk --------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = %(method)s
wrk.body = %(body)s
if wrk.body then wrk.headers["Content-Type"] = "application/json" end
if %(auth)s then wrk.headers["Authorization"] = %(auth)s end
%(headers)s

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"p50_us": %%d, "p99_us": %%d, "requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d}\\n',
    latency:percentile(50), latency:percentile(99), summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


class Gunicorn:
    """gunicorn serving bench.wsgi on a free port of 127.0.0.1 (sync workers), ready when built;
    ``env`` adds to the bench environment (to start an arm with a setting changed)."""

    def __init__(self, workers: int = 2, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="bench-gunicorn-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn", "bench.wsgi:application",
                "--workers", str(workers), "--worker-class", "sync",
                "--bind", f"127.0.0.1:{self.port}", "--log-level", "warning",
            ],
            cwd=str(ROOT), env={**subprocess_env(), **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without a token)
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not start:\n" + Path(self.log.name).read_text()) from None
                time.sleep(0.2)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wrk(
    url: str,
    *,
    token: str | None,
    connections: int,
    seconds: int,
    body: str | None = None,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    """One wrk run against ``url``: POST of the JSON ``body`` when given, else GET (or ``method``),
    with ``headers`` added (a session ``Cookie``, say). Raises when any request failed or answered
    other than 2xx."""
    auth = json.dumps(f"Token {token}") if token else "nil"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            WRK_SCRIPT
            % {
                "method": json.dumps(method or ("POST" if body is not None else "GET")),
                "body": json.dumps(body) if body is not None else "nil",
                "auth": auth,
                "headers": "\n".join(
                    f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in (headers or {}).items()
                ),
            }
        )
    threads = min(connections, 2)
    out = subprocess.run(
        ["wrk", "--latency", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", script.name, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    Path(script.name).unlink()
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    raw = json.loads(line.removeprefix("WRKJSON "))
    if raw["errors"] or raw["non2xx"]:
        raise RuntimeError(f"wrk saw failures against {url}:\n{out}")
    return {
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "requests": raw["requests"],
    }


# --- Statistics ---------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Arms:
    """Per-arm lists of round results (dicts of figures), warm-up excluded."""

    rounds: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def values(self, arm: str, key: str) -> list[float]:
        return [r[key] for r in self.rounds[arm]]

    def median(self, arm: str, key: str) -> float:
        return median(self.values(arm, key))

    def p99(self, arm: str, key: str) -> float:
        return p99(self.values(arm, key))


def ab_rounds(arms: dict[str, Callable[[], dict[str, float]]], *, rounds: int = ROUNDS, warmup: int = 1) -> Arms:
    """Run every arm ``warmup`` times (discarded), then ``rounds`` rounds alternating the order
    (A B, B A, A B, …) so drift on a shared machine falls on both arms alike."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    result = Arms({name: [] for name in names})
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            result.rounds[name].append(arms[name]())
    return result


# --- The document ----------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value:.2f}"


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**MISS**"


# --- PostgreSQL counters --------------------------------------------------------------------


class PgStats:
    """Reads the cumulative statistics views from a connection of its own (to the ``postgres``
    database for pg_stat_database, so its own transactions are not counted in the bench's)."""

    def __init__(self) -> None:
        import psycopg

        self.server = psycopg.connect(database_url("postgres"))
        self.server.autocommit = True
        self.bench = psycopg.connect(database_url())
        self.bench.autocommit = True

    def _one(self, conn: Any, sql: str, params: tuple = ()) -> tuple:
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(sql, params)
            return cursor.fetchone()

    def xact(self) -> tuple[int, int]:
        """(xact_commit, xact_rollback) of the bench database."""
        return self._one(
            self.server, "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s", (BENCH_DB,)
        )

    def table(self, name: str) -> dict[str, int]:
        row = self._one(
            self.bench,
            "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = %s",
            (name,),
        )
        return dict(zip(("ins", "upd", "hot"), row, strict=True))

    def settled(self, read: Callable[[], Any], *, quiet: float = 1.5, timeout: float = 30) -> Any:
        """``read()`` once it has stopped changing for ``quiet`` seconds (backends flush their
        counters on exit, or within about a second while they run)."""
        deadline = time.monotonic() + timeout
        last, since = read(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            value = read()
            if value != last:
                last, since = value, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def close(self) -> None:
        self.server.close()
        self.bench.close()


# --- Versions -----------------------------------------------------------------------------


def _command_output(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict[str, str]:
    import celery
    import django
    import gunicorn
    import psycopg
    import redis
    import rq

    stats = PgStats()
    with stats.server.cursor() as cursor:
        cursor.execute("SHOW server_version")
        postgres = cursor.fetchone()[0]
    stats.close()
    wrk = _command_output("wrk", "--version").splitlines()
    return {
        "nproc": _command_output("nproc"),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "python": platform.python_version(),
        "django": django.get_version(),
        "postgresql": postgres,
        "redis": redis.Redis.from_url(REDIS_URL).info("server")["redis_version"],
        "psycopg": psycopg.__version__,
        "gunicorn": gunicorn.__version__,
        "wrk": wrk[0] if wrk else "?",
        "rq": rq.__version__,
        "celery": celery.__version__,
    }


@contextlib.contextmanager
def phases_timed(
    phases: tuple[tuple[str, str | None, str, str], ...], record: Callable[[str, float], None]
) -> Iterator[None]:
    """While inside, every call of each phase's function (``(module, class or None, name,
    label)``, wrapped where its caller looks it up) gives its seconds to ``record(label,
    seconds)``; the functions are put back after."""
    originals = []
    for module, cls, name, label in phases:
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        real = getattr(owner, name)

        def timed(*args: Any, _real: Any = real, _label: str = label, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                record(_label, time.perf_counter() - started)

        originals.append((owner, name, real))
        setattr(owner, name, timed)
    try:
        yield
    finally:
        for owner, name, real in originals:
            setattr(owner, name, real)
