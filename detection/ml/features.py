"""Feature engineering: one function, used for training and for serving alike.

For each metric m the frame gains:
- ``m_roll_mean`` / ``m_roll_std``: time-based rolling mean/std over the device's own trailing
  window (default 12 h, the current sample included), pandas ``groupby().rolling(window, on=...)``.
- ``m_delta``: day-over-day delta, m(t) - m(t - lag) with lag 1 day by default, matched per device
  with ``pandas.merge_asof`` (backward, tolerance a quarter of the lag), NaN where there is no sample.
- ``m_cohort_norm``: m minus the median of the device's cohort in the same time bucket (1 h by
  default), so that fleet-wide or cohort-wide movements are not blamed on one device.
- ``m_resid``: the device against its own recent past, (m(t) - mean_prev) / std_prev, where
  mean_prev and std_prev are the rolling statistics of the window ending at the previous sample.
  The denominator is floored at ``resid_floor`` times the metric's robust spread on the training
  rows (FeatureConfig.resid_scale) so that a flat-lined sensor does not divide by zero. It feeds the temporal part of HybridAnomalyDetector.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

MAD_TO_SIGMA = 1.4826  # consistency constant for normally distributed data (Rousseeuw & Croux, 1993)
MODEL_SUFFIXES = ("", "_roll_mean", "_roll_std", "_delta", "_cohort_norm")
# What each engineered feature of a metric measures, in words a reviewer reads on the page.
FEATURE_KINDS = {"": "value", "_roll_mean": "rolling mean", "_roll_std": "rolling std",
                 "_delta": "day-over-day change", "_cohort_norm": "vs cohort, same hour",
                 "_resid": "vs previous window"}


def feature_kind(feature: str, metric: str) -> str:
    """The FEATURE_KINDS label of `feature`, one of `metric`'s engineered columns."""
    return FEATURE_KINDS.get(feature[len(metric):] if feature.startswith(metric) else "", "value")


@dataclass(frozen=True)
class FeatureConfig:
    """Windows are pandas offset strings (``"12h"``, ``"1D"``, ``"30s"``)."""

    rolling_window: str = "12h"
    delta_lag: str = "1D"
    cohort_bucket: str = "1h"
    cohort_columns: tuple[str, ...] = ("manufacturer", "model", "os_version")
    resid_floor: float = 0.1
    # ((metric, spread), ...): each metric's robust spread on the training rows, which scales the
    # floor of m_resid. The pipeline fills it in (resid_scales) and saves it with the model, so
    # serving computes exactly the features training saw, and nothing looks past the training rows.
    resid_scale: tuple[tuple[str, float], ...] = ()


@dataclass
class FeatureFrame:
    """The engineered frame and what each feature column means.

    frame: rows x (input columns + engineered columns), same row order as the input.
    model_features: columns the detectors may train on (raw metric and its rolling/delta/cohort
        variants), in a stable order.
    resid_features: the per-metric temporal residual columns (``m_resid``).
    feature_metric: {feature column: source metric}.
    """

    frame: pd.DataFrame
    model_features: list[str]
    resid_features: list[str]
    feature_metric: dict[str, str]


def build_features(df: pd.DataFrame, metrics: list[str], config: FeatureConfig | None = None) -> FeatureFrame:
    """Engineer features from a telemetry frame.

    df: rows x (device_id, timestamp [datetime64, tz-aware], cohort columns, one float column per
        metric), sorted by device_id then timestamp (as detection.ingest.loader returns it).
    Raises KeyError naming a missing column, ValueError if the frame is not sorted.
    """
    config = config or FeatureConfig()
    missing = [c for c in ["device_id", "timestamp", *metrics] if c not in df.columns]
    if missing:
        raise KeyError(f"telemetry frame lacks column(s): {', '.join(missing)}")
    df = df.reset_index(drop=True)
    _check_sorted(df)
    values = df[metrics].astype("float64")
    out: dict[str, np.ndarray] = {}

    rolling = df[["device_id", "timestamp"]].join(values).groupby("device_id", sort=False).rolling(
        config.rolling_window, on="timestamp", min_periods=1
    )
    # Select the metrics again by name: pandas' grouped rolling returns its columns sorted by name, not
    # in the order asked, and the arrays below are read by position.
    roll_mean = rolling[metrics].mean()[metrics].to_numpy()
    roll_std = rolling[metrics].std()[metrics].to_numpy()

    first_of_device = np.r_[True, df["device_id"].to_numpy()[1:] != df["device_id"].to_numpy()[:-1]]
    prev_mean = np.vstack([np.full((1, len(metrics)), np.nan), roll_mean[:-1]])
    prev_std = np.vstack([np.full((1, len(metrics)), np.nan), roll_std[:-1]])
    prev_mean[first_of_device] = np.nan
    prev_std[first_of_device] = np.nan

    delta = _lagged_delta(df, values, metrics, pd.Timedelta(config.delta_lag))
    cohort_cols = [c for c in config.cohort_columns if c in df.columns]
    bucket = df["timestamp"].dt.floor(config.cohort_bucket)
    cohort_median = values.groupby([*(df[c] for c in cohort_cols), bucket]).transform("median").to_numpy()

    raw = values.to_numpy()
    known = dict(config.resid_scale)
    spread = np.array([known[m] for m in metrics]) if all(m in known for m in metrics) \
        else robust_center_scale(raw)[1]
    for j, m in enumerate(metrics):
        out[f"{m}_roll_mean"] = roll_mean[:, j]
        out[f"{m}_roll_std"] = roll_std[:, j]
        out[f"{m}_delta"] = delta[:, j]
        out[f"{m}_cohort_norm"] = raw[:, j] - cohort_median[:, j]
        denom = np.fmax(prev_std[:, j], config.resid_floor * spread[j])
        out[f"{m}_resid"] = (raw[:, j] - prev_mean[:, j]) / denom

    frame = pd.concat([df, pd.DataFrame(out, index=df.index)], axis=1)
    model_features = [f"{m}{s}" for m in metrics for s in MODEL_SUFFIXES]
    resid_features = [f"{m}_resid" for m in metrics]
    feature_metric = {f"{m}{s}": m for m in metrics for s in (*MODEL_SUFFIXES, "_resid")}
    return FeatureFrame(frame, model_features, resid_features, feature_metric)


def resid_scales(df: pd.DataFrame, metrics: list[str]) -> tuple[tuple[str, float], ...]:
    """Each metric's robust spread (1.4826 * MAD, else the standard deviation, else 1) over the rows
    of `df` (rows x metrics), for FeatureConfig.resid_scale."""
    spread = robust_center_scale(df[metrics].to_numpy(dtype="float64"))[1]
    return tuple((m, float(v)) for m, v in zip(metrics, spread))


def _check_sorted(df: pd.DataFrame) -> None:
    dev = df["device_id"].to_numpy()
    ts = df["timestamp"].to_numpy(dtype="datetime64[ns]")
    same = dev[1:] == dev[:-1]
    if np.any(dev[1:] < dev[:-1]) or np.any(same & (ts[1:] <= ts[:-1])):
        raise ValueError("telemetry frame must be sorted by device_id then timestamp, without duplicates")


def _lagged_delta(df: pd.DataFrame, values: pd.DataFrame, metrics: list[str], lag: pd.Timedelta) -> np.ndarray:
    left = pd.DataFrame({"device_id": df["device_id"].to_numpy(), "t": df["timestamp"] - lag,
                         "_row": np.arange(len(df))})
    right = pd.DataFrame({"device_id": df["device_id"].to_numpy(), "t": df["timestamp"]}).join(values)
    merged = pd.merge_asof(
        left.sort_values("t", kind="stable"), right.sort_values("t", kind="stable"),
        on="t", by="device_id", direction="backward", tolerance=lag / 4,
    ).sort_values("_row")
    return values.to_numpy() - merged[metrics].to_numpy()


def robust_center_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column median and MAD-scaled spread (1.4826 * MAD) of x (rows x columns), NaNs ignored.

    The spread falls back to the standard deviation where the MAD is 0, then to 1.0 (a constant or
    all-NaN column), so it can always divide."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: handled below
        med = np.nanmedian(x, axis=0)
        spread = MAD_TO_SIGMA * np.nanmedian(np.abs(x - med), axis=0)
        std = np.nanstd(x, axis=0)
    spread = np.where(spread > 0, spread, std)
    return med, np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
