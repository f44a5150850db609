from django.apps import AppConfig


class ToolexecConfig(AppConfig):
    """The project package: settings, URLs, ASGI/WSGI entry points and the demo data
    (``manage.py seed_demo``). Its migrations moved API tokens to the core app."""

    name = "toolexec"
    verbose_name = "toolexec"
