"""The planner picks the least sharded option that fits, from the ZeRO formulas."""

import math

import pytest

from aimodels.distributed import plan, zero_memory_bytes
from aimodels.distributed.collectives import all_reduce_bytes_per_rank

GB = 1e9


@pytest.mark.parametrize(("n_params", "devices", "stage"), [
    (1.5e9, 8, 0),   # 24 GB of model state fits in 80% of 80 GB
    (7e9, 8, 1),     # 112 GB does not; sharding the optimizer state gives 38.5 GB
    (15e9, 8, 2),    # ZeRO-1 needs 82.5 GB, ZeRO-2 56.3 GB (the budget is 64 GB)
    (30e9, 8, 3),    # ZeRO-2 needs 112.5 GB, ZeRO-3 60 GB
])
def test_the_least_sharded_option_that_fits_is_picked(n_params, devices, stage):
    options, pick = plan(n_params, 80 * GB, devices)
    assert [o.stage for o in options] == [0, 1, 2, 3]
    for o in options:
        assert o.bytes_per_device == zero_memory_bytes(n_params, devices, o.stage)
        assert o.fits == (o.bytes_per_device <= 0.8 * 80 * GB)
    assert pick == options[stage].strategy
    assert all(not o.fits for o in options[:stage])


def test_traffic_is_one_gradient_all_reduce_and_half_more_for_stage_3():
    options, _ = plan(7e9, 80 * GB, 8)
    all_reduce = all_reduce_bytes_per_rank(2 * 7e9, 8)
    assert [o.sent_per_device_per_step for o in options] == [all_reduce] * 3 + [1.5 * all_reduce]


def test_too_big_says_how_many_devices_would_do():
    options, pick = plan(70e9, 80 * GB, 8)
    assert not any(o.fits for o in options)
    needed = math.ceil(16 * 70e9 / (0.8 * 80 * GB))
    assert pick == f"none: even fully sharded it needs {needed} devices, not 8"
    _, pick_then = plan(70e9, 80 * GB, needed)
    assert pick_then.startswith("FSDP")


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((0, 80 * GB, 8), {}, "n_params and device_memory_bytes must be > 0"),
    ((1e9, -1, 8), {}, "n_params and device_memory_bytes must be > 0"),
    ((1e9, 80 * GB, 8), {"headroom": 1.5}, r"headroom must be in \(0, 1\]"),
])
def test_bad_input_is_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(*args, **kwargs)
