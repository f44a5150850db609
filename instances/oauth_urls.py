"""OAuth connect and callback pages, under /credentials/oauth/ (see instances/oauth.py)."""

from django.urls import URLPattern

app_name = "oauth"
urlpatterns: list[URLPattern] = []
