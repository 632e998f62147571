"""Evaluation against ground truth. Django-free.

SKAB's protocol (Katser & Kozitsin, "Skoltech Anomaly Benchmark", 2020; github.com/waico/SKAB):
outlier-detection quality is F1 with FAR (false alarm rate, FP / (FP + TN)) and MAR (missed alarm
rate, FN / (FN + TP)), with TP/FP/FN/TN pooled over the scored rows of every file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd


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
