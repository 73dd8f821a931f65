"""Ray Train (Chapter 10): `TorchTrainer` with 2 CPU workers runs `train_script.train_loop`
in the gloo group Ray sets up, and the weights it reports back are bit for bit those of the
same loop under `launch`, and equal the single-process reference. One Ray session,
bounded by an alarm and always shut down.
"""

from __future__ import annotations

import signal

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("ray.train")

import ray  # noqa: E402

from aimodels.distributed.ray_train import run_ray_train  # noqa: E402
from aimodels.distributed.train_script import make_config, reference, run_training  # noqa: E402

# Ray Train imports Ray Data, whose DataContext warns about three of its own deprecated
# settings (`use_push_based_shuffle`, `use_polars`, `use_arrow_tensor_v2`): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`use_:DeprecationWarning:ray.data.context")

SESSION_LIMIT_S = 170  # an alarm ends a hung Ray start or fit instead of hanging CI


def _alarm(signum, frame):
    raise TimeoutError(f"the Ray Train test took more than {SESSION_LIMIT_S} s")


def test_ray_train_equals_launch_and_single_process_reference():
    config = make_config(steps=20)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SESSION_LIMIT_S)
    try:
        result = run_ray_train(config, num_workers=2, timeout=150)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not ray.is_initialized(), "run_ray_train should shut down the Ray it started"
    print(f"\nRay Train {result['api']}: ray.init {result['startup_s']:.1f} s, "
          f"fit {result['fit_s']:.1f} s, shutdown {result['shutdown_s']:.1f} s")
    ref = reference(config)
    launched = run_training(config, world_size=2, timeout=60)
    assert result["api"] == "v2"  # Ray 2.60's default Train API
    assert result["metrics"]["world_size"] == 2
    assert result["metrics"]["losses"] == result["losses"]  # rank 0's report, as Ray kept it
    assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]))
    assert result["losses"] == launched["losses"]
    assert sorted(result["state"]) == sorted(ref["state"])
    for key, expected in ref["state"].items():
        assert result["state"][key].dtype == torch.float64
        # same DDP loop, same 2 gloo ranks: the same floating-point operations as launch()
        assert_close(result["state"][key], launched["state"][key], rtol=0, atol=0,
                     msg=lambda m, k=key: f"{k}: {m}")
        assert_close(result["state"][key], expected, msg=lambda m, k=key: f"{k}: {m}")


def test_more_workers_than_cpus_is_refused():
    with pytest.raises(ValueError, match="3 workers of 1 CPU each need num_cpus >= 3, got num_cpus=2"):
        run_ray_train(make_config(steps=2), num_workers=3, num_cpus=2)
