"""Per-metric contributions to an anomaly score. Django-free: pandas/numpy in, dataclasses out.

Four methods, tried in this order; Attribution.method says which one was used:

- ``tree_shap``: exact Tree SHAP (Lundberg et al., "From local explanations to global understanding
  with explainable AI for trees", Nature Machine Intelligence 2020; the ``shap`` library's
  TreeExplainer) on the Isolation Forest inside AnomalyDetector and HybridAnomalyDetector.
- ``context_shap``: exact Shapley values over the metrics for a sequential detector (one that scores a
  row against its device's earlier rows: windowed_gaussian, nn_novelty, lstm_ae..., or an ensemble
  holding one) on data with at most MAX_CONTEXT_METRICS metrics: every coalition is scored by replaying
  the device's rows, so base + contributions is the stored score. Kernel SHAP scores each perturbed row
  on its own and cannot do that. An ensemble whose only sequential part is its alarm persistence (its
  members score rows one at a time, as SKAB's do: the score is a median of the last k rows' fused
  scores) needs no replay: a metric left out takes its typical value in each of those k rows, and the
  2 ** metrics x k rows are fused in one batch, so it takes up to MAX_PERSISTENCE_METRICS metrics.
- ``kernel_shap``: Kernel SHAP (``shap.KernelExplainer``) on a small background sample, for any detector
  with ``score_samples`` but no forest. (shap's permutation explainer would do too, but its first call
  compiles with numba for several seconds.)
- ``robust_z``: no model is evaluated; each of the stored top metrics gets a share of the score's excess
  over the threshold in proportion to its |robust z|. Used when the model or the telemetry cannot be
  reloaded. It is a ranking aid, not an attribution of the model, and has no additivity to check.

Units. Tree SHAP explains what the trees output: the expected path length E[h(x)] of Liu, Ting & Zhou
(ICDM 2008), whose score is s(x) = 2 ** (-E[h(x)] / c(n)). The SHAP values phi_j satisfy
``expected_value + sum(phi) == E[h(x)]``; this additivity is checked against scikit-learn's own
score_samples for every row. Contributions are then put in the units of the anomaly score by the
Rescale rule (Shrikumar et al., DeepLIFT, ICML 2017): each phi_j is multiplied by
(s(x) - s_base) / (E[h(x)] - expected_value), so they still add up exactly, now to the score. For the
hybrid detector, whose score is (1 - w) * (forest - f_median) / f_scale + w * (temporal - t_median) /
t_scale, the forest contributions are scaled by (1 - w) / f_scale and the temporal term is credited to
the metric whose device-level z-score is the temporal score (the temporal score is a max, so that metric
alone sets it). Base value plus contributions equals the fused score; explanations.services compares it
with the score stored for the anomaly.

The forest is trained on ``np.repeat(transform(X), repeats_, axis=1)``: a domain-weighted column appears
up to MAX_REPEAT times, and the SHAP values of its copies are summed back into the one feature. Features
are then summed by source metric: ``battery_level_roll_mean_z_cohort`` counts for battery_level.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .rows import with_members

EULER_GAMMA = 0.5772156649015329
METHOD_LABELS = {
    "tree_shap": "SHAP TreeExplainer",
    "kernel_shap": "SHAP KernelExplainer",
    "context_shap": "Shapley values in the device's sequence",
    "robust_z": "robust z-score attribution (fallback)",
}


class AttributionError(ValueError):
    """The detector cannot be attributed with the requested method (no forest, no background rows)."""


@dataclass(frozen=True)
class FeatureContribution:
    """One model input column's contribution, in anomaly-score units.

    column: the model input (``battery_level_roll_mean_z_cohort``); feature: the engineered feature it was
    built from (``battery_level_roll_mean``); level: the baseline level of its z-score (None for raw
    features); value: the column's value in the row (a robust z-score for ``*_z_*`` columns).
    """

    column: str
    feature: str
    metric: str
    domain: str
    level: str | None
    value: float | None
    contribution: float


@dataclass(frozen=True)
class MetricContribution:
    """A source metric's total contribution (anomaly-score units) and its share of sum |contribution|."""

    metric: str
    domain: str
    contribution: float
    share: float


@dataclass
class Attribution:
    """The contributions of one scored row.

    base_value + sum(m.contribution for m in metrics) == output_value (the anomaly score), to rounding.
    metrics: by |contribution|, largest first; features: likewise, one entry per model input column.
    additivity: {"checked", "ok", "tolerance", "native_error" (Tree SHAP, path-length units),
    "score_error" (score units), "native_units"}.
    components: hybrid detector only, {"forest": {"score", "base", "contribution"}, "temporal":
    {"score", "median", "metric", "contribution"}}.
    """

    method: str
    note: str
    base_value: float | None
    output_value: float | None
    metrics: list[MetricContribution]
    features: list[FeatureContribution] = field(default_factory=list)
    additivity: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return METHOD_LABELS.get(self.method, self.method)

    def as_dict(self) -> dict:
        return {"method": self.method, "label": self.label, "note": self.note, "base_value": self.base_value,
                "output_value": self.output_value, "metrics": [dict(vars(m)) for m in self.metrics],
                "features": [dict(vars(f)) for f in self.features], "additivity": dict(self.additivity),
                "components": dict(self.components)}

    @classmethod
    def from_dict(cls, data: dict) -> "Attribution":
        return cls(method=data["method"], note=data.get("note", ""), base_value=data.get("base_value"),
                   output_value=data.get("output_value"),
                   metrics=[MetricContribution(**m) for m in data.get("metrics", [])],
                   features=[FeatureContribution(**f) for f in data.get("features", [])],
                   additivity=dict(data.get("additivity", {})), components=dict(data.get("components", {})))


# --- Tree SHAP ------------------------------------------------------------------------------------

def average_path_length(n) -> np.ndarray:
    """c(n), the average path length of an unsuccessful search in a binary search tree of n points:
    2 H(n - 1) - 2 (n - 1) / n, with H(i) ~ ln(i) + Euler's gamma; 1 for n = 2, 0 for n <= 1
    (Liu, Ting & Zhou 2008, eq. 1; scikit-learn's _average_path_length)."""
    n = np.asarray(n, dtype="float64")
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + EULER_GAMMA) - 2.0 * (n[big] - 1.0) / n[big]
    return out


_EXPLAINERS: "weakref.WeakKeyDictionary[object, object]" = weakref.WeakKeyDictionary()


def supports_tree_shap(detector) -> bool:
    """True when the detector holds a fitted scikit-learn IsolationForest in ``forest_``."""
    forest = getattr(detector, "forest_", None)
    return forest is not None and hasattr(forest, "estimators_") and hasattr(forest, "estimators_features_")


def tree_explainer(forest):
    """A shap.TreeExplainer for a fitted IsolationForest, built once per forest object and cached.

    shap's own IsolationForest loader computes each leaf's value with one scikit-learn call per leaf
    (about 2 s for 300 trees); this builds the same trees (leaf value: depth + c(leaf samples), averaged
    over trees) as arrays in about 40 ms. The values are the same to 1e-15 (tests/test_explanations_core).
    """
    cached = _EXPLAINERS.get(forest)
    if cached is not None:
        return cached
    import shap

    n_trees = len(forest.estimators_)
    trees = []
    for estimator, features in zip(forest.estimators_, forest.estimators_features_):
        tree = estimator.tree_
        left, right = tree.children_left, tree.children_right
        depth = np.zeros(tree.node_count)
        internal = np.flatnonzero(left >= 0)
        for _ in range(tree.max_depth + 1):  # parents precede children; max_depth passes settle every depth
            depth[left[internal]] = depth[internal] + 1
            depth[right[internal]] = depth[internal] + 1
        leaf = left < 0
        values = np.where(leaf, depth + average_path_length(tree.n_node_samples), 0.0).reshape(-1, 1)
        mapped = np.where(tree.feature >= 0, np.asarray(features)[np.maximum(tree.feature, 0)], -1)
        trees.append({
            "children_left": left.astype(np.int32), "children_right": right.astype(np.int32),
            "children_default": left.astype(np.int32), "features": mapped.astype(np.int32),
            "thresholds": tree.threshold.astype(np.float64), "values": values / n_trees,
            "node_sample_weight": tree.weighted_n_node_samples.astype(np.float64),
        })
    explainer = shap.TreeExplainer({"trees": trees, "tree_output": "raw_value"})
    _EXPLAINERS[forest] = explainer
    return explainer


def attribute_tree(detector, X: pd.DataFrame, *, feature_metric: dict[str, str], metric_domain: dict[str, str],
                   levels=(), tolerance: float = 1e-6) -> list[Attribution]:
    """Tree SHAP contributions for each row of X.

    X: rows x (the detector's input columns: features_ and, for the hybrid detector, temporal_features_),
        as explanations.rows.model_rows rebuilds them; NaNs are imputed by the detector as in scoring.
    feature_metric: {model column or engineered feature: source metric}; metric_domain: {metric: domain}.
    levels: the baseline levels, to split ``{feature}_z_{level}`` names.
    tolerance: allowed |additivity error|, relative to max(1, |output|).
    Raises AttributionError when the detector has no forest.
    """
    from .rows import split_model_column

    if not supports_tree_shap(detector):
        raise AttributionError(f"{type(detector).__name__} has no Isolation Forest to explain with Tree SHAP")
    if X.empty:
        return []
    forest = detector.forest_
    explainer = tree_explainer(forest)
    matrix = np.repeat(detector.transform(X).astype(np.float32), detector.repeats_, axis=1)
    phi_repeated = np.asarray(explainer.shap_values(matrix, check_additivity=False), dtype="float64")
    expected = float(np.ravel(explainer.expected_value)[0])
    # Sum the SHAP values of each column's copies back into one feature.
    owner = np.repeat(np.arange(len(detector.features_)), detector.repeats_)
    phi = np.zeros((len(X), len(detector.features_)))
    np.add.at(phi.T, owner, phi_repeated.T)

    c_n = float(average_path_length([forest.max_samples_])[0])
    path = expected + phi.sum(axis=1)
    forest_score = -forest.score_samples(matrix)  # scikit-learn's own score, in (0, 1]
    true_path = -np.log2(forest_score) * c_n
    native_error = np.abs(path - true_path)

    base_score = 2.0 ** (-expected / c_n)
    gap = path - expected
    # Rescale rule; where the row sits at the expected path, the local derivative ds/dh.
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(np.abs(gap) > 1e-12, (forest_score - base_score) / gap,
                          -math.log(2) / c_n * forest_score)
    contrib = phi * factor[:, None]

    hybrid = hasattr(detector, "scales_") and hasattr(detector, "temporal_features_")
    columns = list(detector.features_)
    if hybrid:
        (fc, fs), (tc, ts) = detector.scales_
        w = float(detector.config.temporal_weight)
        contrib = contrib * (1 - w) / fs
        base = np.full(len(X), (1 - w) * (base_score - fc) / fs)
        temporal_cols = list(detector.temporal_features_)
        temporal_abs = np.abs(X[temporal_cols].to_numpy(dtype="float64"))
        clip = float(getattr(detector, "TEMPORAL_CLIP", np.inf))
        temporal_abs = np.clip(np.nan_to_num(temporal_abs, nan=0.0, posinf=clip), 0, clip)
        temporal = temporal_abs.max(axis=1)
        which = temporal_abs.argmax(axis=1)
        temporal_term = w * (temporal - tc) / ts
        # The detector's fusion, from the forest score scikit-learn gave above (scoring the forest again
        # through detector.score_samples would double the cost of one row); the caller compares the result
        # with the stored score, which detector.score_samples produced.
        score = (1 - w) * (forest_score - fc) / fs + temporal_term
    else:
        base = np.full(len(X), base_score)
        score = forest_score
    output = base + contrib.sum(axis=1) + (temporal_term if hybrid else 0.0)
    score_error = np.abs(output - score)

    values = X[columns].to_numpy(dtype="float64")
    meta = _column_meta(columns, levels, feature_metric, metric_domain)
    results = []
    for r in range(len(X)):
        features = _contributions(meta, values[r], contrib[r])
        components = {}
        if hybrid:
            column = temporal_cols[which[r]]
            feature, level = split_model_column(column, levels)
            metric = feature_metric.get(column, feature_metric.get(feature, feature))
            features.append(FeatureContribution(column, feature, metric, metric_domain.get(metric, "other"), level,
                                                _num(X[column].iloc[r]), float(temporal_term[r])))
            components = {
                "forest": {"score": float(forest_score[r]), "base": float(base_score),
                           "contribution": float(contrib[r].sum()), "weight": 1 - w},
                "temporal": {"score": float(temporal[r]), "median": float(tc), "metric": metric, "column": column,
                             "contribution": float(temporal_term[r]), "weight": w},
            }
        limit = tolerance * max(1.0, abs(float(true_path[r])))
        ok = bool(native_error[r] <= limit and score_error[r] <= tolerance * max(1.0, abs(float(score[r]))))
        results.append(_finish(
            "tree_shap",
            "Exact Tree SHAP of the forest's expected path length, rescaled to anomaly-score units"
            + (" and joined by the hybrid detector's temporal term" if hybrid else ""),
            float(base[r]), float(output[r]), features,
            {"checked": True, "ok": ok, "tolerance": tolerance, "native_error": float(native_error[r]),
             "score_error": float(score_error[r]), "native_units": "average path length",
             "expected_value": expected, "native_output": float(true_path[r])},
            components))
    return results


# --- Kernel SHAP (any detector) -------------------------------------------------------------------

def attribute_kernel(detector, X: pd.DataFrame, background: pd.DataFrame, *, feature_metric: dict[str, str],
                     metric_domain: dict[str, str], levels=(), max_background: int = 20, nsamples: int | str = "auto",
                     seed: int = 0, tolerance: float = 1e-6) -> list[Attribution]:
    """Kernel SHAP (Lundberg & Lee, "A unified approach to interpreting model predictions", NeurIPS 2017;
    shap.KernelExplainer) on the detector's score_samples, for detectors without a tree explainer.

    X, background: rows x the detector's input columns (background: reference rows, e.g. other samples of
    the same devices; a seeded sample of at most max_background is used, NaNs filled with its medians).
    Cost: nsamples ("auto": 2 x columns + 2048) coalitions x background rows model evaluations per row, so
    keep the background small. Kernel SHAP's efficiency constraint makes base + contributions equal the
    score, which is checked. Raises AttributionError without background rows.
    """
    import shap

    if background is None or background.empty:
        raise AttributionError("Kernel SHAP needs background rows; none were given")
    if X.empty:
        return []
    columns = list(X.columns)
    ref = background[columns].sample(min(max_background, len(background)), random_state=seed)
    medians = ref.median(numeric_only=True).fillna(0.0)
    ref = ref.fillna(medians)

    def score(a: np.ndarray) -> np.ndarray:
        return detector.score_samples(pd.DataFrame(a, columns=columns))

    explainer = shap.KernelExplainer(score, ref.to_numpy(dtype="float64"), seed=seed)
    data = X[columns].fillna(medians).to_numpy(dtype="float64")
    values = np.atleast_2d(np.asarray(explainer.shap_values(data, nsamples=nsamples, silent=True), dtype="float64"))
    base = float(np.ravel(explainer.expected_value)[0])
    scores = score(data)
    meta = _column_meta(columns, levels, feature_metric, metric_domain)
    results = []
    for r in range(len(X)):
        features = _contributions(meta, data[r], values[r])
        output = base + float(values[r].sum())
        error = abs(output - float(scores[r]))
        results.append(_finish(
            "kernel_shap", f"Kernel SHAP of the detector's score against {len(ref)} background rows", base,
            output, features,
            {"checked": True, "ok": bool(error <= tolerance * max(1.0, abs(float(scores[r])))),
             "tolerance": tolerance, "native_error": error, "score_error": error, "native_units": "anomaly score"},
            {}))
    return results


# --- Exact Shapley values over metrics, in the device's sequence (sequential detectors) -----------

MAX_CONTEXT_METRICS = 6  # 2 ** 6 = 64 scorings of the device's rows per anomaly
# At most this many rows scored per anomaly (2 ** metrics x the device's rows up to it): one metric and
# 30,000 rows, or 6 metrics and 937 rows. Measured per scoring of 2,016 rows x 6 metrics: windowed_gaussian
# 2 ms, lstm_ae 26 ms, the ensemble with persistence 34 ms, nn_novelty 73 ms (its search grows with
# the square of the rows). Beyond it Kernel SHAP is used.
MAX_CONTEXT_WORK = 60_000
# An ensemble whose only sequential part is its alarm persistence (row-wise members, e.g. SKAB's hybrid,
# robust_z and lof with a median over 20 rows) fuses each coalition's k rows in one batch, no replay:
# 2 ** 8 coalitions x 20 rows = 5,120 rows (SKAB), 2 ** 10 x 20 = 20,480 rows.
MAX_PERSISTENCE_METRICS = 10


def is_sequential(detector) -> bool:
    """True when the detector, or one of its ensemble members, reads each device's rows as a series
    (detection.ml.statistical._SequentialDetector and the deep detectors keep per-device pasts_), so
    that a row's score depends on the device's earlier rows."""
    return any(getattr(d, "pasts_", None) is not None for d in with_members(detector))


def head_label(detector, device) -> object | None:
    """The index label the pipeline's frame gave `device`'s first training row (a sequential detector
    scores a device block that starts with it as the device's whole series), or None when the
    detector never saw the device."""
    for d in with_members(detector):
        past = (getattr(d, "pasts_", None) or {}).get(device)
        if past is not None:  # a _DevicePast, or the ensemble's (label, head, tail)
            return past.label if hasattr(past, "label") else past[0]
    return None


def persistence_only(detector) -> bool:
    """True for an ensemble whose only sequential part is its alarm persistence (config.ensemble_smooth_rows
    k > 1, per-device pasts kept) and whose members each score a row on its own (none keeps pasts_):
    a row's score is then the median (or mean) of its own fused score and the k - 1 before it
    (suite.EnsembleDetector.score_samples), which needs no replay of the device's rows."""
    members = with_members(detector)[1:]
    return bool(members) and getattr(detector, "pasts_", None) is not None \
        and detector.config.ensemble_smooth_rows > 1 \
        and not any(getattr(m, "pasts_", None) is not None for m in members)


def context_metric_limit(detector) -> int:
    """How many metrics attribute_in_context takes for this detector: MAX_PERSISTENCE_METRICS for an
    ensemble whose only sequential part is alarm persistence (persistence_only), else MAX_CONTEXT_METRICS."""
    return MAX_PERSISTENCE_METRICS if persistence_only(detector) else MAX_CONTEXT_METRICS


def _persistence_values(detector, frame: pd.DataFrame, left_out: np.ndarray, typical: np.ndarray,
                        column_at: list[int]) -> np.ndarray:
    """v(S) of every coalition for a persistence_only ensemble, whose score of the last row is the median
    (or mean) of the fused scores of the last k rows (config.ensemble_smooth_rows; fewer at a device's
    start), as score_samples smooths a device block that starts with its training head. A coalition
    sets the columns of its left-out metrics (left_out: coalitions x columns, bool) to their typical
    values in each of those k rows, the window the alarm is decided on; all coalitions' rows are fused
    in one batch. Returns one value per coalition."""
    k, statistic = detector.config.ensemble_smooth_rows, detector.config.ensemble_smooth
    window = frame.iloc[-k:]
    batch = pd.concat([window] * len(left_out), ignore_index=True)
    values = np.tile(window.iloc[:, column_at].to_numpy(dtype="float64"), (len(left_out), 1))
    replace = np.repeat(left_out, len(window), axis=0)
    values = np.where(replace, typical[None, :], values)
    batch.iloc[:, column_at] = values
    fused = detector.fused_scores(batch).reshape(len(left_out), len(window))
    return np.median(fused, axis=1) if statistic == "median" else fused.mean(axis=1)


def attribute_in_context(detector, sequence: pd.DataFrame, *, feature_metric: dict[str, str],
                         metric_domain: dict[str, str], levels=(), reference: pd.Series | None = None,
                         max_metrics: int | None = None, max_work: int = MAX_CONTEXT_WORK) -> Attribution:
    """Exact Shapley values (Shapley 1953; the attribution SHAP approximates) over the metrics of a
    sequential detector's score of one row, scored after its device's earlier rows.

    sequence: rows x (the detector's input columns, detection.ml.detectors.SEQUENCE_KEY), one device's
        rows in time order up to and including the explained row (the last one), indexed as the
        pipeline's frame was, so that the detector treats them as it did when it scored them.
    reference: per column, the value a metric takes when it is left out of a coalition (default: the
        median of the device's earlier rows, its typical state).
    The players are the metrics (all columns of a metric join or leave together): v(S) is the score of
    the last row with the columns of the metrics outside S set to their reference values, the earlier
    rows unchanged. Cost: 2 ** metrics scorings of the sequence. For an ensemble whose only sequential
    part is alarm persistence (persistence_only) the row's score is a median over its last k rows' fused
    scores, which one row's values rarely move: there the left-out metrics take their reference values
    in each of those k rows (the window the alarm is decided on), and the 2 ** metrics x k rows are
    fused in one batch, after a check that v(all metrics) is the score of the whole sequence (else
    AttributionError). base_value = v(no metric), output_value
    = v(all metrics) = the detector's score of the row; efficiency makes base + contributions equal it
    exactly. features holds one entry per metric (its contribution; value: the metric's plain column
    when it is an input). Raises AttributionError for more than max_metrics metrics (default
    context_metric_limit(detector)), for more than max_work rows to score (2 ** metrics x the
    sequence's rows; 2 ** metrics x k for persistence_only) or an empty sequence.
    """
    from math import factorial

    from detection.ml.detectors import SEQUENCE_KEY

    columns = [c for c in sequence.columns if c != SEQUENCE_KEY]
    if sequence.empty or not columns:
        raise AttributionError("no row to attribute")
    meta = _column_meta(columns, levels, feature_metric, metric_domain)
    metrics = list(dict.fromkeys(m[2] for m in meta))
    max_metrics = context_metric_limit(detector) if max_metrics is None else max_metrics
    if len(metrics) > max_metrics:
        raise AttributionError(f"{len(metrics)} metrics: exact Shapley values in context take 2 ** "
                               f"{len(metrics)} scorings (at most {max_metrics} metrics)")
    windowed = persistence_only(detector)  # the alarm-persistence window is the unit, not the last row
    rows_per_coalition = min(len(sequence), detector.config.ensemble_smooth_rows) if windowed else len(sequence)
    if 2 ** len(metrics) * rows_per_coalition > max_work:
        raise AttributionError(f"{2 ** len(metrics)} coalitions x {rows_per_coalition} rows is more than "
                               f"{max_work} rows to score")
    earlier, last = sequence[columns].iloc[:-1], sequence[columns].iloc[-1]
    if reference is None:
        reference = earlier.median() if len(earlier) else last
    reference = reference.reindex(columns).fillna(last).fillna(0.0)
    positions = {m: [columns.index(c) for c, _, metric, _, _ in meta if metric == m] for m in metrics}
    n = len(metrics)
    frame = sequence.copy()
    column_at = [frame.columns.get_loc(c) for c in columns]
    actual, typical = last.to_numpy(dtype="float64"), reference.to_numpy(dtype="float64")
    left_out = np.zeros((2 ** n, len(columns)), dtype=bool)
    for mask in range(2 ** n):
        for k, m in enumerate(metrics):
            if not mask >> k & 1:
                left_out[mask, positions[m]] = True
    if windowed:
        value = _persistence_values(detector, frame, left_out, typical, column_at)
        whole = float(detector.score_samples(frame)[-1])
        if abs(value[-1] - whole) > 1e-9 * max(1.0, abs(whole)):  # not scored as a block from its head
            raise AttributionError(f"the row's score ({whole:.6g}) is not the smoothed fused score of its last "
                                   f"{rows_per_coalition} rows ({value[-1]:.6g})")
    else:
        value = np.empty(2 ** n)
        for mask in range(2 ** n):
            frame.iloc[-1, column_at] = np.where(left_out[mask], typical, actual)
            value[mask] = float(detector.score_samples(frame)[-1])
    phi = np.zeros(n)
    weights = [factorial(size) * factorial(n - size - 1) / factorial(n) for size in range(n)]
    for mask in range(2 ** n):
        size = bin(mask).count("1")
        for k in range(n):
            if not mask >> k & 1:
                phi[k] += weights[size] * (value[mask | 1 << k] - value[mask])
    base, output = float(value[0]), float(value[-1])
    domain = {m: d for _, _, m, d, _ in meta}
    features = []
    for k, m in enumerate(metrics):
        plain = next((c for c, feature, metric, _, level in meta if metric == m and feature == m and level is None),
                     columns[positions[m][0]])
        features.append(FeatureContribution(plain, m, m, domain[m], None, _num(last[plain]), float(phi[k])))
    error = abs(base + float(phi.sum()) - output)
    return _finish("context_shap", f"exact Shapley values over {n} metric(s), each row scored after its "
                   f"device's {len(earlier)} earlier rows; a metric left out takes its median over them"
                   + (f", in each of the last {rows_per_coalition} rows, whose smoothed score raises the alarm "
                      f"(alarm persistence)" if windowed else ""),
                   base, output, features,
                   {"checked": True, "ok": bool(error <= 1e-9 * max(1.0, abs(output))), "tolerance": 1e-9,
                    "native_error": error, "score_error": error, "native_units": "anomaly score"}, {})


# --- Robust z fallback ----------------------------------------------------------------------------

def attribute_robust_z(top_metrics: list[dict], *, score: float, threshold: float, reason: str = "") -> Attribution:
    """Contributions from the stored top metrics alone: the score's excess over the threshold, shared in
    proportion to each metric's |robust z|. top_metrics: dicts with metric, domain and z (the
    AnomalyResult.top_metrics entries). No model is evaluated, so nothing is checked for additivity."""
    usable = [m for m in top_metrics if m.get("z") is not None]
    total = sum(abs(float(m["z"])) for m in usable)
    excess = float(score) - float(threshold)
    metrics = []
    for m in usable:
        share = abs(float(m["z"])) / total if total else 0.0
        metrics.append(MetricContribution(m["metric"], m.get("domain", "other"), excess * share, share))
    metrics.sort(key=lambda m: -abs(m.contribution))
    note = "Shares of the score's excess over the threshold by |robust z|; no model was evaluated"
    return Attribution("robust_z", f"{note} ({reason})" if reason else note, float(threshold), float(score),
                       metrics, [], {"checked": False, "ok": None}, {})


# --- shared ---------------------------------------------------------------------------------------

def _finish(method: str, note: str, base: float, output: float, features: list[FeatureContribution],
            additivity: dict, components: dict) -> Attribution:
    totals: dict[str, float] = {}
    domains: dict[str, str] = {}
    for f in features:
        totals[f.metric] = totals.get(f.metric, 0.0) + f.contribution
        domains[f.metric] = f.domain
    absolute = sum(abs(v) for v in totals.values()) or 1.0
    metrics = sorted((MetricContribution(m, domains[m], v, abs(v) / absolute) for m, v in totals.items()),
                     key=lambda m: -abs(m.contribution))
    features = sorted(features, key=lambda f: -abs(f.contribution))
    return Attribution(method, note, base, output, metrics, features, additivity, components)


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _column_meta(columns, levels, feature_metric, metric_domain) -> list[tuple]:
    """(column, feature, metric, domain, level) per model column, worked out once per call, not per row."""
    from .rows import split_model_column

    meta = []
    for column in columns:
        feature, level = split_model_column(column, levels)
        metric = feature_metric.get(column, feature_metric.get(feature, feature))
        meta.append((column, feature, metric, metric_domain.get(metric, "other"), level))
    return meta


def _contributions(meta: list[tuple], values, contributions) -> list["FeatureContribution"]:
    """One row's FeatureContribution per column, from its input values and SHAP contributions."""
    return [FeatureContribution(column, feature, metric, domain, level, _num(v), float(c))
            for (column, feature, metric, domain, level), v, c in zip(meta, values, contributions)]
