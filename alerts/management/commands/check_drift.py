"""manage.py check_drift [--fleet NAME]: the daily drift check, now (the Celery task calls the same service)."""
from django.core.management.base import BaseCommand, CommandError

from alerts.health import DriftCheckError, drift_check, drift_check_all
from detection.models import Fleet


class Command(BaseCommand):
    help = "Compare recent telemetry with the active baseline version's training window; save a drift report."

    def add_arguments(self, parser):
        parser.add_argument("--fleet", help="one fleet (default: every fleet with an active baseline version)")

    def handle(self, *args, fleet=None, **options):
        if fleet is None:
            for name, status in drift_check_all().items():
                self.stdout.write(f"{name}: {status}")
            return
        target = Fleet.objects.filter(name=fleet).first()
        if target is None:
            raise CommandError(f"--fleet: no fleet named {fleet!r}")
        try:
            report = drift_check(fleet=target)
        except DriftCheckError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"{target.name}: {report.status} ({report.summary})")
        for f in report.features:
            psi = f"{f['psi']:.3f}" if f["psi"] is not None else "-"
            effect = f"{f['effect']:.3f}" if f["effect"] is not None else "-"
            line = f"  {f['feature']:<24} {f['test']:<5} effect {effect:>7} psi {psi:>7}  {f['status']}"
            self.stdout.write(line)
