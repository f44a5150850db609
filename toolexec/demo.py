"""Demo data for `make run`: a superuser, a demo user with an API token, and a runnable instance.

Safe to run repeatedly: the users, the instance and one "make run" token are reused or
replaced, and both users get a fresh random password each time (none is kept in the repo).
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

ADMIN_USERNAME = "admin"
DEMO_USERNAME = "demo"
TOKEN_NAME = "make run"
DEMO_TOOL_SLUG = "json-transform"
DEMO_INSTANCE_NAME = "Demo JSON transform"
DEMO_INPUTS: dict[str, Any] = {
    "expression": "people[?age > `30`].name",
    "data": {"people": [{"name": "Ada", "age": 36}, {"name": "Alan", "age": 41}, {"name": "Grace", "age": 29}]},
}


@dataclass(frozen=True)
class DemoSeed:
    admin_password: str
    demo_password: str
    token_key: str
    instance: ToolInstance


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


def _demo_instance(owner: AbstractBaseUser) -> ToolInstance:
    tool = ToolDefinition.objects.filter(slug=DEMO_TOOL_SLUG).first()
    if tool is None:
        raise LookupError(f"The {DEMO_TOOL_SLUG} tool is not in the catalog: run `manage.py sync_tools` first.")
    instance = (
        ToolInstance.objects.filter(owner=owner, tool=tool, name=DEMO_INSTANCE_NAME).order_by("created_at").first()
    )
    if instance is None:
        return instance_create(owner=owner, tool=tool, name=DEMO_INSTANCE_NAME, workflow_id="demo")
    if instance.status != ToolInstance.Status.ACTIVE:
        # Someone disabled it while trying things out; the printed curl line should still work.
        instance_transition(instance=instance, to=ToolInstance.Status.ACTIVE, reason="Reactivated by seed_demo.")
    return instance


@transaction.atomic
def demo_seed() -> DemoSeed:
    _, admin_password = _user_with_fresh_password(ADMIN_USERNAME, superuser=True)
    demo, demo_password = _user_with_fresh_password(DEMO_USERNAME, superuser=False)
    # One live "make run" token: the one printed last; earlier ones stop working.
    ApiToken.objects.filter(user=demo, name=TOKEN_NAME).delete()
    _, token_key = ApiToken.issue(user=demo, name=TOKEN_NAME)
    return DemoSeed(admin_password, demo_password, token_key, _demo_instance(demo))


def curl_execute_sync(*, base_url: str, instance: ToolInstance, token_key: str) -> str:
    url = f"{base_url}/api/v1/instances/{instance.pk}/execute-sync"
    return (
        f"curl -s -X POST {shlex.quote(url)} -H {shlex.quote(f'Authorization: Token {token_key}')} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(DEMO_INPUTS))}"
    )
