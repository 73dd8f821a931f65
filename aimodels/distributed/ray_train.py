"""The same training loop on Ray Train: `TorchTrainer` starts the workers and the gloo group.

With torchrun or `launch`, *we* start the processes and they join a process group.
Ray Train's `TorchTrainer` does this from a running Ray cluster instead: it creates
``num_workers`` worker actors (each a process holding ``resources_per_worker``, by default
1 CPU), sets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` in them, calls
`torch.distributed.init_process_group` with the backend of its `TorchConfig` (gloo when
``use_gpu=False``) and then runs ``train_loop_per_worker(train_loop_config)`` on every
worker (Ray docs, "Get Started with Distributed Training using PyTorch"). So
`train_script.train_loop`, which only needs *some* process group, runs unchanged.

What Ray adds around it: placement of workers on a cluster's machines, restarts of a
failed worker group (``FailureConfig(max_failures=...)``), checkpoints registered and
kept in ``RunConfig.storage_path``, and metrics. ``ray.train.report(metrics,
checkpoint=...)`` must be called by every worker the same number of times (it is a
barrier); rank 0's metrics end up in ``Result.metrics`` and the checkpoint, a directory
that Ray copies to ``storage_path``, in ``Result.checkpoint`` (Ray docs, "Saving and
Loading Checkpoints"). That is how the final weights come back here: rank 0 writes them
with `train_script.write_result` and reports the directory. In Ray 2.60 the Train API is
"v2" unless ``RAY_TRAIN_V2_ENABLED=0`` (Ray docs, "Ray Train V2 Migration Guide"). v2 also
has ``Result.return_value`` (rank 0's return value, alpha), but it refuses torch tensors:
"Returning objects containing Torch tensors from the training function is not supported".

Costs on this 2-core machine (`run_ray_train` measures them; 20 steps, shared machine):
``ray.init`` 7-10 s; ``fit()`` 29-36 s, of which the controller actor takes ~7 s to start,
the two worker actors ~12 s, setting up their train context (and the gloo group) ~5 s,
launching the training function ~3 s, and training itself about a second; shutdown ~2 s.
The same run takes 4-9 s under `launch` and 9-15 s under torchrun. Ray is worth it for
clusters and long jobs, not for 20 steps. The v1 API (``RAY_TRAIN_V2_ENABLED=0``) also
works (fit ~25 s) once its trainer actor is given 0 CPUs (``trainer_resources``, which
v1 itself calls deprecated); with its default 1 CPU, 2 workers need 3 CPUs and the run
waits for resources forever on ``ray.init(num_cpus=2)``.
Ray runs offline here: usage statistics off (``RAY_USAGE_STATS_ENABLED=0``), no dashboard.
It warns that token authentication is enabled for the local cluster; that is harmless.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from aimodels.distributed.train_script import make_config, read_result, train_loop, write_result

__all__ = ["ray_train_loop", "run_ray_train", "train_api_version"]

HEALTH_CHECK_INTERVAL_S = 0.5  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S unless set (Ray's default: 2)


def train_api_version() -> str:
    """"v2" or "v1": which Ray Train API `ray.train` gives (``RAY_TRAIN_V2_ENABLED``)."""
    from ray.train.v2._internal.constants import is_v2_enabled

    return "v2" if is_v2_enabled() else "v1"


def ray_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: `train_loop`, then one `ray.train.report`.

    Rank 0 writes its result (`write_result`: weights as safetensors, losses as JSON) to a
    temporary directory and reports it as a `ray.train.Checkpoint`, which Ray copies to
    ``storage_path``; the other ranks report the same metrics without a checkpoint (every
    worker must call `report`, it is a barrier).
    """
    import ray.train

    torch.set_num_threads(1)
    result = train_loop(config)
    context = ray.train.get_context()
    metrics = {"loss": result["losses"][-1], "losses": result["losses"],
               "world_size": context.get_world_size()}
    with tempfile.TemporaryDirectory(prefix="ray-result-") as tmp:
        checkpoint = None
        if context.get_world_rank() == 0:
            write_result(tmp, result)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def run_ray_train(config: dict[str, Any] | None = None, num_workers: int = 2,
                  timeout: float = 120.0, storage_path: str | os.PathLike[str] | None = None,
                  num_cpus: int = 2) -> dict[str, Any]:
    """Train with `TorchTrainer` on a local Ray started (and shut down) here; time each phase.

    Starts Ray with `num_cpus` CPUs, no dashboard and no usage statistics unless a Ray
    session is already running (then it is reused and left running). `timeout` bounds
    `trainer.fit()`; past it Ray is shut down and TimeoutError raised. Returns {"losses",
    "state", "metrics" (rank 0's report), "api" ("v2"/"v1"), "startup_s" (ray.init),
    "fit_s" (TorchTrainer.fit), "shutdown_s"}.
    """
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if num_workers > num_cpus:
        raise ValueError(f"{num_workers} workers of 1 CPU each need num_cpus >= {num_workers}, "
                         f"got num_cpus={num_cpus}: Ray would wait for CPUs forever")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    cfg = make_config(config)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray Train's controller polls the workers every 2 s by default, so a finished run is
    # noticed up to 2 s late; Ray passes this variable on to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # v1 runs a trainer actor that holds 1 CPU besides the workers' (3 CPUs for 2 workers:
    # with num_cpus=2 it waits for resources forever); v2's controller holds none.
    scaling = {"trainer_resources": {"CPU": 0}} if train_api_version() == "v1" else {}
    times: dict[str, float] = {}
    started_here = not ray.is_initialized()
    t0 = time.monotonic()
    if started_here:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 2**20)
    times["startup_s"] = time.monotonic() - t0
    try:
        with tempfile.TemporaryDirectory(prefix="ray-train-") as tmp:
            trainer = TorchTrainer(
                ray_train_loop, train_loop_config=cfg,
                torch_config=TorchConfig(backend="gloo", timeout_s=int(timeout)),
                scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False, **scaling),
                run_config=RunConfig(name="aimodels-ddp",
                                     storage_path=str(Path(storage_path or tmp).resolve())))
            outcome: dict[str, Any] = {}

            def fit() -> None:
                try:
                    outcome["result"] = trainer.fit()
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    outcome["error"] = error

            t1 = time.monotonic()
            thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
            thread.start()
            thread.join(timeout)
            times["fit_s"] = time.monotonic() - t1
            if thread.is_alive():
                raise TimeoutError(f"Ray Train's fit() ran past its timeout of {timeout} s")
            if "error" in outcome:
                raise outcome["error"]
            result = outcome["result"]
            if result.error is not None:
                raise result.error
            if result.checkpoint is None:
                raise RuntimeError("Ray Train finished without the checkpoint rank 0 reports")
            with result.checkpoint.as_directory() as directory:
                value = read_result(directory)
            metrics = dict(result.metrics or {})
    finally:
        t2 = time.monotonic()
        if started_here:
            ray.shutdown()
        times["shutdown_s"] = time.monotonic() - t2
    return {"losses": value["losses"], "state": value["state"], "metrics": metrics,
            "api": train_api_version(), **times}
