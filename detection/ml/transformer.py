"""PatchTST-style forecasting transformer detector (PyTorch). Django-free; torch is imported inside
the functions.

Method (Nie et al., "A Time Series is Worth 64 Words: Long-term Forecasting with Transformers",
ICLR 2023): each feature column is its own univariate series (channel independence: one network,
shared by the columns). The `context` values before row t (default 64) are normalised by their own
mean and standard deviation (reversible instance normalisation, Kim et al., ICLR 2022), cut into
overlapping patches (length 8, stride 4: 15 patches), each patch embedded linearly with a learnt
position, passed through a small Transformer encoder (2 layers, 4 heads, width 32) and flattened
into a linear head that forecasts the value at t, which is then de-normalised. The anomaly score of
a row is its largest absolute one-step forecast error over the columns, each in units of that
column's robust spread of training errors (1.4826 * MAD): above about 3, the row is far outside
what the model forecast on normal data. The score of row t reads rows up to t only.

As a _SequentialDetector it reads each device's rows as a series of their own (statistical module
docstring): the context never reaches into another device's rows; a device's first rows, and a
device training never saw, are padded with the series' first value.

Small on purpose (at most 4,096 training windows, 12 epochs) so that it trains in seconds on a
CPU; it runs on CUDA when available. With the same seed the scores are the same (torch_support.deterministic).
"""
from __future__ import annotations

import numpy as np

from .detectors import DetectorError, register_detector
from .features import robust_center_scale
from .statistical import _CONTAMINATION, _SequentialDetector
from .torch_support import TorchState, deterministic, fit_network


@register_detector("patchtst")
class PatchTSTDetector(TorchState, _SequentialDetector):
    """One-step forecast error of a channel-independent patch transformer; see the module docstring."""

    family = "deep learning"
    # Measured on NAB, SKAB and C-MAPSS it scored below the forecast and LSTM detectors (README,
    # "A forecasting transformer"), so `evaluate --detector all` leaves it out.
    experimental = True
    CONTEXT = 64
    PATCH = 8
    STRIDE = 4
    D_MODEL = 32
    HEADS = 4
    LAYERS = 2
    EPOCHS = 12
    BATCH = 128
    MAX_TRAIN_WINDOWS = 4096
    LEARNING_RATE = 2e-3
    CLIP = 20.0  # scaled values (units of the column's training spread) are clipped to +-CLIP
    SCORE_BATCH = 16_384
    # Errors are in units of the column's training spread; a column whose training errors are nearly
    # all 0 (a quantised, mostly flat signal) would otherwise turn any step into an extreme score.
    SIGMA_FLOOR = 0.05
    hyperparameters = {**_CONTAMINATION,
                       "context": {"default": 64, "min": 16, "max": 512},
                       "epochs": {"default": 12, "min": 1, "max": 200}}

    def __init__(self, config=None, *, context: int | None = None, epochs: int | None = None,
                 device: str | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.context = int(context or self.CONTEXT)
        self.epochs = int(epochs or self.EPOCHS)
        self.device = device
        if self.context < 2 * self.PATCH or self.context % self.STRIDE:
            raise DetectorError(f"context must be at least {2 * self.PATCH} and a multiple of {self.STRIDE}; "
                                f"got {self.context}")
        if self.epochs < 1:
            raise DetectorError(f"epochs must be at least 1; got {self.epochs}")

    # -- data ---------------------------------------------------------------------------------
    def _scaled(self, matrix: np.ndarray) -> np.ndarray:
        return np.clip((matrix - self.center_) / self.spread_, -self.CLIP, self.CLIP).astype(np.float32)

    def _windows(self, scaled: np.ndarray, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(contexts, targets) for rows start.. of one series (rows x columns, scaled): contexts
        (rows * columns) x context, the values before each row (padded with the first row), and
        targets (rows * columns,), row-major (row, then column)."""
        from numpy.lib.stride_tricks import sliding_window_view

        padded = np.vstack([np.repeat(scaled[:1], self.context, axis=0), scaled])
        # windows[i] holds padded rows i..i+context-1, the context of scaled row i.
        windows = sliding_window_view(padded[:-1], self.context, axis=0)[start:]
        return (np.ascontiguousarray(windows).reshape(-1, self.context),
                np.ascontiguousarray(scaled[start:]).reshape(-1))

    # -- fitting ------------------------------------------------------------------------------
    def _fit_series(self, matrix: np.ndarray, spans: list[tuple[int, int]] | None = None) -> None:
        import torch

        self.center_, self.spread_ = robust_center_scale(matrix)
        scaled = self._scaled(matrix)
        spans = spans or [(0, len(matrix))]
        contexts, targets = zip(*(self._windows(scaled[a:b]) for a, b in spans))
        contexts, targets = np.concatenate(contexts), np.concatenate(targets)
        if len(targets) < self.BATCH:
            raise DetectorError(f"the patch transformer needs at least {self.BATCH} training values, "
                                f"got {len(targets)}")
        rng = np.random.default_rng(self.config.random_state)
        if len(targets) > self.MAX_TRAIN_WINDOWS:
            pick = np.sort(rng.choice(len(targets), self.MAX_TRAIN_WINDOWS, replace=False))
            contexts, targets = contexts[pick], targets[pick]
        self.device_ = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        with deterministic(self.config.random_state):
            self.model_ = self._network().to(self.device_)
            self.losses_ = fit_network(
                self.model_, contexts, targets, loss=torch.nn.functional.smooth_l1_loss, epochs=self.epochs,
                batch=self.BATCH, learning_rate=self.LEARNING_RATE, seed=self.config.random_state,
                device=self.device_)
        self.model_.eval()
        errors = np.vstack([self._errors(scaled[a:b]) for a, b in spans])
        self.sigma_ = np.maximum(robust_center_scale(errors)[1], self.SIGMA_FLOOR)

    def _network(self):
        return _patch_transformer(self.context, self.PATCH, self.STRIDE, self.D_MODEL, self.HEADS,
                                  self.LAYERS)

    # -- scoring ------------------------------------------------------------------------------
    def _errors(self, scaled: np.ndarray, start: int = 0) -> np.ndarray:
        """One-step forecast errors, (rows - start) x columns, of a scaled series."""
        import torch

        contexts, targets = self._windows(scaled, start)
        forecast = np.empty(len(targets), dtype=np.float32)
        with deterministic(self.config.random_state), torch.no_grad():
            for i in range(0, len(targets), self.SCORE_BATCH):
                batch = torch.from_numpy(contexts[i:i + self.SCORE_BATCH]).to(self.device_)
                forecast[i:i + self.SCORE_BATCH] = self.model_(batch).cpu().numpy()
        return (targets - forecast).reshape(-1, scaled.shape[1]).astype(np.float64)

    def _score_series(self, seq: np.ndarray, start: int) -> np.ndarray:
        # Rows before `start` are history: they are context, never scored (the caller drops them).
        scores = np.zeros(seq.shape, dtype=np.float64)
        scores[start:] = np.abs(self._errors(self._scaled(seq), start)) / self.sigma_
        return scores

    def params(self) -> dict:
        return {**super().params(), "context": self.context, "epochs": self.epochs}


def _patch_transformer(context: int, patch: int, stride: int, d_model: int, heads: int, layers: int):
    import torch
    from torch import nn

    n_patches = (context - patch) // stride + 1

    class PatchTransformer(nn.Module):
        """batch x context -> batch: the next value, forecast from instance-normalised patches."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(patch, d_model)
            self.position = nn.Parameter(torch.zeros(1, n_patches, d_model))
            nn.init.normal_(self.position, std=0.02)
            layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(n_patches * d_model, 1)

        def forward(self, x):
            mean = x.mean(dim=1, keepdim=True)
            std = x.std(dim=1, keepdim=True).clamp_min(0.1)
            patches = ((x - mean) / std).unfold(1, patch, stride)  # batch x n_patches x patch
            h = self.encoder(self.embed(patches) + self.position)
            return self.head(h.flatten(1)).squeeze(1) * std.squeeze(1) + mean.squeeze(1)

    return PatchTransformer()
