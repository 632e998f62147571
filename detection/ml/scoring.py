"""Scoring: anomaly scores, labels, severity and the top contributing metrics of each anomaly.

Severity: the top metric's |robust z| times a business-impact weight (per metric domain or cohort
value, settings.VIGIL_DETECTION["impact_weights"]), banded by the configurable thresholds
("severity_z": medium, high, critical).

Top metrics rank each source metric by the largest |robust z-score| among its candidates, and report
that candidate's feature value, its typical value (the baseline median at the level that applied after
fall-back) and its MAD. The candidates of a metric are its engineered features at the model's z level
(the z-scores that baselines.engine.apply_baselines added) and, for a detector whose temporal columns
are device-level z-scores of features (HybridAnomalyDetector's ``<feature>_z_device``), those features
at the device level: an anomaly that the temporal score raised (a device whose rolling mean left its
own baseline while staying inside its cohort's range) is explained, and its severity banded, by the
metric that drove it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from baselines.engine import BaselineSet, lookup

from .features import feature_kind

SEVERITIES = ("critical", "high", "medium", "low")
# Columns whose values may carry an impact weight (a cohort: manufacturer, model, OS version).
COHORT_COLUMNS = ("manufacturer", "model", "os_version", "cohort")


@dataclass
class ScoreResult:
    """Per-row results, aligned with the scored frame (n rows).

    scores: float, higher = more anomalous. labels: -1 anomaly, 1 normal. severity: "" for
    normal rows. top_metrics: for anomalies, a list of dicts (metric, feature, kind, domain,
    value, typical, mad, z, level), |z| descending; [] for normal rows. kind says which of the
    metric's engineered features was most abnormal (features.FEATURE_KINDS), and value/typical
    are that feature's, in the metric's unit. level is the baseline level the z was taken at: the
    z level (or its fall-back), or "device" for a hybrid detector's temporal column (top_metrics).

    For an ensemble (or auto), votes and agreement say how far its members agree on each anomaly:
    votes[i] is {member: whether the member's own threshold flags row i} (None for normal rows)
    and agreement[i] the weighted share of members that flag row i, 0..1, for every row
    (EnsembleDetector.agreement). Both are None (not lists) for a single detector, which has no
    members to agree. anomaly_agreement() is agreement with None for normal rows, as persisted.
    """

    scores: np.ndarray
    labels: np.ndarray
    threshold: float
    severity: np.ndarray
    top_metrics: list[list[dict]]
    votes: list[dict | None] | None = None
    agreement: np.ndarray | None = None

    @property
    def n_anomalies(self) -> int:
        return int((self.labels == -1).sum())

    def anomaly_agreement(self) -> list[float | None] | None:
        """agreement rounded to 4 decimals for anomalies and None for normal rows (n values); None
        for a single detector."""
        if self.agreement is None:
            return None
        out = np.full(len(self.labels), None, dtype=object)
        anomalous = np.asarray(self.labels) == -1
        out[anomalous] = np.round(np.asarray(self.agreement, dtype="float64")[anomalous], 4).tolist()
        return out.tolist()


def split_votes(votes: dict) -> tuple[list[str], list[str]]:
    """An anomaly's ensemble votes ({member: flags it}, ScoreResult.votes / AnomalyResult.votes) as
    (members that flag it, members that do not), each sorted by name; what the anomaly page and the
    explanation both list."""
    return sorted(m for m, v in votes.items() if v), sorted(m for m, v in votes.items() if not v)


def severity_from_z(max_abs_z: np.ndarray, bands: tuple[float, float, float] = (4.0, 6.0, 10.0)) -> np.ndarray:
    """Low below bands[0], medium from bands[0], high from bands[1], critical from bands[2] (|z|)."""
    medium, high, critical = bands
    return np.select([max_abs_z >= critical, max_abs_z >= high, max_abs_z >= medium],
                     ["critical", "high", "medium"], default="low")


def severity_from_score(scores: np.ndarray, thresholds: tuple[float, float, float] = (4.0, 6.0, 10.0),
                        impact: np.ndarray | float = 1.0) -> np.ndarray:
    """Severity per row from a score times a business-impact weight.

    scores: n floats (|z| of the anomaly's top metric, or any score on the thresholds' scale).
    thresholds: (medium, high, critical), ascending; below medium is low. impact: one weight or n
    weights (the metric domain's or cohort's impact, settings.VIGIL_DETECTION["impact_weights"]),
    >= 0. Raises ValueError for unordered thresholds or a negative weight.
    """
    medium, high, critical = thresholds
    if not medium <= high <= critical:
        raise ValueError(f"severity thresholds must be ascending (medium, high, critical), got {thresholds}")
    impact = np.asarray(impact, dtype="float64")
    if (impact < 0).any():
        raise ValueError("impact weights must be non-negative")
    return severity_from_z(np.abs(np.asarray(scores, dtype="float64")) * impact, thresholds)


def impact_of(top: list[dict], rows: pd.DataFrame | None, weights: dict[str, float]) -> float:
    """The business-impact weight of one anomaly: the largest weight among its top metric's domain
    and the row's cohort values (any column value named in `weights`), 1 when none is named."""
    if not weights:
        return 1.0
    keys = [top[0]["domain"]] if top else []
    if rows is not None:
        keys += [str(v) for v in rows.to_numpy().ravel()]
    found = [weights[k] for k in keys if k in weights]
    return max(found) if found else 1.0


def score_frame(
    detector, frame: pd.DataFrame, *, explain: pd.DataFrame, features: list[str], feature_metric: dict[str, str],
    metric_domain: dict[str, str], baselines: BaselineSet | None, level: str = "cohort", top_k: int = 5,
    severity_bands: tuple[float, float, float] = (4.0, 6.0, 10.0),
) -> ScoreResult:
    """Score every row of `frame` and explain the anomalies.

    frame: rows x the detector's input columns. explain: the same rows (same order) with the
        engineered features and group columns, read for the anomalies only.
    features: the engineered (un-normalised) features whose z-scores rank the metrics.
    Without baselines (the fall-back path), z-scores are taken against the detector's training
    mean and standard deviation and the level is reported as "training".
    An ensemble also reports its members' votes and agreement on each anomaly (ScoreResult).
    """
    member_votes = None
    if hasattr(detector, "score_with_votes"):
        scores, member_votes = detector.score_with_votes(frame)
    else:
        scores = detector.score_samples(frame)
    labels = np.where(scores > detector.threshold_, -1, 1)
    severity = np.full(len(frame), "", dtype=object)
    top: list[list[dict]] = [[] for _ in range(len(frame))]
    idx = np.flatnonzero(labels == -1)
    if len(idx):
        rows = explain.iloc[idx]
        explained = top_metrics(rows, features=features, feature_metric=feature_metric, metric_domain=metric_domain,
                                baselines=baselines, level=level, detector=detector, top_k=top_k)
        max_z = np.array([abs(t[0]["z"]) if t and t[0]["z"] is not None else 0.0 for t in explained])
        weights = dict(getattr(getattr(detector, "config", None), "impact_weights", ()) or ())
        cohort = [c for c in COHORT_COLUMNS if c in rows.columns]
        impact = np.array([impact_of(t, rows.iloc[[k]][cohort] if cohort else None, weights)
                           for k, t in enumerate(explained)]) if weights else 1.0
        severity[idx] = severity_from_score(max_z, severity_bands, impact)
        for i, t in zip(idx, explained):
            top[i] = t
    votes = agreement = None
    if member_votes is not None:
        agreement = detector.agreement(member_votes)
        votes = [None] * len(frame)
        for i in idx.tolist():
            votes[i] = {name: bool(v[i]) for name, v in member_votes.items()}
    return ScoreResult(scores, labels, float(detector.threshold_), severity, top, votes, agreement)


def device_candidates(detector, features: list[str], level: str) -> list[int]:
    """Positions in `features` of those whose device-level robust z-score (``<feature>_z_device``) is one
    of the detector's temporal columns (HybridAnomalyDetector.temporal_features_), in `features` order;
    [] for a detector without such columns or when `level` is already "device" (the z level's entries
    are then those same candidates)."""
    temporal = set(getattr(detector, "temporal_features_", None) or ())
    if not temporal or level == "device":
        return []
    return [i for i, f in enumerate(features) if f"{f}_z_device" in temporal]


def top_metrics(rows: pd.DataFrame, *, features: list[str], feature_metric: dict[str, str],
                metric_domain: dict[str, str], baselines: BaselineSet | None, level: str, detector=None,
                top_k: int = 5) -> list[list[dict]]:
    """The top_k metrics of each row by |robust z|; see ScoreResult.top_metrics for the entries.

    rows: anomalies x (features, group columns). With baselines, each metric's candidates are its
    features at `level` and, for the features whose device-level z the detector reads as a temporal
    column (device_candidates), the same features at the device level (statistics after fall-back, so
    a device the baselines never saw reports its parent level); the candidate with the largest |z|
    wins, the z level's on a tie. Without baselines, the detector's training mean and scale.
    """
    features = [f for f in features if f in rows.columns and (baselines is None or f in baselines.features)]
    x = rows[features].to_numpy(dtype="float64")
    if baselines is not None:
        median, mad, used = lookup(rows, baselines, level, features, with_levels=True)
        dev = device_candidates(detector, features, level) if "device" in baselines.levels else []
        if dev:
            # The temporal score's columns as extra candidates: the same feature values against the
            # device's own median and MAD (the arithmetic of apply_baselines, so z is the model's input).
            names = [features[i] for i in dev]
            d_median, d_mad, d_used = lookup(rows, baselines, "device", names, with_levels=True)
            x = np.hstack([x, x[:, dev]])
            median, mad, used = np.hstack([median, d_median]), np.hstack([mad, d_mad]), np.hstack([used, d_used])
            features = features + names
        spread = 1.4826 * mad
    else:
        kept = [f for f in features if f in getattr(detector, "features_", [])]
        features, x = kept, rows[kept].to_numpy(dtype="float64")
        scaler = detector.scaler_
        pos = [detector.features_.index(f) for f in kept]
        median = np.tile(scaler.mean_[pos], (len(rows), 1)) if scaler is not None else np.zeros_like(x)
        spread = np.tile(scaler.scale_[pos], (len(rows), 1)) if scaler is not None else np.ones_like(x)
        mad = spread / 1.4826
        used = np.full(x.shape, "training", dtype=object)
    with np.errstate(all="ignore"):
        z = (x - median) / spread
    metric_of = np.array([feature_metric.get(f, f) for f in features])
    metrics = list(dict.fromkeys(metric_of))
    return ranked_entries(x, median, mad, z, used, features=features,
                          kinds=[feature_kind(f, feature_metric.get(f, f)) for f in features], metrics=metrics,
                          metric_columns=[np.flatnonzero(metric_of == m) for m in metrics],
                          domains=[metric_domain.get(m, "other") for m in metrics], top_k=top_k)


def ranked_entries(x, median, mad, z, used, *, features: list[str], kinds: list[str], metrics: list[str],
                   metric_columns: list[np.ndarray], domains: list[str], top_k: int) -> list[list[dict]]:
    """The entries of ScoreResult.top_metrics, from rows x candidates arrays (value, typical value,
    MAD, robust z, baseline level used) and the candidates' features and kinds: for each metric j
    (metrics[j], domains[j]) the candidate of metric_columns[j] with the largest |z| (the first on a
    tie), then the top_k metrics by that |z|; a metric whose z is not finite is left out. Shared by
    top_metrics and detection.ml.online, so both paths rank and round alike."""
    n = len(x)
    absz = np.where(np.isfinite(z), np.abs(z), -1.0)
    # For each metric, the column of its most abnormal candidate.
    best_col = np.empty((n, len(metrics)), dtype=int)
    best_abs = np.empty((n, len(metrics)))
    for j, cols in enumerate(metric_columns):
        pick = cols[np.argmax(absz[:, cols], axis=1)]
        best_col[:, j] = pick
        best_abs[:, j] = absz[np.arange(n), pick]
    order = np.argsort(-best_abs, axis=1)[:, :top_k]
    # The entries' values gathered as arrays, then turned into Python objects a column at a time: the
    # same numbers as rounding / str per value, without numpy scalar overhead per entry (a stream batch
    # explains thousands of anomalies).
    r_idx = np.arange(n)[:, None]
    col = best_col[r_idx, order]
    keep = (best_abs[r_idx, order] >= 0).tolist()
    value, typical, mad_, z_ = (_nums(a[r_idx, col]) for a in (x, median, mad, z))
    level = [[str(u) for u in r] for r in used[r_idx, col].tolist()]
    col, order = col.tolist(), order.tolist()
    out = []
    for r in range(n):
        entries = []
        for k, j in enumerate(order[r]):
            if not keep[r][k]:
                continue
            c = col[r][k]
            entries.append({
                "metric": metrics[j], "feature": features[c], "kind": kinds[c], "domain": domains[j],
                "value": value[r][k], "typical": typical[r][k], "mad": mad_[r][k], "z": z_[r][k],
                "level": level[r][k],
            })
        out.append(entries)
    return out


def _nums(a: np.ndarray) -> list[list[float | None]]:
    """Every value of a 2-D array as a float rounded to 4 decimals, None where it is not finite, as
    nested lists."""
    return [[round(v, 4) if math.isfinite(v) else None for v in r] for r in np.asarray(a, dtype="float64").tolist()]

