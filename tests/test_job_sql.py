"""The job a worker loads to run (executions/job_sql.py): one statement, SQL written once per
process, and the same objects ``select_related`` would give, down to converted field values."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext

from executions.job_sql import job_load_locked
from executions.models import Job
from executions.services import execution_enqueue
from instances.models import CreditAccount

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db]

RELATED = ("execution__tool", "instance__tool", "owner__credit_account")


def fields(obj) -> dict:
    return {field.attname: getattr(obj, field.attname) for field in obj._meta.concrete_fields}


def accepted_job(make_instance, user) -> Job:
    instance = make_instance("test-noop", owner=user)
    return execution_enqueue(instance=instance, inputs={"echo": "x"}).job


def test_a_job_loads_in_one_statement_with_what_select_related_gives(make_instance, user, django_assert_num_queries):
    job_id = accepted_job(make_instance, user).pk
    expected = Job.objects.select_related(*RELATED).get(pk=job_id)

    with CaptureQueriesContext(connection) as captured:
        job = job_load_locked(job_id)
    with django_assert_num_queries(0):  # every relation the run uses is loaded
        loaded = [job, job.execution, job.execution.tool, job.instance, job.instance.tool, job.owner]
        account = job.owner.credit_account

    assert len(captured) == 1
    assert "FOR NO KEY UPDATE" in captured[0]["sql"]
    wanted = [expected, expected.execution, expected.execution.tool, expected.instance, expected.instance.tool]
    for got, want in zip(loaded, [*wanted, expected.owner], strict=True):
        assert fields(got) == fields(want), type(want).__name__  # JSON, decimals, times converted alike
        assert not got._state.adding and got._state.db == "default"
    assert fields(account) == fields(expected.owner.credit_account)


def test_a_job_without_an_instance_or_a_credit_account_loads_them_as_none(
    make_instance, user, django_assert_num_queries
):
    job = accepted_job(make_instance, user)
    Job.objects.filter(pk=job.pk).update(instance=None)
    CreditAccount.objects.filter(owner=user).delete()

    loaded = job_load_locked(job.pk)

    with django_assert_num_queries(0):  # known absent, as select_related would say
        assert loaded.instance is None
        assert getattr(loaded.owner, "credit_account", None) is None


def test_no_such_job_loads_as_none(db):
    assert job_load_locked("00000000-0000-0000-0000-000000000000") is None


def _try_lock_owner(owner_id: int) -> str:
    """From another connection: lock the owner's row without waiting."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM auth_user WHERE id = %s FOR NO KEY UPDATE NOWAIT", [owner_id])
        return "locked it"
    except OperationalError:
        return "refused"
    finally:
        connection.close()


@pytest.mark.django_db(transaction=True)
def test_the_owner_stays_locked_until_the_transaction_ends(make_instance, user):
    job = accepted_job(make_instance, user)
    with ThreadPoolExecutor(max_workers=1) as other:
        with transaction.atomic():
            job_load_locked(job.pk)
            assert other.submit(_try_lock_owner, user.pk).result() == "refused"
        assert other.submit(_try_lock_owner, user.pk).result() == "locked it"


@pytest.fixture(params=["written once", "through the ORM"])
def claim_form(request, monkeypatch):
    """Both forms of the load and the claim: the statements PostgreSQL runs, and the ORM's,
    which SQLite (the development default) runs."""
    from executions import job_sql

    if request.param == "through the ORM":
        monkeypatch.setattr(job_sql, "_written_once", lambda alias: False)
    return request.param


@pytest.mark.django_db(transaction=True)
def test_either_form_claims_runs_and_records_a_job(claim_form, make_instance, user, settings):
    from executions.services import job_run

    first, second = accepted_job(make_instance, user), accepted_job(make_instance, user)
    settings.TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER = 1
    Job.objects.filter(pk=second.pk).update(status=Job.Status.RUNNING)  # the owner's one place, taken

    job_run(job_id=str(first.pk), worker_name="w")
    assert Job.objects.get(pk=first.pk).status == Job.Status.QUEUED  # waits for a later turn

    Job.objects.filter(pk=second.pk).update(status=Job.Status.QUEUED)
    job_run(job_id=str(first.pk), worker_name="w")
    done = Job.objects.select_related("execution").get(pk=first.pk)
    assert (done.status, done.attempts, done.worker_name) == (Job.Status.COMPLETED, 1, "w")
    assert done.execution.status == "COMPLETED" and done.execution.started_at is not None
    assert done.execution.output_data == {"echo": "x"}
