"""The operator console in a real browser (headless Chromium through Selenium): sign in,
create a credential through the form and see it fingerprinted, disable an instance with the
action, cancel a running job (on a real worker) and see it CANCELLED.

Every step saves a screenshot under the test's temporary folder and prints its path, so a
failing test shows where to look.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from executions.models import Job
from executions.services.enqueue import execution_enqueue
from instances.models import Credential, ToolInstance
from tests.browser import chromium
from tests.conftest import wait_for
from tests.factories import PASSWORD, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


class Console:
    """Chromium on the live server's admin, saving a screenshot at every step."""

    def __init__(self, driver: webdriver.Chrome, base_url: str, folder: Path) -> None:
        self.driver, self.base_url, self.folder = driver, base_url, folder
        self.shots: list[Path] = []

    def get(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def find(self, css: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self) -> str:
        return self.find("body").text

    def wait_text(self, words: str, timeout: float = 10) -> None:
        # The page may be replaced while it is read (an action's redirect): read it again then.
        WebDriverWait(
            self.driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
        ).until(lambda d: words in d.find_element(By.CSS_SELECTOR, "body").text, f"{words!r} on the page")

    def shot(self, name: str) -> Path:
        path = self.folder / f"{len(self.shots):02d}-{name}.png"
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, max(800, min(int(height), 4000)))
        self.driver.save_screenshot(str(path))
        self.shots.append(path)
        print(f"screenshot: {path}")
        return path

    def login(self, username: str) -> None:
        self.get("/admin/")
        self.find("#id_username").send_keys(username)
        self.find("#id_password").send_keys(PASSWORD)
        self.shot("login")
        self.find("#login-form [type=submit]").click()
        self.wait_text("CATALOG")

    def run_action(self, action: str, row_value: str) -> None:
        self.find(f"input.action-select[value='{row_value}']").click()
        Select(self.find("select[name=action]")).select_by_value(action)
        self.find("button[name=index]").click()


@pytest.fixture
def console(live_server, tmp_path) -> Iterator[Console]:
    driver = chromium(tmp_path)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser = Console(driver, live_server.url, shots)
    try:
        yield browser
    finally:
        try:
            browser.shot("last")
        finally:
            driver.quit()
        print("screenshots:", *browser.shots, sep="\n  ")


@pytest.fixture
def operator(db):
    return UserFactory(is_staff=True, is_superuser=True)


def test_operator_creates_a_credential_and_sees_it_fingerprinted(console, operator, user):
    console.login(operator.username)
    console.shot("index")
    assert all(group in console.text() for group in ("CATALOG", "ACCESS", "RUNS", "BILLING"))
    console.get("/admin/instances/credential/add/")
    console.find("#id_owner").send_keys(str(user.pk))
    Select(console.find("#id_provider")).select_by_value("http")
    Select(console.find("#id_kind")).select_by_value("bearer")
    console.find("#id_label").send_keys("Billing API")
    console.find("#id_new_secret").send_keys('{"token": "browser-secret-4d2f"}')
    console.shot("credential-form")
    console.find("input[name=_save]").click()
    console.wait_text("was added successfully")
    credential = Credential.objects.get(label="Billing API")
    assert credential.owner == user and credential.reveal_secret() == {"token": "browser-secret-4d2f"}
    assert credential.fingerprint in console.text()
    assert "browser-secret-4d2f" not in console.driver.page_source
    console.shot("credential-list")
    console.get(f"/admin/instances/credential/{credential.pk}/change/")
    assert credential.fingerprint in console.text() and "created" in console.text()
    assert console.find("#id_new_secret").get_attribute("value") == ""
    console.shot("credential-page")


def test_operator_disables_an_instance_with_the_action(console, operator, user, make_instance):
    instance = make_instance("test-noop", owner=user, name="Nightly export")
    console.login(operator.username)
    console.get("/admin/instances/toolinstance/")
    assert "ready" in console.text()
    console.shot("instances")
    console.run_action("disable", str(instance.pk))
    console.wait_text("Nightly export: disabled.")
    console.shot("instance-disabled")
    instance.refresh_from_db()
    assert instance.status == ToolInstance.Status.DISABLED
    console.run_action("disable", str(instance.pk))
    console.wait_text("Nightly export: This instance is already disabled.")
    console.shot("instance-refused")
    console.get(f"/admin/instances/toolinstance/{instance.pk}/change/")
    assert "Not ready." in console.text() and "instance_status" in console.text()
    console.shot("instance-page")


@pytest.mark.redis
def test_operator_cancels_a_running_job_and_sees_it_cancelled(console, operator, user, make_instance, rq_worker):
    rq_worker()
    instance = make_instance("test-slow", owner=user, name="Slow one")
    instance = ToolInstance.objects.select_related("tool", "owner__credit_account").get(pk=instance.pk)
    job = execution_enqueue(instance=instance, inputs={"seconds": 60}).job
    wait_for(
        lambda: Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).exists(), message="the job to start running"
    )
    console.login(operator.username)
    console.get("/admin/executions/job/")
    console.wait_text("Running")
    console.shot("jobs-running")
    console.run_action("cancel", str(job.pk))
    console.wait_text(f"Job {job.pk}:")
    console.shot("job-cancel-requested")
    wait_for(
        lambda: Job.objects.filter(pk=job.pk, status=Job.Status.CANCELLED).exists(), message="the job to be cancelled"
    )
    console.get(f"/admin/executions/job/{job.pk}/change/")
    console.wait_text("Cancelled")
    console.shot("job-cancelled")
    console.get("/admin/executions/job/")
    row = console.find(f"input.action-select[value='{job.pk}']").find_element(By.XPATH, "./ancestor::tr")
    assert "Cancelled" in row.text
    console.shot("jobs-after")


def test_operator_syncs_the_catalog_reads_a_run_and_adjusts_credits(console, operator, user, make_instance):
    from credits.models import CreditLedgerEntry
    from credits.services import credit_account_for
    from executions.models import Execution

    instance = make_instance("test-noop", owner=user, name="Echo")
    execution = Execution.objects.create(
        instance=instance,
        tool=instance.tool,
        owner=user,
        mode="SYNC",
        status="FAILED",
        input_data={"echo": "<b>hello</b>", "api_key": "[redacted]"},
        error_code="UPSTREAM_ERROR",
        error_message="Example API answered with an error.",
        error_metadata={
            "action_items": [
                {"action": "retry", "message": "Try again in a minute", "url": "https://x.example/", "priority": "low"}
            ],
            "can_retry": True,
        },
    )
    account = credit_account_for(owner=user)
    console.login(operator.username)

    console.get("/admin/tools/tooldefinition/")
    console.find("#sync-catalog").click()
    console.wait_text("Catalog synced:")
    console.shot("catalog-synced")

    console.get(f"/admin/executions/execution/{execution.pk}/change/")
    assert '"echo": "<b>hello</b>"' in console.text()  # shown as text, not markup
    assert console.find("a[href='https://x.example/']").text == "https://x.example/"
    console.shot("execution-page")

    console.get("/admin/credits/creditaccount/")
    console.run_action("adjust_balance", str(account.pk))
    console.wait_text("A positive amount adds credits")
    console.find("#id_amount").send_keys("12.5")
    console.find("#id_reason").send_keys("goodwill after the outage")
    console.shot("adjust-form")
    console.find("input[name=apply]").click()
    console.wait_text("balance adjusted by 12.5")
    console.shot("adjusted")
    entry = CreditLedgerEntry.objects.get(account=account)
    assert (entry.kind, entry.reason, entry.created_by) == ("ADJUSTMENT", "goodwill after the outage", operator)
    console.get(f"/admin/credits/creditaccount/{account.pk}/change/")
    assert "goodwill after the outage" in console.text()
    console.shot("account-page")
