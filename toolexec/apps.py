from django.apps import AppConfig


class ToolexecConfig(AppConfig):
    name = "toolexec"
    verbose_name = "Access"

    def ready(self) -> None:
        from .redaction import install_log_redaction

        install_log_redaction()
