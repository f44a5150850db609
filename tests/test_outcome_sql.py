"""A run's outcome (executions/outcome_sql.py): one statement whose SQL is written once per
process, or the ORM's writes in a transaction (SQLite, and job fields the statement does not
know). Both forms run here against PostgreSQL, through ``execution_finish``, and must write
the same rows: all of them, or none when the execution or the job had already ended."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from executions import outcome_sql
from executions.models import CreditLedgerEntry, Execution, Job, Mode
from executions.services import Outcome, execution_enqueue, execution_finish, execution_record_start
from instances.models import CreditAccount, ToolInstance

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db]

COMPLETED, FAILED = Execution.Status.COMPLETED, Execution.Status.FAILED


@pytest.fixture(params=["one statement", "through the ORM"])
def form(request, monkeypatch):
    if request.param == "through the ORM":
        monkeypatch.setattr(outcome_sql, "_written_once", lambda alias: False)
    return request.param


def account_of(user, balance: str = "5", unlimited: bool = False) -> CreditAccount:
    account, _ = CreditAccount.objects.update_or_create(
        owner=user, defaults={"balance": Decimal(balance), "is_unlimited": unlimited}
    )
    return account


def sync_run(make_instance, user, tool: str = "test-priced") -> tuple[Execution, CreditAccount]:
    """A sync run recorded as started: its minimum price held (0.01 for test-priced)."""
    account = account_of(user)
    instance = make_instance(tool, owner=user)
    execution = execution_record_start(instance=instance, inputs={}, mode=Mode.SYNC, account=account)
    return execution, account


def stats(execution: Execution) -> tuple:
    instance = ToolInstance.objects.get(pk=execution.instance_id)
    return (
        instance.execution_count,
        instance.success_count,
        instance.failure_count,
        instance.credits_consumed,
        instance.total_duration_ms,
    )


def balance(account: CreditAccount) -> Decimal:
    return CreditAccount.objects.get(pk=account.pk).balance


def test_a_charge_beyond_the_hold_settles_the_rest_and_is_entered_in_the_ledger(form, make_instance, user):
    execution, account = sync_run(make_instance, user)
    assert balance(account) == Decimal("4.99")  # 0.01 held

    outcome = Outcome(COMPLETED, output={"ok": True}, credits=Decimal("1.51"))
    assert execution_finish(execution=execution, outcome=outcome, duration_ms=7, account=account)

    row = Execution.objects.get(pk=execution.pk)
    assert (row.status, row.output_data, row.credits_consumed, row.duration_ms) == (
        COMPLETED,
        {"ok": True},
        Decimal("1.51"),
        7,
    )
    assert row.finished_at is not None and (row.error_code, row.error_message, row.error_metadata) == ("", "", {})
    assert balance(account) == Decimal("3.49")
    assert stats(execution) == (1, 1, 0, Decimal("1.51"), 7)
    entry = CreditLedgerEntry.objects.get(execution=execution)
    assert (entry.account_id, entry.kind, entry.amount) == (
        account.pk,
        CreditLedgerEntry.Kind.EXECUTION,
        Decimal("-1.51"),
    )
    assert entry.created_at is not None and entry.reason == "" and entry.created_by_id is None


def test_a_failed_run_gives_the_hold_back_and_enters_nothing(form, make_instance, user):
    execution, account = sync_run(make_instance, user)
    error = {"error_code": "TOOL_ERROR", "error_message": "It broke.", "metadata": {"tool": "Test Priced"}}

    assert execution_finish(execution=execution, outcome=Outcome(FAILED, error=error), duration_ms=3, account=account)

    row = Execution.objects.get(pk=execution.pk)
    assert (row.status, row.output_data, row.error_code, row.error_message) == (FAILED, None, "TOOL_ERROR", "It broke.")
    assert row.error_metadata == {"tool": "Test Priced"} and row.credits_consumed == 0
    assert balance(account) == Decimal("5")
    assert stats(execution) == (1, 0, 1, Decimal("0"), 3)
    assert not CreditLedgerEntry.objects.filter(execution=execution).exists()


def test_an_unlimited_account_is_charged_nothing_but_the_charge_is_entered(form, make_instance, user):
    execution, account = sync_run(make_instance, user)
    CreditAccount.objects.filter(pk=account.pk).update(is_unlimited=True, balance=Decimal("2"))
    account.refresh_from_db()

    outcome = Outcome(COMPLETED, output={}, credits=Decimal("0.51"))
    assert execution_finish(execution=execution, outcome=outcome, duration_ms=1, account=account)

    assert balance(account) == Decimal("2")
    assert CreditLedgerEntry.objects.get(execution=execution).amount == Decimal("-0.51")


def test_a_run_whose_instance_is_gone_still_ends(form, make_instance, user):
    execution, account = sync_run(make_instance, user, tool="test-noop")
    ToolInstance.objects.filter(pk=execution.instance_id).delete()
    execution.refresh_from_db()
    assert execution.instance_id is None

    assert execution_finish(execution=execution, outcome=Outcome(COMPLETED, output={}), duration_ms=1, account=account)
    assert Execution.objects.get(pk=execution.pk).status == COMPLETED


def test_an_ended_run_is_never_written_again(form, make_instance, user):
    execution, account = sync_run(make_instance, user)
    first = Outcome(COMPLETED, output={"ok": True}, credits=Decimal("1"))
    assert execution_finish(execution=execution, outcome=first, duration_ms=5, account=account)
    before = (balance(account), stats(execution), CreditLedgerEntry.objects.count())

    late = Outcome(FAILED, error={"error_code": "TIMEOUT", "error_message": "Too late."}, credits=Decimal("0"))
    assert not execution_finish(execution=execution, outcome=late, duration_ms=9, account=account)

    assert Execution.objects.get(pk=execution.pk).status == COMPLETED
    assert (balance(account), stats(execution), CreditLedgerEntry.objects.count()) == before


def running_job(make_instance, user, **report) -> Job:
    instance = make_instance("test-noop", owner=user)
    job = execution_enqueue(instance=instance, inputs={"echo": "x"}).job
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING, progress=40, current_step="half", **report)
    Execution.objects.filter(pk=job.execution_id).update(status=Execution.Status.RUNNING)
    return Job.objects.select_related("execution").get(pk=job.pk)


def test_a_job_ends_with_its_report_its_log_and_no_inputs_left(form, make_instance, user):
    job = running_job(make_instance, user)
    report = {"progress": 90, "current_step": "last", "step_index": None, "steps_total": 3}
    log = [{"attempt": 1, "error_code": ""}]

    assert execution_finish(
        execution=job.execution,
        outcome=Outcome(COMPLETED, output={"echo": "x"}),
        duration_ms=4,
        account=None,
        job=job,
        job_fields={**report, "attempt_log": log},
    )

    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.progress, row.current_step, row.step_index, row.steps_total) == (
        COMPLETED,
        100,
        "last",
        None,
        3,
    )
    assert (row.attempt_log, row.sealed_inputs) == (log, "")
    assert row.finished_at is not None and row.updated_at == row.finished_at
    assert Execution.objects.get(pk=job.execution_id).status == COMPLETED
    assert (job.status, job.progress, job.execution.status) == (COMPLETED, 100, COMPLETED)  # the objects, as written


def test_a_failed_job_keeps_what_it_is_not_given(form, make_instance, user):
    job = running_job(make_instance, user, step_index=2, attempt_log=[{"attempt": 1}])
    error = {"error_code": "WORKER_LOST", "error_message": "Lost."}

    assert execution_finish(
        execution=job.execution, outcome=Outcome(FAILED, error=error), duration_ms=2, account=None, job=job
    )

    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.progress, row.current_step, row.step_index) == (FAILED, 40, "half", 2)
    assert row.attempt_log == [{"attempt": 1}] and row.sealed_inputs  # kept, to retry it as a new run
    assert Execution.objects.get(pk=job.execution_id).error_code == "WORKER_LOST"


def test_a_job_not_in_the_state_expected_ends_neither_row(form, make_instance, user):
    job = running_job(make_instance, user)

    ended = execution_finish(
        execution=job.execution,
        outcome=Outcome(FAILED, error={}),
        duration_ms=0,
        account=None,
        job=job,
        job_from=(Job.Status.QUEUED,),
    )

    assert not ended
    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING
    assert Execution.objects.get(pk=job.execution_id).status == Execution.Status.RUNNING


def test_a_job_whose_execution_already_ended_is_not_ended_alone(form, make_instance, user):
    job = running_job(make_instance, user)
    Execution.objects.filter(pk=job.execution_id).update(status=Execution.Status.CANCELLED)

    assert not execution_finish(
        execution=job.execution, outcome=Outcome(COMPLETED, output={}), duration_ms=0, account=None, job=job
    )
    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING


def test_a_job_field_the_written_statement_does_not_know_is_written_by_the_orm(make_instance, user):
    job = running_job(make_instance, user)

    with CaptureQueriesContext(connection) as captured:
        execution_finish(
            execution=job.execution, outcome=Outcome(FAILED, error={}), duration_ms=0, account=None, job=job,
            job_fields={"worker_name": "replaced"},
        )  # fmt: skip

    assert Job.objects.get(pk=job.pk).worker_name == "replaced"
    assert '"worker_name"' in captured[-1]["sql"]  # the ORM's statement, which knows every field


def test_on_postgresql_the_outcome_is_one_statement_written_once(make_instance, user):
    execution, account = sync_run(make_instance, user)
    outcome_sql._statement.cache_clear()

    with CaptureQueriesContext(connection) as captured:
        execution_finish(
            execution=execution,
            outcome=Outcome(COMPLETED, output={}, credits=Decimal("2")),
            duration_ms=1,
            account=account,
        )

    assert len(captured) == 1 and "EXECUTE toolexec_" in captured[0]["sql"]  # planned once per session
    assert outcome_sql._statement.cache_info().currsize == 1
    other, account = sync_run(make_instance, user)
    execution_finish(execution=other, outcome=Outcome(COMPLETED, output={}), duration_ms=1, account=account)
    assert outcome_sql._statement.cache_info().hits >= 1  # the same statement, not written again
