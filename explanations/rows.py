"""Rebuild the detector's input rows for scored samples, through the code the pipeline ran. Django-free.

An anomaly is stored with its score and top metrics, not with the matrix the detector saw. To attribute
the score we rebuild that matrix: the telemetry goes through detection.ml.features.build_features (with
the run's FeatureConfig, from the model artifact) and baselines.engine.apply_baselines (with the run's
baseline set), exactly as detection.ml.pipeline.run_core does.

What the caller must load so that the rebuilt rows equal the scored ones:
- each device's own samples from ``history_margin(config)`` before its first explained sample (the
  rolling window, the day-over-day lag and the previous window of the residual all look back), and
- the samples of the device's cohort peers in the same cohort bucket (``m_cohort_norm`` subtracts the
  cohort's median of that hour).
Loading whole cohorts does both. The residual (``m_resid``) floors its denominator with the metric's
spread over the whole frame, so a partial load changes it slightly; it only feeds the hybrid detector's
temporal part when the fleet uses ``hybrid_temporal = "residual"`` (SKAB). Callers compare the
rebuilt score with the stored one and report the difference.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd


class RowsError(ValueError):
    """The detector's input cannot be rebuilt (a column the model needs is missing); the message names it."""


@dataclass
class ModelRows:
    """Rebuilt rows, one per requested key, in the keys' order.

    frame: rows x (device_id, timestamp, the detector's input columns: ``features_`` and, for the hybrid
        detector, ``temporal_features_``).
    engineered: the same rows with every engineered feature (``m``, ``m_roll_mean``...): the values the
        top metrics quote.
    feature_metric: {engineered feature or model column: source metric}.
    found: bool per key, False where the telemetry had no sample at that key (those rows are NaN).
    background: up to ``background_rows`` other rebuilt rows (same columns as frame), for explainers that
        need a reference sample; empty unless asked for.
    """

    frame: pd.DataFrame
    engineered: pd.DataFrame
    feature_metric: dict[str, str]
    found: np.ndarray
    background: pd.DataFrame


def history_margin(config) -> pd.Timedelta:
    """How far before a sample its features look back: the rolling window (twice: the residual uses the
    previous sample's window) plus the day-over-day lag and its quarter-lag tolerance. config: a
    detection.ml.pipeline.PipelineConfig."""
    window = pd.Timedelta(config.features.rolling_window)
    lag = pd.Timedelta(config.features.delta_lag)
    return 2 * window + lag * 1.25 + pd.Timedelta(config.features.cohort_bucket)


def with_members(detector) -> list:
    """The detector and, for an ensemble, its fitted members (members_), in that order."""
    return [detector, *(getattr(detector, "members_", None) or {}).values()]


def detector_columns(detector) -> list[str]:
    """The columns a fitted detector reads: ``features_`` then ``temporal_features_`` (hybrid only), of
    the detector and, for an ensemble, of each fitted member (a hybrid member reads its temporal
    features, which the ensemble's own ``features_`` do not list)."""
    return list(dict.fromkeys(c for d in with_members(detector)
                              for c in [*d.features_, *getattr(d, "temporal_features_", [])]))


_Z_COLUMN = re.compile(r"^(?P<feature>.+)_z_(?P<level>[a-z]+)$")


def split_model_column(column: str, levels) -> tuple[str, str | None]:
    """``battery_level_roll_mean_z_cohort`` -> (``battery_level_roll_mean``, ``cohort``); a column
    without a known ``_z_{level}`` suffix is an engineered feature itself -> (column, None)."""
    match = _Z_COLUMN.match(column)
    if match and match["level"] in levels:
        return match["feature"], match["level"]
    return column, None


def model_rows(telemetry: pd.DataFrame, keys: pd.DataFrame, *, metrics: list[str], config, baselines, detector,
               background_rows: int = 0, seed: int = 0) -> ModelRows:
    """Rebuild the detector's input rows at `keys`.

    telemetry: rows x (device_id, timestamp, device attribute columns, one float column per metric), sorted
        by device_id then timestamp: detection.ingest.loader.load_telemetry_frame's shape, covering what
        the module docstring lists.
    keys: rows x (device_id, timestamp [datetime64, UTC]).
    config: the run's detection.ml.pipeline.PipelineConfig; baselines: its baselines.engine.BaselineSet, or
        None when the run fell back to raw features; detector: the fitted detector from the model artifact.
    Raises RowsError when a column the detector reads can be neither found nor rebuilt.
    """
    from detection.ml.features import build_features

    ff = build_features(telemetry, metrics, config.features)
    frame = ff.frame
    feature_metric = dict(ff.feature_metric)
    columns = detector_columns(detector)
    levels = tuple(baselines.levels) if baselines is not None else ()
    raw, by_level = [], {}
    for column in columns:
        feature, level = split_model_column(column, levels)
        if level is not None and feature in baselines.features and feature in frame.columns:
            by_level.setdefault(level, []).append(feature)
            feature_metric[column] = feature_metric.get(feature, feature)
        elif column in frame.columns:
            raw.append(column)
        else:
            raise RowsError(f"the model reads column {column!r}, which the features and baselines of this run "
                            f"cannot rebuild")

    position = _positions(frame, keys)
    found = position >= 0
    picked = frame.iloc[np.where(found, position, 0)].reset_index(drop=True)
    out = _detector_frame(picked, raw, by_level, baselines, columns)
    out.loc[~found, columns] = np.nan
    out.insert(0, "timestamp", keys["timestamp"].to_numpy())
    out.insert(0, "device_id", keys["device_id"].to_numpy())
    engineered_cols = [c for c in frame.columns if c in feature_metric and c not in ("device_id", "timestamp")]
    engineered = picked[engineered_cols].copy()
    engineered.loc[~found] = np.nan

    background = pd.DataFrame(columns=columns)
    if background_rows:
        others = np.setdiff1d(np.arange(len(frame)), position[found])
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(others, min(background_rows, len(others)), replace=False)) if len(others) else others
        background = _detector_frame(frame.iloc[take].reset_index(drop=True), raw, by_level, baselines, columns)
    return ModelRows(out, engineered, feature_metric, found, background)


def _detector_frame(rows: pd.DataFrame, raw: list[str], by_level: dict[str, list[str]], baselines,
                    columns: list[str]) -> pd.DataFrame:
    from baselines.engine import apply_baselines

    parts = [rows[raw].reset_index(drop=True)] if raw else []
    for level, features in by_level.items():
        parts.append(apply_baselines(rows, baselines, (level,), features=features, join=False).reset_index(drop=True))
    out = pd.concat(parts, axis=1) if parts else pd.DataFrame(index=rows.index)
    return out.loc[:, ~out.columns.duplicated()][columns]


def _positions(frame: pd.DataFrame, keys: pd.DataFrame) -> np.ndarray:
    """Row position in `frame` of each (device_id, timestamp) in keys; -1 where absent."""
    index = pd.MultiIndex.from_arrays([frame["device_id"].to_numpy(), _utc(frame["timestamp"])])
    wanted = pd.MultiIndex.from_arrays([keys["device_id"].to_numpy(), _utc(keys["timestamp"])])
    return index.get_indexer(wanted)


def _utc(values) -> pd.DatetimeIndex:
    ts = pd.DatetimeIndex(pd.to_datetime(values))
    ts = ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")
    return ts.as_unit("ns")
