"""Load testing a model server: closed loop, open loop, and what each one hides.

A load test answers "how many requests per second, at what latency?". How the requests
are *generated* decides what the answer means.

**Closed loop** (`closed_loop`): C workers, each sending its next request as soon as its
previous one is answered, until N are done. It measures a system with exactly C users
who never think and never give up. Its weakness is that the load adapts to the server:
when the server stalls for a second, the workers simply stop sending, so the requests that
real users would have sent during the stall are never sent and never measured. The stall
shows up as C slow samples instead of hundreds, and at most C requests ever queue. This is
*coordinated omission* (Gil Tene's name for it): the measuring tool coordinates with the
system it measures and omits exactly the bad samples. Closed loops are right for
"maximum throughput at concurrency C", misleading for "latency users will see".

**Open loop** (`open_loop`): requests arrive on a schedule fixed before the test starts,
Poisson arrivals at a set rate (exponential gaps from a seeded NumPy generator, so a run
is repeatable), and each is launched on time whether or not earlier ones have been
answered. If the server is slower than the arrival rate, the queue grows and latency grows
with it, as it would in production. Latency is measured from the *scheduled* send time,
not from when the request actually left: if the client itself falls behind (a full
connection pool, a busy event loop) that delay is charged to the measurement instead of
being hidden. `LoadResult.max_lateness_s` reports how late the client was; if it is large,
the load generator, not the server, was the bottleneck (on a 2-core machine the client and
server share the CPU, so check it).

Two things keep the generator from measuring itself. Each concurrent request has its own
connection (one `httpx.AsyncClient` with many connections spends more CPU per request the
more connections it holds), and the garbage collector's view is frozen during a run (a
full collection in a process that imported torch stops everything for ~0.15 s). Optional
``warmup`` requests open the connections before the clock starts.

Both generators are bounded: a per-request timeout (a request with no answer in time is
an error, ``"timeout"``) and an overall deadline (requests still running are cancelled and
counted as ``"deadline"`` errors; requests not yet sent are reported as ``unsent``).
An error is a non-2xx status (counted by its code, e.g. ``"503"``), a transport exception
(counted by its class name, e.g. ``"ConnectError"``), a body that is not JSON
(``"bad-json"``) or an answer the optional `check` callback rejects (``"check"``).

Percentiles use the nearest-rank definition (see `percentile`). Throughput counts
successful answers only, divided by the wall time from the first send to the last answer.

Command line: ``aimodels loadtest http://127.0.0.1:8000 --model digits --concurrency 32
--requests 1000 [--mode open --rate 200] [--warmup 64] [--json out.json]`` sends v2
inference requests with one digits test image each; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

__all__ = [
    "LoadResult",
    "Progress",
    "closed_loop",
    "decode_v2_response",
    "main",
    "open_loop",
    "percentile",
    "poisson_offsets",
    "v2_request_body",
]

BodyFn = Callable[[int], Any]
"""Maps a request's index (0 … N-1) to its body: a JSON-able object, or bytes already
encoded as JSON (cheaper for the load generator, which shares the CPU with the server)."""
Check = Callable[[int, Any], bool]
"""Given a request's index and its decoded JSON answer, says whether the answer is right."""

MAX_ERROR_SAMPLES = 10
_JSON_HEADERS = {"content-type": "application/json"}
_V2_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
              "BOOL": np.bool_}


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) by the nearest-rank definition.

    Sort the n samples; the q-th percentile is the smallest sample such that at least q% of
    the samples are ≤ it, that is the one at rank ``ceil(q / 100 · n)`` (ranks counted
    from 1; q = 0 gives the minimum). It is always one of the measured values, never an
    interpolation between two, which is what a latency objective ("99% of requests within
    X ms") means. NumPy calls this ``method="inverted_cdf"``. Returns NaN for no samples.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if len(samples) == 0:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered) / 100))
    return float(ordered[rank - 1])


@dataclass
class Progress:
    """Live counts a running generator updates, for whoever watches it (e.g. a sampler
    recording in-flight requests beside a replica count while the load runs)."""

    sent: int = 0
    done: int = 0
    errors: int = 0

    @property
    def in_flight(self) -> int:
        return self.sent - self.done


@dataclass
class LoadResult:
    """What a load test measured.

    `latencies_s` holds one latency per *successful* request, in completion order (for the
    open loop measured from the scheduled send time). `responses` (only with
    ``keep_responses=True``) holds each request's decoded JSON answer by request index,
    None where the request failed.
    """

    mode: str
    requests: int
    errors: int
    duration_s: float
    latencies_s: list[float]
    concurrency: int | None = None
    rate_rps: float | None = None
    unsent: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    max_lateness_s: float = 0.0
    responses: list[Any] | None = None

    @property
    def ok(self) -> int:
        return self.requests - self.errors

    @property
    def throughput_rps(self) -> float:
        """Successful answers per second of wall time."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies_s, 50)

    @property
    def p95(self) -> float:
        return percentile(self.latencies_s, 95)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_s, 99)

    def summary(self) -> str:
        """One line for a terminal."""
        load = (f"concurrency {self.concurrency}" if self.mode == "closed"
                else f"rate {self.rate_rps:.1f}/s")
        return (f"{self.mode} loop, {load}: {self.requests} requests in {self.duration_s:.2f} s, "
                f"{self.throughput_rps:.1f} req/s, p50 {1e3 * self.p50:.1f} ms, "
                f"p95 {1e3 * self.p95:.1f} ms, p99 {1e3 * self.p99:.1f} ms, "
                f"{self.errors} errors{_errors_text(self.errors_by_status)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (latencies in seconds; responses are left out)."""
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate_rps": self.rate_rps,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "unsent": self.unsent,
            "errors_by_status": dict(self.errors_by_status),
            "error_samples": list(self.error_samples),
            "duration_s": self.duration_s,
            "throughput_rps": self.throughput_rps,
            "p50_s": _none_if_nan(self.p50),
            "p95_s": _none_if_nan(self.p95),
            "p99_s": _none_if_nan(self.p99),
            "max_lateness_s": self.max_lateness_s,
            "latencies_s": list(self.latencies_s),
        }


def _errors_text(by_status: Mapping[str, int]) -> str:
    if not by_status:
        return ""
    return " (" + ", ".join(f"{key}: {n}" for key, n in sorted(by_status.items())) + ")"


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


# ---------------------------------------------------------------- the v2 JSON format

def v2_request_body(inputs: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict:
    """An Open Inference Protocol (v2) request with one input tensor, data row-major flat."""
    if datatype not in _V2_DTYPES:
        raise ValueError(f"datatype must be one of {sorted(_V2_DTYPES)}, got {datatype!r}")
    array = np.asarray(inputs, dtype=_V2_DTYPES[datatype])
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                        "data": array.ravel().tolist()}]}


def decode_v2_response(payload: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The outputs of a v2 response as named NumPy arrays of their declared shape and type."""
    try:
        outputs = payload["outputs"]
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"expected a v2 response with 'outputs', got {str(payload)[:200]}") from exc
    arrays = {}
    for output in outputs:
        dtype = _V2_DTYPES.get(output["datatype"])
        if dtype is None:
            raise ValueError(f"unsupported v2 datatype {output['datatype']!r} "
                             f"in output {output['name']!r}")
        arrays[output["name"]] = np.asarray(output["data"], dtype=dtype).reshape(
            output["shape"])
    return arrays


# ---------------------------------------------------------------- sending and recording

async def _send(client: httpx.AsyncClient, url: str, body: Any,
                timeout_s: float) -> tuple[str | None, Any]:
    """POST one request. Returns (None, JSON answer) or (error key, error text)."""
    if isinstance(body, bytes):  # pre-encoded JSON: less work for the load generator
        request = client.post(url, content=body, headers=_JSON_HEADERS)
    else:
        request = client.post(url, json=body)
    try:
        response = await asyncio.wait_for(request, timeout_s)
    except asyncio.TimeoutError:
        return "timeout", f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:  # connection refused, reset, protocol errors, ...
        return type(exc).__name__, f"{type(exc).__name__}: {exc}"
    if not 200 <= response.status_code < 300:
        return str(response.status_code), f"HTTP {response.status_code}: {response.text[:200]}"
    try:
        return None, response.json()
    except ValueError:
        text = f"HTTP {response.status_code}, body not JSON: {response.text[:200]!r}"
        return "bad-json", text


class _Recorder:
    """Collects latencies, errors and (optionally) answers as requests finish."""

    def __init__(self, planned: int, check: Check | None, keep_responses: bool,
                 progress: Progress | None) -> None:
        self.check = check
        self.progress = progress if progress is not None else Progress()
        self.responses: list[Any] | None = [None] * planned if keep_responses else None
        self.in_flight: dict[int, float] = {}
        self.sent = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []
        self.last_finish = 0.0

    def started(self, index: int, t0: float) -> None:
        self.in_flight[index] = t0
        self.sent += 1
        self.progress.sent += 1

    def finished(self, index: int, error: str | None, payload: Any) -> None:
        t0 = self.in_flight.pop(index)
        self.last_finish = time.perf_counter()
        self.progress.done += 1
        if error is None and self.check is not None and not self._passes(index, payload):
            error, payload = "check", f"request {index}: the check rejected {str(payload)[:200]}"
        if error is not None:
            self._error(error, payload)
            return
        self.latencies.append(self.last_finish - t0)
        if self.responses is not None:
            self.responses[index] = payload

    def _passes(self, index: int, payload: Any) -> bool:
        try:
            return bool(self.check(index, payload))
        except Exception:  # a check that crashes on an answer rejects it
            return False

    def _error(self, key: str, text: str) -> None:
        self.errors[key] += 1
        self.progress.errors += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(text)

    def abandon_in_flight(self) -> None:
        """Count requests cut off by the overall deadline."""
        for _ in list(self.in_flight):
            self._error("deadline", "cancelled by the overall deadline")
            self.progress.done += 1
        self.in_flight.clear()

    def result(self, mode: str, start: float, **load: Any) -> LoadResult:
        end = max(self.last_finish, start)
        planned = load.pop("planned")
        return LoadResult(
            mode=mode, requests=self.sent, errors=sum(self.errors.values()),
            duration_s=end - start, latencies_s=self.latencies, unsent=planned - self.sent,
            errors_by_status=dict(self.errors), error_samples=self.samples,
            responses=self.responses, **load)


class _Connections:
    """Up to `limit` HTTP connections, lent out one request at a time, first come first served.

    Why not one `httpx.AsyncClient` with `limit` connections? Its pool (httpcore) scans
    every connection on each request, so its CPU cost per request grows with the pool:
    measured here, 0.6 ms per request at 1 connection, 2.5 ms at 32 and 4.5 ms at 64
    (see encode/httpx#3215 and encode/httpcore#1035). At 32 connections the load
    generator, not the server, set the limit. One client per connection keeps the cost
    flat (~0.4 ms). `client`, if given, is shared by all requests instead (for tests
    with `httpx.ASGITransport`, or a client with special settings).
    """

    def __init__(self, limit: int, timeout_s: float,
                 client: httpx.AsyncClient | None = None) -> None:
        self.limit = limit
        self.timeout = httpx.Timeout(timeout_s)
        self.shared = client
        self.clients: list[httpx.AsyncClient] = []
        self.idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        self._ssl = ssl.create_default_context()  # made once: each new one costs ~10 ms

    async def acquire(self) -> httpx.AsyncClient:
        if self.shared is not None:
            return self.shared
        if self.idle.empty() and len(self.clients) < self.limit:
            one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            client = httpx.AsyncClient(limits=one, timeout=self.timeout, verify=self._ssl)
            self.clients.append(client)
            return client
        return await self.idle.get()

    def release(self, client: httpx.AsyncClient) -> None:
        if client is not self.shared:
            self.idle.put_nowait(client)

    async def __aenter__(self) -> _Connections:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self.clients:
            await client.aclose()


@contextlib.contextmanager
def _gc_frozen(enabled: bool) -> Iterator[None]:
    """Keep the garbage collector from pausing the load generator mid-run.

    A full collection walks every object the process holds; in a process that has
    imported torch that takes ~0.15 s here, during which the event loop stops and every
    request in flight looks 0.15 s slower: the tool measures itself. `gc.freeze()` moves
    all objects alive now to a generation the collector never scans, so collections
    during the run only look at the run's own objects (a few ms).
    """
    if not enabled:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _warm_up(connections: _Connections, url: str, body_fn: BodyFn, requests: int,
                   parallel: int, timeout_s: float) -> None:
    """Send `requests` unmeasured requests, `parallel` at a time, on the connections the
    measurement will use: opening connections and first-call costs are then not measured."""
    indices = iter(range(requests))

    async def worker() -> None:
        for index in indices:
            http = await connections.acquire()
            try:
                await _send(http, url, body_fn(index), timeout_s)
            finally:
                connections.release(http)

    await asyncio.gather(*(worker() for _ in range(min(parallel, requests))))


def _check_counts(requests: int, timeout_s: float, deadline_s: float, warmup: int) -> None:
    if not isinstance(requests, int) or requests < 1:
        raise ValueError(f"requests must be a positive int, got {requests!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not timeout_s > 0 or not deadline_s > 0:
        raise ValueError(f"timeout_s and deadline_s must be > 0, got {timeout_s}, {deadline_s}")


async def _cancel(tasks: Sequence[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _reraise(done: set[asyncio.Task]) -> None:
    """A bug in body_fn or in the generator itself must not pass as a slow server."""
    errors = [task.exception() for task in done if not task.cancelled()]  # retrieve all
    for error in errors:
        if error is not None:
            raise error


# ---------------------------------------------------------------- the two generators

async def closed_loop(url: str, body_fn: BodyFn, *, concurrency: int, requests: int,
                      timeout_s: float = 10.0, deadline_s: float = 300.0,
                      client: httpx.AsyncClient | None = None, check: Check | None = None,
                      keep_responses: bool = False, progress: Progress | None = None,
                      warmup: int = 0, freeze_gc: bool = True) -> LoadResult:
    """`concurrency` workers POST back-to-back to `url` until `requests` are done.

    Request i carries ``body_fn(i)``; each worker takes the next unsent index, so every
    index is sent once. Latency runs from the moment a request is sent to its answer.
    Each worker has its own connection (see `_Connections`), unless `client` is given:
    then all requests share it (e.g. an `httpx.ASGITransport` client in tests).
    `warmup` requests (bodies ``body_fn(0)``, ``body_fn(1)``, ...) go first, unmeasured; at
    least `concurrency` of them open every connection before the clock starts.
    `progress`, if given, is updated as requests are sent and answered. `freeze_gc`: see
    `_gc_frozen`.
    """
    _check_counts(requests, timeout_s, deadline_s, warmup)
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive int, got {concurrency!r}")
    recorder = _Recorder(requests, check, keep_responses, progress)
    with _gc_frozen(freeze_gc):
        return await _closed_loop(url, body_fn, concurrency, requests, timeout_s, deadline_s,
                                  client, recorder, warmup)


async def _closed_loop(url: str, body_fn: BodyFn, concurrency: int, requests: int,
                       timeout_s: float, deadline_s: float, client: httpx.AsyncClient | None,
                       recorder: _Recorder, warmup: int) -> LoadResult:
    indices = iter(range(requests))  # shared by the workers: asyncio never switches in next()
    async with _Connections(concurrency, timeout_s, client) as connections:
        await asyncio.wait_for(
            _warm_up(connections, url, body_fn, warmup, concurrency, timeout_s), deadline_s)

        async def worker() -> None:
            for index in indices:
                body = body_fn(index)
                recorder.started(index, time.perf_counter())
                http = await connections.acquire()  # never waits: one per worker
                try:
                    error, payload = await _send(http, url, body, timeout_s)
                finally:
                    connections.release(http)
                recorder.finished(index, error, payload)

        start = time.perf_counter()
        workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, requests))]
        done, pending = await asyncio.wait(workers, timeout=deadline_s)
        await _cancel(list(pending))
        _reraise(done)
        recorder.abandon_in_flight()
    return recorder.result("closed", start, concurrency=concurrency, planned=requests)


def poisson_offsets(rate_rps: float, requests: int, seed: int = 0) -> np.ndarray:
    """Send times (seconds after the start) of a Poisson process: exponential gaps of
    mean 1/rate from a seeded generator; the first request goes at time 0."""
    if not rate_rps > 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_rps, size=requests)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


async def open_loop(url: str, body_fn: BodyFn, *, rate_rps: float, requests: int, seed: int = 0,
                    timeout_s: float = 10.0, deadline_s: float = 300.0,
                    max_connections: int = 256, client: httpx.AsyncClient | None = None,
                    check: Check | None = None, keep_responses: bool = False,
                    progress: Progress | None = None, warmup: int = 0,
                    freeze_gc: bool = True) -> LoadResult:
    """Poisson arrivals at `rate_rps`: each request is launched at its scheduled time,
    whether or not earlier ones have been answered; latency is counted from that
    scheduled time, so waiting anywhere (server queue, client pool, late client) is
    included. The run lasts about requests / rate seconds plus the last answers.

    At most `max_connections` requests are on the wire at once; a request that finds them
    all busy waits for one (first come, first served), and that wait counts too.
    `warmup` unmeasured requests go first, up to `max_connections` at a time. `freeze_gc`:
    see `_gc_frozen`.
    """
    _check_counts(requests, timeout_s, deadline_s, warmup)
    offsets = poisson_offsets(rate_rps, requests, seed)
    recorder = _Recorder(requests, check, keep_responses, progress)
    with _gc_frozen(freeze_gc):
        result = await _open_loop(url, body_fn, offsets, timeout_s, deadline_s,
                                  max_connections, client, recorder, warmup)
    result.rate_rps = rate_rps
    return result


async def _open_loop(url: str, body_fn: BodyFn, offsets: np.ndarray, timeout_s: float,
                     deadline_s: float, max_connections: int, client: httpx.AsyncClient | None,
                     recorder: _Recorder, warmup: int) -> LoadResult:
    tasks: list[asyncio.Task] = []
    lateness = 0.0
    async with _Connections(max_connections, timeout_s, client) as connections:
        await asyncio.wait_for(
            _warm_up(connections, url, body_fn, warmup, max_connections, timeout_s), deadline_s)

        async def one(index: int, body: Any) -> None:
            http = await connections.acquire()  # waits if all connections are busy
            try:
                error, payload = await _send(http, url, body, timeout_s)
            finally:
                connections.release(http)
            recorder.finished(index, error, payload)

        async def launch_all() -> None:
            nonlocal lateness
            for index, offset in enumerate(offsets):
                scheduled = start + float(offset)
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = body_fn(index)
                lateness = max(lateness, time.perf_counter() - scheduled)
                recorder.started(index, scheduled)
                tasks.append(asyncio.create_task(one(index, body)))
            await asyncio.gather(*tasks)

        start = time.perf_counter()
        launcher = asyncio.create_task(launch_all())
        done, pending = await asyncio.wait([launcher], timeout=deadline_s)
        await _cancel([*pending, *tasks])
        _reraise(done)
        recorder.abandon_in_flight()
    result = recorder.result("open", start, planned=len(offsets))
    result.max_lateness_s = lateness
    return result


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aimodels loadtest",
        description="Send v2 inference requests (one digits test image each) to a model "
                    "server; print throughput, p50/p95/p99 latency and errors.")
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default="digits", help="model name (default digits)")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop: workers")
    parser.add_argument("--rate", type=float, default=50.0, help="open loop: requests/s")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--deadline", type=float, default=300.0, help="whole run, seconds")
    parser.add_argument("--seed", type=int, default=0, help="open loop arrival times")
    parser.add_argument("--warmup", type=int, default=0,
                        help="unmeasured requests first, on the same connections (default 0)")
    parser.add_argument("--json", type=Path, help="write the result here as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a load test from the command line; exit status 1 if any request failed."""
    args = _parser().parse_args(argv)
    from aimodels.serving.models import digits_arrays

    images = digits_arrays()["X_test"]
    bodies = [v2_request_body(image[None]) for image in images]
    url = f"{args.url.rstrip('/')}/v2/models/{args.model}/infer"

    def body_fn(i: int) -> dict:
        return bodies[i % len(bodies)]

    if args.mode == "closed":
        run = closed_loop(url, body_fn, concurrency=args.concurrency, requests=args.requests,
                          timeout_s=args.timeout, deadline_s=args.deadline, warmup=args.warmup)
    else:
        run = open_loop(url, body_fn, rate_rps=args.rate, requests=args.requests,
                        seed=args.seed, timeout_s=args.timeout, deadline_s=args.deadline,
                        warmup=args.warmup)
    result = asyncio.run(run)
    print(result.summary())
    for sample in result.error_samples[:3]:
        print(f"  error: {sample}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"url": url, **result.to_dict()}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if result.errors or result.unsent else 0


if __name__ == "__main__":
    raise SystemExit(main())
