"""OAuth connect and callback pages, under /credentials/oauth/ (see instances/oauth.py)."""

from django.urls import URLPattern, path

from . import oauth_views

app_name = "oauth"
urlpatterns: list[URLPattern] = [
    path("<slug:provider>/connect/", oauth_views.connect, name="connect"),
    path("<slug:provider>/callback/", oauth_views.callback, name="callback"),
]
