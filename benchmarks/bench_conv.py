"""Benchmark: our im2col convolution and loop convolution against F.conv2d (Chapter 4).

LeNet-5's two convolution layers on a batch of 64 images. The contenders run side by
side in one process, interleaved over several rounds; the report is the ratio of
median times, never an absolute time. Writes book/figures/bench_conv.csv.

Run with `make bench`.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import write_table

from aimodels import cnn

TABLE = "bench_conv.csv"
ROUNDS = 7
LAYERS = {  # name: (input shape, weight shape) for a batch of 64
    "LeNet-5 C1: 1 -> 6 channels, 32x32": ((64, 1, 32, 32), (6, 1, 5, 5)),
    "LeNet-5 C3: 6 -> 16 channels, 14x14": ((64, 6, 14, 14), (16, 6, 5, 5)),
}


def _median_seconds(fn, x, weight, bias, repeats):
    fn(x, weight, bias)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x, weight, bias)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows = []
    for name, (x_shape, w_shape) in LAYERS.items():
        x, weight, bias = torch.randn(x_shape), torch.randn(w_shape), torch.randn(w_shape[0])
        times = {"im2col": [], "loops": [], "torch": []}
        for _ in range(ROUNDS):
            times["im2col"].append(_median_seconds(cnn.conv2d, x, weight, bias, 20))
            times["loops"].append(_median_seconds(cnn.conv2d_loops, x, weight, bias, 2))
            times["torch"].append(_median_seconds(F.conv2d, x, weight, bias, 20))
        median = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "layer (batch of 64)": name,
            "im2col / F.conv2d": f"{median['im2col'] / median['torch']:.2f}",
            "loops / F.conv2d": f"{median['loops'] / median['torch']:.1f}",
        })
        print(rows[-1])
    out = write_table(rows, TABLE)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
