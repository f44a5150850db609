"""Throttles whose rates are read at request time, so settings (and tests) can change them.

Kept apart from the views: DRF imports these while it builds APIView.
"""

from rest_framework.settings import api_settings
from rest_framework.throttling import AnonRateThrottle, ScopedRateThrottle, UserRateThrottle


class _CurrentRateMixin:
    scope: str

    def get_rate(self) -> str | None:
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)


class AnonThrottle(_CurrentRateMixin, AnonRateThrottle):
    pass


class UserThrottle(_CurrentRateMixin, UserRateThrottle):
    pass


class ScopedThrottle(_CurrentRateMixin, ScopedRateThrottle):
    pass
