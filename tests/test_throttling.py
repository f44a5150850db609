"""Rate limits: a fixed-window counter per identity in Redis, one round trip per request at
any rate, refusals in the error envelope with when to retry, and no outage when Redis is."""

from __future__ import annotations

import logging
import time

import pytest

from tests.redis_trips import redis_round_trips

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def set_rate(settings, scope: str, rate: str) -> None:
    rates = {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], scope: rate}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}


def throttle_trips(trips: list[list[list[bytes]]]) -> list[list[bytes]]:
    return [[command[0].upper() for command in trip] for trip in trips if any(b"throttle" in c[1] for c in trip)]


def test_a_request_costs_one_round_trip_of_a_few_bytes_however_many_came_before(api, settings):
    set_rate(settings, "user", "100000/min")
    for _ in range(200):
        assert api.get("/api/v1/tools/").status_code == 200

    with redis_round_trips() as trips:
        assert api.get("/api/v1/tools/").status_code == 200

    assert throttle_trips(trips) == [[b"INCRBY", b"EXPIRE"]]
    assert sum(len(arg) for trip in trips for command in trip for arg in command) < 200


def test_the_limit_applies_per_user_and_a_new_window_lets_requests_in_again(api, other_api, settings):
    set_rate(settings, "user", "3/s")
    time.sleep(1 - time.time() % 1 + 0.02)  # the start of a window, so all three fall inside it

    statuses = [api.get("/api/v1/tools/").status_code for _ in range(4)]
    other = other_api.get("/api/v1/tools/").status_code

    assert statuses == [200, 200, 200, 429]
    assert other == 200  # someone else's requests are counted apart
    time.sleep(1.05)
    assert api.get("/api/v1/tools/").status_code == 200


def test_the_refusal_says_when_the_window_ends(api, settings):
    set_rate(settings, "user", "1/hour")
    assert api.get("/api/v1/tools/").status_code == 200

    response = api.get("/api/v1/tools/")

    body = response.json()
    assert (response.status_code, body["error_code"]) == (429, "THROTTLED")
    now = time.time()
    window_left = 3600 - now % 3600
    assert abs(body["metadata"]["retry_after_seconds"] - window_left) <= 2
    assert response["Retry-After"] == str(body["metadata"]["retry_after_seconds"])


def test_with_redis_unreachable_requests_are_served_unthrottled_and_it_is_logged(api, settings, caplog):
    settings.RQ_QUEUES = {"default": {"URL": "redis://127.0.0.1:1/0"}}  # nothing listens there
    set_rate(settings, "user", "1/min")

    with caplog.at_level(logging.WARNING, logger="core.throttles"):
        statuses = [api.get("/api/v1/tools/").status_code for _ in range(3)]

    assert statuses == [200, 200, 200]
    assert "Redis is unreachable" in caplog.text
