"""`manage.py seed_demo`: the logins, token and runnable instance that `make run` prints."""

import json
import shlex
from io import StringIO
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from instances.models import ToolInstance
from instances.services.instances import instance_transition


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
        elif line.strip().startswith("curl "):
            printed["curl"] = line.strip()
    assert printed.keys() == {"admin_password", "demo_password", "token", "curl"}, out.getvalue()
    return printed


def token_client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def post_like_curl(curl: str) -> dict:
    """Sends the request the printed curl line describes, after the shell's word splitting."""
    words = shlex.split(curl)
    url = next(word for word in words if word.startswith("http"))
    headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
    body = words[words.index("-d") + 1]
    client = token_client(headers["Authorization"].removeprefix("Token "))
    response = client.post(urlsplit(url).path, body, content_type=headers["Content-Type"])
    assert response.status_code == 200, response.content
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
        assert ToolInstance.objects.filter(owner__username="demo").count() == 1
        assert first["admin_password"] != second["admin_password"]
        assert first["demo_password"] != second["demo_password"]
        assert users.get(username="demo").check_password(second["demo_password"])
        # The previous "make run" token is replaced, not piled up.
        assert token_client(first["token"]).get("/api/v1/tools/").status_code == 401
        assert post_like_curl(second["curl"])["success"] is True

    def test_a_disabled_demo_instance_is_reactivated(self) -> None:
        seed_demo()
        instance = ToolInstance.objects.get(owner__username="demo")
        instance_transition(instance=instance, to=ToolInstance.Status.DISABLED)

        printed = seed_demo()

        instance.refresh_from_db()
        assert instance.status == ToolInstance.Status.ACTIVE
        assert post_like_curl(printed["curl"])["success"] is True

    def test_an_existing_user_named_admin_becomes_a_superuser(self) -> None:
        get_user_model().objects.create_user(username="admin", password="chosen by someone")

        printed = seed_demo()

        admin = get_user_model().objects.get(username="admin")
        assert admin.is_superuser and admin.check_password(printed["admin_password"])


def test_refuses_to_reset_passwords_without_debug(settings, catalog) -> None:
    settings.DEBUG = False

    with pytest.raises(CommandError, match="DEBUG=true"):
        call_command("seed_demo", stdout=StringIO())

    assert not get_user_model().objects.filter(username__in=["admin", "demo"]).exists()
