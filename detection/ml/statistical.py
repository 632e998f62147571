"""Statistical, forecast-based and kernel detectors behind the registry's one interface. Django-free.

Every detector here reuses AnomalyDetector's pre-flight checks, median imputation, near-constant
filter and threshold (the training-score quantile at 1 - contamination); each replaces only the
scoring model. Univariate methods (multivariate = False) treat every feature column as its own
series and score a row by the largest per-column score, each column in units of its own training
spread, so one abnormal metric is enough.

Sequential detectors (windowed_gaussian, stl_residual, forecast, novelty.nn_novelty, deep.lstm_ae
and transformer.patchtst) read the rows in the order given (time order per device, as the pipeline
passes them). A frame with a device column (detectors.SEQUENCE_KEY, which the pipeline's
model_inputs adds; never a feature) is read as one series per device: each run of consecutive rows
of one device is scored on its own, so no window, trend, forecast or neighbour search reaches into
another device's rows. A frame without it is one series, scored exactly as before per-device reading
existed. score_samples(X) on the very rows that trained (or on a frame, or a device's rows, that
starts with them) runs from the start of those training rows; on any other frame the tail of the
training rows is prepended as history, so the first scored rows are compared with the recent past,
not with nothing: per device, the device's own tail (at most HISTORY rows, fewer on a large fleet:
detectors.history_rows keeps HISTORY_BUDGET rows over all devices, at least HISTORY_FLOOR each); a
device that training never saw starts without history, as a new series. The parameters fitted on the
training rows (spreads, Holt's weights, STL's profile) are shared by the devices: see each
detector's _fit_series for what per-device reading changes there. Nothing looks ahead: the score of
row t reads rows up to t only.

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

from typing import NamedTuple

import numpy as np
import pandas as pd

from .detectors import SEQUENCE_KEY, DetectorError, history_rows, register_detector, sequence_blocks
from .features import robust_center_scale
from .suite import _SPREAD_FLOOR, _is_head, _MatrixDetector, _starts_with, floored_center_scale

_CONTAMINATION = {"contamination": {"default": 0.03, "min": 0.001, "max": 0.5}}


class _DevicePast(NamedTuple):
    """What a sequential detector keeps of one device's training rows: the first row (index label,
    imputed values), to recognise a frame that starts with them, how many rows trained, and the
    imputed tail, prepended as history to the device's other frames."""

    label: object
    head: np.ndarray
    rows: int
    tail: np.ndarray


class _SequentialDetector(_MatrixDetector):
    """Base of the detectors that read each column as a series in row order.

    With a SEQUENCE_KEY column in the training frame, each device block is its own series (see the
    module docstring) and pasts_ holds {device: _DevicePast}; without it, pasts_ is None and the
    frame is one series. Subclasses implement _fit_series(matrix, spans) and
    _score_series(seq, start), and _score_block(seq, start, position) when a device's series needs
    more than the rows (its phase, its starting level)."""

    multivariate = False
    streaming = True
    HISTORY = 1000  # training rows kept as history for frames that do not start with them
    WARMUP_ROWS = 20  # a device's first training rows, which do not set the threshold (_fit_threshold)

    def _fit_model(self, X: pd.DataFrame) -> None:
        matrix = self._imputed(X)
        self.train_head_ = (X.index[0], matrix[0].copy())
        # The last training rows as one series' history: what a frame without SEQUENCE_KEY reads.
        self.history_ = matrix[-self.HISTORY:]
        blocks = sequence_blocks(X)
        self.pasts_ = None if blocks is None else self._pasts(X, matrix, blocks)
        if blocks is None:
            self._fit_series(matrix)
        else:
            self._fit_series(matrix, [(a, b) for _, a, b in blocks])

    def _pasts(self, X: pd.DataFrame, matrix: np.ndarray, blocks) -> dict:
        """{device: _DevicePast}. A device whose rows come in several runs keeps the first run's head,
        the last run's tail and the rows of all; each tail is cut to history_rows(HISTORY, devices)."""
        keep = history_rows(self.HISTORY, len({key for key, _, _ in blocks}))
        pasts: dict = {}
        for key, a, b in blocks:
            first = pasts.get(key)
            label, head, rows = (first.label, first.head, first.rows) if first else (X.index[a], matrix[a].copy(), 0)
            pasts[key] = _DevicePast(label, head, rows + b - a, matrix[max(a, b - keep):b].copy())
        return pasts

    def _fit_series(self, matrix: np.ndarray, spans: list[tuple[int, int]] | None = None) -> None:
        """Fit on the imputed training rows; spans: [(start, stop)] of each device's rows, None for
        one series."""
        raise NotImplementedError

    def _score_series(self, seq: np.ndarray, start: int) -> np.ndarray:
        """Scores, rows of seq x columns, of one series whose rows before `start` are history."""
        raise NotImplementedError

    def _score_block(self, seq: np.ndarray, start: int, position: int) -> np.ndarray:
        """As _score_series, for one device's series: seq[0] is the device's row `position` counted
        from its first training row (0 for a device training never saw)."""
        return self._score_series(seq, start)

    def _fit_threshold(self, X: pd.DataFrame) -> float:
        """The training-score quantile at 1 - contamination. Per device, a device's first WARMUP_ROWS
        training rows are left out (while any device has more): they are scored with little or no
        past (a short window, no neighbour yet), so they stand out by construction and would lift
        the threshold. Measured on C-MAPSS (50 training cycles per engine): with them,
        windowed_gaussian and nn_novelty never alarmed on 92-93 of the 100 engines. Above
        THRESHOLD_SAMPLE training rows X is a random sample (fit's _threshold_rows), whose rows have
        no position in their device's series: the plain quantile then."""
        if getattr(self, "pasts_", None) is None or self.training_rows_ > self.THRESHOLD_SAMPLE:
            return super()._fit_threshold(X)
        scores = self.score_samples(X)
        position = X.groupby(X[SEQUENCE_KEY].to_numpy(), sort=False).cumcount().to_numpy()
        settled = position >= self.WARMUP_ROWS
        return float(np.quantile(scores[settled] if settled.any() else scores, 1 - self.config.contamination))

    def _sequence(self, X: pd.DataFrame) -> tuple[np.ndarray, int]:
        """(history + rows, where the rows start). No history when X starts with the training rows."""
        matrix = self._imputed(X)
        if _starts_with(X, matrix, self.train_head_):
            return matrix, 0
        return np.vstack([self.history_, matrix]), len(self.history_)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        pasts = getattr(self, "pasts_", None)  # None too for a model pickled before per-device pasts
        blocks = sequence_blocks(X) if pasts is not None else None
        if blocks is None:
            seq, start = self._sequence(X)
            return np.max(self._score_series(seq, start), axis=1)[start:]
        matrix = self._imputed(X)
        out = np.empty(len(X))
        for key, a, b in blocks:
            rows, past = matrix[a:b], pasts.get(key)
            if past is None:  # a device training never saw: no history, a series of its own from here
                seq, start, position = rows, 0, 0
            elif _is_head(X.index[a], rows[0], (past.label, past.head)):
                seq, start, position = rows, 0, 0
            else:
                seq, start, position = np.vstack([past.tail, rows]), len(past.tail), past.rows - len(past.tail)
            out[a:b] = np.max(self._score_block(seq, start, position), axis=1)[start:]
        return out


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

    def _fit_series(self, matrix: np.ndarray, spans: list[tuple[int, int]] | None = None) -> None:
        # The floor keeps a flat stretch from turning the next small wiggle into a huge z. Per
        # device it is a tenth of the spread within devices (each about its own mean): the spread
        # between their levels says nothing about one device's wiggles. The starting mean and spread
        # are the fleet's: a device's first MIN_PERIODS rows, before it has a spread of its own,
        # are read against them.
        within = matrix if spans is None else np.vstack([matrix[a:b] - matrix[a:b].mean(axis=0) for a, b in spans])
        self.floor_ = 0.1 * np.maximum(within.std(axis=0), 1e-9)
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
    hyperparameters = {**_CONTAMINATION, **_SPREAD_FLOOR, "period": {"default": 0, "min": 0, "max": 10000}}

    def __init__(self, config=None, *, period: int | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.period = period

    def _fit_series(self, matrix: np.ndarray, spans: list[tuple[int, int]] | None = None) -> None:
        from statsmodels.tsa.seasonal import STL

        self.train_rows_ = len(matrix)
        # Per device, the period and the seasonal profile come from the longest device's rows (the
        # first on a tie): a profile fitted across devices would put a device boundary inside a
        # season. Each device's phase is then counted from its own first training row.
        first, last = max(spans, key=lambda s: s[1] - s[0]) if spans else (0, len(matrix))
        series = matrix[first:last]
        n = len(series)
        self.profiles_, self.periods_ = [], []
        for j in range(series.shape[1]):
            x = series[:, j]
            period, strength = (self.period, 1.0) if self.period else _dominant_period(x, min(self.MAX_PERIOD, n // 2))
            if period and period >= 2 and n >= 2 * period and strength >= self.MIN_ACF:
                fit = STL(x, period=int(period), robust=True).fit()
                profile = np.asarray(fit.seasonal[-period:])
                # phase of row t (counted from the series' first training row) is t % period
                profile = np.roll(profile, (n - period) % period)
            else:
                period, profile = 1, np.zeros(1)
            self.periods_.append(int(period))
            self.profiles_.append(profile)
        # The spread of the residuals as scoring computes them (causal trend), not of STL's own
        # in-sample residuals, which are smaller and would inflate every score.
        self.scales_ = np.ones(matrix.shape[1])
        residuals = self._score_series(matrix, 0) if spans is None else np.vstack(
            [self._score_block(matrix[a:b], 0, 0) for a, b in spans])
        # The residuals of a zero-inflated metric are zero-inflated too: suite.spread_floor.
        self.scales_ = floored_center_scale(residuals, self.config.spread_floor)[1]

    def _score_series(self, seq: np.ndarray, start: int) -> np.ndarray:
        # position of seq[0] from the first training row
        return self._score_block(seq, start, self.train_rows_ - start if start else 0)

    def _score_block(self, seq: np.ndarray, start: int, position: int) -> np.ndarray:
        pos = np.arange(len(seq)) + position
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
    hyperparameters = {**_CONTAMINATION, **_SPREAD_FLOOR, "trend": {"default": False, "choices": [False, True]}}

    def __init__(self, config=None, *, trend: bool = False, **kwargs):
        super().__init__(config, **kwargs)
        self.trend = bool(trend)

    def _fit_series(self, matrix: np.ndarray, spans: list[tuple[int, int]] | None = None) -> None:
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
        # Holt's smoothing weights are fitted on all training rows, devices one after the other
        # (pooled); the training errors, hence sigma_, are each device's own, from its own level.
        errors = self._errors(matrix) if spans is None else np.vstack(
            [self._errors(matrix[a:b], self._level_at(matrix[a])) for a, b in spans])
        self.sigma_ = np.maximum(floored_center_scale(errors, self.config.spread_floor)[1], 1e-9)

    def _level_at(self, first: np.ndarray) -> np.ndarray:
        """The starting level of a device's series whose first row is `first`: the fitted initial
        level, moved by as much as that row differs from the first training row, so that every
        device starts from its own level (the first training device from the fitted one)."""
        return self.level0_ + (first - self.train_head_[1])

    def _errors(self, seq: np.ndarray, level: np.ndarray | None = None) -> np.ndarray:
        """One-step-ahead forecast errors, rows x columns, the recursion vectorised over columns,
        from `level` (default: the fitted initial level)."""
        level = (self.level0_ if level is None else level).copy()
        slope = self.slope0_.copy()
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
        return self._scores(np.abs(self._errors(seq)))

    def _score_block(self, seq: np.ndarray, start: int, position: int) -> np.ndarray:
        return self._scores(np.abs(self._errors(seq, self._level_at(seq[0]))))

    def _scores(self, errors: np.ndarray) -> np.ndarray:
        """The scores of absolute forecast errors (rows x columns)."""
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


from . import deep, novelty, transformer  # noqa: E402,F401  (register lstm_ae, nn_novelty, patchtst: _SequentialDetectors)
