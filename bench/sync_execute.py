"""Benchmark 1: execute-sync of a no-op tool through gunicorn (2 sync workers) against the
*guarded DRF floor* (issue 20's target): a DRF ``APIView`` with the product's token
authentication and throttle doing the same writes as the product, through the ORM on bench
tables of the same shape (bench/baseline/views.py ``FrameworkFloor``), with wrk at 1 and 8
connections, alternating the arms' rounds. For reference only: the unauthenticated baseline (a
plain Django view doing the least SQL of a recorded run) and *guarded*, the baseline's statements
behind the product's token statement and throttle round trip in a plain Django view."""

from __future__ import annotations

import time
from typing import Any

from .common import ROUNDS, Arms, Gunicorn, PgStats, ab_rounds, ms, phases_timed, verdict, wrk

TITLE = "benchmark 1: sync execute overhead"
ROUND_SECONDS = 5
ARMS = ("product", "floor", "guarded", "baseline")
AUTHENTICATED = {"product", "floor", "guarded"}
CONNECTIONS = (1, 8)
BODY = '{"echo": "bench"}'

TARGET = {"floor_p50_ratio_max": 1.3}  # product / guarded DRF floor, at 1 and at 8 connections


def fixtures() -> dict[str, str]:
    """A user with an API token and an ACTIVE instance of the bench no-op tool."""
    from django.contrib.auth import get_user_model

    from bench.baseline.views import floor_fixtures
    from core.models import ApiToken
    from credits.services import credit_account_for
    from instances.services.instances import instance_create
    from tools.models import ToolDefinition

    user = get_user_model().objects.create_user(username=f"bench-{time.time_ns()}", password=None)
    _, key = ApiToken.issue(user=user, name="bench")
    instance = instance_create(
        owner=user, tool=ToolDefinition.objects.get(slug="bench-noop"), name="bench no-op", workflow_id="bench"
    )
    account = credit_account_for(owner=user)  # the floor's account starts as the product's
    floor = floor_fixtures(user, account.balance, is_unlimited=account.is_unlimited)
    return {
        "token": key,
        "product": f"/api/v1/instances/{instance.pk}/execute-sync",
        "floor": f"/bench/framework-floor/instances/{floor.pk}/execute",
        "guarded": "/bench/guarded/execute",
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
        headers = {"HTTP_AUTHORIZATION": f"Token {token}"} if arm in AUTHENTICATED else {}
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
                figures = wrk(
                    server.url(path), token=token if arm in AUTHENTICATED else None, body=BODY, connections=1, seconds=5
                )
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


# Where a product request spends its time, phase by phase (in-process, wrapped for the measurement).
PHASES = (
    ("rest_framework.views", "APIView", "perform_authentication", "authentication (token, user, instance: 1 query)"),
    ("rest_framework.views", "APIView", "check_throttles", "throttles (Redis)"),
    ("executions.api", "InstanceRunViewSet", "get_object", "instance (its own query)"),
    # Wrapped where the sync run looks them up (executions.services.sync imports them by name).
    ("executions.services.sync", None, "execution_prepare", "readiness + input validation"),
    ("executions.services.sync", None, "execution_record_start", "record the attempt (INSERT)"),
    ("executions.services.sync", None, "run_with_time_limit", "run the tool in its thread"),
    ("executions.services.sync", None, "execution_finish", "record the outcome (one transaction: execution, instance)"),
)


def phases_per_request(path: str, token: str, requests: int = 400) -> dict[str, float]:
    """Milliseconds per request in each phase of the product's path, and in all, measured by
    wrapping each phase's function for the duration (Django's test client, same settings)."""
    from django.test import Client

    spent: dict[str, float] = {}

    def record(label: str, seconds: float) -> None:
        spent[label] = spent.get(label, 0.0) + seconds

    client = Client(SERVER_NAME="127.0.0.1")
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"}
    with phases_timed(PHASES, record):
        for _ in range(50):
            client.post(path, BODY, content_type="application/json", **headers)
        spent.clear()
        started = time.perf_counter()
        for _ in range(requests):
            client.post(path, BODY, content_type="application/json", **headers)
        total = time.perf_counter() - started
    per_request = {label: spent.get(label, 0.0) * 1000 / requests for *_, label in PHASES}
    per_request["everything else (Django, DRF, middleware, rendering)"] = total * 1000 / requests - sum(
        per_request.values()
    )
    per_request["whole request"] = total * 1000 / requests
    return per_request


def measure() -> dict[str, Any]:
    setup = fixtures()
    token = setup.pop("token")
    paths = setup
    phases = phases_per_request(paths["product"], token)
    statements = statements_per_request(paths, token)
    xacts = transactions_per_request(paths, token)
    server = Gunicorn()
    by_connections: dict[int, Arms] = {}
    try:
        for connections in CONNECTIONS:

            def arm(name: str, connections: int = connections) -> Any:
                return lambda: wrk(
                    server.url(paths[name]),
                    token=token if name in AUTHENTICATED else None,
                    body=BODY,
                    connections=connections,
                    seconds=ROUND_SECONDS,
                )

            by_connections[connections] = ab_rounds({name: arm(name) for name in ARMS})
    finally:
        server.stop()
    return {
        "arms": by_connections,
        "statements": statements,
        "xacts": xacts,
        "phases": phases,
        "round_seconds": ROUND_SECONDS,
    }


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The document's section for this benchmark, and its rows of the targets table."""
    lines = [
        "## 1. Sync execute overhead",
        "",
        "`POST /api/v1/instances/{id}/execute-sync` of a no-op tool (`bench-noop`) with a token, "
        "through gunicorn (2 sync workers, 127.0.0.1), against the *guarded DRF floor* (*floor*, the "
        "target): a DRF `APIView` with the product's settings (token authentication, throttles, renderers) "
        "doing the product's writes through the ORM on the bench's tables of the same shape "
        "(`bench/models.py`: the execution, instance statistics, credit account and ledger columns, indexes "
        "and constraints): the execution row inserted with the credit hold in one transaction (the insert "
        "alone when the tool holds nothing, as `execution_record_start`), then the outcome (conditional "
        "update), the statistics (`F()`), the settlement and the ledger entry in one transaction (as "
        "`execution_finish`), at the bench no-op tool's price. For reference only: `bench/baseline`, a plain "
        "Django view (same settings and middleware, no DRF, no authentication) doing an INSERT "
        "(autocommit), then an UPDATE of that row and a counter UPDATE in one transaction; and *guarded*, "
        "those statements in a plain Django view (no DRF) after the product's own token statement "
        "(`core.auth`: the token and its user by the key's hash, one SELECT) and its own per-user throttle "
        "(`core.throttles.UserThrottle`: one Redis round trip). "
        f"wrk with a JSON body, {result['round_seconds']} s per round, one warm-up round per arm, then "
        f"{ROUNDS} rounds alternating the order (A B, B A, …). Latency figures are the median "
        "and the p99 *over rounds* of each round's own p50 / p99 from wrk; throughput likewise.",
        "",
        "| connections | arm | p50 ms (median) | p50 ms (p99 of rounds) | p99 ms (median) | req/s (median) "
        "| req/s (p99 of rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts, ratios = [], []
    for connections in CONNECTIONS:
        arms = result["arms"][connections]
        for arm in ARMS:
            lines.append(
                f"| {connections} | {arm} | {ms(arms.median(arm, 'p50_ms'))} | {ms(arms.p99(arm, 'p50_ms'))} | "
                f"{ms(arms.median(arm, 'p99_ms'))} | {arms.median(arm, 'rps'):.0f} | {arms.p99(arm, 'rps'):.0f} |"
            )
        p50_ratio = arms.median("product", "p50_ms") / arms.median("floor", "p50_ms")
        rps_ratio = arms.median("product", "rps") / arms.median("floor", "rps")
        floor, base = arms.median("floor", "p50_ms"), arms.median("baseline", "p50_ms")
        ratios.append(
            f"at {connections} connection{'s' if connections > 1 else ''}, the guarded arm's p50 is "
            f"{arms.median('guarded', 'p50_ms') / base:.2f}× the baseline's and its throughput "
            f"{arms.median('guarded', 'rps') / arms.median('baseline', 'rps'):.0%} of it; the floor's p50 is "
            f"{floor / base:.2f}× the baseline's and its throughput "
            f"{arms.median('floor', 'rps') / arms.median('baseline', 'rps'):.0%}; the product's p50 is "
            f"{arms.median('product', 'p50_ms') / base:.2f}× the baseline's and its throughput "
            f"{arms.median('product', 'rps') / arms.median('baseline', 'rps'):.0%} of it (reference only); "
            f"the product's throughput is {rps_ratio:.0%} of the floor's"
        )
        verdicts.append(
            f"| 1. sync, {connections} conn | p50 product / guarded DRF floor | {p50_ratio:.2f}× | "
            f"≤ {TARGET['floor_p50_ratio_max']}× | {verdict(p50_ratio <= TARGET['floor_p50_ratio_max'])} |"
        )
    lines += ["", f"Guards and framework: {'; '.join(ratios)}."]
    st, xa = result["statements"], result["xacts"]
    lines += [
        "",
        f"Write transactions per request: product {st['product']['write_xacts']:g}, guarded DRF floor "
        f"{st['floor']['write_xacts']:g}; writes: product {st['product']['writes']:g}, floor "
        f"{st['floor']['writes']:g} (the floor mirrors the product's write statements; not a target).",
    ]
    lines += [
        "",
        "Per request, by arm:",
        "",
        "| arm | SQL statements | reads | writes | write transactions | xact_commit (pg_stat_database) "
        "| xact_rollback |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        lines.append(
            f"| {arm} | {st[arm]['statements']:g} | {st[arm]['reads']:g} | {st[arm]['writes']:g} | "
            f"{st[arm]['write_xacts']:g} | "
            f"{xa[arm]['xact_commit']:.2f} | {xa[arm]['xact_rollback']:.2f} |"
        )
    lines += [
        "",
        "*Write transactions* are attributed exactly, in-process (Django's test client, same settings, "
        "20 requests after a warm-up): a write statement outside an atomic block is a transaction of its "
        "own, an atomic block that wrote counts once at its commit. *xact_commit* is PostgreSQL's own count "
        "over a 1-connection wrk run of each arm ("
        + ", ".join(f"{xa[arm]['requests']:.0f}" for arm in ARMS)
        + " requests) in a gunicorn started and stopped for it (so its backends "
        "flushed their counters); in autocommit every read outside a transaction is a committed transaction "
        "too, so it is reads + write transactions (plus connection set-up, amortised by persistent connections).",
        "",
        "Where a product request's time goes, in-process (Django's test client, one request at a time, "
        "400 requests after 50 of warm-up; each phase timed by wrapping its function):",
        "",
        "| phase | ms per request |",
        "|---|---|",
        *(f"| {label} | {value:.3f} |" for label, value in result["phases"].items()),
        "",
    ]
    return lines, verdicts
