"""The job a worker claims and loads to run (executions/job_sql.py): one round trip, SQL written
once per process, and the same objects ``select_related`` would give, down to converted field
values."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from executions.job_sql import job_load_and_claim
from executions.models import Job
from executions.services import execution_enqueue, job_session_prepare
from instances.models import CreditAccount

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db]

RELATED = ("execution__tool", "instance__tool", "owner__credit_account")


def fields(obj) -> dict:
    return {field.attname: getattr(obj, field.attname) for field in obj._meta.concrete_fields}


def accepted_job(make_instance, user) -> Job:
    instance = make_instance("test-noop", owner=user)
    return execution_enqueue(instance=instance, inputs={"echo": "x"}).job


def load_and_claim(job_id, share: int = 4):
    return job_load_and_claim(job_id, worker_name="w", share=share, now=timezone.now())


def test_a_job_is_claimed_and_loaded_in_one_round_trip_with_what_select_related_gives(
    make_instance, user, django_assert_num_queries
):
    job_id = accepted_job(make_instance, user).pk
    expected = Job.objects.select_related(*RELATED).get(pk=job_id)

    job_session_prepare()  # as a worker does before it forks: the session plans the statements
    with CaptureQueriesContext(connection) as captured:
        job, claimed = load_and_claim(job_id)
    with django_assert_num_queries(0):  # every relation the run uses is loaded
        loaded = [job, job.execution, job.execution.tool, job.instance, job.instance.tool, job.owner]
        account = job.owner.credit_account

    assert claimed and len(captured) == 1 and captured[0]["sql"].count("EXECUTE") == 2  # the lock, the claim
    assert Job.objects.get(pk=job_id).status == Job.Status.RUNNING
    # The job comes back as it was before the claim; job_claim moves the objects on.
    wanted = [expected, expected.execution, expected.execution.tool, expected.instance, expected.instance.tool]
    for got, want in zip(loaded, [*wanted, expected.owner], strict=True):
        assert fields(got) == fields(want), type(want).__name__  # JSON, decimals, times converted alike
        assert not got._state.adding and got._state.db == "default"
    assert fields(account) == fields(expected.owner.credit_account)
    assert job.instance.tool is job.execution.tool  # one row, loaded once


def test_a_job_without_an_instance_or_a_credit_account_loads_them_as_none(
    make_instance, user, django_assert_num_queries
):
    job = accepted_job(make_instance, user)
    Job.objects.filter(pk=job.pk).update(instance=None)
    CreditAccount.objects.filter(owner=user).delete()

    loaded, claimed = load_and_claim(job.pk)

    assert claimed
    with django_assert_num_queries(0):  # known absent, as select_related would say
        assert loaded.instance is None
        assert getattr(loaded.owner, "credit_account", None) is None


def test_no_such_job_loads_as_none_and_claims_nothing(db):
    assert load_and_claim("00000000-0000-0000-0000-000000000000") == (None, False)


def test_a_job_not_queued_loads_and_is_not_claimed_again(make_instance, user):
    job = accepted_job(make_instance, user)
    assert load_and_claim(job.pk)[1]

    again, claimed = load_and_claim(job.pk)

    assert again.status == Job.Status.RUNNING and not claimed
    assert Job.objects.get(pk=job.pk).attempts == 1


def test_an_owner_at_their_share_gets_the_job_loaded_and_not_claimed(make_instance, user):
    first, second = accepted_job(make_instance, user), accepted_job(make_instance, user)
    assert load_and_claim(first.pk, share=1)[1]

    loaded, claimed = load_and_claim(second.pk, share=1)

    assert loaded.pk == second.pk and loaded.status == Job.Status.QUEUED and not claimed
    assert Job.objects.get(pk=second.pk).status == Job.Status.QUEUED
    assert Job.objects.get(pk=second.pk).execution.status == "PENDING"


def _claim_from_another_connection(job_id) -> tuple[str, bool]:
    try:
        job, claimed = load_and_claim(job_id, share=1)
        return job.status, claimed
    finally:
        connection.close()


def _waiting_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return cursor.fetchone()[0] > 0


@pytest.mark.django_db(transaction=True)
def test_a_claim_waits_for_the_owners_lock_and_counts_the_claim_made_under_it(make_instance, user):
    """Another worker holds the owner's lock and has claimed the owner's one place, not yet
    committed: the claim waits for it, then counts it (its snapshot is taken after the lock)."""
    first, second = accepted_job(make_instance, user), accepted_job(make_instance, user)
    with ThreadPoolExecutor(max_workers=1) as other:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM auth_user WHERE id = %s FOR NO KEY UPDATE", [user.pk])
            Job.objects.filter(pk=first.pk).update(status=Job.Status.RUNNING)
            pending = other.submit(_claim_from_another_connection, second.pk)
            deadline = time.monotonic() + 10
            while not _waiting_on_a_lock():
                assert time.monotonic() < deadline and not pending.done(), "the claim did not wait for the lock"
                time.sleep(0.01)
        assert pending.result(timeout=10) == (Job.Status.QUEUED, False)
    assert Job.objects.get(pk=second.pk).status == Job.Status.QUEUED


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
