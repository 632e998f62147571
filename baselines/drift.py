"""Drift between a reference sample (the active baseline version's training window) and a current one
(recent telemetry). Django-free: pandas/numpy in, dataclasses out.

Tests per feature:
- continuous: the two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp; statistic D = the largest
  gap between the two empirical CDFs) and the Population Stability Index.
- categorical: Pearson's chi-square test of homogeneity on the category counts
  (scipy.stats.chi2_contingency) with Cramer's V as the effect size.

PSI (Siddiqi, "Credit Risk Scorecards", 2006; Yurdakul, "Statistical properties of the population
stability index", 2018): sum over bins of (c - r) * ln(c / r), where r and c are the reference and current
shares per bin. Bins are quantile bins of the *reference*: the interior edges are its 1/n .. (n-1)/n
quantiles (duplicates from ties dropped), the outer bins are open (-inf, +inf), so every current value
falls in a bin. Empty shares are floored at PSI_EPSILON so the log stays finite. Rule of thumb: PSI < 0.1
stable, 0.1-0.25 moderate shift, > 0.25 significant shift.

With thousands of rows a KS or chi-square p-value is tiny for any shift at all, so a feature only counts
as drifting when the p-value is below alpha AND the effect size (D, Cramer's V) or the PSI passes its
threshold.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

PSI_EPSILON = 1e-4
OK, WARNING, DRIFT = "ok", "warning", "drift"
_RANK = {OK: 0, WARNING: 1, DRIFT: 2}


@dataclass(frozen=True)
class DriftThresholds:
    """Where a feature turns warning or drift. psi_*: PSI; ks_*: KS statistic D; v_*: Cramer's V.
    alpha: the p-value a test must be below. drift_share: the share of features that must drift for the
    overall status to be drift (at least one)."""

    alpha: float = 0.01
    psi_warning: float = 0.1
    psi_drift: float = 0.25
    ks_warning: float = 0.1
    ks_drift: float = 0.2
    v_warning: float = 0.1
    v_drift: float = 0.2
    drift_share: float = 0.2
    bins: int = 10
    min_rows: int = 30

    @classmethod
    def from_config(cls, config: dict | None) -> "DriftThresholds":
        """Thresholds with the keys of config (e.g. settings.VIGIL_ALERTS["drift"]) that name a field."""
        known = {k: v for k, v in (config or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's result. statistic: KS D (continuous) or chi-square (categorical); effect: D or
    Cramer's V; psi: None for categorical features."""

    feature: str
    kind: str  # "continuous" | "categorical"
    test: str  # "ks" | "chi2"
    statistic: float | None
    p_value: float | None
    effect: float | None
    psi: float | None
    status: str
    n_reference: int
    n_current: int
    note: str = ""


@dataclass(frozen=True)
class DriftResult:
    """All features' results and the overall status (ok / warning / drift)."""

    status: str
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def drifting(self) -> list[str]:
        return [f.feature for f in self.features if f.status == DRIFT]

    def as_dicts(self) -> list[dict]:
        return [{k: _finite(v) for k, v in asdict(f).items()} for f in self.features]

    @property
    def summary(self) -> str:
        counts = {s: sum(f.status == s for f in self.features) for s in (DRIFT, WARNING)}
        if not self.features:
            return "no features compared"
        return (f"{counts[DRIFT]} of {len(self.features)} features drifting, {counts[WARNING]} warning"
                + (f": {', '.join(self.drifting[:5])}" if self.drifting else ""))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(values) -> np.ndarray:
    array = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    return array[np.isfinite(array)]


def psi(reference, current, *, bins: int = 10) -> float:
    """Population Stability Index of current against reference (1-D numbers; NaN/inf dropped).

    Quantile bins of reference (see the module docstring), shares floored at PSI_EPSILON.
    Raises ValueError when either sample is empty after dropping NaN, or bins < 2.
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    ref, cur = _clean(reference), _clean(current)
    if ref.size == 0 or cur.size == 0:
        raise ValueError(f"psi needs values in both samples (reference {ref.size}, current {cur.size})")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate(([-np.inf], edges, [np.inf]))
    r = np.histogram(ref, edges)[0] / ref.size
    c = np.histogram(cur, edges)[0] / cur.size
    r, c = np.maximum(r, PSI_EPSILON), np.maximum(c, PSI_EPSILON)
    return float(np.sum((c - r) * np.log(c / r)))


def _grade(value: float | None, warning: float, drift: float) -> str:
    if value is None or not math.isfinite(value):
        return OK
    return DRIFT if value >= drift else WARNING if value >= warning else OK


def continuous_drift(name: str, reference, current, thresholds: DriftThresholds = DriftThresholds()
                     ) -> FeatureDrift:
    """KS test and PSI of one numeric feature (1-D samples of any length; NaN dropped).

    Status: the worse of PSI's grade and KS's (KS only counts when p < alpha). Fewer than
    thresholds.min_rows values in either sample gives status ok with a note, not an error.
    """
    from scipy.stats import ks_2samp

    ref, cur = _clean(reference), _clean(current)
    if min(ref.size, cur.size) < thresholds.min_rows:
        return FeatureDrift(name, "continuous", "ks", None, None, None, None, OK, int(ref.size), int(cur.size),
                            note=f"too few values (need {thresholds.min_rows} in each sample)")
    test = ks_2samp(ref, cur)
    d, p = float(test.statistic), float(test.pvalue)
    value = psi(ref, cur, bins=thresholds.bins)
    ks_status = _grade(d, thresholds.ks_warning, thresholds.ks_drift) if p < thresholds.alpha else OK
    status = max(ks_status, _grade(value, thresholds.psi_warning, thresholds.psi_drift), key=_RANK.get)
    return FeatureDrift(name, "continuous", "ks", d, p, d, value, status, int(ref.size), int(cur.size))


def categorical_drift(name: str, reference, current, thresholds: DriftThresholds = DriftThresholds()
                      ) -> FeatureDrift:
    """Chi-square test of homogeneity of one categorical feature (1-D samples of labels; NaN and "" dropped),
    graded by Cramer's V when p < alpha. A category seen in only one sample still counts (its other cell is 0).
    """
    from scipy.stats import chi2_contingency

    ref = pd.Series(reference, dtype="object").dropna().astype(str)
    cur = pd.Series(current, dtype="object").dropna().astype(str)
    ref, cur = ref[ref != ""], cur[cur != ""]
    if min(len(ref), len(cur)) < thresholds.min_rows:
        return FeatureDrift(name, "categorical", "chi2", None, None, None, None, OK, len(ref), len(cur),
                            note=f"too few values (need {thresholds.min_rows} in each sample)")
    table = pd.concat([ref.value_counts(), cur.value_counts()], axis=1).fillna(0).to_numpy().T
    if table.shape[1] < 2:
        return FeatureDrift(name, "categorical", "chi2", 0.0, 1.0, 0.0, None, OK, len(ref), len(cur),
                            note="one category in both samples")
    chi2, p, _, _ = chi2_contingency(table)
    v = math.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))
    status = _grade(v, thresholds.v_warning, thresholds.v_drift) if p < thresholds.alpha else OK
    return FeatureDrift(name, "categorical", "chi2", float(chi2), float(p), v, None, status, len(ref), len(cur))


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, *, continuous: list[str],
                 categorical: list[str] = (), thresholds: DriftThresholds = DriftThresholds()) -> DriftResult:
    """Compare every listed column of current (rows x columns) with reference (rows x columns).

    Overall status: drift when at least max(1, ceil(drift_share * n_features)) features drift, warning
    when any feature is warning or drift, else ok. Raises ValueError naming a listed column that is
    missing from either frame.
    """
    for frame_name, frame in (("reference", reference), ("current", current)):
        missing = [c for c in (*continuous, *categorical) if c not in frame.columns]
        if missing:
            raise ValueError(f"{frame_name} has no column(s) {missing}")
    results = [continuous_drift(c, reference[c], current[c], thresholds) for c in continuous]
    results += [categorical_drift(c, reference[c], current[c], thresholds) for c in categorical]
    n_drift = sum(f.status == DRIFT for f in results)
    needed = max(1, math.ceil(thresholds.drift_share * len(results)))
    if results and n_drift >= needed:
        status = DRIFT
    elif any(f.status != OK for f in results):
        status = WARNING
    else:
        status = OK
    return DriftResult(status=status, features=results)
