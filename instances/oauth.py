"""OAuth for credential providers (Google): connect, callback, token refresh.

Filled in by the Google Drive issue; the refresher path is named in instances/providers.py.
"""

from typing import Any

from tools.errors import CredentialExpired

from .models import Credential


def google_refresh(*, credential: Credential) -> dict[str, Any]:
    raise CredentialExpired("Refreshing Google tokens is not available yet.", provider="Google")
