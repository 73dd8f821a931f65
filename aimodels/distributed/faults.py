"""Crash a rank on purpose and watch the job recover: torchrun restarts, and resume by hand.

A data-parallel job is only as alive as its least healthy rank: when one process dies,
the others block in their next all-reduce until the collective fails ("Connection closed
by peer" from gloo) or times out. Recovery therefore always means restarting the *whole*
group from the last complete checkpoint. Two ways to do that, both with
`aimodels.distributed.train_script`:

* **torchrun** (`run_torchrun`). ``torchrun --max-restarts=R`` runs an elastic agent that
  watches its workers (every ``--monitor-interval`` = 0.1 s); when one exits with an error
  it stops the others (SIGTERM), runs the rendezvous again and starts a fresh group, up
  to R times, with ``TORCHELASTIC_RESTART_COUNT`` telling the workers which attempt this
  is (PyTorch docs, "torchrun (Elastic Launch)"). The workers must resume from a
  checkpoint themselves: "we restart all the workers with the same program arguments so
  you will lose progress up to the most recent checkpoint" (PyTorch docs, torchelastic
  "Train script"). With ``--max-restarts=0`` the first failure ends the job with a
  nonzero exit code and a ``ChildFailedError`` summary naming the root-cause rank.
  ``--standalone`` runs the c10d rendezvous on localhost at a free port, so this works
  offline on one machine. In torch 2.15 a restarted group meets in the same key-value
  store as the failed one, whose stale keys made 3 of our first 7 restarts fail in gloo's
  connection set-up; `train_script.join_torchrun_group` gives each attempt its own keys.
* **by hand** (`kill_and_resume`): a `launch` in which rank 1 dies (`os._exit`) raises
  `RankError`; a second `launch` with the same checkpoint directory resumes from the last
  complete checkpoint and finishes.

Either way the final weights equal those of an uninterrupted run exactly, because the
batch of a step depends only on the step number and the checkpoint holds the optimizer's
momentum as well as the weights (see `train_script`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from aimodels.distributed.launch import RankError
from aimodels.distributed.train_script import (
    latest_checkpoint,
    make_config,
    read_result,
    run_training,
)

__all__ = ["TorchrunRun", "kill_and_resume", "run_torchrun", "torchrun_command"]

SCRIPT_MODULE = "aimodels.distributed.train_script"


class TorchrunRun(NamedTuple):
    """What `run_torchrun` saw: exit code, the end of the combined log, rank 0's result, seconds."""

    returncode: int
    log: str
    result: dict[str, Any] | None
    seconds: float


def torchrun_command(args: Sequence[str], nproc: int = 2, max_restarts: int = 0,
                     module: str = SCRIPT_MODULE) -> list[str]:
    """The command line: ``python -m torch.distributed.run --standalone ... -m module args``."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", "-m", module,
            *map(str, args)]


def _out_dir(args: Sequence[str]) -> str | None:
    args = [str(a) for a in args]
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def run_torchrun(args: Sequence[str], nproc: int = 2, max_restarts: int = 0, timeout: float = 60.0,
                 tail: int = 6000) -> TorchrunRun:
    """Run `train_script` under torchrun with `args`; wait at most `timeout` seconds.

    torchrun runs in its own session (process group), so on timeout the whole tree (agent
    and workers) is killed with `os.killpg` and TimeoutError carries the log so far.
    Workers get ``OMP_NUM_THREADS=1`` (torchrun would set it anyway, with a warning).
    Returns (returncode, last `tail` characters of stdout+stderr, result read from the
    ``--out`` directory in `args` or None, seconds).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    process = subprocess.Popen(torchrun_command(args, nproc, max_restarts), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the session id is torchrun's pid
        output, _ = process.communicate()
        raise TimeoutError(f"torchrun ran past its timeout of {timeout} s and was killed; "
                           f"its log ended with:\n{output[-tail:]}") from None
    out = _out_dir(args)
    result = read_result(out) if out is not None else None
    return TorchrunRun(process.returncode, output[-tail:], result, time.monotonic() - start)


def kill_and_resume(config: dict[str, Any], crash_at_step: int, world_size: int = 2,
                    timeout: float = 60.0) -> dict[str, Any]:
    """Crash rank `config["crash_rank"]` before `crash_at_step`, then resume, both with `launch`.

    `config` needs a ``checkpoint_dir`` (empty, or holding this run's earlier checkpoints)
    and ``checkpoint_every``. Returns {"error": the RankError of the first launch,
    "resumed_from": the step of the checkpoint the second launch started from, "result":
    its rank-0 result (losses of all steps, final state), "seconds": both launches}.
    """
    cfg = make_config(config, crash_at_step=crash_at_step)
    if cfg["checkpoint_dir"] is None or not cfg["checkpoint_every"]:
        raise ValueError("kill_and_resume needs a config with checkpoint_dir and "
                         f"checkpoint_every > 0, got checkpoint_dir={cfg['checkpoint_dir']!r}, "
                         f"checkpoint_every={cfg['checkpoint_every']!r}")
    start = time.monotonic()
    try:
        run_training(cfg, world_size, timeout)
    except RankError as error:
        crash = error
    else:
        raise RuntimeError(f"expected rank {cfg['crash_rank']} to crash before step "
                           f"{crash_at_step}, but the run finished")
    found = latest_checkpoint(cfg["checkpoint_dir"])
    result = run_training(make_config(cfg, crash_at_step=None), world_size, timeout)
    if found is not None and result["start_step"] != found[0]:
        raise RuntimeError(f"resumed from step {result['start_step']}, but the latest checkpoint "
                           f"in {Path(cfg['checkpoint_dir'])} is step {found[0]}")
    return {"error": crash, "resumed_from": result["start_step"], "result": result,
            "seconds": time.monotonic() - start}
