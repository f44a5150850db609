"""Listening to a job's live event channel in Redis, as the events stream does."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis
from django.conf import settings as django_settings

from executions import events
from executions.models import Job
from tests.conftest import wait_for


class Listener:
    """A redis-py subscriber to a job's event channel, draining it in a thread."""

    def __init__(self, job_id: str) -> None:
        self.pubsub = redis.Redis.from_url(django_settings.REDIS_URL).pubsub()
        self.pubsub.subscribe(events.channel(job_id))
        confirmation = self.pubsub.get_message(timeout=5)
        assert confirmation and confirmation["type"] == "subscribe", confirmation
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                self.events.append(json.loads(message["data"]))

    def wait_for_terminal(self, timeout: float = 30) -> list[dict[str, Any]]:
        wait_for(
            lambda: any(e.get("status") in Job.TERMINAL for e in self.events),
            timeout=timeout,
            message="the terminal event",
        )
        time.sleep(0.2)  # anything published after it would show up now
        return self.close()

    def close(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        return list(self.events)
