"""python manage.py tune --fleet NAME [--detector NAME] [--grid JSON] [--folds K] [--apply] [--json FILE]:
grid-search a fleet's detection settings with time-series cross-validation on its labelled windows."""
import json

from django.core.management.base import BaseCommand, CommandError

from detection.management.checks import fleet_named, migrated_database
from detection.tuning import DEFAULT_GRID, TuningError, tune_fleet


class Command(BaseCommand):
    help = ("Tune a fleet's detection settings (contamination, ...) by time-series cross-validation on its "
            "labelled anomaly windows; prints one row per candidate and, with --apply, saves the best.")

    def add_arguments(self, parser):
        parser.add_argument("--fleet", required=True, help="fleet name (it needs ground-truth labels)")
        parser.add_argument("--detector", help="the detector to tune (default: the fleet's algorithm)")
        parser.add_argument("--grid", help=f"JSON object {{setting: [values]}} (default {json.dumps(DEFAULT_GRID)})")
        parser.add_argument("--folds", type=int, default=3, help="time folds, 2-10 (default 3)")
        parser.add_argument("--apply", action="store_true", help="write the best setting into the fleet's config")
        parser.add_argument("--json", dest="json_path", help="write every candidate's figures to this JSON file")

    @migrated_database
    def handle(self, *args, **opts):
        fleet = fleet_named(opts["fleet"])
        grid = None
        if opts["grid"]:
            try:
                grid = json.loads(opts["grid"])
            except json.JSONDecodeError as exc:
                raise CommandError(f"--grid is not valid JSON: {exc}") from None
        try:
            result = tune_fleet(fleet=fleet, grid=grid, algorithm=opts["detector"], folds=opts["folds"],
                                apply=opts["apply"], progress=self._progress)
        except TuningError as exc:
            raise CommandError(str(exc)) from None
        self._table(result)
        if opts["json_path"]:
            with open(opts["json_path"], "w") as fh:
                json.dump(result.as_dict(), fh, indent=2, default=str)
            self.stdout.write(f"wrote {opts['json_path']}")

    def _progress(self, done, total, candidate):
        figures = (f"F1 {candidate['f1']:.3f}" if "f1" in candidate else f"failed: {candidate['error']}")
        self.stdout.write(f"  {done}/{total} {json.dumps(candidate['params'])}: {figures}")

    def _table(self, result):
        self.stdout.write(f"\n{result.fleet}, detector {result.algorithm}, {len(result.folds)} time folds "
                          f"(test rows {', '.join(str(f['test_rows']) for f in result.folds)}; "
                          f"{result.seconds:.1f}s)")
        width = max(24, *(len(json.dumps(c.params)) for c in result.candidates))
        self.stdout.write(f"{'setting':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'FAR %':>6}  F1 per fold")
        for c in result.candidates:
            name = json.dumps(c.params)
            if c.metrics is None:
                self.stdout.write(f"{name:<{width}} failed: {c.error}")
                continue
            m = c.metrics
            folds = " ".join(f"{f:.3f}" for f in c.folds)
            mark = "  <- best" if c is result.best else ""
            self.stdout.write(f"{name:<{width}} {m.precision:>9.3f} {m.recall:>7.3f} {m.f1:>6.3f} {m.far:>6.1f}  "
                              f"{folds}{mark}")
        if result.best is None:
            raise CommandError("every candidate failed; see the errors above")
        for key, edge in result.grid_edges().items():
            beyond = "below" if edge == "lowest" else "above"
            self.stdout.write(self.style.WARNING(
                f"note: the best {key} ({result.best.params[key]}) is the {edge} value tried; values {beyond} "
                f"it may score higher"))
        if result.applied:
            self.stdout.write(self.style.SUCCESS(
                f"applied {json.dumps(result.best.params)} to fleet {result.fleet} (audited); the next run uses it"))
        else:
            self.stdout.write(f"best: {json.dumps(result.best.params)} (rerun with --apply to save it)")
