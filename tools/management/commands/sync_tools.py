from django.core.management.base import BaseCommand

from tools.services import catalog_sync


class Command(BaseCommand):
    help = "Upsert the tool catalog from the registered implementations; mark missing ones unavailable."

    def handle(self, *args: object, **options: object) -> None:
        report = catalog_sync()
        for slug in report.created:
            self.stdout.write(f"created      {slug}")
        for slug in report.updated:
            self.stdout.write(f"updated      {slug}")
        for slug, reason in report.unavailable.items():
            self.stdout.write(self.style.WARNING(f"unavailable  {slug}: {reason}"))
        self.stdout.write(
            self.style.SUCCESS(
                f"Catalog synced: {len(report.created)} created, {len(report.updated)} updated, "
                f"{len(report.unavailable)} unavailable."
            )
        )
