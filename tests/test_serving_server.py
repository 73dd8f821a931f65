"""The v2 inference server: protocol routes, equality with Servable.predict, batching,
bad input, load shedding, metrics and drift, admin routes, version switching under load,
the official tritonclient, and a graceful SIGTERM of a real server process."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from aimodels.serving.metrics import DriftMonitor, mean_intensity, psi
from aimodels.serving.models import (
    DIGITS_SIGNATURE,
    Servable,
    digits_arrays,
    digits_config,
    train_digits_classifier,
)
from aimodels.serving.process import start_server
from aimodels.serving.server import ADMIN_TOKEN_ENV, DRIFT_REFERENCE_FILE, create_app
from aimodels.serving.store import ModelStore

TOKEN = "correct-horse-battery-staple"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def publish_two_versions(root) -> ModelStore:
    """digits v1 (trained a little, production) and v2 (random weights, no alias)."""
    store = ModelStore(root)
    model, metrics = train_digits_classifier(hidden=16, epochs=3, seed=0)
    store.publish("digits", model.state_dict(), digits_config(16), metrics=metrics,
                  aliases=["production"])
    model, metrics = train_digits_classifier(hidden=16, seed=1, train=False)
    store.publish("digits", model.state_dict(), digits_config(16), metrics=metrics)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    """A store the tests only read (tests that move aliases make their own)."""
    return publish_two_versions(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return digits_arrays()["X_test"]


@pytest.fixture(scope="module")
def expected(store):
    servables = {v: Servable.from_store(store, "digits", v) for v in (1, 2)}
    return lambda version, x: servables[version].predict({"input": x})


def body_for(x: np.ndarray, *, nested: bool = False, **extra) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": data}], **extra}


def outputs_of(response_json: dict) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {o["name"]: np.array(o["data"], dtype=dtypes[o["datatype"]]).reshape(o["shape"])
            for o in response_json["outputs"]}


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, keyed by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def with_app(app, scenario):
    """Run `scenario(client)` against the app in this event loop, lifespan included."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await scenario(client)


# ---------------------------------------------------------------------------- protocol


def test_health_server_and_model_metadata(store):
    with TestClient(create_app(store, admin_token=None)) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        server = client.get("/v2").json()
        assert server["name"] == "aimodels" and isinstance(server["version"], str)
        assert isinstance(server["extensions"], list)

        meta = client.get("/v2/models/digits").json()
        assert meta["name"] == "digits" and meta["versions"] == ["1", "2"]
        assert isinstance(meta["platform"], str) and meta["platform"]
        assert meta["inputs"] == DIGITS_SIGNATURE["inputs"]
        assert meta["outputs"] == DIGITS_SIGNATURE["outputs"]
        assert client.get("/v2/models/digits/ready").status_code == 200

        # Version 2 is stored but not loaded until a request needs it.
        assert client.get("/v2/models/digits/versions/2/ready").status_code == 503
        assert client.get("/v2/models/digits/versions/2").json()["outputs"] == meta["outputs"]
        assert client.get("/v2/models/digits/versions/2/ready").status_code == 200
        assert client.get("/v2/models/digits/versions/1/ready").status_code == 200

        for path in ("/v2/models/nope", "/v2/models/nope/ready",
                     "/v2/models/digits/versions/9", "/v2/models/digits/versions/9/ready",
                     "/v2/models/digits/versions/x"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert isinstance(response.json()["error"], str)


def test_infer_equals_servable_predict(store, X, expected):
    x = X[:5]
    with TestClient(create_app(store, admin_token=None)) as client:
        flat = client.post("/v2/models/digits/infer", json=body_for(x, id="req-1"))
        nested = client.post("/v2/models/digits/infer", json=body_for(x, nested=True))
        only_label = client.post("/v2/models/digits/infer",
                                 json=body_for(x, outputs=[{"name": "label"}]))
        v2 = client.post("/v2/models/digits/versions/2/infer", json=body_for(x))

    want = expected(1, x)
    for response in (flat, nested):
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["model_name"] == "digits" and got["model_version"] == "1"
        out = outputs_of(got)
        np.testing.assert_array_equal(out["probabilities"], want["probabilities"])
        np.testing.assert_array_equal(out["label"], want["label"])
        shapes = {o["name"]: (o["shape"], o["datatype"]) for o in got["outputs"]}
        assert shapes == {"probabilities": ([5, 10], "FP32"), "label": ([5], "INT64")}
    assert flat.json()["id"] == "req-1" and "id" not in nested.json()
    assert [o["name"] for o in only_label.json()["outputs"]] == ["label"]

    assert v2.json()["model_version"] == "2"
    np.testing.assert_array_equal(outputs_of(v2.json())["probabilities"],
                                  expected(2, x)["probabilities"])
    assert not np.allclose(want["probabilities"], expected(2, x)["probabilities"])


def test_every_kind_of_bad_request_gets_a_clear_4xx_and_the_service_keeps_serving(
    store, X, expected
):
    x = X[:1]
    good = body_for(x)

    def with_input(**change):
        body = body_for(x)
        body["inputs"][0].update(change)
        return json.dumps(body).encode()

    big = json.dumps(body_for(X[:200])).encode()  # about 40 KB, over the 16 KiB limit
    assert len(big) > 16 * 1024

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    cases = [  # (what, path, content, headers, status, words in the error)
        ("malformed JSON", None, b'{"inputs": [', {}, 400, "not valid JSON"),
        ("not an object", None, b"[1, 2]", {}, 400, "JSON object"),
        ("no inputs", None, b"{}", {}, 400, "'inputs'"),
        ("wrong input name", None, with_input(name="pixels"), {}, 400, "unknown input 'pixels'"),
        ("wrong datatype", None, with_input(datatype="INT64"), {}, 400, "expected datatype FP32"),
        ("wrong shape", None, with_input(shape=[1, 63], data=x[0, :63].tolist()), {}, 400,
         "expected shape [-1, 64]"),
        ("data vs shape", None, with_input(shape=[2, 64]), {}, 400, "needs 128 values"),
        ("NaN", None, with_input(data=[float("nan")] + x[0, 1:].tolist()), {}, 400,
         "NaN or infinite"),
        ("Inf", None, with_input(data=x[0, 1:].tolist()).replace(
            b'"data": [', b'"data": [1e999, ', 1), {}, 400, "NaN or infinite"),
        ("FP32 overflow", None, with_input(data=[1e39] + x[0, 1:].tolist()), {}, 400,
         "NaN or infinite"),
        ("strings", None, with_input(data=["a"] * 64), {}, 400, "must be numbers"),
        ("ragged", None, with_input(data=[[1.0] * 64, [1.0] * 63]), {}, 400, "ragged"),
        ("unknown output", None, json.dumps({**good, "outputs": [{"name": "logits"}]}).encode(),
         {}, 400, "unknown output 'logits'"),
        ("id not a string", None, json.dumps({**good, "id": 5}).encode(), {}, 400, "'id'"),
        ("too big", None, big, {}, 413, "limit"),
        ("too big, chunked", None, chunks(), {}, 413, "limit"),
        ("too big, lying length", None, big, {"content-length": "100"}, 413, "limit"),
        ("gzip", None, json.dumps(good).encode(), {"content-encoding": "gzip"}, 415, "gzip"),
        ("binary tensors", None, json.dumps(good).encode(),
         {"inference-header-content-length": "10"}, 400, "binary_data=False"),
        ("unknown model", "/v2/models/nope/infer", json.dumps(good).encode(), {}, 404, "nope"),
        ("unknown version", "/v2/models/digits/versions/7/infer", json.dumps(good).encode(), {},
         404, "7"),
    ]
    with TestClient(create_app(store, admin_token=None, max_body_bytes=16 * 1024)) as client:
        for what, path, content, headers, status, words in cases:
            response = client.post(path or "/v2/models/digits/infer", content=content,
                                   headers={"content-type": "application/json", **headers})
            assert response.status_code == status, (what, response.text)
            error = response.json()["error"]
            assert isinstance(error, str) and words in error, (what, error)
        response = client.post("/v2/models/digits/infer", json=good)
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(outputs_of(response.json())["label"],
                                      expected(1, x)["label"])
        samples = metric_samples(client.get("/metrics").text)
    requests = {dict(labels)["status"]: value for (name, labels), value in samples.items()
                if name == "aimodels_requests_total" and dict(labels)["model"] == "digits"}
    assert requests == {"200": 1.0, "400": 15.0, "413": 3.0, "415": 1.0, "404": 1.0}
    unknown = samples[("aimodels_requests_total",
                       frozenset({"model": "_unknown", "status": "404"}.items()))]
    assert unknown == 1.0


# ---------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(store, X, expected):
    app = create_app(store, admin_token=None, max_batch_size=8, max_delay_ms=30)
    sizes = [1 + i % 3 for i in range(24)]  # several rows per request
    starts = np.cumsum([0] + sizes)

    async def scenario(client):
        bodies = [body_for(X[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        responses = await asyncio.gather(
            *(client.post("/v2/models/digits/infer", json=b) for b in bodies))
        return responses, (await client.get("/metrics")).text

    responses, text = asyncio.run(asyncio.wait_for(with_app(app, scenario), 30))
    for a, b, response in zip(starts[:-1], starts[1:], responses, strict=True):
        assert response.status_code == 200, response.text
        out = outputs_of(response.json())
        want = expected(1, X[a:b])
        assert out["probabilities"].shape == (b - a, 10)
        np.testing.assert_allclose(out["probabilities"], want["probabilities"], rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_array_equal(out["label"], want["label"])
    samples = metric_samples(text)
    digits = frozenset({"model": "digits"}.items())
    batches = samples[("aimodels_batch_size_count", digits)]
    assert samples[("aimodels_batch_size_sum", digits)] == 24
    assert batches < 24, "no two requests shared a model call"
    at_most_8 = samples[("aimodels_batch_size_bucket",
                         frozenset({"model": "digits", "le": "8.0"}.items()))]
    assert at_most_8 == batches, "a batch was larger than max_batch_size"


def test_a_full_queue_answers_503_with_retry_after(store, X):
    app = create_app(store, admin_token=None, max_batch_size=1, max_delay_ms=0,
                     max_queue_size=1)
    entered, release = threading.Event(), threading.Event()

    async def scenario(client):
        servable = app.state.service.deployments[("digits", 1)].servable
        original = servable.predict

        def slow_predict(inputs):
            entered.set()
            assert release.wait(10)
            return original(inputs)

        servable.predict = slow_predict
        post = lambda: client.post("/v2/models/digits/infer", json=body_for(X[:1]))  # noqa: E731
        first = asyncio.ensure_future(post())
        while not entered.is_set():  # the first request is now inside the model
            await asyncio.sleep(0.005)
        second = asyncio.ensure_future(post())
        batcher = app.state.service.deployments[("digits", 1)].batcher
        while batcher.queue_depth < 1:  # the second one waits in the queue
            await asyncio.sleep(0.005)
        shed = await post()
        release.set()
        return shed, await first, await second

    try:
        shed, first, second = asyncio.run(asyncio.wait_for(with_app(app, scenario), 30))
    finally:
        release.set()
    assert shed.status_code == 503
    assert int(shed.headers["Retry-After"]) >= 1
    assert "queue is full" in shed.json()["error"]
    assert first.status_code == 200 and second.status_code == 200


def test_a_request_the_model_fails_on_does_not_fail_its_batch_mates(store, X, expected):
    app = create_app(store, admin_token=None, max_batch_size=8, max_delay_ms=50)

    async def scenario(client):
        servable = app.state.service.deployments[("digits", 1)].servable
        original = servable.predict

        def fragile_predict(inputs):  # a model with a bug triggered by one input
            if np.any(inputs["input"][:, 0] == 13):
                raise ValueError("pixel 0 = 13 breaks this model")
            return original(inputs)

        servable.predict = fragile_predict
        poisoned = X[:1].copy()
        poisoned[0, 0] = 13
        bodies = [body_for(X[:2]), body_for(poisoned), body_for(X[2:3])]
        responses = await asyncio.gather(
            *(client.post("/v2/models/digits/infer", json=b) for b in bodies))
        return responses, metric_samples((await client.get("/metrics")).text)

    (good1, bad, good2), samples = asyncio.run(asyncio.wait_for(with_app(app, scenario), 30))
    digits = frozenset({"model": "digits"}.items())
    assert samples[("aimodels_batch_size_count", digits)] == 1  # all three in one batch
    assert samples[("aimodels_batch_size_sum", digits)] == 3
    assert bad.status_code == 500 and "pixel 0 = 13" in bad.json()["error"]
    for response, x in ((good1, X[:2]), (good2, X[2:3])):
        assert response.status_code == 200
        np.testing.assert_array_equal(outputs_of(response.json())["label"],
                                      expected(1, x)["label"])


# ---------------------------------------------------------------------------- metrics


def test_metrics_route_is_prometheus_text_with_the_documented_metrics(store, X):
    with TestClient(create_app(store, admin_token=None)) as client:
        for _ in range(3):
            assert client.post("/v2/models/digits/infer", json=body_for(X[:2])).status_code == 200
        response = client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200  # a plain route, not a mounted app that redirects
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    kinds = {name: families[name].type for name in families}
    assert kinds["aimodels_requests"] == "counter"
    assert kinds["aimodels_request_duration_seconds"] == "histogram"
    assert kinds["aimodels_inference_duration_seconds"] == "histogram"
    assert kinds["aimodels_batch_size"] == "histogram"
    assert kinds["aimodels_queue_depth"] == "gauge"
    assert "aimodels_input_drift_psi" in kinds
    samples = metric_samples(response.text)
    digits = frozenset({"model": "digits"}.items())
    ok = frozenset({"model": "digits", "status": "200"}.items())
    assert samples[("aimodels_requests_total", ok)] == 3
    assert samples[("aimodels_request_duration_seconds_count", digits)] == 3
    assert samples[("aimodels_inference_duration_seconds_count", digits)] == 3
    assert samples[("aimodels_queue_depth",
                    frozenset({"model": "digits", "version": "1"}.items()))] == 0
    info = [dict(labels) for name, labels in samples if name == "aimodels_model_info"]
    assert info == [{"model": "digits", "version": "1", "state": "READY"}]


def test_psi_and_drift_monitor():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=5000)
    assert psi(reference, rng.normal(size=2000)) < 0.02
    assert psi(reference, rng.normal(loc=1.0, size=2000)) > 0.5
    assert psi(reference, np.full(100, 99.0)) > 5  # all mass outside the training range
    monitor = DriftMonitor(reference, window=100, bins=10)
    assert monitor.update(rng.normal(size=49)) is None  # too few values for a PSI
    assert monitor.update(rng.normal(size=60)) < 0.3
    assert monitor.update(rng.normal(loc=3.0, size=100)) > 2  # the window rolled over
    with pytest.raises(ValueError, match="NaN"):
        psi(reference, np.array([np.nan]))


def test_shifted_inputs_raise_the_drift_gauge(store, X):
    def psi_after(inputs: np.ndarray) -> float:
        with TestClient(create_app(store, admin_token=None, drift_window=128)) as client:
            for start in range(0, 256, 32):
                response = client.post("/v2/models/digits/infer",
                                       json=body_for(inputs[start:start + 32]))
                assert response.status_code == 200
            samples = metric_samples(client.get("/metrics").text)
        return samples[("aimodels_input_drift_psi", frozenset({"model": "digits"}.items()))]

    unshifted = psi_after(X[:256])
    darker = psi_after(np.clip(X[:256] * 0.6, 0, 16))  # e.g. a dimmer scanner
    assert unshifted < 0.15, unshifted
    assert darker > 1.0 and darker > 8 * unshifted, (unshifted, darker)
    assert np.isclose(mean_intensity(np.ones((2, 64)) * 3), 3).all()


def test_the_drift_reference_stored_with_the_version_is_used(tmp_path, X):
    store = ModelStore(tmp_path / "store")
    model, _ = train_digits_classifier(hidden=8, train=False)
    # A reference of bright images only: ordinary test images must then look drifted.
    reference = {"feature": "mean_intensity", "values": list(np.linspace(12, 16, 500))}
    store.publish("digits", model.state_dict(), digits_config(8), aliases=["production"],
                  extra_files={DRIFT_REFERENCE_FILE: json.dumps(reference)})
    with TestClient(create_app(store, admin_token=None, drift_window=64)) as client:
        assert client.post("/v2/models/digits/infer", json=body_for(X[:64])).status_code == 200
        samples = metric_samples(client.get("/metrics").text)
    assert samples[("aimodels_input_drift_psi", frozenset({"model": "digits"}.items()))] > 5


# ---------------------------------------------------------------------------- admin


def test_admin_routes_are_off_without_a_token(store, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    with TestClient(create_app(store)) as client:
        for path in ("/v2/repository/index", "/v2/repository/models/digits/unload"):
            response = client.post(path, headers=AUTH)
            assert response.status_code == 403
            assert ADMIN_TOKEN_ENV in response.json()["error"]
        assert client.post("/v2/models/digits/infer", json=body_for(np.zeros((1, 64)))
                           ).status_code == 200


def test_admin_routes_need_the_bearer_token(store, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)  # create_app reads it by default
    with TestClient(create_app(store)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            response = client.post("/v2/repository/models/digits/unload", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert "token" in response.json()["error"] or "Authorization" in response.json()[
                "error"]
        assert client.get("/v2/models/digits/ready").status_code == 200  # nothing unloaded
        index = client.post("/v2/repository/index", headers=AUTH)
        assert index.status_code == 200
        assert [(e["name"], e["version"], e["state"]) for e in index.json()] == [
            ("digits", "1", "READY"), ("digits", "2", "UNAVAILABLE")]


def test_load_unload_and_alias_switch(tmp_path, X, expected):
    store = publish_two_versions(tmp_path / "store")
    x = X[:3]
    with TestClient(create_app(store, admin_token=TOKEN)) as client:
        def infer():
            return client.post("/v2/models/digits/infer", json=body_for(x))

        def admin(path, body=None):
            return client.post(f"/v2/repository/models/digits/{path}", headers=AUTH,
                               content=b"" if body is None else json.dumps(body))

        assert infer().json()["model_version"] == "1"
        # Load version 2 as the default without moving the store's alias.
        response = admin("load", {"parameters": {"version": 2}})
        assert response.status_code == 200 and response.json()["version"] == "2"
        assert infer().json()["model_version"] == "2"
        assert store.aliases("digits") == {"production": 1}
        # Unload: the model is gone from the server (not from the store).
        assert admin("unload", {"parameters": {"unload_dependents": False}}).status_code == 200
        assert infer().status_code == 404
        assert client.get("/v2/models/digits/ready").status_code == 404
        assert client.post("/v2/repository/index", headers=AUTH, json={"ready": True}).json() == []
        # Load with no body: the production alias again.
        assert admin("load").status_code == 200
        assert infer().json()["model_version"] == "1"
        # Move production to 2: the store and the server switch.
        response = admin("alias", {"alias": "production", "version": 2})
        assert response.status_code == 200, response.text
        assert response.json()["serving"] == "2"
        assert store.aliases("digits")["production"] == 2
        got = infer().json()
        assert got["model_version"] == "2"
        np.testing.assert_array_equal(outputs_of(got)["label"], expected(2, x)["label"])
        # Another alias moves in the store only.
        assert admin("alias", {"alias": "staging", "version": 1}).status_code == 200
        assert store.aliases("digits") == {"production": 2, "staging": 1}
        assert infer().json()["model_version"] == "2"
        info = [dict(labels) for (name, labels) in metric_samples(client.get("/metrics").text)
                if name == "aimodels_model_info"]
        assert info == [{"model": "digits", "version": "2", "state": "READY"}]
        # Bad admin requests.
        assert admin("load", {"parameters": {"config": "{}"}}).status_code == 400
        assert admin("load", {"parameters": {"version": 9}}).status_code == 404
        assert admin("alias", {"alias": "production"}).status_code == 400
        assert admin("alias", {"alias": "latest", "version": 1}).status_code == 400
        assert admin("alias", {"alias": "production", "version": 9}).status_code == 404
        assert client.post("/v2/repository/models/nope/load", headers=AUTH).status_code == 404
        assert infer().status_code == 200


def test_switching_production_under_load_loses_no_request(tmp_path, X, expected):
    store = publish_two_versions(tmp_path / "store")
    app = create_app(store, admin_token=TOKEN, max_batch_size=8, max_delay_ms=2)
    x = X[:2]
    want = {v: expected(v, x)["probabilities"] for v in (1, 2)}

    async def scenario(client):
        results = []  # (started after the switch finished?, status, version, probabilities)
        switched = asyncio.Event()
        stop = asyncio.Event()

        async def worker():
            while not stop.is_set():
                after = switched.is_set()
                response = await client.post("/v2/models/digits/infer", json=body_for(x))
                got = response.json()
                results.append((after, response.status_code, got.get("model_version"),
                                outputs_of(got)["probabilities"] if "outputs" in got else None))

        workers = [asyncio.ensure_future(worker()) for _ in range(8)]
        while len(results) < 60:
            await asyncio.sleep(0.005)
        response = await client.post("/v2/repository/models/digits/alias", headers=AUTH,
                                     json={"alias": "production", "version": 2})
        assert response.status_code == 200, response.text
        switched.set()
        count = len(results)
        while len(results) < count + 60:
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.gather(*workers)
        return results

    results = asyncio.run(asyncio.wait_for(with_app(app, scenario), 60))
    assert len(results) >= 120
    assert all(status == 200 for _, status, _, _ in results), {r[1] for r in results}
    for _, _, version, probabilities in results:
        assert version in ("1", "2")
        np.testing.assert_allclose(probabilities, want[int(version)], rtol=1e-5, atol=1e-7)
    versions = {version for _, _, version, _ in results}
    assert versions == {"1", "2"}
    assert all(version == "2" for after, _, version, _ in results if after)


# ---------------------------------------------------------------------------- real server


def test_official_tritonclient_against_a_real_server(store, X, expected):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    x = X[:4]
    with start_server(store.root, env={ADMIN_TOKEN_ENV: TOKEN}, timeout=60) as server:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("digits")
            meta = client.get_model_metadata("digits")
            assert meta["name"] == "digits" and meta["versions"] == ["1", "2"]
            assert meta["inputs"] == DIGITS_SIGNATURE["inputs"]
            assert client.get_server_metadata()["name"] == "aimodels"

            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=False)
            outputs = [triton.InferRequestedOutput("probabilities", binary_data=False),
                       triton.InferRequestedOutput("label", binary_data=False)]
            result = client.infer("digits", [tensor], outputs=outputs, request_id="42")
            want = expected(1, x)
            np.testing.assert_array_equal(result.as_numpy("probabilities"),
                                          want["probabilities"])
            np.testing.assert_array_equal(result.as_numpy("label"), want["label"])
            assert result.get_response()["id"] == "42"
            result = client.infer("digits", [tensor], model_version="2", outputs=outputs[1:])
            np.testing.assert_array_equal(result.as_numpy("label"), expected(2, x)["label"])
            assert result.as_numpy("probabilities") is None  # not requested

            bad = triton.InferInput("input", [1, 63], "FP32")
            bad.set_data_from_numpy(x[:1, :63], binary_data=False)
            with pytest.raises(InferenceServerException, match="expected shape"):
                client.infer("digits", [bad], outputs=outputs)

            with pytest.raises(InferenceServerException, match="401"):
                client.unload_model("digits")
            client.unload_model("digits", headers=AUTH)
            assert not client.is_model_ready("digits")
            client.load_model("digits", headers=AUTH)
            assert client.is_model_ready("digits")
            index = client.get_model_repository_index(headers=AUTH)
            assert {(e["name"], e["version"], e["state"]) for e in index} == {
                ("digits", "1", "READY"), ("digits", "2", "UNAVAILABLE")}
        finally:
            client.close()
        assert server.stop() == 0


def test_sigterm_lets_in_flight_requests_finish(store, X, expected):
    # A 1 s batching delay keeps the requests in flight when SIGTERM arrives.
    server = start_server(store.root, max_batch_size=64, max_delay_ms=1000, timeout=60)
    results: list = [None] * 6
    try:
        def send(i):
            try:
                response = httpx.post(f"{server.url}/v2/models/digits/infer",
                                      json=body_for(X[i:i + 1]), timeout=30)
                results[i] = (response.status_code, response.json())
            except httpx.HTTPError as exc:
                results[i] = (None, repr(exc))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        depth = 0.0
        while depth < 6 and time.monotonic() < deadline:  # all six are queued
            samples = metric_samples(httpx.get(f"{server.url}/metrics").text)
            depth = samples.get(("aimodels_queue_depth",
                                 frozenset({"model": "digits", "version": "1"}.items())), 0)
            time.sleep(0.02)
        assert depth == 6, "the requests never reached the queue"
        start = time.monotonic()
        exit_code = server.stop(timeout=20)
        for thread in threads:
            thread.join(20)
    finally:
        server.kill()
    assert exit_code == 0, server.log[-2000:]
    assert time.monotonic() - start < 15
    for i, (status, got) in enumerate(results):
        assert status == 200, got
        np.testing.assert_array_equal(outputs_of(got)["label"], expected(1, X[i:i + 1])["label"])
    assert "Waiting for connections to close" in server.log or "Shutting down" in server.log
