"""Benchmark 6: history at scale. 1,000,000 bulk-generated executions (SQL, ``INSERT …
SELECT generate_series``), then the executions list API (first page and a page 500,000 rows
deep through the cursor), the status overview (as the owner and as staff), the admin's
Execution changelist (all of it, and filtered to the runs still RUNNING) and a status history
page 500,000 rows deep, through gunicorn with wrk; and, in-process, every SQL query of each
request with PostgreSQL's plan of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any

from .common import ROUNDS, Gunicorn, ab_rounds, ms, verdict, wrk

TITLE = "benchmark 6: history at scale"
ROWS = int(os.environ.get("BENCH_HISTORY_ROWS", "1000000"))  # fewer only to develop the benchmark
DAYS = 240  # created_at spread uniformly over the last 240 days
OTHER_OWNERS = 39
BENCH_SHARE = 0.8  # of the rows, owned by the benchmark's API user
BENCH_INSTANCES = 40
OTHER_INSTANCES_EACH = 3
DEEP = 500_000
ROUND_SECONDS = 3
CONNECTIONS = 1
SMALL_TABLE_ROWS = 10_000  # a sequential scan of a table smaller than this is PostgreSQL's right call
WHOLE_FRACTION = 0.1  # an index scan reading more of its table than this is a scan, not a lookup

TARGET = {"api_p50_ms": 10.0, "page_p50_ms": 150.0}

# name -> (what it is, target key)
REQUESTS = {
    "api_first": ("`GET /api/v1/executions/` first page (token of the owner of 80 %)", "api_p50_ms"),
    "api_deep": (f"`GET /api/v1/executions/?cursor=…` {DEEP:,} rows deep (`next` link)", "api_p50_ms"),
    "overview": ("`GET /status/` overview, signed in as that owner", "page_p50_ms"),
    "overview_staff": ("`GET /status/` overview, signed in as staff (everyone's runs)", "page_p50_ms"),
    "admin": ("`GET /admin/executions/execution/` changelist, superuser", "page_p50_ms"),
    "admin_running": (
        "`GET /admin/executions/execution/?status__exact=RUNNING` changelist, superuser (runs not yet ended)",
        "page_p50_ms",
    ),
    "history_deep": (
        f"`GET /status/executions/?before=…` history page {DEEP:,} rows deep, signed in as that owner",
        "page_p50_ms",
    ),
}

# Who asks: the API user's token (None), or a signed-in session of the owner, staff, superuser.
VIEWER = {
    "api_first": None,
    "api_deep": None,
    "overview": "owner",
    "overview_staff": "staff",
    "admin": "superuser",
    "admin_running": "superuser",
    "history_deep": "owner",
}


# --- Data -------------------------------------------------------------------------------------

EXECUTIONS_SQL = """
INSERT INTO executions_execution (
    id, instance_id, tool_id, owner_id, mode, status, input_data, output_data, error_code, error_message,
    error_metadata, credits_consumed, credits_held, started_at, finished_at, duration_ms, idempotency_key,
    request_fingerprint, cache_hit, origin, created_at
)
SELECT
    gen_random_uuid(), i.id, i.tool_id, i.owner_id, r.mode, r.status,
    jsonb_build_object(
        'expression', 'people[?age > `30`].name',
        'data', jsonb_build_object('people', jsonb_build_array(jsonb_build_object('name', 'Ada', 'age', r.s %% 90)))
    ),
    CASE WHEN r.status = 'COMPLETED' THEN jsonb_build_object('result', jsonb_build_array('Ada')) END,
    CASE r.status WHEN 'FAILED' THEN 'UPSTREAM_ERROR' WHEN 'TIMED_OUT' THEN 'TIMEOUT'
                  WHEN 'CANCELLED' THEN 'CANCELLED' ELSE '' END,
    CASE r.status WHEN 'FAILED' THEN 'Example API answered 503 Service Unavailable; try again in a few minutes.'
                  WHEN 'TIMED_OUT' THEN 'The run took longer than 30 seconds and was stopped.'
                  WHEN 'CANCELLED' THEN 'Cancelled by its owner.' ELSE '' END,
    CASE WHEN r.status = 'FAILED' THEN
        '{"action_items": [{"action": "retry", "message": "Try again in a few minutes", "priority": "medium"}],
          "can_retry": true}'::jsonb
    ELSE '{}'::jsonb END,
    CASE WHEN r.status = 'COMPLETED' THEN round((0.01 + r.r_duration * 0.5)::numeric, 4) ELSE 0 END,
    0,
    CASE WHEN r.status <> 'PENDING' THEN r.created_at + interval '3 milliseconds' END,
    CASE WHEN r.status NOT IN ('PENDING', 'RUNNING')
         THEN r.created_at + interval '3 milliseconds' + r.duration_ms * interval '1 millisecond' END,
    CASE WHEN r.status NOT IN ('PENDING', 'RUNNING') THEN r.duration_ms END,
    '', '', false, '', r.created_at
FROM (
    SELECT g.*,
        CASE WHEN g.r_mode < 0.25 THEN 'ASYNC' ELSE 'SYNC' END AS mode,
        CASE
            WHEN g.created_at > now() - interval '30 minutes' AND g.r_status < 0.15 THEN 'PENDING'
            WHEN g.created_at > now() - interval '30 minutes' AND g.r_status < 0.30 THEN 'RUNNING'
            WHEN g.r_status < 0.86 THEN 'COMPLETED'
            WHEN g.r_status < 0.94 THEN 'FAILED'
            WHEN g.r_status < 0.96 THEN 'TIMED_OUT'
            ELSE 'CANCELLED'
        END AS status,
        (5 + power(g.r_duration, 4) * 60000)::integer AS duration_ms
    FROM (
        -- Uniform over the days and increasing with s: rows lie in the table in the order they
        -- were recorded, as an append-only history does.
        SELECT s, random() AS r_owner, random() AS r_instance, random() AS r_status, random() AS r_mode,
               random() AS r_duration,
               now() - %(days)s * interval '1 day' + (s - random()) * (%(days)s * interval '1 day' / %(rows)s)
                   AS created_at
        FROM generate_series(1, %(rows)s) AS s
    ) AS g
) AS r
JOIN bench_history_instance AS i ON i.n = CASE
    WHEN r.r_owner < %(share)s THEN floor(r.r_instance * %(bench_instances)s)::integer
    ELSE %(bench_instances)s + floor(r.r_instance * %(other_instances)s)::integer
END
"""

# The queued side of every ASYNC execution, as the services would have left it.
JOBS_SQL = """
INSERT INTO executions_job (
    id, execution_id, instance_id, owner_id, queue, rq_job_id, status, progress, current_step, step_index,
    steps_total, attempts, max_attempts, sealed_inputs, attempt_log, worker_name, heartbeat_at,
    cancel_requested_at, enqueued_at, started_at, finished_at, created_at, updated_at
)
SELECT
    gen_random_uuid(), e.id, e.instance_id, e.owner_id, 'default', '',
    CASE e.status WHEN 'PENDING' THEN 'QUEUED' ELSE e.status END,
    CASE e.status WHEN 'COMPLETED' THEN 100 WHEN 'RUNNING' THEN 40 ELSE 0 END,
    CASE e.status WHEN 'RUNNING' THEN 'Step 8 of 20' ELSE '' END,
    CASE e.status WHEN 'RUNNING' THEN 8 END,
    CASE e.status WHEN 'RUNNING' THEN 20 END,
    CASE e.status WHEN 'PENDING' THEN 0 ELSE 1 END, 1, '', '[]'::jsonb,
    CASE e.status WHEN 'PENDING' THEN '' ELSE 'bench-worker' END,
    CASE e.status WHEN 'PENDING' THEN NULL WHEN 'RUNNING' THEN now() ELSE e.finished_at END,
    NULL, e.created_at, e.started_at, e.finished_at, e.created_at, coalesce(e.finished_at, now())
FROM executions_execution AS e
WHERE e.mode = 'ASYNC'
"""


def generate() -> dict[str, Any]:
    """Owners, their instances, ROWS executions spread over them and over DAYS days, the jobs of
    the ASYNC ones; then VACUUM ANALYZE (as autovacuum would have left a table this old)."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from instances.models import ToolInstance
    from tools.models import ToolDefinition

    started = time.perf_counter()
    with connection.cursor() as cursor:
        # Exactly ROWS executions: what the benchmarks before this one recorded goes.
        cursor.execute("TRUNCATE executions_execution CASCADE")
    user_model = get_user_model()
    owner = user_model.objects.create_user(username="history-owner", password=None)
    others = user_model.objects.bulk_create(
        [user_model(username=f"history-other-{n:02d}") for n in range(OTHER_OWNERS)]
    )
    staff = user_model.objects.create_user(username="history-staff", password=None, is_staff=True)
    superuser = user_model.objects.create_superuser(username="history-admin", email="", password=None)
    tools = list(ToolDefinition.objects.order_by("slug"))
    instances = [
        ToolInstance(
            owner=owner,
            tool=tools[n % len(tools)],
            name=f"{tools[n % len(tools)].name} #{n}",
            workflow_id=f"workflow-{n % 7}",
            status=ToolInstance.Status.ACTIVE,
        )
        for n in range(BENCH_INSTANCES)
    ]
    instances += [
        ToolInstance(
            owner=other,
            tool=tools[(n + k) % len(tools)],
            name=f"instance {k}",
            workflow_id="workflow-0",
            status=ToolInstance.Status.ACTIVE,
        )
        for n, other in enumerate(others)
        for k in range(OTHER_INSTANCES_EACH)
    ]
    ToolInstance.objects.bulk_create(instances)
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TEMP TABLE bench_history_instance AS SELECT row_number() OVER "
            "(ORDER BY owner_id = %s DESC, id) - 1 AS n, id, tool_id, owner_id FROM instances_toolinstance",
            [owner.pk],
        )
        cursor.execute("SELECT setseed(0.42)")
        cursor.execute(
            EXECUTIONS_SQL,
            {
                "rows": ROWS,
                "days": DAYS,
                "share": BENCH_SHARE,
                "bench_instances": BENCH_INSTANCES,
                "other_instances": OTHER_OWNERS * OTHER_INSTANCES_EACH,
            },
        )
        inserted = time.perf_counter()
        cursor.execute(JOBS_SQL)
        cursor.execute("DROP TABLE bench_history_instance")
        jobs_inserted = time.perf_counter()
        cursor.execute("VACUUM (ANALYZE) executions_execution")
        cursor.execute("VACUUM (ANALYZE) executions_job")
        cursor.execute("ANALYZE")
        cursor.execute(
            "SELECT count(*), count(*) FILTER (WHERE owner_id = %s), count(*) FILTER (WHERE mode = 'ASYNC'), "
            "count(*) FILTER (WHERE created_at >= now() - interval '24 hours'), min(created_at), max(created_at), "
            "pg_size_pretty(pg_total_relation_size('executions_execution')) FROM executions_execution",
            [owner.pk],
        )
        total, owned, async_rows, last_day, first, last, size = cursor.fetchone()
        cursor.execute("SELECT status, count(*) FROM executions_execution GROUP BY status ORDER BY 2 DESC")
        statuses = dict(cursor.fetchall())
    done = time.perf_counter()
    return {
        "owner": owner.pk,
        "staff": staff.pk,
        "superuser": superuser.pk,
        "rows": total,
        "owned": owned,
        "async": async_rows,
        "last_day": last_day,
        "first": first,
        "last": last,
        "size": size,
        "statuses": statuses,
        "owners": OTHER_OWNERS + 1,
        "instances": len(instances),
        "tools": len(tools),
        "seconds": {
            "executions": inserted - started,
            "jobs": jobs_inserted - inserted,
            "vacuum_analyze": done - jobs_inserted,
        },
    }


# --- Who asks, and what -----------------------------------------------------------------------


def collect_static() -> None:
    """Production settings serve hashed static files from a manifest (whitenoise): the pages
    need ``collectstatic``, run into a STATIC_ROOT of the bench's own (see ``measure``)."""
    from django.core.management import call_command

    call_command("collectstatic", interactive=False, verbosity=0)


def sessions(data: dict[str, Any]) -> dict[str, str]:
    """A signed-in session (its cookie value) for the owner, the staff member and the superuser."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    cookies = {}
    for who in ("owner", "staff", "superuser"):
        client = Client(SERVER_NAME="127.0.0.1")
        client.force_login(get_user_model().objects.get(pk=data[who]))
        cookies[who] = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return cookies


def deep_cursor_seed(owner_id: int, page_size: int) -> str:
    """The path of the page that starts right after the owner's row number DEEP - page_size,
    its cursor encoded by the pagination class itself (``encode_cursor``) for that row's
    created_at, as the ``next`` link of the page before it would carry it."""
    from rest_framework.pagination import Cursor

    from core.api import NewestFirstPagination
    from executions.models import Execution

    position = (
        Execution.objects.filter(owner_id=owner_id)
        .order_by("-created_at")
        .values_list("created_at", flat=True)[DEEP - page_size]
    )
    pagination = NewestFirstPagination()
    pagination.base_url = "/api/v1/executions/"
    return pagination.encode_cursor(Cursor(offset=0, reverse=False, position=str(position)))


def history_cursor(owner_id: int) -> str:
    """The status history's ``before`` cursor (``page_selectors.cursor_of``, what its *Older*
    link carries) at the owner's row DEEP: the page shows the rows after it."""
    from executions.models import Execution
    from executions.page_selectors import cursor_of

    return cursor_of(Execution.objects.filter(owner_id=owner_id).order_by("-created_at", "-id")[DEEP - 1])


def api_get(url: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Token {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def local_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


# --- SQL of each request, and its plans -------------------------------------------------------


def queries_of(path: str, *, token: str | None = None, cookie: str | None = None) -> list[str]:
    """Every SQL statement one GET of ``path`` runs, in-process (Django's test client, the
    bench settings and database), after one warm-up GET."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(SERVER_NAME="127.0.0.1")
    headers: dict[str, str] = {}
    if token:
        headers["HTTP_AUTHORIZATION"] = f"Token {token}"
    if cookie:
        name, value = cookie.split("=", 1)
        client.cookies[name] = value
    response = client.get(path, **headers)
    assert response.status_code == 200, (path, response.status_code, response.content[:500])
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, **headers)
    assert response.status_code == 200, (path, response.status_code)
    return [query["sql"] for query in captured.captured_queries]


SCAN = re.compile(
    r"(?P<kind>(?:Parallel )?(?:Seq Scan|Index Only Scan|Index Scan|Bitmap Heap Scan|Bitmap Index Scan))"
    r"(?: Backward)?(?: using (?P<index>\S+))? on (?P<relation>\S+)"
)
COUNT = re.compile(r"\bCOUNT\(", re.IGNORECASE)


def table_rows() -> dict[str, float]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT relname, reltuples FROM pg_class WHERE relkind IN ('r', 'i')")
        return dict(cursor.fetchall())


ACTUAL = re.compile(r"actual time=[\d.]+\.\.[\d.]+ rows=(\d+) loops=(\d+)")
REMOVED = re.compile(r"Rows Removed by (?:Filter|Index Recheck): (\d+)")


def plan_scans(plan: str, rows: dict[str, float]) -> list[dict[str, Any]]:
    """The scan nodes of an ``EXPLAIN ANALYZE`` text plan: kind, index, table, the table's
    size, and the rows the node read (returned plus removed by its filter, over all loops)."""
    scans: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for line in plan.splitlines():
        match = SCAN.search(line)
        if match:
            actual = ACTUAL.search(line)
            loops = int(actual[2]) if actual else 1
            relation = match["relation"]
            current = {
                "kind": match["kind"],
                "index": match["index"] or (relation if "Bitmap Index" in match["kind"] else None),
                "relation": relation,
                "table_rows": rows.get(relation, 0.0),
                "loops": loops,
                "read": int(actual[1]) * loops if actual else 0,
            }
            scans.append(current)
        elif "->" in line:
            current = None
        elif current is not None and (removed := REMOVED.search(line)):
            current["read"] += int(removed[1]) * current["loops"]
    for scan in scans:
        if "Bitmap Index" in scan["kind"]:  # an index: its size is the table's
            scan["table_rows"] = max(scan["table_rows"], rows.get(scan["index"], 0.0))
        large = scan["table_rows"] >= SMALL_TABLE_ROWS
        scan["sequential"] = large and "Seq Scan" in scan["kind"]
        scan["whole"] = large and scan["read"] > WHOLE_FRACTION * scan["table_rows"]
        scan["ok"] = not (scan["sequential"] or scan["whole"])
    return scans


def explain(sql: str, rows: dict[str, float]) -> dict[str, Any]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of one statement and its scans: every table of
    SMALL_TABLE_ROWS rows or more read through an index, and not most of it."""
    from django.db import connection

    if not sql.lstrip().upper().startswith("SELECT"):
        return {"plan": "(not a SELECT)", "scans": [], "index_ok": True, "read": 0, "buffers": 0, "ms": 0.0}
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
        plan = "\n".join(row[0] for row in cursor.fetchall())
    scans = plan_scans(plan, rows)
    elapsed = re.search(r"Execution Time: ([\d.]+) ms", plan)
    buffers = re.search(r"Buffers: shared(?: hit=(\d+))?(?: read=(\d+))?", plan)  # the top node's: the total
    return {
        "plan": plan,
        "scans": scans,
        "index_ok": all(scan["ok"] for scan in scans),
        "read": sum(
            scan["read"]
            for scan in scans
            if scan["table_rows"] >= SMALL_TABLE_ROWS and "Bitmap Index" not in scan["kind"]  # its heap scan counts
        ),
        "buffers": sum(int(n) for n in buffers.groups() if n) if buffers else 0,
        "ms": float(elapsed[1]) if elapsed else 0.0,
    }


def unfiltered_count(sql: str) -> bool:
    return bool(COUNT.search(sql)) and " WHERE " not in sql.upper()


def sql_report(paths: dict[str, str], token: str, cookies: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    rows = table_rows()
    report = {}
    for name, path in paths.items():
        cookie = cookies[VIEWER[name]] if VIEWER[name] else None
        statements = queries_of(path, token=None if cookie else token, cookie=cookie)
        report[name] = [
            {"sql": sql, "unfiltered_count": unfiltered_count(sql), **explain(sql, rows)} for sql in statements
        ]
    return report


# --- The run ----------------------------------------------------------------------------------


def measure() -> dict[str, Any]:
    from django.contrib.auth import get_user_model
    from django.test.utils import override_settings

    from core.api import NewestFirstPagination
    from core.models import ApiToken

    data = generate()
    print(
        f"  {data['rows']:,} executions in {data['seconds']['executions']:.1f} s, jobs in "
        f"{data['seconds']['jobs']:.1f} s, VACUUM ANALYZE in {data['seconds']['vacuum_analyze']:.1f} s",
        flush=True,
    )
    _, token = ApiToken.issue(user=get_user_model().objects.get(pk=data["owner"]), name="bench")
    cookies = sessions(data)
    static_root = tempfile.mkdtemp(prefix="bench-static-")
    with override_settings(STATIC_ROOT=static_root):
        collect_static()
        server = Gunicorn(env={"STATIC_ROOT": static_root})
        try:
            first = api_get(server.url("/api/v1/executions/"), token)
            seed = api_get(server.url(deep_cursor_seed(data["owner"], NewestFirstPagination.page_size)), token)
            deep = local_path(seed["next"])
            deep_page = api_get(server.url(deep), token)
            assert len(first["results"]) == len(deep_page["results"]) == NewestFirstPagination.page_size
            paths = {
                "api_first": "/api/v1/executions/",
                "api_deep": deep,
                "overview": "/status/",
                "overview_staff": "/status/",
                "admin": "/admin/executions/execution/",
                "admin_running": "/admin/executions/execution/?status__exact=RUNNING",
                "history_deep": f"/status/executions/?before={history_cursor(data['owner'])}",
            }
            headers = {name: {"Cookie": cookies[who]} if who else {} for name, who in VIEWER.items()}
            sql = sql_report(paths, token, cookies)

            def arm(name: str) -> Any:
                return lambda: wrk(
                    server.url(paths[name]),
                    token=None if headers[name] else token,
                    headers=headers[name],
                    connections=CONNECTIONS,
                    seconds=ROUND_SECONDS,
                )

            arms = ab_rounds({name: arm(name) for name in REQUESTS})
        finally:
            server.stop()
            shutil.rmtree(static_root, ignore_errors=True)
    return {
        "data": data,
        "arms": arms,
        "sql": sql,
        "deep_path": deep,
        "deep_seed_row": DEEP - NewestFirstPagination.page_size,
        "deep_created_at": deep_page["results"][0]["created_at"],
        "round_seconds": ROUND_SECONDS,
    }


# --- The document -----------------------------------------------------------------------------


def _scans_words(queries: list[dict[str, Any]]) -> str:
    words = []
    for scan in (scan for query in queries for scan in query["scans"]):
        text = f"{scan['kind']} {scan['index'] or scan['relation']}"
        if not scan["ok"]:
            text = f"**{text} (read {scan['read']:,} of {scan['table_rows']:,.0f} rows)**"
        if text not in words:
            words.append(text)
    return "; ".join(words)


# A session key (32 letters and digits) and an API token's SHA-256 are credentials of the bench
# database: the document shows their place in the SQL, not their value.
CREDENTIAL_LITERAL = re.compile(r"'(?:[a-z0-9]{32}|[0-9a-f]{64})'")


def redacted(text: str) -> str:
    return CREDENTIAL_LITERAL.sub("'…'", text)


def section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    data, arms, sql = result["data"], result["arms"], result["sql"]
    statuses = ", ".join(f"{status} {count:,}" for status, count in data["statuses"].items())
    lines = [
        "## 6. History at scale",
        "",
        f"{data['rows']:,} executions ({data['size']} with indexes) bulk-generated in SQL (`INSERT … SELECT "
        f"generate_series`, {data['seconds']['executions']:.0f} s; jobs {data['seconds']['jobs']:.0f} s; "
        f"`VACUUM (ANALYZE)` {data['seconds']['vacuum_analyze']:.0f} s): {data['owners']} owners, the API user "
        f"owning {data['owned']:,} ({data['owned'] / data['rows']:.0%}); {data['instances']} instances of "
        f"{data['tools']} tools; created_at uniform over {DAYS} days ({data['first']:%Y-%m-%d} to "
        f"{data['last']:%Y-%m-%d}, {data['last_day']:,} in the last 24 hours); {statuses}; "
        f"{data['async']:,} ASYNC, each with its Job row. Through gunicorn (2 sync workers) with wrk, "
        f"{CONNECTIONS} connection, {result['round_seconds']} s per round, one warm-up round per request, then "
        f"{ROUNDS} rounds; latency figures are the median and the p99 over rounds of each round's own p50 / p99.",
        "",
        f"The deep API page is `{result['deep_path']}` (first row created {result['deep_created_at']}): the "
        f"`next` link the API gave for the page that starts after the owner's row {result['deep_seed_row']:,}, "
        "whose cursor was "
        "encoded with `NewestFirstPagination.encode_cursor` for that row's `created_at` (the format its own "
        "`next` links carry), as a client paging that far would have been given it. The history page's "
        f"`before` cursor is `page_selectors.cursor_of` (what its *Older* link carries) of the owner's row "
        f"{DEEP:,}.",
        "",
        "| request | p50 ms (median) | p50 ms (p99 of rounds) | p99 ms (median) | req/s (median) | SQL queries "
        "| SQL ms (EXPLAIN ANALYZE) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, (words, target) in REQUESTS.items():
        queries = sql[name]
        lines.append(
            f"| {words} | {ms(arms.median(name, 'p50_ms'))} | {ms(arms.p99(name, 'p50_ms'))} | "
            f"{ms(arms.median(name, 'p99_ms'))} | {arms.median(name, 'rps'):.0f} | {len(queries)} | "
            f"{sum(q['ms'] for q in queries):.2f} |"
        )
        p50 = arms.median(name, "p50_ms")
        verdicts.append(
            f"| 6. history, {name.replace('_', ' ')} | p50 | {ms(p50)} ms | ≤ {TARGET[target]:g} ms | "
            f"{verdict(p50 <= TARGET[target])} |"
        )
    counts = [q for queries in sql.values() for q in queries if q["unfiltered_count"]]
    misses = [q for queries in sql.values() for q in queries if not q["index_ok"]]
    total = sum(len(queries) for queries in sql.values())
    verdicts.append(
        f"| 6. history | unfiltered `COUNT(*)` on these paths | {len(counts)} | 0 | {verdict(not counts)} |"
    )
    verdicts.append(
        f"| 6. history | queries reading every table of ≥ {SMALL_TABLE_ROWS:,} rows through an index (a "
        f"lookup, not ≥ {WHOLE_FRACTION:.0%} of it) | {total - len(misses)} of {total} | all | {verdict(not misses)} |"
    )
    lines += [
        "",
        "Every SQL statement of one request, captured in-process (Django's test client, the same settings and "
        "database, after a warm-up request), then run again under `EXPLAIN (ANALYZE, BUFFERS)`. A query passes "
        f"when every table of {SMALL_TABLE_ROWS:,} rows or more in its plan is read through an index (Index Scan, "
        f"Index Only Scan, Bitmap Index Scan) and no scan reads more than {WHOLE_FRACTION:.0%} of it (an index "
        "scan through the whole index is a full scan in disguise); PostgreSQL rightly reads a table of a few "
        "rows (the tool catalog, the users, the sessions) sequentially. *Rows read* are the rows the scans of "
        "large tables returned or filtered out, over all loops; *buffers* the 8 kB pages the statements touched "
        "(shared hit + read). An unfiltered count is a `COUNT(` in a statement without `WHERE`.",
        "",
        "| request | queries | unfiltered COUNT(*) | large tables through an index | rows read | buffers | scans |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in REQUESTS:
        queries = sql[name]
        lines.append(
            f"| {name} | {len(queries)} | {sum(q['unfiltered_count'] for q in queries)} | "
            f"{verdict(all(q['index_ok'] for q in queries))} | {sum(q['read'] for q in queries):,} | "
            f"{sum(q['buffers'] for q in queries):,} | {_scans_words(queries)} |"
        )
    lines.append("")
    for name, (words, _) in REQUESTS.items():
        lines += [
            "<details>",
            f"<summary>{name}: the {len(sql[name])} queries of {words.replace('`', '')} and their plans</summary>",
            "",
        ]
        for number, query in enumerate(sql[name], 1):
            flags = []
            if query["unfiltered_count"]:
                flags.append("UNFILTERED COUNT")
            if not query["index_ok"]:
                flags.append("READS MOST OF A LARGE TABLE")
            lines += [
                f"{number}. {' · '.join(flags) or 'ok'} ({query['ms']:.2f} ms, {query['read']:,} rows read, "
                f"{query['buffers']:,} buffers)",
                "",
                "```sql",
                redacted(query["sql"]),
                "```",
                "",
                "```text",
                redacted(query["plan"]),
                "```",
                "",
            ]
        lines += ["</details>", ""]
    return lines, verdicts
