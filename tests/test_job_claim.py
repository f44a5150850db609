"""A worker's claim of a job and the job's outcome, through the services (``job_claim``,
``job_run``, ``execution_finish``), on PostgreSQL and SQLite alike: a claim moves a queued job
once, with everything its run reads; an owner at their share waits; a job and its execution end
together or not at all, and never twice. (Claims racing each other on real PostgreSQL:
tests/test_concurrency.py.)"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from credits.models import CreditAccount
from executions.models import Execution, Job
from executions.services.enqueue import execution_enqueue
from executions.services.jobs import job_claim, job_run
from executions.services.runs import Outcome, execution_finish
from instances.models import ToolInstance

pytestmark = pytest.mark.django_db

COMPLETED, FAILED = Execution.Status.COMPLETED, Execution.Status.FAILED


def accepted_job(make_instance, user) -> Job:
    instance = make_instance("test-noop", owner=user)
    return execution_enqueue(instance=instance, inputs={"echo": "x"}).job


def running_job(make_instance, user, **report) -> Job:
    job = accepted_job(make_instance, user)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING, progress=40, current_step="half", **report)
    Execution.objects.filter(pk=job.execution_id).update(status=Execution.Status.RUNNING)
    return Job.objects.select_related("execution").get(pk=job.pk)


# --- the claim ----------------------------------------------------------------------------


def test_a_claimed_job_comes_with_everything_its_run_reads(make_instance, user, django_assert_num_queries):
    queued = accepted_job(make_instance, user)

    job = job_claim(job_id=str(queued.pk), worker_name="w")

    with django_assert_num_queries(0):
        assert job.execution.tool.slug == job.instance.tool.slug == "test-noop"
        assert job.owner.pk == user.pk and job.owner.credit_account.balance is not None
        assert (job.status, job.attempts, job.worker_name) == (Job.Status.RUNNING, 1, "w")
        assert job.execution.status == Execution.Status.RUNNING and job.execution.started_at is not None
    row = Job.objects.select_related("execution").get(pk=queued.pk)
    assert (row.status, row.attempts, row.worker_name) == (Job.Status.RUNNING, 1, "w")
    assert row.started_at == row.heartbeat_at == job.started_at
    assert (row.execution.status, row.execution.started_at) == (Execution.Status.RUNNING, job.started_at)


def test_a_job_without_an_instance_or_a_credit_account_is_claimed_with_them_known_absent(
    make_instance, user, django_assert_num_queries
):
    queued = accepted_job(make_instance, user)
    Job.objects.filter(pk=queued.pk).update(instance=None)
    CreditAccount.objects.filter(owner=user).delete()

    job = job_claim(job_id=str(queued.pk), worker_name="w")

    with django_assert_num_queries(0):
        assert job.instance is None
        assert getattr(job.owner, "credit_account", None) is None


def test_no_such_job_claims_nothing(db):
    assert job_claim(job_id="00000000-0000-0000-0000-000000000000", worker_name="w") is None


@pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements are PostgreSQL's")
def test_a_worker_plans_its_claim_once_per_connection_not_once_per_job(make_instance, user):
    """The claim's load joins six tables; PostgreSQL plans it once the connection has run it
    DATABASE_PREPARE_THRESHOLD times (settings.py), then runs that plan for every other job."""
    threshold = settings.DATABASES["default"]["OPTIONS"]["prepare_threshold"]
    if threshold is None:
        pytest.skip("DATABASE_PREPARE_THRESHOLD=0: this deployment prepares nothing")
    jobs = [accepted_job(make_instance, user) for _ in range(threshold + 1)]

    for job in jobs:
        job_run(job_id=str(job.pk), worker_name="w")

    assert {job.status for job in Job.objects.filter(pk__in=[job.pk for job in jobs])} == {Job.Status.COMPLETED}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql AND statement LIKE %s",
            ['SELECT %FROM "executions_job"%FOR NO KEY UPDATE OF "executions_job", "auth_user"'],
        )
        assert cursor.fetchone()[0] == 1


def test_a_duplicate_delivery_claims_nothing(make_instance, user):
    queued = accepted_job(make_instance, user)
    assert job_claim(job_id=str(queued.pk), worker_name="first") is not None

    assert job_claim(job_id=str(queued.pk), worker_name="second") is None

    row = Job.objects.get(pk=queued.pk)
    assert (row.status, row.attempts, row.worker_name) == (Job.Status.RUNNING, 1, "first")


def test_an_owner_at_their_share_waits_for_a_later_turn(make_instance, user, settings):
    settings.TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER = 1
    first, second = accepted_job(make_instance, user), accepted_job(make_instance, user)
    assert job_claim(job_id=str(first.pk), worker_name="w") is not None
    before = timezone.now()

    assert job_claim(job_id=str(second.pk), worker_name="w") is None

    waiting = Job.objects.select_related("execution").get(pk=second.pk)
    assert (waiting.status, waiting.attempts, waiting.started_at) == (Job.Status.QUEUED, 0, None)
    assert (waiting.execution.status, waiting.execution.started_at) == (Execution.Status.PENDING, None)
    assert waiting.run_after > before  # looked at again later, under a new RQ id
    assert waiting.rq_job_id.startswith(f"{second.pk}-wait-")


@pytest.mark.redis
def test_a_job_whose_owner_got_a_place_back_is_claimed_run_and_recorded(make_instance, user, settings):
    settings.TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER = 1
    first, second = accepted_job(make_instance, user), accepted_job(make_instance, user)
    Job.objects.filter(pk=second.pk).update(status=Job.Status.RUNNING)  # the owner's one place, taken

    job_run(job_id=str(first.pk), worker_name="w")
    assert Job.objects.get(pk=first.pk).status == Job.Status.QUEUED  # waits for a later turn

    Job.objects.filter(pk=second.pk).update(status=Job.Status.QUEUED)
    job_run(job_id=str(first.pk), worker_name="w")
    done = Job.objects.select_related("execution").get(pk=first.pk)
    assert (done.status, done.attempts, done.worker_name) == (Job.Status.COMPLETED, 1, "w")
    assert done.execution.status == COMPLETED and done.execution.started_at is not None
    assert done.execution.output_data == {"echo": "x"}


# --- the outcome --------------------------------------------------------------------------


def test_a_job_ends_with_its_report_its_log_and_no_inputs_left(make_instance, user):
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


def test_a_failed_job_keeps_what_it_is_not_given(make_instance, user):
    job = running_job(make_instance, user, step_index=2, attempt_log=[{"attempt": 1}])
    error = {"error_code": "WORKER_LOST", "error_message": "Lost."}

    assert execution_finish(
        execution=job.execution, outcome=Outcome(FAILED, error=error), duration_ms=2, account=None, job=job
    )

    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.progress, row.current_step, row.step_index) == (FAILED, 40, "half", 2)
    assert row.attempt_log == [{"attempt": 1}] and row.sealed_inputs  # kept, to retry it as a new run
    assert Execution.objects.get(pk=job.execution_id).error_code == "WORKER_LOST"


def test_a_job_not_in_the_state_expected_ends_neither_row(make_instance, user):
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


def test_a_job_whose_execution_already_ended_is_not_ended_alone(make_instance, user):
    job = running_job(make_instance, user)
    Execution.objects.filter(pk=job.execution_id).update(status=Execution.Status.CANCELLED)

    assert not execution_finish(
        execution=job.execution, outcome=Outcome(COMPLETED, output={}), duration_ms=0, account=None, job=job
    )

    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.finished_at, row.progress) == (Job.Status.RUNNING, None, 40)
    assert Execution.objects.get(pk=job.execution_id).status == Execution.Status.CANCELLED
    assert ToolInstance.objects.get(pk=job.instance_id).execution_count == 0  # nothing after it ran either
