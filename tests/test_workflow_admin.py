"""The operator console's workflows: workflows (readiness, renamed through the service, deleted
through it), versions (read-only, the definition formatted), runs with their step runs inline,
cancel and retry actions that call the services, permissions, and changelists and a run's page
in a constant number of queries whatever their size (a 1,000-item fan-out's run too)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from executions.models import Job, Mode
from tests.factories import UserFactory
from tests.test_admin import change, changelist, messages_of, run_action, staff
from tests.test_status_pages import failure, record
from tests.test_workflow_pages import fan_out_run, make_run, make_workflow, step, step_row, transform
from workflows.models import StepRun, Workflow, WorkflowRun, WorkflowVersion
from workflows.services.workflows import workflow_version_create

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]


@pytest.fixture
def workflow(make_instance, user) -> Workflow:
    first, second = make_instance(owner=user, name="First"), make_instance(owner=user, name="Second")
    return make_workflow(
        user,
        [step("first", first), step("second", second, inputs=transform("@", {"$expr": "steps.first.output"}))],
        name="Nightly export",
    )


def failed_run(workflow: Workflow) -> WorkflowRun:
    run = make_run(workflow, "FAILED", error=failure("Step 'second' failed: the upstream answered 502"))
    step_row(run, "first", "SUCCEEDED", output={"result": 1}, attempt=1)
    step_row(run, "second", "FAILED", error=failure("the upstream answered 502"), attempt=2)
    return run


# --- Workflows ------------------------------------------------------------------------------


def test_the_console_lists_workflows_versions_runs_and_step_runs(admin_client, workflow):
    failed_run(workflow)
    index = admin_client.get(reverse("admin:index"))
    models = {m["object_name"] for app in index.context["app_list"] for m in app["models"]}
    assert {"Workflow", "WorkflowVersion", "WorkflowRun", "StepRun"} <= models
    for model in ("workflow", "workflowversion", "workflowrun", "steprun"):
        assert admin_client.get(changelist(f"workflows.{model}")).status_code == 200, model
    listing = admin_client.get(changelist("workflows.workflow")).content.decode()
    assert "Nightly export" in listing and workflow.key in listing


def test_a_workflows_page_shows_each_steps_readiness_its_versions_and_its_status_page(
    admin_client, workflow, make_instance, user
):
    page = admin_client.get(change("workflows.workflow", workflow.pk)).content.decode()
    assert "Ready to run." in page and "<strong>first</strong>" in page
    assert f'href="/status/workflows/{workflow.pk}/"' in page
    assert change("workflows.workflowversion", workflow.current_version.pk) in page
    sheet = make_instance("test-google-sheet", owner=user, name="Sheet")
    workflow_version_create(
        workflow=workflow,
        definition={"steps": [{"id": "sheet", "instance": str(sheet.pk), "inputs": {"file_id": "f"}}]},
        actor=user,
    )
    page = admin_client.get(change("workflows.workflow", workflow.pk)).content.decode()
    assert "Not ready: Step &#x27;sheet&#x27;:" in page
    assert "version 2" in page and "version 1" in page  # both versions, inline
    assert re.search(r'<li>Connect your Google account[^<]*\(high\) <a href="[^"]+">', page)


def test_renaming_a_workflow_goes_through_the_service_and_a_taken_key_is_refused(admin_client, workflow, user):
    taken = Workflow.objects.create(owner=user, key="taken", name="Taken")
    url = change("workflows.workflow", workflow.pk)
    refused = admin_client.post(url, {"name": "Renamed", "key": "taken", "description": "", **_no_versions(workflow)})
    assert refused.status_code == 200
    assert refused.context["adminform"].form.errors == {"key": ["Workflow with this Owner and Key already exists."]}
    assert Workflow.objects.get(pk=workflow.pk).key != "taken" and taken.key == "taken"
    saved = admin_client.post(
        url, {"name": "Renamed", "key": "renamed", "description": "Every night", **_no_versions(workflow)}
    )
    assert saved.status_code == 302, saved.content.decode()[:2000]
    workflow.refresh_from_db()
    assert (workflow.name, workflow.key, workflow.description) == ("Renamed", "renamed", "Every night")


def _no_versions(workflow: Workflow) -> dict[str, Any]:
    """The version inline's management form (read-only: nothing in it changes)."""
    count = workflow.versions.count()
    return {
        "versions-TOTAL_FORMS": str(count),
        "versions-INITIAL_FORMS": str(count),
        "versions-MIN_NUM_FORMS": "0",
        "versions-MAX_NUM_FORMS": "1000",
        **{f"versions-{i}-id": str(v.pk) for i, v in enumerate(workflow.versions.order_by("-number"))},
        **{f"versions-{i}-workflow": str(workflow.pk) for i in range(count)},
    }


def test_workflows_are_created_through_the_api_not_the_console(admin_client, db):
    assert admin_client.get(reverse("admin:workflows_workflow_add")).status_code == 403


def test_deleting_a_workflow_with_a_run_in_flight_is_refused_and_otherwise_deletes_its_runs(admin_client, workflow):
    run = make_run(workflow)
    url = reverse("admin:workflows_workflow_delete", args=[workflow.pk])
    response = admin_client.post(url, {"post": "yes"}, follow=True)
    assert any("Not deleted: A run of this workflow is still in flight" in m for m in messages_of(response))
    assert Workflow.objects.filter(pk=workflow.pk).exists()
    WorkflowRun.objects.filter(pk=run.pk).update(status="CANCELLED")
    step_row(run, "first", "CANCELLED")
    # Deleting a workflow takes the permission to delete workflows: its runs, versions and
    # step runs (read-only records) go with it, counted rather than listed.
    _, operator = staff("workflows.view_workflow", "workflows.delete_workflow")
    confirm = operator.get(url).content.decode()
    assert "Are you sure" in confirm and "Workflow runs: 1" in confirm and "Step runs: 1" in confirm
    operator.post(url, {"post": "yes"})
    assert not Workflow.objects.filter(pk=workflow.pk).exists() and not WorkflowRun.objects.exists()


# --- Versions -----------------------------------------------------------------------------------


def test_a_versions_definition_is_shown_formatted_and_never_edited(admin_client, workflow):
    version = workflow.current_version
    page = admin_client.get(change("workflows.workflowversion", version.pk)).content.decode()
    assert (
        "<pre" in page
        and "&quot;steps&quot;: [" in page
        and "&quot;$expr&quot;: &quot;steps.first.output&quot;" in page
    )
    assert admin_client.post(change("workflows.workflowversion", version.pk), {}).status_code == 403
    assert admin_client.get(reverse("admin:workflows_workflowversion_add")).status_code == 403
    assert WorkflowVersion.objects.get(pk=version.pk).definition == version.definition


# --- Runs ---------------------------------------------------------------------------------------


def test_a_runs_page_shows_its_error_and_step_runs_inline_with_their_executions_and_jobs(
    admin_client, workflow, make_instance, user
):
    run = failed_run(workflow)
    execution = record(make_instance("demo-long-task", owner=user), mode=Mode.ASYNC, job={"status": "FAILED"})
    StepRun.objects.filter(run=run, step_id="second").update(execution=execution)
    page = admin_client.get(change("workflows.workflowrun", run.pk)).content.decode()
    assert "Step &#x27;second&#x27; failed: the upstream answered 502" in page
    assert '<a href="https://toolexec.test/fix">' in page  # what to do
    assert f'href="/status/workflows/runs/{run.pk}/"' in page
    inline = page.split('id="steps-group"', 1)[1]
    assert "first" in inline and "second" in inline and "UPSTREAM_ERROR" in inline
    assert change("executions.execution", execution.pk) in inline
    assert change("executions.job", execution.job.pk) in inline and "FAILED 0%" in inline
    assert admin_client.post(change("workflows.workflowrun", run.pk), {}).status_code == 403


def test_a_large_fan_outs_page_lists_its_first_step_runs_and_links_them_all(admin_client, user, make_instance):
    run = fan_out_run(user, make_instance, 300)
    page = admin_client.get(change("workflows.workflowrun", run.pk)).content.decode()
    inline = page.split('id="steps-group"', 1)[1]
    assert inline.count('class="form-row') == 100
    assert f"/admin/workflows/steprun/?run__id__exact={run.pk}" in page
    every = admin_client.get(changelist("workflows.steprun") + f"?run__id__exact={run.pk}&status__exact=RUNNING")
    assert every.status_code == 200 and len(every.context["cl"].result_list) == 10


def test_a_step_runs_page_shows_its_inputs_output_and_item_formatted_without_secrets(admin_client, workflow):
    run = make_run(workflow, "SUCCEEDED")
    row = step_row(run, "first", "SUCCEEDED", inputs={"data": "<b>x</b>", "api_key": "PLANTED-9c1f"}, output={"ok": 1})
    page = admin_client.get(change("workflows.steprun", row.pk)).content.decode()
    assert "&quot;data&quot;: &quot;&lt;b&gt;x&lt;/b&gt;&quot;" in page and "&quot;ok&quot;: 1" in page
    assert "PLANTED-9c1f" not in page


@pytest.mark.redis
def test_cancel_a_run_whose_steps_wait_and_refuse_cancelling_it_again(admin_client, workflow):
    run = make_run(workflow)
    step_row(run, "first", "PENDING")
    response = run_action(admin_client, "workflows.workflowrun", "cancel", [run.pk])
    assert messages_of(response) == [f"Run {run.pk}: cancelled."]
    assert WorkflowRun.objects.get(pk=run.pk).status == "CANCELLED"
    assert StepRun.objects.get(run=run, step_id="first").status == "CANCELLED"
    again = run_action(admin_client, "workflows.workflowrun", "cancel", [run.pk])
    assert "already ended (CANCELLED)" in messages_of(again)[0]


@pytest.mark.redis
def test_cancelling_a_run_with_a_step_in_flight_cancels_its_job(admin_client, workflow, make_instance, user):
    run = make_run(workflow)
    step_row(run, "first", "SUCCEEDED")
    long = make_instance("demo-long-task", owner=user)
    execution = record(long, mode=Mode.ASYNC, status="PENDING", job={"status": "QUEUED"})
    step_row(run, "second", "QUEUED", execution=execution)
    response = run_action(admin_client, "workflows.workflowrun", "cancel", [run.pk])
    [message] = messages_of(response)
    assert message.startswith(f"Run {run.pk}: ")
    assert Job.objects.get(pk=execution.job.pk).status == "CANCELLED"


def test_retry_a_failed_run_reusing_what_succeeded_and_refuse_retrying_a_run_in_flight(admin_client, workflow):
    run = failed_run(workflow)
    response = run_action(admin_client, "workflows.workflowrun", "retry", [run.pk])
    new = WorkflowRun.objects.get(retry_of=run)
    assert messages_of(response) == [f"Run {run.pk}: retried as run {new.pk}."]
    assert StepRun.objects.get(run=new, step_id="first").status == "REUSED"
    refused = run_action(admin_client, "workflows.workflowrun", "retry", [new.pk])
    assert "not retried: This run is still in flight" in messages_of(refused)[0]


def test_staff_without_change_permission_on_runs_cannot_cancel_or_retry(workflow):
    run = make_run(workflow)
    step_row(run, "first", "PENDING")
    _, viewer = staff("workflows.view_workflowrun")
    page = viewer.get(changelist("workflows.workflowrun"))
    assert page.status_code == 200
    assert '<option value="cancel">' not in page.content.decode()
    run_action(viewer, "workflows.workflowrun", "cancel", [run.pk])
    assert WorkflowRun.objects.get(pk=run.pk).status == "RUNNING"
    _, operator = staff("workflows.view_workflowrun", "workflows.change_workflowrun")
    run_action(operator, "workflows.workflowrun", "cancel", [run.pk])
    assert WorkflowRun.objects.get(pk=run.pk).status == "CANCELLED"


# --- Query budgets ---------------------------------------------------------------------------

# Session, user, the page, its count (the run tables first read PostgreSQL's estimate), and
# the filters' choices: the same for 3 rows and for 30.
BUDGETS = {"workflow": 5, "workflowversion": 5, "workflowrun": 5, "steprun": 5}


def make_rows(n: int, make_instance: Any) -> None:
    for _ in range(n):
        owner = UserFactory()
        workflow = make_workflow(owner, [step("only", make_instance(owner=owner))])
        run = failed_run_of(workflow)
        step_row(run, "only", "FAILED", error=failure())


def failed_run_of(workflow: Workflow) -> WorkflowRun:
    return make_run(workflow, "FAILED", error=failure())


@pytest.mark.parametrize("model", sorted(BUDGETS))
def test_changelist_queries_do_not_grow_with_its_rows(
    model, admin_client, make_instance, django_assert_max_num_queries
):
    url = changelist(f"workflows.{model}")
    make_rows(3, make_instance)
    counts = []
    for more in (0, 27):
        make_rows(more, make_instance)
        with django_assert_max_num_queries(BUDGETS[model]):
            with CaptureQueriesContext(connection) as queries:
                response = admin_client.get(url)
        assert response.status_code == 200
        assert len(response.context["cl"].result_list) >= 3 + more
        counts.append(len(queries))
    print(f"{model}: {counts[0]} queries with 3 rows, {counts[1]} with 30")
    assert counts[0] == counts[1]


def test_a_runs_page_costs_the_same_queries_for_a_10_or_a_1000_item_fan_out(admin_client, make_instance):
    counts = []
    for items in (10, 1000):
        run = fan_out_run(UserFactory(), make_instance, items)
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(change("workflows.workflowrun", run.pk)).status_code == 200
        counts.append(len(queries))
    print(f"run page: {counts[0]} queries for 10 items, {counts[1]} for 1,000")
    assert counts[0] == counts[1]
