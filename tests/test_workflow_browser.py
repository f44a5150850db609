"""The workflow status pages in a real browser (headless Chromium), as the job page's tests do
(tests/test_status_browser.py): a run's page following a real worker live, over the events
stream and, with the stream blocked, by polling; a run started from the workflow page's "run
it" form; without JavaScript; text from tools that tries to run script; every page at desktop
and phone width.

Screenshots are saved under the test's temporary folder; their paths are printed (pytest shows
them when a test fails, with one more taken at the failure).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from executions.models import Job
from tests.browser import chromium
from tests.conftest import wait_for
from tests.factories import PASSWORD, UserFactory
from tests.test_status_browser import DESKTOP, PHONE, Browser
from tests.test_status_pages import failure
from tests.test_workflow_pages import make_run, step_row
from workflows.models import Workflow, WorkflowRun
from workflows.services.runs import run_start
from workflows.services.workflows import workflow_create

pytestmark = [pytest.mark.browser, pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser(live_server, tmp_path, request) -> Iterator[Browser]:
    driver = chromium(tmp_path, width=DESKTOP, height=900)
    folder = tmp_path / "screenshots"
    folder.mkdir()
    failed_before = request.session.testsfailed
    try:
        yield Browser(driver, live_server.url, folder)
    finally:
        if request.session.testsfailed > failed_before:
            try:
                path = folder / "at-failure.png"
                driver.save_screenshot(str(path))
                print(f"screenshot at the failure: {path} (page {driver.current_url})")
            except WebDriverException as exc:
                print(f"no screenshot at the failure: {exc.msg}")
            print("screenshots:\n  " + "\n  ".join(str(p) for p in sorted(folder.glob("*.png"))))
        driver.quit()


def counting_workflow(owner: Any, make_instance: Any) -> Workflow:
    """count (a slow tool reporting progress) → each (a fan-out of it over three items, two at
    a time) → total (json-transform over their outputs), whose result is the run's output."""
    slow = make_instance("demo-long-task", owner=owner, name="Counter")
    transform = make_instance("json-transform", owner=owner, name="Totals")
    return workflow_create(
        owner=owner,
        key=f"count-{uuid.uuid4().hex[:6]}",
        name="Count things",
        definition={
            "inputs": {"type": "object", "properties": {"steps": {"type": "integer", "minimum": 1}}},
            "steps": [
                {
                    "id": "count",
                    "instance": str(slow.pk),
                    "inputs": {"steps": {"$expr": "input.steps"}, "step_seconds": 0.4},
                },
                {
                    "id": "each",
                    "instance": str(slow.pk),
                    "depends_on": ["count"],
                    "for_each": [3, 4, 5],
                    "concurrency": 2,
                    "inputs": {"steps": {"$expr": "item"}, "step_seconds": 0.3},
                },
                {
                    "id": "total",
                    "instance": str(transform.pk),
                    "inputs": {"expression": "sum([*].steps_completed)", "data": {"$expr": "steps.each.output"}},
                },
            ],
            "output": {"counted": {"$expr": "steps.total.output.result"}},
        },
    )  # fmt: skip


def _live_state(browser: Browser) -> dict[str, Any]:
    return browser.js(
        """
        const live = document.getElementById("run-live");
        const state = live.querySelector(".run-state");
        const nodes = {};
        live.querySelectorAll(".workflow-graph .node").forEach((node) => {
          const bar = node.querySelector('[data-field="bar"]');
          nodes[node.getAttribute("data-step")] = {
            cls: node.getAttribute("class"),
            state: node.querySelector('[data-field="state"]').textContent,
            bar: bar ? Number(bar.getAttribute("width")) : null,
          };
        });
        const detail = (id) =>
          (live.querySelector('tbody[data-step="' + id + '"] [data-field="detail"]') || {}).textContent || "";
        return {status: state.getAttribute("data-status"),
                shown: live.querySelector('[data-field="run-status"]').textContent,
                mode: live.getAttribute("data-live"), nodes: nodes,
                countDetail: detail("count"), eachDetail: detail("each"),
                stepsDone: live.querySelector('[data-field="steps-done"]').textContent,
                outcome: (document.getElementById("run-outcome") || {}).textContent || ""};
        """
    )


def _watch_until_ended(browser: Browser, *, timeout: float = 90) -> list[dict[str, Any]]:
    """What the live part showed, sampled every 50 ms, until it shows the run's outcome."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _live_state(browser)
        seen.append(state)
        if state["outcome"]:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"the page never showed the run's outcome; last state {seen[-1] if seen else None}")


def _follow_a_real_run(
    browser: Browser, rq_worker: Any, user: Any, make_instance: Any, *, steps: int = 8
) -> tuple[WorkflowRun, list]:
    rq_worker("--processes", "2")
    workflow = counting_workflow(user, make_instance)
    browser.login(user.username)
    run = run_start(workflow=workflow, inputs={"steps": steps}).run
    browser.get(f"/status/workflows/runs/{run.pk}/")
    browser.js("window.__sameDocument = true;")  # a reload would lose it
    browser.wait(
        lambda d: (_live_state(browser)["nodes"]["count"]["bar"] or 0) > 0, timeout=30, message="count to progress"
    )
    browser.screenshot("run-running")
    seen = _watch_until_ended(browser)
    assert browser.js("return window.__sameDocument === true"), "the page was reloaded"
    return WorkflowRun.objects.get(pk=run.pk), seen


def _assert_steps_advanced_then_succeeded(seen: list[dict[str, Any]], run: WorkflowRun, *, items_seen: int) -> None:
    """``items_seen``: how many of the fan-out's in-between counts (1 and 2 of 3 done) the page
    must have shown; polling once a second can miss one (the two first items end 0.3 s apart)."""
    count = [s["nodes"]["count"]["bar"] for s in seen]
    full = max(count)
    assert len({bar for bar in count if 0 < bar < full}) >= 3, f"count's bar did not advance step by step: {count}"
    assert count == sorted(count), f"count's bar went backwards: {count}"
    assert any(s["nodes"]["count"]["state"].startswith("running · ") for s in seen), "count never said it runs"
    assert any(s["countDetail"].startswith("Step ") for s in seen), "count's current step never shown"
    each = [s["eachDetail"] for s in seen]
    between = {"1 of 3 items done", "2 of 3 items done"} & set(each)
    assert len(between) >= items_seen, f"the fan-out's items were not counted: {set(each)}"
    done = [int(words.split(" ", 1)[0]) for words in each if words.endswith("items done")]
    assert done == sorted(done), f"the fan-out's count went backwards: {done}"
    classes = [s["nodes"]["each"]["cls"] for s in seen]
    assert "node s-running" in classes, "the fan-out never showed running"
    last = seen[-1]
    assert run.status == "SUCCEEDED", run.error
    assert (last["status"], last["shown"]) == ("SUCCEEDED", "SUCCEEDED")
    assert {node["cls"] for node in last["nodes"].values()} == {"node s-succeeded"}
    assert last["stepsDone"] == "3 of 3 steps ended"
    assert '"counted": 12' in last["outcome"]


def test_the_run_page_follows_a_real_worker_live_over_the_events_stream(browser, rq_worker, user, make_instance):
    run, seen = _follow_a_real_run(browser, rq_worker, user, make_instance)
    assert {s["mode"] for s in seen} == {"stream"}
    _assert_steps_advanced_then_succeeded(seen, run, items_seen=2)
    assert not browser.find("#run-refresh").is_displayed()  # live: no need to refresh
    assert not browser.driver.find_elements(By.CSS_SELECTOR, "form.cancel")  # nothing left to cancel
    browser.screenshot("run-succeeded")
    browser.screenshot("run-succeeded", width=PHONE)
    assert not browser.overflows_horizontally(PHONE)


def test_the_run_page_polls_when_the_events_stream_is_blocked(browser, rq_worker, user, make_instance):
    browser.driver.execute_cdp_cmd("Network.enable", {})
    browser.driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events*"]})
    # Polled once a second, from a row whose progress is written at most once a second: a longer
    # count than the live tests' shows its in-between steps on a busy machine too.
    run, seen = _follow_a_real_run(browser, rq_worker, user, make_instance, steps=14)
    assert {s["mode"] for s in seen} == {"polling"}
    _assert_steps_advanced_then_succeeded(seen, run, items_seen=1)
    browser.screenshot("run-succeeded-by-polling")


def test_the_run_page_polls_when_the_events_stream_stays_silent(browser, rq_worker, user, make_instance):
    """A stream held back (a buffering proxy, or a server that sends a body only once it is
    whole) never errs: the page gives it up for polling once its first event is late."""
    rq_worker("--processes", "2")
    workflow = counting_workflow(user, make_instance)
    browser.login(user.username)
    browser.driver.execute_cdp_cmd("Fetch.enable", {"patterns": [{"urlPattern": "*/events/*"}]})  # held, unanswered
    run = run_start(workflow=workflow, inputs={"steps": 20}).run
    browser.get(f"/status/workflows/runs/{run.pk}/")
    assert _live_state(browser)["mode"] == "stream"
    browser.wait(lambda d: _live_state(browser)["mode"] == "polling", timeout=8, message="polling instead")
    seen = _watch_until_ended(browser)
    assert seen[-1]["shown"] == "SUCCEEDED" and '"counted": 12' in seen[-1]["outcome"]
    assert len({s["nodes"]["count"]["bar"] for s in seen if 0 < s["nodes"]["count"]["bar"]}) >= 2


def test_a_run_started_from_the_workflow_pages_form_runs_to_its_end(browser, rq_worker, user, make_instance):
    rq_worker("--processes", "2")
    workflow = counting_workflow(user, make_instance)
    browser.login(user.username)
    browser.get(f"/status/workflows/{workflow.pk}/")
    assert browser.find('#ready [data-field="verdict"]').text.startswith("Yes")
    assert [n.get_attribute("data-step") for n in browser.driver.find_elements(By.CSS_SELECTOR, ".node")] == [
        "count",
        "each",
        "total",
    ]
    browser.screenshot("workflow")
    browser.find("#id_in_steps").send_keys("2")
    browser.find("form.run-it button[type=submit]").click()
    browser.wait(lambda d: "/status/workflows/runs/" in d.current_url, message="the run's page")
    run = WorkflowRun.objects.get()
    assert run.inputs == {"steps": 2}
    seen = _watch_until_ended(browser)
    assert seen[-1]["shown"] == "SUCCEEDED" and '"counted": 12' in seen[-1]["outcome"]
    browser.screenshot("run-from-the-form")


def test_without_javascript_the_run_page_shows_its_state_and_a_refresh_link(browser, user, make_instance):
    workflow = counting_workflow(user, make_instance)
    run = make_run(workflow)
    step_row(run, "count", "SUCCEEDED")
    step_row(run, "each", "SUCCEEDED", iteration=0, items_total=3, item=3)
    step_row(run, "each", "RUNNING", iteration=1, items_total=3, item=4)
    step_row(run, "each", "PENDING", iteration=2, items_total=3, item=5)
    browser.login(user.username)
    browser.driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    browser.get(f"/status/workflows/runs/{run.pk}/")
    assert browser.find("#run-live").get_attribute("data-live") == "static"
    each = browser.find('.workflow-graph .node[data-step="each"]')
    assert each.get_attribute("class") == "node s-running"
    assert each.find_element(By.CSS_SELECTOR, '[data-field="state"]').text == "running · 33 %"
    refresh = browser.find("#run-refresh a")
    assert refresh.is_displayed() and refresh.get_attribute("href").endswith(f"/status/workflows/runs/{run.pk}/")
    assert browser.find("form.cancel button").is_displayed()
    browser.screenshot("run-without-javascript")


def test_a_steps_error_with_script_is_shown_as_text_and_never_runs(browser, user, make_instance):
    attack = '<script>window.__owned = 1</script><img src=x onerror="window.__owned = 2">'
    workflow = counting_workflow(user, make_instance)
    run = make_run(workflow)
    failed = step_row(run, "count", "RUNNING")
    browser.driver.execute_cdp_cmd("Network.enable", {})
    browser.driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events*"]})  # it polls
    browser.login(user.username)
    browser.get(f"/status/workflows/runs/{run.pk}/")
    type(failed).objects.filter(pk=failed.pk).update(status="FAILED", error=failure(attack))
    WorkflowRun.objects.filter(pk=run.pk).update(status="FAILED", error=failure(attack), output={"x": attack})
    browser.wait(lambda d: attack in d.find_element(By.ID, "run-live").text, message="the error, as text")
    time.sleep(0.3)  # an onerror handler would have run by now
    browser.screenshot("script-in-error-shown-as-text")
    assert browser.js("return window.__owned === undefined"), "script from a tool's error ran"
    assert not browser.driver.find_elements(By.CSS_SELECTOR, "#run-live img")


def test_every_workflow_page_reads_well_on_a_desktop_and_on_a_phone(browser, user, make_instance):
    workflow = counting_workflow(user, make_instance)
    sheet = make_instance("test-google-sheet", owner=user, name="Sales plan")  # not ready: needs Google
    first = make_instance("json-transform", owner=user, name="Prepare")
    not_ready = workflow_create(
        owner=user,
        key="sales",
        name="Sales digest",
        definition={
            "steps": [
                {"id": "prepare", "instance": str(first.pk), "inputs": {"expression": "@", "data": 1}},
                {"id": "a_sheet_with_a_rather_long_name", "instance": str(sheet.pk), "inputs": {"file_id": "f"}},
            ]
        },
    )
    failed = make_run(workflow, "FAILED", error=failure("Step 'each' (item 1) failed: the counter broke"))
    step_row(failed, "count", "SUCCEEDED")
    for i, status in enumerate(["SUCCEEDED", "FAILED", "SUCCEEDED"]):
        step_row(failed, "each", status, iteration=i, items_total=3, item=i, error=failure() if i == 1 else None)
    step_row(failed, "total", "UPSTREAM_FAILED")
    succeeded = make_run(workflow, "SUCCEEDED", output={"counted": 12})
    for step_id in ("count", "each", "total"):
        step_row(succeeded, step_id, "SUCCEEDED")

    browser.login(user.username)
    pages = {
        "workflows": "/status/workflows/",
        "workflow": f"/status/workflows/{workflow.pk}/",
        "workflow-not-ready": f"/status/workflows/{not_ready.pk}/",
        "run-failed": f"/status/workflows/runs/{failed.pk}/",
        "run-succeeded": f"/status/workflows/runs/{succeeded.pk}/",
    }
    for name, path in pages.items():
        browser.get(path)
        assert browser.driver.title.endswith("· toolexec"), name
        assert browser.js("return getComputedStyle(document.body).fontFamily").startswith("system-ui"), name
        assert browser.js("return !!document.querySelector('link[href$=\"workflow.css\"]')"), name
        browser.screenshot(name)
        browser.screenshot(name, width=PHONE)
        assert not browser.overflows_horizontally(PHONE), f"{name} is wider than a phone"
    # A step's node leads to its row.
    browser.get(pages["workflow-not-ready"])
    browser.find('.node[data-step="a_sheet_with_a_rather_long_name"]').click()
    browser.wait(lambda d: d.current_url.endswith("#step-a_sheet_with_a_rather_long_name"), message="the step's checks")


def test_an_operator_cancels_a_running_run_in_the_console_and_sees_it_cancelled(
    browser, rq_worker, user, make_instance
):
    rq_worker()
    workflow = counting_workflow(user, make_instance)
    run = run_start(workflow=workflow, inputs={"steps": 200}).run
    wait_for(
        lambda: Job.objects.filter(execution__workflow_steps__run=run, status="RUNNING").exists(),
        message="the first step to run",
    )
    operator = UserFactory(is_staff=True, is_superuser=True)
    browser.get("/admin/")
    browser.find("#id_username").send_keys(operator.username)
    browser.find("#id_password").send_keys(PASSWORD)
    browser.find("#login-form [type=submit]").click()
    browser.wait(lambda d: "Site administration" in d.title or "Operations" in d.page_source, message="the console")
    browser.get("/admin/workflows/workflowrun/")
    browser.find(f"input.action-select[value='{run.pk}']").click()
    Select(browser.find("select[name=action]")).select_by_value("cancel")
    browser.find("button[name=index]").click()
    browser.wait(lambda d: f"Run {run.pk}: cancelling" in d.find_element(By.TAG_NAME, "body").text, message="the note")
    browser.screenshot("console-run-cancelling")
    wait_for(lambda: WorkflowRun.objects.get(pk=run.pk).status == "CANCELLED", message="the run to be cancelled")
    browser.get(f"/admin/workflows/workflowrun/{run.pk}/change/")
    body = browser.find("body").text
    assert "Cancelled" in body and "The workflow run was cancelled." in body
    assert "count" in browser.find("#steps-group").text
    browser.screenshot("console-run-cancelled")
    assert not Job.objects.filter(execution__workflow_steps__run=run, status__in=["QUEUED", "RUNNING"]).exists()
