"""`manage.py seed_demo`: the logins, token, runnable instance and demo workflow that `make run` prints."""

import json
import shlex
from io import StringIO
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from instances.models import ToolInstance
from instances.services.instances import instance_transition
from tests.conftest import wait_for
from toolexec.demo import (
    DEMO_INSTANCE_NAME,
    DEMO_LONG_TASK_INSTANCE_NAME,
    DEMO_WORKFLOW_INPUTS,
    curl_workflow_run,
    demo_seed,
    workflow_page_url,
)
from workflows.definition import definition_validate
from workflows.models import StepRun, Workflow, WorkflowRun
from workflows.services.runs import run_inputs_check, run_start
from workflows.services.workflows import workflow_version_create

# What a run of the demo workflow with DEMO_WORKFLOW_INPUTS gives: a step per letter of each
# region's name, a quarter second each.
DEMO_WORKFLOW_OUTPUT = {
    "title": "Demo report: 4 regions",
    "regions": ["north", "south", "east", "west"],
    "steps_completed": 18,
    "seconds": 4.5,
}


def seed_demo(*, base_url: str = "http://127.0.0.1:8000") -> dict[str, str]:
    """Runs the command; returns what it printed: passwords, token and the curl line."""
    out = StringIO()
    call_command("seed_demo", "--base-url", base_url, stdout=out)
    printed: dict[str, str] = {}
    for line in out.getvalue().splitlines():
        if line.startswith("Superuser"):
            printed["admin_password"] = line.rsplit(" / ", 1)[1]
        elif line.startswith("Demo user's API token:"):
            printed["token"] = line.split(":", 1)[1].strip()
        elif line.startswith("Demo user"):
            printed["demo_password"] = line.rsplit(" / ", 1)[1]
        elif line.strip().startswith("curl ") and "/execute-sync" in line:
            printed["curl"] = line.strip()
    assert printed.keys() == {"admin_password", "demo_password", "token", "curl"}, out.getvalue()
    return printed


def demo_workflow() -> Workflow:
    return Workflow.objects.select_related("current_version").get(owner__username="demo", key="demo")


def token_client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def post_like_curl(curl: str, *, expect: int = 200) -> dict:
    """Sends the request the printed curl line describes, after the shell's word splitting."""
    words = shlex.split(curl)
    url = next(word for word in words if word.startswith("http"))
    headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
    body = words[words.index("-d") + 1]
    client = token_client(headers["Authorization"].removeprefix("Token "))
    response = client.post(urlsplit(url).path, body, content_type=headers["Content-Type"])
    assert response.status_code == expect, response.content
    return response.json()


@pytest.fixture
def dev_server(settings, catalog) -> None:
    """seed_demo runs only with DEBUG on, against a synced catalog."""
    settings.DEBUG = True


@pytest.mark.usefixtures("dev_server")
class TestSeedDemo:
    def test_creates_a_superuser_and_a_demo_user_with_the_printed_passwords(self) -> None:
        printed = seed_demo()

        users = get_user_model().objects
        admin, demo = users.get(username="admin"), users.get(username="demo")
        assert admin.is_superuser and admin.is_staff
        assert not demo.is_superuser and not demo.is_staff
        assert admin.check_password(printed["admin_password"])
        assert demo.check_password(printed["demo_password"])

    def test_printed_token_reads_the_catalog_as_the_demo_user(self) -> None:
        printed = seed_demo()

        response = token_client(printed["token"]).get("/api/v1/tools/")

        assert response.status_code == 200
        assert "json-transform" in json.dumps(response.json())

    def test_printed_curl_line_runs_the_demo_json_transform(self) -> None:
        printed = seed_demo(base_url="http://127.0.0.1:8123")

        assert printed["curl"].startswith("curl -s -X POST http://127.0.0.1:8123/api/v1/instances/")
        answer = post_like_curl(printed["curl"])

        assert answer["success"] is True
        assert answer["data"] == {"result": ["Ada", "Alan"]}

    def test_running_again_keeps_one_of_each_with_fresh_secrets(self) -> None:
        first = seed_demo()
        second = seed_demo()

        users = get_user_model().objects
        assert users.filter(username__in=["admin", "demo"]).count() == 2
        names = ToolInstance.objects.filter(owner__username="demo").values_list("name", flat=True)
        assert sorted(names) == sorted([DEMO_INSTANCE_NAME, DEMO_LONG_TASK_INSTANCE_NAME])
        assert first["admin_password"] != second["admin_password"]
        assert first["demo_password"] != second["demo_password"]
        assert users.get(username="demo").check_password(second["demo_password"])
        # The previous "make run" token is replaced, not piled up.
        assert token_client(first["token"]).get("/api/v1/tools/").status_code == 401
        assert post_like_curl(second["curl"])["success"] is True

    def test_disabled_demo_instances_are_reactivated(self) -> None:
        seed_demo()
        instances = list(ToolInstance.objects.filter(owner__username="demo"))
        for instance in instances:
            instance_transition(instance=instance, to=ToolInstance.Status.DISABLED)

        printed = seed_demo()

        for instance in instances:
            instance.refresh_from_db()
            assert instance.status == ToolInstance.Status.ACTIVE, instance.name
        assert post_like_curl(printed["curl"])["success"] is True

    def test_an_existing_user_named_admin_becomes_a_superuser(self) -> None:
        get_user_model().objects.create_user(username="admin", password="chosen by someone")

        printed = seed_demo()

        admin = get_user_model().objects.get(username="admin")
        assert admin.is_superuser and admin.check_password(printed["admin_password"])


@pytest.mark.usefixtures("dev_server")
class TestDemoWorkflow:
    def test_is_created_once_and_running_again_changes_nothing(self) -> None:
        seed_demo()
        first = demo_workflow()

        seed_demo()

        again = demo_workflow()
        assert Workflow.objects.filter(owner__username="demo").count() == 1
        assert again.pk == first.pk and again.versions.count() == 1
        assert again.current_version == first.current_version
        assert again.current_version.definition == first.current_version.definition

    def test_its_definition_validates_against_the_demo_users_instances_and_fans_out(self) -> None:
        seed_demo()
        version = demo_workflow().current_version
        instances = {
            str(instance.pk): instance
            for instance in ToolInstance.objects.filter(owner__username="demo").select_related("tool")
        }

        definition = definition_validate(version.definition, instances=instances)

        assert list(definition.steps) == ["list", "each", "summary"]
        assert definition.steps["each"].for_each == {"$expr": "steps.list.output.result"}
        assert definition.steps["each"].concurrency == 2
        assert {instances[step.instance_id].tool.slug for step in definition.steps.values()} == {
            "json-transform",
            "demo-long-task",
        }
        # The printed body is a valid run, and the "run it" form starts from the same values.
        assert run_inputs_check(definition, DEMO_WORKFLOW_INPUTS) == DEMO_WORKFLOW_INPUTS
        defaults = {name: prop["default"] for name, prop in definition.inputs_schema["properties"].items()}
        assert defaults == DEMO_WORKFLOW_INPUTS

    def test_an_edited_demo_workflow_gets_the_demo_back_as_a_new_version(self) -> None:
        seed_demo()
        workflow = demo_workflow()
        demo = workflow.current_version.definition
        edited = {**demo, "steps": demo["steps"][:1], "output": {"$expr": "steps.list.output"}}
        workflow_version_create(workflow=workflow, definition=edited, actor=workflow.owner)

        seed_demo()

        workflow = demo_workflow()
        assert workflow.current_version.number == 3
        assert workflow.current_version.definition == demo
        assert workflow.versions.get(number=2).definition == edited, "the edit stays in the history"

    def test_the_run_curl_line_starts_a_run(self) -> None:
        seed = demo_seed()
        curl = curl_workflow_run(base_url="http://127.0.0.1:8123", workflow=seed.workflow, token_key=seed.token_key)

        assert curl.startswith(f"curl -s -X POST http://127.0.0.1:8123/api/v1/workflows/{seed.workflow.pk}/runs ")
        answer = post_like_curl(curl, expect=202)

        run = WorkflowRun.objects.get(pk=answer["run_id"])
        assert run.workflow == seed.workflow and run.inputs == DEMO_WORKFLOW_INPUTS
        assert answer["run_url"].endswith(f"/workflow-runs/{run.pk}")
        assert answer["events_url"] == f"{answer['run_url']}/events"

    def test_the_workflow_page_answers_the_demo_user(self, client) -> None:
        seed = demo_seed()
        url = workflow_page_url(base_url="http://127.0.0.1:8123", workflow=seed.workflow)

        assert url == f"http://127.0.0.1:8123/status/workflows/{seed.workflow.pk}/"
        client.force_login(seed.workflow.owner)
        response = client.get(urlsplit(url).path)

        assert response.status_code == 200
        assert "Demo regional report" in response.content.decode()


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_of_the_demo_workflow_fans_out_and_succeeds_with_the_summary(catalog, rq_worker) -> None:
    rq_worker("--processes", "2")
    workflow = demo_seed().workflow

    run = run_start(workflow=workflow, inputs=DEMO_WORKFLOW_INPUTS).run

    def ended() -> WorkflowRun | None:
        fresh = WorkflowRun.objects.get(pk=run.pk)
        return fresh if fresh.status in WorkflowRun.TERMINAL else None

    run = wait_for(ended, timeout=60, message="the demo run to end")
    assert run.status == WorkflowRun.Status.SUCCEEDED, run.error
    assert run.output == DEMO_WORKFLOW_OUTPUT
    rows: dict[str, list[Any]] = {}
    for row in StepRun.objects.filter(run=run).order_by("step_id", "iteration"):
        rows.setdefault(row.step_id, []).append(row)
    assert [len(rows[step_id]) for step_id in ("list", "each", "summary")] == [1, 4, 1]
    assert all(row.status == StepRun.Status.SUCCEEDED for step_rows in rows.values() for row in step_rows)
    assert [row.output["steps_completed"] for row in rows["each"]] == [5, 5, 4, 4], "one iteration per region"


def test_refuses_to_reset_passwords_without_debug(settings, catalog) -> None:
    settings.DEBUG = False

    with pytest.raises(CommandError, match="DEBUG=true"):
        call_command("seed_demo", stdout=StringIO())

    assert not get_user_model().objects.filter(username__in=["admin", "demo"]).exists()
