"""Hyperparameter tuning of a fleet's detection settings with time-series cross-validation, on the
fleet's labelled anomaly windows (GroundTruthLabel: NAB, SKAB, C-MAPSS or synthetic injections).

Each candidate setting is run through the pipeline core itself (features, baselines, train, score:
detection.ml.pipeline.run_core), so what is tuned is what a pipeline run would do. The folds split
time, not rows (scikit-learn's TimeSeriesSplit over the fleet's distinct timestamps): fold k trains
on every device's rows up to its boundary t_k, with baselines computed from those rows only, and is
scored on the rows in (t_k, t_k+1], which no model of that fold has seen. A fleet's rows are
device-major, so splitting rows would train on some devices and test on others, at the same times.

Each fold's predictions (the detector's own threshold) are compared with the labelled windows; a
candidate's figures are the pooled precision, recall, F1 and FAR over its folds' test rows, and
the mean of its per-fold F1. The best candidate has the highest pooled F1 (ties: the earlier in
the grid). With apply, the best values are written into the fleet's config, and the change is
audited (AuditAction.FLEET_TUNED) in the same transaction.

A grid varies detection settings (contamination, ensemble_smooth_rows, ...) and detectors' own
hyperparameters, named "<detector>.<parameter>" (lstm_ae.window, lof.n_neighbors: see
detection.ml.detectors.settable_hyperparameters), which go into the setting detector_params.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from django.conf import settings
from django.db import transaction

from .choices import AuditAction
from .ingest.loader import load_ground_truth, load_telemetry_frame
from .ml.detectors import DETECTORS, AnomalyDetectorConfig, settable_hyperparameters
from .ml.evaluation import BinaryMetrics, binary_metrics, in_windows
from .ml.pipeline import PipelineConfig, StageError, TrainingWindow, run_core
from .models import Fleet
from .services import audit_record

DEFAULT_GRID = {"contamination": [0.01, 0.03, 0.05, 0.1]}
MAX_CANDIDATES = 50


class TuningError(Exception):
    """Tuning cannot run: no labels, a bad grid, too few timestamps. The message names the cause."""


@dataclass
class Candidate:
    """One grid point: params, the pooled metrics over its folds' test rows, per-fold F1, and the
    error that stopped it (a pipeline stage failure), if any."""

    params: dict
    config: PipelineConfig | None = field(default=None, repr=False)  # the fleet's settings with params
    metrics: BinaryMetrics | None = None
    folds: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def f1(self) -> float:
        return self.metrics.f1 if self.metrics is not None else float("nan")

    def as_dict(self) -> dict:
        return {"params": self.params, **(self.metrics.as_dict() if self.metrics else {}),
                "mean_fold_f1": round(float(np.mean(self.folds)), 4) if self.folds else None,
                "folds": [round(f, 4) for f in self.folds], "error": self.error}


@dataclass
class TuningResult:
    fleet: str
    algorithm: str
    folds: list[dict]  # [{train_until, test_until, test_rows, anomalous_rows}]
    candidates: list[Candidate]
    best: Candidate | None
    seconds: float
    applied: bool = False
    grid: dict = field(default_factory=dict)

    def grid_edges(self) -> dict[str, str]:
        """{setting: "lowest" | "highest"} for each numeric setting of two or more values whose best
        value is the grid's lowest or highest: the best may lie beyond the grid."""
        edges = {}
        for key, values in self.grid.items():
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if self.best is None or len(set(numbers)) < 2 or key not in self.best.params:
                continue
            if self.best.params[key] == min(numbers):
                edges[key] = "lowest"
            elif self.best.params[key] == max(numbers):
                edges[key] = "highest"
        return edges

    def as_dict(self) -> dict:
        return {"fleet": self.fleet, "algorithm": self.algorithm, "folds": self.folds,
                "candidates": [c.as_dict() for c in self.candidates],
                "best": self.best.as_dict() if self.best else None, "grid_edges": self.grid_edges(),
                "seconds": round(self.seconds, 2), "applied": self.applied}


def tunable_settings() -> list[str]:
    """The keys a grid may vary: settings.VIGIL_DETECTION's keys, the detector config's fields
    (contamination, ensemble_smooth_rows, ...) and "<detector>.<parameter>" for every detector's
    settable hyperparameter (lstm_ae.window, ...). detector_params itself is set through the latter."""
    plain = set(settings.VIGIL_DETECTION) | set(AnomalyDetectorConfig.__dataclass_fields__)
    dotted = {f"{name}.{p}" for name in DETECTORS for p in settable_hyperparameters(name)}
    return sorted((plain - {"detector_params"}) | dotted)


def with_params(config: dict, params: dict) -> dict:
    """config with a grid point's params applied: plain keys replace, "<detector>.<parameter>" keys
    go into detector_params, merged with the detector parameters config already has."""
    out = {**config, **{k: v for k, v in params.items() if "." not in k}}
    dotted = {k: v for k, v in params.items() if "." in k}
    if dotted:
        merged = {d: dict(p) for d, p in (config.get("detector_params") or {}).items()}
        for key, value in dotted.items():
            detector, parameter = key.split(".", 1)
            merged.setdefault(detector, {})[parameter] = value
        out["detector_params"] = merged
    return out


def tune_fleet(*, fleet: Fleet, grid: dict | None = None, algorithm: str | None = None, folds: int = 3,
               apply: bool = False, actor=None, progress: Callable[[int, int, dict], None] | None = None
               ) -> TuningResult:
    """Grid-search the fleet's detection settings with time-series cross-validation (module docstring).

    grid: {setting: [values]} over tunable_settings() (default DEFAULT_GRID), at most MAX_CANDIDATES
        combinations. algorithm: the detector to tune (default: the fleet's). folds: 2-10 time folds.
    progress(done, total, candidate_dict) is called after each candidate.
    Raises TuningError for a fleet without labels or telemetry, a bad grid (naming the setting and
    value) or too few timestamps for the folds; a candidate whose pipeline fails is kept with its
    error and never chosen.
    """
    started = time.perf_counter()
    grid = DEFAULT_GRID if grid is None else grid
    base = fleet.detection_config()
    algorithm = algorithm or base["algorithm"]
    candidates = _candidates(fleet, grid, algorithm, base)
    if not 2 <= folds <= 10:
        raise TuningError(f"folds must be between 2 and 10, got {folds}")
    windows = load_ground_truth(fleet)
    if windows.empty:
        raise TuningError(f"fleet {fleet.name!r} has no labelled anomaly windows; tuning needs labels "
                          "(ingest a labelled dataset, or use a fleet generated with injected anomalies)")
    frame = load_telemetry_frame(fleet)
    if frame.empty:
        raise TuningError(f"fleet {fleet.name!r} has no telemetry")
    splits = _time_folds(frame["timestamp"], folds)
    plans = []
    for train_until, test_until in splits:
        upto = frame[frame["timestamp"] <= test_until]
        test = (upto["timestamp"] > train_until).to_numpy()
        truth = in_windows(upto.loc[test, ["device_id", "timestamp"]], windows)
        plans.append((train_until, test_until, upto, truth))
    fold_info = [{"train_until": t.isoformat(), "test_until": u.isoformat(), "test_rows": len(truth),
                  "anomalous_rows": int(truth.sum())} for t, u, _, truth in plans]
    for done, candidate in enumerate(candidates, 1):
        _run_candidate(candidate, fleet, plans)
        if progress:
            progress(done, len(candidates), candidate.as_dict())
    scored = [c for c in candidates if c.metrics is not None]
    best = max(scored, key=lambda c: c.f1) if scored else None  # max keeps the first of equals
    result = TuningResult(fleet.name, algorithm, fold_info, candidates, best, time.perf_counter() - started,
                          grid=dict(grid))
    if apply and best is not None:
        _apply(fleet, best, algorithm, actor, result)
        result.applied = True
    return result


def _candidates(fleet: Fleet, grid, algorithm: str, base: dict) -> list[Candidate]:
    if algorithm not in DETECTORS:
        raise TuningError(f"unknown detector {algorithm!r}; known: {', '.join(sorted(DETECTORS))}")
    if not isinstance(grid, dict) or not grid:
        raise TuningError("the grid must be a non-empty object of {setting: [values]}")
    known = set(tunable_settings())
    for key, values in grid.items():
        if key not in known:
            raise TuningError(_unknown_setting(key, known))
        if not isinstance(values, list) or not values:
            raise TuningError(f"grid setting {key!r} needs a non-empty list of values, got {values!r}")
    combos = list(itertools.product(*grid.values()))
    if len(combos) > MAX_CANDIDATES:
        raise TuningError(f"the grid has {len(combos)} combinations; at most {MAX_CANDIDATES} are run")
    out = []
    for values in combos:
        params = dict(zip(grid, values))
        try:  # every candidate must make a valid pipeline config before any of them runs
            config = PipelineConfig.from_settings(with_params({**base, "algorithm": algorithm}, params),
                                                  cohort_columns=fleet.cohort_columns)
        except (ValueError, TypeError) as exc:  # DetectorError is a ValueError
            setting = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise TuningError(f"grid point {setting} is not a valid setting: {exc}") from None
        out.append(Candidate(params, config))
    return out


def _unknown_setting(key: str, known: set[str]) -> str:
    """Why a grid key is not tunable, naming what is: the detector or its hyperparameters for a
    "<detector>.<parameter>" key, the plain settings otherwise."""
    if "." in key:
        detector, parameter = key.split(".", 1)
        if detector not in DETECTORS:
            return (f"grid setting {key!r} names an unknown detector {detector!r}; known: "
                    f"{', '.join(sorted(DETECTORS))}")
        settable = sorted(settable_hyperparameters(detector))
        return (f"grid setting {key!r}: {detector} has no settable hyperparameter {parameter!r}; settable: "
                f"{', '.join(settable) or 'none'}")
    plain = sorted(k for k in known if "." not in k)
    return (f"grid setting {key!r} is not a detection setting; tunable: {', '.join(plain)}, or a detector's "
            "hyperparameter as <detector>.<parameter> (e.g. lof.n_neighbors)")


def _time_folds(timestamps: pd.Series, folds: int) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """[(train_until, test_until)] from TimeSeriesSplit over the distinct timestamps."""
    from sklearn.model_selection import TimeSeriesSplit

    distinct = np.sort(timestamps.unique())
    if len(distinct) < 2 * (folds + 1):
        raise TuningError(f"{len(distinct)} distinct timestamps are too few for {folds} folds")
    out = []
    for train, test in TimeSeriesSplit(n_splits=folds).split(distinct):
        out.append((pd.Timestamp(distinct[train[-1]]), pd.Timestamp(distinct[test[-1]])))
    return out


def _run_candidate(candidate: Candidate, fleet: Fleet, plans) -> None:
    truths, predictions = [], []
    for train_until, _, upto, truth in plans:
        config = replace(candidate.config, window=TrainingWindow(train_until=train_until, score="after_training"))
        try:
            output = run_core(upto, metrics=fleet.metric_names, metric_domain=fleet.metric_domains, config=config)
        except StageError as exc:
            candidate.error = str(exc)
            candidate.folds = []
            return
        predicted = np.asarray(output.result.labels) == -1
        truths.append(truth)
        predictions.append(predicted)
        candidate.folds.append(binary_metrics(truth, predicted).f1)
    candidate.metrics = binary_metrics(np.concatenate(truths), np.concatenate(predictions))


def _apply(fleet: Fleet, best: Candidate, algorithm: str, actor, result: TuningResult) -> None:
    with transaction.atomic():
        fleet = Fleet.objects.select_for_update().get(pk=fleet.pk)
        config = dict(fleet.config or {})
        updated = with_params(config, best.params)
        keys = [k for k in best.params if "." not in k]
        keys += ["detector_params"] if any("." in k for k in best.params) else []
        changes = {k: updated[k] for k in keys}
        if algorithm != fleet.detection_config()["algorithm"]:
            changes["algorithm"] = algorithm
        before = {k: config.get(k, settings.VIGIL_DETECTION.get(k)) for k in changes}
        config.update(changes)
        fleet.config = config
        fleet.save(update_fields=["config"])
        audit_record(action=AuditAction.FLEET_TUNED, actor=actor, actor_label="" if actor else "tune", fleet=fleet,
                     target=fleet, before=before, after=changes,
                     reason=f"time-series CV, {len(result.folds)} folds, {len(result.candidates)} candidates: "
                            f"F1 {best.f1:.3f} (precision {best.metrics.precision:.3f}, "
                            f"recall {best.metrics.recall:.3f})")
