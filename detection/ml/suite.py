"""More detectors behind the same interface, and an ensemble over them. Django-free.

Every detector here reuses AnomalyDetector's pre-flight checks, median imputation, near-constant
filter and threshold (the training-score quantile at 1 - contamination); each replaces only the
scoring model:

- robust_z: the largest |robust z-score| of a row across features, (x - median) / (1.4826 * MAD)
  on the training rows (Iglewicz & Hoaglin, 1993).
- iqr: the largest distance outside [Q1, Q3] across features, in IQRs (Tukey's fences, 1977).
- lof: Local Outlier Factor in novelty mode (Breunig et al., SIGMOD 2000; scikit-learn), fitted on
  a seeded sample of at most FIT_SAMPLE training rows.
- ensemble: score fusion. Each member's scores are robustly scaled on the training rows (median and
  MAD), then averaged with weights (priors, or each member's precision on reviewed feedback when
  the caller passes it). Confidence is the share of members that flag the row. Optional alarm
  persistence (config.ensemble_smooth_rows = k > 1): the fused score becomes its trailing median
  over the last k rows, so an alarm needs about half of them or more high (a majority-of-k alarm
  rule: a running median filter, Tukey 1977); the threshold is then the highest smoothed training
  score. Like the sequential detectors it reads the rows in the order given, and per device when
  the frame has the device column (detectors.SEQUENCE_KEY): each device's window holds its own
  rows only and its history is its own last k - 1 fused training scores (the threshold is still
  taken from the training rows read as one series: see fit). Without the column, one series.

Distance-based detectors (lof) see standard-scaled features multiplied by the square root
of their domain weight, so each domain carries the same share of a squared distance.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from .detectors import (
    DETECTORS, AnomalyDetector, AnomalyDetectorConfig, DetectorError, _robust_center_scale, history_rows,
    make_detector, register_detector, sequence_blocks,
)
from .features import MEAN_AD_TO_SIGMA, robust_center_scale


def _is_head(label, row: np.ndarray, head: tuple) -> bool:
    """Whether a row (index label, imputed values) is a series' first training row head = (label, values)."""
    return bool(label == head[0] and np.allclose(row, head[1], equal_nan=True))


def _starts_with(X: pd.DataFrame, matrix: np.ndarray, head: tuple) -> bool:
    """Whether X starts with the first training row (same index label and values)."""
    return bool(len(X)) and _is_head(X.index[0], matrix[0], head)


class _MatrixDetector(AnomalyDetector):
    """Base of the detectors that score the imputed (and, for distances, scaled) feature matrix."""

    FIT_SAMPLE = 20_000
    family = "statistical"

    def _sample(self, matrix: np.ndarray, limit: int) -> np.ndarray:
        if len(matrix) <= limit:
            return matrix
        rng = np.random.default_rng(self.config.random_state)
        return matrix[np.sort(rng.choice(len(matrix), limit, replace=False))]

    def _imputed(self, X: pd.DataFrame) -> np.ndarray:
        raw = X[self.features_].to_numpy(dtype="float64")
        return np.where(np.isfinite(raw), raw, self.medians_)

    def _weighted(self, X: pd.DataFrame) -> np.ndarray:
        weights = np.sqrt([self.weights_[f] for f in self.features_])
        return self.transform(X) * weights

    def component_scores(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        return {self.name: self.score_samples(X)}


_SPREAD_FLOOR = {"spread_floor": {"default": "mean_ad", "choices": ["mean_ad", "none"]}}


def spread_floor(x: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Per column of x (rows x features), the spread of normal data with x's mean absolute deviation
    around `center`: 1.2533 * mean |x - center| (sigma units). robust_z, iqr, stl_residual and
    forecast floor their spreads with it (config.spread_floor "mean_ad", the default), as the
    baselines floor their MAD.

    Why: on a zero-inflated feature (half its training values at one point, the rest spread out) the
    MAD and the IQR collapse to that point's width, and every ordinary value then scores in the
    thousands. Measured on the demo fleet (two time folds, `manage.py tune`): network_rx_mb's
    day-over-day delta had a robust_z spread of 0.000026 z-units and set the ensemble's score on
    every flagged row (F1 0.065); with the floor the ensemble gets 0.429 (hybrid alone 0.354).
    "none" keeps the plain MAD and IQR, with which a sensor that sits on one value in normal
    running (SKAB's flow meter) alarms at any departure; SKAB's fleet config chooses it."""
    return MEAN_AD_TO_SIGMA * np.mean(np.abs(x - center), axis=0)


def floored_center_scale(x: np.ndarray, floor: str) -> tuple[np.ndarray, np.ndarray]:
    """features.robust_center_scale(x): per-column median and 1.4826 * MAD, the spread at least
    spread_floor(x, median) when floor (config.spread_floor) is "mean_ad"."""
    center, spread = robust_center_scale(x)
    return center, np.maximum(spread, spread_floor(x, center)) if floor == "mean_ad" else spread


@register_detector("robust_z")
class RobustZDetector(_MatrixDetector):
    """The largest |robust z-score| of a row across features (Iglewicz & Hoaglin, 1993): each feature
    centred on its training median, divided by 1.4826 * MAD (floored: see spread_floor)."""

    streaming = True
    multivariate = False
    hyperparameters = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5}, **_SPREAD_FLOOR}

    def _fit_model(self, X: pd.DataFrame) -> None:
        self.center_, self.spread_ = floored_center_scale(self._imputed(X), self.config.spread_floor)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        return np.max(np.abs(self._imputed(X) - self.center_) / self.spread_, axis=1)


@register_detector("iqr")
class IQRDetector(_MatrixDetector):
    """The largest distance outside [Q1, Q3] across features, in IQRs (Tukey's fences, 1977); the
    IQR is floored at 1.349 times spread_floor (the IQR of normal data is 1.349 sigma)."""

    multivariate = False
    hyperparameters = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5}, **_SPREAD_FLOOR}
    NORMAL_IQR_TO_SIGMA = 1.349

    def _fit_model(self, X: pd.DataFrame) -> None:
        x = self._imputed(X)
        self.q1_, self.q3_ = np.percentile(x, [25, 75], axis=0)
        iqr = self.q3_ - self.q1_
        if self.config.spread_floor == "mean_ad":
            iqr = np.maximum(iqr, self.NORMAL_IQR_TO_SIGMA * spread_floor(x, np.median(x, axis=0)))
        self.iqr_ = np.where(iqr > 0, iqr, np.std(x, axis=0) + 1e-12)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        x = self._imputed(X)
        outside = np.maximum(self.q1_ - x, x - self.q3_).clip(min=0)
        return np.max(outside / self.iqr_, axis=1)


@register_detector("lof")
class LOFDetector(_MatrixDetector):
    """Local Outlier Factor in novelty mode (Breunig et al., SIGMOD 2000; scikit-learn)."""

    family = "density"
    FIT_SAMPLE = 10_000
    N_NEIGHBORS = 35
    hyperparameters = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5},
                       "n_neighbors": {"default": 35, "min": 5, "max": 200}}

    def __init__(self, config=None, *, n_neighbors: int | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.n_neighbors = int(n_neighbors or self.N_NEIGHBORS)

    def _fit_model(self, X: pd.DataFrame) -> None:
        from sklearn.neighbors import LocalOutlierFactor

        sample = self._sample(self._weighted(X), self.FIT_SAMPLE)
        self.model_ = LocalOutlierFactor(n_neighbors=min(self.n_neighbors, len(sample) - 1), novelty=True,
                                         n_jobs=self.config.n_jobs).fit(sample)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        return -self.model_.score_samples(self._weighted(X))


@register_detector("ensemble")
class EnsembleDetector(AnomalyDetector):
    """Weighted fusion of normalised member scores; see the module docstring.

    members: detector names (default MEMBERS, or config.ensemble_members). weights: {name: weight}
    (default config.ensemble_weights; missing names weigh 1; see weights_from_feedback for weights
    learnt from reviews). config.ensemble_fusion "robust" puts each member's scores in robust
    z-units of its training scores (median, MAD); "rank" uses each score's empirical quantile among
    the member's training scores (extended linearly, in robust units, above the training maximum).
    A member that fails to fit or to score is left out with its reason in excluded_; the ensemble
    fails only when every member does.
    """

    family = "ensemble"
    uses_temporal = True
    MEMBERS = ("hybrid", "robust_z", "lof")
    hyperparameters = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5},
                       "ensemble_fusion": {"default": "robust", "choices": ["robust", "rank"]},
                       "ensemble_smooth_rows": {"default": 1, "min": 1, "max": 10_000},
                       "ensemble_smooth": {"default": "median", "choices": ["median", "mean"]}}

    def __init__(self, config: AnomalyDetectorConfig | None = None, *, members=None, weights=None, **kwargs):
        super().__init__(config, **kwargs)
        self.member_names = tuple(members or self.config.ensemble_members or self.MEMBERS)
        self.member_weights = dict(self.config.ensemble_weights)
        self.member_weights.update(weights or {})
        self._check_members(self.member_names)

    @staticmethod
    def _check_members(names) -> None:
        unknown = [m for m in names if m not in DETECTORS or m in ("ensemble", "auto")]
        if unknown:
            known = sorted(set(DETECTORS) - {"ensemble", "auto"})
            raise DetectorError(f"unknown ensemble member(s) {unknown}; known: {known}")

    def fit(self, X: pd.DataFrame, features: list[str], temporal_features: list[str] | None = None
            ) -> "EnsembleDetector":
        self.preflight(X, features)
        self.training_rows_ = len(X)
        self.members_, self.excluded_, self.fit_seconds_ = {}, {}, {}
        for name in self.member_names:
            started = time.perf_counter()
            try:
                member = make_detector(name, self.config, feature_domain=self.feature_domain,
                                       domain_weights=self.domain_weights)
                if member.uses_temporal:
                    member.fit(X, features, temporal_features=temporal_features)
                else:
                    member.fit(X, features)
            except Exception as exc:  # one failing detector never breaks the run
                self.excluded_[name] = f"fit: {type(exc).__name__}: {exc}"
                continue
            self.members_[name] = member
            self.fit_seconds_[name] = round(time.perf_counter() - started, 3)
        if not self.members_:
            raise DetectorError("every ensemble member failed: " + "; ".join(f"{k}: {v}" for k, v in self.excluded_.items()))
        first = next(iter(self.members_.values()))
        self.features_, self.dropped_ = first.features_, first.dropped_
        self.weights_, self.medians_, self.scaler_ = first.weights_, first.medians_, first.scaler_
        self.weights_source_ = "priors"
        return self._fit_fusion(X)

    def reweight(self, X: pd.DataFrame, weights: dict[str, float], *, source: str) -> "EnsembleDetector":
        """Set the members' weights (e.g. weights_from_feedback) and refit what depends on them (the
        fused scores' threshold and persistence history) on X, the training rows fit saw. The
        members themselves are not refitted. source says where the weights came from (params)."""
        self.member_weights.update({name: float(w) for name, w in weights.items()})
        self.weights_source_ = source
        return self._fit_fusion(X)

    def _fit_fusion(self, X: pd.DataFrame) -> "EnsembleDetector":
        smooth = self.config.ensemble_smooth_rows
        # A trailing window needs consecutive rows: with persistence on, the threshold rows are the
        # last THRESHOLD_SAMPLE training rows rather than a random sample of them.
        sample = self._threshold_rows(X) if smooth <= 1 else X.iloc[-self.THRESHOLD_SAMPLE:]
        raw = self.component_scores(sample)
        self.scales_ = {name: _robust_center_scale(s) for name, s in raw.items()}
        self.reference_ = {name: np.sort(np.asarray(s, dtype="float64")) for name, s in raw.items()}
        fused = self._fuse(raw)
        if smooth <= 1:
            self.threshold_ = float(np.quantile(fused, 1 - self.config.contamination))
            return self
        self.train_head_ = (X.index[0], self._imputed_head(X))
        self.history_ = fused[-(smooth - 1):].copy()
        blocks = sequence_blocks(sample)
        self.pasts_ = None if blocks is None else self._pasts(X, fused, blocks)
        # The threshold reads the training rows as one series, devices one after the other, as it
        # did before scoring read each device on its own (only the scoring windows and history are
        # per device). Per device it measured worse: the highest smoothed score over each device's
        # full windows gave SKAB valve1's odd files F1 0.858, FAR 22.9 % (0.909, 5.4 % as one
        # series; 0.881, 14.0 % without persistence), and with each device's first k - 1 short
        # windows counted, all of SKAB fell from F1 0.872 to 0.741 (MAR 19 % to 41 %).
        smoothed = trailing_statistic(fused, smooth, self.config.ensemble_smooth)
        # The training rows are taken as normal but for isolated outliers (what contamination
        # counts), and a median over k rows removes those: the threshold is the highest smoothed
        # training score. A quantile (1 - contamination, or / k) sat on a handful of rows and
        # swung with the training set: measured on SKAB valve1, trained on 4 or 8 of its files,
        # the maximum kept FAR 5-32 % where the quantiles gave 20-48 % (README, SKAB).
        self.threshold_ = float(smoothed.max())
        return self

    def _imputed_head(self, X: pd.DataFrame) -> np.ndarray:
        return self._imputed_rows(X, [0])[0]

    def _imputed_rows(self, X: pd.DataFrame, positions) -> np.ndarray:
        raw = X[self.features_].iloc[positions].to_numpy(dtype="float64")
        return np.where(np.isfinite(raw), raw, self.medians_)

    def _pasts(self, X: pd.DataFrame, fused: np.ndarray, blocks) -> dict:
        """{device: (first training row's index label, its imputed values, last fused training
        scores)}: each device's own past for alarm persistence. fused: the scores of the last rows
        of X, split by `blocks`; a device keeps the tail of its last run, at most
        history_rows(k - 1, devices) scores."""
        heads = sequence_blocks(X)
        first = {}
        for key, a, _ in heads:
            first.setdefault(key, a)
        values = self._imputed_rows(X, list(first.values()))
        keep = history_rows(self.config.ensemble_smooth_rows - 1, len(first))
        tails = {key: fused[max(a, b - keep):b].copy() for key, a, b in blocks}
        return {key: (X.index[a], values[i], tails.get(key, fused[:0].copy()))
                for i, (key, a) in enumerate(first.items())}

    def _starts_with_training(self, X: pd.DataFrame) -> bool:
        """Whether X starts with the first training row (same index label and feature values)."""
        index, values = self.train_head_
        if not len(X) or X.index[0] != index:
            return False
        return bool(np.allclose(self._imputed_head(X), values, equal_nan=True))

    def component_scores(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        """{member: raw scores} for the members that score; a member that raises is excluded (with
        its reason in excluded_) from then on."""
        out = {}
        for name, member in list(self.members_.items()):
            try:
                scores = np.asarray(member.score_samples(X), dtype="float64")
                if scores.shape != (len(X),):
                    raise DetectorError(f"returned shape {scores.shape} for {len(X)} rows")
            except Exception as exc:
                if len(self.members_) == 1:
                    raise
                self.excluded_[name] = f"score: {type(exc).__name__}: {exc}"
                del self.members_[name]
                continue
            out[name] = np.nan_to_num(scores, nan=0.0, posinf=1e12, neginf=-1e12)
        return out

    def normalised_scores(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each member's raw scores on the common scale of config.ensemble_fusion."""
        out = {}
        for name, scores in raw.items():
            center, scale = self.scales_[name]
            if self.config.ensemble_fusion == "rank":
                ref = self.reference_[name]
                rank = np.searchsorted(ref, scores, side="right") / len(ref)
                out[name] = rank + np.clip((scores - ref[-1]) / scale, 0, None)
            else:
                out[name] = (scores - center) / scale
        return out

    def _fuse(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        total, weight_sum = 0.0, 0.0
        for name, scores in self.normalised_scores(raw).items():
            w = float(self.member_weights.get(name, 1.0))
            total = total + w * scores
            weight_sum += w
        if weight_sum <= 0:
            raise DetectorError("every ensemble member weighs 0")
        return total / weight_sum

    def fused_scores(self, X: pd.DataFrame) -> np.ndarray:
        """The members' normalised scores of each row of X, weighted and fused, before any alarm
        persistence (score_samples smooths these). Rows are scored each on its own when no member
        is sequential (explanations.attribution scores coalitions of one window this way)."""
        return self._fuse(self.component_scores(X))

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        """The fused score per row (rows of X in time order); with config.ensemble_smooth_rows k > 1,
        its trailing median (or mean) over the row and the k - 1 rows before it, of the same device
        when X has the SEQUENCE_KEY column (and the training frame had it). On the very rows that
        trained (or a frame, or a device's rows, that starts with them) the window starts empty; on
        any other frame the fused scores of the last k - 1 training rows (the device's own) come
        first, as the recent past; a device training never saw starts with an empty window."""
        return self._smoothed(X, self.fused_scores(X))

    def score_with_votes(self, X: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """score_samples(X) and votes(X) from one pass over the members (each member scores once).

        Returns (n fused scores, {member: n bools}); the votes are each member's own decision on the
        row itself, before the ensemble's alarm persistence (ensemble_smooth_rows)."""
        raw = self.component_scores(X)
        return self._smoothed(X, self._fuse(raw)), self._votes(raw)

    def _smoothed(self, X: pd.DataFrame, fused: np.ndarray) -> np.ndarray:
        smooth = self.config.ensemble_smooth_rows
        if smooth <= 1:
            return fused
        pasts = getattr(self, "pasts_", None)  # None too for a model pickled before per-device pasts
        blocks = sequence_blocks(X) if pasts is not None else None
        if blocks is None:
            history = None if self._starts_with_training(X) else self.history_
            return trailing_statistic(fused, smooth, self.config.ensemble_smooth, history=history)
        firsts = self._imputed_rows(X, [a for _, a, _ in blocks])
        out = np.empty(len(fused))
        for (key, a, b), first_row in zip(blocks, firsts):
            past = pasts.get(key)  # (label, head, tail); None for a device training never saw
            # No history for a new device or for a device's rows that start with its training rows.
            history = None if past is None or _is_head(X.index[a], first_row, past[:2]) else past[2]
            out[a:b] = trailing_statistic(fused[a:b], smooth, self.config.ensemble_smooth, history=history)
        return out

    def votes(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        """{member: bool per row}: whether the member's own threshold flags the row."""
        return self._votes(self.component_scores(X))

    def _votes(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: scores > self.members_[name].threshold_ for name, scores in raw.items()
                if name in self.members_}

    def agreement(self, votes: dict[str, np.ndarray]) -> np.ndarray:
        """The weighted share of members that flag each row, 0..1 (n floats), from votes' output:
        sum of the flagging members' weights / sum of all members' weights (member_weights; 1 each
        by default). Raises DetectorError when votes is empty."""
        if not votes:
            raise DetectorError("no member votes: every member was excluded")
        w = np.array([float(self.member_weights.get(n, 1.0)) for n in votes])
        return (np.array(list(votes.values()), dtype="float64") * w[:, None]).sum(axis=0) / max(w.sum(), 1e-12)

    def confidence(self, X: pd.DataFrame) -> np.ndarray:
        """Agreement between members, 0..1 per row: the weighted share of members whose own
        threshold flags the row (agreement(votes(X)))."""
        return self.agreement(self.votes(X))

    def params(self) -> dict:
        return {**super().params(), "members": ",".join(self.members_), "excluded": dict(self.excluded_),
                "member_weights": {n: float(self.member_weights.get(n, 1.0)) for n in self.members_},
                "weights_source": getattr(self, "weights_source_", "priors"),
                # Flat too: a model version's params JSON keeps only scalars as they are.
                **{f"weight_{n}": float(self.member_weights.get(n, 1.0)) for n in self.members_},
                "fusion": self.config.ensemble_fusion}


def trailing_statistic(scores, rows: int, statistic: str = "median", *, history=None) -> np.ndarray:
    """Causal smoothing of a score series: out[t] is the median (or mean) of scores[t - rows + 1 .. t].

    scores: n floats in time order. rows: the window length in rows (1 returns a copy). history:
    earlier scores of the same series (its last rows - 1 are read); without it the first windows
    are shorter. Never reads a later row, so it suits streaming scoring (NAB's rule) and SKAB's
    alarm persistence: a median over k rows exceeds a threshold only when about half of the k
    rows or more do (a majority-of-k alarm rule). Raises DetectorError for rows < 1 or an unknown
    statistic. Returns n floats.
    """
    if rows < 1 or statistic not in ("median", "mean"):
        raise DetectorError(f"rows must be >= 1 and statistic 'median' or 'mean'; got {rows}, {statistic!r}")
    scores = np.asarray(scores, dtype="float64")
    if rows == 1:
        return scores.copy()
    past = np.asarray(history if history is not None else [], dtype="float64")[-(rows - 1):]
    window = pd.Series(np.r_[past, scores]).rolling(rows, min_periods=1)
    out = (window.median() if statistic == "median" else window.mean()).to_numpy()
    return out[len(past):]


def weights_from_feedback(feedback: pd.DataFrame, members, priors: dict[str, float] | None = None, *,
                          prior_strength: float = 4.0, prior_precision: float = 0.5) -> dict[str, float]:
    """Ensemble weights from reviewed anomalies: each member's precision on the reviews, shrunk
    towards its prior (a Beta(prior_precision * k, (1 - prior_precision) * k) prior, k =
    prior_strength, so a handful of reviews moves the weight a little and many move it a lot).

    feedback: rows x (verdict, <member> for each member): verdict is "true_positive",
        "false_positive" or "not_sure" (detection.AnomalyFeedback's verdicts; not_sure is ignored);
        each member column says (bool) whether that member's own threshold flagged the reviewed row.
    priors: {member: prior weight} (default 1 each). Without reviews the priors come back unchanged.
    Returns {member: weight} = prior * posterior precision / prior_precision.
    Raises DetectorError when the verdict column or a member column is missing.
    """
    priors = {m: float((priors or {}).get(m, 1.0)) for m in members}
    if feedback is None or len(feedback) == 0:
        return priors
    missing = [c for c in ["verdict", *members] if c not in feedback.columns]
    if missing:
        raise DetectorError(f"feedback lacks column(s): {', '.join(missing)}")
    reviewed = feedback[feedback["verdict"].isin(["true_positive", "false_positive"])]
    true = (reviewed["verdict"] == "true_positive").to_numpy()
    weights = {}
    for m in members:
        flagged = reviewed[m].astype(bool).to_numpy()
        tp, n = float((flagged & true).sum()), float(flagged.sum())
        precision = (tp + prior_precision * prior_strength) / (n + prior_strength)
        weights[m] = priors[m] * precision / prior_precision
    return weights


# --- automatic selection ------------------------------------------------------------------------

def data_characteristics(X: pd.DataFrame, features: list[str], *, max_lag: int = 300) -> dict:
    """What the selection reads, from rows x features (time order): rows, features, metrics (the
    distinct metrics behind the features, their engineered variants and baseline z-scores folded
    in: detection.ml.novelty.metric_names), multivariate (more than one metric), missing_share (NaN
    or inf among all cells, 0..1) and seasonality_strength (the largest autocorrelation at a lag in
    [2, max_lag] of the first non-constant feature, statsmodels acf; 0 when too short). Raises
    DetectorError when no feature column is present."""
    cols = [f for f in features if f in X.columns]
    if not cols:
        raise DetectorError("none of the feature columns is in the frame")
    raw = X[cols].to_numpy(dtype="float64")
    finite = np.isfinite(raw)
    strength = 0.0
    for j in range(raw.shape[1]):
        x = raw[finite[:, j], j]
        if len(x) >= 20 and np.std(x) > 0:
            from .statistical import _dominant_period

            strength = _dominant_period(x, min(max_lag, len(x) // 2))[1]
            break
    from .novelty import metric_names

    metrics = len(metric_names(cols))
    return {"rows": int(len(X)), "features": len(cols), "metrics": metrics, "multivariate": metrics > 1,
            "missing_share": round(float(1 - finite.mean()), 4) if raw.size else 0.0,
            "seasonality_strength": round(float(strength), 3)}


def select_detectors(traits: dict) -> tuple[tuple[str, ...], str]:
    """(ensemble members, reason) for data_characteristics(...) `traits`; the rules follow what the
    benchmarks measured (README "Measured figures"): robust per-feature detectors everywhere,
    sequential ones when the series is long and complete enough, STL when it is seasonal, the
    multivariate ones on several features with enough rows; one metric that is long and complete
    enough gets nn_novelty alone (NAB, all single-metric series: 70.1 against 43.3 for the rules
    above)."""
    members, why = ["robust_z", "iqr"], ["robust per-feature scores always"]
    if traits["rows"] < 200:
        return ("robust_z", "iqr", "grubbs"), f"only {traits['rows']} rows: simple statistical tests only"
    if traits["missing_share"] > 0.2:
        why.append(f"{traits['missing_share']:.0%} missing: no sequential models (imputed gaps look like steps)")
    elif not traits["multivariate"]:
        # One metric (its engineered variants aside): nn_novelty alone. NAB (41 single-metric
        # series, rank_suppress): auto with it alone 70.1, with windowed_gaussian, robust_z, iqr
        # (and stl_residual when seasonal) besides it 44.2, without it 43.3 (README, auto).
        return ("nn_novelty",), ("one metric, complete enough for a sequential model: nearest-neighbour "
                                 "novelty alone (the best single-metric detector on NAB)")
    else:
        members.append("windowed_gaussian")
        why.append("complete enough for a sequential model")
        if traits["seasonality_strength"] >= 0.5:
            members.append("stl_residual")
            why.append(f"seasonal (autocorrelation {traits['seasonality_strength']:.2f})")
    if traits["multivariate"] and traits["rows"] >= 1000:
        members.append("lof")
        why.append(f"{traits['features']} features and {traits['rows']} rows: a multivariate density model")
    return tuple(members), "; ".join(why)


@register_detector("auto")
class AutoDetector(EnsembleDetector):
    """An ensemble whose members are chosen from the training data's characteristics
    (select_detectors); the traits, the choice and the reason are in params() (and so on the
    model version)."""

    family = "ensemble"

    def fit(self, X: pd.DataFrame, features: list[str], temporal_features: list[str] | None = None
            ) -> "AutoDetector":
        self.preflight(X, features)
        self.traits_ = data_characteristics(X, features)
        members, self.reason_ = select_detectors(self.traits_)
        self.member_names = members
        return super().fit(X, features, temporal_features=temporal_features)

    def params(self) -> dict:
        # Flat scalars too: model versions saved before services._jsonable kept structures hold
        # "selection" as a string, and the flat keys read the same in old and new ones.
        return {**super().params(), "selection": {"characteristics": self.traits_, "members": list(self.member_names),
                                                  "reason": self.reason_},
                "selected_members": ",".join(self.member_names), "selection_reason": self.reason_,
                **{f"data_{k}": v for k, v in self.traits_.items()}}


# --- hyperparameter tuning ----------------------------------------------------------------------

@dataclass
class TuningResult:
    """best: the parameters with the highest mean F1; trials: [{params, f1 (mean), folds [F1...]}]."""

    detector: str
    best: dict
    best_f1: float
    trials: list[dict]


def tune_hyperparameters(name: str, X: pd.DataFrame, features: list[str], labels, grid: dict[str, list], *,
                         n_splits: int = 3, config: AnomalyDetectorConfig | None = None) -> TuningResult:
    """Grid search with time-series cross-validation (scikit-learn TimeSeriesSplit: each fold trains
    on earlier rows and is scored on the next block, never the other way round).

    X: rows x features in time order; labels: 1 = anomaly, 0 = normal, one per row. Each fold trains
    on the normal rows of its training block, predicts with the detector's own threshold and is
    scored by F1 on the test block. grid: {parameter: [values]}; AnomalyDetectorConfig fields go
    into the config, other names to the detector's constructor. Raises DetectorError for an unknown
    detector, mismatched labels, an empty grid or too few rows for n_splits.
    """
    from itertools import product

    from sklearn.metrics import f1_score
    from sklearn.model_selection import TimeSeriesSplit

    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}")
    y = np.asarray(labels).astype(int)
    if len(y) != len(X):
        raise DetectorError(f"labels has {len(y)} entries for {len(X)} rows")
    if not grid:
        raise DetectorError("the grid is empty")
    base = config or AnomalyDetectorConfig()
    keys = list(grid)
    trials = []
    for values in product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        cfg = {k: v for k, v in params.items() if k in AnomalyDetectorConfig.__dataclass_fields__}
        kwargs = {k: v for k, v in params.items() if k not in cfg}
        folds = []
        for train, test in TimeSeriesSplit(n_splits=n_splits).split(X):
            normal = train[y[train] == 0]
            rows = X.iloc[normal if len(normal) >= base.min_training_rows else train]
            detector = DETECTORS[name](replace(base, **cfg), **kwargs)
            detector.fit(rows, features)
            predicted = detector.score_samples(X.iloc[test]) > detector.threshold_
            folds.append(float(f1_score(y[test], predicted, zero_division=0)))
        trials.append({"params": params, "f1": float(np.mean(folds)), "folds": folds})
    best = max(trials, key=lambda t: t["f1"])
    return TuningResult(name, best["params"], best["f1"], trials)


# Registers the statistical, forecast, kernel and deep detectors (they subclass _MatrixDetector).
from . import statistical  # noqa: E402,F401  (statistical registers deep, novelty and transformer in turn)
