"""Adding a credential provider is a settings entry, not a change in the services."""

import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme(settings):
    settings.TOOLEXEC_PROVIDERS = {"acme": {"display_name": "Acme CRM", "kinds": ["api_key"]}}


def test_a_provider_added_in_settings_takes_credentials(api, acme):
    response = api.post(
        "/api/v1/credentials/",
        {"provider": "acme", "kind": "api_key", "label": "CRM", "secret": {"api_key": "k-123456"}},
        format="json",
    )

    assert response.status_code == 201, response.json()
    assert response.json()["provider"] == "acme"


def test_a_provider_added_in_settings_refuses_kinds_it_does_not_take(api, acme):
    response = api.post(
        "/api/v1/credentials/",
        {"provider": "acme", "kind": "bearer", "secret": {"token": "t-123456"}},
        format="json",
    )

    assert response.status_code == 400
    assert response.json()["metadata"]["field_errors"]["kind"] == ["Acme CRM credentials are of kind: api_key."]


def test_an_unknown_provider_is_refused_naming_the_known_ones(api):
    response = api.post(
        "/api/v1/credentials/", {"provider": "nope", "kind": "bearer", "secret": {"token": "t-123456"}}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["metadata"]["field_errors"]["provider"] == ["Unknown provider; use one of: google, http."]
