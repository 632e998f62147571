"""The Django-free pipeline core: features -> baselines -> train -> score, on a telemetry frame.

detection.services wraps it with the stages that touch the database (ingest before, persist after);
the evaluate command and the benchmarks call it too, so every caller runs the same code.

Failure policy (DEVELOPERS.md): if baselines fail, the run falls back to raw features and records a
warning; if training or scoring fails, StageError is raised with the stage and a clear message.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pandas as pd

from baselines.engine import (
    DEVICE_MAD_FLOOR, LEVELS, BaselineSet, apply_baselines, compute_baselines, model_overrides,
)

from . import suite  # (importing it registers the statistical, density and ensemble detectors)
from .detectors import DETECTORS, SEQUENCE_KEY, AnomalyDetectorConfig, DetectorError, make_detector
from .features import FeatureConfig, build_features, resid_scales
from .scoring import ScoreResult, score_frame

logger = logging.getLogger(__name__)


class StageError(Exception):
    """A pipeline stage failed; `stage` names it and the message says why."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"{stage} failed: {message}")


@dataclass(frozen=True)
class TrainingWindow:
    """Which rows train the model and which are scored.

    train_until: rows with timestamp <= this train (None: no time bound).
    train_rows_per_device: the first N rows of each device train (None: no count bound).
    score: "all" scores every row; "after_training" scores only rows outside the training window.
    """

    train_until: pd.Timestamp | None = None
    train_rows_per_device: int | None = None
    score: str = "all"

    def __post_init__(self) -> None:
        if self.score not in ("all", "after_training"):
            raise ValueError(f"score must be 'all' or 'after_training', got {self.score!r}")
        if self.train_rows_per_device is not None and self.train_rows_per_device < 1:
            raise ValueError("train_rows_per_device must be at least 1")

    def training_mask(self, frame: pd.DataFrame) -> np.ndarray:
        mask = np.ones(len(frame), dtype=bool)
        if self.train_until is not None:
            mask &= (frame["timestamp"] <= self.train_until).to_numpy()
        if self.train_rows_per_device is not None:
            mask &= (frame.groupby("device_id", sort=False).cumcount() < self.train_rows_per_device).to_numpy()
        return mask


@dataclass(frozen=True)
class PipelineConfig:
    algorithm: str = "hybrid"
    detector: AnomalyDetectorConfig = field(default_factory=AnomalyDetectorConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    window: TrainingWindow = field(default_factory=TrainingWindow)
    baseline_levels: tuple[str, ...] = LEVELS
    baseline_min_rows: int = 25
    # A device's baseline MAD is at least this share of its cohort's (baselines.engine, DEVICE_MAD_FLOOR).
    device_mad_floor: float = DEVICE_MAD_FLOOR
    z_level: str = "cohort"
    top_k: int = 5
    severity_bands: tuple[float, float, float] = (4.0, 6.0, 10.0)
    domain_weights: dict = field(default_factory=dict)
    # The hybrid detector's temporal input: "baseline" (each metric's rolling mean against the
    # device's own baseline) or "residual" (each sample against the device's previous window).
    temporal: str = "baseline"

    def __post_init__(self) -> None:
        if self.temporal not in ("baseline", "residual"):
            raise ValueError(f"temporal must be 'baseline' or 'residual', got {self.temporal!r}")
        unknown = [lv for lv in (*self.baseline_levels, self.z_level) if lv not in LEVELS]
        if unknown:  # a typo here would otherwise surface only as a baseline failure and a fallback
            raise ValueError(f"unknown baseline level(s) {unknown}; known: {list(LEVELS)}")
        floor = self.device_mad_floor
        if isinstance(floor, bool) or not (isinstance(floor, (int, float)) and 0 <= floor <= 100):
            raise ValueError(f"device_mad_floor must be a number from 0 to 100, got {floor!r}")

    @classmethod
    def from_settings(cls, values: dict, *, cohort_columns: list[str], window: TrainingWindow | None = None
                      ) -> "PipelineConfig":
        """Build from a mapping shaped like settings.VIGIL_DETECTION (merged with a fleet's overrides)."""
        algorithm = values.get("algorithm", "hybrid")
        if algorithm not in DETECTORS:
            raise ValueError(f"unknown algorithm {algorithm!r}; known: {sorted(DETECTORS)}")
        return cls(
            algorithm=algorithm,
            detector=AnomalyDetectorConfig.from_mapping(values),
            features=FeatureConfig(
                rolling_window=values.get("rolling_window", "12h"), delta_lag=values.get("delta_lag", "1D"),
                cohort_bucket=values.get("cohort_bucket", "1h"), cohort_columns=tuple(cohort_columns)),
            window=window or TrainingWindow(),
            baseline_levels=tuple(values.get("baseline_levels", LEVELS)),
            baseline_min_rows=int(values.get("baseline_min_rows", 25)),
            device_mad_floor=values.get("device_mad_floor", DEVICE_MAD_FLOOR),
            z_level=values.get("z_level", "cohort"),
            top_k=int(values.get("top_metrics", 5)),
            severity_bands=tuple(values.get("severity_z", (4.0, 6.0, 10.0))),
            domain_weights=dict(values.get("domain_weights", {})),
            temporal=values.get("hybrid_temporal", "baseline"),
        )


@dataclass
class PipelineOutput:
    """scored: rows x (device_id, external_id, timestamp) of the scored rows, aligned with result.
    config is what serving must reuse to compute the same features (it goes into the model artifact)."""

    scored: pd.DataFrame
    result: ScoreResult
    detector: object
    baselines: BaselineSet | None
    model_features: list[str]
    warnings: list[str]
    timings: dict[str, float]
    row_counts: dict[str, int]
    training_rows: int
    config: PipelineConfig  # as run: the features' resid_scale filled in from the training rows


Progress = Callable[[str, dict], None]


def run_core(df: pd.DataFrame, *, metrics: list[str], metric_domain: dict[str, str], config: PipelineConfig,
             progress: Progress | None = None, baselines: BaselineSet | None = None,
             feedback: pd.DataFrame | None = None) -> PipelineOutput:
    """Run features, baselines, train and score on a telemetry frame.

    df: rows x (device_id, external_id, timestamp, device attribute columns, metrics), sorted by
        device_id then timestamp (detection.ingest.loader.load_telemetry_frame's shape).
    baselines: use this set (e.g. an adjusted baseline version) instead of computing one; its
        model_overrides (contamination, domain weights) override config. It must cover the features
        and levels the run needs, else StageError("baselines"): a given set never falls back.
    feedback: reviewed anomalies, rows x (device_id, timestamp, verdict), one verdict per row. An
        ensemble (or auto) then weighs its members by their precision on the reviewed rows of df
        (suite.weights_from_feedback, with the configured weights as priors); see _review_weights.
    progress(stage, info) is called when a stage starts ({}) and ends ({"seconds", "rows"}).
    Raises StageError for features, baselines (given set only), train and score failures.
    """
    given = baselines
    if given is not None:
        config = with_overrides(config, given)
    progress = progress or (lambda stage, info: None)
    warnings: list[str] = []
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}

    def stage(name: str):
        return _Stage(name, progress, timings, counts)

    with stage("features") as s:
        try:
            missing = [c for c in ["device_id", "timestamp", *metrics] if c not in df.columns]
            if missing:
                raise KeyError(f"telemetry frame lacks column(s): {', '.join(missing)}")
            df = df.reset_index(drop=True)
            reference = config.window.training_mask(df)
            feature_config = replace(config.features, resid_scale=resid_scales(
                df if reference.all() else df.loc[reference], metrics))
            ff = build_features(df, metrics, feature_config)
        except (KeyError, ValueError) as exc:
            raise StageError("features", str(exc)) from exc
        frame = ff.frame
        s.rows = len(frame)
    feature_metric = ff.feature_metric
    feature_domain = {f: metric_domain.get(m, "other") for f, m in feature_metric.items()}
    train_mask = reference  # the rows that train: the same mask that scaled the features
    everything = bool(train_mask.all())

    def training_rows(f: pd.DataFrame) -> pd.DataFrame:
        return f if everything else f.loc[train_mask]  # no million-row copy when all rows train

    if not train_mask.any():
        raise StageError("train", "the training window selects no rows")
    empty = [f for f in ff.model_features if not training_rows(frame[f]).notna().any()]
    if empty:
        warnings.append(f"{len(empty)} engineered feature(s) have no values in the training window and were "
                        f"left out: {', '.join(empty)}")
    usable = [f for f in ff.model_features if f not in empty]
    blank_metrics = [m for m in metrics if m in usable and not training_rows(frame[m]).notna().any()]
    if blank_metrics:
        raise StageError("train", f"metric(s) with no values in the training window: {', '.join(blank_metrics)}")

    baselines: BaselineSet | None = None
    with stage("baselines") as s:
        if given is not None:
            model_frame, model_features, temporal_features = _given_baseline_inputs(
                frame, given, usable=usable, metrics=metrics, config=config)
            baselines = given
            s.rows = len(given.stats)
        else:
            try:
                levels = tuple(dict.fromkeys([*config.baseline_levels, config.z_level, "device"]))
                baselines = compute_baselines(
                    training_rows(frame), usable, levels, min_rows=config.baseline_min_rows,
                    device_mad_floor=float(config.device_mad_floor),
                    cohort_columns=config.features.cohort_columns, seed=config.detector.random_state)
                model_frame, model_features, temporal_features = model_inputs(
                    frame, baselines=baselines, usable=usable, metrics=metrics, config=config)
                s.rows = len(baselines.stats)
            except Exception as exc:  # any failure here degrades to raw features, by design
                logger.warning("baselines failed, falling back to raw features: %s", exc)
                warnings.append(f"baselines failed ({exc}); the model was trained on raw features instead")
                baselines = None
                model_frame, model_features, temporal_features = model_inputs(
                    frame, baselines=None, usable=usable, metrics=metrics, config=config)
                s.rows = 0

    detector = make_detector(config.algorithm, config.detector, feature_domain={**feature_domain, **{
        f"{f}_z_{config.z_level}": feature_domain[f] for f in usable}}, domain_weights=config.domain_weights)
    train = training_rows(model_frame)
    with stage("train") as s:
        try:
            if detector.uses_temporal:
                detector.fit(train, model_features, temporal_features=temporal_features)
            else:
                detector.fit(train, model_features)
            if feedback is not None and len(feedback) and isinstance(detector, suite.EnsembleDetector):
                _review_weights(detector, train, model_frame, frame, feedback)
        except DetectorError as exc:
            raise StageError("train", str(exc)) from exc
        except Exception as exc:
            logger.exception("training failed")
            raise StageError("train", f"{type(exc).__name__}: {exc}") from exc
        s.rows = len(train)
        if detector.dropped_:
            warnings.append(f"{len(detector.dropped_)} near-constant feature(s) dropped: "
                            f"{', '.join(sorted(detector.dropped_))}")

    score_mask = np.ones(len(frame), dtype=bool) if config.window.score == "all" else ~train_mask
    score_rows = model_frame if config.window.score == "all" else model_frame.loc[score_mask]
    if score_rows.empty:
        raise StageError("score", "no rows to score after the training window")
    with stage("score") as s:
        try:
            result = score_frame(
                detector, score_rows, explain=frame if config.window.score == "all" else frame.loc[score_mask],
                features=usable, feature_metric=feature_metric, metric_domain=metric_domain,
                baselines=baselines, level=config.z_level, top_k=config.top_k,
                severity_bands=config.severity_bands)
        except Exception as exc:
            logger.exception("scoring failed")
            raise StageError("score", f"{type(exc).__name__}: {exc}") from exc
        s.rows = len(score_rows)
    excluded = dict(getattr(detector, "excluded_", None) or {})  # an ensemble's members that failed
    if excluded:
        warnings.append(f"{len(excluded)} ensemble member(s) left out: "
                        + "; ".join(f"{name} ({why})" for name, why in excluded.items()))

    scored = frame.loc[score_mask, ["device_id", "external_id", "timestamp"]].reset_index(drop=True)
    return PipelineOutput(scored, result, detector, baselines, model_features, warnings, timings, counts,
                          int(train_mask.sum()), replace(config, features=feature_config))


def _review_weights(detector, train: pd.DataFrame, model_frame: pd.DataFrame, frame: pd.DataFrame,
                    feedback: pd.DataFrame) -> None:
    """Dynamic ensemble weights from reviews: each member's vote (its own threshold) on every reviewed
    row of the frame, then suite.weights_from_feedback (precision on the reviews, shrunk towards the
    configured weight) and EnsembleDetector.reweight on the training rows. Members vote on the whole
    series of each reviewed device, so the sequential ones read each reviewed row with its past.
    Reviewed rows outside the frame do not count; with none left, the priors stay."""
    keys = frame[["device_id", "timestamp"]].reset_index(names="row")
    reviewed = keys.merge(feedback[["device_id", "timestamp", "verdict"]], on=["device_id", "timestamp"])
    reviewed = reviewed[reviewed["verdict"].isin(["true_positive", "false_positive"])]
    if reviewed.empty:
        return
    rows = model_frame.loc[frame["device_id"].isin(reviewed["device_id"].unique()).to_numpy()]
    votes = detector.votes(rows)
    at = rows.index.get_indexer(reviewed["row"])
    table = pd.DataFrame({"verdict": reviewed["verdict"].to_numpy(), **{m: v[at] for m, v in votes.items()}})
    priors = {m: float(detector.member_weights.get(m, 1.0)) for m in votes}
    weights = suite.weights_from_feedback(table, list(votes), priors)
    detector.reweight(train, weights, source=f"precision on {len(table)} reviewed anomalies")


def with_overrides(config: PipelineConfig, baselines: BaselineSet) -> PipelineConfig:
    """config with the baseline set's feedback overrides (contamination, domain weights) applied."""
    overrides = model_overrides(baselines)
    if "contamination" in overrides:
        config = replace(config, detector=replace(config.detector, contamination=float(overrides["contamination"])))
    if overrides.get("domain_weights"):
        config = replace(config, domain_weights={**config.domain_weights, **overrides["domain_weights"]})
    return config


def _given_baseline_inputs(frame, given: BaselineSet, *, usable, metrics, config):
    levels = tuple(dict.fromkeys([*config.baseline_levels, config.z_level, "device"]))
    lacking = [f for f in usable if f not in given.features] + [lv for lv in levels if lv not in given.levels]
    if lacking:
        raise StageError("baselines", f"the given baseline set lacks {', '.join(lacking)}")
    try:
        return model_inputs(frame, baselines=given, usable=usable, metrics=metrics, config=config)
    except ValueError as exc:
        raise StageError("baselines", str(exc)) from exc


def model_inputs(frame: pd.DataFrame, *, baselines: BaselineSet | None, usable: list[str], metrics: list[str],
                 config: PipelineConfig) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The detector's input columns for the rows of an engineered frame; training and serving both call it.

    frame: build_features(...).frame. usable: the engineered features that trained (baselines.features
    when there are baselines). Returns (model frame on frame's index, model features, temporal features):
    with baselines, the robust z-scores at config.z_level plus the temporal columns (device-level z of the
    rolling means, or the *_resid columns); without (the fall-back), the raw features plus *_resid.
    The model frame also carries frame's SEQUENCE_KEY column (device_id), which is neither a model
    nor a temporal feature: the sequential detectors read it to keep each device's rows a series
    of its own (detection.ml.detectors.sequence_blocks).
    Raises BaselineError (a ValueError) when the baselines lack a level or feature.
    """
    resid = [f"{m}_resid" for m in metrics]
    if baselines is None:
        return _with_sequence_key(frame[usable].join(frame[resid]), frame), list(usable), resid
    model_frame = apply_baselines(frame, baselines, (config.z_level,), features=usable, join=False)
    model_features = list(model_frame.columns)
    if config.temporal == "baseline":
        recent = [f"{m}_roll_mean" for m in metrics if f"{m}_roll_mean" in usable]
        temporal = apply_baselines(frame, baselines, ("device",), features=recent, join=False)
    else:
        temporal = frame[resid]
    temporal_features = list(temporal.columns)
    model_frame = model_frame.join(temporal[[c for c in temporal_features if c not in model_frame]])
    return _with_sequence_key(model_frame, frame), model_features, temporal_features


def _with_sequence_key(model_frame: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """model_frame with frame's SEQUENCE_KEY column (same index) as its last column, when frame has one."""
    if SEQUENCE_KEY not in frame.columns or SEQUENCE_KEY in model_frame.columns:
        return model_frame
    return model_frame.assign(**{SEQUENCE_KEY: frame[SEQUENCE_KEY]})


class _Stage:
    def __init__(self, name, progress, timings, counts):
        self.name, self.progress, self.timings, self.counts, self.rows = name, progress, timings, counts, 0

    def __enter__(self):
        self.start = time.perf_counter()
        self.progress(self.name, {})
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.timings[self.name] = round(time.perf_counter() - self.start, 3)
            self.counts[self.name] = int(self.rows)
            self.progress(self.name, {"seconds": self.timings[self.name], "rows": self.counts[self.name]})
        return False
