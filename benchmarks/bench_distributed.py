"""Benchmark: one training loop, three launchers (Chapter 10).

`aimodels.distributed.train_script.train_loop` (DDP, SGD with momentum, float64, the toy
problem of `aimodels.distributed.common`) runs on two ranks started three ways:

* `launch` (aimodels.distributed.launch): `torch.multiprocessing` spawn and a gloo group;
* `torchrun --standalone --nproc_per_node=2`, the command a cluster job runs;
* Ray Train's `TorchTrainer` with `ScalingConfig(num_workers=2, use_gpu=False)`, on a
  local Ray that this script starts and stops.

For each: the wall time from start to result (start-up included), the time Ray itself
took to start, the final loss, and the largest difference between its final weights and
the single-process reference's, and the `launch` run's. Ray Train's start-up is about as
long as the chapter's whole notebook budget, which is why the chapter reads its result
from this table. Writes book/figures/distributed_launchers.csv.
Run with ``python benchmarks/bench_distributed.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import FIGURES, write_table

from aimodels.distributed import faults, ray_train, train_script

TABLE = "distributed_launchers.csv"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run(steps: int = 20, folder: Path = FIGURES) -> list[dict]:
    config = train_script.make_config(steps=steps)
    reference = train_script.reference(config)
    results = {}
    start = time.perf_counter()
    results["launch (torch.multiprocessing)"] = train_script.run_training(config, world_size=2)
    launch_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-torchrun-") as tmp:
        args = ["--steps", str(steps), "--out", str(Path(tmp) / "out")]
        start = time.perf_counter()
        done = faults.run_torchrun(args, nproc=2, timeout=120)
        torchrun_s = time.perf_counter() - start
        if done.returncode != 0 or done.result is None:
            raise RuntimeError(f"torchrun failed (exit {done.returncode}):\n{done.log}")
        results["torchrun --standalone"] = done.result
    start = time.perf_counter()
    ray = ray_train.run_ray_train(config, num_workers=2, timeout=180)
    ray_s = time.perf_counter() - start
    results[f"Ray Train TorchTrainer ({ray['api']})"] = ray
    seconds = {"launch (torch.multiprocessing)": (launch_s, 0.0),
               "torchrun --standalone": (torchrun_s, 0.0),
               f"Ray Train TorchTrainer ({ray['api']})": (ray_s, ray["startup_s"])}
    base = results["launch (torch.multiprocessing)"]["state"]
    rows = []
    for name, result in results.items():
        total, ray_start = seconds[name]
        rows.append({
            "launcher": name,
            "ranks": 2,
            "steps": steps,
            "wall_s": round(total, 1),
            "ray_start_s": round(ray_start, 1),
            "final_loss": f"{result['losses'][-1]:.12f}",
            "max_diff_vs_single_process": f"{_max_diff(result['state'], reference['state']):.2e}",
            "max_diff_vs_launch": f"{_max_diff(result['state'], base):.2e}",
        })
    write_table(rows, TABLE, folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    for row in run(args.steps):
        print(row)


if __name__ == "__main__":
    main()
