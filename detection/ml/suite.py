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
  the caller passes it). Confidence is the share of members that flag the row.

Distance-based detectors (lof) see standard-scaled features multiplied by the square root
of their domain weight, so each domain carries the same share of a squared distance.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .detectors import (
    DETECTORS, AnomalyDetector, AnomalyDetectorConfig, DetectorError, _robust_center_scale, register_detector,
)
from .features import robust_center_scale


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


@register_detector("robust_z")
class RobustZDetector(_MatrixDetector):
    streaming = True
    hyperparameters = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5}}

    def _fit_model(self, X: pd.DataFrame) -> None:
        self.center_, self.spread_ = robust_center_scale(self._imputed(X))

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        return np.max(np.abs(self._imputed(X) - self.center_) / self.spread_, axis=1)


@register_detector("iqr")
class IQRDetector(_MatrixDetector):
    hyperparameters = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5}}

    def _fit_model(self, X: pd.DataFrame) -> None:
        x = self._imputed(X)
        self.q1_, self.q3_ = np.percentile(x, [25, 75], axis=0)
        iqr = self.q3_ - self.q1_
        self.iqr_ = np.where(iqr > 0, iqr, np.std(x, axis=0) + 1e-12)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        x = self._imputed(X)
        outside = np.maximum(self.q1_ - x, x - self.q3_).clip(min=0)
        return np.max(outside / self.iqr_, axis=1)


@register_detector("lof")
class LOFDetector(_MatrixDetector):
    family = "density"
    FIT_SAMPLE = 10_000
    N_NEIGHBORS = 35
    hyperparameters = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5},
                       "n_neighbors": {"default": 35, "min": 5, "max": 200}}

    def _fit_model(self, X: pd.DataFrame) -> None:
        from sklearn.neighbors import LocalOutlierFactor

        sample = self._sample(self._weighted(X), self.FIT_SAMPLE)
        self.model_ = LocalOutlierFactor(n_neighbors=min(self.N_NEIGHBORS, len(sample) - 1), novelty=True,
                                         n_jobs=self.config.n_jobs).fit(sample)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        return -self.model_.score_samples(self._weighted(X))


@register_detector("ensemble")
class EnsembleDetector(AnomalyDetector):
    """Weighted fusion of robustly scaled member scores; see the module docstring.

    members: detector names (default MEMBERS). weights: {name: weight}; missing names weigh 1.
    A member that fails to fit is left out with its reason in excluded_; the ensemble fails only
    when every member does.
    """

    family = "ensemble"
    uses_temporal = True
    MEMBERS = ("hybrid", "robust_z", "lof")
    hyperparameters = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5}}

    def __init__(self, config: AnomalyDetectorConfig | None = None, *, members=None, weights=None, **kwargs):
        super().__init__(config, **kwargs)
        self.member_names = tuple(members or self.config.ensemble_members or self.MEMBERS)
        self.member_weights = dict(weights or {})
        unknown = [m for m in self.member_names if m not in DETECTORS or m == "ensemble"]
        if unknown:
            raise DetectorError(f"unknown ensemble member(s) {unknown}; known: {sorted(set(DETECTORS) - {'ensemble'})}")

    def fit(self, X: pd.DataFrame, features: list[str], temporal_features: list[str] | None = None
            ) -> "EnsembleDetector":
        self.preflight(X, features)
        self.training_rows_ = len(X)
        self.members_, self.excluded_ = {}, {}
        for name in self.member_names:
            member = DETECTORS[name](self.config, feature_domain=self.feature_domain,
                                     domain_weights=self.domain_weights)
            try:
                if member.uses_temporal:
                    member.fit(X, features, temporal_features=temporal_features)
                else:
                    member.fit(X, features)
            except Exception as exc:  # one failing detector never breaks the run
                self.excluded_[name] = f"{type(exc).__name__}: {exc}"
                continue
            self.members_[name] = member
        if not self.members_:
            raise DetectorError("every ensemble member failed: " + "; ".join(f"{k}: {v}" for k, v in self.excluded_.items()))
        first = next(iter(self.members_.values()))
        self.features_, self.dropped_ = first.features_, first.dropped_
        self.weights_, self.medians_, self.scaler_ = first.weights_, first.medians_, first.scaler_
        sample = self._threshold_rows(X)
        self.scales_ = {name: _robust_center_scale(m.score_samples(sample)) for name, m in self.members_.items()}
        self.threshold_ = float(np.quantile(self.score_samples(sample), 1 - self.config.contamination))
        return self

    def component_scores(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        return {name: m.score_samples(X) for name, m in self.members_.items()}

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        total, weight_sum = 0.0, 0.0
        for name, scores in self.component_scores(X).items():
            center, scale = self.scales_[name]
            w = float(self.member_weights.get(name, 1.0))
            total = total + w * (scores - center) / scale
            weight_sum += w
        return total / weight_sum

    def confidence(self, X: pd.DataFrame) -> np.ndarray:
        """Share of members (0..1) whose own threshold flags each row."""
        votes = [m.score_samples(X) > m.threshold_ for m in self.members_.values()]
        return np.mean(votes, axis=0)

    def params(self) -> dict:
        return {**super().params(), "members": ",".join(self.members_), "excluded": str(self.excluded_)}
