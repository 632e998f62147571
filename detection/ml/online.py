"""Online scoring of a handful of new samples in numpy: the features, model inputs, detector score and
explanation that the pandas pipeline gives the same rows, without building a frame.

Serving (detection.serving.detect_observations) scores one to a few hundred observations per call
against a short stored history: the device's own past (rolling window + day-over-day lag) and its
cohort peers' samples in the same cohort bucket. The pandas path (build_features -> model_inputs ->
score_frame) costs ~40 ms a call, almost all of it fixed pandas overhead; here the same quantities are
computed for the observations' rows only, from arrays:

- features (detection.ml.features.build_features): ``m_roll_mean`` / ``m_roll_std`` over the time-based
  trailing window (t - window, t], NaNs skipped, min_periods=1, standard deviation with ddof=1 (NaN for
  fewer than 2 values, 0 when every value of the window is the same, as pandas' rolling kernels);
  ``m_delta`` against the device's last sample at or before t - lag, no further back than lag / 4
  (pandas.merge_asof backward with tolerance); ``m_cohort_norm`` against the median of the cohort's
  samples in the same bucket (groupby median); ``m_resid`` against the rolling mean and std at the
  device's previous sample, the std floored at resid_floor x the metric's training spread.
- model inputs (detection.ml.pipeline.model_inputs with baselines.engine.apply_baselines): robust
  z-scores (x - median) / (1.4826 MAD) at the model's z level, with the baselines' fall-back to the
  parent level for a group they have not seen (baselines.engine.lookup), and the temporal columns.
- the score of AnomalyDetector / HybridAnomalyDetector (imputation, scaling, column repetition, the
  stacked Isolation Forest, the temporal score and the fusion, with the detector's own fitted values),
  then labels, severity and top metrics as detection.ml.scoring.score_frame gives them.

Every quantity is computed with the same arithmetic as the pandas path, in the same order, so the
answers are the same to the bit (tests/test_serving_fast.py holds them to 1e-9 relative); the rolling
mean and std go through pandas' own compiled window kernels for that (see _rolling_mean_std), the one
piece of pandas used per call. About 1 ms a call instead of ~40 ms. Django-free.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from baselines.engine import MAD_TO_SIGMA, PARENT

from .features import FeatureConfig, feature_kind, window_mean_std
from .scoring import COHORT_COLUMNS, ScoreResult, device_candidates, ranked_entries, severity_from_score

# engineer()'s blocks: the value, then build_features' columns of each metric, by suffix.
BLOCKS = ("", "_roll_mean", "_roll_std", "_delta", "_cohort_norm", "_resid")


class Unsupported(Exception):
    """The model (or this call) needs something the online path does not compute; serving falls back
    to the pandas path, which gives the reference answer (or the reference error)."""


# --- the stored history plus the observations ---------------------------------------------------

@dataclass
class History:
    """Samples sorted by device then timestamp, without repeated (device, timestamp).

    device: n int64 (device ids). stamps: n int64, ns since the epoch (UTC). values: n x metrics
    float64 (NaN for a missing value). cohort: n int64, a code per cohort (same code, same cohort).
    """

    device: np.ndarray
    stamps: np.ndarray
    values: np.ndarray
    cohort: np.ndarray


def merge_observations(stored: History, new: History) -> tuple[History, np.ndarray]:
    """The stored samples with the new ones in place: a new sample replaces a stored one at the same
    (device, timestamp). Returns (merged history, the new samples' positions in it, in `new` order).

    The same rows in the same order as the pandas path (concatenation, stable sort by device then
    timestamp, last of each (device, timestamp)). `new` must not repeat a (device, timestamp)."""
    device = np.concatenate([stored.device, new.device])
    stamps = np.concatenate([stored.stamps, new.stamps])
    order = np.lexsort((stamps, device))
    device, stamps = device[order], stamps[order]
    last = np.empty(len(order), dtype=bool)
    np.not_equal(device[1:], device[:-1], out=last[:-1])
    last[:-1] |= stamps[1:] != stamps[:-1]
    last[-1:] = True
    kept = order[last]
    values = np.concatenate([stored.values, new.values])[kept]
    cohort = np.concatenate([stored.cohort, new.cohort])[kept]
    where = np.full(len(order), -1, dtype=np.int64)  # merged position of each concatenated row
    where[kept] = np.arange(len(kept))
    return History(device[last], stamps[last], values, cohort), where[len(stored.device):]


# --- features -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureSpec:
    """FeatureConfig in nanoseconds. resid_floor: n_metrics floors of m_resid's denominator
    (resid_floor x the metric's training spread), None when the config lacks a metric's spread."""

    window_ns: int
    lag_ns: int
    tolerance_ns: int
    bucket_ns: int
    resid_floor: np.ndarray | None

    @classmethod
    def of(cls, config: FeatureConfig, metrics: list[str]) -> FeatureSpec:
        """Raises Unsupported for windows that are not fixed durations."""
        try:
            window, lag, bucket = (pd.Timedelta(config.rolling_window), pd.Timedelta(config.delta_lag),
                                   pd.Timedelta(config.cohort_bucket))
            pd.tseries.frequencies.to_offset(config.rolling_window).nanos  # noqa: B018 (a fixed offset?)
            pd.tseries.frequencies.to_offset(config.cohort_bucket).nanos  # noqa: B018
        except (ValueError, TypeError) as exc:
            raise Unsupported(f"windows: {exc}") from None
        if window.value <= 0 or bucket.value <= 0:
            raise Unsupported("non-positive window")
        known = dict(config.resid_scale)
        floor = (config.resid_floor * np.array([known[m] for m in metrics], dtype=np.float64)
                 if all(m in known for m in metrics) else None)
        return cls(int(window.value), int(lag.value), int((lag / 4).value), int(bucket.value), floor)


def engineer(spec: FeatureSpec, history: History, rows: np.ndarray, *, resid: bool = True) -> np.ndarray:
    """build_features' columns for some rows of a history.

    rows: k positions in `history`. Returns blocks x k x metrics float64, blocks as BLOCKS (value,
    roll_mean, roll_std, delta, cohort_norm, resid). Each row's features read only its device's
    samples and its cohort's samples in its bucket, so the history must hold, for each row, its device
    back to window + lag + lag/4 and every sample of its cohort in its bucket. resid=False leaves
    m_resid NaN (it needs the metrics' training spread; raises Unsupported when that is missing).
    """
    rows = np.asarray(rows, dtype=np.int64)
    k, m = len(rows), history.values.shape[1]
    out = np.full((len(BLOCKS), k, m), np.nan)
    if k == 0:
        return out
    device, stamps, values = history.device, history.stamps, history.values
    seg_start = np.searchsorted(device, device[rows], side="left")
    has_prev = rows > seg_start
    mean, std, prev_mean, prev_std = _rolling_mean_std(stamps, values, seg_start, rows, spec.window_ns)
    out[0] = values[rows]
    out[1], out[2] = mean, std
    # Day-over-day delta: the device's last sample at or before t - lag, within the tolerance.
    target = stamps[rows] - spec.lag_ns
    for s in np.unique(seg_start).tolist():  # per device: its rows' matches in one search
        mine = np.flatnonzero(seg_start == s)
        e = int(rows[mine].max()) + 1
        j = s + np.searchsorted(stamps[s:e], target[mine], side="right") - 1
        found = (j >= s) & (target[mine] - stamps[np.maximum(j, s)] <= spec.tolerance_ns)
        out[3, mine[found]] = values[rows[mine[found]]] - values[j[found]]
    # Cohort median in the bucket.
    bucket = stamps // spec.bucket_ns
    groups: dict[tuple[int, int], np.ndarray] = {}
    for i, r in enumerate(rows.tolist()):
        key = (int(history.cohort[r]), int(bucket[r]))
        median = groups.get(key)
        if median is None:
            members = values[(history.cohort == key[0]) & (bucket == key[1])]
            median = groups[key] = _nan_median(members)
        out[4, i] = values[r] - median
    if resid:
        if spec.resid_floor is None:
            raise Unsupported("m_resid needs FeatureConfig.resid_scale for every metric")
        prev_mean = np.where(has_prev[:, None], prev_mean, np.nan)
        prev_std = np.where(has_prev[:, None], prev_std, np.nan)
        out[5] = (out[0] - prev_mean) / np.fmax(prev_std, spec.resid_floor)
    return out


def _rolling_mean_std(stamps: np.ndarray, values: np.ndarray, seg_start: np.ndarray, rows: np.ndarray,
                      window_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rolling mean and std (ddof=1) over (t - window, t], min_periods=1: (mean, std) at `rows` and
    (mean, std) at the row before each (the row itself where it is its device's first); k x metrics.

    pandas' rolling kernels keep running sums (Kahan-compensated for the mean, Welford's for the
    variance) along a device's samples, restarting only when a window shares nothing with the one
    before; on a near-constant window the running variance keeps an error that a direct sum over the
    window does not (measured: up to 70 % of a 1e-6 std of network traffic at night). So the windows
    go through the same compiled kernels (features.window_mean_std: pandas' roll_mean / roll_var, what
    DataFrame.rolling calls, on arrays), over the same samples from the device's first one: the values
    are build_features' to the bit, at a few microseconds a column.
    """
    if len(rows) == 1:  # the common /detect call: one device, one span
        spans = [(int(seg_start[0]), int(rows[0]))]
    else:
        upto: dict[int, int] = {}
        for s, r in zip(seg_start.tolist(), rows.tolist()):
            upto[s] = max(upto.get(s, r), r)
        spans = sorted(upto.items())
    starts, offsets, total = [], {}, 0
    for s, r in spans:
        span = stamps[s:r + 1]
        starts.append(np.searchsorted(span, span - window_ns, side="right") + total)
        offsets[s] = total - s  # compact position = history row + offset
        total += r + 1 - s
    start = np.concatenate(starts).astype(np.int64, copy=False) if len(starts) > 1 else starts[0].astype(np.int64)
    window = values[spans[0][0]:spans[0][1] + 1] if len(spans) == 1 else \
        np.concatenate([values[s:r + 1] for s, r in spans])
    mean, std = window_mean_std(window, start)  # each span restarts the kernels' sums, as in pandas
    at = rows + np.array([offsets[s] for s in seg_start.tolist()], dtype=np.int64)
    before = np.where(rows > seg_start, at - 1, at)
    return mean[at], std[at], mean[before], std[before]


def _nan_median(x: np.ndarray) -> np.ndarray:
    """Per-column median of x (rows x columns), NaNs skipped, NaN for a column without values."""
    if not np.isnan(x).any():
        return np.median(x, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=0)


# --- baselines ------------------------------------------------------------------------------------

class BaselineTables:
    """A BaselineSet's per-level statistics as arrays, with a dict from group key to row.

    For level L: median and mad (groups x features) and level_used (the level each value came from,
    after the fall-back made when the set was computed). lookup() gives a row's statistics as
    baselines.engine.lookup does: its group's, else (a group the set has not seen) the parent level's.
    """

    def __init__(self, baselines):
        self.features = list(baselines.features)
        self.levels = tuple(baselines.levels)
        self.group_columns = {lv: list(baselines.group_columns[lv]) for lv in self.levels}
        self._tables = {}
        for level in self.levels:
            median = baselines.table(level, "median")[self.features]
            mad = baselines.table(level, "mad")[self.features]
            used = baselines.table(level, "fallback_level")[self.features].replace("", level)
            columns = self.group_columns[level]
            keys = [k if isinstance(k, tuple) else (k,) for k in median.index] if columns else [()]
            if len(set(keys)) != len(keys):
                raise Unsupported(f"repeated group keys at level {level}")
            self._tables[level] = ({key: i for i, key in enumerate(keys)}, median.to_numpy(dtype=np.float64),
                                   mad.to_numpy(dtype=np.float64), used.to_numpy(dtype=object))

    def lookup(self, attributes: dict, level: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(median, mad, level_used), each n_features, for a device's attributes ({column: value})
        at `level`. Raises Unsupported for a level (or a needed parent) not in the set."""
        if level not in self._tables:
            raise Unsupported(f"level {level!r} is not in the baseline set")
        index, median, mad, used = self._tables[level]
        columns = self.group_columns[level]
        i = index.get(tuple(attributes[c] for c in columns)) if columns else 0
        if i is None:
            parent = PARENT[level]
            if parent is None:
                raise Unsupported(f"no statistics for a group at level {level!r}")
            return self.lookup(attributes, parent)
        return median[i], mad[i], used[i]


# --- the model ------------------------------------------------------------------------------------

class OnlineModel:
    """Everything of one model version that online scoring needs, precomputed when it is loaded.

    detector: a fitted detection.ml.detectors.AnomalyDetector or HybridAnomalyDetector (exact types)
    whose forest_ has score_samples on a float32 matrix (serving.StackedForest). config: the
    PipelineConfig saved with the model. baselines: its BaselineSet (CachedBaselineSet). metrics: the
    fleet's metric names in schema order. Raises Unsupported for anything else (another detector, no
    baselines, a temporal input or feature name it does not know, cohort columns that are not device
    attributes); the caller then keeps the pandas path.
    """

    DEVICE_ATTRIBUTES = ("manufacturer", "model", "os_version", "store", "customer")

    def __init__(self, *, detector, config, baselines, metrics: list[str], forest_type: type):
        from .detectors import AnomalyDetector, HybridAnomalyDetector

        try:  # the rolling kernels (_rolling_mean_std) are pandas internals: check they are there
            from pandas._libs.window.aggregations import roll_mean, roll_var  # noqa: F401
        except ImportError as exc:
            raise Unsupported(f"pandas' rolling kernels: {exc}") from None
        if baselines is None:
            raise Unsupported("no baselines (the raw-feature fall-back)")
        if type(detector) not in (AnomalyDetector, HybridAnomalyDetector):
            raise Unsupported(f"detector {type(detector).__name__}")
        if not isinstance(getattr(detector, "forest_", None), forest_type):
            raise Unsupported("the forest is not stacked")
        if not set(config.features.cohort_columns) <= set(self.DEVICE_ATTRIBUTES):
            raise Unsupported("cohort columns that are not device attributes")
        if set(metrics) & set(COHORT_COLUMNS) or len(set(metrics)) != len(metrics):
            raise Unsupported("metric names that are also cohort columns")
        self.metrics = list(metrics)
        self.hybrid = type(detector) is HybridAnomalyDetector
        self.detector = detector
        self.spec = FeatureSpec.of(config.features, self.metrics)
        self.cohort_columns = list(config.features.cohort_columns)
        self.z_level, self.top_k, self.severity_bands = config.z_level, config.top_k, tuple(config.severity_bands)
        self.tables = BaselineTables(baselines)
        for level in (self.z_level, "device"):  # the levels looked up, and their fall-back chains
            lv = level
            while lv is not None:
                if lv not in self.tables.levels:
                    raise Unsupported(f"level {lv} missing from the baselines")
                if not set(self.tables.group_columns[lv]) <= {"external_id", *self.DEVICE_ATTRIBUTES}:
                    raise Unsupported(f"level {lv} groups by columns that are not device attributes")
                lv = PARENT[lv]
        # Each engineered feature as (block, metric).
        names = {f"{m}{s}": (b, j) for j, m in enumerate(self.metrics) for b, s in enumerate(BLOCKS)}
        if len(names) != len(self.metrics) * len(BLOCKS):
            raise Unsupported("feature names collide")
        self.features = list(self.tables.features)
        unknown = [f for f in self.features if f not in names]
        if unknown:
            raise Unsupported(f"features {unknown}")
        self.feature_block = np.array([names[f][0] for f in self.features], dtype=np.int64)
        self.feature_metric = np.array([names[f][1] for f in self.features], dtype=np.int64)
        self.metric_of = [self.metrics[j] for j in self.feature_metric]
        # Top-metric candidates (scoring.top_metrics): the features at the z level, then those whose
        # device-level z is a temporal column of the detector, at the device level.
        self.device_columns = np.array(device_candidates(detector, self.features, self.z_level), dtype=np.int64)
        self.top_features = self.features + [self.features[i] for i in self.device_columns]
        top_metric_of = self.metric_of + [self.metric_of[i] for i in self.device_columns]
        self.kinds = [feature_kind(f, m) for f, m in zip(self.top_features, top_metric_of)]
        self.top_metric_names = list(dict.fromkeys(self.metric_of))
        self.metric_columns = [np.flatnonzero(np.array(top_metric_of) == m) for m in self.top_metric_names]
        # Model inputs by name: z at z_level of each feature, then the temporal columns.
        inputs = {f"{f}_z_{self.z_level}": ("z", i) for i, f in enumerate(self.features)}
        self.temporal = config.temporal
        if config.temporal == "baseline":
            recent = [i for i, f in enumerate(self.features) if f.endswith("_roll_mean")
                      and f[:-len("_roll_mean")] in self.metrics]
            for i in recent:
                inputs.setdefault(f"{self.features[i]}_z_device", ("device_z", i))
            self.needs_resid = False
        elif config.temporal == "residual":
            for j, m in enumerate(self.metrics):
                inputs.setdefault(f"{m}_resid", ("resid", j))
            self.needs_resid = True
            if self.spec.resid_floor is None:
                raise Unsupported("m_resid needs resid_scale")
        else:
            raise Unsupported(f"temporal {config.temporal!r}")
        wanted = list(detector.features_) + (list(detector.temporal_features_) if self.hybrid else [])
        missing = [c for c in wanted if c not in inputs]
        if missing:
            raise Unsupported(f"model inputs {missing}")
        # Positions in the row's input vector: z (features), device z (features), resid (metrics).
        n_features = len(self.features)
        base = {"z": 0, "device_z": n_features, "resid": 2 * n_features}
        self.forest_index = np.array([base[s] + i for s, i in (inputs[c] for c in detector.features_)], dtype=np.int64)
        self.temporal_index = np.array([base[s] + i for s, i in (inputs[c] for c in detector.temporal_features_)],
                                       dtype=np.int64) if self.hybrid else np.zeros(0, dtype=np.int64)
        self.medians = np.asarray(detector.medians_, dtype=np.float64)
        scaler = detector.scaler_
        self.center = np.asarray(scaler.mean_, dtype=np.float64) if scaler is not None and scaler.with_mean else None
        self.scale = np.asarray(scaler.scale_, dtype=np.float64) if scaler is not None and scaler.with_std \
            and scaler.scale_ is not None else None
        self.repeat = np.repeat(np.arange(len(detector.features_)), detector.repeats_)
        self.threshold = float(detector.threshold_)
        self.impact_weights = dict(getattr(getattr(detector, "config", None), "impact_weights", ()) or ())

    def score(self, history: History, rows: np.ndarray, attributes: list[dict], metric_domain: dict[str, str]
              ) -> ScoreResult:
        """Scores of some rows of `history` (see engineer for what it must hold).

        rows: k positions; attributes: k dicts of the rows' device attributes (external_id and the
        DEVICE_ATTRIBUTES columns). Returns the ScoreResult that score_frame gives the same rows.
        Raises Unsupported when a lookup needs a level the baselines lack.
        """
        blocks = engineer(self.spec, history, rows, resid=self.needs_resid)
        k = len(rows)
        x = blocks[self.feature_block, :, self.feature_metric].T  # rows x features
        shape = (k, len(self.features))
        median, mad, device_median, device_mad = (np.empty(shape) for _ in range(4))
        used, device_used = np.empty(shape, dtype=object), np.empty(shape, dtype=object)
        seen: dict[str, tuple] = {}  # lookups per device
        for i, attrs in enumerate(attributes):
            key = attrs["external_id"]
            got = seen.get(key)
            if got is None:
                got = seen[key] = (*self.tables.lookup(attrs, self.z_level), *self.tables.lookup(attrs, "device"))
            median[i], mad[i], used[i], device_median[i], device_mad[i], device_used[i] = got
        with np.errstate(all="ignore"):
            z = (x - median) / (MAD_TO_SIGMA * mad)
            device_z = (x - device_median) / (MAD_TO_SIGMA * device_mad)
        inputs = np.concatenate([z, device_z, blocks[5]], axis=1)
        raw = inputs[:, self.forest_index]
        raw = np.where(np.isfinite(raw), raw, self.medians)
        if self.center is not None:
            raw = raw - self.center
        if self.scale is not None:
            raw = raw / self.scale
        forest = -self.detector.forest_.score_samples(raw.astype(np.float32)[:, self.repeat])
        if self.hybrid:
            # HybridAnomalyDetector._temporal: |x|, NaN -> 0, clipped at TEMPORAL_CLIP (inf included), row max
            r = np.abs(inputs[:, self.temporal_index])
            temporal = np.where(np.isnan(r), 0.0, np.minimum(r, self.detector.TEMPORAL_CLIP)).max(axis=1)
            scores = self.detector._fuse(forest, temporal)
        else:
            scores = forest
        labels = np.where(scores > self.threshold, -1, 1)
        severity = np.full(k, "", dtype=object)
        top: list[list[dict]] = [[] for _ in range(k)]
        idx = np.flatnonzero(labels == -1)
        if len(idx):
            dev = self.device_columns
            if len(dev):  # the device-level candidates, as extra columns (scoring.top_metrics)
                cand = (np.hstack([a[idx], d[idx][:, dev]]) for a, d in
                        ((x, x), (median, device_median), (mad, device_mad), (used, device_used)))
            else:
                cand = (x[idx], median[idx], mad[idx], used[idx])
            explained = self._top_metrics(*cand, metric_domain)
            max_z = np.array([abs(t[0]["z"]) if t and t[0]["z"] is not None else 0.0 for t in explained])
            impact = np.array([self._impact(t, attributes[i]) for t, i in zip(explained, idx)]) \
                if self.impact_weights else 1.0
            severity[idx] = severity_from_score(max_z, self.severity_bands, impact)
            for i, t in zip(idx, explained):
                top[i] = t
        return ScoreResult(scores, labels, self.threshold, severity, top)

    def _top_metrics(self, x, median, mad, used, metric_domain) -> list[list[dict]]:
        """scoring.top_metrics on arrays: rows x candidates (top_features: the features with the z level's
        statistics, then the device_columns with the device level's)."""
        with np.errstate(all="ignore"):
            z = (x - median) / (MAD_TO_SIGMA * mad)
        return ranked_entries(x, median, mad, z, used, features=self.top_features, kinds=self.kinds,
                              metrics=self.top_metric_names, metric_columns=self.metric_columns,
                              domains=[metric_domain.get(m, "other") for m in self.top_metric_names],
                              top_k=self.top_k)

    def _impact(self, top: list[dict], attributes: dict) -> float:
        """scoring.impact_of for one row: its top metric's domain and its cohort values."""
        keys = [top[0]["domain"]] if top else []
        keys += [str(attributes[c]) for c in COHORT_COLUMNS if c in attributes and c != "cohort"]
        found = [self.impact_weights[k] for k in keys if k in self.impact_weights]
        return max(found) if found else 1.0


__all__ = ["BLOCKS", "BaselineTables", "FeatureSpec", "History", "OnlineModel", "Unsupported", "engineer",
           "merge_observations"]
