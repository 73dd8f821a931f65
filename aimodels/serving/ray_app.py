"""The same digits model as a Ray Serve deployment: replicas, request batching, autoscaling.

Our own server (`aimodels.serving.server`) is one process: one event loop, one batcher,
one model. Ray Serve runs the model in *replicas* (Ray actors, each its own process) behind
an HTTP proxy actor, and a controller actor that starts, health-checks and scales them.
What that buys: more replicas when one is not enough (on more machines, too), replicas
restarted when they die, and an autoscaler. What it costs: a Ray cluster (GCS, raylet,
dashboard agent, controller, proxy: several processes and hundreds of MB before the first
replica), a few seconds to start, and one more network hop per request (proxy to replica).
On a 2-core machine two replicas cannot run faster than one process using both cores; the
benchmark (`benchmarks/bench_serving.py`) measures exactly how it compares here.

The deployment speaks the same Open Inference Protocol (v2) JSON as our server:
``POST /v2/models/<name>/infer``, ``GET /v2/models/<name>``, ``GET /v2/health/ready``.

Three settings matter for batching:

* ``@serve.batch(max_batch_size, batch_wait_timeout_s)`` gathers concurrent calls of
  `predict_batch` into one list, like our `DynamicBatcher` (size cap and waiting window).
* ``max_ongoing_requests`` caps how many requests the proxy sends to one replica before
  it has answered one. Its default is 5, so a replica never *has* more than 5 requests to
  gather: ``max_batch_size=32`` would silently give batches of at most 5. We set it to
  `DEFAULT_MAX_ONGOING_REQUESTS` (256).
* ``num_cpus`` per replica (``ray_actor_options``): Ray only places a replica where that
  many CPUs are unclaimed. With ``ray.init(num_cpus=2)``, replicas of 1 CPU each leave no
  room for a third; we use 0.5, and one torch thread per replica.

Autoscaling (``autoscaling_config``) replaces ``num_replicas``: the controller averages
each replica's ongoing requests over ``look_back_period_s`` and aims for
``target_ongoing_requests`` per replica between ``min_replicas`` and ``max_replicas``,
waiting ``upscale_delay_s`` / ``downscale_delay_s`` before acting (defaults 30 s and
600 s: production values; the benchmark uses seconds).

Usage::

    base = start_ray(num_cpus=2)             # Ray + Serve's HTTP proxy on 127.0.0.1
    deploy(store_root, num_replicas=2)       # returns the same base URL
    ...                                      # POST {base}/v2/models/digits/infer
    shutdown()                               # Serve, then Ray: every process it started

Ray's usage statistics are switched off (``RAY_USAGE_STATS_ENABLED=0``) and so is its
dashboard; everything listens on 127.0.0.1 only.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` class
# in the signatures of the ingress methods, and Serve's ingress wrapper hides the module
# globals it would need to resolve the string "Request" (the route then asks for a query
# parameter called "request" and answers 422).
import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from ray import serve

from aimodels.serving.models import Servable
from aimodels.serving.process import free_port
from aimodels.serving.server import InferRequest, ProtocolError, output_tensor, parse_infer_request

__all__ = [
    "APP_NAME",
    "DEFAULT_MAX_ONGOING_REQUESTS",
    "DigitsDeployment",
    "deploy",
    "ray_processes",
    "ray_rss_mb",
    "replica_count",
    "shutdown",
    "start_ray",
]

APP_NAME = "aimodels"
DEFAULT_MAX_ONGOING_REQUESTS = 256
_state: dict[str, Any] = {}  # the HTTP port of the running Serve instance

api = FastAPI(title="aimodels on Ray Serve")


@api.exception_handler(HTTPException)
async def _v2_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Errors as the v2 protocol (and our server) sends them: ``{"error": "..."}``."""
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


def _fail(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _v2_response(servable: Servable, outputs: dict[str, np.ndarray],
                 request: InferRequest) -> dict[str, Any]:
    """The same v2 response body as our server's (`aimodels.serving.server`)."""
    response: dict[str, Any] = {
        "model_name": servable.name,
        "model_version": str(servable.version),
        "outputs": [output_tensor(spec["name"], spec["datatype"], outputs[spec["name"]])
                    for spec in servable.signature["outputs"] if spec["name"] in request.outputs],
    }
    if request.id is not None:
        response["id"] = request.id
    return response


@serve.deployment(max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS,
                  ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class DigitsDeployment:
    """One replica: a `Servable` loaded from the model store, behind `@serve.batch`."""

    def __init__(self, store_root: str, name: str = "digits", ref: str | int = "production",
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005,
                 torch_threads: int = 1) -> None:
        import torch

        from aimodels.serving.store import ModelStore

        torch.set_num_threads(torch_threads)
        self.servable = Servable.from_store(ModelStore(store_root), name, ref)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = 0
        self.batched_items = 0
        # Everything loaded so far (torch, the model) lives as long as the replica: keep the
        # garbage collector from rescanning it; a full scan pauses the replica ~0.1 s.
        gc.collect()
        gc.freeze()

    @api.get("/v2/health/ready")
    async def ready(self) -> dict[str, bool]:
        return {"ready": True}

    @api.get("/v2/models/{model}")
    async def metadata(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        return {"name": self.servable.name, "versions": [str(self.servable.version)],
                "platform": "pytorch", **self.servable.signature}

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        """Batches run by *this* replica (the proxy picks which replica answers)."""
        return {"pid": os.getpid(), "batches": self.batches, "items": self.batched_items}

    @api.post("/v2/models/{model}/infer")
    async def infer(self, model: str, request: Request) -> dict[str, Any]:
        self._check_model(model)
        try:
            body = await request.json()
        except ValueError as exc:
            raise _fail(400, f"request body is not JSON: {exc}") from exc
        try:  # the very checks our own server makes: one parser for both
            parsed = parse_infer_request(body, self.servable.signature)
        except ProtocolError as exc:
            raise _fail(exc.status, exc.message) from None
        name = self.servable.signature["inputs"][0]["name"]
        outputs = await self.predict_batch(parsed.inputs[name])
        return _v2_response(self.servable, outputs, parsed)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, inputs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Concatenate the requests' rows, run the model once, split the outputs back."""
        sizes = [len(x) for x in inputs]
        name = self.servable.signature["inputs"][0]["name"]
        # in a thread, so the replica's event loop keeps reading requests meanwhile
        outputs = await asyncio.to_thread(self.servable.predict,
                                          {name: np.concatenate(inputs)})
        self.batches += 1
        self.batched_items += len(inputs)
        bounds = np.cumsum([0, *sizes])
        return [{key: value[a:b] for key, value in outputs.items()}
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _check_model(self, model: str) -> None:
        if model != self.servable.name:
            raise _fail(404, f"model {model!r} is not served here; "
                             f"this deployment serves {self.servable.name!r}")


# ---------------------------------------------------------------- starting and stopping

def start_ray(num_cpus: int = 2, *, port: int | None = None,
              object_store_memory: int = 200 * 2**20, env: dict[str, str] | None = None) -> str:
    """Start a local Ray cluster (no dashboard, no usage stats) and Serve's HTTP proxy on
    127.0.0.1:`port` (a free one by default). Returns the proxy's base URL.

    `env` is set in this process's environment before Ray starts, so every Ray process
    inherits it. Example: Serve's proxy reports the ongoing requests the autoscaler acts
    on only every 10 s; ``{"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}``
    makes a short autoscaling demo react within seconds.
    """
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.update(env or {})
    port = port or free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_memory,
             log_to_driver=False, ignore_reinit_error=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except BaseException:
        ray.shutdown()
        raise
    _state["port"] = port
    return f"http://127.0.0.1:{port}"


def deploy(store_root: str | os.PathLike[str], *, name: str = "digits",
           ref: str | int = "production", num_replicas: int = 2,
           autoscaling_config: dict[str, Any] | None = None, max_batch_size: int = 32,
           batch_wait_timeout_s: float = 0.005,
           max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
           num_cpus_per_replica: float = 0.5, torch_threads: int = 1) -> str:
    """Deploy `name` at `ref` from the store (after `start_ray`) and wait until it runs.

    Fixed `num_replicas`, or `autoscaling_config` (then `num_replicas` is ignored), e.g.
    ``dict(min_replicas=1, max_replicas=2, target_ongoing_requests=8,
    upscale_delay_s=1, downscale_delay_s=5)``. Returns the base URL.
    """
    if "port" not in _state:
        raise RuntimeError("Ray Serve is not running: call start_ray() before deploy()")
    scaling: dict[str, Any] = (
        {"autoscaling_config": autoscaling_config} if autoscaling_config is not None
        else {"num_replicas": num_replicas})
    deployment = DigitsDeployment.options(
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus_per_replica}, **scaling)
    app = deployment.bind(str(Path(store_root).resolve()), name, ref, max_batch_size,
                          batch_wait_timeout_s, torch_threads)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{_state['port']}"


def replica_count(state: str = "RUNNING") -> int:
    """How many replicas of the deployment are in `state` (RUNNING, STARTING, STOPPING…)."""
    application = serve.status().applications.get(APP_NAME)
    if application is None:
        return 0
    deployment = application.deployments.get(DigitsDeployment.name)
    if deployment is None:
        return 0
    return sum(n for s, n in deployment.replica_states.items() if getattr(s, "value", s) == state)


def shutdown() -> None:
    """Stop Serve (its controller, proxy and replicas), then Ray (all its processes)."""
    import ray

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        _state.clear()


def ray_processes() -> list[Any]:
    """The processes of the Ray cluster this process started (its descendants: GCS,
    raylet, dashboard agent, workers including the Serve controller, proxy and replicas).

    Python's own multiprocessing helpers are left out: the resource tracker that a
    ``spawn`` start method leaves running (chapter 10's ``launch`` starts one) is a
    descendant too, but not Ray's, and it lives as long as this process.
    """
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" in " ".join(process.cmdline()):
                continue
        except psutil.Error:  # it exited meanwhile, or we may not read it: keep it
            pass
        found.append(process)
    return found


def ray_rss_mb() -> float:
    """Resident memory of all Ray processes, summed, in MB. Shared pages (the Python
    runtime, the torch library) count once per process, so this overstates the total."""
    import psutil

    total = 0
    for process in ray_processes():
        try:
            total += process.memory_info().rss
        except psutil.Error:  # a worker that exited meanwhile
            continue
    return total / 2**20


def wait_for_replicas(count: int, timeout_s: float = 60.0, poll_s: float = 0.5) -> float:
    """Wait until exactly `count` replicas run; return the seconds it took (or raise)."""
    start = time.monotonic()
    while replica_count() != count:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"expected {count} running replicas within {timeout_s} s, "
                               f"have {replica_count()}")
        time.sleep(poll_s)
    return time.monotonic() - start
