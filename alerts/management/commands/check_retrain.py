"""manage.py check_retrain [--fleet NAME] [--dry-run]: the nightly retraining check, now (same services as
the Celery task): evaluate the triggers and start a candidate retrain where one fires."""
from django.core.management.base import BaseCommand, CommandError

from alerts.health import retrain_start, retrain_triggers
from detection.models import Fleet


class Command(BaseCommand):
    help = "Evaluate retraining triggers (drift, anomaly rate, precision, model age); start candidate retrains."

    def add_arguments(self, parser):
        parser.add_argument("--fleet", help="one fleet (default: every fleet)")
        parser.add_argument("--dry-run", action="store_true", help="only report the triggers")

    def handle(self, *args, fleet=None, dry_run=False, **options):
        fleets = Fleet.objects.all()
        if fleet is not None:
            fleets = fleets.filter(name=fleet)
            if not fleets.exists():
                raise CommandError(f"--fleet: no fleet named {fleet!r}")
        for target in fleets:
            reasons = retrain_triggers(fleet=target)
            if not reasons:
                self.stdout.write(f"{target.name}: no trigger fires")
                continue
            for reason in reasons:
                self.stdout.write(f"{target.name}: {reason.kind}: {reason.detail}")
            if not dry_run:
                run = retrain_start(fleet=target, reasons=reasons, actor_label="check_retrain")
                self.stdout.write(f"{target.name}: " + (f"candidate retrain run {run.pk} started" if run
                                                        else "a run is already in flight; nothing started"))
