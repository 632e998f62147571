"""manage.py sync_schedules: write the beat schedule (anomaly_project/celery.py) into django-celery-beat."""
from django.core.management.base import BaseCommand, CommandError

from alerts.schedules import schedules_sync


class Command(BaseCommand):
    help = "Copy beat_schedule into django-celery-beat's PeriodicTask table (the schedule dict wins)."

    def add_arguments(self, parser):
        parser.add_argument("--keep-edits", action="store_true",
                            help="only create missing entries; keep admins' changes to existing ones")

    def handle(self, *args, keep_edits: bool = False, **options):
        try:
            result = schedules_sync(overwrite=not keep_edits)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        for label, names in (("created", result.created), ("updated", result.updated), ("kept", result.kept),
                             ("disabled (no longer in beat_schedule)", result.disabled)):
            if names:
                self.stdout.write(f"{label}: {', '.join(sorted(names))}")
        self.stdout.write(self.style.SUCCESS("schedules in sync"))
