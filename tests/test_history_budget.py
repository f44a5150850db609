"""The history paths that benchmark 6 (1,000,000 executions) tightened, pinned by their SQL: a
page of the executions API is two queries at any depth and renders each execution as its
detail does; the admin's Execution changelist neither counts nor reads the dates of the whole
table; a status history page is an index range from its cursor; the status overview reads only
the last 24 hours."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.admin_site import EstimatedCountPaginator
from executions.models import Execution, Job, Mode
from executions.page_selectors import cursor_of
from instances.models import ToolInstance
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

# Token (with its user), then the page: nothing counts, nothing offsets.
API_PAGE_QUERIES = 2
# Session, user, the tool and owner filters' choices, the estimate, the page.
CHANGELIST_QUERIES = 6
# Session, user, the tools of the filter form, the page.
HISTORY_PAGE_QUERIES = 4

COUNT = re.compile(r"\bCOUNT\(", re.IGNORECASE)


def _queries_of(call: Callable[[], object]) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        call()
    return [query["sql"] for query in captured.captured_queries]


def _text(response) -> str:
    """The page's words, without its markup."""
    return " ".join(re.sub(r"<[^>]+>", " ", response.content.decode()).split())


def _executions(instance: ToolInstance, count: int, *, at=None, **fields) -> list[Execution]:
    """``count`` recorded runs of ``instance``, a minute apart and newest now (or all at ``at``)."""
    now = timezone.now()
    rows = [
        Execution(
            **{
                "instance": instance,
                "tool": instance.tool,
                "owner": instance.owner,
                "mode": Mode.SYNC,
                "status": Execution.Status.COMPLETED,
                "input_data": {"expression": "a", "n": n},
                "output_data": {"result": n},
                "credits_consumed": Decimal("0.0100"),
                "duration_ms": 10 + n,
                "started_at": now,
                "finished_at": now,
                "created_at": at or now - timedelta(minutes=n),
                **fields,
            }
        )
        for n in range(count)
    ]
    return Execution.objects.bulk_create(rows)


def _walk(api, params: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """Every id the list gives, following ``next`` links, and the SQL of each page."""
    ids: list[str] = []
    pages: list[list[str]] = []
    url, query = "/api/v1/executions/", dict(params or {})
    while url:
        body: dict = {}
        pages.append(_queries_of(lambda url=url, query=query, body=body: body.update(api.get(url, query).json())))
        ids += [row["id"] for row in body["results"]]
        url, query = body["next"], {}
    return ids, pages


# --- The executions API --------------------------------------------------------------------


def test_a_page_of_history_is_two_queries_at_any_depth(api, user, make_instance):
    instance = make_instance("json-transform", owner=user)
    _executions(instance, 25)

    ids, pages = _walk(api, {"page_size": 10})

    assert len(ids) == len(set(ids)) == 25
    assert [len(page) for page in pages] == [API_PAGE_QUERIES] * 3, pages
    for page in pages:
        listing = page[-1]
        assert f'"executions_execution"."owner_id" = {user.pk}' in listing
        assert "LIMIT 11" in listing and "OFFSET" not in listing, listing
        assert not any(COUNT.search(sql) for sql in page), page


def test_the_list_renders_each_execution_as_its_detail_does(api, user, make_instance):
    instance = make_instance("json-transform", owner=user)
    gone = make_instance("test-noop", owner=user)
    _executions(instance, 1)
    _executions(
        instance,
        1,
        status=Execution.Status.FAILED,
        output_data=None,
        error_code="UPSTREAM_ERROR",
        error_message="Example API answered 503",
        error_metadata={"action_items": [{"action": "retry", "message": "Try again"}], "can_retry": True},
        credits_consumed=Decimal("1.2345"),
    )
    running = _executions(instance, 1, mode=Mode.ASYNC, status=Execution.Status.RUNNING, duration_ms=None)[0]
    Job.objects.create(execution=running, instance=instance, owner=user, status=Job.Status.RUNNING)
    _executions(gone, 1, cache_hit=True, finished_at=None)
    ToolInstance.objects.filter(pk=gone.pk).delete()  # its runs stay, with no instance

    listed = api.get("/api/v1/executions/").json()["results"]

    assert len(listed) == 4
    assert any(row["instance_id"] is None for row in listed)
    for row in listed:
        assert row == api.get(f"/api/v1/executions/{row['id']}/").json()


def test_runs_recorded_in_the_same_microsecond_are_each_listed_once_across_pages(api, user, make_instance):
    instance = make_instance("json-transform", owner=user)
    moment = timezone.now() - timedelta(hours=1)
    _executions(instance, 5)
    _executions(instance, 7, at=moment)  # a tie across the page boundary
    _executions(instance, 5, at=moment - timedelta(hours=1))

    ids, _ = _walk(api, {"page_size": 4})

    assert len(ids) == len(set(ids)) == 17


def test_the_list_shows_only_your_runs_and_filters_them(api, user, make_instance):
    mine = make_instance("json-transform", owner=user)
    theirs = make_instance("json-transform", owner=UserFactory())
    _executions(mine, 3)
    failed = _executions(mine, 2, status=Execution.Status.FAILED)
    _executions(theirs, 4)

    everything, _ = _walk(api)
    failures, pages = _walk(api, {"status": "failed"})

    assert len(everything) == 5
    assert sorted(failures) == sorted(str(e.pk) for e in failed)
    assert len(pages[0]) == API_PAGE_QUERIES


# --- The admin's Execution changelist ------------------------------------------------------


@pytest.fixture
def big_table(monkeypatch, make_instance):
    """Executions that PostgreSQL has analysed, and a paginator that calls 20 rows a big table."""
    owner = UserFactory()
    _executions(make_instance("json-transform", owner=owner), 30)
    _executions(make_instance("test-noop", owner=owner), 12, status=Execution.Status.FAILED)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE executions_execution")
    monkeypatch.setattr(EstimatedCountPaginator, "exact_below", 20)


@pytest.mark.redis
def test_the_changelist_of_a_big_table_estimates_its_count_instead_of_counting_it(admin_client, big_table):
    response = None

    def view() -> None:
        nonlocal response
        response = admin_client.get("/admin/executions/execution/")

    queries = _queries_of(view)

    assert response.status_code == 200
    assert "about 42 executions" in _text(response)
    assert len(queries) == CHANGELIST_QUERIES, queries
    assert not [sql for sql in queries if COUNT.search(sql)], queries
    assert not [sql for sql in queries if "DISTINCT" in sql or "DATE_TRUNC" in sql], queries


@pytest.mark.redis
def test_a_filtered_changelist_is_counted_exactly(admin_client, big_table):
    response = None

    def view() -> None:
        nonlocal response
        response = admin_client.get("/admin/executions/execution/", {"status__exact": "FAILED"})

    queries = _queries_of(view)

    assert response.status_code == 200
    assert "12 executions" in _text(response) and "about 12" not in _text(response)
    counts = [sql for sql in queries if COUNT.search(sql)]
    assert len(counts) == 1 and "WHERE" in counts[0], counts


@pytest.mark.redis
def test_the_changelist_filters_by_date_without_reading_every_date(admin_client, make_instance):
    instance = make_instance("json-transform", owner=UserFactory())
    recent = _executions(instance, 2)
    _executions(instance, 3, at=timezone.now() - timedelta(days=40))
    everything = admin_client.get("/admin/executions/execution/").content.decode()
    link = re.search(r'<a href="(\?[^"]*created_at__gte[^"]*)"[^>]*>Past 7 days</a>', everything)
    assert link, "the date filter offers the past 7 days"

    response = None

    def view() -> None:
        nonlocal response
        response = admin_client.get("/admin/executions/execution/" + html.unescape(link[1]))

    queries = _queries_of(view)

    assert response.status_code == 200
    assert all(str(e.pk)[:8] in _text(response) for e in recent)
    assert "2 executions" in _text(response)
    assert not [sql for sql in queries if "DISTINCT" in sql or "DATE_TRUNC" in sql], queries


@pytest.mark.redis
def test_changelist_rows_leave_the_runs_documents_and_unshown_joins_out(admin_client, big_table):
    queries = _queries_of(lambda: admin_client.get("/admin/executions/execution/"))

    listing = next(sql for sql in queries if sql.startswith('SELECT "executions_execution"."id"'))
    for column in ("input_data", "output_data", "error_metadata", "error_message"):
        assert f'"executions_execution"."{column}"' not in listing
    assert "executions_job" not in listing and "instances_toolinstance" not in listing


# --- The status pages ----------------------------------------------------------------------


def test_a_history_page_bounds_the_index_range_by_its_cursor(client, user, make_instance):
    runs = _executions(make_instance("json-transform", owner=user), 30)
    client.force_login(user)
    middle = cursor_of(runs[12])

    pages = {}
    for direction, bound in (("before", "<="), ("after", ">=")):
        pages[direction] = _queries_of(lambda d=direction: client.get("/status/executions/", {d: middle}))
        listing = next(sql for sql in pages[direction] if sql.startswith('SELECT "executions_execution"."id"'))
        assert f'"executions_execution"."created_at" {bound} ' in listing, listing
        assert not any(COUNT.search(sql) or "OFFSET" in sql for sql in pages[direction])
    assert len(pages["before"]) == len(pages["after"]) == HISTORY_PAGE_QUERIES


@pytest.mark.parametrize("staff", [False, True], ids=["owner", "staff"])
def test_the_overview_aggregates_read_only_the_last_day(client, make_instance, staff, settings):
    settings.RQ_QUEUES = {"default": {"URL": "redis://127.0.0.1:1/0", "DEFAULT_TIMEOUT": 600}}
    viewer = UserFactory(is_staff=staff)
    instance = make_instance("json-transform", owner=viewer)
    _executions(instance, 3)
    _executions(instance, 3, at=timezone.now() - timedelta(days=30))
    client.force_login(viewer)

    queries = _queries_of(lambda: client.get("/status/"))

    aggregates = [sql for sql in queries if 'FROM "executions_execution"' in sql and COUNT.search(sql)]
    assert len(aggregates) == 3, aggregates  # the summary, the tool table, the hourly chart
    for sql in aggregates:
        assert '"executions_execution"."created_at" >=' in sql, sql
