"""Benchmark: time per step of our from-scratch optimisers against torch.optim (Chapter 2).

Both run side by side in one process on the same model, interleaved over several
rounds, and the report is the ratio of median times, never an absolute time. The
table is written to book/figures/bench_optim.csv, which the book's benchmark page shows.

Run with `make bench`.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from common import write_table

from aimodels import optim

TABLE = "bench_optim.csv"
ROUNDS, STEPS = 7, 50

PAIRS = {
    "SGD": (lambda p: optim.SGD(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.01)),
    "SGD momentum": (
        lambda p: optim.SGD(p, lr=0.01, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    ),
    "RMSProp": (lambda p: optim.RMSProp(p, lr=1e-3), lambda p: torch.optim.RMSprop(p, lr=1e-3)),
    "Adam": (lambda p: optim.Adam(p, lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
}


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def _seconds_per_step(make_optimizer, model: torch.nn.Module) -> float:
    optimizer = make_optimizer(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # warm-up: creates the state
    start = time.perf_counter()
    for _ in range(STEPS):
        optimizer.step()
    return (time.perf_counter() - start) / STEPS


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = _model()
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for name, (ours, reference) in PAIRS.items():
        ours_times, ref_times = [], []
        for _ in range(ROUNDS):  # interleave, so that drifts in machine load hit both
            ours_times.append(_seconds_per_step(ours, model))
            ref_times.append(_seconds_per_step(reference, model))
        ratio = statistics.median(ours_times) / statistics.median(ref_times)
        rows.append({"optimizer": name, "parameters": n_params,
                     "ours / torch.optim (median time per step)": f"{ratio:.2f}"})
        print(f"{name:<14} ours / torch.optim = {ratio:.2f}  ({n_params:,} parameters)")
    out = write_table(rows, TABLE)
    print(f"wrote {out} (torch {torch.__version__}, {platform.machine()}, 2 threads)")


if __name__ == "__main__":
    main()
