from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from toolexec.demo import ADMIN_USERNAME, DEMO_TOOL_SLUG, DEMO_USERNAME, curl_execute_sync, demo_seed


class Command(BaseCommand):
    help = (
        f"Create or refresh the demo logins ({ADMIN_USERNAME!r}, {DEMO_USERNAME!r}) with new random passwords, "
        f"a new API token for {DEMO_USERNAME!r} and a {DEMO_TOOL_SLUG} instance; print them. Needs DEBUG=true."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--base-url",
            default=settings.TOOLEXEC_BASE_URL,
            help="Where the server answers, for the printed curl line (default: TOOLEXEC_BASE_URL).",
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
        curl = curl_execute_sync(base_url=base_url.rstrip("/"), instance=seed.instance, token_key=seed.token_key)
        self.stdout.write(
            f"Superuser (admin site):       {ADMIN_USERNAME} / {seed.admin_password}\n"
            f"Demo user (browsable API):    {DEMO_USERNAME} / {seed.demo_password}\n"
            f"Demo user's API token:        {seed.token_key}\n"
            f"Run the demo instance of {DEMO_TOOL_SLUG} ({seed.instance.pk}):\n"
            f"  {curl}"
        )
