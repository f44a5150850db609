from django.contrib.auth import authenticate
from django.contrib.auth.models import AbstractBaseUser
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.request import Request

from .models import ApiToken, token_hash


class HashedTokenAuthentication(TokenAuthentication):
    """`Authorization: Token <key>`, looked up by the key's hash (the unique index on
    ``key_hash``), with its user: one query per request."""

    model = ApiToken

    def authenticate_credentials(self, key: str) -> tuple[AbstractBaseUser, ApiToken]:
        token = ApiToken.objects.select_related("user").filter(key_hash=token_hash(key)).first()
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
