"""Evaluation against ground truth. Django-free.

SKAB's protocol (Katser & Kozitsin, "Skoltech Anomaly Benchmark", 2020; github.com/waico/SKAB):
outlier-detection quality is F1 with FAR (false alarm rate, FP / (FP + TN)) and MAR (missed alarm
rate, FN / (FN + TP)), with TP/FP/FN/TN pooled over the scored rows of every file.

Run-to-failure data (C-MAPSS): early_warning measures how many cycles before failure each unit
first raised an alarm, the prognostics view of a detector (how much warning maintenance gets).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components


@dataclass(frozen=True)
class BinaryMetrics:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0

    @property
    def far(self) -> float:
        """False alarm rate, %."""
        return 100.0 * self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar(self) -> float:
        """Missed alarm rate, %."""
        return 100.0 * self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "precision": round(self.precision, 4), "recall": round(self.recall, 4),
                "f1": round(self.f1, 4), "far_pct": round(self.far, 2), "mar_pct": round(self.mar, 2)}


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> BinaryMetrics:
    """y_true, y_pred: boolean arrays of equal length (True = anomaly)."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.shape[0]} rows but y_pred has {y_pred.shape[0]}")
    return BinaryMetrics(tp=int((y_true & y_pred).sum()), fp=int((~y_true & y_pred).sum()),
                         fn=int((y_true & ~y_pred).sum()), tn=int((~y_true & ~y_pred).sum()))


def in_windows(rows: pd.DataFrame, windows: pd.DataFrame, *, key: str = "device_id") -> np.ndarray:
    """True for each row of `rows` (key, timestamp) inside any window (key, start, end; inclusive)."""
    out = np.zeros(len(rows), dtype=bool)
    if windows.empty or rows.empty:
        return out
    ts = rows["timestamp"].to_numpy(dtype="datetime64[ns]")
    keys = rows[key].to_numpy()
    for k, group in windows.groupby(key):
        sel = np.flatnonzero(keys == k)
        if not len(sel):
            continue
        t = ts[sel]
        hit = np.zeros(len(sel), dtype=bool)
        for start, end in zip(group["start"].to_numpy(dtype="datetime64[ns]"),
                              group["end"].to_numpy(dtype="datetime64[ns]")):
            hit |= (t >= start) & (t <= end)
        out[sel] = hit
    return out


@dataclass(frozen=True)
class EarlyWarning:
    """When units that run to failure first alarm.

    units: units scored. alarmed / never: units with at least one alarm / none. in_window /
    before_window: alarmed units whose first alarm falls inside / before their degraded window
    (an alarm before it is premature by the labels, though it may be real early degradation).
    mean_lead, median_lead: cycles from the first alarm to failure, over alarmed units (None if
    none alarmed); mean_lead_in_window: the same over the units whose first alarm is in the window.
    """

    units: int
    alarmed: int
    never: int
    in_window: int
    before_window: int
    mean_lead: float | None
    median_lead: float | None
    mean_lead_in_window: float | None

    def as_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def early_warning(units: np.ndarray, cycles: np.ndarray, alarms: np.ndarray, *, failure: Mapping,
                  degraded_from: Mapping) -> tuple[EarlyWarning, dict]:
    """First alarm and lead time per unit.

    units, cycles, alarms: one entry per scored row (unit key, cycle number, bool alarm).
    failure: {unit: cycle at which it fails}; degraded_from: {unit: first cycle of its degraded
    window} (units without a window count as "before_window" when they alarm). Every unit in
    `failure` is counted, scored rows or not. Returns (summary, {unit: {"first_alarm", "lead"}}),
    lead = failure cycle - first alarm cycle (None if the unit never alarms).
    Raises ValueError if the arrays differ in length.
    """
    units, cycles, alarms = np.asarray(units), np.asarray(cycles, dtype="float64"), np.asarray(alarms, dtype=bool)
    if not len(units) == len(cycles) == len(alarms):
        raise ValueError(f"units, cycles and alarms differ in length: {len(units)}, {len(cycles)}, {len(alarms)}")
    first = pd.Series(cycles[alarms]).groupby(units[alarms]).min().to_dict()
    per_unit, leads, in_window_leads, in_window = {}, [], [], 0
    for unit, fails in failure.items():
        alarm = first.get(unit)
        lead = float(fails - alarm) if alarm is not None else None
        per_unit[unit] = {"first_alarm": alarm, "lead": lead}
        if alarm is None:
            continue
        leads.append(lead)
        start = degraded_from.get(unit)
        if start is not None and alarm >= start:
            in_window += 1
            in_window_leads.append(lead)
    summary = EarlyWarning(
        units=len(failure), alarmed=len(leads), never=len(failure) - len(leads), in_window=in_window,
        before_window=len(leads) - in_window, mean_lead=float(np.mean(leads)) if leads else None,
        median_lead=float(np.median(leads)) if leads else None,
        mean_lead_in_window=float(np.mean(in_window_leads)) if in_window_leads else None)
    return summary, per_unit


# Two series run at different operating points when some metric's training medians differ by more
# than this factor and by more than REGIME_SPREADS times the series' training mean absolute deviation.
REGIME_RATIO = 1.5
REGIME_SPREADS = 20.0


def operating_regimes(frame: pd.DataFrame, metrics: list[str], *, train_rows: int, key: str = "external_id",
                      ratio: float = REGIME_RATIO, spreads: float = REGIME_SPREADS) -> dict[str, int]:
    """Group series that run at one operating point: {series key: regime number (0, 1, ...)}.

    frame: rows x (key, metrics), each series' rows in time order; only the first `train_rows` rows
    of each series are read (the rows a model trains on). Two series are at different operating
    points when, for some metric, their training medians a and b differ both by a factor:
    |a - b| > (ratio - 1) * min(|a|, |b|), and by many spreads: |a - b| > spreads * the larger of
    the two series' mean absolute deviations (a tiny gap on a near-zero reading is no new regime).
    Regimes are the connected groups of series not at different points (single linkage, scipy's
    connected_components), numbered in the order of each regime's first key. Measured on SKAB:
    valve1's 16 files form one regime (their water temperature ranges over 66-79 degC, a factor of
    1.2; flow 32.0-33.0 l/min); the anomaly-free recording (flow near 122, vibration RMS 0.21 against
    0.027, current 2.5 A against 1.0 A) is another. Raises ValueError for train_rows < 1, ratio <= 1
    or spreads < 0.
    """
    if train_rows < 1 or not ratio > 1 or not spreads >= 0:
        raise ValueError(f"need train_rows >= 1, ratio > 1 and spreads >= 0; got {train_rows}, {ratio}, {spreads}")
    head = frame.groupby(key, sort=True).head(train_rows)
    values = head[metrics].astype("float64")
    median = values.groupby(head[key]).median()
    spread = (values - median.reindex(head[key]).to_numpy()).abs().groupby(head[key].to_numpy()).mean()
    keys, m, s = list(median.index), median.to_numpy(), spread.reindex(median.index).to_numpy()
    gap = np.abs(m[:, None, :] - m[None, :, :])
    apart = ((gap > (ratio - 1) * np.minimum(np.abs(m[:, None, :]), np.abs(m[None, :, :])))
             & (gap > spreads * np.fmax(s[:, None, :], s[None, :, :]))).any(axis=2)
    _, regime = connected_components(csr_matrix(~apart), directed=False)  # labels in order of first key
    return dict(zip(keys, regime.tolist()))
