"""The job page follows a job live (static/status/job.js, issue 23) in a real browser (headless
Chromium) against the server `make run` starts (daphne: HTTP and WebSockets on one port) and a
real worker: over the WebSocket; over the events stream when WebSockets are blocked; by
polling when both are; and, after the network drops mid-job, it connects again and resumes
after the last seq it applied, so that no progress mark is lost.

The page records the seqs it applied on its live section (data-seq-first, -last, -count and
-gaps); a lossless page applied every seq from its first to the terminal one, each once. The
network between Chromium and the server is a proxy of the test's (``Network``): it refuses
WebSocket handshakes and drops connections, which Chromium's DevTools cannot do to WebSockets.
The events stream's ``?last_event_id=`` (how the page resumes on SSE after its socket) is
pinned here too.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from executions import events
from executions.events import Topic
from executions.models import Job, Mode
from executions.services.enqueue import execution_enqueue
from instances.selectors import instance_list
from tests import test_websocket
from tests.browser import chromium
from tests.test_live_events import publish_run, read_sync
from tests.test_status_browser import (
    DESKTOP,
    Browser,
    _assert_progress_advanced_then_completed,
    _follow_a_real_job,
    _live_state,
    _watch_until_completed,
)
from tests.test_status_pages import record

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

# test_websocket's fixture: the web server `make run` starts, on the test database.
asgi_server = test_websocket.asgi_server


class Network:
    """A TCP proxy between Chromium and the web server, standing in for the network (Chromium's
    own request blocking and offline mode leave WebSockets alone). It can refuse WebSocket
    handshakes, as a proxy without WebSocket support does, and go away for a while, dropping
    every open connection. (Chromium opens a connection of its own for each WebSocket, so
    reading the first request of each connection is enough to know a handshake.)"""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refuse_websockets = False
        self.down_until = 0.0
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, *, down_for: float = 0.0) -> None:
        """Every open connection drops; for ``down_for`` seconds new ones are cut at once."""
        self.down_until = time.monotonic() + down_for
        with self.lock:
            dropped, self.connections = self.connections, set()
        for sock in dropped:
            self._close(sock)

    def close(self) -> None:
        self.listener.close()
        self.drop()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self.lock:
            self.connections.add(client)
        head = b""
        while b"\r\n\r\n" not in head and time.monotonic() >= self.down_until:
            chunk = client.recv(65536)
            if not chunk:
                break
            head += chunk
        if b"\r\n\r\n" not in head or time.monotonic() < self.down_until:
            self._close(client)
            return
        if self.refuse_websockets and b"upgrade: websocket" in head.lower():
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self._close(client)
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with self.lock:
            self.connections.add(upstream)
        upstream.sendall(head)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass  # dropped
        finally:
            self._close(source)
            self._close(target)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting to read it
        except OSError:
            pass  # closed already
        sock.close()


@pytest.fixture
def network(asgi_server: int) -> Iterator[Network]:
    proxy = Network(asgi_server)
    yield proxy
    proxy.close()


@pytest.fixture
def browser(network: Network, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Browser]:
    """Chromium on the pages as `make run` serves them, WebSockets included (pytest-django's
    live server is WSGI: no WebSockets), through the ``network``; a screenshot when the test
    fails."""
    driver = chromium(tmp_path, width=DESKTOP, height=900)
    folder = tmp_path / "screenshots"
    folder.mkdir()
    failed_before = request.session.testsfailed
    try:
        yield Browser(driver, f"http://127.0.0.1:{network.port}", folder)
    finally:
        if request.session.testsfailed > failed_before:
            path = folder / "at-failure.png"
            driver.save_screenshot(str(path))
            print(f"screenshot at the failure: {path} (page {driver.current_url})")
        driver.quit()


def block_events_stream(browser: Browser) -> None:
    """Requests of the events stream fail in the browser, as a proxy that refuses them."""
    browser.driver.execute_cdp_cmd("Network.enable", {})
    browser.driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events*"]})


def applied(browser: Browser) -> dict[str, Any]:
    """The seqs the page applied, as its live section records them."""
    return browser.js(
        """
        const live = document.getElementById("job-live");
        const number = (name) => live.hasAttribute(name) ? Number(live.getAttribute(name)) : null;
        return {first: number("data-seq-first"), last: number("data-seq-last"),
                count: number("data-seq-count"), gaps: live.getAttribute("data-seq-gaps"),
                reconnects: number("data-reconnects") || 0, mode: live.getAttribute("data-live")};
        """
    )


def last_published_seq(job: Job) -> int:
    return events.last_event(Topic.job(str(job.pk)))["seq"]


def assert_every_seq_applied_once(browser: Browser, job: Job) -> dict[str, Any]:
    seqs = applied(browser)
    assert seqs["gaps"] == "", f"progress marks the page never applied: {seqs}"
    assert seqs["last"] == last_published_seq(job), f"the page did not apply the terminal event: {seqs}"
    assert seqs["count"] == seqs["last"] - seqs["first"] + 1, f"not every seq once: {seqs}"
    return seqs


@pytest.mark.browser
def test_the_job_page_follows_a_real_worker_over_the_websocket(browser, rq_worker, user, make_instance):
    job, seen = _follow_a_real_job(browser, rq_worker, user, make_instance)

    assert {s["mode"] for s in seen} == {"websocket"}
    _assert_progress_advanced_then_completed(seen, job)
    assert not browser.find("#job-refresh").is_displayed()  # live: no need to refresh
    seqs = assert_every_seq_applied_once(browser, job)
    assert seqs["reconnects"] == 0
    browser.screenshot("job-completed-over-the-websocket")


@pytest.mark.browser
def test_with_websockets_blocked_the_job_page_follows_the_events_stream(
    browser, network, rq_worker, user, make_instance
):
    network.refuse_websockets = True
    job, seen = _follow_a_real_job(browser, rq_worker, user, make_instance)

    assert {s["mode"] for s in seen} == {"stream"}
    _assert_progress_advanced_then_completed(seen, job)
    assert_every_seq_applied_once(browser, job)


@pytest.mark.browser
def test_with_websockets_and_the_events_stream_blocked_the_job_page_polls(
    browser, network, rq_worker, user, make_instance
):
    network.refuse_websockets = True
    block_events_stream(browser)
    job, seen = _follow_a_real_job(browser, rq_worker, user, make_instance)

    assert {s["mode"] for s in seen} == {"polling"}
    _assert_progress_advanced_then_completed(seen, job)
    assert not browser.find("#job-refresh").is_displayed()


def start_long_job(browser: Browser, rq_worker: Any, user: Any, make_instance: Any, **inputs: Any) -> Job:
    rq_worker()
    instance = make_instance("demo-long-task", owner=user)
    browser.login(user.username)
    accepted = execution_enqueue(instance=instance_list(owner=user).get(pk=instance.pk), inputs=inputs)
    browser.get(f"/status/jobs/{accepted.job.pk}/")
    browser.js("window.__sameDocument = true;")  # a reload would lose it
    return accepted.job


def wait_for_websocket_progress(browser: Browser, *, at_least: int) -> None:
    """Until the page shows ``at_least`` percent, followed over the WebSocket."""
    browser.wait(
        lambda d: (_live_state(browser)["value"] or 0) >= at_least and applied(browser)["mode"] == "websocket",
        timeout=30,
        message="progress over the WebSocket",
    )


@pytest.mark.browser
def test_after_the_network_drops_the_job_page_reconnects_and_no_progress_mark_is_lost(
    browser, network, rq_worker, user, make_instance
):
    job = start_long_job(browser, rq_worker, user, make_instance, steps=40, step_seconds=0.15)
    wait_for_websocket_progress(browser, at_least=10)
    before = applied(browser)["last"]
    network.drop(down_for=1.0)
    time.sleep(1.0)
    published_while_down = last_published_seq(job) - before

    seen = _watch_until_completed(browser)

    assert browser.js("return window.__sameDocument === true"), "the page was reloaded"
    assert published_while_down >= 3, "the job published nothing while the network was down: nothing to lose"
    assert {s["mode"] for s in seen} == {"websocket"}, "it gave the socket up"
    seqs = assert_every_seq_applied_once(browser, job)
    assert seqs["reconnects"] >= 1, f"the socket never dropped: {seqs}"
    assert Job.objects.get(pk=job.pk).status == "COMPLETED"


@pytest.mark.browser
def test_when_the_websocket_cannot_come_back_the_events_stream_resumes_after_the_last_seq(
    browser, network, rq_worker, user, make_instance
):
    job = start_long_job(browser, rq_worker, user, make_instance, steps=60, step_seconds=0.25)
    wait_for_websocket_progress(browser, at_least=5)
    network.refuse_websockets = True  # every retry of the socket fails from now on
    network.drop()
    browser.wait(lambda d: applied(browser)["mode"] == "stream", timeout=20, message="the page to fall back to SSE")
    assert Job.objects.get(pk=job.pk).status == "RUNNING", "the job ended before the stream took over"

    _watch_until_completed(browser)

    assert_every_seq_applied_once(browser, job)


def running_job(user: Any, make_instance: Any) -> Job:
    """A job no worker runs: its events are the test's to publish."""
    return record(make_instance("demo-long-task", owner=user), mode=Mode.ASYNC, job={"status": "RUNNING"}).job


def test_the_job_page_config_names_its_websocket(user, make_instance):
    job = running_job(user, make_instance)
    client = Client()
    client.force_login(user)
    body = client.get(f"/status/jobs/{job.pk}/").content.decode()
    assert f'"ws_url": "/ws/v1/jobs/{job.pk}/"' in body


def test_the_events_stream_resumes_after_a_last_event_id_given_in_its_address(user, make_instance):
    job_id = str(running_job(user, make_instance).pk)
    publish_run(job_id, marks=4)  # seqs 1 (RUNNING) to 6 (COMPLETED)
    client = Client()
    client.force_login(user)
    url = f"/status/jobs/{job_id}/events/"

    resumed = read_sync(client.get(f"{url}?last_event_id=3", HTTP_ACCEPT="text/event-stream"))
    header_first = read_sync(
        client.get(f"{url}?last_event_id=3", HTTP_ACCEPT="text/event-stream", HTTP_LAST_EVENT_ID="5")
    )

    assert [e["seq"] for e in resumed] == [4, 5, 6], "every event after the one named, once, in order"
    assert [e["seq"] for e in header_first] == [6], "EventSource's own Last-Event-ID is newer: it wins"
