import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.conf import settings
from django.core.cache import cache
from pytest_httpserver import HTTPServer
from rest_framework.test import APIClient
from rq import Worker

from tests.browser import BROWSER_AVAILABLE
from tests.factories import UserFactory

ROOT = Path(__file__).resolve().parent.parent
REDIS_AVAILABLE = settings.CACHES["default"]["BACKEND"].endswith("RedisCache")
POSTGRES_AVAILABLE = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "redis" in item.keywords and not REDIS_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason="Redis is not reachable (see the warning above)"))
        if "postgres" in item.keywords and not POSTGRES_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason="PostgreSQL is not reachable (see the warning above)"))
        if "browser" in item.keywords and not BROWSER_AVAILABLE:
            # Under CI=true `make test` stops before pytest when it cannot install them.
            item.add_marker(pytest.mark.skip(reason="Chromium is not installed (see `make test`'s message)"))


@pytest.fixture(scope="session", autouse=True)
def _progress_writer_stopped(django_db_setup: Any) -> Iterator[None]:
    """Tests run jobs in this process too: the progress writer's session (it keeps one) is
    closed before pytest-django drops the test database."""
    yield
    from executions.services.jobs import PROGRESS_WRITER

    PROGRESS_WRITER.stop()


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Throttle counters and cached values never leak from one test into the next."""
    cache.clear()


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def other_user(db):
    return UserFactory()


def token_client(user) -> APIClient:
    """An API client signed in as ``user`` with a real (hashed) API token."""
    from core.models import ApiToken

    _, key = ApiToken.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    client.user = user
    return client


@pytest.fixture
def api(user) -> APIClient:
    return token_client(user)


@pytest.fixture
def other_api(other_user) -> APIClient:
    return token_client(other_user)


@pytest.fixture
def catalog(db):
    """Registers the test tools of tests/tools.py and syncs the catalog; unregisters after.

    Returns a function giving the ToolDefinition of a tool class or slug.
    """
    from tests.tools import ALL_TEST_TOOLS
    from tools import registry
    from tools.models import ToolDefinition
    from tools.services import catalog_sync

    for tool in ALL_TEST_TOOLS:
        registry.register(tool)
    catalog_sync()

    def definition(tool) -> ToolDefinition:
        slug = tool if isinstance(tool, str) else tool.slug
        return ToolDefinition.objects.get(slug=slug)

    yield definition
    for tool in ALL_TEST_TOOLS:
        registry.unregister(tool.slug)


@pytest.fixture
def make_instance(catalog):
    """Creates an instance of a tool (class or slug) through the service, as the API does."""
    from instances.services.instances import instance_create

    def make(tool="json-transform", *, owner, name="test instance", workflow_id="workflow-1", config=None):
        return instance_create(owner=owner, tool=catalog(tool), name=name, workflow_id=workflow_id, config=config)

    return make


class WorkerProcess:
    """A `manage.py toolexec_worker` subprocess on the test database: the supervisor, with its
    job process (one unless told otherwise) and its scheduler process."""

    def __init__(self, process: "subprocess.Popen[bytes]", log_path: str) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        """Child pids (the job processes and the scheduler)."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def job_processes(self) -> dict[int, str | None]:
        """{pid: the RQ job id it runs, or None} of the supervisor's job processes, as RQ's
        worker registry has them."""
        children = set(self.children())
        workers = Worker.all(connection=django_rq.get_connection("default"))
        return {w.pid: w.get_current_job_id() for w in workers if w.pid in children}

    def running_job(self) -> int | None:
        """The pid of the job process that runs a job now, if any."""
        return next((pid for pid, job in self.job_processes().items() if job), None)

    def log(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for child in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@pytest.fixture
def rq_worker(transactional_db, tmp_path):
    """Starts real worker processes: ``rq_worker()`` returns a running WorkerProcess. Tests
    using it must commit their data (``django_db(transaction=True)``). All are stopped after."""
    from django.db import connection

    started: list[WorkerProcess] = []
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": _database_url(connection.settings_dict),
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": settings.SECRET_KEY,
        "TOOLEXEC_ENCRYPTION_KEYS": ",".join(settings.TOOLEXEC_ENCRYPTION_KEYS),
        "TOOLEXEC_JOB_HEARTBEAT_SECONDS": str(settings.TOOLEXEC_JOB_HEARTBEAT_SECONDS),
        "TOOLEXEC_JOB_STALE_SECONDS": str(settings.TOOLEXEC_JOB_STALE_SECONDS),
        "PYTHONUNBUFFERED": "1",
    }

    def start(*extra: str, **extra_env: str) -> WorkerProcess:
        log_path = str(tmp_path / f"worker-{len(started)}.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.run_worker", "default", "--processes", "1", *extra],
                cwd=str(ROOT),
                env={**env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(process, log_path)
        started.append(worker)
        deadline = time.monotonic() + 30
        while "Listening on" not in worker.log() and "cleaning registries" not in worker.log():
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited early:\n{worker.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{worker.log()}")
            time.sleep(0.1)
        return worker

    yield start
    for worker in started:
        worker.stop()


def _database_url(db: dict) -> str:
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextlib.contextmanager
def web_server(command: list[str], *, port: int, env: dict[str, str], log_path: Path) -> Iterator[int]:
    """Run a web server process (``command``, listening on ``port``) until the block ends: it
    has answered the API's root once it is yielded; stopped with SIGINT, killed if it lingers."""
    import urllib.error
    import urllib.request

    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def answers() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the web server exited:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # 401 without a login: it is up
        except OSError:
            return False
        return True

    try:
        wait_for(answers, timeout=30, message="the web server to answer")
        yield port
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(predicate, *, timeout: float = 30, interval: float = 0.1, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def _upstream() -> Iterator[HTTPServer]:
    server = HTTPServer(host="localhost", port=0)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture
def upstream(_upstream: HTTPServer, settings: Any) -> HTTPServer:
    """A real local HTTP server for a test's upstream (an API a tool calls), on the hosts the
    http-request tool may reach; cleared of the previous test's expectations."""
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["localhost"]
    _upstream.clear()
    return _upstream
