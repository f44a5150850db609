from django.core.management.base import BaseCommand, CommandError

from instances.services.credentials import credential_rotate_keys


class Command(BaseCommand):
    help = (
        "Re-encrypt every credential secret with the first key of TOOLEXEC_ENCRYPTION_KEYS. "
        "Put the new key first, run this, then drop the old keys. Safe to run again."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--batch-size", type=int, default=500)

    def handle(self, *args: object, batch_size: int, **options: object) -> None:
        rotated, unreadable = credential_rotate_keys(batch_size=batch_size)
        self.stdout.write(self.style.SUCCESS(f"Re-encrypted {rotated} credential secret(s) with the first key."))
        if unreadable:
            raise CommandError(
                f"{len(unreadable)} secret(s) did not decrypt with any configured key and were left as they are: "
                + ", ".join(unreadable)
            )
