"""python manage.py generate_fleet --fleet demo --devices 60 --days 14 --seed 7 [--if-missing]"""
from __future__ import annotations

import time

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_slug

from detection.ingest.base import IngestError
from detection.ingest.loader import ingest_batch
from detection.ingest.synthetic import SPECIAL_COHORT_NAME, generate_fleet
from detection.models import Fleet
from detection.management.checks import migrated_database


class Command(BaseCommand):
    help = "Generate a synthetic demo fleet with labelled injected anomalies and ingest it."

    def add_arguments(self, parser):
        parser.add_argument("--fleet", required=True, help="fleet name (a slug)")
        parser.add_argument("--devices", type=int, required=True, help="number of devices, >= 1")
        parser.add_argument("--days", type=int, required=True, help="days of hourly samples, >= 2")
        parser.add_argument("--seed", type=int, required=True, help="the same seed gives the same fleet")
        parser.add_argument("--if-missing", action="store_true", help="do nothing if the fleet exists")

    @migrated_database
    def handle(self, *, fleet: str, devices: int, days: int, seed: int, if_missing: bool, **options):
        try:
            validate_slug(fleet)
        except ValidationError:
            raise CommandError(f"--fleet must be a slug (letters, digits, - and _), got {fleet!r}") from None
        if devices < 1:
            raise CommandError(f"--devices must be >= 1, got {devices}")
        if days < 2:
            raise CommandError(f"--days must be >= 2, got {days}")
        if Fleet.objects.filter(name=fleet).exists():
            if if_missing:
                self.stdout.write(f"Fleet {fleet!r} already exists; nothing to do.")
                return
            raise CommandError(f"fleet {fleet!r} already exists; pass --if-missing or choose another name")

        started = time.perf_counter()
        batch = generate_fleet(devices=devices, days=days, seed=seed)
        generated = time.perf_counter() - started
        description = (f"Synthetic demo fleet: {devices} devices x {days} days hourly, seed {seed}. "
                       f"Injected anomalies are labelled; cohort {SPECIAL_COHORT_NAME} is normal but has a "
                       f"lower battery level and a hotter battery.")
        try:
            summary = ingest_batch(batch=batch, fleet_name=fleet, description=description)
        except IngestError as exc:
            raise CommandError(exc.summary()) from None

        kinds = batch.labels["kind"].value_counts().sort_index()
        n_cohorts = batch.devices.groupby(batch.cohort_columns).ngroups
        self.stdout.write(self.style.SUCCESS(
            f"Fleet {fleet!r}: {summary.devices_created} devices in {n_cohorts} cohorts, "
            f"{summary.rows:,} rows, {summary.labels} injected anomaly windows "
            f"({', '.join(f'{kind} {count}' for kind, count in kinds.items())}); "
            f"generated in {generated:.1f} s, ingested in {summary.seconds:.1f} s."
        ))
