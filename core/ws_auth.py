"""Who is on the other end of a WebSocket (DESIGN.md §11), and the close codes that say no.

Three ways in, the first that is presented wins:

- an API token, as the subprotocol pair ``["toolexec.token", "<token>"]`` (browsers and most
  clients can send subprotocols; a URL ends up in logs, so a long-lived token never goes in one);
- a ticket from ``POST /api/v1/ws-tickets`` as ``?ticket=…``: it signs in one socket, once,
  within TICKET_SECONDS;
- the session cookie (the status pages).

Credentials that were presented and do not hold leave the socket anonymous: the consumer
accepts it and closes it with 4401, so a client learns why (a refusal before the handshake
would reach it as a bare HTTP 403). A foreign ``Origin`` is refused before all of this
(:func:`OriginCheck`): a page on another site must not ride on the session cookie.
"""

from __future__ import annotations

import secrets
from enum import IntEnum
from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from rest_framework.exceptions import AuthenticationFailed

from .auth import HashedTokenAuthentication
from .models import token_hash
from .redis import redis

TOKEN_SUBPROTOCOL = "toolexec.token"
TICKET_SECONDS = 60


class CloseCode(IntEnum):
    """How a live socket ends. Refusals send an error frame first, in words (a close frame's
    reason is dropped by some servers, daphne among them)."""

    NORMAL = 1000  # the job (or run) reached its terminal state
    SERVER_ERROR = 1011  # live events are unavailable (Redis); the client may fall back to SSE or polling
    INPUT_INVALID = 4400  # a malformed message
    NOT_AUTHENTICATED = 4401  # no credentials, or credentials that do not hold
    NOT_FOUND = 4404  # no such job, or not yours: the same code, so ids do not leak
    TOO_MANY_SUBSCRIPTIONS = 4429  # more than TOOLEXEC_WS_MAX_SUBSCRIPTIONS on one socket


# --- Tickets --------------------------------------------------------------------------------


def _ticket_key(ticket: str) -> str:
    # Kept by the ticket's hash, as tokens are: a copy of Redis holds nothing to sign in with.
    return f"toolexec:ws-ticket:{token_hash(ticket)}"


def ws_ticket_issue(*, user: AbstractBaseUser) -> str:
    """A ticket that signs ``user``'s next WebSocket in, once, within TICKET_SECONDS."""
    ticket = secrets.token_urlsafe(32)
    redis().set(_ticket_key(ticket), str(user.pk), ex=TICKET_SECONDS)
    return ticket


def ws_ticket_redeem(ticket: str) -> AbstractBaseUser | None:
    """The active user the ticket was issued to; the ticket is gone after this (GETDEL), so a
    second use, like an expired or made-up ticket, gives None."""
    user_id = redis().getdel(_ticket_key(ticket))
    if user_id is None:
        return None
    return get_user_model().objects.filter(pk=user_id.decode(), is_active=True).first()


def ws_token_user(key: str) -> AbstractBaseUser | None:
    """The active user of an API token: the lookup the REST API makes (by the key's hash)."""
    try:
        user, _ = HashedTokenAuthentication().authenticate_credentials(key)
    except AuthenticationFailed:
        return None
    return user


# --- The middleware -------------------------------------------------------------------------


def presented_token(scope: dict[str, Any]) -> str | None:
    """The token of a ``["toolexec.token", "<token>"]`` subprotocol pair ("" when the marker
    came without a token), or None when the client offered no such pair."""
    offered = list(scope.get("subprotocols") or ())
    if TOKEN_SUBPROTOCOL not in offered:
        return None
    following = offered[offered.index(TOKEN_SUBPROTOCOL) + 1 :]
    return following[0] if following else ""


def accepted_subprotocol(scope: dict[str, Any]) -> str | None:
    """What the handshake answers: the marker, when the client offered it (a browser drops a
    socket whose answer names none of the subprotocols it offered)."""
    return TOKEN_SUBPROTOCOL if presented_token(scope) is not None else None


def _ticket(scope: dict[str, Any]) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("ticket")
    return values[-1] if values else None


def _sign_in(token: str | None, ticket: str | None) -> AbstractBaseUser | None:
    if token is not None:
        return ws_token_user(token) if token else None
    return ws_ticket_redeem(ticket) if ticket else None


class TokenAuthMiddleware(BaseMiddleware):
    """Puts the user of a presented token or ticket in ``scope["user"]``, in place of the
    session's, and says how the socket signed in in ``scope["auth"]`` ("token", "ticket",
    "session", or None): what a user may follow can depend on it."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        scope = dict(scope)
        token, ticket = presented_token(scope), _ticket(scope)
        if token is not None or ticket is not None:
            user = await database_sync_to_async(_sign_in)(token, ticket)
            scope["user"] = user if user is not None else AnonymousUser()
            scope["auth"] = ("token" if token is not None else "ticket") if user is not None else None
        else:
            scope["auth"] = "session" if scope["user"].is_authenticated else None
        return await self.inner(scope, receive, send)


def WebsocketAuthStack(inner: Any) -> Any:
    """Channels' session stack (cookies, session, user), then tokens and tickets."""
    return AuthMiddlewareStack(TokenAuthMiddleware(inner))


class _OriginCheck(OriginValidator):
    def valid_origin(self, parsed_origin: Any) -> bool:
        # Browsers always send an Origin on a WebSocket handshake; a client that sends none is
        # a program (with a token or a ticket), which no other site's page can drive.
        return parsed_origin is None or super().valid_origin(parsed_origin)


def OriginCheck(application: Any) -> Any:
    """Channels' AllowedHostsOriginValidator (an Origin whose host is not in ALLOWED_HOSTS is
    refused at the handshake), except that a handshake without an Origin passes."""
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
    return _OriginCheck(application, allowed_hosts)
