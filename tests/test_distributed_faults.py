"""Fault tolerance (Chapter 10): torchrun with 2 ranks equals the single-process reference;
a rank that dies is restarted by torchrun (--max-restarts=1) and the job resumes from its
DCP checkpoint to the very same weights; without restarts the job fails, within the
timeout; the same kill-and-resume by hand with `launch` also ends on the same weights.

The three torchrun jobs run at the same time (each costs several seconds of Python and
torch start-up, mostly waiting) while this thread runs the two `launch` calls.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch
from torch.testing import assert_close

from aimodels.distributed.faults import kill_and_resume, run_torchrun, torchrun_command
from aimodels.distributed.train_script import (
    latest_checkpoint,
    make_config,
    read_result,
    reference,
    train_loop,
)

STEPS, EVERY, CRASH = 20, 5, 12  # checkpoints after steps 5, 10, 15; rank 1 dies before step 12
TORCHRUN_TIMEOUT = 120  # three torchrun jobs share 2 cores with each other and two launches


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")

    def crashing(name: str) -> list[str]:
        return ["--steps", STEPS, "--out", root / name, "--checkpoint-dir", root / f"ckpt-{name}",
                "--checkpoint-every", EVERY, "--crash-at-step", CRASH]

    jobs = {"plain": (["--steps", STEPS, "--out", root / "plain"], 0),
            "restart": (crashing("restart"), 1),
            "no_restart": (crashing("no_restart"), 0)}
    start = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(run_torchrun, args, nproc=2, max_restarts=restarts,
                                     timeout=TORCHRUN_TIMEOUT)
                   for name, (args, restarts) in jobs.items()}
        config = make_config(steps=STEPS, checkpoint_dir=str(root / "ckpt-launch"),
                             checkpoint_every=EVERY)
        by_hand = kill_and_resume(config, crash_at_step=CRASH, timeout=60)
        out = {name: future.result() for name, future in futures.items()}
    out.update(launch=by_hand, reference=reference(make_config(steps=STEPS)), root=root,
               seconds=time.monotonic() - start)
    print(f"\nfault-tolerance runs took {out['seconds']:.1f} s: "
          + ", ".join(f"{k} {out[k].seconds:.1f} s" for k in jobs)
          + f", launch crash + resume {by_hand['seconds']:.1f} s")
    return out


def assert_same_state(actual: dict, expected: dict, exact: bool = False) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {}
        assert_close(actual[key], expected[key], **tolerance, msg=lambda m, k=key: f"{k}: {m}")


def test_torchrun_two_ranks_equal_single_process_reference(runs):
    plain, ref = runs["plain"], runs["reference"]
    assert plain.returncode == 0, plain.log
    assert plain.result is not None, plain.log
    result = plain.result
    assert (result["world_size"], result["start_step"], result["restart_count"]) == (2, 0, 0)
    assert plain.result["state"]["0.weight"].dtype == torch.float64
    assert_close(torch.tensor(plain.result["losses"]), torch.tensor(ref["losses"]))
    assert_same_state(plain.result["state"], ref["state"])
    assert "Setting OMP_NUM_THREADS" not in plain.log  # run_torchrun sets it: torchrun is quiet


def test_torchrun_restarts_a_crashed_rank_and_resumes_to_the_same_weights(runs):
    restart, plain = runs["restart"], runs["plain"]
    assert restart.returncode == 0, restart.log
    assert f"[rank 1] crashing on purpose before step {CRASH} (attempt 0)" in restart.log
    for rank in (0, 1):  # the restarted group (attempt 1) resumed from the last checkpoint
        assert f"[rank {rank}] resumed from step 10 (attempt 1)" in restart.log, restart.log
    result = restart.result
    assert (result["restart_count"], result["start_step"]) == (1, 10)
    assert len(result["losses"]) == STEPS
    assert_same_state(result["state"], plain.result["state"], exact=True)
    assert result["losses"] == plain.result["losses"]
    assert latest_checkpoint(runs["root"] / "ckpt-restart")[0] == 15


def test_torchrun_without_restarts_fails_on_the_crash(runs):
    failed = runs["no_restart"]
    assert failed.returncode != 0
    assert failed.seconds < TORCHRUN_TIMEOUT
    assert failed.result is None  # rank 0 never wrote a result
    assert "ChildFailedError" in failed.log and "exitcode  : 1" in failed.log, failed.log
    assert "resumed from step" not in failed.log
    assert latest_checkpoint(runs["root"] / "ckpt-no_restart")[0] == 10


def test_launch_kill_and_resume_equals_uninterrupted(runs):
    by_hand, plain = runs["launch"], runs["plain"]
    assert by_hand["error"].rank == 1
    assert "exited with code 1" in str(by_hand["error"])
    assert by_hand["resumed_from"] == 10
    result = by_hand["result"]
    assert (result["start_step"], len(result["losses"])) == (10, STEPS)
    # same world size, same batches, restored momentum: bit for bit the uninterrupted run
    assert_same_state(result["state"], plain.result["state"], exact=True)
    assert result["losses"] == plain.result["losses"]
    assert_same_state(result["state"], runs["reference"]["state"])


def test_run_torchrun_kills_the_whole_process_tree_on_timeout(tmp_path):
    marker = str(tmp_path / "never")
    with pytest.raises(TimeoutError, match="ran past its timeout of 1.5 s"):
        run_torchrun(["--steps", 20, "--out", marker], timeout=1.5)
    time.sleep(0.2)
    left = [p for p in psutil.process_iter(["cmdline", "status"])
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"
    assert read_result(marker) is None


def test_inputs_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config keys \['step'\]"):
        make_config(step=3)
    with pytest.raises(ValueError, match="checkpoint_every=5 needs a checkpoint_dir"):
        make_config(checkpoint_every=5)
    with pytest.raises(ValueError, match=r"crash_at_step must be None or an int in \[0, 20\), got 20"):
        make_config(crash_at_step=20)
    with pytest.raises(ValueError, match="nproc must be an int >= 1, got 0"):
        torchrun_command([], nproc=0)
    with pytest.raises(ValueError, match="needs a config with checkpoint_dir and checkpoint_every > 0, got checkpoint_dir=None"):
        kill_and_resume(make_config(), crash_at_step=3)
    with pytest.raises(RuntimeError, match="train_loop\\(\\) needs a process group"):
        train_loop(make_config(steps=2))
    assert latest_checkpoint(tmp_path) is None
    command = torchrun_command(["--steps", 4], nproc=2, max_restarts=1)
    assert command[:3] == [command[0], "-m", "torch.distributed.run"] and os.path.isabs(command[0])
    assert command[3:] == ["--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m",
                           "aimodels.distributed.train_script", "--steps", "4"]
