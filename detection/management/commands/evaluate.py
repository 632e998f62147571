"""python manage.py evaluate skab PATH [--json FILE] [--predictions-dir DIR]"""
import json

from django.core.management.base import BaseCommand, CommandError

from detection.evaluation import EvaluationError, evaluate_skab
from detection.ingest import IngestError


class Command(BaseCommand):
    help = "Evaluate the pipeline on a labelled public benchmark (SKAB's protocol: F1, FAR, MAR)."

    def add_arguments(self, parser):
        parser.add_argument("dataset", choices=["skab"])
        parser.add_argument("path", help="the SKAB root, its data/ folder, a folder such as valve1/, or one file")
        parser.add_argument("--json", dest="json_path", help="write the figures to this JSON file")
        parser.add_argument("--predictions-dir", help="write one CSV per file (datetime, anomaly 0/1) here")
        parser.add_argument("--keep", action="store_true", help="keep the scratch fleet for browsing")

    def handle(self, *args, **opts):
        def progress(run, stage, info):
            if info:
                self.stdout.write(f"  {stage:<10} {info['rows']:>8,} rows  {info['seconds']:6.2f}s")

        try:
            result = evaluate_skab(path=opts["path"], predictions_dir=opts["predictions_dir"], keep=opts["keep"],
                                   progress=progress)
        except (EvaluationError, IngestError) as exc:
            raise CommandError(str(exc)) from None
        m = result.metrics
        self.stdout.write(f"\nSKAB, {result.files} files, {result.scored_rows:,} scored rows "
                          f"(trained on the first 400 rows of each file)")
        self.stdout.write(f"{'file':<20} {'F1':>6} {'FAR %':>7} {'MAR %':>7}")
        for name, f in sorted(result.per_file.items(), key=lambda kv: _natural(kv[0])):
            self.stdout.write(f"{name:<20} {f['f1']:>6.3f} {f['far_pct']:>7.1f} {f['mar_pct']:>7.1f}")
        self.stdout.write(self.style.SUCCESS(
            f"{'pooled':<20} {m.f1:>6.3f} {m.far:>7.1f} {m.mar:>7.1f}   "
            f"(TP {m.tp}, FP {m.fp}, FN {m.fn}, TN {m.tn}; {result.seconds:.1f}s)"))
        if opts["json_path"]:
            with open(opts["json_path"], "w") as fh:
                json.dump(result.as_dict(), fh, indent=2, default=str)
            self.stdout.write(f"wrote {opts['json_path']}")


def _natural(name: str):
    head, _, tail = name.rpartition("/")
    return (head, int(tail)) if tail.isdigit() else (head, 0)
