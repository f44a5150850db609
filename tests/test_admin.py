"""The operator console (Django admin): every action through the test client, refusals and
permissions, secrets in no page, the index grouping and the queue dashboard's guard."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from credits.models import CreditAccount, CreditLedgerEntry
from credits.services import credit_account_for
from executions.models import Execution, Job
from executions.services.enqueue import execution_enqueue
from executions.services.sync import execution_run_sync
from instances.models import Credential, CredentialAuditEntry, ToolInstance
from instances.services.credentials import credential_create, instance_configure_credentials
from tests.factories import PASSWORD, UserFactory
from tools.models import ToolDefinition

pytestmark = [pytest.mark.postgres]

PLANTED = "PLANTED-s3cr3t-7f9d1c"  # a secret value that must never reach an admin page


def changelist(model: str) -> str:
    return reverse(f"admin:{model.replace('.', '_')}_changelist")


def change(model: str, pk: Any) -> str:
    return reverse(f"admin:{model.replace('.', '_')}_change", args=[pk])


def run_action(client: Client, model: str, action: str, pks: list[Any], **extra: Any) -> Any:
    data = {"action": action, "_selected_action": [str(pk) for pk in pks], **extra}
    return client.post(changelist(model), data, follow=True)


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


def staff(*perms: str):
    user = UserFactory(is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    client = Client()
    client.force_login(user)
    return user, client


@pytest.fixture
def planted(user) -> Credential:
    return credential_create(
        owner=user,
        provider="http",
        kind="bearer",
        label="Billing API",
        secret={"token": PLANTED},
        metadata={"note": "for invoices"},
    )


# --- Index and the queue dashboard --------------------------------------------------------------


def test_index_groups_models_by_what_operators_do(admin_client):
    response = admin_client.get(reverse("admin:index"))
    assert response.status_code == 200
    groups = [app["name"] for app in response.context["app_list"]]
    assert groups[:5] == ["Catalog", "Access", "Runs", "Workflows", "Billing"]
    names = {app["name"]: [m["object_name"] for m in app["models"]] for app in response.context["app_list"]}
    assert names["Catalog"] == ["ToolDefinition"]
    assert names["Access"][:3] == ["Credential", "CredentialAuditEntry", "ToolInstance"]
    assert {"ApiToken", "User", "Group"} <= set(names["Access"])
    assert names["Runs"] == ["Execution", "Job", "CacheEntry", "RQDashboard"]
    assert names["Workflows"] == ["Workflow", "WorkflowVersion", "WorkflowRun", "StepRun"]
    assert names["Billing"] == ["CreditAccount", "CreditLedgerEntry"]
    assert 'href="/admin/django-rq/"' in response.content.decode()


def test_queue_dashboard_is_for_superusers_only(admin_client, db):
    assert admin_client.get("/admin/django-rq/").status_code == 200
    _, client = staff("executions.view_job", "executions.change_job")
    index = client.get(reverse("admin:index")).content.decode()
    assert "/admin/django-rq/" not in index
    assert client.get("/admin/django-rq/").status_code == 403
    assert client.get("/admin/django-rq/queues/0/").status_code == 403
    # django-rq's own copy inside the admin (staff-only) is not mounted.
    assert client.get("/admin/django_rq/dashboard/").status_code == 404
    anonymous = Client().get("/admin/django-rq/")
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]


# --- Credentials ----------------------------------------------------------------------------------


def test_credential_created_through_the_form_is_sealed_fingerprinted_and_audited(admin_client, user, admin_user):
    response = admin_client.post(
        reverse("admin:instances_credential_add"),
        {
            "owner": user.pk,
            "provider": "http",
            "kind": "bearer",
            "label": "Payments",
            "new_secret": json.dumps({"token": PLANTED}),
            "expires_at_0": "",
            "expires_at_1": "",
            "metadata": "{}",
            "audit_entries-TOTAL_FORMS": "0",
            "audit_entries-INITIAL_FORMS": "0",
        },
        follow=True,
    )
    assert response.status_code == 200, response.content
    credential = Credential.objects.get(label="Payments")
    assert credential.reveal_secret() == {"token": PLANTED}
    assert credential.fingerprint and len(credential.fingerprint) == 12
    assert PLANTED not in response.content.decode()
    entry = CredentialAuditEntry.objects.get(credential=credential)
    assert (entry.action, entry.actor) == ("created", admin_user)
    assert "secret" in entry.fields and PLANTED not in json.dumps(entry.fields)
    page = admin_client.get(change("instances.credential", credential.pk)).content.decode()
    assert credential.fingerprint in page and PLANTED not in page


def test_a_refused_secret_is_not_echoed_back(admin_client, user):
    response = admin_client.post(
        reverse("admin:instances_credential_add"),
        {
            "owner": user.pk,
            "provider": "http",
            "kind": "bearer",
            "label": "Wrong shape",
            "new_secret": json.dumps({"password": PLANTED}),
            "metadata": "{}",
            "audit_entries-TOTAL_FORMS": "0",
            "audit_entries-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 200  # the form again, with the errors
    page = response.content.decode()
    assert "secret.token" in page and PLANTED not in page
    assert not Credential.objects.filter(label="Wrong shape").exists()


def test_a_planted_secret_appears_in_no_admin_page(admin_client, planted):
    # A change through the form: a new secret and a new label, so history and audit have entries.
    new_secret = "PLANTED-second-9a8b7c"
    response = admin_client.post(
        change("instances.credential", planted.pk),
        {
            "label": "Billing API v2",
            "new_secret": json.dumps({"token": new_secret}),
            "expires_at_0": "",
            "expires_at_1": "",
            "metadata": json.dumps({"note": "for invoices"}),
            "audit_entries-TOTAL_FORMS": "1",
            "audit_entries-INITIAL_FORMS": "1",
            "audit_entries-MIN_NUM_FORMS": "0",
            "audit_entries-MAX_NUM_FORMS": "1000",
            "audit_entries-0-id": str(planted.audit_entries.get().pk),
            "audit_entries-0-credential": str(planted.pk),
        },
        follow=True,
    )
    assert response.status_code == 200
    planted.refresh_from_db()
    assert planted.reveal_secret() == {"token": new_secret} and planted.label == "Billing API v2"
    assert list(planted.audit_entries.values_list("action", flat=True)) == ["updated", "created"]
    assert planted.audit_entries.first().fields == ["label", "secret"]
    pages = [
        changelist("instances.credential"),
        changelist("instances.credential") + "?q=Billing",
        change("instances.credential", planted.pk),
        reverse("admin:instances_credential_history", args=[planted.pk]),
        changelist("instances.credentialauditentry"),
        change("instances.credentialauditentry", planted.audit_entries.first().pk),
        reverse("admin:index"),
    ]
    for url in pages:
        page = admin_client.get(url)
        assert page.status_code == 200, url
        html = page.content.decode()
        assert PLANTED not in html and new_secret not in html, url
    history = LogEntry.objects.get(object_id=str(planted.pk))
    assert new_secret not in history.change_message and "secret" in history.get_change_message().lower()


def test_revoke_action_marks_the_credential_revoked_and_audits_it(admin_client, planted, admin_user):
    response = run_action(admin_client, "instances.credential", "revoke", [planted.pk])
    assert any("revoked" in m for m in messages_of(response))
    planted.refresh_from_db()
    assert planted.status == Credential.Status.REVOKED
    assert planted.audit_entries.filter(action="revoked", actor=admin_user).exists()
    again = run_action(admin_client, "instances.credential", "revoke", [planted.pk])
    assert any("already revoked" in m for m in messages_of(again))


def test_test_connection_of_an_http_credential_says_it_cannot_be_tested(admin_client, planted):
    response = run_action(admin_client, "instances.credential", "test_connection", [planted.pk])
    [message] = messages_of(response)
    assert "can't be tested" in message
    assert planted.audit_entries.filter(action="tested").exists()


def test_test_connection_of_a_google_credential_calls_userinfo(admin_client, user, httpserver, settings):
    settings.GOOGLE_OAUTH_USERINFO_URL = httpserver.url_for("/userinfo")
    google = credential_create(owner=user, provider="google", kind="oauth2", secret={"access_token": "good-token"})
    httpserver.expect_request("/userinfo", headers={"Authorization": "Bearer good-token"}).respond_with_json(
        {"email": "ada@example.com"}
    )
    response = run_action(admin_client, "instances.credential", "test_connection", [google.pk])
    assert messages_of(response) == [f"{google}: Google accepted the token for ada@example.com."]
    httpserver.clear()
    httpserver.expect_request("/userinfo").respond_with_json({"error": "invalid_token"}, status=401)
    response = run_action(admin_client, "instances.credential", "test_connection", [google.pk])
    assert "refused the token" in messages_of(response)[0]


def test_refresh_now_without_a_refresh_token_is_reported_not_raised(admin_client, user):
    google = credential_create(owner=user, provider="google", kind="oauth2", secret={"access_token": "t"})
    response = run_action(admin_client, "instances.credential", "refresh_now", [google.pk])
    assert response.status_code == 200
    assert "not refreshed" in messages_of(response)[0]


def test_reencrypt_reseals_with_the_newest_key(admin_client, planted, settings):
    old = settings.TOOLEXEC_ENCRYPTION_KEYS[0]
    new = Fernet.generate_key().decode()
    settings.TOOLEXEC_ENCRYPTION_KEYS = [new, old]
    response = run_action(admin_client, "instances.credential", "reencrypt", [planted.pk])
    assert messages_of(response) == ["Re-encrypted 1 credential."]
    settings.TOOLEXEC_ENCRYPTION_KEYS = [new]
    planted.refresh_from_db()
    assert planted.reveal_secret() == {"token": PLANTED}
    assert planted.audit_entries.filter(action="reencrypted").exists()


def test_expiring_within_7_days_filter(admin_client, user):
    soon = credential_create(
        owner=user,
        provider="http",
        kind="bearer",
        label="soon",
        secret={"token": "a"},
        expires_at=timezone.now() + timedelta(days=3),
    )
    credential_create(
        owner=user,
        provider="http",
        kind="bearer",
        label="later",
        secret={"token": "b"},
        expires_at=timezone.now() + timedelta(days=30),
    )
    response = admin_client.get(changelist("instances.credential") + "?expiry=7d")
    assert [c.pk for c in response.context["cl"].result_list] == [soon.pk]


def test_deleting_a_credential_in_use_is_refused_with_the_instances(admin_client, user, make_instance, catalog):
    credential = credential_create(owner=user, provider="google", kind="oauth2", secret={"access_token": "t"})
    instance = make_instance("test-google-sheet", owner=user, name="Sheets")
    instance_configure_credentials(instance=instance, mappings={"OAUTH_TOKEN": str(credential.pk)})
    url = reverse("admin:instances_credential_delete", args=[credential.pk])
    response = admin_client.post(url, {"post": "yes"}, follow=True)
    assert any("Sheets" in m for m in messages_of(response))
    assert Credential.objects.filter(pk=credential.pk).exists()


def test_staff_without_credential_permission_sees_no_credentials_and_runs_no_action(planted):
    _, client = staff("instances.view_toolinstance")
    assert client.get(changelist("instances.credential")).status_code == 403
    assert client.get(change("instances.credential", planted.pk)).status_code == 403
    assert run_action(client, "instances.credential", "revoke", [planted.pk]).status_code == 403
    planted.refresh_from_db()
    assert planted.status == Credential.Status.ACTIVE
    index = client.get(reverse("admin:index")).content.decode()
    assert "Credentials" not in index


def test_staff_who_may_only_view_credentials_cannot_run_their_actions(planted):
    _, client = staff("instances.view_credential")
    page = client.get(changelist("instances.credential"))
    assert page.status_code == 200 and planted.fingerprint in page.content.decode()
    response = run_action(client, "instances.credential", "revoke", [planted.pk])
    assert response.status_code == 200
    planted.refresh_from_db()
    assert planted.status == Credential.Status.ACTIVE


def test_credential_changes_through_the_api_are_audited_with_their_actor(api, user):
    created = api.post(
        "/api/v1/credentials/",
        {"provider": "http", "kind": "bearer", "label": "x", "secret": {"token": PLANTED}},
        format="json",
    )
    assert created.status_code == 201
    credential_id = created.json()["id"]
    api.patch(f"/api/v1/credentials/{credential_id}/", {"label": "y"}, format="json")
    entries = CredentialAuditEntry.objects.filter(credential_ref=credential_id).order_by("created_at", "id")
    assert [(e.action, e.actor_id, e.fields) for e in entries][1] == ("updated", user.pk, ["label"])
    assert entries[0].action == "created" and entries[0].actor_id == user.pk
    assert api.delete(f"/api/v1/credentials/{credential_id}/").status_code == 204
    deleted = CredentialAuditEntry.objects.get(credential_ref=credential_id, action="deleted")
    assert deleted.credential is None and deleted.actor_id == user.pk


# --- Instances ------------------------------------------------------------------------------------


def test_disable_and_activate_instances_with_refusals_reported_per_row(admin_client, user, make_instance):
    active = make_instance("test-noop", owner=user, name="Active one")
    draft = make_instance("test-google-sheet", owner=user, name="Draft one")
    assert draft.status == ToolInstance.Status.DRAFT
    response = run_action(admin_client, "instances.toolinstance", "disable", [active.pk])
    assert messages_of(response) == ["Active one: disabled."]
    active.refresh_from_db()
    assert active.status == ToolInstance.Status.DISABLED

    response = run_action(admin_client, "instances.toolinstance", "disable", [active.pk])
    assert messages_of(response) == ["Active one: This instance is already disabled."]

    response = run_action(admin_client, "instances.toolinstance", "activate", [active.pk, draft.pk])
    assert response.status_code == 200
    got = sorted(messages_of(response))
    assert got[0] == "Active one: activated."
    assert got[1].startswith("Draft one: This instance cannot be activated until its credentials are mapped")
    draft.refresh_from_db()
    assert draft.status == ToolInstance.Status.DRAFT


def test_instance_list_shows_readiness_and_statistics(admin_client, user, make_instance):
    make_instance("test-noop", owner=user, name="Ready one")
    make_instance("test-google-sheet", owner=user, name="Needs Google")
    page = admin_client.get(changelist("instances.toolinstance")).content.decode()
    assert "●&nbsp;ready" in page
    assert "CREDENTIAL_MISSING" in page or "INSTANCE_DRAFT" in page


def test_instance_page_shows_checklist_mappings_and_statistics(admin_client, user, make_instance):
    credential = credential_create(
        owner=user, provider="google", kind="oauth2", label="Ada's Google", secret={"access_token": PLANTED}
    )
    instance = make_instance("test-google-sheet", owner=user, name="Sheets <script>")
    instance_configure_credentials(instance=instance, mappings={"OAUTH_TOKEN": "google"})
    page = admin_client.get(change("instances.toolinstance", instance.pk)).content.decode()
    assert "Ready to run." in page
    assert "credential:OAUTH_TOKEN" in page
    assert "Ada&#x27;s Google" in page and credential.fingerprint in page
    assert "failure rate" in page
    assert "Sheets &lt;script&gt;" in page
    assert PLANTED not in page


def test_a_not_ready_instance_lists_action_items(admin_client, user, make_instance):
    instance = make_instance("test-google-sheet", owner=user, name="Needs Google")
    page = admin_client.get(change("instances.toolinstance", instance.pk)).content.decode()
    assert "Not ready." in page
    assert f"/api/v1/instances/{instance.pk}/configure-credentials</a>" in page


def test_staff_without_change_permission_cannot_disable_instances(user, make_instance):
    instance = make_instance("test-noop", owner=user)
    _, client = staff("instances.view_toolinstance")
    response = run_action(client, "instances.toolinstance", "disable", [instance.pk])
    assert response.status_code == 200
    instance.refresh_from_db()
    assert instance.status == ToolInstance.Status.ACTIVE


# --- Tool definitions ---------------------------------------------------------------------------


def test_sync_catalog_button_syncs_and_reports(admin_client, catalog):
    page = admin_client.get(changelist("tools.tooldefinition")).content.decode()
    assert "Sync catalog" in page
    ToolDefinition.objects.create(slug="gone-tool", name="Gone", implementation="nowhere.Gone")
    response = admin_client.post(reverse("admin:tools_tooldefinition_sync"), follow=True)
    got = messages_of(response)
    assert got[0].startswith("Catalog synced:")
    assert any(m.startswith("gone-tool is unavailable:") for m in got)
    gone = ToolDefinition.objects.get(slug="gone-tool")
    assert not gone.is_available
    listing = admin_client.get(changelist("tools.tooldefinition")).content.decode()
    assert "unavailable" in listing and "nowhere.Gone" in listing


def test_sync_catalog_needs_post_and_the_change_permission(catalog):
    _, client = staff("tools.view_tooldefinition")
    assert "Sync catalog" not in client.get(changelist("tools.tooldefinition")).content.decode()
    assert client.post(reverse("admin:tools_tooldefinition_sync")).status_code == 403
    admin = Client()
    admin.force_login(UserFactory(is_staff=True, is_superuser=True))
    assert admin.get(reverse("admin:tools_tooldefinition_sync")).status_code == 405


def test_activate_and_deactivate_tools(admin_client, catalog):
    noop = catalog("test-noop")
    response = run_action(admin_client, "tools.tooldefinition", "deactivate", [noop.pk])
    assert messages_of(response) == ["1 tool switched off."]
    noop.refresh_from_db()
    assert not noop.is_active
    run_action(admin_client, "tools.tooldefinition", "activate", [noop.pk])
    noop.refresh_from_db()
    assert noop.is_active


# --- Executions ------------------------------------------------------------------------------------


def test_execution_page_shows_redacted_json_links_and_action_items(admin_client, user, make_instance):
    instance = make_instance("test-noop", owner=user, name="Echo")
    execution = Execution.objects.create(
        instance=instance,
        tool=instance.tool,
        owner=user,
        mode="SYNC",
        status="FAILED",
        input_data={"echo": "hello <b>", "password": PLANTED},
        output_data={"rows": [1, 2]},
        error_code="CREDENTIAL_EXPIRED",
        error_message="Your access expired.",
        error_metadata={
            "action_items": [
                {"action": "fix_credential", "message": "Reconnect", "url": "https://x.example/re", "priority": "high"}
            ]
        },
    )
    page = admin_client.get(change("executions.execution", execution.pk)).content.decode()
    assert PLANTED not in page
    assert "&quot;echo&quot;: &quot;hello &lt;b&gt;&quot;" in page
    assert '<a href="https://x.example/re">' in page
    assert change("instances.toolinstance", instance.pk) in page
    assert "Change" not in re.findall(r'<input type="submit"[^>]*>', page).__str__()


def test_executions_are_read_only(admin_client, user, make_instance):
    instance = make_instance("test-noop", owner=user)
    execution = Execution.objects.create(instance=instance, tool=instance.tool, owner=user, mode="SYNC")
    assert admin_client.post(change("executions.execution", execution.pk), {}).status_code == 403
    page = admin_client.get(changelist("executions.execution") + "?status__exact=PENDING&mode__exact=SYNC")
    assert page.status_code == 200 and str(execution.pk) in page.content.decode()


# --- Jobs --------------------------------------------------------------------------------------


def enqueue(instance: ToolInstance, inputs: dict[str, Any], capture: Any) -> Job:
    instance = ToolInstance.objects.select_related("tool", "owner__credit_account").get(pk=instance.pk)
    with capture(execute=True):
        accepted = execution_enqueue(instance=instance, inputs=inputs)
    return accepted.job


@pytest.mark.redis
def test_cancel_a_queued_job_and_refuse_cancelling_it_again(
    admin_client, user, make_instance, django_capture_on_commit_callbacks
):
    job = enqueue(make_instance("test-slow", owner=user), {"seconds": 30}, django_capture_on_commit_callbacks)
    listing = admin_client.get(changelist("executions.job")).content.decode()
    assert '<progress value="0" max="100"' in listing and ">queued<" in listing
    response = run_action(admin_client, "executions.job", "cancel", [job.pk])
    assert messages_of(response) == [f"Job {job.pk}: cancelled."]
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED
    assert ">canceled<" in admin_client.get(changelist("executions.job")).content.decode()
    again = run_action(admin_client, "executions.job", "cancel", [job.pk])
    assert "already ended (CANCELLED)" in messages_of(again)[0]


@pytest.mark.redis
def test_retry_a_cancelled_job_as_a_new_run_and_refuse_retrying_a_queued_one(
    admin_client, user, make_instance, django_capture_on_commit_callbacks
):
    job = enqueue(make_instance("test-slow", owner=user), {"seconds": 7}, django_capture_on_commit_callbacks)
    run_action(admin_client, "executions.job", "cancel", [job.pk])
    with django_capture_on_commit_callbacks(execute=True):
        response = run_action(admin_client, "executions.job", "retry", [job.pk])
    [message] = messages_of(response)
    new = Job.objects.exclude(pk=job.pk).get()
    assert message == f"Job {job.pk}: retried as job {new.pk}."
    assert new.status == Job.Status.QUEUED and new.execution_id != job.execution_id
    assert new.execution.input_data == {"seconds": 7}
    refused = run_action(admin_client, "executions.job", "retry", [new.pk])
    assert "Only a failed, cancelled or timed-out job can be retried" in messages_of(refused)[0]
    run_action(admin_client, "executions.job", "cancel", [new.pk])  # leave nothing queued


@pytest.mark.redis
def test_staff_without_change_job_permission_cannot_cancel(user, make_instance, django_capture_on_commit_callbacks):
    job = enqueue(make_instance("test-slow", owner=user), {"seconds": 30}, django_capture_on_commit_callbacks)
    _, client = staff("executions.view_job")
    page = client.get(changelist("executions.job"))
    assert page.status_code == 200
    run_action(client, "executions.job", "cancel", [job.pk])
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED
    _, operator = staff("executions.view_job", "executions.change_job")
    run_action(operator, "executions.job", "cancel", [job.pk])
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED


# --- Credits -------------------------------------------------------------------------------------


def test_adjust_balance_asks_for_amount_and_reason_then_writes_the_ledger(admin_client, user, admin_user):
    account = credit_account_for(owner=user)
    before = account.balance
    form = run_action(admin_client, "credits.creditaccount", "adjust_balance", [account.pk])
    assert form.status_code == 200 and "Adjust balance" in form.content.decode()
    assert 'name="reason"' in form.content.decode()
    missing = run_action(
        admin_client, "credits.creditaccount", "adjust_balance", [account.pk], apply="1", amount="5", reason=""
    )
    assert "This field is required." in missing.content.decode()
    done = run_action(
        admin_client,
        "credits.creditaccount",
        "adjust_balance",
        [account.pk],
        apply="1",
        amount="-2.5",
        reason="refund reversed",
    )
    assert messages_of(done) == [f"{user}: balance adjusted by -2.5."]
    account.refresh_from_db()
    assert account.balance == before - Decimal("2.5")
    entry = CreditLedgerEntry.objects.get(account=account)
    assert (entry.kind, entry.amount, entry.reason, entry.created_by) == (
        "ADJUSTMENT",
        Decimal("-2.5"),
        "refund reversed",
        admin_user,
    )
    page = admin_client.get(change("credits.creditaccount", account.pk)).content.decode()
    assert "refund reversed" in page and "Manual adjustment" in page


def test_staff_who_may_only_view_accounts_cannot_adjust(user):
    account = credit_account_for(owner=user)
    _, client = staff("credits.view_creditaccount")
    run_action(client, "credits.creditaccount", "adjust_balance", [account.pk], apply="1", amount="50", reason="x")
    assert CreditAccount.objects.get(pk=account.pk).balance == account.balance
    assert not CreditLedgerEntry.objects.exists()


def test_a_runs_ledger_line_links_to_the_run_on_the_account_page_and_in_the_ledger(admin_client, user, make_instance):
    instance = make_instance("json-transform", owner=user)
    execution, _ = execution_run_sync(instance=instance, inputs={"expression": "a", "data": {"a": 1}})
    entry = CreditLedgerEntry.objects.get(execution=execution)
    assert execution.ledger_entry == entry and entry.execution == execution

    account_page = admin_client.get(change("credits.creditaccount", entry.account_id)).content.decode()
    assert f'href="{change("executions.execution", execution.pk)}"' in account_page
    ledger = admin_client.get(changelist("credits.creditledgerentry"))
    assert ledger.status_code == 200 and str(execution) in ledger.content.decode()


def test_console_login_page_works(db):
    user = UserFactory(is_staff=True)
    client = Client()
    response = client.post(reverse("admin:login"), {"username": user.username, "password": PASSWORD}, follow=True)
    assert response.status_code == 200 and response.context["user"] == user


def test_refresh_now_renews_an_oauth_token_and_test_connection_refreshes_an_expired_one_first(
    admin_client, admin_user, api, httpserver, settings
):
    from tests.test_google_drive import connect_google, fake_google

    google = fake_google(httpserver, settings)

    class EveryIssuedToken(dict):  # the stand-in's userinfo knows every token it issued
        def get(self, token: str, default: Any = None) -> Any:
            return "ada@example.com" if token in google.access_tokens else default

    google.userinfo = EveryIssuedToken()
    credential = connect_google(api, google, expires_in=timedelta(hours=1))
    seen = credential.fingerprint
    response = run_action(admin_client, "instances.credential", "refresh_now", [credential.pk])
    assert messages_of(response) == [f"{credential}: refreshed."]
    credential.refresh_from_db()
    assert credential.fingerprint != seen
    assert credential.audit_entries.filter(action="refreshed", actor=admin_user).exists()

    expired = connect_google(api, google, expires_in=timedelta(seconds=-60))
    before = expired.fingerprint
    response = run_action(admin_client, "instances.credential", "test_connection", [expired.pk])
    assert messages_of(response) == [f"{expired}: Google accepted the token for ada@example.com."]
    expired.refresh_from_db()
    assert expired.fingerprint != before and expired.expires_at > timezone.now()


def test_instance_config_is_checked_against_the_tool_before_saving(admin_client, user, make_instance):
    instance = make_instance("test-priced", owner=user, name="Priced")
    url = change("instances.toolinstance", instance.pk)
    form = {"name": "Priced", "workflow_id": "wf", "config": json.dumps({"units": "many"})}
    response = admin_client.post(url, form)
    assert response.status_code == 200 and "config.units" in response.content.decode()
    instance.refresh_from_db()
    assert instance.config == {} and instance.workflow_id == "workflow-1"
    response = admin_client.post(url, {**form, "config": json.dumps({"units": 2})}, follow=True)
    assert response.status_code == 200
    instance.refresh_from_db()
    assert (instance.config, instance.workflow_id) == ({"units": 2}, "wf")
