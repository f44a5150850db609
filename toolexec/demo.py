"""Demo data for `make run`: a superuser, a demo user with an API token, a runnable instance,
and a demo workflow of built-in tools (no network, no credentials) that fans out.

Safe to run repeatedly: the users, the instances, the workflow and one "make run" token are
reused or replaced, and both users get a fresh random password each time (none is kept in
the repo).
"""

import json
import secrets
import shlex
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from core.models import ApiToken
from instances.models import ToolInstance
from instances.services.instances import instance_create, instance_transition
from tools.models import ToolDefinition
from workflows.models import Workflow
from workflows.services.workflows import workflow_create, workflow_version_create

ADMIN_USERNAME = "admin"
DEMO_USERNAME = "demo"
TOKEN_NAME = "make run"
DEMO_TOOL_SLUG = "json-transform"
DEMO_INSTANCE_NAME = "Demo JSON transform"
DEMO_INPUTS: dict[str, Any] = {
    "expression": "people[?age > `30`].name",
    "data": {"people": [{"name": "Ada", "age": 36}, {"name": "Alan", "age": 41}, {"name": "Grace", "age": 29}]},
}

DEMO_LONG_TASK_SLUG = "demo-long-task"
DEMO_LONG_TASK_INSTANCE_NAME = "Demo long task"
DEMO_WORKFLOW_KEY = "demo"  # the demo instances' workflow_id names it
DEMO_WORKFLOW_NAME = "Demo regional report"
DEMO_WORKFLOW_DESCRIPTION = (
    "Built-in tools only, no network: json-transform lists the regions, demo-long-task works through "
    "each (one step per letter of its name, two regions at a time), json-transform sums it up."
)
DEMO_FAN_OUT_CONCURRENCY = 2
# A quarter second a step: the default regions take 4.5 s of work, a couple of seconds at two at a time,
# long enough to watch the run page move. (0.25 adds up exactly in floating point.)
DEMO_STEP_SECONDS = 0.25
DEMO_WORKFLOW_INPUTS: dict[str, Any] = {"title": "Demo report", "regions": ["north", "south", "east", "west"]}


@dataclass(frozen=True)
class DemoSeed:
    admin_password: str
    demo_password: str
    token_key: str
    instance: ToolInstance
    workflow: Workflow


def _user_with_fresh_password(username: str, *, superuser: bool) -> tuple[AbstractBaseUser, str]:
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(
        **{user_model.USERNAME_FIELD: username}, defaults={"email": f"{username}@example.com"}
    )
    password = secrets.token_urlsafe(12)
    user.set_password(password)
    user.is_active = True
    if superuser:
        user.is_staff = user.is_superuser = True
    user.save()
    return user, password


def _demo_instance(owner: AbstractBaseUser, *, slug: str, name: str, **options: Any) -> ToolInstance:
    tool = ToolDefinition.objects.filter(slug=slug).first()
    if tool is None:
        raise LookupError(f"The {slug} tool is not in the catalog: run `manage.py sync_tools` first.")
    instance = ToolInstance.objects.filter(owner=owner, tool=tool, name=name).order_by("created_at").first()
    if instance is None:
        return instance_create(owner=owner, tool=tool, name=name, workflow_id=DEMO_WORKFLOW_KEY, **options)
    if instance.status != ToolInstance.Status.ACTIVE:
        # Someone disabled it while trying things out; the printed curl lines should still work.
        instance_transition(instance=instance, to=ToolInstance.Status.ACTIVE, reason="Reactivated by seed_demo.")
    return instance


def demo_workflow_definition(*, transform: ToolInstance, long_task: ToolInstance) -> dict[str, Any]:
    """list (json-transform) → each (demo-long-task, one iteration per region) → summary
    (json-transform, the fan-in), with the run's output taken from the summary."""
    return {
        "inputs": {
            "type": "object",
            "properties": {
                "title": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 100,
                    "default": DEMO_WORKFLOW_INPUTS["title"],
                    "description": "The summary's title starts with it.",
                },
                "regions": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": 40},
                    "minItems": 1,
                    "maxItems": 20,
                    "default": DEMO_WORKFLOW_INPUTS["regions"],
                    "description": "One iteration of the fan-out per region; its name's length is its number of steps.",
                },
            },
            "required": ["title", "regions"],
            "additionalProperties": False,
        },
        "steps": [
            {
                "id": "list",
                "instance": str(transform.pk),
                "inputs": {"expression": "regions[*].{region: @, steps: length(@)}", "data": {"$expr": "input"}},
            },
            {
                "id": "each",
                "instance": str(long_task.pk),
                "for_each": {"$expr": "steps.list.output.result"},
                "concurrency": DEMO_FAN_OUT_CONCURRENCY,
                "inputs": {"steps": {"$expr": "item.steps"}, "step_seconds": DEMO_STEP_SECONDS},
            },
            {
                "id": "summary",
                "instance": str(transform.pk),
                "inputs": {
                    "expression": (
                        "{title: title, regions: regions, steps_completed: sum(work[*].steps_completed), "
                        "seconds: sum(work[*].seconds)}"
                    ),
                    "data": {
                        "title": {"$template": "{{ input.title }}: {{ length(steps.each.output) }} regions"},
                        "regions": {"$expr": "steps.list.output.result[*].region"},
                        "work": {"$expr": "steps.each.output"},
                    },
                },
            },
        ],
        "output": {"$expr": "steps.summary.output.result"},
    }


def _demo_workflow(owner: AbstractBaseUser, definition: dict[str, Any]) -> Workflow:
    workflow = Workflow.objects.filter(owner=owner, key=DEMO_WORKFLOW_KEY).select_related("current_version").first()
    if workflow is None:
        return workflow_create(
            owner=owner,
            key=DEMO_WORKFLOW_KEY,
            name=DEMO_WORKFLOW_NAME,
            description=DEMO_WORKFLOW_DESCRIPTION,
            definition=definition,
        )
    if workflow.current_version is None or workflow.current_version.definition != definition:
        # Edited while trying things out, or its instances were replaced: the printed curl line
        # runs the demo again. Runs in flight keep their version; the edited one stays in the history.
        workflow_version_create(workflow=workflow, definition=definition, actor=owner)
    return workflow


@transaction.atomic
def demo_seed() -> DemoSeed:
    _, admin_password = _user_with_fresh_password(ADMIN_USERNAME, superuser=True)
    demo, demo_password = _user_with_fresh_password(DEMO_USERNAME, superuser=False)
    # One live "make run" token: the one printed last; earlier ones stop working.
    ApiToken.objects.filter(user=demo, name=TOKEN_NAME).delete()
    _, token_key = ApiToken.issue(user=demo, name=TOKEN_NAME)
    transform = _demo_instance(demo, slug=DEMO_TOOL_SLUG, name=DEMO_INSTANCE_NAME)
    # Not cached: a repeated run of the demo works through its steps again, for the run page to show.
    long_task = _demo_instance(demo, slug=DEMO_LONG_TASK_SLUG, name=DEMO_LONG_TASK_INSTANCE_NAME, cache_enabled=False)
    workflow = _demo_workflow(demo, demo_workflow_definition(transform=transform, long_task=long_task))
    return DemoSeed(admin_password, demo_password, token_key, transform, workflow)


def curl_execute_sync(*, base_url: str, instance: ToolInstance, token_key: str) -> str:
    url = f"{base_url}/api/v1/instances/{instance.pk}/execute-sync"
    return (
        f"curl -s -X POST {shlex.quote(url)} -H {shlex.quote(f'Authorization: Token {token_key}')} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(DEMO_INPUTS))}"
    )


def curl_workflow_run(*, base_url: str, workflow: Workflow, token_key: str) -> str:
    """POST /api/v1/workflows/{id}/runs with the demo inputs: 202 with the run's run_url and events_url."""
    url = f"{base_url}/api/v1/workflows/{workflow.pk}/runs"
    return (
        f"curl -s -X POST {shlex.quote(url)} -H {shlex.quote(f'Authorization: Token {token_key}')} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(DEMO_WORKFLOW_INPUTS))}"
    )


def workflow_page_url(*, base_url: str, workflow: Workflow) -> str:
    """The workflow's status page: its graph, each step's readiness and a "run it" form."""
    return f"{base_url}/status/workflows/{workflow.pk}/"
