"""python manage.py run_pipeline --fleet NAME: ingest -> features -> baselines -> train -> score -> persist."""
from django.core.management.base import BaseCommand, CommandError

from detection.choices import RunStatus, Trigger
from detection.services import PipelineRunError, pipeline_run_create, pipeline_run_execute
from detection.management.checks import fleet_named, migrated_database


class Command(BaseCommand):
    help = "Run the detection pipeline on a fleet and persist every decision, showing progress by stage."

    def add_arguments(self, parser):
        parser.add_argument("--fleet", required=True, help="fleet name")
        parser.add_argument("--train-until", help="train on rows up to this timestamp (ISO 8601, UTC if naive)")
        parser.add_argument("--train-rows-per-device", type=int, help="train on the first N rows of each device")
        parser.add_argument("--score", choices=["all", "after_training"], default="all",
                            help="score every row (default) or only rows after the training window")

    @migrated_database
    def handle(self, *args, **opts):
        fleet = fleet_named(opts["fleet"])
        params = {k: opts[k] for k in ("train_until", "train_rows_per_device") if opts[k] is not None}
        params["score"] = opts["score"]
        try:
            run = pipeline_run_create(fleet=fleet, trigger=Trigger.CLI, params=params)
        except PipelineRunError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"run {run.id} on fleet {fleet.name}")
        run = pipeline_run_execute(run_id=run.id, progress=self._progress)
        if run.status == RunStatus.FAILED:
            raise CommandError(f"run {run.id} failed: {run.error}")
        for warning in run.warnings:
            self.stdout.write(self.style.WARNING(f"warning: {warning}"))
        if run.status == RunStatus.DEGRADED:
            raise CommandError(f"run {run.id} is degraded: {run.error}")
        total = sum(run.stage_timings.values())
        self.stdout.write(self.style.SUCCESS(
            f"run {run.id} succeeded in {total:.1f}s: {run.n_scored} rows scored, {run.n_anomalies} anomalies "
            f"(threshold {run.threshold:.4f}), model v{run.model_version.version}"
            + (f", baseline v{run.baseline_version.number}" if run.baseline_version else "")))

    def _progress(self, run, stage, info):
        if info:
            self.stdout.write(f"  {stage:<10} {info['rows']:>10,} rows  {info['seconds']:7.2f}s")
        else:
            self.stdout.flush()
