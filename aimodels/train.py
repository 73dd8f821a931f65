"""Training utilities shared by every chapter: seeding, device choice and timing."""

from __future__ import annotations

import os
import random
import time
from types import TracebackType

import numpy as np
import torch


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and PyTorch's random number generators.

    Call it at the top of a notebook so that every run gives the same numbers.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    """The best available device: a CUDA GPU if there is one, else Apple's MPS, else the CPU.

    The course never requires a GPU; it uses one when present.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Timer:
    """Wall-clock timer used as a context manager.

    >>> with Timer() as t:
    ...     _ = sum(range(1000))
    >>> t.seconds >= 0
    True
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._start


def _global_grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    clip_grad_norm: float | None = None,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Minibatch training loop on in-memory tensors; returns per-epoch history.

    Each epoch shuffles the data with its own seeded generator, so two runs with the
    same seed see the same batches. The history holds the mean training ``loss`` and
    the mean global gradient norm (``grad_norm``, before clipping) of each epoch.
    ``clip_grad_norm`` rescales gradients whose global norm exceeds it.
    """
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X and y must have the same length, got {X.shape[0]} and {y.shape[0]}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    model.train()
    for _ in tqdm(range(epochs), disable=not progress, desc="epochs"):
        order = torch.randperm(X.shape[0], generator=generator)
        total_loss, total_norm, batches = 0.0, 0.0, 0
        for start in range(0, X.shape[0], batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            total_norm += _global_grad_norm(model)
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            total_loss += loss.item() * len(idx)
            batches += 1
        history["loss"].append(total_loss / X.shape[0])
        history["grad_norm"].append(total_norm / batches)
    return history


@torch.no_grad()
def accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of examples whose largest output is the true class."""
    was_training = model.training
    model.eval()
    predictions = model(X).argmax(dim=1)
    model.train(was_training)
    return float((predictions == y).float().mean())
