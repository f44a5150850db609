from django.apps import AppConfig


class ToolexecConfig(AppConfig):
    name = "toolexec"
    verbose_name = "Access"
