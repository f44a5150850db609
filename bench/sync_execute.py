"""Benchmark 1: execute-sync of a no-op tool through gunicorn (2 sync workers) against a plain
Django view doing the least SQL of a recorded run (bench/baseline), with wrk at 1 and 8
connections, alternating product and baseline rounds."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .common import ROOT, Arms, PgStats, ab_rounds, free_port, subprocess_env

ROUND_SECONDS = 5
CONNECTIONS = (1, 8)
BODY = '{"echo": "bench"}'

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = %(auth)s

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"p50_us": %%d, "p99_us": %%d, "requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d}\\n',
    latency:percentile(50), latency:percentile(99), summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""

TARGET = {"p50_ratio_max": 1.2, "rps_ratio_min": 0.85, "write_xacts_max": 2}


class Gunicorn:
    def __init__(self, workers: int = 2) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="bench-gunicorn-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn", "bench.wsgi:application",
                "--workers", str(workers), "--worker-class", "sync",
                "--bind", f"127.0.0.1:{self.port}", "--log-level", "warning",
            ],
            cwd=str(ROOT), env=subprocess_env(), stdout=self.log, stderr=subprocess.STDOUT,
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


def wrk(url: str, *, token: str | None, connections: int, seconds: int) -> dict[str, float]:
    auth = json.dumps(f"Token {token}") if token else "nil"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"body": json.dumps(BODY), "auth": auth})
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


def fixtures() -> dict[str, str]:
    """A user with an API token and an ACTIVE instance of the bench no-op tool."""
    from django.contrib.auth import get_user_model

    from instances.services import instance_create
    from toolexec.models import ApiToken
    from tools.models import ToolDefinition

    user = get_user_model().objects.create_user(username=f"bench-{time.time_ns()}", password=None)
    _, key = ApiToken.issue(user=user, name="bench")
    instance = instance_create(
        owner=user, tool=ToolDefinition.objects.get(slug="bench-noop"), name="bench no-op", workflow_id="bench"
    )
    return {
        "token": key,
        "product": f"/api/v1/instances/{instance.pk}/execute-sync",
        "baseline": "/bench/baseline/execute",
    }


def statements_per_request(paths: dict[str, str], token: str, requests: int = 20) -> dict[str, dict[str, float]]:
    """In-process (Django's test client, same settings): SQL statements per request, and the
    transactions that write, attributed exactly: a write outside any atomic block is its own
    transaction; an atomic block that wrote is one more, counted at its commit."""
    from django.test import Client

    client = Client(SERVER_NAME="127.0.0.1")
    counts: dict[str, dict[str, float]] = {}
    for arm, path in paths.items():
        headers = {"HTTP_AUTHORIZATION": f"Token {token}"} if arm == "product" else {}
        client.post(path, BODY, content_type="application/json", **headers)  # warm caches
        tally = _tally(
            lambda path=path, headers=headers: client.post(path, BODY, content_type="application/json", **headers),
            requests,
        )
        counts[arm] = {key: value / requests for key, value in tally.items()}
    return counts


def _tally(send: Any, requests: int) -> dict[str, int]:
    from django.db import connection

    tally = {"statements": 0, "reads": 0, "writes": 0, "write_xacts": 0}
    pending = {"wrote": False}

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        verb = sql.lstrip().split(None, 1)[0].upper()
        tally["statements"] += 1
        if verb in {"INSERT", "UPDATE", "DELETE"}:
            tally["writes"] += 1
            if connection.in_atomic_block:
                pending["wrote"] = True
            else:
                tally["write_xacts"] += 1
        else:
            tally["reads"] += 1
        return execute(sql, params, many, context)

    real_commit = connection.commit

    def commit() -> None:
        if pending["wrote"]:
            tally["write_xacts"] += 1
            pending["wrote"] = False
        real_commit()

    connection.commit = commit  # type: ignore[method-assign]
    try:
        with connection.execute_wrapper(wrapper):
            for _ in range(requests):
                response = send()
                assert response.status_code == 200 and response.json()["success"], response.content
    finally:
        del connection.commit
    return tally


def transactions_per_request(paths: dict[str, str], token: str) -> dict[str, dict[str, float]]:
    """pg_stat_database.xact_commit per request over a 1-connection run of each arm in a
    gunicorn of its own, stopped before reading so its backends have flushed their counters.
    In autocommit every read outside a transaction counts as a transaction too."""
    stats = PgStats()
    result = {}
    try:
        for arm, path in paths.items():
            before = stats.settled(stats.xact)
            server = Gunicorn()
            try:
                figures = wrk(server.url(path), token=token if arm == "product" else None, connections=1, seconds=5)
            finally:
                server.stop()
            after = stats.settled(stats.xact)
            result[arm] = {
                "requests": figures["requests"],
                "xact_commit": (after[0] - before[0]) / figures["requests"],
                "xact_rollback": (after[1] - before[1]) / figures["requests"],
            }
    finally:
        stats.close()
    return result


def run() -> dict[str, Any]:
    setup = fixtures()
    token = setup.pop("token")
    paths = setup
    statements = statements_per_request(paths, token)
    xacts = transactions_per_request(paths, token)
    server = Gunicorn()
    by_connections: dict[int, Arms] = {}
    try:
        for connections in CONNECTIONS:

            def arm(name: str, connections: int = connections) -> Any:
                return lambda: wrk(
                    server.url(paths[name]),
                    token=token if name == "product" else None,
                    connections=connections,
                    seconds=ROUND_SECONDS,
                )

            by_connections[connections] = ab_rounds({"product": arm("product"), "baseline": arm("baseline")})
    finally:
        server.stop()
    return {"arms": by_connections, "statements": statements, "xacts": xacts, "round_seconds": ROUND_SECONDS}
