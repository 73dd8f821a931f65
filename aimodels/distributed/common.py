"""The model, data and single-process reference that chapter 10 checks every parallelism against.

All of chapter 10's equivalence checks use the same recipe: a small MLP in float64, a
fixed stream of regression batches, and one process training on each whole batch. A
parallel run must give the same losses and weights (`torch.testing.assert_close`).
With the mean-squared-error loss averaged over the batch, the mean of N equal shards'
losses equals the loss of the whole batch, so averaging gradients over ranks is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["mlp", "regression_batches", "rank_rows", "make_optimizer", "train_single",
           "tensor_bytes", "flat_state"]


def mlp(sizes: Sequence[int] = (32, 64, 64, 8), seed: int = 0,
        dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Linear-ReLU-...-Linear with the given layer widths, initialised from `seed`."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {tuple(sizes)}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b, dtype=dtype))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(generator_state)


def regression_batches(steps: int, batch_size: int, in_features: int = 32, out_features: int = 8,
                       seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Inputs [steps, batch, in] and targets [steps, batch, out]: tanh of a fixed random linear
    map, plus noise."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch_size, in_features, generator=generator, dtype=dtype)
    w = torch.randn(in_features, out_features, generator=generator, dtype=dtype)
    w = w / in_features ** 0.5
    y = torch.tanh(x @ w) + 0.1 * torch.randn(steps, batch_size, out_features, generator=generator,
                                              dtype=dtype)
    return x, y


def rank_rows(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's equal share of the rows of `batch` (dim 0): rows rank*b/N to (rank+1)*b/N."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    rows = batch.shape[0]
    if rows % world_size:
        raise ValueError(f"a batch of {rows} rows does not split into {world_size} equal shares; "
                         f"use a batch size divisible by the world size")
    share = rows // world_size
    return batch[rank * share:(rank + 1) * share]


def make_optimizer(params: Iterable[nn.Parameter], name: str = "sgd", lr: float = 0.05
                   ) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 or AdamW (weight decay 0.01): the two the chapter uses."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def train_single(model: nn.Module, x: Tensor, y: Tensor, optimizer: str = "sgd", lr: float = 0.05
                 ) -> tuple[list[float], dict[str, Tensor]]:
    """One process, whole batches: the reference. Returns (loss per step, final state_dict)."""
    opt = make_optimizer(model.parameters(), optimizer, lr)
    losses = []
    for xb, yb in zip(x, y, strict=True):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes that these tensors' elements take (local shards only for DTensors)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def flat_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict with full, plain, detached CPU tensors (DTensors gathered), for comparisons."""
    out = {}
    for k, v in state.items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out
