"""Statistical, forecast-based and kernel detectors behind the registry's one interface. Django-free.

Every detector here reuses AnomalyDetector's pre-flight checks, median imputation, near-constant
filter and threshold (the training-score quantile at 1 - contamination); each replaces only the
scoring model. Univariate methods (multivariate = False) treat every feature column as its own
series and score a row by the largest per-column score, each column in units of its own training
spread, so one abnormal metric is enough.

Sequential detectors (windowed_gaussian, stl_residual, forecast) read the rows in the order given
(time order per device, as the pipeline passes them). score_samples(X) on the very rows that
trained (or on a frame that starts with them) runs from the start of the training rows; on any
other frame the tail of the training rows is prepended as history, so the first scored rows are
compared with the recent past, not with nothing. Nothing looks ahead: the score of row t reads
rows up to t only.

- grubbs: iterative Grubbs' test (Grubbs, Technometrics 1969) removes outliers from each training
  column at level alpha; a row's score is its |G| statistic against the cleaned mean and standard
  deviation, divided by the test's critical value (above 1 = Grubbs would reject it).
- windowed_gaussian: NAB's windowed Gaussian (Numenta, NAB detectors/gaussian): each value against
  the mean and standard deviation of the previous `window` values of its column, |z|.
- stl_residual: STL (Cleveland et al., J. Official Statistics 1990; statsmodels.tsa.STL) on the
  training rows gives each column's seasonal profile and residual spread; new values are
  deseasonalised, compared with a trailing median of the deseasonalised past, in robust z-units.
- forecast: Holt's exponential smoothing (statsmodels.tsa.holtwinters, fitted once on the training
  rows; the recursion then runs in numpy, one step at a time): the one-step-ahead forecast error
  in units of the half-width of the training errors' prediction interval (above 1 = outside the
  interval), raised further when the error spikes against the recent errors.
- ocsvm: One-Class SVM (Schoelkopf et al., Neural Computation 2001; scikit-learn) on robustly scaled,
  clipped features with gamma="scale" and nu from the contamination (twice it, at least 0.1), so the RBF kernel neither
  saturates on unscaled data nor on many dimensions; fitted on a seeded sample of at most
  FIT_SAMPLE rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .detectors import DetectorError, register_detector
from .features import robust_center_scale
from .suite import _MatrixDetector

_CONTAMINATION = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5}}


def _spread(x: np.ndarray) -> np.ndarray:
    """Robust spread per column (1.4826 * MAD, floored by features.robust_center_scale)."""
    return robust_center_scale(x)[1]


def _starts_with(X: pd.DataFrame, matrix: np.ndarray, head: tuple) -> bool:
    """Whether X starts with the first training row (same index label and values)."""
    return bool(len(X)) and X.index[0] == head[0] and np.allclose(matrix[0], head[1], equal_nan=True)


class _SequentialDetector(_MatrixDetector):
    """Base of the detectors that read each column as a series in row order."""

    multivariate = False
    streaming = True
    HISTORY = 1000  # training rows kept as history for frames that do not start with them

    def _fit_model(self, X: pd.DataFrame) -> None:
        matrix = self._imputed(X)
        self.train_head_ = (X.index[0], matrix[0].copy())
        self.history_ = matrix[-self.HISTORY:]
        self._fit_series(matrix)

    def _fit_series(self, matrix: np.ndarray) -> None:
        raise NotImplementedError

    def _sequence(self, X: pd.DataFrame) -> tuple[np.ndarray, int]:
        """(history + rows, where the rows start). No history when X starts with the training rows."""
        matrix = self._imputed(X)
        if _starts_with(X, matrix, self.train_head_):
            return matrix, 0
        return np.vstack([self.history_, matrix]), len(self.history_)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        seq, start = self._sequence(X)
        return np.max(self._score_series(seq, start), axis=1)[start:]


@register_detector("grubbs")
class GrubbsDetector(_MatrixDetector):
    """Iterative Grubbs' test per column; see the module docstring."""

    multivariate = False
    streaming = True
    ALPHA = 0.05
    MAX_REMOVED = 0.2  # at most this share of a training column is removed as outliers
    hyperparameters = {**_CONTAMINATION, "alpha": {"default": 0.05, "min": 0.001, "max": 0.2}}

    def __init__(self, config=None, *, alpha: float | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.alpha = self.ALPHA if alpha is None else float(alpha)
        if not 0 < self.alpha < 1:
            raise DetectorError(f"alpha must be in (0, 1), got {self.alpha}")

    @staticmethod
    def critical_value(n: int, alpha: float) -> float:
        """Two-sided Grubbs critical value for n samples at level alpha (n >= 3)."""
        from scipy import stats

        t = stats.t.ppf(1 - alpha / (2 * n), n - 2)
        return float((n - 1) / np.sqrt(n) * np.sqrt(t * t / (n - 2 + t * t)))

    def _fit_model(self, X: pd.DataFrame) -> None:
        x = self._imputed(X)
        self.mean_, self.std_, self.removed_ = np.empty(x.shape[1]), np.empty(x.shape[1]), []
        crit = np.empty(x.shape[1])
        for j in range(x.shape[1]):
            keep = np.sort(x[:, j])
            removed = 0
            # Remove the most extreme value while the test rejects it; sorting lets each step look
            # only at the two ends.
            while len(keep) > 3 and removed < self.MAX_REMOVED * x.shape[0]:
                mean, std = keep.mean(), keep.std(ddof=1)
                if std <= 0:
                    break
                low, high = abs(keep[0] - mean), abs(keep[-1] - mean)
                if max(low, high) / std <= self.critical_value(len(keep), self.alpha):
                    break
                keep = keep[1:] if low > high else keep[:-1]
                removed += 1
            self.removed_.append(removed)
            self.mean_[j] = keep.mean()
            std = keep.std(ddof=1) if len(keep) > 1 else 0.0
            self.std_[j] = std if std > 0 else float(np.std(x[:, j]) + 1e-12)
            crit[j] = self.critical_value(max(len(keep), 3), self.alpha)
        self.critical_ = crit

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        g = np.abs(self._imputed(X) - self.mean_) / self.std_
        return np.max(g / self.critical_, axis=1)

    def params(self) -> dict:
        return {**super().params(), "alpha": self.alpha}


@register_detector("windowed_gaussian")
class WindowedGaussianDetector(_SequentialDetector):
    """NAB's windowed Gaussian: |z| of each value against the previous `window` values."""

    # NAB's own default (detectors/gaussian/windowedGaussian_detector.py, windowSize 6400). On NAB,
    # rank_suppress calibration, the standard score was 60.6 at 500 rows, 64.5 at 2000, 65.8 at 6400.
    WINDOW = 6400
    MIN_PERIODS = 20
    hyperparameters = {**_CONTAMINATION, "window": {"default": 6400, "min": 20, "max": 50000}}

    def __init__(self, config=None, *, window: int | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.window = int(window or self.WINDOW)

    def _fit_series(self, matrix: np.ndarray) -> None:
        # The floor keeps a flat stretch from turning the next small wiggle into a huge z.
        self.floor_ = 0.1 * np.maximum(matrix.std(axis=0), 1e-9)
        self.mean0_, self.std0_ = matrix.mean(axis=0), np.maximum(matrix.std(axis=0), self.floor_)

    def _score_series(self, seq: np.ndarray, start: int) -> np.ndarray:
        frame = pd.DataFrame(seq)
        past = frame.shift(1).rolling(self.window, min_periods=self.MIN_PERIODS)
        mean = past.mean().to_numpy()
        std = past.std().to_numpy()
        mean = np.where(np.isnan(mean), self.mean0_, mean)
        std = np.maximum(np.where(np.isnan(std), self.std0_, std), self.floor_)
        return np.abs(seq - mean) / std

    def params(self) -> dict:
        return {**super().params(), "window": self.window}


def _dominant_period(x: np.ndarray, max_period: int) -> tuple[int, float]:
    """(period, autocorrelation at it) of one series: the lag in [2, max_period], after the
    autocorrelation first turns negative, with the highest autocorrelation; (0, 0.0) when the
    series is too short, flat or never decorrelates (a trend)."""
    if max_period < 2 or len(x) < 2 * max_period or np.std(x) == 0:
        return 0, 0.0
    from statsmodels.tsa.stattools import acf

    r = acf(x, nlags=max_period, fft=True)
    # Neighbouring samples of any smooth series correlate, so the peak is searched only after the
    # autocorrelation first turns negative (the end of the short-lag bump).
    negative = np.flatnonzero(r[1:] < 0)
    if not len(negative):
        return 0, 0.0
    first = int(negative[0]) + 1
    if first + 1 >= len(r):
        return 0, 0.0
    lag = int(np.argmax(r[first:]) + first)
    return (lag, float(r[lag])) if lag >= 2 else (0, 0.0)


@register_detector("stl_residual")
class STLResidualDetector(_SequentialDetector):
    """STL residuals per column; see the module docstring. period None: found from the training
    rows' autocorrelation, also when 0 (kept when it reaches MIN_ACF, otherwise no seasonal part)."""

    MAX_PERIOD = 300
    MIN_ACF = 0.3
    TREND_WINDOW = 25
    hyperparameters = {**_CONTAMINATION, "period": {"default": 0, "min": 0, "max": 10000}}

    def __init__(self, config=None, *, period: int | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.period = period

    def _fit_series(self, matrix: np.ndarray) -> None:
        from statsmodels.tsa.seasonal import STL

        n = len(matrix)
        self.train_rows_ = n
        self.profiles_, self.periods_ = [], []
        for j in range(matrix.shape[1]):
            x = matrix[:, j]
            period, strength = (self.period, 1.0) if self.period else _dominant_period(x, min(self.MAX_PERIOD, n // 2))
            if period and period >= 2 and n >= 2 * period and strength >= self.MIN_ACF:
                fit = STL(x, period=int(period), robust=True).fit()
                profile = np.asarray(fit.seasonal[-period:])
                # phase of row t (counted from the first training row) is t % period
                profile = np.roll(profile, (n - period) % period)
            else:
                period, profile = 1, np.zeros(1)
            self.periods_.append(int(period))
            self.profiles_.append(profile)
        # The spread of the residuals as scoring computes them (causal trend), not of STL's own
        # in-sample residuals, which are smaller and would inflate every score.
        self.scales_ = np.ones(matrix.shape[1])
        self.scales_ = _spread(self._score_series(matrix, 0))

    def _score_series(self, seq: np.ndarray, start: int) -> np.ndarray:
        offset = self.train_rows_ - start if start else 0  # position of seq[0] from the first training row
        pos = np.arange(len(seq)) + offset
        seasonal = np.column_stack([p[pos % k] for p, k in zip(self.profiles_, self.periods_)])
        deseason = pd.DataFrame(seq - seasonal)
        trend = deseason.shift(1).rolling(self.TREND_WINDOW, min_periods=1).median().bfill().to_numpy()
        return np.abs(deseason.to_numpy() - trend) / self.scales_

    def params(self) -> dict:
        return {**super().params(), "period": self.period}


@register_detector("forecast")
class ForecastResidualDetector(_SequentialDetector):
    """Holt's exponential smoothing forecast errors per column; see the module docstring."""

    INTERVAL_Z = 1.96  # 95 % prediction interval
    SPIKE_WINDOW = 30
    hyperparameters = {**_CONTAMINATION, "trend": {"default": False, "choices": [False, True]}}

    def __init__(self, config=None, *, trend: bool = False, **kwargs):
        super().__init__(config, **kwargs)
        self.trend = bool(trend)

    def _fit_series(self, matrix: np.ndarray) -> None:
        import warnings

        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        self.alpha_, self.beta_, self.level0_, self.slope0_, sigma = [], [], [], [], []
        for j in range(matrix.shape[1]):
            x = matrix[:, j]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter on flat stretches
                fit = ExponentialSmoothing(x, trend="add" if self.trend else None,
                                           initialization_method="estimated").fit()
            p = fit.params
            self.alpha_.append(float(np.clip(p["smoothing_level"], 0.01, 1.0)))
            self.beta_.append(float(p.get("smoothing_trend") or 0.0) if self.trend else 0.0)
            self.level0_.append(float(p["initial_level"]))
            self.slope0_.append(float(p.get("initial_trend") or 0.0) if self.trend else 0.0)
            sigma.append(0.0)
        self.alpha_, self.beta_ = np.array(self.alpha_), np.array(self.beta_)
        self.level0_, self.slope0_ = np.array(self.level0_), np.array(self.slope0_)
        errors = self._errors(matrix)
        self.sigma_ = np.maximum(_spread(errors), 1e-9)

    def _errors(self, seq: np.ndarray) -> np.ndarray:
        """One-step-ahead forecast errors, rows x columns, the recursion vectorised over columns."""
        level, slope = self.level0_.copy(), self.slope0_.copy()
        errors = np.empty_like(seq)
        a, b = self.alpha_, self.beta_
        for t in range(len(seq)):
            forecast = level + slope
            errors[t] = seq[t] - forecast
            new_level = forecast + a * errors[t]
            slope = slope + a * b * errors[t]
            level = new_level
        return errors

    def _score_series(self, seq: np.ndarray, start: int) -> np.ndarray:
        errors = np.abs(self._errors(seq))
        interval = errors / (self.INTERVAL_Z * self.sigma_)
        # An error spike: this error against the mean error of the recent past (from the training
        # spread while there is no past yet).
        recent = pd.DataFrame(errors).shift(1).rolling(self.SPIKE_WINDOW, min_periods=5).mean().to_numpy()
        recent = np.where(np.isnan(recent), self.sigma_, np.maximum(recent, 0.1 * self.sigma_))
        spike = errors / (recent * 3.0)
        return np.maximum(interval, np.sqrt(interval * spike))

    def params(self) -> dict:
        return {**super().params(), "trend": self.trend}


@register_detector("ocsvm")
class OneClassSVMDetector(_MatrixDetector):
    """One-Class SVM on robustly scaled, clipped features; see the module docstring."""

    family = "machine learning"
    multivariate = True
    streaming = True
    FIT_SAMPLE = 3000
    CLIP = 10.0  # robust z-units; beyond this the kernel distance says nothing more
    hyperparameters = {**_CONTAMINATION, "nu": {"default": 0.1, "min": 0.1, "max": 0.5, "from": "max(0.1, 2 * contamination)"}}

    def _scaled(self, X: pd.DataFrame) -> np.ndarray:
        return np.clip((self._imputed(X) - self.center_) / self.spread_, -self.CLIP, self.CLIP)

    def _fit_model(self, X: pd.DataFrame) -> None:
        from sklearn.svm import OneClassSVM

        x = self._imputed(X)
        self.center_, self.spread_ = robust_center_scale(x)
        sample = self._sample(np.clip((x - self.center_) / self.spread_, -self.CLIP, self.CLIP), self.FIT_SAMPLE)
        # nu bounds the share of training rows outside the boundary from above and the share of
        # support vectors from below. Exactly the contamination (a few %) leaves so few support
        # vectors, all on the rim, that the kernel sum dips at the centre (a "hole" that scores
        # normal rows as anomalous); twice it, at least 0.1, keeps the interior covered. The
        # threshold is still the training-score quantile at 1 - contamination.
        self.nu_ = float(np.clip(2 * self.config.contamination, 0.1, 0.5))
        self.model_ = OneClassSVM(kernel="rbf", gamma="scale", nu=self.nu_).fit(sample)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        z = self._scaled(X)
        # Far from every support vector the RBF decision saturates at -rho; the mean |z| breaks the
        # tie so that farther rows still score higher.
        return -self.model_.decision_function(z) + 1e-3 * np.abs(z).mean(axis=1)
