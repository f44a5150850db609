"""Many requests at once on one instance: counters, balances and the ledger stay exact, and
status transitions never leave an instance somewhere a transition could not have put it.

Real threads against real PostgreSQL: each thread has its own connection (closed when the
thread ends) and a barrier releases them together so the requests really overlap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Sum
from rest_framework.test import APIClient

from core.models import ApiToken
from credits.models import CreditAccount, CreditLedgerEntry
from executions.models import Execution
from instances.models import ToolInstance
from tools import registry
from tools.models import ToolDefinition
from tools.sdk import Tool
from tools.services import catalog_sync

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

THREADS = 50


def run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` in ``count`` threads released at the same moment; return the results.

    Each thread opens its database connection before the barrier (so connecting does not
    serialise the start) and closes it at the end.
    """
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            connection.ensure_connection()
            barrier.wait(timeout=60)
            results[index] = work(index)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)
            barrier.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,), name=f"concurrency-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "some requests never finished"
    if errors:
        raise errors[0]
    return results


def _client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


@pytest.fixture
def token_key(user) -> str:
    _, key = ApiToken.issue(user=user)
    return key


def _execute(key: str, instance: ToolInstance, inputs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = _client(key).post(f"/api/v1/instances/{instance.pk}/execute-sync", inputs, format="json")
    return response.status_code, response.json()


def _assert_books_balance(*, instance: ToolInstance, owner, expected_credits: Decimal, runs: int) -> None:
    instance.refresh_from_db()
    executions = Execution.objects.filter(instance=instance)
    assert executions.count() == runs
    assert executions.filter(status=Execution.Status.COMPLETED).count() == runs
    recorded_duration = executions.aggregate(total=Sum("duration_ms"))["total"]
    recorded_credits = executions.aggregate(total=Sum("credits_consumed"))["total"]

    assert instance.execution_count == runs
    assert instance.success_count == runs
    assert instance.failure_count == 0
    assert instance.credits_consumed == expected_credits
    assert recorded_credits == expected_credits
    assert instance.total_duration_ms == recorded_duration
    assert instance.last_executed_at is not None

    account = CreditAccount.objects.get(owner=owner)
    assert account.balance == settings.TOOLEXEC_DEFAULT_CREDITS - expected_credits

    ledger = CreditLedgerEntry.objects.filter(account=account)
    assert ledger.count() == runs
    assert ledger.filter(kind=CreditLedgerEntry.Kind.EXECUTION).count() == runs
    assert ledger.aggregate(total=Sum("amount"))["total"] == -expected_credits
    # One entry per execution, never two for the same run.
    assert set(ledger.values_list("execution", flat=True)) == set(executions.values_list("id", flat=True))


def test_fifty_concurrent_runs_of_a_priced_tool_keep_counters_balance_and_ledger_exact(user, token_key, make_instance):
    instance = make_instance("json-transform", owner=user)

    results = run_together(THREADS, lambda i: _execute(token_key, instance, {"expression": "n", "data": {"n": i}}))

    assert all(status == 200 for status, _ in results), [body for status, body in results if status != 200][:3]
    assert sorted(body["data"]["result"] for _, body in results) == list(range(THREADS))
    assert len({body["execution_id"] for _, body in results}) == THREADS
    assert sum(body["duration_ms"] for _, body in results) == sum(
        Execution.objects.filter(instance=instance).values_list("duration_ms", flat=True)
    )
    _assert_books_balance(instance=instance, owner=user, expected_credits=Decimal("0.01") * THREADS, runs=THREADS)


def test_fifty_concurrent_runs_priced_by_usage_charge_each_run_its_own_units(user, make_instance):
    """Each thread has its own token; units differ per run, so a lost or doubled charge shows."""
    instance = make_instance("test-priced", owner=user)
    keys = [ApiToken.issue(user=user)[1] for _ in range(THREADS)]

    def units(i: int) -> Decimal:
        return Decimal(i % 5) / 4  # 0, 0.25, 0.5, 0.75, 1

    results = run_together(THREADS, lambda i: _execute(keys[i], instance, {"units": float(units(i))}))

    expected = sum((Decimal("0.01") + Decimal("0.5") * units(i) for i in range(THREADS)), Decimal("0"))
    assert all(status == 200 for status, _ in results), [body for status, body in results if status != 200][:3]
    assert sum(Decimal(str(body["credits_consumed"])) for _, body in results) == expected
    _assert_books_balance(instance=instance, owner=user, expected_credits=expected, runs=THREADS)


def test_concurrent_runs_never_overdraw_the_credit_account(user, token_key, make_instance):
    """With credits for one run, 50 simultaneous runs charge one; the rest answer 402."""
    instance = make_instance("json-transform", owner=user)
    CreditAccount.objects.filter(owner=user).update(balance=Decimal("0.01"))

    results = run_together(THREADS, lambda i: _execute(token_key, instance, {"expression": "n", "data": {"n": i}}))

    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 402}
    assert all(body["error_code"] == "INSUFFICIENT_CREDITS" for status, body in results if status == 402)
    account = CreditAccount.objects.get(owner=user)
    assert account.balance >= 0
    assert statuses.count(200) == 1
    assert account.balance == 0


def test_concurrent_activate_and_disable_only_make_allowed_moves(user, token_key, make_instance):
    """Every successful move is a conditional update from the status it started at, so the
    moves that succeed alternate ACTIVE → DISABLED → ACTIVE …; the others are refused."""
    instance = make_instance("test-noop", owner=user)
    assert instance.status == ToolInstance.Status.ACTIVE

    def move(i: int) -> tuple[str, int, dict[str, Any]]:
        verb = "disable" if i % 2 == 0 else "activate"
        response = _client(token_key).post(f"/api/v1/instances/{instance.pk}/{verb}")
        return verb, response.status_code, response.json()

    results = run_together(THREADS, move)

    assert {status for _, status, _ in results} <= {200, 409}
    refused = [body for _, status, body in results if status == 409]
    assert all(body["error_code"] == "INVALID_TRANSITION" and body["error_message"] for body in refused)
    disabled = sum(1 for verb, status, _ in results if verb == "disable" and status == 200)
    activated = sum(1 for verb, status, _ in results if verb == "activate" and status == 200)
    assert disabled >= 1
    assert disabled - activated in (0, 1)
    for verb, status, body in results:
        if status == 200:
            assert body["status"] == ("DISABLED" if verb == "disable" else "ACTIVE")

    instance.refresh_from_db()
    expected = ToolInstance.Status.DISABLED if disabled > activated else ToolInstance.Status.ACTIVE
    assert instance.status == expected


def test_concurrent_disables_move_the_instance_exactly_once(user, token_key, make_instance):
    instance = make_instance("test-noop", owner=user)

    results = run_together(
        THREADS, lambda i: _client(token_key).post(f"/api/v1/instances/{instance.pk}/disable").status_code
    )

    assert results.count(200) == 1
    assert results.count(409) == THREADS - 1
    instance.refresh_from_db()
    assert instance.status == ToolInstance.Status.DISABLED


class _FreshlyInstalledTool(Tool):
    slug = "test-freshly-installed"
    name = "Test Freshly Installed"


def test_concurrent_catalog_syncs_all_succeed_and_create_one_definition(db):
    registry.register(_FreshlyInstalledTool)
    try:
        results = run_together(10, lambda i: _sync_or_error())
    finally:
        registry.unregister(_FreshlyInstalledTool.slug)

    assert [r for r in results if isinstance(r, Exception)] == []
    assert ToolDefinition.objects.filter(slug=_FreshlyInstalledTool.slug).count() == 1
    assert sum(_FreshlyInstalledTool.slug in report.created for report in results) == 1


def _sync_or_error():
    try:
        return catalog_sync()
    except DatabaseError as exc:
        return exc


class _OverlapProbeTool(Tool):
    """Counts how many of its runs overlap in this process, holding each run for a moment."""

    slug = "test-overlap-probe"
    name = "Test Overlap Probe"
    input_schema = {"type": "object"}
    modes = frozenset({"async"})
    lock = threading.Lock()
    running = most = 0

    def run(self, inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
        cls = type(self)
        with cls.lock:
            cls.running += 1
            cls.most = max(cls.most, cls.running)
        time.sleep(0.3)
        with cls.lock:
            cls.running -= 1
        return {}


@pytest.mark.redis
def test_workers_claiming_one_owners_jobs_at_once_run_exactly_their_share(user, make_instance, settings):
    """Claims of one owner's jobs take their turns (a lock on the owner, then the count and the
    claim: executions.services.job_claim), so exactly the share runs and the rest wait."""
    from executions.models import Job
    from executions.services.enqueue import execution_enqueue
    from executions.services.jobs import job_run

    settings.TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER = 2
    registry.register(_OverlapProbeTool)
    try:
        catalog_sync()
        instance = make_instance(_OverlapProbeTool.slug, owner=user)
        ids = [str(execution_enqueue(instance=instance, inputs={}).job.pk) for _ in range(12)]
        run_together(len(ids), lambda i: job_run(job_id=ids[i], worker_name=f"worker-{i}"))
    finally:
        registry.unregister(_OverlapProbeTool.slug)

    assert _OverlapProbeTool.most == 2
    jobs = Job.objects.filter(pk__in=ids)
    assert not jobs.filter(status=Job.Status.RUNNING).exists()
    done, waiting = jobs.filter(status=Job.Status.COMPLETED), jobs.filter(status=Job.Status.QUEUED)
    assert done.count() + waiting.count() == len(ids)
    # A job that got no place waits for a later turn as it was queued.
    assert {(job.attempts, job.execution.status, job.execution.started_at) for job in waiting} == {(0, "PENDING", None)}
    assert {job.attempts for job in done} == {1}
    assert done.count() >= 2


def _waiting_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return cursor.fetchone()[0] > 0


@pytest.mark.redis
def test_a_claim_waits_for_the_owners_lock_and_counts_the_claim_made_under_it(user, make_instance, settings):
    """Another worker holds the owner's lock and has taken the owner's one place, not yet
    committed: a claim waits for that claim to commit, then counts it, and the job waits."""
    from concurrent.futures import ThreadPoolExecutor

    from django.contrib.auth import get_user_model
    from django.db import transaction

    from executions.models import Job
    from executions.services.enqueue import execution_enqueue
    from executions.services.jobs import job_claim

    settings.TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER = 1
    instance = make_instance("test-noop", owner=user)
    first, second = (execution_enqueue(instance=instance, inputs={}).job for _ in range(2))

    def claim_elsewhere() -> Job | None:
        try:
            return job_claim(job_id=str(second.pk), worker_name="other")
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1) as other:
        with transaction.atomic():
            get_user_model().objects.select_for_update(no_key=True).get(pk=user.pk)
            Job.objects.filter(pk=first.pk).update(status=Job.Status.RUNNING)
            pending = other.submit(claim_elsewhere)
            deadline = time.monotonic() + 10
            while not _waiting_on_a_lock():
                assert time.monotonic() < deadline and not pending.done(), "the claim did not wait for the lock"
                time.sleep(0.01)
        assert pending.result(timeout=10) is None
    assert Job.objects.get(pk=second.pk).status == Job.Status.QUEUED
