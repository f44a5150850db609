"""The live event stream of a workflow run: Server-Sent Events from the run's channel (each
step's change, the run's end) and the channels of the jobs of its steps in flight (their
progress), which it starts following as the run announces them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from django.db import close_old_connections
from redis.exceptions import RedisError

from executions import events as job_events
from executions.streams import KEEPALIVE_SECONDS, MAX_STREAM_SECONDS

from . import events
from .models import StepRun, WorkflowRun
from .selectors import run_detail


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event.get('event', 'state')}\ndata: {json.dumps(event, default=str)}\n\n"


def run_state(run_id: str) -> dict[str, Any]:
    run = WorkflowRun.objects.select_related("version").get(pk=run_id)
    return {"event": "state", **run_detail(run=run)}


def _jobs_in_flight(state: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {
        step["job_id"]: (step["step_id"], step["iteration"])
        for step in state["steps"]
        if step["job_id"] and step["status"] in StepRun.IN_FLIGHT
    }


def run_event_stream(*, run_id: str, keepalive: float = KEEPALIVE_SECONDS) -> Iterator[str]:
    """The run's current state first (every step), then each step's change and its job's
    progress, until the run's terminal state, sent whole. The database is re-read at every
    keep-alive, so a lost message (or Redis going away) cannot leave the stream waiting."""
    pubsub = None
    following: dict[str, tuple[str, int]] = {}  # job channel → (step id, iteration)
    try:
        try:
            pubsub = job_events.redis().pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(events.channel(run_id))
        except RedisError:
            pubsub = None
        state = run_state(run_id)
        yield _sse(state)
        if state["status"] in WorkflowRun.TERMINAL:
            return

        def follow(jobs: dict[str, tuple[str, int]]) -> None:
            nonlocal pubsub
            new = {job_events.channel(job_id): where for job_id, where in jobs.items()}
            new = {name: where for name, where in new.items() if name not in following}
            if pubsub is not None and new:
                try:
                    pubsub.subscribe(*new)
                except RedisError:
                    pubsub = None
            following.update(new)

        follow(_jobs_in_flight(state))
        deadline = time.monotonic() + MAX_STREAM_SECONDS
        while time.monotonic() < deadline:
            message = None
            if pubsub is not None:
                try:
                    message = pubsub.get_message(timeout=keepalive)
                except RedisError:
                    pubsub = None
            else:
                time.sleep(min(keepalive, 1.0))
            if message and message.get("type") == "message":
                name = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
                event = json.loads(message["data"])
                if name in following:  # a step's job: its progress and state, said of the step
                    step_id, iteration = following[name]
                    yield _sse({**event, "event": "progress", "step_id": step_id, "iteration": iteration})
                    continue
                if event.get("event") == "run" and event.get("status") in WorkflowRun.TERMINAL:
                    yield _sse(run_state(run_id))
                    return
                if event.get("job_id"):
                    follow({event["job_id"]: (event["step_id"], event["iteration"])})
                yield _sse(event)
                continue
            state = run_state(run_id)
            if state["status"] in WorkflowRun.TERMINAL:
                yield _sse(state)
                return
            follow(_jobs_in_flight(state))
            yield ": keep-alive\n\n"
    finally:
        if pubsub is not None:
            try:
                pubsub.close()
            except RedisError:
                pass
        close_old_connections()
