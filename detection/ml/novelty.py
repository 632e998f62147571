"""Nearest-neighbour novelty: how unlike everything seen before the latest few values are. Django-free.

nn_novelty reads one series in time order. For each row t and each length L = 1 .. `lengths`, it
takes the window of the last L values (x[t-L+1], ..., x[t]) and finds the closest window of the
same length that ended at an earlier row j < t (one of the last `window` rows), by Euclidean
distance divided by sqrt(L) (a root-mean-square difference per value, so the lengths share one
scale). The row's novelty is the mean of the lengths' distances, divided by the mean absolute
step |x[i] - x[i-1]| of the rows before t, so that it reads "this many typical steps away from
anything seen before" whatever the series' unit and noise.

What it catches: the first values of a pattern the series has never shown (a level or shape it
never had, a spike taller than any before); a pattern seen once before, even if it is far from
the mean (a daily batch job, a spike that recurs), scores low the next time. A left matrix profile
without z-normalisation (Yeh et al., "Matrix Profile I", ICDM 2016: the distance from each
subsequence to its nearest neighbour, here among earlier ones only: the "left" matrix profile of
Zhu et al., "Matrix Profile VII: Time Series Chains", ICDM 2017), averaged over the short lengths 1 .. `lengths`
and scaled like MASE (Hyndman & Koehler, Int. J. Forecasting 2006, scales errors by the mean
absolute one-step difference). The online nearest-neighbour score is also the nonconformity
measure of KNN-CAD (Burnaev & Ishimtsev, "Conformalized density- and distance-based anomaly
detection in time-series data", 2016), without its conformal step: the pipeline's rank calibration
plays that part.

A frame with the device column (detectors.SEQUENCE_KEY) is one series per device (see
detection.ml.statistical): the neighbour search and the mean step of a row stay within its device.

Causal by construction: row t reads rows up to t only. Cost: O(rows x window x lengths) per column
(numba, compiled on first use).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .detectors import DetectorError, register_detector
from .features import MODEL_SUFFIXES
from .jit import compiled
from .statistical import _CONTAMINATION, _SequentialDetector


def _nearest_distances(x, lmax, window, begin):  # compiled by numba (jit.compiled)
    n = len(x)
    out = np.full((n, lmax), np.nan)
    best = np.empty(lmax)
    for t in range(max(begin, 1), n):
        for k in range(lmax):
            best[k] = np.inf
        first = max(0, t - window)
        for j in range(t - 1, first - 1, -1):
            total = 0.0
            for k in range(lmax):
                if j - k < 0:
                    break
                d = x[t - k] - x[j - k]
                total += d * d
                if total < best[k]:
                    best[k] = total
        for k in range(lmax):
            if best[k] < np.inf:
                out[t, k] = np.sqrt(best[k] / (k + 1))
    return out


def nn_novelty(x, *, lengths: int = 3, window: int = 25_000, floor: float = 1e-9, begin: int = 0) -> np.ndarray:
    """Nearest-neighbour novelty of each row of one series (see the module docstring).

    x: n values in time order (float; NaN is not allowed: impute first). lengths: the window
    lengths 1 .. lengths that are averaged. window: how many earlier rows are searched for a
    neighbour (and averaged for the mean absolute step). floor: the smallest mean step divided by
    (a series flat so far makes its first change very novel, not infinite). begin: rows before it
    are only the past of the others (history) and score 0, which saves their neighbour search.
    Returns n scores >= 0 in units of the mean absolute step; 0 for the first two rows (nothing
    to compare with). Raises ValueError for NaN values, lengths < 1 or window < 1.
    """
    x = np.ascontiguousarray(x, dtype="float64")
    if lengths < 1 or window < 1:
        raise ValueError(f"lengths and window must be at least 1, got {lengths} and {window}")
    if np.isnan(x).any():
        raise ValueError("nn_novelty needs values without NaN; impute them first")
    n = len(x)
    if n < 3:
        return np.zeros(n)
    distances = compiled(_nearest_distances)(x, int(lengths), int(window), int(begin))
    # Rows too early for a length-L neighbour count 0 for that length.
    distance = np.nan_to_num(distances, nan=0.0).mean(axis=1)
    steps = pd.Series(np.abs(np.diff(x, prepend=np.nan)))
    step = steps.shift(1).rolling(window, min_periods=1).mean().to_numpy()  # rows before t only
    out = distance / np.maximum(step, floor)
    out[:max(2, begin)] = 0.0
    return np.where(np.isfinite(out), out, 0.0)


_LEVEL_SUFFIX = re.compile(r"_z_[a-z]+$")
_ENGINEERED = tuple(s for s in MODEL_SUFFIXES if s) + ("_resid",)


def metric_names(features: list[str]) -> list[str]:
    """The distinct metrics behind `features`, in first-seen order: each feature with its baseline
    z-score suffix (``_z_<level>``) and its engineered suffix (rolling mean/std, delta, cohort,
    residual: detection.ml.features.MODEL_SUFFIXES) taken off. ["cpu", "cpu_roll_mean_z_device",
    "temp_delta"] -> ["cpu", "temp"]."""
    names: list[str] = []
    for feature in features:
        base = _LEVEL_SUFFIX.sub("", feature)
        suffix = next((s for s in _ENGINEERED if base.endswith(s) and len(base) > len(s)), "")
        base = base[:len(base) - len(suffix)]
        if base not in names:
            names.append(base)
    return names


def raw_metric_columns(features: list[str]) -> list[int]:
    """Positions of the features that are a metric itself (optionally as a baseline z-score,
    ``<metric>_z_<level>``), not one of its engineered variants (rolling mean/std, delta, cohort,
    residual: detection.ml.features.MODEL_SUFFIXES). Every position when none is a plain metric."""
    keep = [i for i, f in enumerate(features) if not _LEVEL_SUFFIX.sub("", f).endswith(_ENGINEERED)]
    return keep or list(range(len(features)))


@register_detector("nn_novelty")
class NearestNeighbourNoveltyDetector(_SequentialDetector):
    """Online nearest-neighbour novelty of the last 1-3 values, in mean absolute steps."""

    family = "distance"
    # Novelty shrinks as the history fills (more neighbours), so the share of earlier scores a row
    # exceeds (rank) lets late rows fire too rarely and early ones too often. A count ("among the K
    # most novel so far", top) fixes that but ignores by how much a row stands out, and its K did not
    # carry from one half of NAB to the other; a multiple of the file's 8th-16th highest earlier
    # scores (ratio) does both. NAB standard score on the 41 files: 69.9 rank_suppress, 75.4
    # top_suppress over 50 rows, 78.5 ratio_suppress over 20 rows (threshold carried between the
    # halves: 80.2 and 75.0, against 71.7 and 59.3 for top_suppress; see README). A wait of 20 rows
    # after each detection instead of "new highs of the last 20 rows" (ratio_wait) drops the
    # detections of a score that keeps rising after it fired: 79.6 (carried 81.6 and 75.8).
    nab_calibration = "ratio_wait"
    nab_suppress_rows = 20
    LENGTHS = 3
    # Rows searched for a neighbour: at least the longest NAB file (22,695 rows), so every row is
    # compared with the file's whole past, as the ratio calibration's reference is. A shorter search
    # makes patterns older than the window novel again: on the 41 files (all under 6,400 rows), a
    # window of 1,600 rows scored 77.7 and of 800 rows 71.4, against 78.5 for the whole past.
    WINDOW = 25_000
    HISTORY = 6400  # training rows kept as the past of frames that do not start with them
    hyperparameters = {**_CONTAMINATION,
                       "lengths": {"default": 3, "min": 1, "max": 12},
                       "window": {"default": 25_000, "min": 20, "max": 100_000},
                       "columns": {"default": "raw", "choices": ["raw", "all"]}}

    def __init__(self, config=None, *, lengths: int | None = None, window: int | None = None,
                 columns: str = "raw", **kwargs):
        super().__init__(config, **kwargs)
        self.lengths = int(lengths or self.LENGTHS)
        self.window = int(window or self.WINDOW)
        if self.lengths < 1 or self.window < 1:
            raise DetectorError(f"lengths and window must be at least 1, got {self.lengths} and {self.window}")
        if columns not in ("raw", "all"):
            raise DetectorError(f"columns must be 'raw' or 'all', got {columns!r}")
        self.columns = columns

    def _fit_series(self, matrix: np.ndarray, spans: list[tuple[int, int]] | None = None) -> None:
        # The engineered variants of a metric (rolling mean, delta, ...) are smoothed or lagged
        # copies of it: their novelty arrives later than the metric's own and only adds false
        # alarms (on NAB: 70.1 with the metric alone, 66.8 with its rolling mean as well).
        self.columns_ = raw_metric_columns(self.features_) if self.columns == "raw" else list(
            range(len(self.features_)))

    def _score_series(self, seq: np.ndarray, start: int) -> np.ndarray:
        return np.column_stack([nn_novelty(seq[:, j], lengths=self.lengths, window=self.window, begin=start)
                                for j in self.columns_])

    def params(self) -> dict:
        return {**super().params(), "lengths": self.lengths, "window": self.window, "columns": self.columns}
