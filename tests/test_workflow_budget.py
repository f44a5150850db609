"""Query budgets of the workflow engine (DESIGN.md §10): a step's end, its run's advance and
the hand-over of the next step cost the same number of queries whatever the size of the run,
here a 1,000-item fan-out with concurrency 10 of a no-op tool, run to its end by the worker's
own entry point in this process (``job_run``), so every query is counted; and the reaper's
part, and a cancel Redis cannot take."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, reset_queries
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from redis.exceptions import RedisError

from executions.models import Execution, Job
from executions.services.jobs import job_claim, job_run
from tests.test_async_api import free_port
from workflows.models import StepRun, WorkflowRun
from workflows.services.engine import run_advance, runs_reap
from workflows.services.runs import run_cancel, run_start
from workflows.services.workflows import workflow_create

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

# One step of a fan-out, from its claim to the hand-over of the next item, 25 statements: the
# job's claim (5) and its step shown RUNNING (1); the outcome (BEGIN, three updates, COMMIT: 5);
# the engine's part in it (the step's row found, a savepoint and its release, the run locked,
# the row read and ended, the run's rows read: 7); the next item's acceptance in it (the rows
# whose turn came, their instance, a savepoint, the Execution and the Job, the release, the row
# queued: 7). The last items, with no next one to hand over: 18.
STEP_BUDGET = 25


def test_a_thousand_item_fan_out_costs_the_same_queries_per_step_from_the_first_to_the_last(user, make_instance):
    lister, noop = make_instance(owner=user, name="list"), make_instance("test-noop", owner=user, name="each")
    items = [f"item-{i}" for i in range(1000)]
    workflow = workflow_create(
        owner=user,
        key=f"fan-{uuid.uuid4().hex[:6]}",
        name="Fan-out",
        definition={
            "steps": [
                {"id": "list", "instance": str(lister.pk), "inputs": {"expression": "@", "data": items}},
                {
                    "id": "each",
                    "instance": str(noop.pk),
                    "for_each": {"$expr": "steps.list.output.result"},
                    "concurrency": 10,
                    "inputs": {"echo": {"$expr": "item"}},
                },
            ]
        },
    )
    run = run_start(workflow=workflow, inputs={}).run
    counts: list[int] = []

    def run_one() -> bool:
        job = Job.objects.filter(execution__workflow_steps__run=run, status="QUEUED").order_by("created_at").first()
        if job is None:
            return False
        reset_queries()  # the log keeps 9,000 queries
        with CaptureQueriesContext(connection) as queries:
            job_run(job_id=str(job.pk), worker_name="in-process")
        counts.append(len(queries))
        return True

    for _ in range(31):  # the list, then the first 30 items
        run_one()
    # The items in between, as if they had run (the suite has no time for 940 more): what a step
    # costs must not depend on how many rows the run has, nor on how many of them ended.
    StepRun.objects.filter(run=run, step_id="each", status="PENDING", iteration__lt=980).update(
        status="SUCCEEDED", output={"echo": "fast-forwarded"}, finished_at=timezone.now()
    )
    while run_one():
        pass

    run.refresh_from_db()
    assert run.status == "SUCCEEDED", run.error
    assert StepRun.objects.filter(run=run, step_id="each", status="SUCCEEDED").count() == 1000
    with_a_next_item = counts[1:-10]  # the list's end before; the last 10 have no next item to hand over
    assert len(with_a_next_item) == 50
    assert min(with_a_next_item) == max(with_a_next_item), f"a step's cost varies: {sorted(set(with_a_next_item))}"
    assert max(counts[1:]) <= STEP_BUDGET, counts
    assert counts[0] <= 10 * STEP_BUDGET, "the list's end hands over the fan-out's first 10 items"


def test_advancing_a_run_twice_does_nothing_twice(user, make_instance):
    first, second = make_instance(owner=user, name="first"), make_instance(owner=user, name="second")
    workflow = workflow_create(
        owner=user,
        key="twice",
        name="Twice",
        definition={
            "steps": [
                {"id": "first", "instance": str(first.pk), "inputs": {"expression": "@", "data": 1}},
                {"id": "second", "instance": str(second.pk), "inputs": {"expression": "@", "data": 2}},
            ]
        },
    )
    run = run_start(workflow=workflow, inputs={}).run
    before = list(StepRun.objects.filter(run=run).values_list("step_id", "status", "execution_id"))

    run_advance(WorkflowRun.objects.select_related("version").get(pk=run.pk))
    run_advance(WorkflowRun.objects.select_related("version").get(pk=run.pk))

    assert list(StepRun.objects.filter(run=run).values_list("step_id", "status", "execution_id")) == before
    assert Job.objects.filter(execution__workflow_steps__run=run).count() == 2


def two_steps(user: Any, make_instance: Any) -> Any:
    first, second = make_instance(owner=user, name="first"), make_instance(owner=user, name="second")
    return workflow_create(
        owner=user,
        key=f"two-{uuid.uuid4().hex[:6]}",
        name="Two steps",
        definition={
            "steps": [
                {"id": "first", "instance": str(first.pk), "inputs": {"expression": "@", "data": 1}},
                {"id": "second", "instance": str(second.pk), "inputs": {"expression": "@", "data": 2}},
            ]
        },
    )


def run_queued_jobs(run: WorkflowRun) -> None:
    """Run the run's queued jobs here, as a worker would, until none is left."""
    while job := Job.objects.filter(execution__workflow_steps__run=run, status="QUEUED").first():
        job_run(job_id=str(job.pk), worker_name="in-process")


def test_the_reaper_ends_a_step_whose_execution_was_deleted_and_the_run_ends(user, make_instance):
    run = run_start(workflow=two_steps(user, make_instance), inputs={}).run
    # An operator deletes one step's execution (its job with it) while it is queued.
    Execution.objects.filter(workflow_steps__run=run, workflow_steps__step_id="first").delete()
    run_queued_jobs(run)
    assert WorkflowRun.objects.get(pk=run.pk).status == "RUNNING", "nothing else will end that step"

    counts = runs_reap(now=timezone.now() + timedelta(minutes=5))

    assert counts["workflow_runs_advanced"] == 1
    run.refresh_from_db()
    assert run.status == "FAILED"
    assert run.error["metadata"]["step_id"] == "first"
    assert "deleted" in run.error["error_message"]


def test_the_reaper_ends_a_run_whose_step_ended_without_the_run_hearing_of_it(user, make_instance):
    run = run_start(workflow=two_steps(user, make_instance), inputs={}).run
    # The executions end behind the engine's back (no signal): the run is left RUNNING.
    Job.objects.filter(execution__workflow_steps__run=run).update(status="COMPLETED", progress=100)
    Execution.objects.filter(workflow_steps__run=run).update(status="COMPLETED", output_data={"result": 1})
    assert WorkflowRun.objects.get(pk=run.pk).status == "RUNNING"

    runs_reap(now=timezone.now() + timedelta(minutes=5))

    run.refresh_from_db()
    assert run.status == "SUCCEEDED"
    assert set(StepRun.objects.filter(run=run).values_list("status", flat=True)) == {"SUCCEEDED"}
    runs_reap(now=timezone.now() + timedelta(minutes=10))  # twice: nothing twice
    assert WorkflowRun.objects.get(pk=run.pk).finished_at == run.finished_at


def test_a_cancel_redis_cannot_take_still_cancels_every_step_and_says_so(user, make_instance, settings):
    run = run_start(workflow=two_steps(user, make_instance), inputs={}).run
    jobs = list(Job.objects.filter(execution__workflow_steps__run=run))
    for job in jobs:  # both steps running, as on a worker
        job_claim(job_id=str(job.pk), worker_name="in-process")
    real_queues = settings.RQ_QUEUES
    settings.RQ_QUEUES = {"default": {"URL": f"redis://127.0.0.1:{free_port()}/0", "DEFAULT_TIMEOUT": 600}}

    with pytest.raises(RedisError):
        run_cancel(run=run)

    settings.RQ_QUEUES = real_queues
    assert WorkflowRun.objects.get(pk=run.pk).status == "CANCELLING"
    assert all(job.cancel_requested_at for job in Job.objects.filter(pk__in=[j.pk for j in jobs])), (
        "each step's job was told, for the reaper to stop"
    )


def test_a_step_answered_from_the_cache_ends_at_once_and_the_run_goes_on(user, make_instance):
    workflow = two_steps(user, make_instance)  # json-transform steps: cacheable
    first = run_start(workflow=workflow, inputs={}).run
    run_queued_jobs(first)
    assert WorkflowRun.objects.get(pk=first.pk).status == "SUCCEEDED"

    again = run_start(workflow=workflow, inputs={}).run

    again.refresh_from_db()
    assert again.status == "SUCCEEDED", "no worker ran anything: both steps were cache hits"
    executions = Execution.objects.filter(workflow_steps__run=again)
    assert [e.cache_hit for e in executions] == [True, True]
    assert not Job.objects.filter(execution__in=executions).exclude(status="COMPLETED").exists()
