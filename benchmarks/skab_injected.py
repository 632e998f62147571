"""How SKAB's benchmark settings fare on faults other than a closed valve, and on normal running.

SKAB's labelled files in ../shared/data are all valve1 experiments (a closed inlet valve, which
moves the flow first). The held-out SKAB folders hold other faults (valve2, and "other": rotor
imbalance and more). As a stand-in, this cuts the rig's anomaly-free recording (anomaly-free.csv,
9,405 normal seconds) into pseudo-experiments of 1,150 rows, like a valve1 file, and adds a step of
K training standard deviations to one group of sensors in rows 600-899 of each: vibration (both
accelerometers, as a rotor imbalance would), current, pressure, flow or thermocouple. It then runs
the pipeline core with SKAB's fleet config and protocol (train on each pseudo-experiment's first
400 rows, score the rest) and scores the result like `evaluate skab` (F1, FAR, MAR over the scored
rows). With --step 0 nothing is injected: every scored row is normal, so FAR is the false alarm
rate of SKAB's settings on normal running of the same rig.

    python benchmarks/skab_injected.py ../shared/data/skab [--step 3] [--detector ensemble]
    python benchmarks/skab_injected.py ../shared/data/skab --pooled-with-valve1 vibration --detector ensemble
    python benchmarks/skab_injected.py ../shared/data/skab --pooled-with-valve1 vibration --detector ensemble \
        --one-folder --set device_mad_floor=0.1
    python benchmarks/skab_injected.py ../shared/data/skab --mixed-folder /tmp/skabmix [--experiments 2]
    python manage.py evaluate skab /tmp/skabmix --detector ensemble

With --mixed-folder DIR it writes a SKAB tree at DIR whose valve1 folder also holds the first N
pseudo-experiments (one folder at two operating points), runs `evaluate skab` on it with one model per
operating regime and with one model for the folder, and prints valve1's rows, the pseudo-experiments'
rows and all rows of each.

Otherwise it writes one line per (fault, detector, spread_floor). Takes about a minute on 2 cores. With
--pooled-with-valve1 FAULT it instead trains one model on valve1's 16 files and the pseudo-experiments
(with FAULT injected) together, and reports each one's rows against a model of its own; the
anomaly-free recording runs at a flow near 122 where valve1's is near 32, as another experiment
series of the rig may (why `evaluate skab` trains one model per folder).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FAULTS = {"vibration": ["accelerometer1_rms", "accelerometer2_rms"], "current": ["current"],
          "pressure": ["pressure"], "flow": ["volume_flow_rate_rms"], "thermocouple": ["thermocouple"]}
LENGTH, TRAIN, FAULT = 1150, 400, (600, 900)
FRAME_COLUMNS = ["device_id", "external_id", "manufacturer", "model", "os_version", "store", "customer", "timestamp"]
WINDOW_COLUMNS = ["device_id", "external_id", "start", "end", "kind", "metric"]


def _shaped(frame: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """frame in load_telemetry_frame's shape: its columns in order, rows by device then time."""
    return frame[[*FRAME_COLUMNS, *metrics]].sort_values(["device_id", "timestamp"], kind="stable").reset_index(
        drop=True)


def pseudo_experiments(path: Path, faults: list[str], step: float):
    """(frame in load_telemetry_frame's shape, labelled windows, metrics, cohort columns)."""
    from detection.ingest.readers import read_skab

    batch = read_skab(path)
    free = batch.telemetry[batch.telemetry["external_id"].str.startswith("anomaly-free")].reset_index(drop=True)
    if free.empty:
        raise SystemExit(f"no anomaly-free.csv under {path}")
    attrs = batch.devices[batch.devices["external_id"] == free["external_id"].iloc[0]].iloc[0]
    metrics = [m["name"] for m in batch.metric_schema]
    frames, windows = [], []
    for i in range(len(free) // LENGTH):
        chunk = free.iloc[i * LENGTH:(i + 1) * LENGTH].reset_index(drop=True)
        device = 1000 + i
        if step:
            for column in (c for fault in faults for c in FAULTS[fault]):
                chunk.loc[FAULT[0]:FAULT[1] - 1, column] += step * chunk[column].iloc[:TRAIN].std()
            windows.append({"device_id": device, "external_id": f"pseudo/{i}",
                            "start": chunk["timestamp"].iloc[FAULT[0]], "end": chunk["timestamp"].iloc[FAULT[1] - 1],
                            "kind": "+".join(faults), "metric": ""})
        frame = chunk.assign(device_id=device, external_id=f"pseudo/{i}",
                             **{c: attrs.get(c, "") for c in ("manufacturer", "model", "os_version", "store",
                                                               "customer")})
        frames.append(frame)
    windows = pd.DataFrame(windows, columns=WINDOW_COLUMNS)
    return _shaped(pd.concat(frames, ignore_index=True), metrics), windows, metrics, list(batch.cohort_columns)


def valve1_experiments(path: Path):
    """valve1's labelled files in pseudo_experiments' shape: (frame, labelled windows)."""
    from detection.ingest.readers import read_skab

    batch = read_skab(path)
    telemetry = batch.telemetry[batch.telemetry["external_id"].str.startswith("valve1/")]
    if telemetry.empty:
        raise SystemExit(f"no valve1 files under {path}")
    ids = {e: i + 1 for i, e in enumerate(sorted(telemetry["external_id"].unique()))}
    metrics = [m["name"] for m in batch.metric_schema]
    frame = telemetry.assign(device_id=telemetry["external_id"].map(ids), manufacturer="SKAB", model="valve1",
                             os_version="", store="", customer="")
    windows = batch.labels[batch.labels["external_id"].isin(ids)].assign(
        device_id=lambda d: d["external_id"].map(ids))
    return _shaped(frame, metrics), windows[WINDOW_COLUMNS]


def pooled_with_valve1(path: Path, fault: list[str], step: float, detectors: list[str], one_folder: bool,
                       overrides: dict) -> None:
    """One model over valve1's files and the pseudo-experiments (another series of the rig, at another
    flow), against each alone: what pooling two experiment series into one model costs each. With
    one_folder the pseudo-experiments join valve1's cohort, as files of one folder at two operating
    points would; overrides change SKAB's fleet config (e.g. {"device_mad_floor": 0.1})."""
    from django.conf import settings

    from detection.evaluation import SKAB_FLEET_CONFIG
    from detection.ml.evaluation import binary_metrics, in_windows
    from detection.ml.pipeline import PipelineConfig, TrainingWindow, run_core

    pseudo, pseudo_windows, metrics, cohort = pseudo_experiments(path, fault, step)
    valve1, valve1_windows = valve1_experiments(path)
    both = pd.concat([valve1, pseudo.assign(model="valve1") if one_folder else pseudo], ignore_index=True)
    windows = pd.concat([valve1_windows, pseudo_windows], ignore_index=True)
    print(f"{'detector':<10} {'model':<8} {'rows of':<8} {'F1':>6} {'FAR %':>6} {'MAR %':>6}")
    for detector in detectors:
        config = PipelineConfig.from_settings(
            {**settings.VIGIL_DETECTION, **SKAB_FLEET_CONFIG, **overrides, "algorithm": detector},
            cohort_columns=cohort, window=TrainingWindow(train_rows_per_device=TRAIN, score="after_training"))
        for model, frame in (("pooled", both), ("alone", valve1), ("alone", pseudo)):
            out = run_core(frame, metrics=metrics, metric_domain={}, config=config)
            truth = in_windows(out.scored, windows)
            flagged = np.asarray(out.result.labels) == -1
            valve = out.scored["external_id"].str.startswith("valve1/").to_numpy()
            for name, rows in (("valve1", valve), ("pseudo", ~valve)):
                if rows.any():
                    m, faulty = binary_metrics(truth[rows], flagged[rows]), truth[rows].any()
                    f1, mar = (f"{m.f1:.3f}", f"{m.mar:.1f}") if faulty else ("-", "-")
                    print(f"{detector:<10} {model:<8} {name:<8} {f1:>6} {m.far:>6.1f} {mar:>6}", flush=True)


def write_mixed_folder(path: Path, target: Path, fault: list[str], step: float, experiments: int) -> None:
    """A SKAB tree at target whose one folder (data/valve1) holds valve1's 16 files (links) and the
    first `experiments` pseudo-experiments with `fault` injected, written as SKAB files (';'-separated,
    SKAB's column names, anomaly 1 inside the fault): one folder at two operating points."""
    from detection.ingest.base import metric_identifier
    from detection.ingest.readers import SKAB_SENSORS
    from detection.ml.evaluation import in_windows

    folder = target / "data" / "valve1"
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((path / "data" / "valve1").glob("*.csv")) or sorted(path.glob("**/valve1/*.csv"))
    if not sources:
        raise SystemExit(f"no valve1 files under {path}")
    for source in sources:
        (folder / source.name).symlink_to(source.resolve())
    frame, windows, _, _ = pseudo_experiments(path, fault, step)
    names = {metric_identifier(source): source for source in SKAB_SENSORS}
    for i, (external_id, rows) in enumerate(frame.groupby("external_id", sort=False)):
        if i == experiments:
            break
        out = rows.rename(columns=names)[list(SKAB_SENSORS)]
        out.insert(0, "datetime", rows["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"))
        out["anomaly"] = in_windows(rows, windows, key="external_id").astype(float)
        out["changepoint"] = 0.0
        out.to_csv(folder / f"pseudo{i}.csv", sep=";", index=False)
    written = len(list(folder.glob("pseudo*.csv")))
    print(f"wrote {len(sources)} valve1 links and {written} pseudo-experiments ({'+'.join(fault) or 'no fault'}, "
          f"{step:g} sigma) to {folder}")


def evaluate_mixed_folder(target: Path, detector: str) -> None:
    """`evaluate skab` on write_mixed_folder's tree with and without the split by operating regime."""
    from detection.evaluation import evaluate_skab
    from detection.ml.evaluation import BinaryMetrics

    print(f"{'models':<28} {'rows of':<8} {'F1':>6} {'FAR %':>6} {'MAR %':>6}")
    for split in (False, True):
        result = evaluate_skab(path=target, config={"algorithm": detector}, regimes=split)
        models = "; ".join(f"{m['name']} ({m['files']})" for m in result.models)
        for name, mine in (("valve1", lambda k: "pseudo" not in k), ("pseudo", lambda k: "pseudo" in k),
                           ("all", lambda k: True)):
            m = BinaryMetrics(**{x: sum(f[x] for k, f in result.per_file.items() if mine(k))
                                 for x in ("tp", "fp", "fn", "tn")})
            print(f"{'per regime' if split else 'one per folder':<28} {name:<8} {m.f1:>6.3f} {m.far:>6.1f} "
                  f"{m.mar:>6.1f}", flush=True)
        print(f"  models: {models}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the SKAB folder (it must hold anomaly-free.csv)")
    parser.add_argument("--step", type=float, default=3.0, help="fault size in training standard deviations")
    parser.add_argument("--detector", action="append", help="detector(s) (default: ensemble and auto)")
    parser.add_argument("--pooled-with-valve1", metavar="FAULT", choices=list(FAULTS),
                        help="instead: one model over valve1's files and the pseudo-experiments with this fault, "
                             "against each alone")
    parser.add_argument("--one-folder", action="store_true",
                        help="with --pooled-with-valve1: the pseudo-experiments join valve1's folder (cohort)")
    parser.add_argument("--mixed-folder", metavar="DIR", type=Path,
                        help="instead: write a SKAB tree at DIR whose valve1 folder also holds the pseudo-experiments "
                             "(with --fault injected), for `manage.py evaluate skab DIR`")
    parser.add_argument("--fault", choices=list(FAULTS), default="vibration", help="with --mixed-folder")
    parser.add_argument("--experiments", type=int, default=8,
                        help="with --mixed-folder: how many pseudo-experiments join valve1's folder (1-8)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="with --pooled-with-valve1: override a setting of SKAB's fleet config")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")
    import django

    django.setup()
    from django.conf import settings

    from detection.evaluation import SKAB_FLEET_CONFIG
    from detection.ml.evaluation import binary_metrics, in_windows
    from detection.ml.pipeline import PipelineConfig, TrainingWindow, run_core

    path = Path(args.path)
    if not path.is_dir():
        parser.error(f"{path} is not a folder")
    detectors = args.detector or ["ensemble", "auto"]
    if args.mixed_folder:
        if not 1 <= args.experiments <= 8:
            parser.error(f"--experiments must be from 1 to 8, got {args.experiments}")
        write_mixed_folder(path, args.mixed_folder, [args.fault], args.step, args.experiments)
        evaluate_mixed_folder(args.mixed_folder, (args.detector or ["ensemble"])[0])
        return
    if args.pooled_with_valve1:
        import json

        try:
            overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
        except ValueError as exc:
            parser.error(f"--set takes KEY=JSON, e.g. device_mad_floor=0.1 ({exc})")
        pooled_with_valve1(path, [args.pooled_with_valve1], args.step, detectors, args.one_folder, overrides)
        return
    faults = [[f] for f in FAULTS] if args.step else [[]]
    print(f"{'fault':<13} {'detector':<10} {'spread_floor':<12} {'F1':>6} {'FAR %':>6} {'MAR %':>6}")
    for fault in faults:
        frame, windows, metrics, cohort = pseudo_experiments(path, fault, args.step)
        for detector in detectors:
            for floor in ("none", "mean_ad"):
                config = PipelineConfig.from_settings(
                    {**settings.VIGIL_DETECTION, **SKAB_FLEET_CONFIG, "algorithm": detector, "spread_floor": floor},
                    cohort_columns=cohort, window=TrainingWindow(train_rows_per_device=TRAIN, score="after_training"))
                out = run_core(frame, metrics=metrics, metric_domain={}, config=config)
                truth = in_windows(out.scored, windows)
                m = binary_metrics(truth, np.asarray(out.result.labels) == -1)
                f1 = f"{m.f1:.3f}" if args.step else "-"
                mar = f"{m.mar:.1f}" if args.step else "-"
                print(f"{'+'.join(fault) or 'none':<13} {detector:<10} {floor:<12} {f1:>6} {m.far:>6.1f} {mar:>6}",
                      flush=True)


if __name__ == "__main__":
    main()
