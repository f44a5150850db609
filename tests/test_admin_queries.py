"""Every admin changelist loads in a constant number of queries, whatever its length: the
same budget holds for 3 rows and for 50 (DESIGN.md: no N+1 in admin changelists)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from itertools import count

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from core.models import ApiToken
from credits.models import CreditLedgerEntry
from credits.services import credit_account_for
from executions.models import CacheEntry, Execution, Job
from instances.models import UploadedFile
from instances.services.credentials import credential_create, instance_configure_credentials
from instances.services.instances import instance_create
from tests.factories import UserFactory
from tools.models import ToolDefinition

pytestmark = [pytest.mark.postgres]

serial = count()

# The most queries each changelist may take (session, user, the page, its count (the record
# tables first read PostgreSQL's estimate), the filters' choices): the same for 3 rows and for 50.
BUDGETS = {
    "tools_tooldefinition": 6,
    "instances_credential": 5,
    "instances_credentialauditentry": 6,
    "instances_toolinstance": 6,
    "instances_uploadedfile": 7,
    "credits_creditaccount": 4,
    "core_apitoken": 5,
    "auth_user": 6,
    "auth_group": 5,
    "executions_execution": 7,
    "executions_job": 5,
    "credits_creditledgerentry": 5,
    "executions_cacheentry": 6,
}


def make_tool_definitions(n: int, catalog: Callable) -> None:
    for _ in range(n):
        i = next(serial)
        ToolDefinition.objects.create(slug=f"gone-{i}", name=f"Gone {i}", implementation=f"nowhere.Gone{i}")


def make_credentials(n: int, catalog: Callable) -> None:
    for _ in range(n):
        credential_create(owner=UserFactory(), provider="http", kind="bearer", secret={"token": "t"}, label="x")


def make_instances(n: int, catalog: Callable) -> None:
    for _ in range(n):
        owner = UserFactory()
        if next(serial) % 2:
            instance_create(owner=owner, tool=catalog("test-noop"), name="noop")
        else:
            credential_create(owner=owner, provider="google", kind="oauth2", secret={"access_token": "a"})
            pinned = credential_create(owner=owner, provider="google", kind="oauth2", secret={"access_token": "b"})
            instance = instance_create(owner=owner, tool=catalog("test-google-sheet"), name="sheet")
            instance_configure_credentials(
                instance=instance, mappings={"OAUTH_TOKEN": "google" if next(serial) % 2 else str(pinned.pk)}
            )


def make_uploads(n: int, catalog: Callable) -> None:
    for _ in range(n):
        UploadedFile.objects.create(owner=UserFactory(), name="a.csv", size_bytes=1, sha256="0" * 64, file="x")


def make_accounts(n: int, catalog: Callable) -> None:
    for _ in range(n):
        credit_account_for(owner=UserFactory())


def make_tokens(n: int, catalog: Callable) -> None:
    for _ in range(n):
        ApiToken.issue(user=UserFactory())


def make_users(n: int, catalog: Callable) -> None:
    UserFactory.create_batch(n)


def make_groups(n: int, catalog: Callable) -> None:
    for _ in range(n):
        Group.objects.create(name=f"group {next(serial)}")


def _execution(catalog: Callable, mode: str = "SYNC") -> Execution:
    owner = UserFactory()
    instance = instance_create(owner=owner, tool=catalog("test-noop"), name="noop")
    return Execution.objects.create(instance=instance, tool=instance.tool, owner=owner, mode=mode, status="FAILED")


def make_executions(n: int, catalog: Callable) -> None:
    for _ in range(n):
        _execution(catalog)


def make_jobs(n: int, catalog: Callable) -> None:
    for _ in range(n):
        execution = _execution(catalog, mode="ASYNC")
        Job.objects.create(
            execution=execution,
            instance=execution.instance,
            owner=execution.owner,
            rq_job_id=f"no-such-rq-job-{next(serial)}",
            status="FAILED",
            progress=40,
        )


def make_ledger(n: int, catalog: Callable) -> None:
    for _ in range(n):
        execution = _execution(catalog)
        account = credit_account_for(owner=execution.owner)
        entry = CreditLedgerEntry.objects.create(
            account=account, kind="EXECUTION", amount=Decimal("-1"), created_by=execution.owner
        )
        Execution.objects.filter(pk=execution.pk).update(ledger_entry=entry)


def make_cache_entries(n: int, catalog: Callable) -> None:
    for _ in range(n):
        execution = _execution(catalog)
        now = timezone.now()
        CacheEntry.objects.create(
            key=f"{next(serial):064d}",
            owner=execution.owner,
            instance=execution.instance,
            tool=execution.tool,
            tool_version="1.0.0+test",
            **dict.fromkeys(["request_hash", "version_hash", "config_hash", "credentials_hash"], "0" * 64),
            source_execution=execution,
            output={"rows": list(range(100))},
            size_bytes=300,
            expires_at=now + timedelta(minutes=5),
        )


CASES = {
    "tools_tooldefinition": make_tool_definitions,
    "instances_credential": make_credentials,
    "instances_credentialauditentry": make_credentials,
    "instances_toolinstance": make_instances,
    "instances_uploadedfile": make_uploads,
    "credits_creditaccount": make_accounts,
    "core_apitoken": make_tokens,
    "auth_user": make_users,
    "auth_group": make_groups,
    "executions_execution": make_executions,
    "executions_job": make_jobs,
    "credits_creditledgerentry": make_ledger,
    "executions_cacheentry": make_cache_entries,
}


@pytest.mark.redis
@pytest.mark.parametrize("changelist", sorted(CASES))
def test_changelist_queries_do_not_grow_with_its_rows(changelist, admin_client, catalog, django_assert_max_num_queries):
    url = reverse(f"admin:{changelist}_changelist")
    make = CASES[changelist]
    make(3, catalog)
    counts = []
    for more in (0, 47):
        make(more, catalog)
        with django_assert_max_num_queries(BUDGETS[changelist]):
            with CaptureQueriesContext(connection) as queries:
                response = admin_client.get(url)
        assert response.status_code == 200
        assert len(response.context["cl"].result_list) >= 3 + more
        counts.append(len(queries))
    print(f"{changelist}: {counts[0]} queries with 3 rows, {counts[1]} with 50")
    assert counts[0] == counts[1]


@pytest.mark.redis
def test_job_changelist_lists_the_settings_queues_without_reading_every_job(admin_client, catalog):
    """The queue filter's choices come from RQ_QUEUES, not from a DISTINCT over the jobs table."""
    make_jobs(2, catalog)
    Job.objects.filter(pk=Job.objects.first().pk).update(queue="elsewhere")
    url = reverse("admin:executions_job_changelist")

    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(url)
    on_default = admin_client.get(url + "?queue=default")

    assert not [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]
    assert "?queue=default" in page.content.decode()
    assert [job.queue for job in on_default.context["cl"].result_list] == ["default"]


@pytest.mark.redis
@pytest.mark.parametrize("status", ["PENDING", "RUNNING"])
def test_execution_changelist_finds_runs_not_yet_ended_through_their_own_index(status, admin_client, catalog):
    """Filtering executions by PENDING or RUNNING, a few rows among millions, reads the partial
    index of runs not yet ended, for the page and for its exact count alike: without it the only
    indexes that hold the status lead with the owner, and both statements read all of one."""
    make_executions(6, catalog)
    Execution.objects.filter(pk__in=Execution.objects.values("pk")[:2]).update(status=status)

    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(reverse("admin:executions_execution_changelist"), {"status__exact": status})

    assert [execution.status for execution in page.context["cl"].result_list] == [status, status]
    statements = [q["sql"] for q in queries.captured_queries if f"= '{status}'" in q["sql"]]
    assert len(statements) == 2, statements  # the count, the page
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # a table of six rows is read whole otherwise
        for sql in statements:
            cursor.execute(f"EXPLAIN {sql}")
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "execution_unfinished_idx" in plan, plan
