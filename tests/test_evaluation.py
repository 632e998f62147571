"""Evaluations: the metric arithmetic by hand, the pipeline on SKAB, NAB and C-MAPSS data, the command."""
import json

import numpy as np
import pandas as pd
import pytest
from django.core.management import CommandError, call_command

from detection.evaluation import evaluate_nab, evaluate_skab
from detection.ml.evaluation import binary_metrics, early_warning, in_windows, operating_regimes
from detection.ml.nab import NabSeries, load_profiles, nab_score
from detection.models import Fleet


def test_binary_metrics_by_hand():
    m = binary_metrics(np.array([1, 1, 1, 0, 0, 0, 0, 0], bool), np.array([1, 1, 0, 1, 0, 0, 0, 0], bool))
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 1, 4)
    assert m.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m.far == pytest.approx(20.0) and m.mar == pytest.approx(100 / 3)


def test_flagging_every_row_gets_high_f1_but_full_far():
    truth = np.r_[np.ones(35, bool), np.zeros(65, bool)]
    m = binary_metrics(truth, np.ones(100, bool))
    assert m.f1 == pytest.approx(0.5185, abs=1e-3) and m.far == 100.0


def test_in_windows_is_inclusive_and_per_device():
    ts = pd.date_range("2026-01-01", periods=5, freq="1h", tz="UTC")
    rows = pd.DataFrame({"device_id": [1] * 5 + [2] * 5, "timestamp": list(ts) * 2})
    windows = pd.DataFrame({"device_id": [1], "start": [ts[1]], "end": [ts[3]]})
    assert in_windows(rows, windows).tolist() == [False, True, True, True, False] + [False] * 5


@pytest.mark.slow
@pytest.mark.django_db
def test_skab_valve1_meets_measured_floors(shared_data, tmp_path, capsys):
    out = tmp_path / "skab.json"
    preds = tmp_path / "preds"
    call_command("evaluate", "skab", str(shared_data / "skab" / "data" / "valve1"), "--json", str(out),
                 "--predictions-dir", str(preds))
    result = json.loads(out.read_text())
    # Measured on 2026-11-21: F1 0.869, FAR 3.8 %, MAR 20.7 % (the ensemble, SKAB's default detector).
    assert result["detector"] == "ensemble"
    assert result["f1"] >= 0.84
    assert result["far_pct"] <= 6.0
    assert result["files"] == 16 and result["scored_rows"] == sum(
        len(pd.read_csv(f, sep=";")) - 400 for f in (shared_data / "skab" / "data" / "valve1").glob("*.csv"))
    written = sorted(preds.glob("*.csv"))
    assert len(written) == 16
    first = pd.read_csv(written[0])
    assert list(first.columns) == ["datetime", "anomaly"] and set(first["anomaly"]) <= {0, 1}
    assert "pooled" in capsys.readouterr().out
    assert not Fleet.objects.exists()  # the scratch fleet is removed


@pytest.mark.django_db
def test_evaluate_refuses_a_folder_without_skab_files(tmp_path):
    with pytest.raises(CommandError):
        call_command("evaluate", "skab", str(tmp_path))


# --- early warning (run to failure) ----------------------------------------------------------------

def test_early_warning_by_hand():
    # Unit a fails at cycle 100, degraded from 71: first alarm at 80 (inside) -> lead 20.
    # Unit b fails at 60, degraded from 31: first alarm at 10 (before the window) -> lead 50.
    # Unit c fails at 90: never alarms.
    units = np.array(["a", "a", "a", "b", "b", "c", "c"])
    cycles = np.array([70, 80, 90, 10, 40, 50, 89])
    alarms = np.array([0, 1, 1, 1, 1, 0, 0], bool)
    summary, per_unit = early_warning(units, cycles, alarms, failure={"a": 100, "b": 60, "c": 90},
                                      degraded_from={"a": 71, "b": 31, "c": 61})
    assert (summary.units, summary.alarmed, summary.never) == (3, 2, 1)
    assert (summary.in_window, summary.before_window) == (1, 1)
    assert summary.mean_lead == pytest.approx((20 + 50) / 2) and summary.median_lead == pytest.approx(35.0)
    assert summary.mean_lead_in_window == pytest.approx(20.0)
    assert per_unit["a"] == {"first_alarm": 80.0, "lead": 20.0} and per_unit["c"] == {"first_alarm": None,
                                                                                       "lead": None}


# --- NAB -------------------------------------------------------------------------------------------

def _nab_layout(root, shared_data, *, windows=True):
    """A two-file NAB layout, 2000 rows each: 5-minute daily sine waves with noise (the 300
    probationary rows cover a day); a.csv shifts up by 8 noise sigmas from row 1400 (window rows
    1400..1599), b.csv has a single spike at row 1700 (window 1640..1759)."""
    (root / "config").mkdir(parents=True)
    (root / "config" / "profiles.json").write_text(
        (shared_data / "nab" / "config" / "profiles.json").read_text())
    (root / "data" / "synthetic").mkdir(parents=True)
    ts = pd.date_range("2024-03-01", periods=2000, freq="5min")
    rng = np.random.default_rng(1)
    base = 10 * np.sin(2 * np.pi * np.arange(2000) / 288)
    a = base + rng.normal(0, 1, 2000)
    a[1400:] += 8
    b = base + rng.normal(0, 1, 2000)
    b[1700] += 12
    stamp = "%Y-%m-%d %H:%M:%S"
    for name, values in (("a", a), ("b", b)):
        pd.DataFrame({"timestamp": ts.strftime(stamp), "value": values.round(3)}).to_csv(
            root / "data" / "synthetic" / f"{name}.csv", index=False)
    (root / "labels").mkdir()
    spans = {"synthetic/a.csv": [(1400, 1599)], "synthetic/b.csv": [(1640, 1759)]} if windows else {
        "synthetic/a.csv": [], "synthetic/b.csv": []}
    (root / "labels" / "combined_windows.json").write_text(json.dumps(
        {k: [[ts[lo].strftime(stamp) + ".000000", ts[hi].strftime(stamp) + ".000000"] for lo, hi in v]
         for k, v in spans.items()}))
    return root


@pytest.mark.django_db
def test_nab_detects_a_level_shift_and_a_spike_early(shared_data, tmp_path):
    root = _nab_layout(tmp_path / "nab", shared_data)
    result = evaluate_nab(path=root / "data" / "synthetic", results_dir=tmp_path / "results",
                          config={"algorithm": "isolation_forest", "n_estimators": 100})
    standard = result.profiles["standard"]
    assert (result.files, result.rows) == (2, 4000)
    assert result.scored_rows == 2 * (2000 - 300)  # probationary period: floor(0.15 * 2000) = 300 rows
    # Measured: a detected at its first row (the shift), b at the spike mid-window (y = -0.5),
    # 5 false positives: score 82.7.
    assert standard.detected_windows == 2 and standard.score >= 75
    written = pd.read_csv(tmp_path / "results" / "isolation_forest" / "synthetic" / "isolation_forest_a.csv")
    assert list(written.columns) == ["timestamp", "value", "anomaly_score", "label"]
    assert written["label"].sum() == 200 and written.loc[1400:1599, "label"].eq(1).all()
    assert written["anomaly_score"][:300].isna().all() and written["anomaly_score"][300:].between(0, 1).all()
    assert not Fleet.objects.exists()


@pytest.mark.django_db
def test_nab_without_windows_is_refused(shared_data, tmp_path):
    root = _nab_layout(tmp_path / "nab", shared_data, windows=False)
    with pytest.raises(CommandError, match="no NAB anomaly window"):
        call_command("evaluate", "nab", str(root))
    assert not Fleet.objects.exists()


@pytest.mark.django_db
def test_nab_overlapping_windows_are_refused_by_file_before_any_detector_runs(shared_data, tmp_path, monkeypatch):
    root = _nab_layout(tmp_path / "nab", shared_data)
    labels = root / "labels" / "combined_windows.json"
    windows = json.loads(labels.read_text())
    first = windows["synthetic/b.csv"][0]
    windows["synthetic/b.csv"].append(["2024-03-06 20:00:00.000000", first[1]])  # inside the first one
    labels.write_text(json.dumps(windows))

    def never(*args, **kwargs):
        raise AssertionError("a detector ran before the windows were checked")

    monkeypatch.setattr("detection.evaluation.run_core", never)
    with pytest.raises(CommandError, match=r"synthetic/b: window .* overlaps the window before it"):
        call_command("evaluate", "nab", str(root))
    assert not Fleet.objects.exists()


@pytest.mark.slow
@pytest.mark.django_db
def test_nab_real_traffic_meets_measured_floors(shared_data, tmp_path, capsys):
    out = tmp_path / "nab.json"
    call_command("evaluate", "nab", str(shared_data / "nab" / "data" / "realTraffic"), "--json", str(out),
                 "--results-dir", str(tmp_path / "results"))
    result = json.loads(out.read_text())
    # Measured on 2026-11-22 (nn_novelty, NAB's default detector, with its ratio_wait calibration):
    # standard 90.3, low FP 87.9, low FN 93.5; 14 of 14 windows detected, threshold swept on these 7
    # files only (89.5 / 86.3 / 93.0 with ratio_suppress; hybrid with rank calibration, the default
    # before: 50.7 / 36.2 / 57.6).
    assert result["detector"] == "nn_novelty"
    assert result["scores"]["standard"] >= 84
    assert result["scores"]["reward_low_FP_rate"] >= 80
    assert result["scores"]["reward_low_FN_rate"] >= 88
    assert result["files"] == 7 and result["profiles"]["standard"]["windows"] == 14
    written = sorted((tmp_path / "results" / "nn_novelty" / "realTraffic").glob("nn_novelty_*.csv"))
    assert len(written) == 7
    # nn_novelty's wait after each detection is baked into what is written (silenced rows score 0), so
    # NAB's own sweeper, which knows no wait, finds the same standard score in these files.
    labels = json.loads((shared_data / "nab" / "labels" / "combined_windows.json").read_text())
    series = []
    for path in written:
        frame = pd.read_csv(path)
        key = f"realTraffic/{path.name.removeprefix('nn_novelty_')}"
        series.append(NabSeries(key, frame["timestamp"], frame["anomaly_score"].to_numpy(float), labels[key]))
    rescored = nab_score(series, load_profiles(shared_data / "nab" / "config" / "profiles.json"))
    assert rescored["standard"].score == pytest.approx(result["scores"]["standard"])
    assert "reward_low_FN_rate" in capsys.readouterr().out
    assert not Fleet.objects.exists()


# --- C-MAPSS ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.django_db
def test_cmapss_first_20_engines_meet_measured_floors(shared_data, tmp_path):
    subset = tmp_path / "cmapss"
    subset.mkdir()
    lines = (shared_data / "cmapss" / "train_FD001.txt").read_text().splitlines()
    (subset / "train_FD001.txt").write_text("\n".join(l for l in lines if int(l.split()[0]) <= 20) + "\n")
    out = tmp_path / "cmapss.json"
    call_command("evaluate", "cmapss", str(subset), "--json", str(out), "--predictions-dir", str(tmp_path / "p"))
    result = json.loads(out.read_text())
    # Measured on 2026-11-21 (iqr, C-MAPSS's default detector; first 50 cycles train, last 30
    # degraded): precision 0.436, recall 0.958, F1 0.599; all 20 engines alarm, mean 88 cycles before
    # failure, 16 of them before the labelled window (hybrid, the default before: 0.249 / 1.000 / 0.398).
    assert result["detector"] == "iqr"
    assert result["recall"] >= 0.9 and result["precision"] >= 0.38 and result["f1"] >= 0.55
    ew = result["early_warning"]
    assert ew["units"] == 20 and ew["alarmed"] + ew["never"] == 20 and ew["alarmed"] >= 18
    assert result["scored_rows"] == sum(1 for l in lines if int(l.split()[0]) <= 20) - 20 * 50
    assert len(list((tmp_path / "p").glob("*.csv"))) == 20
    assert not Fleet.objects.exists()


# --- the command's input checks ----------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["nab", ".", "--detector", "nope"], "unknown detector 'nope'"),
    (["skab", ".", "--results-dir", "x"], "--results-dir applies to nab only"),
    (["nab", ".", "--predictions-dir", "x"], "--predictions-dir applies to skab and cmapss only"),
    (["cmapss", ".", "--train-cycles", "0"], "--train-cycles must be at least 1"),
])
def test_evaluate_refuses_bad_options(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("evaluate", *args)


@pytest.mark.django_db
def test_evaluate_refuses_a_missing_path(tmp_path):
    with pytest.raises(CommandError, match="not found"):
        call_command("evaluate", "nab", str(tmp_path / "missing"))


# --- the detector suite on reduced benchmarks (make test) ----------------------------------------

# Measured on 2026-11-21; floors/ceilings leave a margin. SKAB valve1 files 1 and 7: {detector: (F1 floor,
# FAR % ceiling)}. NAB realAdExchange (6 files), standard profile, each detector's own calibration.
# Measured with SKAB's settings (device_mad_floor 0.5, 45 s windows): robust_z 0.792/35.1, iqr 0.796/35.9,
# grubbs 0.798/43.0, lstm_ae 0.785/50.8, windowed_gaussian 0.256/9.5, ensemble 0.839/6.8 (two files
# only: one pooled model). With the fleets' 0.1 and 60 s windows they were 0.842/37.7, 0.844/37.2,
# 0.821/44.9, 0.813/41.6, 0.196/6.5 and 0.769/23.9: on these two files lstm_ae's FAR rose, while on all
# 16 it fell (README). NAB (2026-11-22): windowed_gaussian 74.4, robust_z 70.3 (rank_wait over 50 rows;
# 73.2 and 70.5 with rank_suppress), and nn_novelty 77.0 (ratio_wait over 20 rows; 75.2 with
# ratio_suppress). windowed_gaussian measured 0.422/8.4 before each file was read as its own series
# (detectors.SEQUENCE_KEY), when file 1's scored rows were read after file 7's training rows.
SKAB_FLOORS = {"robust_z": (0.76, 40.0), "iqr": (0.76, 40.0), "grubbs": (0.76, 48.0), "lstm_ae": (0.75, 56.0),
               "windowed_gaussian": (0.20, 12.0), "ensemble": (0.80, 10.0)}
NAB_AD_EXCHANGE_FLOORS = {"windowed_gaussian": 68.0, "robust_z": 65.0, "nn_novelty": 70.0}

@pytest.mark.slow
@pytest.mark.django_db
def test_evaluate_all_detectors_prints_one_table_with_timings(shared_data, tmp_path, capsys):
    from detection.ml.detectors import DETECTORS, table_detectors

    subset = tmp_path / "skab"
    subset.mkdir()
    for name in ("1.csv", "7.csv"):
        (subset / name).write_bytes((shared_data / "skab" / "data" / "valve1" / name).read_bytes())
    out = tmp_path / "all.json"
    call_command("evaluate", "skab", str(subset), "--detector", "all", "--json", str(out))
    table = capsys.readouterr().out.split("detector", 1)[1]
    assert "fit s" in table and "score s" in table
    result = json.loads(out.read_text())
    assert set(result["detectors"]) | set(result["failed"]) == set(table_detectors()) and not result["failed"]
    assert "patchtst" in DETECTORS and "patchtst" not in result["detectors"]  # experimental: by name only
    f1 = {name: r["f1"] for name, r in result["detectors"].items()}
    far = {name: r["far_pct"] for name, r in result["detectors"].items()}
    print(json.dumps({"f1": f1, "far": far}))
    # Floors set from the figures measured on 2026-11-21 (SKAB_FLOORS, F1 and FAR % on these two files).
    for name, (f1_floor, far_ceiling) in SKAB_FLOORS.items():
        assert f1[name] >= f1_floor and far[name] <= far_ceiling, name


@pytest.mark.slow
@pytest.mark.django_db
def test_skab_ensemble_alarm_persistence_meets_floors_on_the_held_out_files(shared_data, tmp_path):
    """The odd-numbered valve1 files, which played no part in choosing the 20-row persistence (chosen
    on the even ones). Measured on 2026-11-21: F1 0.903, FAR 2.6 %, MAR 15.8 % with persistence
    (0.909 / 5.3 % / 13.0 % before SKAB's device_mad_floor 0.5 and 45 s windows)."""
    subset = tmp_path / "skab"
    subset.mkdir()
    valve1 = shared_data / "skab" / "data" / "valve1"
    for k in range(1, 16, 2):
        (subset / f"{k}.csv").write_bytes((valve1 / f"{k}.csv").read_bytes())
    out = tmp_path / "ensemble.json"
    call_command("evaluate", "skab", str(subset), "--detector", "ensemble", "--json", str(out))
    held = json.loads(out.read_text())
    assert held["config"]["ensemble_smooth_rows"] == 20
    assert held["f1"] >= 0.87 and held["far_pct"] <= 8.0 and held["files"] == 8
    plain = evaluate_skab(path=subset, config={"algorithm": "ensemble", "ensemble_smooth_rows": 1})
    assert plain.metrics.far - held["far_pct"] >= 5.0  # persistence removes most false alarms
    assert held["f1"] > plain.metrics.f1


@pytest.mark.slow
@pytest.mark.django_db
def test_skab_trains_one_model_per_experiment_folder(shared_data, tmp_path, capsys):
    """A folder's files score the same whether or not another folder is evaluated with them: each
    experiment series (valve1, valve2, other) gets its own model, and the figures pool every row."""
    valve1 = shared_data / "skab" / "data" / "valve1"
    both, alone = tmp_path / "both" / "data", tmp_path / "alone" / "data"
    for root, folders in ((both, {"valve1": (1, 7), "valve2": (2, 8)}), (alone, {"valve1": (1, 7)})):
        for folder, files in folders.items():
            (root / folder).mkdir(parents=True)
            for k in files:
                (root / folder / f"{k}.csv").write_bytes((valve1 / f"{k}.csv").read_bytes())
    config = {"algorithm": "ensemble"}
    pooled = evaluate_skab(path=both.parent, config=config)
    single = evaluate_skab(path=alone.parent, config=config)
    assert len(pooled.run_ids) == 2 and len(single.run_ids) == 1 and pooled.files == 4
    for name in ("valve1/1", "valve1/7"):
        assert pooled.per_file[name] == single.per_file[name]
    rows = {name: f["tp"] + f["fp"] + f["fn"] + f["tn"] for name, f in pooled.per_file.items()}
    assert pooled.scored_rows == sum(rows.values())
    assert pooled.metrics.tp == sum(f["tp"] for f in pooled.per_file.values())
    assert not Fleet.objects.exists()
    call_command("evaluate", "skab", str(both.parent), "--detector", "ensemble")
    assert "one model per folder (2: valve1, valve2)" in capsys.readouterr().out


def _series(key, level, noise, n=50, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"external_id": key, "a": level + noise * rng.standard_normal(n),
                         "b": 0.05 + 0.2 * rng.standard_normal(n)})


def test_operating_regimes_by_hand():
    """Levels 10 and 30 (a factor 3, far beyond the noise) are two regimes; 10 and 12 are one (a
    factor 1.2); a chain 10 ~ 12 ~ 14 stays one; the near-zero column b never splits (its gaps are
    tiny against its noise); only the first train_rows rows count."""
    frame = pd.concat([_series("x", 10, 0.1), _series("y", 12, 0.1, seed=1), _series("z", 30, 0.1, seed=2)])
    assert operating_regimes(frame, ["a", "b"], train_rows=50) == {"x": 0, "y": 0, "z": 1}
    assert operating_regimes(frame, ["b"], train_rows=50) == {"x": 0, "y": 0, "z": 0}
    chain = pd.concat([_series("p", 10, 0.01), _series("q", 14.5, 0.01, seed=1), _series("r", 21, 0.01, seed=2)])
    # p-r differ by a factor 2.1, but q links them: p ~ q (1.45) and q ~ r (1.45).
    assert operating_regimes(chain, ["a"], train_rows=50) == {"p": 0, "q": 0, "r": 0}
    # Noisy series: a factor 3 that is under 20 mean absolute deviations is no new regime.
    assert operating_regimes(pd.concat([_series("x", 10, 2.0), _series("z", 30, 2.0, seed=2)]), ["a"],
                             train_rows=50) == {"x": 0, "z": 0}
    # z starts at 30 and settles at 10 after its training rows: only its first 20 rows count.
    late = pd.concat([_series("x", 10, 0.1), _series("z", 30, 0.1, n=20), _series("z", 10, 0.1, n=500)])
    assert operating_regimes(late, ["a"], train_rows=20) == {"x": 0, "z": 1}
    assert operating_regimes(late, ["a"], train_rows=520) == {"x": 0, "z": 0}
    with pytest.raises(ValueError, match="ratio > 1"):
        operating_regimes(frame, ["a"], train_rows=50, ratio=1.0)


def test_operating_regimes_on_skab(shared_data):
    """valve1's 16 files are one regime (water temperature 66-79 degC across them); the rig's
    anomaly-free recording (flow near 122 against 32, vibration 8 times valve1's) is another."""
    from detection.ingest.readers import read_skab

    batch = read_skab(shared_data / "skab")
    regimes = operating_regimes(batch.telemetry, [m["name"] for m in batch.metric_schema], train_rows=400)
    assert {k: v for k, v in regimes.items() if k.startswith("valve1/")} == {f"valve1/{i}": 1 for i in range(16)}
    assert regimes["anomaly-free/anomaly-free"] == 0


@pytest.mark.slow
@pytest.mark.django_db
def test_skab_splits_a_folder_by_operating_regime(shared_data, tmp_path, capsys):
    """A file run at another operating point (valve1/2 with 3.8 times the flow, 8 times the vibration
    and 2.5 times the current, as the anomaly-free recording has) in valve1's folder gets a model of
    its own, and valve1's other files score exactly as they do without it."""
    valve1 = shared_data / "skab" / "data" / "valve1"
    mixed, alone = tmp_path / "mixed" / "valve1", tmp_path / "alone" / "valve1"
    for folder in (mixed, alone):
        folder.mkdir(parents=True)
        for k in (1, 7):
            (folder / f"{k}.csv").write_bytes((valve1 / f"{k}.csv").read_bytes())
    other = pd.read_csv(valve1 / "2.csv", sep=";")
    for column, factor in (("Volume Flow RateRMS", 3.8), ("Accelerometer1RMS", 8), ("Accelerometer2RMS", 8),
                           ("Current", 2.5)):
        other[column] *= factor
    other.to_csv(mixed / "2.csv", sep=";", index=False)
    config = {"algorithm": "ensemble"}
    split = evaluate_skab(path=mixed.parent, config=config)
    single = evaluate_skab(path=alone.parent, config=config)
    assert [(m["name"], m["files"]) for m in split.models] == [("valve1 regime 1 of 2", 2),
                                                               ("valve1 regime 2 of 2", 1)]
    assert len(split.run_ids) == 2 and split.files == 3
    for name in ("valve1/1", "valve1/7"):
        assert split.per_file[name] == single.per_file[name]
    assert split.metrics.tp == sum(f["tp"] for f in split.per_file.values())
    call_command("evaluate", "skab", str(mixed.parent), "--detector", "ensemble")
    assert "one model per folder and operating regime (2: valve1 regime 1 of 2, 2 files; valve1 regime 2 of 2, " \
           "1 file)" in capsys.readouterr().out


@pytest.mark.slow
def test_skab_settings_keep_few_false_alarms_on_the_rigs_normal_running(shared_data):
    """SKAB's anomaly-free recording cut into 8 experiments like valve1's (benchmarks/skab_injected.py):
    every scored row is normal, so the flagged share is the false alarm rate. Measured on 2026-11-21:
    the ensemble flags 6.2 % with SKAB's device_mad_floor (0.5) and 12.3 % with the fleets' 0.1 (15.2 %
    with 0.1 and 60 s windows), its alarms growing with time since the 400 training rows."""
    import importlib.util

    from django.conf import settings

    from detection.evaluation import SKAB_FLEET_CONFIG
    from detection.ml.pipeline import PipelineConfig, TrainingWindow, run_core

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("skab_injected", REPO_ROOT / "benchmarks" / "skab_injected.py")
    injected = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(injected)
    frame, _, metrics, cohort = injected.pseudo_experiments(shared_data / "skab", [], 0)
    assert frame["device_id"].nunique() == 8
    far = {}
    for floor in (SKAB_FLEET_CONFIG["device_mad_floor"], 0.1):
        config = PipelineConfig.from_settings(
            {**settings.VIGIL_DETECTION, **SKAB_FLEET_CONFIG, "algorithm": "ensemble", "device_mad_floor": floor},
            cohort_columns=cohort, window=TrainingWindow(train_rows_per_device=400, score="after_training"))
        flagged = run_core(frame, metrics=metrics, metric_domain={}, config=config).result.labels == -1
        far[floor] = 100 * flagged.mean()
    assert far[SKAB_FLEET_CONFIG["device_mad_floor"]] <= 9.0
    assert far[0.1] >= 12.0


@pytest.mark.slow
@pytest.mark.django_db
def test_nab_ad_exchange_streaming_detectors_meet_measured_floors(shared_data, tmp_path):
    scores = {}
    for name in NAB_AD_EXCHANGE_FLOORS:
        result = evaluate_nab(path=shared_data / "nab" / "data" / "realAdExchange", config={"algorithm": name})
        scores[name] = result.profiles["standard"].score
    print(scores)
    for name, floor in NAB_AD_EXCHANGE_FLOORS.items():
        assert scores[name] >= floor, name
