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
# sigma = 1.2533 (sqrt(pi / 2)) * mean absolute deviation, for normal data.
MEAN_AD_TO_SIGMA = 1.2533
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
    df = _checked_frame(df, metrics)
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
    out.update(_engineered(metrics, config, raw, raw, roll_mean, roll_std, delta, cohort_median, prev_mean, prev_std))
    return _feature_frame(df, out, metrics)


def _engineered(metrics, config, raw_all, x, roll_mean, roll_std, delta, cohort_median, prev_mean, prev_std
                ) -> dict[str, np.ndarray]:
    """The engineered columns of rows x (rows x metrics) from their window statistics; the resid floor's
    spread comes from config.resid_scale, else from raw_all (every row of the frame)."""
    known = dict(config.resid_scale)
    spread = np.array([known[m] for m in metrics]) if all(m in known for m in metrics) \
        else robust_center_scale(raw_all)[1]
    out: dict[str, np.ndarray] = {}
    for j, m in enumerate(metrics):
        out[f"{m}_roll_mean"] = roll_mean[:, j]
        out[f"{m}_roll_std"] = roll_std[:, j]
        out[f"{m}_delta"] = delta[:, j]
        out[f"{m}_cohort_norm"] = x[:, j] - cohort_median[:, j]
        denom = np.fmax(prev_std[:, j], config.resid_floor * spread[j])
        out[f"{m}_resid"] = (x[:, j] - prev_mean[:, j]) / denom
    return out


def _feature_frame(base: pd.DataFrame, out: dict[str, np.ndarray], metrics: list[str]) -> FeatureFrame:
    frame = pd.concat([base, pd.DataFrame(out, index=base.index)], axis=1)
    model_features = [f"{m}{s}" for m in metrics for s in MODEL_SUFFIXES]
    resid_features = [f"{m}_resid" for m in metrics]
    feature_metric = {f"{m}{s}": m for m in metrics for s in (*MODEL_SUFFIXES, "_resid")}
    return FeatureFrame(frame, model_features, resid_features, feature_metric)


def resid_scales(df: pd.DataFrame, metrics: list[str]) -> tuple[tuple[str, float], ...]:
    """Each metric's robust spread (1.4826 * MAD, else the standard deviation, else 1) over the rows
    of `df` (rows x metrics), for FeatureConfig.resid_scale."""
    spread = robust_center_scale(df[metrics].to_numpy(dtype="float64"))[1]
    return tuple((m, float(v)) for m, v in zip(metrics, spread))


def _checked_frame(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """df with a fresh 0..n-1 index; KeyError naming missing columns, ValueError if it is not sorted."""
    missing = [c for c in ["device_id", "timestamp", *metrics] if c not in df.columns]
    if missing:
        raise KeyError(f"telemetry frame lacks column(s): {', '.join(missing)}")
    df = df.reset_index(drop=True)
    _check_sorted(df)
    return df


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


def build_features_at(df: pd.DataFrame, rows, metrics: list[str], config: FeatureConfig | None = None
                      ) -> FeatureFrame:
    """build_features(df) for some rows of df only, reading the other rows as context.

    df: as build_features (rows x (device_id, timestamp [tz-aware], cohort columns, one float column
        per metric), sorted by device_id then timestamp). rows: positions in df (ints, any order).
    Returns a FeatureFrame whose frame holds df's `rows`, in that order, indexed 0..len(rows)-1, with
    the columns build_features(df) gives them, to the bit: the rolling mean / std go through the same
    compiled pandas window kernels (Kahan-compensated sums, Welford's variance) over the same samples,
    each device's from its first row in df, so they carry the same rounding. What it saves is
    pandas' per-device Python overhead and the work on rows nobody asked for: a live stream keeps each
    device's recent past as df and engineers only the new samples. Raises KeyError naming a missing
    column, ValueError if the frame is not sorted or a row is out of range.
    """
    config = config or FeatureConfig()
    df = _checked_frame(df, metrics)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    n = len(df)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"rows must be positions in the frame (0..{n - 1})")
    raw = df[metrics].to_numpy(dtype="float64")
    dev = df["device_id"].to_numpy()
    ts = df["timestamp"].to_numpy(dtype="datetime64[ns]").view(np.int64)
    first_of_device = np.r_[True, dev[1:] != dev[:-1]] if n else np.zeros(0, dtype=bool)
    code = np.cumsum(first_of_device) - 1  # device blocks are contiguous: 0, 1, ... in df order
    seg_start = np.flatnonzero(first_of_device)[code[rows]] if len(rows) else rows

    # Rolling stats at the rows and at each one's previous sample of the same device (for m_resid).
    has_prev = rows > seg_start
    mean, std, at = _rolling_mean_std_at(raw, ts, code, seg_start, rows, pd.Timedelta(config.rolling_window).value)
    roll_mean, roll_std = mean[np.searchsorted(at, rows)], std[np.searchsorted(at, rows)]
    before = np.searchsorted(at, np.where(has_prev, rows - 1, rows))
    prev_mean = np.where(has_prev[:, None], mean[before], np.nan)
    prev_std = np.where(has_prev[:, None], std[before], np.nan)

    # Day-over-day delta: the device's latest sample at or before t - lag, at most lag / 4 earlier
    # (merge_asof backward with tolerance, as _lagged_delta).
    lag = pd.Timedelta(config.delta_lag)
    target = ts[rows] - lag.value
    match = _block_search(code, ts, rows, target, side="right") - 1
    ok = (match >= 0) & (code[np.maximum(match, 0)] == code[rows])
    ok &= ts[np.maximum(match, 0)] >= target - (lag / 4).value
    delta = np.where(ok[:, None], raw[rows] - raw[np.maximum(match, 0)], np.nan)

    # Cohort median over every row of df in the same cohort and bucket (the rows' buckets only).
    cohort_cols = [c for c in config.cohort_columns if c in df.columns]
    bucket = df["timestamp"].dt.floor(config.cohort_bucket)
    bucket_ns = bucket.to_numpy(dtype="datetime64[ns]").view(np.int64)
    peers = np.flatnonzero(np.isin(bucket_ns, np.unique(bucket_ns[rows])))
    values = pd.DataFrame(raw[peers], columns=metrics)
    keys = [df[c].iloc[peers].reset_index(drop=True) for c in cohort_cols] + [bucket.iloc[peers].reset_index(drop=True)]
    cohort_median = values.groupby(keys).transform("median").to_numpy()[np.searchsorted(peers, rows)]

    out = _engineered(metrics, config, raw, raw[rows], roll_mean, roll_std, delta, cohort_median, prev_mean, prev_std)
    return _feature_frame(df.iloc[rows].reset_index(drop=True), out, metrics)


def _block_search(code: np.ndarray, ts: np.ndarray, at: np.ndarray, t: np.ndarray, *, side: str) -> np.ndarray:
    """np.searchsorted of times t within the device block of each row `at` (code: the rows' device
    block, contiguous and ascending; ts sorted within a block): positions in the whole array."""
    if not len(at):
        return np.zeros(0, dtype=np.int64)
    # Rank times so that (block, rank) packs into one sorted int64 key.
    times = np.unique(np.r_[ts, t])
    width = len(times) + 1
    key = code * width + np.searchsorted(times, ts)
    return np.searchsorted(key, code[at] * width + np.searchsorted(times, t), side=side)


def window_mean_std(window: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof 1, min_periods 1) of window[start[i]:i + 1] for each row i of window (rows x
    columns, float64); returns two rows x columns arrays.

    Through pandas' own compiled kernels (pandas._libs.window.aggregations.roll_mean / roll_var, what
    DataFrame.rolling calls), so the values carry pandas' rounding to the bit. Every column goes
    through one call per kernel: the columns one after the other, each window shifted into its
    column's stretch. The kernels keep running sums and restart them only where a window shares
    nothing with the one before, so the caller lays out each device's samples from its first one,
    as pandas' grouped rolling sees them. inf counts as missing, as in pandas (_prep_values).
    """
    from pandas._libs.window.aggregations import roll_mean, roll_var

    total, m = window.shape
    column = np.where(np.isinf(window), np.nan, window).T.ravel()
    shift = (np.arange(m, dtype=np.int64) * total)[:, None]
    start_all = (np.asarray(start, dtype=np.int64)[None, :] + shift).ravel()
    end_all = (np.arange(1, total + 1, dtype=np.int64)[None, :] + shift).ravel()
    mean = roll_mean(column, start_all, end_all, 1).reshape(m, total).T
    var = roll_var(column, start_all, end_all, 1, ddof=1).reshape(m, total).T
    with np.errstate(invalid="ignore"):
        std = np.where(var < 0, 0.0, np.sqrt(var))  # pandas' zsqrt
    return mean, std


def _rolling_mean_std_at(raw: np.ndarray, ts: np.ndarray, code: np.ndarray, seg_start: np.ndarray,
                         rows: np.ndarray, window_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time-based rolling mean and std (ddof 1, min_periods 1, window (t - window, t]) at `rows` and
    at the sample before each: returns (mean, std, at), mean and std len(at) x metrics for the sorted
    positions `at`.

    As pandas' groupby(device).rolling(...) computes them: its compiled kernels (roll_mean, roll_var)
    keep running sums along a device's samples from its first one, so their rounding depends on where
    the device starts; each device's span is therefore run from its first row in the frame up to its
    last row asked for. All spans and columns go through one call per kernel: a window that shares
    nothing with the one before restarts the running sums, as at a device's first sample in pandas."""
    m = raw.shape[1]
    if not len(rows):
        return np.zeros((0, m)), np.zeros((0, m)), rows
    upto = pd.Series(rows).groupby(seg_start).max()  # per device span: first row -> last row asked
    first, last = upto.index.to_numpy(dtype=np.int64), upto.to_numpy(dtype=np.int64)
    lengths = last - first + 1
    offset = np.cumsum(lengths) - lengths  # where each span starts in the compacted array
    idx = np.repeat(first - offset, lengths) + np.arange(lengths.sum())  # compacted -> frame row
    total = len(idx)
    start = _block_search(code[idx], ts[idx], np.arange(total), ts[idx] - window_ns, side="right")
    mean, std = window_mean_std(raw[idx], start)
    at = np.unique(np.r_[rows, np.where(rows > seg_start, rows - 1, rows)])
    pos = np.searchsorted(idx, at)
    return mean[pos], std[pos], at
