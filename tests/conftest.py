import pytest
from django.conf import settings
from django.core.cache import cache
from rest_framework.test import APIClient

from tests.factories import UserFactory

REDIS_AVAILABLE = settings.CACHES["default"]["BACKEND"].endswith("RedisCache")
POSTGRES_AVAILABLE = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "redis" in item.keywords and not REDIS_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason="Redis is not reachable (see the warning above)"))
        if "postgres" in item.keywords and not POSTGRES_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason="PostgreSQL is not reachable (see the warning above)"))


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


@pytest.fixture
def api(user) -> APIClient:
    """An API client signed in as ``user`` with a real hashed token."""
    from toolexec.models import ApiToken

    _, key = ApiToken.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    client.user = user
    return client


@pytest.fixture
def other_api(other_user) -> APIClient:
    from toolexec.models import ApiToken

    _, key = ApiToken.issue(user=other_user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    client.user = other_user
    return client


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
    from instances.services import instance_create

    def make(tool="json-transform", *, owner, name="test instance", workflow_id="workflow-1", config=None):
        return instance_create(owner=owner, tool=catalog(tool), name=name, workflow_id=workflow_id, config=config)

    return make
