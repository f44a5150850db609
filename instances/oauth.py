"""OAuth for credential providers: connect (authorize URL and a signed ``state``), the
callback (code exchange, storing the credential) and token refresh.

Google is built in, from the GOOGLE_OAUTH_* settings. Another provider is a settings entry:
``TOOLEXEC_OAUTH_CLIENTS = {"acme": {"authorize_url": ..., "token_url": ..., "client_id": ...,
"client_secret": ..., "scopes": [...]}}`` beside its ``TOOLEXEC_PROVIDERS`` entry (with
``token_refresher="instances.oauth.oauth_refresh"`` and the connect paths under
/credentials/oauth/<key>/).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import certifi
import urllib3
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.sessions.backends.base import SessionBase
from django.core import signing
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone
from django.utils.crypto import salted_hmac
from redis.exceptions import LockError, RedisError

from core.redis import redis
from tools import registry
from tools.errors import CredentialExpired, UpstreamError, UpstreamRateLimited

from .crypto import SecretUnreadable
from .models import Credential
from .providers import provider_get
from .services.credentials import (
    credential_create,
    credential_error_params,
    credential_mark_failed,
    credential_secret_fresh,
    credential_update,
)

logger = logging.getLogger(__name__)

STATE_SALT = "toolexec.oauth.state"
STATE_MAX_AGE = 600  # seconds from connect to callback
REFRESH_LOCK_SECONDS = 30

# Token endpoints answer quickly; the refresh lock outlives a slow answer.
http = urllib3.PoolManager(
    num_pools=2,
    retries=False,
    timeout=urllib3.Timeout(connect=5.0, read=20.0),
    cert_reqs="CERT_REQUIRED",
    ca_certs=certifi.where(),
)


@dataclass(frozen=True)
class OAuthClient:
    """How toolexec talks OAuth 2 with one provider."""

    provider: str
    authorize_url: str
    token_url: str
    client_id: str
    client_secret: str
    userinfo_url: str = ""
    # Always asked for, besides the scopes the registered tools' credential slots name.
    scopes: tuple[str, ...] = ()
    # A slot's short scope ("drive.readonly") is this prefix plus it.
    scope_prefix: str = ""
    authorize_params: dict[str, str] = field(default_factory=dict)

    def scope_url(self, scope: str) -> str:
        if "://" in scope or scope in {"openid", "email", "profile"} or not self.scope_prefix:
            return scope
        return self.scope_prefix + scope


def oauth_clients() -> dict[str, OAuthClient]:
    google = OAuthClient(
        provider="google",
        authorize_url=settings.GOOGLE_OAUTH_AUTHORIZE_URL,
        token_url=settings.GOOGLE_OAUTH_TOKEN_URL,
        client_id=settings.GOOGLE_OAUTH_CLIENT_ID,
        client_secret=settings.GOOGLE_OAUTH_CLIENT_SECRET,
        userinfo_url=settings.GOOGLE_OAUTH_USERINFO_URL,
        scopes=("openid", "email"),
        scope_prefix="https://www.googleapis.com/auth/",
        # A refresh token every time, also when the account connected before.
        authorize_params={"access_type": "offline", "prompt": "consent"},
    )
    extra = {
        key: OAuthClient(
            provider=key,
            **{
                **options,
                "scopes": tuple(options.get("scopes", ())),
                "authorize_params": options.get("authorize_params", {}),
            },
        )
        for key, options in settings.TOOLEXEC_OAUTH_CLIENTS.items()
    }
    return {"google": google, **extra}


class OAuthRefused(Exception):
    """A connect or callback that cannot go on; ``message`` is shown to the person."""

    def __init__(self, title: str, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.title, self.message, self.status = title, message, status


def oauth_client_get(provider: str) -> OAuthClient:
    client = oauth_clients().get(provider)
    if client is None:
        raise OAuthRefused("Unknown account type", "There is no account of that kind to connect here.", status=404)
    return client


def _configured(client: OAuthClient) -> OAuthClient:
    if not (client.client_id and client.client_secret and client.authorize_url and client.token_url):
        name = provider_get(client.provider).display_name
        raise OAuthRefused(
            f"Connecting {name} accounts is not set up",
            f"This server is not set up to connect {name} accounts yet. Ask your administrator to configure it.",
            status=503,
        )
    return client


def redirect_uri(provider: str) -> str:
    return settings.TOOLEXEC_BASE_URL + reverse("oauth:callback", kwargs={"provider": provider})


def requested_scopes(client: OAuthClient) -> list[str]:
    """The client's own scopes and every scope a registered tool's slot of this provider needs."""
    wanted = [client.scope_url(s) for s in client.scopes]
    for tool in registry.registered_tools().values():
        for slot in tool.credential_slots:
            if slot.provider == client.provider:
                wanted += [client.scope_url(s) for s in slot.scopes]
    return list(dict.fromkeys(wanted))


# --- Connect and callback --------------------------------------------------------------


def _session_tag(session: SessionBase) -> str:
    """Binds a state to one browser session without putting the session key in a URL."""
    if session.session_key is None:
        session.save()
    return salted_hmac("toolexec.oauth.session", session.session_key or "").hexdigest()[:32]


def _owned_credential(*, user: AbstractBaseUser, provider: str, credential_id: str) -> Credential:
    try:
        pk = uuid.UUID(str(credential_id))
    except ValueError:
        credential = None
    else:
        credential = Credential.objects.filter(pk=pk, owner_id=user.pk, provider=provider).first()
    if credential is None:
        name = provider_get(provider).display_name
        raise OAuthRefused(
            "Credential not found", f"We couldn't find that {name} credential in your account.", status=404
        )
    return credential


def oauth_authorize_url(
    *,
    provider: str,
    user: AbstractBaseUser,
    session: SessionBase,
    credential_id: str | None = None,
    next_url: str = "",
) -> str:
    """Where to send the person to allow access: the provider's authorize URL with a signed,
    expiring ``state`` bound to this user and browser session (and the credential to replace)."""
    client = _configured(oauth_client_get(provider))
    if credential_id:
        credential_id = str(_owned_credential(user=user, provider=provider, credential_id=credential_id).pk)
    state = signing.dumps(
        {
            "n": secrets.token_urlsafe(16),
            "p": provider,
            "u": str(user.pk),
            "s": _session_tag(session),
            "c": credential_id or "",
            "next": next_url,
        },
        salt=STATE_SALT,
        compress=True,
    )
    query = {
        "client_id": client.client_id,
        "redirect_uri": redirect_uri(provider),
        "response_type": "code",
        "scope": " ".join(requested_scopes(client)),
        **client.authorize_params,
        "state": state,
    }
    separator = "&" if "?" in client.authorize_url else "?"
    return client.authorize_url + separator + urlencode(query)


@dataclass(frozen=True)
class OAuthState:
    provider: str
    credential_id: str
    next_url: str


def oauth_state_check(*, provider: str, user: AbstractBaseUser, session: SessionBase, state: str) -> OAuthState:
    """The callback's ``state``, verified: signed by us, at most 10 minutes old, made for this
    provider, user and browser session, and never used before (it is spent now)."""
    name = provider_get(provider).display_name
    again = f"Start connecting your {name} account again."
    try:
        data = signing.loads(state, salt=STATE_SALT, max_age=STATE_MAX_AGE)
    except signing.SignatureExpired:
        raise OAuthRefused(
            "The sign-in took too long", f"More than 10 minutes passed since you started. {again}"
        ) from None
    except signing.BadSignature:
        raise OAuthRefused(
            "The sign-in could not be verified",
            f"This answer from {name} does not come from a sign-in started here, so nothing was connected. {again}",
        ) from None
    if not isinstance(data, dict) or data.get("p") != provider or data.get("u") != str(user.pk):
        raise OAuthRefused(
            "The sign-in could not be verified",
            f"This answer from {name} was meant for another sign-in, so nothing was connected. {again}",
        )
    if data.get("s") != _session_tag(session):
        raise OAuthRefused(
            "The sign-in could not be verified",
            f"This sign-in was started in another browser session, so nothing was connected. {again}",
        )
    if not cache.add(f"oauth:state-used:{data.get('n')}", 1, timeout=STATE_MAX_AGE + 60):
        raise OAuthRefused(
            "This sign-in was already used",
            f"This answer from {name} was already used once, so it was not used again. {again}",
        )
    return OAuthState(provider=provider, credential_id=str(data.get("c") or ""), next_url=str(data.get("next") or ""))


def oauth_connect_complete(*, user: AbstractBaseUser, state: OAuthState, code: str) -> Credential:
    """Exchange the authorization ``code`` and store the account as an ACTIVE credential:
    replacing the one the connect named, else the one of the same account, else a new one."""
    client = _configured(oauth_client_get(state.provider))
    name = provider_get(state.provider).display_name
    if not code:
        raise OAuthRefused("Nothing to connect", f"{name} sent no sign-in code. Start connecting again.")
    try:
        answer = _token_request(
            client,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri(state.provider),
                "client_id": client.client_id,
                "client_secret": client.client_secret,
            },
        )
    except TokenRefused as refused:
        raise OAuthRefused(
            f"{name} did not accept the sign-in",
            f"{name} refused the sign-in ({refused.description}). Start connecting your account again.",
            status=400,
        ) from None
    except UpstreamError:
        raise OAuthRefused(
            f"{name} could not be reached",
            f"We could not finish connecting your {name} account because {name} did not answer. Try again.",
            status=502,
        ) from None
    email = _account_email(client, answer)
    scopes = str(answer.get("scope") or "").split()

    existing = None
    if state.credential_id:
        existing = _owned_credential(user=user, provider=state.provider, credential_id=state.credential_id)
    elif email:
        existing = (
            Credential.objects.filter(owner_id=user.pk, provider=state.provider, metadata__account_email=email)
            .order_by("-updated_at")
            .first()
        )
    old_refresh = _stored_refresh_token(existing) if existing is not None else None
    secret = {"access_token": str(answer["access_token"])}
    refresh_token = answer.get("refresh_token") or old_refresh
    if refresh_token:
        secret["refresh_token"] = str(refresh_token)
    expires_at = _expires_at(answer)
    if existing is not None:
        metadata = {**existing.metadata, **({"account_email": email} if email else {}), "scopes": scopes}
        return credential_update(credential=existing, secret=secret, expires_at=expires_at, metadata=metadata)
    metadata = {"scopes": scopes, **({"account_email": email} if email else {})}
    return credential_create(
        owner=user,
        provider=state.provider,
        kind=Credential.Kind.OAUTH2,
        secret=secret,
        label=f"{name} ({email})" if email else f"{name} account",
        expires_at=expires_at,
        metadata=metadata,
    )


def _stored_refresh_token(credential: Credential) -> str | None:
    try:
        return credential.reveal_secret().get("refresh_token")
    except SecretUnreadable:
        return None  # the new answer replaces what can no longer be read


def _account_email(client: OAuthClient, answer: dict[str, Any]) -> str:
    """The account's email from the ID token (which came straight from the token endpoint over
    TLS, so its signature need not be checked), else from the userinfo endpoint."""
    claims = _jwt_claims(str(answer.get("id_token") or ""))
    if claims.get("email"):
        return str(claims["email"])
    if not client.userinfo_url:
        return ""
    try:
        response = http.request(
            "GET", client.userinfo_url, headers={"Authorization": f"Bearer {answer['access_token']}"}
        )
        data = json.loads(response.data) if response.status == 200 else {}
    except (urllib3.exceptions.HTTPError, ValueError):
        return ""  # the email is a nicety; the connection works without it
    return str(data.get("email") or "") if isinstance(data, dict) else ""


def _jwt_claims(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _expires_at(answer: dict[str, Any]) -> datetime | None:
    try:
        seconds = int(answer.get("expires_in"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return timezone.now() + timedelta(seconds=seconds)


# --- The token endpoint ------------------------------------------------------------------


class TokenRefused(Exception):
    """The token endpoint refused the grant (``error``, e.g. invalid_grant)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error, self.description = error, description


def _token_request(client: OAuthClient, form: dict[str, str]) -> dict[str, Any]:
    name = provider_get(client.provider).display_name
    try:
        response = http.request(
            "POST", client.token_url, fields=form, encode_multipart=False, headers={"Accept": "application/json"}
        )
    except urllib3.exceptions.HTTPError:
        raise UpstreamError(f"{name}'s sign-in service could not be reached.", provider=client.provider) from None
    try:
        data = json.loads(response.data or b"{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if response.status == 200 and data.get("access_token"):
        return data
    if response.status == 429:
        raise UpstreamRateLimited(
            f"{name}'s sign-in service is limiting requests.", provider=client.provider, retry_after_seconds=30
        )
    if response.status >= 500:
        raise UpstreamError(f"{name}'s sign-in service is having trouble right now.", provider=client.provider)
    error = str(data.get("error") or f"HTTP {response.status}")
    raise TokenRefused(error, str(data.get("error_description") or error))


# --- Refresh -----------------------------------------------------------------------------


@contextmanager
def _refresh_lock(credential_id: str) -> Iterator[None]:
    """One refresh of a credential at a time, across processes. Without Redis the refresh
    still happens (an extra refresh is harmless; a refused run is not)."""
    lock = redis().lock(
        f"toolexec:oauth-refresh:{credential_id}", timeout=REFRESH_LOCK_SECONDS, blocking_timeout=REFRESH_LOCK_SECONDS
    )
    try:
        acquired = lock.acquire()
    except RedisError:
        logger.warning("Refreshing credential %s without a lock: Redis is unavailable", credential_id)
        acquired = False
    try:
        yield
    finally:
        if acquired:
            try:
                lock.release()
            except (LockError, RedisError):
                pass  # it expired meanwhile; nothing holds it any more


def oauth_refresh(*, credential: Credential) -> dict[str, Any]:
    """A new access token for ``credential`` from its refresh token, stored (with the new
    expiry, and a new refresh token if one came) and returned as the credential's secret.

    Under a per-credential lock: a caller that waited for someone else's refresh gets that
    one. A refused refresh (``invalid_grant``) or a missing refresh token makes the credential
    EXPIRED and raises CredentialExpired.
    """
    client = oauth_client_get(credential.provider)
    params = credential_error_params(provider=credential.provider, credential_id=str(credential.pk))
    seen = credential.fingerprint
    with _refresh_lock(str(credential.pk)):
        current = Credential.objects.get(pk=credential.pk)
        if current.status in (Credential.Status.EXPIRED, Credential.Status.REVOKED):
            raise CredentialExpired(current.last_error or "The access was not renewed.", **params)
        secret = current.reveal_secret()
        if current.fingerprint != seen:
            return secret  # refreshed by someone else while we waited
        refresh_token = secret.get("refresh_token")
        if not refresh_token:
            reason = "There is no refresh token to renew this access with."
            credential_mark_failed(credential_id=str(current.pk), status=Credential.Status.EXPIRED, reason=reason)
            raise CredentialExpired(reason, **params)
        try:
            answer = _token_request(
                _configured_for_refresh(client),
                {
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": client.client_id,
                    "client_secret": client.client_secret,
                },
            )
        except TokenRefused as refused:
            if refused.error in ("invalid_grant", "unauthorized_client", "invalid_scope"):
                reason = f"{params['provider']} refused to renew the access: {refused.description}"
                credential_mark_failed(credential_id=str(current.pk), status=Credential.Status.EXPIRED, reason=reason)
                raise CredentialExpired(reason, **params) from None
            # invalid_client and the like: this server's OAuth settings, not the person's account.
            logger.error("The %s token endpoint refused a refresh: %s", client.provider, refused.error)
            raise UpstreamError(
                f"{params['provider']} refused this server's sign-in settings ({refused.error}).",
                provider=client.provider,
                metadata={"can_retry": False},
            ) from None
        new_secret = {"access_token": str(answer["access_token"]), "refresh_token": str(refresh_token)}
        if answer.get("refresh_token"):
            new_secret["refresh_token"] = str(answer["refresh_token"])
        changes: dict[str, Any] = {"secret": new_secret, "expires_at": _expires_at(answer)}
        if answer.get("scope"):
            changes["metadata"] = {**current.metadata, "scopes": str(answer["scope"]).split()}
        credential_update(credential=current, **changes)
    return new_secret


def _configured_for_refresh(client: OAuthClient) -> OAuthClient:
    try:
        return _configured(client)
    except OAuthRefused:
        raise UpstreamError(
            "This server is not set up to renew the access; ask your administrator.",
            provider=client.provider,
            metadata={"can_retry": False},
        ) from None


def google_refresh(*, credential: Credential) -> dict[str, Any]:
    """The Google provider's token refresher (named in instances/providers.py)."""
    return oauth_refresh(credential=credential)


def google_test_connection(*, credential: Credential) -> tuple[bool, str]:
    """The Google provider's connection test: a userinfo call with the stored token, refreshed
    first when it has expired (or is about to)."""
    client = oauth_client_get(credential.provider)
    secret = credential_secret_fresh(credential=credential, secret=credential.reveal_secret())
    try:
        response = http.request(
            "GET", client.userinfo_url, headers={"Authorization": f"Bearer {secret['access_token']}"}
        )
    except urllib3.exceptions.HTTPError:
        return False, "Google could not be reached; try again later."
    if response.status == 200:
        try:
            data = json.loads(response.data)
        except ValueError:
            data = {}
        email = str(data.get("email") or "") if isinstance(data, dict) else ""
        return True, f"Google accepted the token{f' for {email}' if email else ''}."
    if response.status in (401, 403):
        return False, f"Google refused the token (HTTP {response.status}); the account needs to be reconnected."
    return False, f"Google answered HTTP {response.status}; try again later."
