"""One data-parallel training loop with checkpoints, runnable by torchrun, `launch` or Ray Train.

`train_loop(config)` is the whole job: it assumes a process group exists, wraps chapter 10's
toy MLP (`aimodels.distributed.common`, float64) in `DistributedDataParallel`, trains it
with SGD + momentum on this rank's rows of each batch, and returns the loss of every step
and the final weights. Who created the group does not matter, so the same function runs

* under torchrun, as a script (it calls `init_from_env()` first)::

      python -m torch.distributed.run --standalone --nproc_per_node=2 \\
          -m aimodels.distributed.train_script --steps 20 --out DIR

* inside `launch(train_loop, 2, config)` from a notebook or test (`run_training`);
* as Ray Train's ``train_loop_per_worker`` (`aimodels.distributed.ray_train`).

**What makes a resumed run identical to an uninterrupted one.** Three things, all here:

1. the batch of step k is a function of k alone: all batches come from
   `regression_batches(steps, ...)` with a fixed seed, and step k reads batch k;
2. the checkpoint holds everything the next step depends on: the weights, the optimizer
   state (SGD's momentum buffers: without them the first resumed step would take a plain
   gradient step), the step number, and the losses so far;
3. a checkpoint only counts once it is complete. Each one is written with
   `torch.distributed.checkpoint` (DCP) to ``checkpoint_dir/step_<k>``; after every rank
   is done, rank 0 replaces the small JSON file ``checkpoint_dir/latest`` (write a
   temporary file, then `os.replace`, which is atomic on POSIX). A crash half-way through
   a save leaves ``latest`` pointing at the previous checkpoint.

DCP saves a *distributed* state dict: every rank calls `dcp.save` with its own view and
DCP's planner decides which rank writes what (replicated tensors, like DDP's, once), and
`dcp.load` reads it back in place, also when the number of ranks has changed
(PyTorch docs, "Distributed Checkpoint - torch.distributed.checkpoint").
`get_state_dict` / `set_state_dict` (``torch.distributed.checkpoint.state_dict``) turn a
model wrapped in DDP (or FSDP) and its optimizer into such state dicts with the wrapper's
``module.`` prefixes removed, and create the optimizer state that a fresh optimizer does
not have yet, so there is something for `dcp.load` to fill.

**Fault injection.** ``crash_at_step=K`` makes rank ``crash_rank`` (1) call `os._exit(1)`
just before step K, like a machine that loses power: no exception, no clean-up. It does
so only on the first attempt: torchrun's elastic agent sets ``TORCHELASTIC_RESTART_COUNT``
to the number of worker-group restarts so far (PyTorch docs, "torchrun (Elastic Launch)",
environment variables), so a restarted group trains through step K. Outside torchrun the
variable is absent and counts as 0.

Rank 0 writes the result to ``out`` (when given): ``state.safetensors`` with the final
weights and ``result.json`` with the losses, each through a temporary file and
`os.replace`, the JSON last, so a reader that finds ``result.json`` finds a whole result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from aimodels.distributed.common import mlp, rank_rows, regression_batches, train_single
from aimodels.distributed.launch import init_from_env, launch

__all__ = [
    "DEFAULTS",
    "RESTART_ENV",
    "latest_checkpoint",
    "load_checkpoint",
    "make_config",
    "read_result",
    "reference",
    "run_training",
    "save_checkpoint",
    "join_torchrun_group",
    "train_loop",
    "write_result",
    "main",
]

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun's elastic agent: restarts so far
LATEST = "latest"  # the pointer file in checkpoint_dir that marks the newest complete checkpoint

DEFAULTS: dict[str, Any] = {
    "steps": 20,                  # optimizer steps in the whole run
    "batch_size": 16,             # global batch; each of N ranks trains on batch_size / N rows
    "lr": 0.05,                   # SGD learning rate (momentum 0.9, as common.make_optimizer)
    "sizes": (32, 64, 64, 8),     # MLP widths
    "model_seed": 0,              # initial weights
    "data_seed": 1,               # the fixed stream of batches
    "out": None,                  # directory for rank 0's result files, or None
    "checkpoint_dir": None,       # directory for DCP checkpoints, or None
    "checkpoint_every": 0,        # save after every k-th step; 0: never
    "crash_at_step": None,        # fault injection: crash just before this step (first attempt)
    "crash_rank": 1,              # ... on this rank
}


def make_config(config: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """`DEFAULTS` updated by `config` and `overrides`, checked. Unknown keys are an error."""
    merged = {**DEFAULTS, **(config or {}), **overrides}
    unknown = sorted(set(merged) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; expected some of {sorted(DEFAULTS)}")
    for key in ("steps", "batch_size"):
        if not isinstance(merged[key], int) or merged[key] < 1:
            raise ValueError(f"{key} must be an int >= 1, got {merged[key]!r}")
    if not isinstance(merged["checkpoint_every"], int) or merged["checkpoint_every"] < 0:
        raise ValueError("checkpoint_every must be an int >= 0, "
                         f"got {merged['checkpoint_every']!r}")
    if merged["checkpoint_every"] and merged["checkpoint_dir"] is None:
        raise ValueError(f"checkpoint_every={merged['checkpoint_every']} needs a checkpoint_dir")
    crash = merged["crash_at_step"]
    if crash is not None and not (isinstance(crash, int) and 0 <= crash < merged["steps"]):
        raise ValueError(f"crash_at_step must be None or an int in [0, {merged['steps']}), "
                         f"got {crash!r}")
    merged["sizes"] = tuple(int(s) for s in merged["sizes"])
    return merged


# --------------------------------------------------------------------------- checkpoints
def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> tuple[int, Path] | None:
    """(step, path) of the newest complete checkpoint in `checkpoint_dir`, or None."""
    pointer = Path(checkpoint_dir) / LATEST
    if not pointer.exists():
        return None
    record = json.loads(pointer.read_text())
    return int(record["step"]), Path(checkpoint_dir) / record["path"]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file in the same directory and `os.replace`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    losses: Sequence[float], checkpoint_dir: str | os.PathLike[str]) -> Path:
    """In-group: save weights, optimizer state, `step` and `losses` to ``step_<step>``, then
    point ``latest`` at it. Every rank of the group must call this. Returns the path."""
    rank = dist.get_rank()
    path = Path(checkpoint_dir) / f"step_{step}"
    if rank == 0:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        # A directory here is a save that a crash cut short or never committed. Start it
        # afresh: DCP would otherwise warn "Detected an existing checkpoint in ...,
        # overwriting" (the only DCP warning this loop could trigger; none fires otherwise).
        if path.exists():
            shutil.rmtree(path)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "step": torch.tensor(step),
             "losses": torch.tensor(list(losses), dtype=torch.float64)}
    dcp.save(state, checkpoint_id=str(path))
    dist.barrier()  # every rank's files are on disk: now the checkpoint may count
    if rank == 0:
        record = json.dumps({"step": step, "path": path.name})
        _atomic_write(Path(checkpoint_dir) / LATEST, lambda tmp: tmp.write_text(record))
    dist.barrier()
    return path


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer,
                    checkpoint_dir: str | os.PathLike[str]) -> tuple[int, list[float]] | None:
    """In-group: load the newest complete checkpoint into `model` and `optimizer`.

    Returns (step, losses so far), or None when there is none (a fresh start)."""
    found = latest_checkpoint(checkpoint_dir)
    if found is None:
        return None
    step, path = found
    # get_state_dict creates the momentum buffers a fresh optimizer lacks (one step with
    # zero gradients and lr 0), so that dcp.load has tensors to read into.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "step": torch.tensor(-1),
             "losses": torch.empty(step, dtype=torch.float64)}
    dcp.load(state, checkpoint_id=str(path))
    if int(state["step"]) != step:
        raise RuntimeError(f"checkpoint {path} holds step {int(state['step'])}, "
                           f"but {LATEST} says {step}")
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return step, state["losses"].tolist()


# --------------------------------------------------------------------------- results
def write_result(out: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """Write `result` (from `train_loop`) to `out`: state.safetensors, then result.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result["state"].items()}
    _atomic_write(out / "state.safetensors", lambda tmp: save_file(state, str(tmp)))
    record = {k: v for k, v in result.items() if k != "state"}
    _atomic_write(out / "result.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def read_result(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What `write_result` wrote to `out` (with "state" as tensors), or None if nothing is there."""
    out = Path(out)
    if not (out / "result.json").exists():
        return None
    result = json.loads((out / "result.json").read_text())
    result["state"] = load_file(str(out / "state.safetensors"))
    return result


# --------------------------------------------------------------------------- training
def train_loop(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """In-group: data-parallel training of the toy MLP; resumes from and writes checkpoints.

    Returns a dict: "losses" (the global batch loss of every step, including steps done by
    an earlier attempt and read from the checkpoint), "state" (final weights, plain
    tensors), "start_step" (where this attempt began), "steps", "rank", "world_size",
    "restart_count" (torchrun restarts so far). Rank 0 also writes it to config["out"].
    """
    cfg = make_config(config)
    if not dist.is_initialized():
        raise RuntimeError("train_loop() needs a process group: run it with torchrun, launch() "
                           "or Ray Train, or call init_from_env() first")
    rank, world = dist.get_rank(), dist.get_world_size()
    restart_count = int(os.environ.get(RESTART_ENV, "0"))
    x, y = regression_batches(cfg["steps"], cfg["batch_size"], cfg["sizes"][0], cfg["sizes"][-1],
                              seed=cfg["data_seed"])
    model = DistributedDataParallel(mlp(cfg["sizes"], seed=cfg["model_seed"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)

    start, losses = 0, []
    if cfg["checkpoint_dir"] is not None:
        loaded = load_checkpoint(model, optimizer, cfg["checkpoint_dir"])
        if loaded is not None:
            start, losses = loaded
            print(f"[rank {rank}] resumed from step {start} (attempt {restart_count})", flush=True)

    for step in range(start, cfg["steps"]):
        if step == cfg["crash_at_step"] and rank == cfg["crash_rank"] and restart_count == 0:
            print(f"[rank {rank}] crashing on purpose before step {step} (attempt {restart_count})",
                  flush=True)
            os._exit(1)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(rank_rows(x[step], rank, world)),
                                      rank_rows(y[step], rank, world))
        loss.backward()  # DDP averages the gradients over the ranks here
        optimizer.step()
        # Equal shares and a mean loss: the mean of the ranks' losses is the whole batch's.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
        done = step + 1
        if cfg["checkpoint_every"] and done % cfg["checkpoint_every"] == 0 and done < cfg["steps"]:
            save_checkpoint(model, optimizer, done, losses, cfg["checkpoint_dir"])

    result = {"losses": losses, "start_step": start, "steps": cfg["steps"], "rank": rank,
              "world_size": world, "restart_count": restart_count,
              "state": {k: v.detach().clone() for k, v in model.module.state_dict().items()}}
    if rank == 0 and cfg["out"] is not None:
        write_result(cfg["out"], result)
    return result


def reference(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The single-process run (`common.train_single`, whole batches) `train_loop` must equal."""
    cfg = make_config(config)
    x, y = regression_batches(cfg["steps"], cfg["batch_size"], cfg["sizes"][0], cfg["sizes"][-1],
                              seed=cfg["data_seed"])
    losses, state = train_single(mlp(cfg["sizes"], seed=cfg["model_seed"]), x, y, "sgd", cfg["lr"])
    return {"losses": losses, "state": state, "steps": cfg["steps"]}


def run_training(config: dict[str, Any] | None = None, world_size: int = 2, timeout: float = 60.0
                 ) -> dict[str, Any]:
    """`train_loop` on `world_size` local gloo ranks via `launch`; returns rank 0's result."""
    return launch(train_loop, world_size, make_config(config), timeout=timeout)[0]


# --------------------------------------------------------------------------- script
def _parse(argv: Sequence[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--out", default=None, help="directory for rank 0's result files")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--crash-at-step", type=int, default=None,
                        help="rank --crash-rank calls os._exit(1) before this step, "
                             "on the first attempt only")
    parser.add_argument("--crash-rank", type=int, default=DEFAULTS["crash_rank"])
    args = parser.parse_args(argv)
    return make_config(steps=args.steps, batch_size=args.batch_size, lr=args.lr, out=args.out,
                       checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                       crash_at_step=args.crash_at_step, crash_rank=args.crash_rank)


def join_torchrun_group(timeout: float = 60.0) -> tuple[int, int]:
    """Join the gloo group under torchrun with a fresh key namespace for every attempt.

    torchrun's agent hosts the TCPStore that the workers meet in (MASTER_ADDR:MASTER_PORT,
    ``TORCHELASTIC_USE_AGENT_STORE=True``), and in torch 2.15 a restarted worker group
    gets the *same* store. Gloo's keys from the failed attempt (each rank's address) are
    still in it, so a new rank can read the dead rank's address and fail with "Gloo
    connectFullMesh failed ... Connection refused" (seen here in 3 of our first 7 restarts).
    This is the problem of pytorch issue 135712 (reported there for NCCL); its fix
    (PR 135957) was a new store server per attempt, but the 2.15 dynamic rendezvous
    creates the shared server once and reuses it. Prefixing every
    key with the attempt number keeps the attempts apart on one node; so does running
    torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (rank 0 then hosts a new store at
    a new port per attempt), which the issue recommends for several nodes, where restart
    counts need not agree. Outside torchrun this is `init_from_env()`. Returns (rank, world size).
    """
    if dist.is_initialized() or RESTART_ENV not in os.environ:
        return init_from_env(timeout)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0,
                          timeout=timedelta(seconds=timeout), multi_tenant=not agent_store)
    prefixed = dist.PrefixStore(f"attempt_{os.environ[RESTART_ENV]}/", store)
    dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    return rank, world


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point under torchrun: join the group from the environment, train, leave."""
    config = _parse(argv)
    torch.set_num_threads(1)
    rank, world = join_torchrun_group()
    try:
        result = train_loop(config)
        if rank == 0:
            print(f"[rank 0] world {world}: steps {result['start_step']}..{result['steps']}, "
                  f"final loss {result['losses'][-1]:.6f}", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
