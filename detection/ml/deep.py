"""LSTM autoencoder detector (PyTorch). Django-free; torch is imported inside the functions.

Method (Malhotra et al., "LSTM-based Encoder-Decoder for Multi-sensor Anomaly Detection", ICML
workshop 2016): sliding windows of `window` rows (default 30) of the robustly scaled, clipped
features are encoded by an LSTM into its last hidden state, decoded back by a second LSTM, and the
model learns to reconstruct the training windows (mean squared error, Adam). The score of row t is
the reconstruction error of the window that ends at t, so it reads rows up to t only; rows with
fewer than `window` predecessors are padded with the training tail (or the first row).

Small on purpose (hidden 16, at most 512 training windows, 3 epochs) so that it
trains in seconds on a CPU; it runs on CUDA when available. With the same seed the scores are the
same: torch.manual_seed, deterministic algorithms and one fixed thread count.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .detectors import DetectorError, register_detector
from .features import robust_center_scale
from .suite import _MatrixDetector, _starts_with


@register_detector("lstm_ae")
class LSTMAutoencoderDetector(_MatrixDetector):
    """Reconstruction error of an LSTM autoencoder over sliding windows; see the module docstring."""

    family = "deep learning"
    multivariate = True
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
        if self.window < 2 or self.hidden < 1 or self.epochs < 1:
            raise DetectorError(f"window must be >= 2, hidden and epochs >= 1; got {self.window}, "
                                f"{self.hidden}, {self.epochs}")

    def _scaled(self, X: pd.DataFrame) -> np.ndarray:
        return np.clip((self._imputed(X) - self.center_) / self.spread_, -self.CLIP, self.CLIP).astype(np.float32)

    def _windows(self, seq: np.ndarray) -> np.ndarray:
        """rows x window x features: the window ending at each row of seq[window-1:]."""
        from numpy.lib.stride_tricks import sliding_window_view

        return np.ascontiguousarray(sliding_window_view(seq, self.window, axis=0).transpose(0, 2, 1))

    def _fit_model(self, X: pd.DataFrame) -> None:
        import torch

        x = self._imputed(X)
        self.center_, self.spread_ = robust_center_scale(x)
        seq = self._scaled(X)
        if len(seq) < self.window + 1:
            raise DetectorError(f"the LSTM autoencoder needs more than window={self.window} training rows, "
                                f"got {len(seq)}")
        self.train_head_ = (X.index[0], self._imputed(X)[0].copy())
        self.history_ = seq[-(self.window - 1):]
        windows = self._windows(seq)
        rng = np.random.default_rng(self.config.random_state)
        if len(windows) > self.MAX_TRAIN_WINDOWS:
            windows = windows[np.sort(rng.choice(len(windows), self.MAX_TRAIN_WINDOWS, replace=False))]
        self.device_ = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        with _deterministic(self.config.random_state):
            self.model_ = _autoencoder(seq.shape[1], self.hidden).to(self.device_)
            opt = torch.optim.Adam(self.model_.parameters(), lr=self.LEARNING_RATE)
            data = torch.from_numpy(windows).to(self.device_)
            gen = torch.Generator().manual_seed(self.config.random_state)
            self.losses_ = []
            for _ in range(self.epochs):
                order = torch.randperm(len(data), generator=gen)
                total = 0.0
                for i in range(0, len(data), self.BATCH):
                    batch = data[order[i:i + self.BATCH].to(self.device_)]
                    opt.zero_grad()
                    loss = torch.mean((self.model_(batch) - batch) ** 2)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(batch)
                self.losses_.append(total / len(data))
        self.model_.eval()

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        import torch

        seq = self._scaled(X)
        if _starts_with(X, self._imputed(X), self.train_head_):
            pad = np.repeat(seq[:1], self.window - 1, axis=0)
        else:
            pad = self.history_
        windows = self._windows(np.vstack([pad, seq]))
        out = np.empty(len(windows), dtype=np.float64)
        with _deterministic(self.config.random_state), torch.no_grad():
            for i in range(0, len(windows), 4096):
                batch = torch.from_numpy(windows[i:i + 4096]).to(self.device_)
                # The last step's error weighs most: it is the newest row, the one being scored.
                err = ((self.model_(batch) - batch) ** 2).mean(dim=2)
                out[i:i + 4096] = (0.5 * err.mean(dim=1) + 0.5 * err[:, -1]).cpu().numpy()
        return out

    def params(self) -> dict:
        return {**super().params(), "window": self.window, "hidden": self.hidden, "epochs": self.epochs}

    # The network is a class local to _autoencoder (torch is imported lazily), so pickling (the
    # model artifact) stores its weights and rebuilds it on load, on the CPU unless CUDA is there.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            import io

            import torch

            buffer = io.BytesIO()
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
            state["model_state_"] = (int(self.center_.shape[0]), buffer.getvalue())
        return state

    def __setstate__(self, state: dict) -> None:
        packed = state.pop("model_state_", None)
        self.__dict__.update(state)
        if packed is not None:
            import io

            import torch

            n_features, blob = packed
            self.device_ = "cuda" if torch.cuda.is_available() else "cpu"
            self.model_ = _autoencoder(n_features, self.hidden)
            self.model_.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
            self.model_.to(self.device_).eval()


class _deterministic:
    """Seed torch, switch on deterministic algorithms and pin the thread count inside the block."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        self.was = torch.are_deterministic_algorithms_enabled()
        torch.manual_seed(self.seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import torch

        torch.use_deterministic_algorithms(self.was)
        torch.set_num_threads(self.threads)
        return False


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
