from typing import Any

from django.contrib.auth import authenticate
from django.contrib.auth.models import AbstractBaseUser
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.request import Request

from .models import ApiToken, token_hash
from .sql import Loader

# ``ApiToken.objects.select_related("user").filter(key_hash=…)``, its SQL written once: every
# API request runs it (docs/benchmarks.md, benchmark 1).
_TOKEN = Loader(ApiToken, related=("user",), where=("key_hash",))


class HashedTokenAuthentication(TokenAuthentication):
    """`Authorization: Token <key>`, looked up by the key's hash.

    A view that needs a row of its own on every request may load it with the token, in one
    statement: its ``load_with_token(key_hash)`` returns the token (with its user) or None, and
    keeps what it loaded beside it.
    """

    model = ApiToken
    view: Any = None

    def authenticate(self, request: Request) -> tuple[AbstractBaseUser, ApiToken] | None:
        self.view = (request.parser_context or {}).get("view")
        return super().authenticate(request)

    def authenticate_credentials(self, key: str) -> tuple[AbstractBaseUser, ApiToken]:
        load_with_token = getattr(self.view, "load_with_token", None)
        token = _TOKEN.load(token_hash(key)) if load_with_token is None else load_with_token(token_hash(key))
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("That API token is not valid: sign in again for a new one.")
        return token.user, token


def token_issue_for_login(*, request: Request, username: str, password: str) -> str:
    """Check a username and password and issue a new token; the key is returned once."""
    user = authenticate(request=request, username=username, password=password)
    if user is None or not user.is_active:
        raise exceptions.AuthenticationFailed("That username and password do not match an active account.")
    _, key = ApiToken.issue(user=user, name="api login")
    return key
