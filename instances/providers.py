"""The credential providers toolexec knows: display names, accepted kinds, reconnect links.

Adding a provider is an entry here or in the ``TOOLEXEC_PROVIDERS`` setting (a dict of
key → Provider keyword arguments), never a change in the services.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class Provider:
    key: str
    display_name: str
    kinds: tuple[str, ...]
    # Where a person fixes a broken credential ("{credential_id}" is filled in) or adds one.
    reconnect_path: str = "/api/v1/credentials/{credential_id}/"
    connect_path: str = "/api/v1/credentials/"
    # Dotted path of ``fn(*, credential) -> secret`` that refreshes an OAuth credential.
    token_refresher: str = ""
    # Dotted path of ``fn(*, credential) -> (works, message)``: the cheapest call that proves
    # the credential (the admin's "test connection"); empty when the provider has none.
    connection_tester: str = ""


BUILTIN_PROVIDERS: dict[str, Provider] = {
    "google": Provider(
        key="google",
        display_name="Google",
        kinds=("oauth2",),
        reconnect_path="/credentials/oauth/google/connect/?credential={credential_id}",
        connect_path="/credentials/oauth/google/connect/",
        token_refresher="instances.oauth.google_refresh",
        connection_tester="instances.oauth.google_test_connection",
    ),
    "http": Provider(key="http", display_name="HTTP service", kinds=("api_key", "bearer", "basic")),
}


def providers() -> dict[str, Provider]:
    extra = {
        key: Provider(key=key, **{**options, "kinds": tuple(options.get("kinds", ()))})
        for key, options in settings.TOOLEXEC_PROVIDERS.items()
    }
    return {**BUILTIN_PROVIDERS, **extra}


def provider_get(key: str) -> Provider:
    """The provider ``key``, or a plain one named after the key for a provider we don't know."""
    return providers().get(key) or Provider(key=key, display_name=key.replace("_", " ").title(), kinds=())


def provider_display(key: str) -> str:
    """The display name of a provider key; a name we don't know is shown as it was given."""
    known = providers().get(key)
    return known.display_name if known else key


def reconnect_path(*, provider: str, credential_id: str | None) -> str:
    """Where to fix credential ``credential_id`` of ``provider`` (or connect one, if None)."""
    entry = provider_get(provider)
    if credential_id is None:
        return entry.connect_path
    return entry.reconnect_path.format(credential_id=credential_id)
