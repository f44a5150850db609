"""``/ws/v1/workflow-runs/{run_id}/``: a workflow run's live events over a WebSocket, the
frames its SSE stream sends (workflows/streams.py): the run's state first, each step's change
and the progress of its steps in flight, and the run's terminal state, after which the socket
closes with 1000. Sign-in, close codes and resuming are the job socket's
(executions/consumers.py), with ``run_id`` in place of ``job_id``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth.models import AbstractBaseUser

from executions.consumers import SingleFeedSocket

from .models import WorkflowRun
from .page_selectors import runs_visible
from .streams import follow_run


def run_visible(*, user: AbstractBaseUser, run_id: str, signed_in_by: str | None) -> bool:
    """Whether ``user`` may follow the run: their own; any run for staff signed in with the
    session, as the status pages show them everyone's."""
    runs = runs_visible(user=user) if signed_in_by == "session" else WorkflowRun.objects.filter(owner_id=user.pk)
    return runs.filter(pk=run_id).exists()


class WorkflowRunSocket(SingleFeedSocket):
    id_field = "run_id"

    async def visible(self, ident: str) -> bool:
        return await database_sync_to_async(run_visible)(
            user=self.scope["user"], run_id=ident, signed_in_by=self.scope.get("auth")
        )

    def source(self, ident: str, after: int | None) -> AsyncIterator[dict[str, Any] | None]:
        return follow_run(ident, after=after)
