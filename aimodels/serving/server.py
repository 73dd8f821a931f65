"""The model server: the Open Inference Protocol (KServe v2) over HTTP, on FastAPI.

Why a standard protocol. Every serving system could invent its own JSON, and then
every client, load balancer, and monitoring tool would need an adapter for each. The
Open Inference Protocol, also called the KServe v2 protocol, is the one that KServe,
NVIDIA Triton, Seldon MLServer, and others implement, so their clients (here the
official ``tritonclient``) work against this server unchanged. Specification:
https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol
(its OpenAPI file: https://github.com/open-inference/open-inference-protocol).

===========================================  ====  ====================================
route                                        verb  answers
===========================================  ====  ====================================
``/v2/health/live``                          GET   200 while the process runs
``/v2/health/ready``                         GET   200 once the models are loaded
``/v2``                                      GET   server name, version, extensions
``/v2/models/{m}[/versions/{v}]``            GET   model metadata: tensor names,
                                                   datatypes, shapes (-1 = any size)
``/v2/models/{m}[/versions/{v}]/ready``      GET   200 if that model (version) is loaded
``/v2/models/{m}[/versions/{v}]/infer``      POST  the inference itself
``/v2/repository/index``                     POST  every stored model version and state
``/v2/repository/models/{m}/load``           POST  (re)load; ``{"parameters": {"version":
                                                   3}}`` or ``{"alias": "staging"}``
``/v2/repository/models/{m}/unload``         POST  stop serving the model
``/v2/repository/models/{m}/alias``          POST  ``{"alias": "production", "version":
                                                   3}``: move an alias in the store; moving
                                                   ``production`` switches the live version
``/metrics``                                 GET   Prometheus text format
``/v1/models``, ``/v1/completions``          GET,  language models (architecture
                                             POST  ``gpt``) through OpenAI's API:
                                                   chapter 13, :mod:`aimodels.serving.llm`
===========================================  ====  ====================================

The ``/v2/repository`` routes are Triton's model repository extension
(https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_repository.md),
plus an ``alias`` route of our own. The ``version``/``alias`` parameters of ``load`` are
our own too: Triton's ``load`` takes a model configuration instead. These routes change
what the server runs, so they need ``Authorization: Bearer <token>`` with the token
from ``AIMODELS_ADMIN_TOKEN``; with no token configured they are switched off (403).
The comparison uses
`hmac.compare_digest`, which takes the same time however many leading characters of
a guess are right, so the token cannot be found one character at a time.

The request path::

    client --HTTP--> API handler: size limit, JSON, validate against the signature
                     (bad input -> 4xx with {"error": "..."}; drift monitor updated)
           --await-> DynamicBatcher queue (full -> 503 + Retry-After)
           --batch-> worker thread: concatenate the requests' rows, one
                     Servable.predict, split the outputs back per request
           <-------- API handler: keep the requested outputs, JSON response
                     (metrics: counter by status, latency histograms, batch size)

Versions. At start the server serves each model's ``production`` alias; that version
answers ``/v2/models/{m}/infer``. ``/v2/models/{m}/versions/{v}/...`` serves any
stored version of a served model: it is loaded on its first request and then kept
loaded (with its own batcher) until the model is unloaded. Switching ``production``
loads the new version first, then swaps one dictionary entry: requests already queued
on the old version finish there, new ones go to the new version, none is lost.

Bad input never reaches the model. Each input must have the signature's name,
datatype and shape (-1 matches any size); ``data`` may be flat or nested (row-major)
but must hold exactly as many numbers as the shape says, all finite (JSON has no NaN,
but Python's parser accepts the literal ``NaN``, and ``1e999`` parses to infinity).
Pixel values outside 0-16 are *not* rejected: the protocol has no range field, and a
slowly drifting range is what the input-drift monitor (``/metrics``) is for.

Shutdown. On SIGTERM uvicorn stops accepting connections, waits for the requests in
flight (they finish through the batcher), then runs the app's shutdown, which drains
the batchers; the process exits 0. An orchestrator sends SIGTERM before SIGKILL for
exactly this reason.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import aimodels
from aimodels.checkpoint import IntegrityError, load_extra_file
from aimodels.serving.batching import DynamicBatcher, QueueFullError
from aimodels.serving.llm import LLMService, add_openai_routes
from aimodels.serving.metrics import DriftMonitor, ServiceMetrics, mean_intensity
from aimodels.serving.models import Servable, digits_arrays
from aimodels.serving.store import ModelNotFoundError, ModelStore

__all__ = [
    "ADMIN_TOKEN_ENV",
    "DRIFT_REFERENCE_FILE",
    "FROM_ENV",
    "ProtocolError",
    "create_app",
    "parse_infer_request",
    "run_server",
]

logger = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "AIMODELS_ADMIN_TOKEN"
DRIFT_REFERENCE_FILE = "drift_reference.json"  # optional extra file of a stored version
SERVER_NAME = "aimodels"
PLATFORM = "pytorch"
UNKNOWN_MODEL_LABEL = "_unknown"  # metrics label for names we do not serve (bounded labels)


class _FromEnv:
    def __repr__(self) -> str:
        return f"<read ${ADMIN_TOKEN_ENV}>"


FROM_ENV: Any = _FromEnv()  # default of create_app(admin_token=...)

# v2 datatype -> NumPy dtype, and which kinds of JSON numbers each accepts.
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype) for name, dtype in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
        "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
        "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    }.items()
}


class ProtocolError(Exception):
    """An error the client gets as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, self.status, headers=self.headers)


# =============================================================================== requests


@dataclass
class InferRequest:
    """A validated inference request: arrays by input name, wanted outputs, the id."""

    inputs: dict[str, np.ndarray]
    outputs: list[str]
    id: str | None
    rows: int


def parse_infer_request(body: Any, signature: Mapping[str, Any]) -> InferRequest:
    """Check a v2 inference request against a model signature; raise ProtocolError(400).

    Every input of the signature must be given once, with the signature's datatype and
    a shape that matches it (-1 matches any size), and all inputs must have the same
    number of rows (the batch dimension). ``outputs`` (optional) must name outputs of
    the signature; without it, every output is returned.
    """
    if not isinstance(body, dict):
        raise ProtocolError(400, f"the request body must be a JSON object, got {_kind(body)}")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, f"'id' must be a string, got {_kind(request_id)}")
    inputs = _parse_inputs(body.get("inputs"), signature["inputs"])
    rows = {name: len(array) for name, array in inputs.items()}
    if len(set(rows.values())) > 1:
        raise ProtocolError(400, f"all inputs must have the same number of rows, got {rows}")
    outputs = _parse_outputs(body.get("outputs"), signature["outputs"])
    return InferRequest(inputs, outputs, request_id, next(iter(rows.values())))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _parse_inputs(raw: Any, specs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    expected = [spec["name"] for spec in specs]
    if not isinstance(raw, list) or not raw:
        raise ProtocolError(
            400, f"'inputs' must be a non-empty array of tensors; this model expects {expected}"
        )
    by_name = {spec["name"]: spec for spec in specs}
    arrays: dict[str, np.ndarray] = {}
    for tensor in raw:
        if not isinstance(tensor, dict):
            raise ProtocolError(400, f"each input must be an object, got {_kind(tensor)}")
        name = tensor.get("name")
        if name not in by_name:
            raise ProtocolError(400, f"unknown input {name!r}; this model expects {expected}")
        if name in arrays:
            raise ProtocolError(400, f"input {name!r} is given twice")
        arrays[name] = _parse_tensor(tensor, by_name[name])
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise ProtocolError(400, f"missing input(s) {missing}; this model expects {expected}")
    return arrays


def _parse_tensor(tensor: dict[str, Any], spec: dict[str, Any]) -> np.ndarray:
    """One input tensor as a NumPy array of the signature's dtype and the given shape."""
    name, datatype = spec["name"], spec["datatype"]
    if tensor.get("datatype") != datatype:
        raise ProtocolError(
            400, f"input {name!r}: expected datatype {datatype}, got {tensor.get('datatype')!r}"
        )
    shape = _parse_shape(name, tensor.get("shape"), spec["shape"])
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ProtocolError(
            400, f"input {name!r}: 'data' must be a (flat or nested) array, got {_kind(data)}"
        )
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(
            400, f"input {name!r}: 'data' must be numbers, flat or in nested arrays of equal "
            "length (a ragged or mixed array was sent)"
        ) from None
    dtype = DATATYPES[datatype]
    allowed = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}[dtype.kind]
    if array.size and array.dtype.kind not in allowed:
        odd = next((x for x in array.ravel().tolist()
                    if not isinstance(x, (int, float)) or isinstance(x, bool)), None)
        example = "null" if odd is None else f"{type(odd).__name__} {odd!r:.20}"
        raise ProtocolError(
            400, f"input {name!r}: {datatype} data must be {_kinds_text(dtype.kind)}, "
            f"got {example} among them (NumPy dtype {array.dtype})"
        )
    needed = math.prod(shape)
    if array.size != needed:
        raise ProtocolError(
            400, f"input {name!r}: shape {shape} needs {needed} values, 'data' has {array.size}"
        )
    return _convert(name, array, dtype, shape)


def _parse_shape(name: str, shape: Any, expected: list[int]) -> list[int]:
    ok = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if not ok:
        raise ProtocolError(
            400, f"input {name!r}: 'shape' must be an array of non-negative integers, "
            f"got {shape!r}"
        )
    matches = len(shape) == len(expected) and all(
        e == -1 or d == e for d, e in zip(shape, expected, strict=True)
    )
    if not matches:
        raise ProtocolError(
            400, f"input {name!r}: expected shape {expected} (-1 = any size), got {shape}"
        )
    if math.prod(shape) == 0:
        raise ProtocolError(400, f"input {name!r}: shape {shape} is empty; send at least one row")
    return shape


def _kinds_text(kind: str) -> str:
    return {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans"}[kind]


def _convert(name: str, array: np.ndarray, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """Cast to the signature's dtype, refusing values the dtype cannot hold."""
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ProtocolError(
                400, f"input {name!r}: values must lie in [{info.min}, {info.max}] for {dtype}"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(dtype).reshape(shape)
    if dtype.kind == "f":
        bad = ~np.isfinite(converted)
        if bad.any():
            where = np.argwhere(bad)[0].tolist()
            raise ProtocolError(
                400, f"input {name!r}: contains {int(bad.sum())} NaN or infinite value(s) "
                f"(the first at index {where}); only finite numbers are accepted"
            )
    return converted


def _parse_outputs(raw: Any, specs: list[dict[str, Any]]) -> list[str]:
    available = [spec["name"] for spec in specs]
    if raw is None:
        return available
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise ProtocolError(400, "'outputs' must be an array of objects like {'name': ...}")
    wanted = []
    for output in raw:
        name = output.get("name")
        if name not in available:
            raise ProtocolError(400, f"unknown output {name!r}; this model has {available}")
        if name not in wanted:
            wanted.append(name)
    return wanted


def output_tensor(name: str, datatype: str, array: np.ndarray) -> dict[str, Any]:
    """A v2 response tensor: shape, datatype and the data flattened in row-major order."""
    return {"name": name, "datatype": datatype, "shape": list(array.shape),
            "data": array.ravel().tolist()}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes with 413.

    The declared ``Content-Length`` is checked first, before reading anything; the
    bytes actually received are counted too, because a chunked body declares no length
    and a declared length can be wrong.
    """
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported; send plain JSON")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ProtocolError(400, f"Content-Length must be an integer, got {declared!r}")
        if int(declared) > limit:
            raise ProtocolError(
                413, f"the request body is {int(declared)} bytes; the limit is {limit} bytes"
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(
                413, f"the request body exceeds the limit of {limit} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, *, allow_empty: bool = False) -> Any:
    """The body parsed as JSON; 400 with the parser's message if it is not JSON."""
    if "inference-header-content-length" in request.headers:
        raise ProtocolError(
            400, "binary tensor data (Inference-Header-Content-Length) is not supported; "
            "send JSON tensors (tritonclient: binary_data=False on inputs and outputs)"
        )
    body = await read_body(request, limit)
    if allow_empty and not body.strip():
        return {}
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(400, "the request body is nested too deeply") from None


# =============================================================================== models


@dataclass
class Deployment:
    """One loaded model version and the batcher in front of it."""

    servable: Servable
    batcher: DynamicBatcher

    @property
    def name(self) -> str:
        return self.servable.name

    @property
    def version(self) -> int:
        return self.servable.version


def predict_batch(servable: Servable, items: list[dict[str, np.ndarray]]) -> list[dict]:
    """Concatenate the requests' rows, run the model once, split the outputs back.

    Runs in the batcher's worker thread. Each item may hold several rows.
    """
    if len(items) == 1:
        return [servable.predict(items[0])]
    rows = [len(next(iter(item.values()))) for item in items]
    inputs = {name: np.concatenate([item[name] for item in items]) for name in items[0]}
    outputs = servable.predict(inputs)
    for name, array in outputs.items():
        if len(array) != sum(rows):
            raise RuntimeError(
                f"output {name!r} has {len(array)} rows for a batch of {sum(rows)} input rows"
            )
    offsets = np.cumsum(rows)[:-1]
    parts = {name: np.split(array, offsets) for name, array in outputs.items()}
    return [{name: split[i] for name, split in parts.items()} for i in range(len(items))]


class ModelService:
    """What is loaded, which version answers by default, and the batchers.

    All methods run on the event loop; loading from disk runs in a thread.
    """

    def __init__(
        self,
        store: ModelStore,
        metrics: ServiceMetrics,
        *,
        models: list[str] | None,
        batching: dict[str, Any],
        drift_window: int,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.models = models
        self.batching = batching
        self.drift_window = drift_window
        self.defaults: dict[str, int] = {}  # served model -> version of /v2/models/{m}/infer
        self.deployments: dict[tuple[str, int], Deployment] = {}
        self.drift: dict[str, DriftMonitor | None] = {}
        self.known: set[str] = set()  # every name ever served (metrics labels)
        self.skip: set[str] = set()  # served elsewhere (the language models on /v1)
        self.ready = False
        self._locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        names = self.models if self.models is not None else await asyncio.to_thread(
            self.store.models
        )
        for name in names:
            if name in self.skip:
                continue
            try:
                await self.load(name, "production")
            except ProtocolError as exc:
                if self.models is not None:  # asked for by name: fail loudly
                    raise RuntimeError(f"cannot serve model {name!r}: {exc.message}") from None
                logger.warning("not serving %r: %s", name, exc.message)
        self.ready = True
        logger.info("serving %s", {name: f"v{v}" for name, v in self.defaults.items()})

    async def stop(self) -> None:
        """Drain and stop every batcher (queued requests still get their answers)."""
        self.ready = False
        deployments = list(self.deployments.values())
        await asyncio.gather(*(d.batcher.stop() for d in deployments))

    # ------------------------------------------------------------------ lookups

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _check_served(self, name: str) -> None:
        if name not in self.defaults:
            raise ProtocolError(
                404, f"model {name!r} is not served; served models: {sorted(self.defaults)}"
            )

    async def deployment(self, name: str, version: int | None = None) -> Deployment:
        """The deployment answering `name` (at `version`, loaded on demand)."""
        self._check_served(name)
        if version is None:
            version = self.defaults[name]
        found = self.deployments.get((name, version))
        return found if found is not None else await self._load_version(name, version)

    async def _load_version(self, name: str, version: int) -> Deployment:
        async with self._lock(name):
            self._check_served(name)  # it may have been unloaded while we waited
            found = self.deployments.get((name, version))
            if found is not None:
                return found
            try:
                servable = await asyncio.to_thread(Servable.from_store, self.store, name, version)
            except IntegrityError as exc:  # a damaged file: refuse it, loudly
                raise ProtocolError(500, str(exc)) from None
            except (ModelNotFoundError, ValueError) as exc:
                raise ProtocolError(404, str(exc)) from None
            if name not in self.drift:
                self.drift[name] = await asyncio.to_thread(self._drift_monitor, servable)
            batcher = DynamicBatcher(
                partial(predict_batch, servable),
                on_batch=partial(self.metrics.observe_batch, name),
                **self.batching,
            )
            await batcher.start()
            deployment = Deployment(servable, batcher)
            self.deployments[(name, version)] = deployment
            self.known.add(name)
            logger.info("loaded %s version %d", name, version)
            return deployment

    def _drift_monitor(self, servable: Servable) -> DriftMonitor | None:
        """Reference feature values from the stored version, or the digits training set."""
        try:
            folder = self.store.path(servable.name, servable.version)
            stored = json.loads(load_extra_file(folder, DRIFT_REFERENCE_FILE))
            reference = np.asarray(stored["values"], dtype=np.float64)
        except FileNotFoundError:
            if servable.config.get("architecture") != "digits_mlp":
                return None
            reference = mean_intensity(digits_arrays()["X_train"])
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("no drift monitor for %r: bad %s: %s", servable.name,
                           DRIFT_REFERENCE_FILE, exc)
            return None
        return DriftMonitor(reference, window=self.drift_window)

    def observe_inputs(self, name: str, request: InferRequest) -> None:
        """Update the drift gauge with the mean intensity of each input row."""
        monitor = self.drift.get(name)
        if monitor is None:
            return
        first = next(iter(request.inputs.values()))
        value = monitor.update(mean_intensity(first))
        if value is not None:
            self.metrics.input_drift_psi.labels(name).set(value)

    # ------------------------------------------------------------------ admin actions

    async def resolve(self, name: str, ref: int | str) -> int:
        try:
            return await asyncio.to_thread(self.store.resolve, name, ref)
        except (ModelNotFoundError, ValueError) as exc:
            raise ProtocolError(404, str(exc)) from None

    async def load(self, name: str, ref: int | str) -> Deployment:
        """Serve `name` with `ref` (version or alias) as its default version."""
        version = await self.resolve(name, ref)
        self.defaults.setdefault(name, version)  # mark as served so _load_version may run
        try:
            deployment = await self._load_version(name, version)
        except BaseException:
            if not any(key[0] == name for key in self.deployments):
                self.defaults.pop(name, None)
            raise
        self.defaults[name] = version  # the switch: one dictionary assignment
        self.metrics.set_model_version(name, version)
        return deployment

    async def unload(self, name: str) -> None:
        """Stop serving `name`; requests already queued still get their answers."""
        await self.resolve(name, "latest")  # 404 for a name the store does not have
        async with self._lock(name):
            self.defaults.pop(name, None)
            keys = [key for key in self.deployments if key[0] == name]
            gone = [self.deployments.pop(key) for key in keys]
        for key in keys:
            self.metrics.queue_depth.remove(name, str(key[1]))
        self.metrics.set_model_version(name, None)
        await asyncio.gather(*(d.batcher.stop() for d in gone))

    async def set_alias(self, name: str, alias: str, version: int | str) -> int:
        """Point `alias` at `version` in the store; for production, switch serving to it."""
        number = await self.resolve(name, version)
        if alias == "production" and name in self.defaults:
            await self._load_version(name, number)  # load before switching
        try:
            await asyncio.to_thread(self.store.set_alias, name, alias, number)
        except ValueError as exc:
            raise ProtocolError(400, str(exc)) from None
        if alias == "production" and name in self.defaults:
            self.defaults[name] = number
            self.metrics.set_model_version(name, number)
        return number

    def index(self, ready_only: bool) -> list[dict[str, str]]:
        entries = []
        for name in self.store.models():
            for version in self.store.versions(name):
                loaded = (name, version) in self.deployments
                if ready_only and not loaded:
                    continue
                default = self.defaults.get(name) == version
                reason = "default version" if default else ("" if loaded else "not loaded")
                entries.append({"name": name, "version": str(version),
                                "state": "READY" if loaded else "UNAVAILABLE", "reason": reason})
        return entries

    def refresh_queue_gauges(self) -> None:
        for (name, version), deployment in self.deployments.items():
            self.metrics.queue_depth.labels(name, str(version)).set(deployment.batcher.queue_depth)


# =============================================================================== the app


def create_app(
    store: ModelStore | str | os.PathLike[str],
    *,
    models: list[str] | None = None,
    max_batch_size: int = 16,
    max_delay_ms: float = 5.0,
    max_queue_size: int = 1024,
    max_body_bytes: int = 16 * 2**20,
    admin_token: str | None = FROM_ENV,
    drift_window: int = 256,
    llm_max_tokens: int = 256,
    llm_num_blocks: int | None = None,
    llm_block_size: int = 16,
    llm_max_batch: int = 16,
    llm_mode: str = "continuous",
    llm_prefix_caching: bool = False,
) -> FastAPI:
    """Build the v2 inference app over a model store (see the module docstring).

    `models` limits which stored models are served (default: all with a
    ``production`` alias). `max_batch_size` counts requests (each may carry several
    rows); `max_delay_ms` and `max_queue_size` go to each version's `DynamicBatcher`.
    Bodies over `max_body_bytes` get 413. `admin_token` defaults to
    ``$AIMODELS_ADMIN_TOKEN``; None or empty switches the ``/v2/repository`` routes
    off. `drift_window` is the number of recent input rows the drift PSI is computed on.
    Models whose config says ``"architecture": "gpt"`` are served on ``/v1`` by an
    `LLMEngine` each instead: `llm_max_tokens` caps a reply, `llm_num_blocks` (default:
    room for `llm_max_batch` full contexts) and `llm_block_size` size the KV cache, and
    `llm_mode` is ``continuous`` or ``static`` batching; `llm_prefix_caching` reuses
    the cached blocks of prompts that start alike.
    """
    if not isinstance(store, ModelStore):
        store = ModelStore(Path(store))
    if admin_token is FROM_ENV:
        admin_token = os.environ.get(ADMIN_TOKEN_ENV)
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    metrics = ServiceMetrics()
    batching = {"max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms,
                "max_queue_size": max_queue_size}
    DynamicBatcher(lambda items: items, **batching)  # check the settings now, not at start
    service = ModelService(store, metrics, models=models, batching=batching,
                           drift_window=drift_window)
    llm = LLMService(store, metrics, models=models, max_tokens=llm_max_tokens,
                     num_blocks=llm_num_blocks, block_size=llm_block_size,
                     max_batch=llm_max_batch, mode=llm_mode,
                     prefix_caching=llm_prefix_caching)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(llm.start)
        service.skip = set(llm.engines)
        await service.start()
        # Once torch and the models are loaded, a full garbage collection walks millions of
        # objects and pauses the event loop for ~100 ms, a visible spike in p99. Freezing
        # what exists now moves it out of the collector's reach; new garbage is still freed.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await service.stop()
            await asyncio.to_thread(llm.stop)

    app = FastAPI(title="aimodels model server", version=aimodels.__version__,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.metrics = metrics
    app.state.llm = llm
    _add_error_handlers(app)
    _add_health_routes(app, service)
    _add_inference_routes(app, service, metrics, max_body_bytes)
    _add_admin_routes(app, service, admin_token or None, max_body_bytes)
    add_openai_routes(app, llm, metrics, read_json, max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": f"internal server error: {type(exc).__name__}"}, 500)


def _parse_version(version: str) -> int:
    if not (version.isascii() and version.isdigit()):
        raise ProtocolError(404, f"no model version {version!r}: versions are integers")
    return int(version)


def _model_metadata(service: ModelService, deployment: Deployment) -> dict[str, Any]:
    signature = deployment.servable.signature
    return {
        "name": deployment.name,
        "versions": [str(v) for v in service.store.versions(deployment.name)],
        "platform": PLATFORM,
        "inputs": signature["inputs"],
        "outputs": signature["outputs"],
    }


def _add_health_routes(app: FastAPI, service: ModelService) -> None:
    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"error": "the server is not ready"}, 503)
        return JSONResponse({"ready": True})

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": aimodels.__version__,
                "extensions": ["model_repository"]}

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> dict[str, Any]:
        return _model_metadata(service, await service.deployment(name))

    @app.get("/v2/models/{name}/versions/{version}")
    async def version_metadata(name: str, version: str) -> dict[str, Any]:
        return _model_metadata(service, await service.deployment(name, _parse_version(version)))

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> dict[str, Any]:
        service._check_served(name)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def version_ready(name: str, version: str) -> dict[str, Any]:
        number = _parse_version(version)
        service._check_served(name)
        if (name, number) not in service.deployments:
            await service.resolve(name, number)  # 404 if the store lacks it
            raise ProtocolError(
                503, f"model {name!r} version {number} is stored but not loaded yet; "
                "its first infer or metadata request loads it"
            )
        return {"name": name, "version": str(number), "ready": True}


def _add_inference_routes(
    app: FastAPI, service: ModelService, metrics: ServiceMetrics, limit: int
) -> None:
    async def infer(request: Request, name: str, version: str | None) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            number = None if version is None else _parse_version(version)
            deployment = await service.deployment(name, number)
            parsed = parse_infer_request(await read_json(request, limit),
                                         deployment.servable.signature)
            service.observe_inputs(name, parsed)
            if not deployment.batcher.running:  # unloaded between lookup and now
                raise ProtocolError(503, f"model {name!r} is being unloaded", {"Retry-After": "1"})
            outputs = await deployment.batcher.submit(parsed.inputs)
            response = _infer_response(deployment, parsed, outputs)
            status = 200
            return JSONResponse(response)
        except ProtocolError as exc:
            status = exc.status
            return exc.response()
        except QueueFullError as exc:
            status = 503
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
            return JSONResponse({"error": str(exc)}, 503, headers=headers)
        except Exception as exc:  # the model itself failed on this request
            logger.exception("inference failed for model %r", name)
            return JSONResponse(
                {"error": f"the model failed on this request: {type(exc).__name__}: {exc}"}, 500
            )
        finally:
            label = name if name in service.known else UNKNOWN_MODEL_LABEL
            metrics.observe_request(label, status, time.perf_counter() - start)

    @app.post("/v2/models/{name}/infer")
    async def infer_default(request: Request, name: str) -> Response:
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        service.refresh_queue_gauges()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _infer_response(
    deployment: Deployment, parsed: InferRequest, outputs: dict[str, np.ndarray]
) -> dict[str, Any]:
    datatypes = {spec["name"]: spec["datatype"] for spec in deployment.servable.signature[
        "outputs"]}
    response: dict[str, Any] = {"model_name": deployment.name,
                                "model_version": str(deployment.version)}
    if parsed.id is not None:
        response["id"] = parsed.id
    response["outputs"] = [output_tensor(name, datatypes[name], outputs[name])
                           for name in parsed.outputs]
    return response


# =============================================================================== admin


def _check_admin(request: Request, token: str | None) -> None:
    """401 without a valid bearer token; 403 when admin routes are switched off."""
    if not token:
        raise ProtocolError(
            403, f"admin routes are disabled: start the server with {ADMIN_TOKEN_ENV} set "
            "to enable them"
        )
    challenge = {"WWW-Authenticate": "Bearer"}
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        raise ProtocolError(401, "missing 'Authorization: Bearer <token>' header", challenge)
    if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
        raise ProtocolError(401, "invalid admin token", challenge)


def _load_ref(body: Any) -> int | str:
    """The version or alias a load request asks for; ``production`` by default."""
    if not isinstance(body, dict):
        raise ProtocolError(400, f"the load request must be a JSON object, got {_kind(body)}")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "'parameters' must be an object")
    unknown = sorted(set(parameters) - {"version", "alias"})
    if unknown:
        raise ProtocolError(
            400, f"unsupported load parameter(s) {unknown}; use 'version' or 'alias'"
        )
    if "version" in parameters and "alias" in parameters:
        raise ProtocolError(400, "give 'version' or 'alias', not both")
    ref = parameters.get("version", parameters.get("alias", "production"))
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        raise ProtocolError(400, f"'version' must be an integer and 'alias' a string, got {ref!r}")
    return ref


def _add_admin_routes(
    app: FastAPI, service: ModelService, token: str | None, limit: int
) -> None:
    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        _check_admin(request, token)
        body = await read_json(request, limit, allow_empty=True)
        ready_only = bool(body.get("ready", False)) if isinstance(body, dict) else False
        return JSONResponse(await asyncio.to_thread(service.index, ready_only))

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(request: Request, name: str) -> dict[str, str]:
        _check_admin(request, token)
        ref = _load_ref(await read_json(request, limit, allow_empty=True))
        deployment = await service.load(name, ref)
        return {"name": name, "version": str(deployment.version), "state": "READY"}

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(request: Request, name: str) -> dict[str, str]:
        _check_admin(request, token)
        await read_json(request, limit, allow_empty=True)  # parameters are accepted, unused
        await service.unload(name)
        return {"name": name, "state": "UNAVAILABLE"}

    @app.post("/v2/repository/models/{name}/alias")
    async def repository_alias(request: Request, name: str) -> dict[str, str]:
        _check_admin(request, token)
        body = await read_json(request, limit)
        if not isinstance(body, dict) or not isinstance(body.get("alias"), str) or not isinstance(
            body.get("version"), int | str
        ) or isinstance(body.get("version"), bool):
            raise ProtocolError(
                400, 'expected {"alias": "<name>", "version": <integer or alias>}'
            )
        version = await service.set_alias(name, body["alias"], body["version"])
        serving = service.defaults.get(name)
        return {"name": name, "alias": body["alias"], "version": str(version),
                "serving": "" if serving is None else str(serving)}


# =============================================================================== running


def _exit_cleanly(signum: int, frame: Any) -> None:
    """After uvicorn's graceful shutdown it re-raises SIGTERM; make that an exit 0."""
    raise SystemExit(0)


def run_server(
    store_root: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    graceful_timeout: float = 30.0,
    log_level: str = "info",
    access_log: bool = False,
    **app_options: Any,
) -> None:
    """Serve the store with uvicorn until SIGTERM or Ctrl-C (blocking).

    `threads` sets ``torch.set_num_threads`` (the intra-op threads of a model call);
    on a small machine, fewer threads per call and more calls in flight often serve
    more requests per second than all cores on each call.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    app = create_app(store_root, **app_options)
    logger.info("torch threads: %d", torch.get_num_threads())
    previous = {sig: signal.signal(sig, _exit_cleanly) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log,
                    timeout_graceful_shutdown=graceful_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
