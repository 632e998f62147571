"""manage.py ingest PATH --fleet NAME: read, validate and write telemetry in one transaction."""
from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError

from detection.ingest.base import DEVICE_ATTRIBUTES, IngestError
from detection.ingest.loader import ingest_batch
from detection.ingest.readers import FORMATS, infer_format, read_source
from detection.management.checks import migrated_database


class Command(BaseCommand):
    help = ("Ingest a CSV/Parquet file or folder, or a NAB, SKAB or C-MAPSS layout, into a fleet. "
            "The whole source is validated first; on any problem nothing is written.")

    def add_arguments(self, parser):
        parser.add_argument("path", help="file or folder")
        parser.add_argument("--fleet", required=True, help="fleet name (a slug); created when missing")
        parser.add_argument("--description", default="", help="description of a new fleet")
        parser.add_argument("--format", choices=FORMATS,
                            help="csv and parquet are inferred from the extension; nab, skab and cmapss"
                                 " must be given")
        table = parser.add_argument_group("csv and parquet")
        table.add_argument("--device-column", default="device_id")
        table.add_argument("--timestamp-column", default="timestamp")
        table.add_argument("--metric", action="append", dest="metrics", metavar="COLUMN",
                           help="a metric column (repeatable); default: every numeric column")
        for attr in DEVICE_ATTRIBUTES:
            table.add_argument(f"--{attr.replace('_', '-')}-column", dest=f"{attr}_column", metavar="COLUMN")
        parser.add_argument("--split", choices=["train", "test"], default="train", help="cmapss: which files")

    @migrated_database
    def handle(self, *args, **options):
        path, fleet = options["path"], options["fleet"]
        try:
            fmt = options["format"] or infer_format(path)
            started = time.perf_counter()
            batch = read_source(path, fmt, **self._reader_options(fmt, options))
            parse_seconds = time.perf_counter() - started
            summary = ingest_batch(batch=batch, fleet_name=fleet, description=options["description"])
        except IngestError as exc:
            raise CommandError(f"cannot ingest {path}; nothing was written:\n"
                               + exc.summary(limit=len(exc.problems))) from None
        rows, devices = summary.rows, summary.devices_created + summary.devices_existing
        self.stdout.write(self.style.SUCCESS(
            f"{'Created' if summary.fleet_created else 'Extended'} fleet {fleet!r}: "
            f"{devices:,} devices ({summary.devices_created:,} new), "
            f"{rows:,} rows, {summary.labels:,} labels; parsed in {parse_seconds:.2f} s "
            f"({rows / max(parse_seconds, 1e-9):,.0f} rows/s), written in {summary.seconds:.2f} s "
            f"({summary.rows_per_second:,.0f} rows/s)"))

    @staticmethod
    def _reader_options(fmt: str, options: dict) -> dict:
        attributes = {a: options[f"{a}_column"] for a in DEVICE_ATTRIBUTES if options[f"{a}_column"]}
        if fmt in ("csv", "parquet"):
            return {"device_column": options["device_column"], "metrics": options["metrics"],
                    "timestamp_column": options["timestamp_column"], "cohort_columns": attributes}
        given = [f"--{a.replace('_', '-')}-column" for a in attributes]
        given += ["--metric"] if options["metrics"] else []
        if given:
            raise CommandError(f"{', '.join(given)}: for csv and parquet only, not {fmt}")
        return {"split": options["split"]} if fmt == "cmapss" else {}
