"""LSTM autoencoder detector (PyTorch). Django-free; torch is imported inside the functions.

Method (Malhotra et al., "LSTM-based Encoder-Decoder for Multi-sensor Anomaly Detection", ICML
workshop 2016): sliding windows of `window` rows (default 30) of the robustly scaled, clipped
features are encoded by an LSTM into its last hidden state, decoded back by a second LSTM, and the
model learns to reconstruct the training windows (mean squared error, Adam). The score of row t is
the reconstruction error of the window that ends at t, so it reads rows up to t only; rows with
fewer than `window` predecessors are padded with the training tail (or the series' first row).

As a statistical._SequentialDetector it reads each device's rows (detectors.SEQUENCE_KEY) as a
series of their own: no training or scoring window spans two devices, a device's frames after
training continue from its own last training rows, and a device training never saw starts padded
with its first row. A frame without the key is one series, scored as before per-device reading.

Small on purpose (hidden 16, at most 512 training windows, 3 epochs) so that it
trains in seconds on a CPU; it runs on CUDA when available. With the same seed the scores are the
same: torch.manual_seed, deterministic algorithms and one fixed thread count.
"""
from __future__ import annotations

import numpy as np

from .detectors import DetectorError, register_detector
from .features import robust_center_scale
from .statistical import _SequentialDetector
from .torch_support import TorchState, deterministic, fit_network


@register_detector("lstm_ae")
class LSTMAutoencoderDetector(TorchState, _SequentialDetector):
    """Reconstruction error of an LSTM autoencoder over sliding windows; see the module docstring."""

    family = "deep learning"
    multivariate = True  # one reconstruction error per row, from every column at once
    streaming = True
    WINDOW = 30
    HIDDEN = 16
    EPOCHS = 3
    BATCH = 64
    MAX_TRAIN_WINDOWS = 512
    LEARNING_RATE = 1e-2
    CLIP = 10.0
    hyperparameters = {
        "contamination": {"default": 0.03, "min": 0.001, "max": 0.5},
        "window": {"default": 30, "min": 2, "max": 500},
        "hidden": {"default": 16, "min": 2, "max": 256},
        "epochs": {"default": 3, "min": 1, "max": 200},
    }

    def __init__(self, config=None, *, window: int | None = None, hidden: int | None = None,
                 epochs: int | None = None, device: str | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.window = int(window or self.WINDOW)
        self.hidden = int(hidden or self.HIDDEN)
        self.epochs = int(epochs or self.EPOCHS)
        self.device = device
        self.HISTORY = self.window - 1  # rows of the past a frame after training needs
        if self.window < 2 or self.hidden < 1 or self.epochs < 1:
            raise DetectorError(f"window must be >= 2, hidden and epochs >= 1; got {self.window}, "
                                f"{self.hidden}, {self.epochs}")

    def _scaled(self, matrix: np.ndarray) -> np.ndarray:
        return np.clip((matrix - self.center_) / self.spread_, -self.CLIP, self.CLIP).astype(np.float32)

    def _windows(self, seq: np.ndarray) -> np.ndarray:
        """rows x window x features: the window ending at each row of seq[window-1:]."""
        from numpy.lib.stride_tricks import sliding_window_view

        return np.ascontiguousarray(sliding_window_view(seq, self.window, axis=0).transpose(0, 2, 1))

    def _fit_series(self, matrix: np.ndarray, spans: list[tuple[int, int]] | None = None) -> None:
        import torch

        self.center_, self.spread_ = robust_center_scale(matrix)
        seq = self._scaled(matrix)
        # Training windows lie inside one device's rows (a device shorter than the window adds none).
        spans = [(a, b) for a, b in (spans or [(0, len(seq))]) if b - a >= self.window]
        if not spans or sum(b - a for a, b in spans) < self.window + 1:
            raise DetectorError(f"the LSTM autoencoder needs more than window={self.window} training rows "
                                f"in one series, got {len(seq)} rows")
        windows = np.concatenate([self._windows(seq[a:b]) for a, b in spans])
        rng = np.random.default_rng(self.config.random_state)
        if len(windows) > self.MAX_TRAIN_WINDOWS:
            windows = windows[np.sort(rng.choice(len(windows), self.MAX_TRAIN_WINDOWS, replace=False))]
        self.device_ = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        with deterministic(self.config.random_state):
            self.model_ = self._network().to(self.device_)
            self.losses_ = fit_network(
                self.model_, windows, loss=lambda out, target: torch.mean((out - target) ** 2),
                epochs=self.epochs, batch=self.BATCH, learning_rate=self.LEARNING_RATE,
                seed=self.config.random_state, device=self.device_)
        self.model_.eval()

    def _score_series(self, seq: np.ndarray, start: int) -> np.ndarray:
        """The reconstruction error of the window ending at each row from `start` on (rows x 1; 0
        before start). The rows before the series' first `window - 1` are padded with its first row."""
        import torch

        scaled = self._scaled(seq)
        padded = np.vstack([np.repeat(scaled[:1], self.window - 1, axis=0), scaled])
        windows = self._windows(padded[start:])
        out = np.zeros((len(seq), 1), dtype=np.float64)
        with deterministic(self.config.random_state), torch.no_grad():
            for i in range(0, len(windows), 4096):
                batch = torch.from_numpy(windows[i:i + 4096]).to(self.device_)
                # The last step's error weighs most: it is the newest row, the one being scored.
                err = ((self.model_(batch) - batch) ** 2).mean(dim=2)
                rows = slice(start + i, start + i + len(batch))
                out[rows, 0] = (0.5 * err.mean(dim=1) + 0.5 * err[:, -1]).cpu().numpy()
        return out

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "pasts_" not in state:  # pickled before per-device reading: its history_ was scaled
            self.pasts_ = None
            self.history_ = self.history_ * self.spread_ + self.center_
            self.HISTORY = len(self.history_)

    def params(self) -> dict:
        return {**super().params(), "window": self.window, "hidden": self.hidden, "epochs": self.epochs}

    def _network(self):
        return _autoencoder(int(self.center_.shape[0]), self.hidden)


def _autoencoder(n_features: int, hidden: int):
    from torch import nn

    class LSTMAutoencoder(nn.Module):
        """batch x window x features -> same shape: encode to the last hidden state, repeat it over
        the window, decode with a second LSTM and a linear read-out."""

        def __init__(self):
            super().__init__()
            self.encoder = nn.LSTM(n_features, hidden, batch_first=True)
            self.decoder = nn.LSTM(hidden, hidden, batch_first=True)
            self.out = nn.Linear(hidden, n_features)

        def forward(self, x):
            _, (h, _) = self.encoder(x)
            z = h[-1].unsqueeze(1).repeat(1, x.shape[1], 1)
            y, _ = self.decoder(z)
            return self.out(y)

    return LSTMAutoencoder()
