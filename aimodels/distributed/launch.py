"""Run a function on N local ranks with the gloo backend, and bring back what each returns.

`launch(fn, world_size, *args)` starts N fresh Python processes (the "spawn" start
method), joins them into one process group on 127.0.0.1 at a free port, runs
`fn(*args)` on each and returns the list of results, index = rank.

The worker function must live in an importable module (here, `aimodels`): a spawned
process re-imports it by name and cannot find a function defined in a notebook's
`__main__`. `launch` checks this before it starts anything.

A rank that raises, dies (a signal, `os._exit`) or runs past `timeout` ends the whole
group: the other ranks are killed and `RankError` / `TimeoutError` names the rank and
its traceback. Nothing is left running.

The same worker runs under `torchrun`, which sets RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT: call `init_from_env()` first.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankError", "free_port", "hello", "init_from_env", "launch", "rank_and_world",
           "run_parts"]


class RankError(RuntimeError):
    """One rank of a launched group failed; `rank` says which, the message holds its traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_importable(fn: Callable) -> None:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if (module in (None, "__main__", "__mp_main__") or "<locals>" in qualname
            or "<lambda>" in qualname):
        raise ValueError(
            f"launch() needs a function a new process can import by name, got {fn!r} "
            f"(module {module!r}). Define it at the top level of a module such as "
            "aimodels.distributed, not in a notebook cell, a lambda or another function."
        )


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict,
            threads: int, timeout: float, results: Any) -> None:
    """Body of each spawned rank: join the group, run fn, send back (rank, ok, payload)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        value = fn(*args, **kwargs)
        # Plain pickle, by value (torch's shared-memory pickling points at memory freed when
        # this rank exits). Only our own parent unpickles it, from a private pipe, never a file.
        message = (rank, True, pickle.dumps(value))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        message = (rank, False, traceback.format_exc())
    # Report before leaving the group: the other ranks fail as soon as it is gone, and
    # the parent should hear the cause first.
    results.put(message)
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args: Any, timeout: float = 60.0, threads: int = 1,
           **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results by rank.

    `threads` is each rank's intra-op thread count (one per rank keeps two ranks on two
    cores from competing). `timeout` bounds the whole run, start-up included, in seconds.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    _check_importable(fn)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, daemon=True, name=f"rank{rank}",
                        args=(rank, world_size, port, fn, args, kwargs, threads, timeout, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}  # rank -> traceback, or why it ended without a result
    grace = None  # once one rank fails, wait this long for the others to say why
    try:
        while len(outputs) + len(failures) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.05)
                if ok:
                    outputs[rank] = pickle.loads(payload)
                else:
                    failures[rank] = payload
            except queue_module.Empty:
                for r, process in enumerate(processes):
                    if r not in outputs and r not in failures and not process.is_alive():
                        time.sleep(0.1)  # its last message may still be in the pipe
                        if results.empty():
                            failures[r] = (f"exited with code {process.exitcode} without a "
                                           "result (killed, or os._exit)\n")
            now = time.monotonic()
            if failures and grace is None:
                grace = now + 1.0
            if grace is not None and now > grace:
                break
            if now > deadline:
                missing = sorted(set(range(world_size)) - set(outputs) - set(failures))
                raise TimeoutError(f"launch({fn.__qualname__}, world_size={world_size}) ran past "
                                   f"its timeout of {timeout} s; ranks {missing} had not finished")
        if failures:
            # A rank that died is the cause; the others then fail on a closed connection.
            died = [r for r, text in failures.items() if text.startswith("exited with code")]
            first = died[0] if died else next(iter(failures))
            others = sorted(set(failures) - {first})
            raise RankError(first, f"rank {first} of {world_size} failed"
                                   + (f" (ranks {others} failed after it)" if others else "")
                                   + f":\n{failures[first]}")
    finally:
        for process in processes:
            process.join(timeout=5 if len(outputs) == world_size else 0)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        results.close()
    return [outputs[rank] for rank in range(world_size)]


def init_from_env(timeout: float = 60.0) -> tuple[int, int]:
    """Join the gloo group that torchrun (or `launch`) describes in the environment.

    Returns (rank, world_size). Does nothing but report them if the group already exists.
    """
    if not dist.is_initialized():
        needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [k for k in needed if k not in os.environ]
        if missing:
            raise RuntimeError(f"init_from_env() needs {missing} in the environment: run the "
                               "script with torchrun, or call it from a function given to launch()")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in `group`, or (0, 1) when no process group exists."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def run_parts(parts: list[tuple[str, Callable, dict]]) -> dict[str, Any]:
    """Worker for `launch`: run several in-group functions in one process group.

    `parts` is a list of (name, function, keyword arguments); the result maps each name to
    what its function returned, plus "seconds": each part's wall time on this rank. One
    launch pays the start-up (new processes, imports, the group) once for all of them.
    """
    out: dict[str, Any] = {"seconds": {}}
    for name, fn, kwargs in parts:
        start = time.perf_counter()
        out[name] = fn(**kwargs)
        out["seconds"][name] = time.perf_counter() - start
    return out


def hello() -> dict[str, Any]:
    """Worker for a first `launch`: who am I, and the sum of all ranks by one all-reduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    return {"rank": rank, "world_size": world, "pid": os.getpid(),
            "backend": dist.get_backend(), "threads": torch.get_num_threads(),
            "sum_of_ranks": int(total.item())}
