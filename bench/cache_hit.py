"""Benchmark 9: the result cache. Through one gunicorn (2 sync workers), with wrk at 1 and 8
connections, alternating the arms' rounds: execute-sync of a cacheable no-op tool
(``bench-cached-noop``), primed once so that every measured request is a hit, against
execute-sync of ``bench-noop`` (the same path with the tool run); and execute-async of the
cached tool against execute-async of ``bench-noop`` (an accept; no worker runs). In-process:
the SQL statements of each arm's request and where a sync request's time goes."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from .common import (
    ROUNDS,
    Arms,
    Gunicorn,
    ab_rounds,
    accepted_jobs_discard,
    ms,
    phases_timed,
    redis_flush,
    verdict,
    wrk,
)

TITLE = "benchmark 9: result cache"
ROUND_SECONDS = 5
CONNECTIONS = (1, 8)
BODY = '{"echo": "bench"}'
PAIRS = {"sync": ("sync hit", "sync run"), "async": ("async hit", "async accept")}
ARMS = (*PAIRS["sync"], *PAIRS["async"])
TARGET = {"sync": 0.8, "async": 1.1}  # p50 of the hit / p50 of its peer, at 1 and at 8 connections


def fixtures() -> tuple[str, dict[str, str], dict[str, Any]]:
    """A user with an API token, an ACTIVE instance of each no-op tool, and each arm's path."""
    from django.contrib.auth import get_user_model

    from core.models import ApiToken
    from instances.services.instances import instance_create
    from tools.models import ToolDefinition

    user = get_user_model().objects.create_user(username=f"bench-cache-{time.time_ns()}", password=None)
    _, key = ApiToken.issue(user=user, name="bench")
    instances = {
        slug: instance_create(owner=user, tool=ToolDefinition.objects.get(slug=slug), name=slug, workflow_id="bench")
        for slug in ("bench-cached-noop", "bench-noop")
    }
    cached, noop = (f"/api/v1/instances/{instances[slug].pk}" for slug in ("bench-cached-noop", "bench-noop"))
    paths = {
        "sync hit": f"{cached}/execute-sync",
        "sync run": f"{noop}/execute-sync",
        "async hit": f"{cached}/execute-async",
        "async accept": f"{noop}/execute-async",
    }
    return key, paths, instances


def post(url: str, token: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        url, data=BODY.encode(), method="POST",
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), json.load(response)


def answers(server: Gunicorn, paths: dict[str, str], token: str) -> dict[str, str]:
    """Prime the cache (one run of the cached tool), then check through gunicorn that a repeat
    answers HIT in its body and its Cache-Status header; what the async hit's 202 says."""
    post(server.url(paths["sync hit"]), token)
    status, headers, body = post(server.url(paths["sync hit"]), token)
    assert status == 200 and body["cache"]["status"] == "HIT", body
    assert headers["Cache-Status"].startswith("toolexec; hit"), headers
    status, _, accepted = post(server.url(paths["async hit"]), token)
    assert status == 202, accepted
    return {"cache_status": headers["Cache-Status"], "async_status": accepted["status"]}


# --- In-process: statements and phases ---------------------------------------------------------

TABLE = re.compile(r'(?:FROM|INTO|UPDATE)\s+"(\w+)"')


def statements_per_request(paths: dict[str, str], token: str, requests: int = 20) -> dict[str, dict[str, Any]]:
    """Django's test client in this process (same settings and database): SQL statements per
    request of each arm after a warm-up request, and what one request runs (verb and table)."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(SERVER_NAME="127.0.0.1")
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"}
    result = {}
    for arm, path in paths.items():
        client.post(path, BODY, content_type="application/json", **headers)
        counts = []
        for _ in range(requests):
            with CaptureQueriesContext(connection) as captured:
                response = client.post(path, BODY, content_type="application/json", **headers)
            assert response.status_code in (200, 202), response.content
            counts.append(len(captured))
        if arm.startswith("sync"):
            assert response.json()["cache"]["status"] == ("HIT" if arm == "sync hit" else "MISS"), response.content
        result[arm] = {
            "statements": sum(counts) / requests,
            "shape": [
                f"{q['sql'].split(None, 1)[0]} {m[1] if (m := TABLE.search(q['sql'])) else ''}".strip()
                for q in captured.captured_queries
            ],
        }
    redis_flush()  # the async arms' RQ jobs: no worker runs them
    return result


# Where a sync request spends its time, phase by phase (in-process, wrapped for the measurement).
PHASES = (
    ("rest_framework.views", "APIView", "perform_authentication", "authentication (token and user)"),
    ("rest_framework.views", "APIView", "check_throttles", "throttles (Redis)"),
    ("executions.api", "InstanceRunViewSet", "get_object", "instance (its own query)"),
    # Wrapped where the sync run looks them up (executions.services.sync imports them by name).
    ("executions.services.sync", None, "execution_prepare", "readiness + input validation"),
    ("executions.services.sync", None, "cache_plan", "cache plan (key and lookup when cacheable)"),
    ("executions.services.sync", None, "execution_record_hit", "hit: record it (one transaction)"),
    ("executions.services.sync", None, "execution_record_start", "run: record the attempt (INSERT)"),
    ("executions.services.sync", None, "run_with_time_limit", "run: the tool in its thread"),
    ("executions.services.sync", None, "execution_finish", "run: record the outcome (one transaction)"),
)


def phases_per_request(paths: dict[str, str], token: str, requests: int = 400) -> dict[str, dict[str, float]]:
    """Milliseconds per request in each phase of each sync arm, and in all, measured by wrapping
    each phase's function for the duration (Django's test client, same settings); the arms'
    requests alternate one by one, so drift falls on both alike."""
    from django.test import Client

    arms = PAIRS["sync"]
    labels = [label for *_, label in PHASES]
    spent = {arm: dict.fromkeys(labels, 0.0) for arm in arms}
    current = {"arm": arms[0]}

    def record(label: str, seconds: float) -> None:
        spent[current["arm"]][label] += seconds

    client = Client(SERVER_NAME="127.0.0.1")
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"}
    total = dict.fromkeys(arms, 0.0)
    with phases_timed(PHASES, record):
        for index in range(50 + requests):
            if index == 50:  # the warm-up ends
                for arm in arms:
                    spent[arm].update(dict.fromkeys(labels, 0.0))
                total = dict.fromkeys(arms, 0.0)
            for arm in arms:
                current["arm"] = arm
                started = time.perf_counter()
                client.post(paths[arm], BODY, content_type="application/json", **headers)
                total[arm] += time.perf_counter() - started
    result = {}
    for arm in arms:
        per_request = {label: value * 1000 / requests for label, value in spent[arm].items()}
        whole = total[arm] * 1000 / requests
        per_request["everything else (Django, DRF, middleware, rendering)"] = whole - sum(per_request.values())
        per_request["whole request"] = whole
        result[arm] = per_request
    return result


def hits_recorded(instance: Any) -> dict[str, dict[str, int]]:
    """By mode, the cached instance's executions and how many of them were cache hits."""
    from django.db.models import Count, Q

    from executions.models import Execution

    rows = (
        Execution.objects.filter(instance=instance)
        .values("mode")
        .annotate(runs=Count("pk"), hits=Count("pk", filter=Q(cache_hit=True)))
    )
    return {row["mode"].lower(): {"runs": row["runs"], "hits": row["hits"]} for row in rows}


# --- Latency ---------------------------------------------------------------------------------------


def measure() -> dict[str, Any]:
    token, paths, instances = fixtures()
    server = Gunicorn()
    by_pair: dict[str, dict[int, Arms]] = {pair: {} for pair in PAIRS}
    try:
        seen = answers(server, paths, token)
        statements = statements_per_request(paths, token)
        phases = phases_per_request(paths, token)
        for connections in CONNECTIONS:
            for pair, arms in PAIRS.items():

                def arm(name: str, connections: int = connections) -> Callable[[], dict[str, float]]:
                    def one_round() -> dict[str, float]:
                        if name.startswith("async"):
                            redis_flush()  # no worker drains the queue: every round starts from an empty Redis
                        return wrk(
                            server.url(paths[name]), token=token, body=BODY, connections=connections,
                            seconds=ROUND_SECONDS,
                        )  # fmt: skip

                    return one_round

                by_pair[pair][connections] = ab_rounds({name: arm(name) for name in arms})
    finally:
        server.stop()
        redis_flush()
        accepted_jobs_discard()
    recorded = hits_recorded(instances["bench-cached-noop"])
    assert recorded["sync"]["runs"] - recorded["sync"]["hits"] == 1, recorded  # the priming run only
    return {
        "arms": by_pair,
        "seen": seen,
        "recorded": recorded,
        "statements": statements,
        "phases": phases,
        "round_seconds": ROUND_SECONDS,
    }


# --- The document ------------------------------------------------------------------------------------


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    seen, recorded = result["seen"], result["recorded"]
    sync_rec, async_rec = recorded["sync"], recorded.get("async", {"runs": 0, "hits": 0})
    lines = [
        "## 9. Result cache",
        "",
        "Command: `python -m bench.run cache` (part of `make bench`).",
        "",
        "One gunicorn (2 sync workers, 127.0.0.1), requests with a token and the same JSON body every "
        "time. *sync hit*: `POST /api/v1/instances/{id}/execute-sync` of a cacheable no-op tool "
        "(`bench-cached-noop`, results kept a day), primed by one run before the rounds, so every measured "
        "request is answered from the cache (checked through gunicorn: the answer's `cache.status` is HIT "
        f"and its header `Cache-Status: {seen['cache_status']}`; afterwards the cached instance's sync "
        f"executions were {sync_rec['runs']}, of which {sync_rec['hits']} hits: all but the priming run). "
        "*sync run*: the same endpoint of `bench-noop` (not cacheable), the tool run in its thread. "
        "*async hit*: `POST …/execute-async` of the cached tool (the same primed entry); *async accept*: "
        "`execute-async` of `bench-noop`, accepted and queued; no worker runs, so Redis is flushed before "
        "every async round and its accepted jobs are ended CANCELLED at the end. "
        f"The async hit's 202 said `status: {seen['async_status']}`; the cached "
        f"instance's async executions were {async_rec['runs']}, of which {async_rec['hits']} hits. "
        f"wrk, {result['round_seconds']} s per round, one warm-up round per arm, then {ROUNDS} rounds "
        "alternating the order (A B, B A, …) within each pair. Latency figures are the median and the p99 "
        "*over rounds* of each round's own p50 / p99 from wrk; throughput likewise.",
        "",
        "| connections | arm | p50 ms (median) | p50 ms (p99 of rounds) | p99 ms (median) | req/s (median) "
        "| req/s (p99 of rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for pair, (hit, peer) in PAIRS.items():
        for connections in CONNECTIONS:
            arms = result["arms"][pair][connections]
            for arm in (hit, peer):
                lines.append(
                    f"| {connections} | {arm} | {ms(arms.median(arm, 'p50_ms'))} | {ms(arms.p99(arm, 'p50_ms'))} | "
                    f"{ms(arms.median(arm, 'p99_ms'))} | {arms.median(arm, 'rps'):.0f} | "
                    f"{arms.p99(arm, 'rps'):.0f} |"
                )
            ratio = arms.median(hit, "p50_ms") / arms.median(peer, "p50_ms")
            throughput = arms.median(hit, "rps") / arms.median(peer, "rps")
            verdicts.append(
                f"| 9. cache, {connections} conn | p50 {hit} / {peer} | {ratio:.2f}× (throughput "
                f"{throughput:.2f}×) | ≤ {TARGET[pair]}× | {verdict(ratio <= TARGET[pair])} |"
            )
    verdicts.append(
        f"| 9. cache | async hit's 202 status | {seen['async_status']} | COMPLETED | "
        f"{verdict(seen['async_status'] == 'COMPLETED')} |"
    )
    st, phases = result["statements"], result["phases"]
    whole = {arm: phases[arm]["whole request"] for arm in PAIRS["sync"]}
    lines += [
        "",
        "SQL statements per request, in-process (Django's test client, same settings, 20 requests per arm "
        "after a warm-up; BEGIN and COMMIT count, as Django logs them), and what one request runs:",
        "",
        "| arm | statements | one request |",
        "|---|---|---|",
        *(f"| {arm} | {st[arm]['statements']:g} | {' · '.join(st[arm]['shape'])} |" for arm in ARMS),
        "",
        "Where a sync request's time goes, in-process (Django's test client, one request at a time, the arms "
        "alternating request by request, 400 per arm after 50 of warm-up; each phase timed by wrapping its "
        "function):",
        "",
        "| phase | sync hit, ms per request | sync run, ms per request |",
        "|---|---|---|",
        *(
            f"| {label} | {value:.3f} | {phases['sync run'][label]:.3f} |"
            for label, value in phases["sync hit"].items()
        ),
        "",
        f"In-process, a hit's whole request is {whole['sync hit'] / whole['sync run']:.2f}× a run's (not a target).",
        "",
    ]
    return lines, verdicts
