"""What the PyTorch detectors (deep.lstm_ae, transformer.patchtst) share: seeded, deterministic
blocks and pickling of a fitted network. Django-free, and free of the other detection.ml modules
(so that each detector module imports on its own); torch is imported inside the functions."""
from __future__ import annotations


class TorchState:
    """Pickling for a detector whose fitted network is model_: the network is a class local to a
    factory function (torch is imported lazily), so the model artifact stores its weights and
    _network() rebuilds it on load, on the CPU unless CUDA is there."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            import io

            import torch

            buffer = io.BytesIO()
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
            state["model_state_"] = buffer.getvalue()
        return state

    def __setstate__(self, state: dict) -> None:
        packed = state.pop("model_state_", None)
        self.__dict__.update(state)
        if packed is not None:
            import io

            import torch

            blob = packed[1] if isinstance(packed, tuple) else packed  # (n_features, blob) before 2026-11-21
            self.device_ = "cuda" if torch.cuda.is_available() else "cpu"
            self.model_ = self._network()
            self.model_.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
            self.model_.to(self.device_).eval()

    def _network(self):
        """A fresh, untrained network shaped like the fitted one."""
        raise NotImplementedError


class deterministic:
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


def fit_network(model, inputs, targets=None, *, loss, epochs: int, batch: int, learning_rate: float,
                seed: int, device: str) -> list[float]:
    """Train `model` with Adam on inputs (numpy, samples first) against targets (numpy; None: the
    inputs themselves, an autoencoder), in seeded shuffled mini-batches of `batch`; loss(output,
    target) -> scalar tensor. Returns the mean loss of each epoch. Call it inside deterministic(seed),
    which also seeds the model's initial weights."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    x = torch.from_numpy(inputs).to(device)
    y = x if targets is None else torch.from_numpy(targets).to(device)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            value = loss(model(x[idx]), y[idx])
            value.backward()
            opt.step()
            total += float(value.detach()) * len(idx)
        losses.append(total / len(x))
    return losses
