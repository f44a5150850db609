"""Connecting a Google account: the connect redirect, the callback (signed, expiring,
session-bound, single-use ``state``; code exchange; the credential stored or replaced), and
token refresh under a per-credential lock.

"Google" is the stand-in of tests/test_google_drive.py (pytest-httpserver).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core import signing
from django.test import Client
from django.utils import timezone

from instances.models import Credential
from instances.oauth import oauth_refresh
from instances.services.credentials import credential_create
from tests.factories import UserFactory
from tests.test_google_drive import CLIENT_ID, CLIENT_SECRET, FakeGoogle, connect_google, drive_instance, fake_google
from tools.errors import CredentialExpired, UpstreamError

pytestmark = pytest.mark.django_db

CONNECT = "/credentials/oauth/google/connect/"
CALLBACK = "/credentials/oauth/google/callback/"
REDIRECT_URI = "https://toolexec.test/credentials/oauth/google/callback/"


@pytest.fixture
def google(httpserver, settings) -> FakeGoogle:
    return fake_google(httpserver, settings)


@pytest.fixture
def browser(user) -> Client:
    client = Client()
    client.force_login(user)
    client.user = user
    return client


def start_connect(browser: Client, **params: str) -> dict[str, str]:
    """GET the connect page; returns the authorize URL's query (one value per name)."""
    response = browser.get(CONNECT, params)
    assert response.status_code == 302, response.content
    url = urlsplit(response["Location"])
    assert url.path == "/o/oauth2/v2/auth"
    return {name: values[0] for name, values in parse_qs(url.query).items()}


def google_answers(browser: Client, google: FakeGoogle, state: str, email: str = "ada@example.com", **extra: str):
    """Google sending the person back with a fresh authorization code."""
    code = "4/0A" + email.split("@")[0] + str(len(google.codes))
    google.codes[code] = email
    return browser.get(CALLBACK, {"code": code, "state": state, "scope": google.scope_granted, **extra})


# --- Connect -------------------------------------------------------------------------------


def test_connect_sends_the_person_to_google_with_what_the_tools_need(browser, google):
    query = start_connect(browser, next="/api/v1/credentials/")

    assert query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == REDIRECT_URI
    assert query["response_type"] == "code"
    assert query["access_type"] == "offline"
    assert query["prompt"] == "consent"
    assert set(query["scope"].split()) >= {
        "openid",
        "email",
        "https://www.googleapis.com/auth/drive.readonly",
        "https://www.googleapis.com/auth/spreadsheets.readonly",
    }
    data = signing.loads(query["state"], salt="toolexec.oauth.state", max_age=600)
    assert data["next"] == "/api/v1/credentials/"
    assert "client_secret" not in query


def test_connect_needs_a_signed_in_person(client, google, settings):
    response = client.get(CONNECT)
    assert response.status_code == 302
    assert response["Location"].startswith(f"{settings.LOGIN_URL}?next=")


def test_connect_for_a_credential_that_is_not_yours_is_not_found(browser, google, other_user):
    theirs = credential_create(owner=other_user, provider="google", kind="oauth2", secret={"access_token": "x" * 20})
    response = browser.get(CONNECT, {"credential": str(theirs.pk)})
    assert response.status_code == 404
    assert b"couldn&#x27;t find that Google credential" in response.content

    assert browser.get(CONNECT, {"credential": "not-a-uuid"}).status_code == 404


def test_connect_when_google_is_not_set_up_says_so(browser, google, settings):
    settings.GOOGLE_OAUTH_CLIENT_ID = ""
    response = browser.get(CONNECT)
    assert response.status_code == 503
    assert b"not set up to connect Google accounts" in response.content


def test_an_unknown_provider_has_no_connect_page(browser, google):
    assert browser.get("/credentials/oauth/myspace/connect/").status_code == 404


# --- Callback ------------------------------------------------------------------------------


def test_the_round_trip_stores_an_active_credential_and_returns_to_next(browser, google, user):
    query = start_connect(browser, next="/api/v1/credentials/")
    response = google_answers(browser, google, query["state"])

    assert response.status_code == 302
    assert response["Location"] == "/api/v1/credentials/"
    (exchange,) = google.token_requests
    assert exchange["grant_type"] == "authorization_code"
    assert exchange["redirect_uri"] == REDIRECT_URI
    assert (exchange["client_id"], exchange["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)

    credential = Credential.objects.get(owner=user)
    assert (credential.provider, credential.kind, credential.status) == ("google", "oauth2", "ACTIVE")
    assert credential.label == "Google (ada@example.com)"
    assert credential.metadata["account_email"] == "ada@example.com"
    assert "https://www.googleapis.com/auth/drive.readonly" in credential.metadata["scopes"]
    assert credential.refreshable is True
    assert timedelta(minutes=59) < credential.expires_at - timezone.now() <= timedelta(seconds=3599)
    secret = credential.reveal_secret()
    assert secret["access_token"] in google.access_tokens
    assert secret["refresh_token"] in google.refresh_tokens


def test_without_next_the_callback_says_the_account_is_connected(browser, google):
    query = start_connect(browser)
    response = google_answers(browser, google, query["state"], email="grace@example.com")

    assert response.status_code == 200
    assert b"grace@example.com is connected" in response.content


def test_the_email_comes_from_userinfo_when_there_is_no_id_token(browser, google, user):
    google.send_id_token = False
    query = start_connect(browser)
    google_answers(browser, google, query["state"], email="linus@example.com")

    assert Credential.objects.get(owner=user).metadata["account_email"] == "linus@example.com"


def test_reconnecting_replaces_the_named_credential(api, browser, google, user, catalog):
    expired = connect_google(api, google, access_token="ya29.dead-token", refresh_token="1//revoked-" + "z" * 20)
    Credential.objects.filter(pk=expired.pk).update(status=Credential.Status.EXPIRED, last_error="revoked")
    instance_id = drive_instance(api, catalog)
    assert api.get(f"/api/v1/instances/{instance_id}/validate-execution").json()["is_ready"] is False

    query = start_connect(browser, credential=str(expired.pk))
    response = google_answers(browser, google, query["state"])

    assert response.status_code == 200
    assert Credential.objects.filter(owner=user).count() == 1  # replaced, not added
    expired.refresh_from_db()
    assert (expired.status, expired.last_error) == ("ACTIVE", "")
    assert expired.reveal_secret()["access_token"] in google.access_tokens
    assert expired.label == "Ada's Google"  # the person's own label stays
    assert api.get(f"/api/v1/instances/{instance_id}/validate-execution").json()["is_ready"] is True


def test_connecting_the_same_account_again_updates_its_credential(browser, google, user):
    for _ in range(2):
        query = start_connect(browser)
        google_answers(browser, google, query["state"], email="ada@example.com")
    assert Credential.objects.filter(owner=user).count() == 1


def test_a_next_on_another_site_is_ignored(browser, google):
    query = start_connect(browser, next="https://evil.example/steal")
    assert signing.loads(query["state"], salt="toolexec.oauth.state")["next"] == ""
    response = google_answers(browser, google, query["state"])
    assert response.status_code == 200


# --- Refused callbacks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "forge",
    [
        lambda state: "forged",
        lambda state: state[:-2] + ("AA" if not state.endswith("AA") else "BB"),
        lambda state: signing.dumps(signing.loads(state, salt="toolexec.oauth.state"), salt="another.salt"),
    ],
    ids=["garbage", "tampered-signature", "wrong-salt"],
)
def test_a_forged_state_is_refused_in_words(browser, google, user, forge):
    query = start_connect(browser)
    response = google_answers(browser, google, forge(query["state"]))

    assert response.status_code == 400
    assert b"could not be verified" in response.content
    assert b"Start connecting your Google account again." in response.content
    assert b'<a href="/credentials/oauth/google/connect/">Start again</a>' in response.content
    assert google.token_requests == []  # the code was never exchanged
    assert not Credential.objects.filter(owner=user).exists()


def test_a_replayed_state_is_refused(browser, google, user):
    query = start_connect(browser)
    assert google_answers(browser, google, query["state"]).status_code == 200

    response = google_answers(browser, google, query["state"])
    assert response.status_code == 400
    assert b"already used once" in response.content
    assert len(google.token_requests) == 1


def test_a_state_from_another_browser_session_is_refused(browser, google, user):
    query = start_connect(browser)
    other_session = Client()
    other_session.force_login(user)

    response = google_answers(other_session, google, query["state"])
    assert response.status_code == 400
    assert b"another browser session" in response.content
    assert google.token_requests == []


def test_a_state_made_for_another_person_is_refused(browser, google):
    query = start_connect(browser)
    someone = Client()
    someone.force_login(UserFactory())
    # Same session cookie value can't be shared, so the person check is what refuses it.
    response = google_answers(someone, google, query["state"])
    assert response.status_code == 400
    assert google.token_requests == []


def test_a_state_older_than_ten_minutes_is_refused(browser, google, monkeypatch):
    eleven_minutes_ago = time.time() - 660
    monkeypatch.setattr(signing.time, "time", lambda: eleven_minutes_ago)
    query = start_connect(browser)
    monkeypatch.undo()

    response = google_answers(browser, google, query["state"])
    assert response.status_code == 400
    assert b"More than 10 minutes passed" in response.content


def test_access_refused_on_googles_page_connects_nothing(browser, google, user):
    query = start_connect(browser)
    response = browser.get(CALLBACK, {"error": "access_denied", "state": query["state"]})

    assert response.status_code == 400
    assert b"did not give access (access_denied)" in response.content
    assert not Credential.objects.filter(owner=user).exists()


def test_a_code_google_refuses_is_explained(browser, google, user):
    query = start_connect(browser)
    response = browser.get(CALLBACK, {"code": "4/0A-unknown", "state": query["state"]})

    assert response.status_code == 400
    assert b"Google refused the sign-in (Bad Request)" in response.content
    assert not Credential.objects.filter(owner=user).exists()


def test_a_callback_without_a_code_connects_nothing(browser, google, user):
    query = start_connect(browser)
    response = browser.get(CALLBACK, {"state": query["state"]})

    assert response.status_code == 400
    assert b"Google sent no sign-in code" in response.content
    assert google.token_requests == []


def test_google_out_of_reach_during_the_exchange_is_explained(browser, google, user):
    google.token_down = True
    query = start_connect(browser)
    response = google_answers(browser, google, query["state"])

    assert response.status_code == 502
    assert b"Google did not answer" in response.content
    assert not Credential.objects.filter(owner=user).exists()


def test_the_account_connects_without_an_email_when_google_does_not_tell_it(browser, google, user):
    google.send_id_token = False
    google.send_userinfo = False  # the userinfo endpoint refuses the token

    query = start_connect(browser)
    assert google_answers(browser, google, query["state"]).status_code == 200
    credential = Credential.objects.get(owner=user)
    assert credential.label == "Google account"
    assert "account_email" not in credential.metadata


# --- Another provider is a settings entry --------------------------------------------------


def test_another_oauth_provider_is_a_settings_entry(browser, google, settings):
    settings.TOOLEXEC_PROVIDERS = {
        "acme": {
            "display_name": "Acme",
            "kinds": ["oauth2"],
            "reconnect_path": "/credentials/oauth/acme/connect/?credential={credential_id}",
            "connect_path": "/credentials/oauth/acme/connect/",
            "token_refresher": "instances.oauth.oauth_refresh",
        }
    }
    settings.TOOLEXEC_OAUTH_CLIENTS = {
        "acme": {
            "authorize_url": "https://login.acme.test/authorize",
            "token_url": "https://login.acme.test/token",
            "client_id": "acme-client",
            "client_secret": "acme-secret",
            "scopes": ["files:read"],
        }
    }
    response = browser.get("/credentials/oauth/acme/connect/")

    assert response.status_code == 302
    url = urlsplit(response["Location"])
    assert (url.netloc, url.path) == ("login.acme.test", "/authorize")
    query = parse_qs(url.query)
    assert query["scope"] == ["files:read"]
    assert query["redirect_uri"] == ["https://toolexec.test/credentials/oauth/acme/callback/"]
    assert "access_type" not in query


# --- Refresh under a lock --------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_concurrent_refreshes_of_one_credential_ask_google_once(api, google, user):
    credential = connect_google(api, google, expires_in=timedelta(seconds=30))
    google.token_delay = 0.5  # long enough for every thread to be waiting on the lock
    results: list[Any] = []
    # Each run loaded the credential before anyone refreshed it.
    loaded = [Credential.objects.get(pk=credential.pk) for _ in range(4)]

    def refresh(mine: Credential) -> None:
        from django.db import connection

        try:
            results.append(oauth_refresh(credential=mine))
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=refresh, args=(mine,)) for mine in loaded]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(google.token_requests) == 1
    tokens = {r["access_token"] if isinstance(r, dict) else repr(r) for r in results}
    assert len(results) == 4 and len(tokens) == 1, results
    credential.refresh_from_db()
    assert credential.reveal_secret()["access_token"] == tokens.pop()


@pytest.mark.redis
def test_refreshing_a_credential_that_already_expired_does_not_ask_google(api, google):
    credential = connect_google(api, google)
    Credential.objects.filter(pk=credential.pk).update(status=Credential.Status.EXPIRED, last_error="revoked")

    with pytest.raises(CredentialExpired):
        oauth_refresh(credential=credential)
    assert google.token_requests == []


@pytest.mark.redis
def test_refreshing_when_google_is_not_set_up_is_an_upstream_error(api, google, settings):
    credential = connect_google(api, google)
    settings.GOOGLE_OAUTH_CLIENT_SECRET = ""

    with pytest.raises(UpstreamError) as raised:
        oauth_refresh(credential=credential)
    assert "not set up to renew the access" in str(raised.value)
    credential.refresh_from_db()
    assert credential.status == Credential.Status.ACTIVE


def test_a_refresh_still_happens_when_redis_is_down(api, google, settings):
    credential = connect_google(api, google)
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there

    secret = oauth_refresh(credential=credential)

    assert secret["access_token"] in google.access_tokens
    assert len(google.token_requests) == 1
