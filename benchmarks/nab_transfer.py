"""How far a NAB score carries to files it was not tuned on: leave-one-category-out.

NAB's files come in categories (artificial, AWS CloudWatch, ad exchange, traffic; the full corpus
also has Twitter volumes and known-cause series). A detector's threshold, and the calibration
variant it was given, were chosen on the corpus it is scored on; a category left out plays the part
of files never seen. For each category C (standard profile unless --profile):

- in-sample: C's score at the threshold swept on C itself (what `evaluate nab` on C alone reports);
- carried: the detector's own calibration, threshold swept on the other categories, applied to C;
- nested: the calibration variant AND the threshold picked on the other categories (among --bands x
  --suppress variants of both ratio_suppress and ratio_wait, plus the detector's own), applied to C.
  This repeats the whole choice without C, so it also charges the selection among variants.

The pooled rows sum the raw scores of every held-out category (files without windows, such as
artificialNoAnomaly, count their false positives there too) and normalise once (null 0, perfect 100).
The detector runs once (detection.evaluation.evaluate_nab keeps each file's raw scores); the
calibrations are re-applied to those scores (detection.ml.nab). Django is needed only for that one
run (a scratch fleet in the database of VIGIL_VAR_DIR).

    .venv/bin/python benchmarks/nab_transfer.py ../shared/data/nab
    .venv/bin/python benchmarks/nab_transfer.py ../shared/data/nab --detector windowed_gaussian --json var/t.json
    .venv/bin/python benchmarks/nab_transfer.py ../shared/data/nab --window 1600   # files longer than the search
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def calibrated(raw_series, *, calibration: str, ranks: tuple[int, int], suppress: int):
    """The files' raw scores calibrated as evaluate_nab does (detection.evaluation.nab_calibrated)."""
    from detection.evaluation import nab_calibrated
    from detection.ml import nab

    return [nab.NabSeries(s.name, s.timestamps, nab_calibrated(
        s.scores, nab.probationary_length(len(s.scores)), calibration, suppress, ranks=ranks), s.windows)
        for s in raw_series]


def totals(series, cost, threshold: float, wait: int = 0) -> tuple[float, float, float]:
    """(raw, null, perfect) of the files at one threshold (wait: rows silent after a detection)."""
    from detection.ml import nab

    prepared = [nab._prepare(s, cost, nab.PROBATION_PERCENT) for s in series]
    windows = sum(len(p.windows) for p in prepared)
    raw = sum(nab._score_prepared(p, nab.detections_at(p, threshold, wait), cost).raw for p in prepared)
    return raw, -cost.fn_weight * windows, cost.tp_weight * windows


def swept(series, cost, wait: int = 0) -> tuple[float, float]:
    """(best raw score, its threshold) over the files: NAB's sweep (the highest threshold on ties)."""
    from detection.ml import nab

    best = max(nab.sweep(series, cost, wait=wait), key=lambda c: c.raw)
    return best.raw, best.threshold


def wait_of(key) -> int:
    """The sweep's wait of a (calibration, ranks, rows) variant (detection.evaluation.nab_wait)."""
    from detection.evaluation import nab_wait

    return nab_wait(key[0], key[2])


def normalised(raw: float, null: float, perfect: float) -> float | None:
    """nab.normalised_score rounded, None where it is undefined (no window among the files)."""
    from detection.ml import nab

    return None if perfect == null else round(nab.normalised_score(raw, null, perfect), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the NAB root (data/, labels/, config/)")
    parser.add_argument("--detector", default="nn_novelty")
    parser.add_argument("--profile", default="standard")
    parser.add_argument("--bands", default="4-8,8-16,16-32,32-64", help="ratio ranks lo-hi for the nested choice")
    parser.add_argument("--suppress", default="10,20,50", help="suppression rows for the nested choice")
    parser.add_argument("--window", type=int, help="nn_novelty's search window in rows (its WINDOW); a window "
                        "shorter than the files stands in for files longer than the window")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from detection.evaluation import evaluate_nab, nab_calibration, nab_suppress_rows
    from detection.ml import nab
    from detection.ml.nab import ORDER_RATIO_RANKS

    call_command("migrate", verbosity=0)
    if args.window:
        from detection.ml.novelty import NearestNeighbourNoveltyDetector

        NearestNeighbourNoveltyDetector.WINDOW = args.window
    from detection.evaluation import EvaluationError
    from detection.ingest import IngestError

    try:
        result = evaluate_nab(path=args.path, config={"algorithm": args.detector})
    except (EvaluationError, IngestError) as exc:
        parser.error(str(exc))
    cost = nab.load_profiles(Path(args.path) / "config" / "profiles.json")[args.profile]
    own = (nab_calibration(args.detector), ORDER_RATIO_RANKS, nab_suppress_rows(args.detector))
    variants = {own: calibrated(result.raw_series, calibration=own[0], ranks=own[1], suppress=own[2])}
    for band in args.bands.split(","):
        lo, hi = (int(v) for v in band.split("-"))
        for rows in (int(v) for v in args.suppress.split(",")):
            for kind in ("ratio_suppress", "ratio_wait"):
                key = (kind, (lo, hi), rows)
                variants.setdefault(key, calibrated(result.raw_series, calibration=kind, ranks=key[1],
                                                    suppress=rows))

    def category(name: str) -> str:
        return name.split("/")[0]

    categories = sorted({category(s.name) for s in result.raw_series})
    rows, pooled = [], {"carried": np.zeros(3), "nested": np.zeros(3), "in_sample": np.zeros(3)}
    for held in categories:
        def split(series):
            return ([s for s in series if category(s.name) != held], [s for s in series if category(s.name) == held])

        train, test = split(variants[own])
        _, threshold = swept(train, cost, wait_of(own))
        carried = totals(test, cost, threshold, wait_of(own))
        _, own_threshold = swept(test, cost, wait_of(own))
        in_sample = totals(test, cost, own_threshold, wait_of(own))
        picks = []
        for key, series in variants.items():
            train_v, _ = split(series)
            raw, thr = swept(train_v, cost, wait_of(key))
            picks.append((raw, key, thr))
        _, key, thr = max(picks, key=lambda p: p[0])
        nested = totals(split(variants[key])[1], cost, thr, wait_of(key))
        for name, figures in (("carried", carried), ("nested", nested), ("in_sample", in_sample)):
            pooled[name] += np.asarray(figures)
        rows.append({"category": held, "files": len(test), "windows": int(round(carried[2] / cost.tp_weight)),
                     "in_sample": normalised(*in_sample), "carried": normalised(*carried),
                     "carried_threshold": round(threshold, 4), "nested": normalised(*nested),
                     "nested_choice": f"{key[0]} ranks {key[1][0]}-{key[1][1]}, {key[2]} rows"})
    everything = totals(variants[own], cost, swept(variants[own], cost, wait_of(own))[1], wait_of(own))
    figures = {"detector": args.detector, "window": args.window, "profile": args.profile, "calibration": f"{own[0]} ranks "
               f"{own[1][0]}-{own[1][1]}, {own[2]} rows", "all_files": normalised(*everything),
               "pooled": {k: normalised(*v) for k, v in pooled.items()}, "categories": rows}
    window = f", search window {args.window} rows" if args.window else ""
    print(f"NAB {args.profile}, {args.detector} ({figures['calibration']}{window}): {figures['all_files']} on all "
          f"{len(result.raw_series)} scored files")
    print(f"{'held-out category':24} {'files':>5} {'windows':>7} {'in-sample':>9} {'carried':>8} {'nested':>7}  nested choice")
    for r in rows:
        print(f"{r['category']:24} {r['files']:5d} {r['windows']:7d} {_fmt(r['in_sample']):>9} {_fmt(r['carried']):>8} "
              f"{_fmt(r['nested']):>7}  {r['nested_choice']}")
    p = figures["pooled"]
    print(f"{'pooled':24} {'':5} {'':7} {_fmt(p['in_sample']):>9} {_fmt(p['carried']):>8} {_fmt(p['nested']):>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
