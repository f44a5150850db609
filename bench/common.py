"""What every benchmark shares: the bench database and Redis index, the environment of the
processes a benchmark starts, alternating A/B rounds, statistics and PostgreSQL's counters.

Only the database ``toolexec_bench`` and Redis index 13 are ever created, dropped or flushed.
"""

from __future__ import annotations

import os
import platform
import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "toolexec_bench"
# The server the bench database lives on (the same one `make test` uses); only BENCH_DB is touched.
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = "redis://127.0.0.1:6379/13"
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
    import psycopg2

    conn = psycopg2.connect(database_url("postgres"))
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        cursor.execute(f"CREATE DATABASE {BENCH_DB}")
    conn.close()


def redis_flush() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# --- PostgreSQL counters --------------------------------------------------------------------


class PgStats:
    """Reads the cumulative statistics views from a connection of its own (to the ``postgres``
    database for pg_stat_database, so its own transactions are not counted in the bench's)."""

    def __init__(self) -> None:
        import psycopg2

        self.server = psycopg2.connect(database_url("postgres"))
        self.server.autocommit = True
        self.bench = psycopg2.connect(database_url())
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
    import django
    import gunicorn
    import psycopg2
    import redis

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
        "psycopg2": psycopg2.__version__.split()[0],
        "gunicorn": gunicorn.__version__,
        "wrk": wrk[0] if wrk else "?",
    }
