"""How many Redis round trips accepting an async run costs (issue 8, benchmark 2): the enqueue is
two — RQ registers the queue name (MULTI SADD EXEC), then saves the job and pushes its id in one
MULTI … EXEC — and the job is then on the queue for a worker, carrying only the Job's id.

Round trips are counted at the socket: every write redis-py makes is one (a pipeline is written
in one go). Real PostgreSQL and Redis; the request commits (the job is queued on commit).
"""

from __future__ import annotations

import pytest
from rq.job import Job as RQJob

from executions import events
from tests.redis_trips import redis_round_trips

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

ENQUEUE_ROUND_TRIPS = 2


def touches_rq(trip: list[list[bytes]]) -> bool:
    return any(arg.startswith(b"rq:") for command in trip for arg in command[1:])


@pytest.mark.django_db(transaction=True)
def test_accepting_an_async_run_enqueues_in_two_redis_round_trips(api, user, make_instance):
    instance = make_instance("test-noop", owner=user)
    url = f"/api/v1/instances/{instance.pk}/execute-async"
    # Connection set-up and RQ's one INFO per connection are not paid per enqueue.
    assert api.post(url, {"echo": "warm"}, format="json").status_code == 202

    with redis_round_trips() as trips:
        response = api.post(url, {"echo": "hi"}, format="json")

    assert response.status_code == 202, response.content
    enqueue = [[command[0].upper() for command in trip] for trip in trips if touches_rq(trip)]
    assert len(enqueue) == ENQUEUE_ROUND_TRIPS, enqueue
    assert all(trip[0] == b"MULTI" and trip[-1] == b"EXEC" for trip in enqueue), enqueue
    job_id = response.json()["job_id"]
    queue = events.queue()
    assert queue.job_ids[-1] == job_id
    job = RQJob.fetch(job_id, connection=queue.connection)
    assert (job.func_name, job.args, job.origin) == ("executions.jobs.run", (job_id,), queue.name)
