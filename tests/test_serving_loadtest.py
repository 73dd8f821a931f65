"""Load generators (Chapter 12): nearest-rank percentiles, bounded closed and open loops,
error counting, and the open loop's latency including the queue a closed loop hides.

Most tests drive a tiny FastAPI app in-process through `httpx.ASGITransport` (no sockets);
one starts it under uvicorn on a free 127.0.0.1 port in a thread to run the command line.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from aimodels.serving.loadtest import (  # noqa: E402
    Progress,
    closed_loop,
    decode_v2_response,
    main,
    open_loop,
    percentile,
    poisson_offsets,
    v2_request_body,
)

URL = "http://test/infer"


def make_app(service_s: float = 0.0, serial: bool = False, fail_every: int = 0):
    """An echo server: answers {"i": i}; `serial` makes it one request at a time (a server
    with a single worker); every `fail_every`-th index gets HTTP 500."""
    app = fastapi.FastAPI()
    lock = asyncio.Lock()

    app.state.calls = 0

    @app.post("/infer")
    async def infer(body: dict):
        app.state.calls += 1
        i = body["i"]
        if fail_every and i % fail_every == 0:
            return fastapi.responses.JSONResponse({"error": f"bad {i}"}, status_code=500)
        if serial:
            async with lock:
                await asyncio.sleep(service_s)
        else:
            await asyncio.sleep(service_s)
        return {"i": i}

    @app.post("/v2/models/digits/infer")
    async def v2(body: dict):
        x = np.asarray(body["inputs"][0]["data"], dtype=np.float32).reshape(
            body["inputs"][0]["shape"])
        return {"model_name": "digits",
                "outputs": [{"name": "label", "datatype": "INT64", "shape": [len(x)],
                             "data": [int(x.sum()) % 10 for x in x]}]}

    return app


def client_for(app, connections: int = 100) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), limits=limits)


def body(i: int) -> dict:
    return {"i": i}


async def run_closed(app, body_fn=body, **kwargs):
    async with client_for(app) as client:
        return await closed_loop(URL, body_fn, client=client, **kwargs)


async def run_open(app, connections: int = 100, **kwargs):
    async with client_for(app, connections) as client:
        return await open_loop(URL, body, client=client, **kwargs)


# ---------------------------------------------------------------- percentiles

def test_percentile_nearest_rank_by_hand():
    samples = [40, 15, 50, 35, 20]  # sorted: 15 20 35 40 50
    assert percentile(samples, 0) == 15
    assert percentile(samples, 5) == 15     # rank ceil(0.25) = 1
    assert percentile(samples, 30) == 20    # rank ceil(1.5) = 2
    assert percentile(samples, 40) == 20    # rank 2 exactly: 40% of samples are <= 20
    assert percentile(samples, 50) == 35    # rank ceil(2.5) = 3
    assert percentile(samples, 100) == 50
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile(list(range(1, 1001)), 99.9) == 999
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\], got 101"):
        percentile(samples, 101)


def test_percentile_matches_numpy_inverted_cdf():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 10, 99, 100, 101, 1000]:
        samples = rng.exponential(size=n)
        for q in [0, 1, 5, 25, 50, 75, 90, 95, 99, 100]:
            expected = np.percentile(samples, q, method="inverted_cdf")
            assert percentile(samples.tolist(), q) == expected, (n, q)


# ---------------------------------------------------------------- closed loop

def test_closed_loop_sends_every_index_once_and_keeps_answers():
    result = asyncio.run(run_closed(make_app(0.001), concurrency=4, requests=50,
                                    keep_responses=True))
    assert (result.requests, result.errors, result.unsent) == (50, 0, 0)
    assert len(result.latencies_s) == 50 and min(result.latencies_s) > 0
    assert [r["i"] for r in result.responses] == list(range(50))
    assert result.throughput_rps == pytest.approx(50 / result.duration_s)
    assert result.p50 <= result.p95 <= result.p99 <= max(result.latencies_s)
    summary = result.to_dict()
    assert summary["ok"] == 50 and summary["concurrency"] == 4 and "responses" not in summary


def test_warmup_requests_are_sent_but_not_measured():
    app = make_app()
    result = asyncio.run(run_closed(app, concurrency=4, requests=20, warmup=8))
    assert app.state.calls == 28 and result.requests == 20 and len(result.latencies_s) == 20
    opened = asyncio.run(run_open(app, rate_rps=500, requests=10, warmup=5))
    assert app.state.calls == 43 and opened.requests == 10
    with pytest.raises(ValueError, match="warmup must be an int >= 0, got -1"):
        asyncio.run(run_closed(app, concurrency=1, requests=1, warmup=-1))


def test_garbage_collector_is_frozen_during_a_run_only():
    frozen_during = []

    def check(i: int, answer: dict) -> bool:
        frozen_during.append(gc.get_freeze_count())
        return True

    before = gc.get_freeze_count()
    asyncio.run(run_closed(make_app(), concurrency=2, requests=4, check=check))
    assert min(frozen_during) > 0 and gc.get_freeze_count() == before
    frozen_during.clear()
    asyncio.run(run_closed(make_app(), concurrency=2, requests=4, check=check, freeze_gc=False))
    assert frozen_during == [before] * 4


def test_bytes_bodies_are_sent_as_json():
    result = asyncio.run(run_closed(make_app(), concurrency=2, requests=6, keep_responses=True,
                                    body_fn=lambda i: json.dumps({"i": i}).encode()))
    assert result.errors == 0 and [r["i"] for r in result.responses] == list(range(6))


def test_closed_loop_concurrency_overlaps_requests():
    """4 workers against a 50 ms server take ~1/4 of the time one worker takes."""
    one = asyncio.run(run_closed(make_app(0.05), concurrency=1, requests=8))
    four = asyncio.run(run_closed(make_app(0.05), concurrency=4, requests=8))
    assert one.duration_s > 0.38 and four.duration_s < 0.25
    assert four.throughput_rps > 2.5 * one.throughput_rps


def test_errors_are_counted_by_status_and_by_check():
    progress = Progress()
    result = asyncio.run(run_closed(make_app(fail_every=5), concurrency=3, requests=50,
                                    check=lambda i, answer: answer["i"] % 7 != 3,
                                    keep_responses=True, progress=progress))
    assert (progress.sent, progress.done, progress.in_flight) == (50, 50, 0)
    assert progress.errors == result.errors
    failed = {i for i in range(50) if i % 5 == 0}
    rejected = {i for i in range(50) if i % 7 == 3} - failed
    assert result.errors_by_status == {"500": len(failed), "check": len(rejected)}
    assert result.errors == len(failed) + len(rejected) and result.requests == 50
    assert len(result.latencies_s) == 50 - result.errors
    assert len(result.error_samples) == 10 and "HTTP 500" in result.error_samples[0]
    assert all(result.responses[i] is None for i in failed | rejected)
    assert result.throughput_rps == pytest.approx(result.ok / result.duration_s)


def test_timeouts_and_refused_connections_are_errors():
    slow = asyncio.run(run_closed(make_app(1.0), concurrency=2, requests=4, timeout_s=0.05))
    assert slow.errors_by_status == {"timeout": 4} and slow.latencies_s == []
    assert math.isnan(slow.p99) and slow.to_dict()["p99_s"] is None

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = asyncio.run(closed_loop(f"http://127.0.0.1:{port}/infer", body, concurrency=2,
                                      requests=3, timeout_s=2))
    assert refused.errors_by_status == {"ConnectError": 3}


def test_overall_deadline_bounds_a_run():
    start = time.perf_counter()
    result = asyncio.run(run_closed(make_app(0.5), concurrency=2, requests=100,
                                    deadline_s=0.2))
    # Without the deadline the run would take 100 x 0.5 s / 2 = 25 s; the margin is for a
    # loaded machine, where starting the event loop and the app alone can take a second.
    assert time.perf_counter() - start < 5.0
    assert result.requests == 2 and result.unsent == 98
    assert result.errors_by_status == {"deadline": 2}


def test_a_bug_in_body_fn_is_raised_not_counted():
    def broken(i: int) -> dict:
        raise KeyError("no such image")

    async def run():
        async with client_for(make_app()) as client:
            return await closed_loop(URL, broken, concurrency=2, requests=4, client=client)

    with pytest.raises(KeyError, match="no such image"):
        asyncio.run(run())


# ---------------------------------------------------------------- open loop

def test_poisson_schedule_is_seeded_with_the_right_mean_gap():
    a, b = poisson_offsets(100, 20_000, seed=1), poisson_offsets(100, 20_000, seed=1)
    assert np.array_equal(a, b) and a[0] == 0 and np.all(np.diff(a) > 0)
    assert np.diff(a).mean() == pytest.approx(0.01, rel=0.03)
    assert not np.array_equal(a, poisson_offsets(100, 20_000, seed=2))


def test_open_loop_latency_includes_queueing_the_closed_loop_hides():
    """A server that serves one request per 20 ms (capacity 50/s) offered 200/s: the queue
    grows, and the open loop's latencies grow with it. A closed loop with one worker against
    the same server sees only the 20 ms service time, because it never sends faster than
    the server answers."""
    app = make_app(0.02, serial=True)
    closed = asyncio.run(run_closed(app, concurrency=1, requests=15))
    opened = asyncio.run(run_open(app, rate_rps=200, requests=30, seed=0))
    assert closed.errors == opened.errors == 0 and opened.requests == 30
    assert closed.p99 < 0.1
    # all 30 arrive within ~0.15 s but need 30 x 20 ms = 0.6 s of service
    last_arrival = poisson_offsets(200, 30, seed=0)[-1]
    assert opened.duration_s > 0.58
    assert max(opened.latencies_s) > 0.6 - last_arrival - 0.05
    assert opened.p99 > 0.3 > 3 * closed.p99
    assert opened.throughput_rps < 55  # the server's capacity, not the offered rate


def test_open_loop_below_capacity_sees_about_the_service_time():
    result = asyncio.run(run_open(make_app(0.02, serial=True), rate_rps=10, requests=10))
    assert result.errors == 0 and 0.02 <= result.p50 < 0.08


def test_open_loop_charges_a_late_client_to_the_latency():
    """Building each body takes 10 ms of blocking work, so at 1,000/s the client falls
    behind its schedule; latency is measured from the scheduled time, so it shows."""
    def slow_body(i: int) -> dict:
        time.sleep(0.01)
        return {"i": i}

    async def run():
        async with client_for(make_app()) as client:
            return await open_loop(URL, slow_body, rate_rps=1000, requests=20, client=client)

    result = asyncio.run(run())
    assert result.errors == 0 and result.max_lateness_s > 0.1
    assert max(result.latencies_s) > 0.1  # the server itself answers in well under 10 ms


# ---------------------------------------------------------------- v2 bodies and the CLI

def test_v2_request_body_round_trip():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    body_ = v2_request_body(x)
    assert body_ == {"inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32",
                                 "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}]}
    response = {"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [2, 3],
                             "data": body_["inputs"][0]["data"]},
                            {"name": "label", "datatype": "INT64", "shape": [2], "data": [2, 1]}]}
    out = decode_v2_response(response)
    assert np.array_equal(out["probabilities"], x) and out["label"].dtype == np.int64
    with pytest.raises(ValueError, match="expected a v2 response with 'outputs'"):
        decode_v2_response({"error": "nope"})
    with pytest.raises(ValueError, match="datatype must be one of"):
        v2_request_body(x, datatype="FP8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop"


def test_open_loop_connection_limit_wait_is_measured():
    """Over real HTTP with a single client connection against a 20 ms server, requests
    wait for the connection, and that wait counts (ASGITransport has no pool, hence uvicorn)."""
    with serve_in_thread(make_app(0.02)) as url:
        result = asyncio.run(open_loop(f"{url}/infer", body, rate_rps=500, requests=20,
                                       max_connections=1))
    assert result.errors == 0 and result.requests == 20
    # 20 x 20 ms one after another: the last answer comes >= 0.4 s after the start, though
    # it was scheduled at ~0.04 s. (The client may also be late, e.g. paused ~0.1 s by a
    # full garbage collection in a big pytest process; the waiting exceeds that.)
    assert max(result.latencies_s) > 0.3
    assert max(result.latencies_s) > result.max_lateness_s + 0.1


def test_command_line_against_a_real_server(tmp_path: Path, capsys):
    out = tmp_path / "result.json"
    with serve_in_thread(make_app()) as url:
        code = main([url, "--model", "digits", "--concurrency", "4", "--requests", "40",
                     "--warmup", "4", "--json", str(out)])
        assert code == 0
        code_open = main([url, "--mode", "open", "--rate", "200", "--requests", "20"])
        assert code_open == 0
        wrong_model = main([url, "--model", "nope", "--requests", "3", "--concurrency", "1"])
    assert wrong_model == 1
    printed = capsys.readouterr().out
    assert "closed loop, concurrency 4: 40 requests" in printed and "0 errors" in printed
    assert "open loop, rate 200.0/s: 20 requests" in printed
    assert "3 errors (404: 3)" in printed
    saved = json.loads(out.read_text())
    assert saved["url"] == f"{url}/v2/models/digits/infer"
    assert saved["requests"] == 40 and saved["errors"] == 0 and len(saved["latencies_s"]) == 40
    assert 0 < saved["p50_s"] <= saved["p95_s"] <= saved["p99_s"]
