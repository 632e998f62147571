"""python manage.py evaluate {nab,skab,cmapss} PATH [--detector NAME|all] [--json FILE]
(without --detector: SKAB ensemble, NAB nn_novelty, C-MAPSS iqr, each benchmark's best measured)
[--results-dir DIR] [--predictions-dir DIR]
[--calibration rank_suppress|rank|rank_wait|top_suppress|top|top_wait|ratio_suppress|ratio|ratio_wait|none]
[--degraded-cycles N]
[--train-cycles K] [--keep]"""
import json
import math

from django.core.management.base import BaseCommand, CommandError

from detection.evaluation import (
    CMAPSS_TRAIN_CYCLES,
    NAB_CALIBRATIONS,
    SKAB_TRAIN_ROWS,
    EvaluationError,
    evaluate_cmapss,
    evaluate_nab,
    evaluate_skab,
)
from detection.ingest import IngestError
from detection.management.checks import migrated_database
from detection.ml.detectors import DETECTORS, table_detectors

SHORT_PROFILE = {"standard": "standard", "reward_low_FP_rate": "low FP", "reward_low_FN_rate": "low FN"}
# Without --detector, each benchmark runs the detector that measured best on it (README, Measured
# figures): the ensemble on SKAB, nn_novelty on NAB, iqr on C-MAPSS. The product's configured
# algorithm (settings.VIGIL_DETECTION, hybrid) is a fleet default, not a benchmark's best.
DEFAULT_DETECTOR = {"skab": "ensemble", "nab": "nn_novelty", "cmapss": "iqr"}
PATH_HELP = {
    "nab": "the NAB root, its data/ folder, a data/<category> folder or one series",
    "skab": "the SKAB root, its data/ folder, a folder such as valve1/, or one file",
    "cmapss": "a folder with train_FD00x.txt, or one such file",
}


class Command(BaseCommand):
    help = ("Evaluate the pipeline on a labelled public benchmark: NAB (NAB score, three profiles), SKAB "
            "(F1, FAR, MAR) or C-MAPSS run-to-failure engines (precision, recall, F1, early warning).")

    def add_arguments(self, parser):
        parser.add_argument("dataset", choices=["nab", "skab", "cmapss"])
        parser.add_argument("path", help="; ".join(f"{k}: {v}" for k, v in PATH_HELP.items()))
        defaults = ", ".join(f"{k} {v}" for k, v in DEFAULT_DETECTOR.items())
        parser.add_argument("--detector", help="a registered detector, or 'all' for one row per detector but the "
                                               f"experimental ones (default: the benchmark's best measured: {defaults})")
        parser.add_argument("--json", dest="json_path", help="write the figures to this JSON file")
        parser.add_argument("--results-dir", help="nab: write NAB's results layout "
                                                  "(DIR/<detector>/<category>/<detector>_<file>.csv) here")
        parser.add_argument("--predictions-dir", help="skab, cmapss: write one CSV of decisions per file/engine "
                                                      "here (in DIR/<detector>/ with --detector all)")
        parser.add_argument("--calibration", choices=NAB_CALIBRATIONS,
                            help="nab (default: the detector's own: rank_wait, ratio_wait for nn_novelty): "
                                 "'rank_wait': 'rank', then a file stays silent for a few rows after each "
                                 "detection; 'rank_suppress': 'rank', then only new highs of the recent rows "
                                 "count; 'rank' turns each score into its rank among the file's earlier "
                                 "scores; 'top' into 1 / (1 + the number of earlier scores at least as "
                                 "high), 'ratio' into its ratio to the geometric mean of the 8th-16th "
                                 "highest earlier scores; '*_suppress' then suppresses repeats, '*_wait' "
                                 "keeps a file silent for a few rows after each detection instead; 'none' "
                                 "sweeps the raw scores")
        parser.add_argument("--degraded-cycles", type=int,
                            help="cmapss: the last N cycles of each engine are anomalous (default 30)")
        parser.add_argument("--train-cycles", type=int,
                            help=f"cmapss: train on the first K cycles of each engine (default {CMAPSS_TRAIN_CYCLES})")
        parser.add_argument("--keep", action="store_true", help="keep the scratch fleet for browsing")

    @migrated_database
    def handle(self, *args, **opts):
        dataset = opts["dataset"]
        self._check_options(dataset, opts)
        everything = opts["detector"] == "all"
        detectors = table_detectors() if everything else [opts["detector"] or DEFAULT_DETECTOR[dataset]]
        results, failed = {}, {}
        for detector in detectors:
            try:
                results[detector] = self._evaluate(dataset, detector, opts, everything)
            except IngestError as exc:
                raise CommandError(str(exc)) from None
            except EvaluationError as exc:
                if not everything:
                    raise CommandError(str(exc)) from None
                # One failing detector never breaks the table: it gets a row with its reason.
                failed[detector] = str(exc)
                self.stdout.write(self.style.WARNING(f"  {detector}: failed: {exc}"))
                continue
            if everything:
                self.stdout.write(f"  {detector}: done in {results[detector].seconds:.1f}s")
        if everything and not results:
            raise CommandError("every detector failed: " + "; ".join(f"{d}: {e}" for d, e in failed.items()))
        if everything:
            self._table(dataset, results, failed)
        else:
            (result,) = results.values()
            getattr(self, f"_report_{dataset}")(result)
        if opts["json_path"]:
            payload = ({"dataset": dataset, "detectors": {d: r.as_dict() for d, r in results.items()},
                        "failed": failed}
                       if everything else next(iter(results.values())).as_dict())
            with open(opts["json_path"], "w") as fh:
                json.dump(payload, fh, indent=2, default=str)
            self.stdout.write(f"wrote {opts['json_path']}")

    # -- input ---------------------------------------------------------------------------------
    def _check_options(self, dataset: str, opts: dict) -> None:
        detector = opts["detector"]
        if detector is not None and detector != "all" and detector not in DETECTORS:
            raise CommandError(f"unknown detector {detector!r}; known: {', '.join(sorted(DETECTORS))}, or 'all'")
        only = {"results_dir": ("nab",), "calibration": ("nab",), "predictions_dir": ("skab", "cmapss"),
                "degraded_cycles": ("cmapss",), "train_cycles": ("cmapss",)}
        for option, datasets in only.items():
            if opts[option] is not None and dataset not in datasets:
                flag = "--" + option.replace("_", "-")
                raise CommandError(f"{flag} applies to {' and '.join(datasets)} only, not to {dataset}")
        for option in ("degraded_cycles", "train_cycles"):
            if opts[option] is not None and opts[option] < 1:
                raise CommandError(f"--{option.replace('_', '-')} must be at least 1, got {opts[option]}")

    def _evaluate(self, dataset: str, detector: str | None, opts: dict, everything: bool):
        config = {"algorithm": detector} if detector else None
        predictions = opts["predictions_dir"]
        if predictions and everything:
            predictions = f"{predictions}/{detector}"
        if dataset == "nab":
            return evaluate_nab(path=opts["path"], results_dir=opts["results_dir"], keep=opts["keep"], config=config,
                                progress=self._file_progress if opts["verbosity"] >= 2 else None,
                                calibration=opts["calibration"])
        progress = None if everything else self._stage_progress
        if dataset == "skab":
            return evaluate_skab(path=opts["path"], predictions_dir=predictions, keep=opts["keep"], config=config,
                                 progress=progress)
        return evaluate_cmapss(path=opts["path"], degraded_cycles=opts["degraded_cycles"] or 30,
                               train_cycles=opts["train_cycles"] or CMAPSS_TRAIN_CYCLES, predictions_dir=predictions,
                               keep=opts["keep"], config=config, progress=progress)

    def _stage_progress(self, run, stage, info):
        if info:
            self.stdout.write(f"  {stage:<10} {info['rows']:>8,} rows  {info['seconds']:6.2f}s")

    def _file_progress(self, name, stage, info):
        if info and stage == "score":
            self.stdout.write(f"  {name:<55} {info['rows']:>7,} rows  {info['seconds']:6.2f}s")

    # -- output --------------------------------------------------------------------------------
    def _report_skab(self, result):
        m = result.metrics
        rows = int(result.config.get("ensemble_smooth_rows", 1) or 1)
        # Only the ensembles (ensemble, auto) read the persistence setting of the fleet config.
        reads = "ensemble_smooth_rows" in getattr(DETECTORS.get(result.detector), "hyperparameters", {})
        statistic = result.config.get("ensemble_smooth", "median")
        persistence = f"; alarm persistence: {statistic} of the last {rows} rows" if rows > 1 and reads \
            else ""
        self.stdout.write(f"\nSKAB, {result.files} files, {result.scored_rows:,} scored rows "
                          f"(detector {result.detector}; {_models(result)}, trained on the first "
                          f"{SKAB_TRAIN_ROWS} rows of each file"
                          f"{persistence})")
        self.stdout.write(f"{'file':<20} {'F1':>6} {'FAR %':>7} {'MAR %':>7}")
        for name, f in sorted(result.per_file.items(), key=lambda kv: _natural(kv[0])):
            self.stdout.write(f"{name:<20} {f['f1']:>6.3f} {f['far_pct']:>7.1f} {f['mar_pct']:>7.1f}")
        self.stdout.write(self.style.SUCCESS(
            f"{'pooled':<20} {m.f1:>6.3f} {m.far:>7.1f} {m.mar:>7.1f}   "
            f"(TP {m.tp}, FP {m.fp}, FN {m.fn}, TN {m.tn}; {result.seconds:.1f}s)"))

    def _report_nab(self, result):
        self.stdout.write(f"\nNAB, {result.files} files, {result.scored_rows:,} scored rows (detector "
                          f"{result.detector}; one model per file, trained on its probationary rows; "
                          f"calibration {result.calibration}"
                          f"{f' over {result.suppress_rows} rows' if result.suppress_rows else ''})")
        self.stdout.write(f"{'profile':<20} {'score':>7} {'threshold':>10} {'windows':>9} {'FP rows':>8}")
        for p in result.profiles.values():
            threshold = "never" if math.isinf(p.threshold) else f"{p.threshold:.5g}"
            self.stdout.write(self.style.SUCCESS(
                f"{p.profile:<20} {p.score:>7.2f} {threshold:>10} {p.detected_windows:>4}/{p.windows:<4} "
                f"{p.false_positives:>8,}"))
        t = result.timings
        self.stdout.write(f"fit {t.get('train', 0):.1f}s, score {t.get('score', 0):.1f}s, "
                          f"total {result.seconds:.1f}s")
        for warning in result.warnings:
            self.stdout.write(self.style.WARNING(f"warning: {warning}"))

    def _report_cmapss(self, result):
        m, e = result.metrics, result.early_warning
        self.stdout.write(f"\nC-MAPSS, {result.files} engines, {result.scored_rows:,} scored cycles (detector "
                          f"{result.detector}; trained on the first {result.train_cycles} cycles of each engine, "
                          f"the last {result.degraded_cycles} cycles are degraded)")
        self.stdout.write(self.style.SUCCESS(
            f"precision {m.precision:.3f}  recall {m.recall:.3f}  F1 {m.f1:.3f}   "
            f"(TP {m.tp}, FP {m.fp}, FN {m.fn}, TN {m.tn})"))
        self.stdout.write(self.style.SUCCESS(
            f"early warning: {e.alarmed} of {e.units} engines alarm ({e.never} never), mean "
            f"{_cycles(e.mean_lead)} / median {_cycles(e.median_lead)} cycles before failure; first alarm inside "
            f"the degraded window for {e.in_window} (mean {_cycles(e.mean_lead_in_window)} cycles), before it for "
            f"{e.before_window}"))
        self.stdout.write(f"{result.seconds:.1f}s")
        for warning in result.warnings:
            self.stdout.write(self.style.WARNING(f"warning: {warning}"))

    def _table(self, dataset: str, results: dict, failed: dict | None = None):
        first = next(iter(results.values()))
        columns = {
            "nab": [(SHORT_PROFILE.get(n, n[:9]), 9, lambda r, n=n: f"{r.profiles[n].score:.2f}")
                    for n in getattr(first, "profiles", {})],
            "skab": [("F1", 7, lambda r: f"{r.metrics.f1:.3f}"), ("FAR %", 7, lambda r: f"{r.metrics.far:.1f}"),
                     ("MAR %", 7, lambda r: f"{r.metrics.mar:.1f}")],
            "cmapss": [("precision", 10, lambda r: f"{r.metrics.precision:.3f}"),
                       ("recall", 7, lambda r: f"{r.metrics.recall:.3f}"), ("F1", 7, lambda r: f"{r.metrics.f1:.3f}"),
                       ("lead", 7, lambda r: _cycles(r.early_warning.mean_lead)),
                       ("never", 6, lambda r: str(r.early_warning.never))],
        }[dataset]
        columns += [("fit s", 7, lambda r: f"{r.timings.get('train', 0):.1f}"),
                    ("score s", 8, lambda r: f"{r.timings.get('score', 0):.1f}"),
                    ("total s", 8, lambda r: f"{r.seconds:.1f}")]
        self.stdout.write("\n" + f"{'detector':<20}" + "".join(f"{name:>{w}}" for name, w, _ in columns))
        for detector, result in results.items():
            self.stdout.write(self.style.SUCCESS(f"{detector:<20}" + "".join(f"{get(result):>{w}}"
                                                                              for _, w, get in columns)))
        for detector, reason in (failed or {}).items():
            self.stdout.write(self.style.ERROR(f"{detector:<20} failed: {reason}"))


def _cycles(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _natural(name: str):
    head, _, tail = name.rpartition("/")
    return (head, int(tail)) if tail.isdigit() else (head, 0)


def _models(result) -> str:
    """'one model', 'one model per folder (3: other, valve1, valve2)' or, when a folder's files run
    at several operating points, 'one model per folder and operating regime (3: other regime 1 of 2,
    9 files; ...)'."""
    models = result.models
    folders = sorted({m["folder"] for m in models})
    if len(models) == 1:
        return "one model"
    if len(folders) == len(models):
        return f"one model per folder ({len(folders)}: {', '.join(folders)})"
    listed = "; ".join(f"{m['name']}, {m['files']} file{'s' if m['files'] != 1 else ''}" for m in models)
    return f"one model per folder and operating regime ({len(models)}: {listed})"
