"""The OAuth connect and callback pages (login required); the work is in instances/oauth.py."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from .oauth import OAuthRefused, oauth_authorize_url, oauth_connect_complete, oauth_state_check
from .providers import provider_get


@never_cache
@require_GET
@login_required
def connect(request: HttpRequest, provider: str) -> HttpResponse:
    try:
        url = oauth_authorize_url(
            provider=provider,
            user=request.user,
            session=request.session,
            credential_id=request.GET.get("credential") or None,
            next_url=_safe_next(request),
        )
    except OAuthRefused as refused:
        return _refusal(request, refused)
    return HttpResponseRedirect(url)


@never_cache
@require_GET
@login_required
def callback(request: HttpRequest, provider: str) -> HttpResponse:
    name = provider_get(provider).display_name
    try:
        state = oauth_state_check(
            provider=provider, user=request.user, session=request.session, state=request.GET.get("state", "")
        )
        if request.GET.get("error"):
            raise OAuthRefused(
                "Nothing was connected",
                f"{name} did not give access ({request.GET['error'][:100]}), so nothing was connected. "
                f"Start again and allow access to connect your {name} account.",
            )
        credential = oauth_connect_complete(user=request.user, state=state, code=request.GET.get("code", ""))
    except OAuthRefused as refused:
        return _refusal(request, refused, start_again=provider)
    if state.next_url:
        return HttpResponseRedirect(state.next_url)
    account = credential.metadata.get("account_email") or f"your {name} account"
    return render(
        request,
        "oauth/result.html",
        {"title": f"{name} account connected", "message": f"{account} is connected. You can close this page."},
    )


def _refusal(request: HttpRequest, refused: OAuthRefused, *, start_again: str = "") -> HttpResponse:
    context = {"title": refused.title, "message": refused.message}
    if start_again and refused.status in (400, 502):
        context["start_again_url"] = reverse("oauth:connect", kwargs={"provider": start_again})
    return render(request, "oauth/result.html", context, status=refused.status)


def _safe_next(request: HttpRequest) -> str:
    """``next`` when it points at this site (or TOOLEXEC_BASE_URL's); anything else is dropped."""
    next_url = request.GET.get("next", "")
    hosts = {request.get_host(), urlsplit(settings.TOOLEXEC_BASE_URL).netloc}
    if next_url and url_has_allowed_host_and_scheme(next_url, allowed_hosts=hosts, require_https=request.is_secure()):
        return next_url
    return ""
