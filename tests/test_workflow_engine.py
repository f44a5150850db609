"""The workflow engine with a real worker (DESIGN.md §10): steps pass outputs to inputs, fan
out under a concurrency limit, skip on ``when``, retry with backoff, fail fast, cancel, resume
from a failure reusing what succeeded, survive a killed worker, and refuse to start when a
step is not ready."""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import django_rq
import pytest

from executions.models import Execution, Job
from instances.models import Credential
from tests.conftest import wait_for
from tests.test_async_worker import job_process_of
from tests.test_credential_readiness import configure, create_credential
from tests.tools import gauge_key
from workflows.models import StepRun, WorkflowRun
from workflows.services.readiness import workflow_readiness
from workflows.services.runs import WorkflowNotReady, run_cancel, run_retry, run_start
from workflows.services.workflows import workflow_create

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ENDED = {"SUCCEEDED", "FAILED", "CANCELLED"}


def make_workflow(owner: Any, steps: list[dict[str, Any]], **extra: Any) -> Any:
    definition = {"steps": steps, **extra}
    return workflow_create(owner=owner, key=f"wf-{uuid.uuid4().hex[:8]}", name="Test workflow", definition=definition)


def wait_run(run: WorkflowRun, statuses: set[str] = ENDED, timeout: float = 30) -> WorkflowRun:
    def ended() -> WorkflowRun | None:
        fresh = WorkflowRun.objects.get(pk=run.pk)
        return fresh if fresh.status in statuses else None

    return wait_for(ended, timeout=timeout, message=f"run {run.pk} to reach {statuses}")


def rows(run: WorkflowRun) -> dict[str, list[StepRun]]:
    found: dict[str, list[StepRun]] = {}
    for row in StepRun.objects.filter(run=run).order_by("step_id", "iteration"):
        found.setdefault(row.step_id, []).append(row)
    return found


def transform(expression: str, data: Any) -> dict[str, Any]:
    return {"expression": expression, "data": data}


def test_a_step_reads_its_upstream_output_and_the_run_gives_the_definitions_output(user, make_instance, rq_worker):
    rq_worker()
    a, b = make_instance(owner=user, name="a"), make_instance(owner=user, name="b")
    workflow = make_workflow(
        user,
        [
            {"id": "a", "instance": str(a.pk), "inputs": transform("files", {"$expr": "input"})},
            {"id": "b", "instance": str(b.pk), "inputs": transform("length(@)", {"$expr": "steps.a.output.result"})},
        ],
        inputs={"type": "object", "properties": {"files": {"type": "array"}}},
        output={"count": {"$expr": "steps.b.output.result"}, "title": {"$template": "{{ input.files[0] }} and more"}},
    )
    run = run_start(workflow=workflow, inputs={"files": ["x.csv", "y.csv", "z.csv"]}).run

    run = wait_run(run)

    assert run.status == "SUCCEEDED", run.error
    assert run.output == {"count": 3, "title": "x.csv and more"}
    steps = rows(run)
    assert steps["a"][0].output == {"result": ["x.csv", "y.csv", "z.csv"]}
    assert steps["b"][0].inputs["data"] == steps["a"][0].output["result"], "B was given A's output"
    assert steps["b"][0].status == "SUCCEEDED" and steps["b"][0].attempt == 1
    execution = Execution.objects.get(pk=steps["b"][0].execution_id)
    assert execution.origin == "workflow" and execution.mode == "ASYNC"
    assert run.credits_consumed == sum(
        Execution.objects.filter(workflow_steps__run=run).values_list("credits_consumed", flat=True)
    )


def test_a_fan_out_never_runs_more_than_its_concurrency_and_fans_in_in_item_order(user, make_instance, rq_worker):
    rq_worker("--processes", "4")
    gauge = uuid.uuid4().hex
    lister, reader, summary = (
        make_instance(owner=user, name="list"),
        make_instance("test-gauge", owner=user, name="read"),
        make_instance(owner=user, name="summary"),
    )
    items = [{"id": f"f{i}"} for i in range(6)]
    workflow = make_workflow(
        user,
        [
            {"id": "list", "instance": str(lister.pk), "inputs": transform("@", items)},
            {
                "id": "read",
                "instance": str(reader.pk),
                "for_each": {"$expr": "steps.list.output.result"},
                "concurrency": 2,
                "inputs": {"gauge": gauge, "seconds": 0.5, "value": {"$expr": "item.id"}},
            },
            {
                "id": "summary",
                "instance": str(summary.pk),
                "inputs": transform("[*].value", {"$expr": "steps.read.output"}),
            },
        ],
    )
    run = wait_run(run_start(workflow=workflow, inputs={}).run, timeout=60)

    assert run.status == "SUCCEEDED", run.error
    seen = [int(n) for n in django_rq.get_connection("default").lrange(f"{gauge_key(gauge)}:seen", 0, -1)]
    assert len(seen) == 6 and max(seen) <= 2, seen
    steps = rows(run)
    assert [row.iteration for row in steps["read"]] == list(range(6))
    assert all(row.items_total == 6 for row in steps["read"])
    assert steps["summary"][0].output == {"result": [f"f{i}" for i in range(6)]}, "fan-in sees every output in order"


def test_when_false_skips_the_step_and_its_dependents(user, make_instance, rq_worker):
    rq_worker()
    first, maybe, after, other = (make_instance(owner=user, name=n) for n in ("first", "maybe", "after", "other"))
    workflow = make_workflow(
        user,
        [
            {"id": "first", "instance": str(first.pk), "inputs": transform("length(@)", [])},
            {
                "id": "maybe",
                "instance": str(maybe.pk),
                "when": {"$expr": "steps.first.output.result > `0`"},
                "inputs": transform("@", 1),
            },
            {"id": "after", "instance": str(after.pk), "depends_on": ["maybe"], "inputs": transform("@", 2)},
            {
                "id": "anyway",
                "instance": str(other.pk),
                "depends_on": ["maybe"],
                "on_upstream_skipped": "run",
                "inputs": transform("@", {"$expr": "steps.maybe.status"}),
            },
        ],
    )
    run = wait_run(run_start(workflow=workflow, inputs={}).run)

    assert run.status == "SUCCEEDED", run.error
    steps = rows(run)
    assert steps["maybe"][0].status == "SKIPPED" and steps["maybe"][0].execution_id is None
    assert steps["after"][0].status == "SKIPPED"
    assert steps["anyway"][0].output == {"result": "SKIPPED"}


def test_a_rate_limited_step_is_retried_with_backoff_and_succeeds_on_its_third_attempt(user, make_instance, rq_worker):
    rq_worker()
    counter = uuid.uuid4().hex
    flaky = make_instance("test-rate-limited", owner=user, name="flaky")
    retry = {"max_attempts": 3, "backoff_seconds": 1, "factor": 2, "on": ["UPSTREAM_RATE_LIMITED"]}
    workflow = make_workflow(
        user, [{"id": "call", "instance": str(flaky.pk), "inputs": {"counter": counter, "failures": 2}, "retry": retry}]
    )
    run = wait_run(run_start(workflow=workflow, inputs={}).run, timeout=40)

    assert run.status == "SUCCEEDED", run.error
    row = rows(run)["call"][0]
    assert row.status == "SUCCEEDED" and row.attempt == 3 and row.output == {"runs": 3}
    began = [float(t) for t in django_rq.get_connection("default").lrange(f"{gauge_key(counter)}:at", 0, -1)]
    assert len(began) == 3
    assert began[1] - began[0] >= 1.0 and began[2] - began[1] >= 2.0, "backoff 1 s, then 2 s (factor 2)"
    assert Execution.objects.filter(instance=flaky).count() == 3, "each attempt is an execution of its own"


def test_a_hard_failure_fails_the_run_lets_running_siblings_finish_and_ends_later_steps_upstream_failed(
    user, make_instance, rq_worker
):
    rq_worker("--processes", "2")
    failing = make_instance("test-rate-limited", owner=user, name="failing")
    slow, later = make_instance("test-gauge", owner=user, name="slow"), make_instance(owner=user, name="later")
    workflow = make_workflow(
        user,
        [
            {"id": "slow", "instance": str(slow.pk), "inputs": {"gauge": uuid.uuid4().hex, "seconds": 2}},
            {"id": "boom", "instance": str(failing.pk), "inputs": {"counter": uuid.uuid4().hex, "failures": 9}},
            {"id": "later", "instance": str(later.pk), "depends_on": ["boom", "slow"], "inputs": transform("@", 1)},
        ],
    )
    run = wait_run(run_start(workflow=workflow, inputs={}).run)

    assert run.status == "FAILED"
    assert run.error["error_code"] == "UPSTREAM_RATE_LIMITED"
    assert run.error["metadata"]["step_id"] == "boom"
    assert run.error["error_message"].startswith("Step 'boom' failed:")
    steps = rows(run)
    assert steps["slow"][0].status == "SUCCEEDED", "a running sibling finishes"
    assert steps["later"][0].status == "UPSTREAM_FAILED" and steps["later"][0].execution_id is None


def test_cancelling_a_run_mid_way_cancels_its_jobs_and_leaves_nothing_queued_or_running(user, make_instance, rq_worker):
    rq_worker()
    slow, after = make_instance("test-slow", owner=user, name="slow"), make_instance(owner=user, name="after")
    workflow = make_workflow(
        user,
        [
            {"id": "slow", "instance": str(slow.pk), "inputs": {"seconds": 30}},
            {"id": "after", "instance": str(after.pk), "depends_on": ["slow"], "inputs": transform("@", 1)},
        ],
    )
    run = run_start(workflow=workflow, inputs={}).run
    wait_for(lambda: StepRun.objects.filter(run=run, step_id="slow", status="RUNNING").exists(), message="slow runs")

    assert run_cancel(run=run).status in ("CANCELLING", "CANCELLED")
    run = wait_run(run)

    assert run.status == "CANCELLED"
    steps = rows(run)
    assert steps["slow"][0].status == "CANCELLED" and steps["after"][0].status == "CANCELLED"
    assert not Job.objects.filter(execution__workflow_steps__run=run, status__in=("QUEUED", "RUNNING")).exists()
    with pytest.raises(Exception, match="already ended"):
        run_cancel(run=run)


def test_a_retry_reuses_the_steps_that_succeeded_and_the_upstream_sees_no_repeat(
    user, make_instance, upstream, rq_worker
):
    rq_worker(TOOLEXEC_HTTP_ALLOWED_HOSTS="localhost")
    upstream.expect_request("/list").respond_with_json({"files": ["a", "b"]})
    fetch = make_instance("http-request", owner=user, name="fetch")
    flaky = make_instance("test-rate-limited", owner=user, name="flaky")
    counter = uuid.uuid4().hex
    workflow = make_workflow(
        user,
        [
            {"id": "fetch", "instance": str(fetch.pk), "inputs": {"method": "GET", "url": upstream.url_for("/list")}},
            {
                "id": "use",
                "instance": str(flaky.pk),
                "depends_on": ["fetch"],
                "inputs": {"counter": counter, "failures": 1},
            },
        ],
    )
    failed = wait_run(run_start(workflow=workflow, inputs={}).run)
    assert failed.status == "FAILED"
    assert len(upstream.log) == 1

    retried = wait_run(run_retry(run=failed))

    assert retried.status == "SUCCEEDED", retried.error
    assert retried.retry_of_id == failed.pk
    steps = rows(retried)
    assert steps["fetch"][0].status == "REUSED"
    assert steps["fetch"][0].output == rows(failed)["fetch"][0].output
    assert steps["use"][0].status == "SUCCEEDED"
    assert len(upstream.log) == 1, "the step that succeeded was not run again"


def test_a_run_whose_worker_is_killed_mid_step_still_ends(user, make_instance, rq_worker, settings):
    worker = rq_worker(TOOLEXEC_JOB_STALE_SECONDS="4", TOOLEXEC_JOB_HEARTBEAT_SECONDS="1")
    slow = make_instance("test-slow", owner=user, name="slow")
    workflow = make_workflow(user, [{"id": "slow", "instance": str(slow.pk), "inputs": {"seconds": 30}}])
    run = run_start(workflow=workflow, inputs={}).run
    row = wait_for(
        lambda: StepRun.objects.filter(run=run, status="RUNNING").select_related("execution__job").first(),
        message="the step to run",
    )
    process = wait_for(lambda: job_process_of(str(row.execution.job.pk), [worker]), message="its job process")

    os.kill(process, signal.SIGKILL)
    run = wait_run(run, timeout=30)

    assert run.status == "FAILED"
    assert run.error["error_code"] == "WORKER_LOST"
    assert rows(run)["slow"][0].status == "FAILED"


def test_a_workflow_with_a_revoked_credential_says_which_step_and_runs_nothing(api, user, make_instance):
    credential = create_credential(api)
    sheet = make_instance("test-google-sheet", owner=user, name="sheet")
    assert configure(api, str(sheet.pk), {"OAUTH_TOKEN": credential["id"]}).status_code == 200
    Credential.objects.filter(pk=credential["id"]).update(status=Credential.Status.REVOKED)
    first = make_instance(owner=user, name="first")
    workflow = make_workflow(
        user,
        [
            {"id": "first", "instance": str(first.pk), "inputs": transform("@", 1)},
            {"id": "sheet", "instance": str(sheet.pk), "inputs": {"file_id": "f"}},
        ],
    )

    readiness = workflow_readiness(workflow=workflow).as_dict()

    assert readiness["is_ready"] is False
    assert readiness["error_code"] == "CREDENTIAL_REVOKED"
    assert readiness["error_message"].startswith("Step 'sheet':")
    assert readiness["action_items"][0]["action"] == "fix_credential"
    assert [step["is_ready"] for step in readiness["checks"]] == [True, False]
    with pytest.raises(WorkflowNotReady) as refused:
        run_start(workflow=workflow, inputs={})
    assert refused.value.status == 409
    assert refused.value.envelope()["metadata"]["step_id"] == "sheet"
    assert not WorkflowRun.objects.exists() and not Execution.objects.exists()


def test_a_run_the_engine_cannot_advance_still_lets_its_step_end_and_ends_failed(user, make_instance, rq_worker):
    # The worker runs with a lower fan-out limit than the version was saved under: it cannot
    # read the version, so advancing the run fails there, after its first step ran.
    rq_worker(TOOLEXEC_WORKFLOW_MAX_FANOUT="2", TOOLEXEC_QUEUE_RECOVERY_SECONDS="1", TOOLEXEC_JOB_STALE_SECONDS="2")
    first, each = make_instance(owner=user, name="first"), make_instance(owner=user, name="each")
    workflow = make_workflow(
        user,
        [
            {"id": "first", "instance": str(first.pk), "inputs": transform("@", 1)},
            {"id": "each", "instance": str(each.pk), "depends_on": ["first"], "for_each": [1, 2, 3],
             "inputs": transform("@", {"$expr": "item"})},
        ],
    )  # fmt: skip
    run = run_start(workflow=workflow, inputs={}).run

    run = wait_run(run, timeout=30)

    assert run.status == "FAILED"
    assert run.error["error_code"] == "INTERNAL_ERROR"
    execution = Execution.objects.get(workflow_steps__run=run, workflow_steps__step_id="first")
    assert execution.status == "COMPLETED" and execution.job.status == "COMPLETED", "the step's own end committed"
