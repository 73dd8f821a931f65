"""launch(): results by rank, and a failing, dying or hanging rank ends the group with a clear error."""

import os
import time

import distributed_workers as workers
import psutil
import pytest
import torch

from aimodels.distributed import RankError, init_from_env, launch, rank_and_world


def _children() -> list[psutil.Process]:
    """Live child processes, apart from multiprocessing's resource tracker (it outlives a launch)."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_results_come_back_by_rank_for_three_ranks():
    results = launch(workers.rank_sum, 3, 10.0, timeout=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 and r["threads"] == 1 for r in results)
    for r in results:  # 10 + 11 + 12
        torch.testing.assert_close(r["sum"], torch.tensor([33.0]))
    assert len({r["pid"] for r in results}) == 3 and os.getpid() not in {r["pid"] for r in results}


def test_a_raising_rank_is_named_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 of 2 failed(.|\n)*ValueError: rank one refuses") as info:
        launch(workers.raise_on_rank_one, 2, timeout=60)
    assert info.value.rank == 1
    assert time.monotonic() - start < 30
    assert _children() == []


def test_a_dying_rank_is_named_with_its_exit_code():
    with pytest.raises(RankError, match="rank 1 of 3 failed.*\n.*exited with code 3") as info:
        launch(workers.exit_on_rank_one, 3, timeout=60)
    assert info.value.rank == 1
    assert _children() == []


def test_a_hanging_group_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timeout of 4 s; ranks \[0, 1\] had not finished"):
        launch(workers.sleep_forever, 2, timeout=4)
    assert time.monotonic() - start < 15
    assert _children() == []


def _local() -> int:
    return 1


@pytest.mark.parametrize("fn", [lambda: 1, _local], ids=["lambda", "main-like"])
def test_functions_a_new_process_cannot_import_are_refused_before_starting(fn, monkeypatch):
    if fn is _local:
        monkeypatch.setattr(_local, "__module__", "__main__")
    with pytest.raises(ValueError, match="import by name"):
        launch(fn, 2)
    assert _children() == []


@pytest.mark.parametrize("world_size", [0, -1, 1.5, True])
def test_bad_world_sizes_are_refused(world_size):
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        launch(workers.rank_sum, world_size, 0.0)


def test_init_from_env_says_what_is_missing(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_from_env()
    assert rank_and_world() == (0, 1)


def test_the_resource_tracker_a_launch_leaves_is_not_counted_as_ray():
    """A spawn start method leaves multiprocessing's resource tracker running in this process;
    chapter 12's Ray tests check that Ray left no process behind, so it must not count."""
    from aimodels.serving import ray_app

    launch(workers.rank_sum, 2, 0.0, timeout=60)
    trackers = [p for p in psutil.Process().children(recursive=True)
                if "multiprocessing.resource_tracker" in " ".join(p.cmdline())]
    assert trackers, "expected the resource tracker that spawn starts"
    assert not set(p.pid for p in trackers) & set(p.pid for p in ray_app.ray_processes())
