from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from toolexec.demo import (
    ADMIN_USERNAME,
    DEMO_TOOL_SLUG,
    DEMO_USERNAME,
    curl_execute_sync,
    curl_workflow_run,
    demo_seed,
    workflow_page_url,
)


class Command(BaseCommand):
    help = (
        f"Create or refresh the demo logins ({ADMIN_USERNAME!r}, {DEMO_USERNAME!r}) with new random passwords, "
        f"a new API token for {DEMO_USERNAME!r}, a {DEMO_TOOL_SLUG} instance and a demo workflow; print them. "
        "Needs DEBUG=true."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--base-url",
            default=settings.TOOLEXEC_BASE_URL,
            help="Where the server answers, for the printed curl lines (default: TOOLEXEC_BASE_URL).",
        )

    def handle(self, *args: object, base_url: str, **options: object) -> None:
        if not settings.DEBUG:
            raise CommandError(
                f"seed_demo resets the passwords of {ADMIN_USERNAME!r} and {DEMO_USERNAME!r}, "
                "so it runs only on a development server (DEBUG=true)."
            )
        try:
            seed = demo_seed()
        except LookupError as exc:
            raise CommandError(str(exc)) from None
        base_url = base_url.rstrip("/")
        curl = curl_execute_sync(base_url=base_url, instance=seed.instance, token_key=seed.token_key)
        run_curl = curl_workflow_run(base_url=base_url, workflow=seed.workflow, token_key=seed.token_key)
        self.stdout.write(
            f"Superuser (admin site):       {ADMIN_USERNAME} / {seed.admin_password}\n"
            f"Demo user (browsable API):    {DEMO_USERNAME} / {seed.demo_password}\n"
            f"Demo user's API token:        {seed.token_key}\n"
            f"Run the demo instance of {DEMO_TOOL_SLUG} ({seed.instance.pk}):\n"
            f"  {curl}\n"
            f"Run the demo workflow {seed.workflow.name!r} ({seed.workflow.pk}): list, then each region "
            "(a fan-out, 2 at a time), then summary; it answers 202 with run_url and events_url:\n"
            f"  {run_curl}\n"
            f"Watch its runs, or start one, on its page (signed in as {DEMO_USERNAME}):\n"
            f"  {workflow_page_url(base_url=base_url, workflow=seed.workflow)}"
        )
