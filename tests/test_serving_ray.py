"""The digits model on Ray Serve (Chapter 12): same v2 answers as `Servable.predict`,
two replicas, requests batched by `@serve.batch`, clear 400/404 errors.

One Ray session for the whole module (starting Ray takes ~10 s on 2 cores), bounded by
an alarm and always shut down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve")

from aimodels.serving import ray_app  # noqa: E402
from aimodels.serving.loadtest import (  # noqa: E402
    closed_loop,
    decode_v2_response,
    v2_request_body,
)
from aimodels.serving.models import (  # noqa: E402
    Servable,
    digits_arrays,
    digits_config,
    train_digits_classifier,
)
from aimodels.serving.store import ModelStore  # noqa: E402

SESSION_LIMIT_S = 150  # an alarm ends a hung Ray start or deploy instead of hanging CI


def _alarm(signum, frame):
    raise TimeoutError(f"the Ray test session took more than {SESSION_LIMIT_S} s")


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # exited between listing and asking
        return False


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-store")
    store = ModelStore(root)
    model, metrics = train_digits_classifier(epochs=20)
    store.publish("digits", model.state_dict(), digits_config(), metrics=metrics,
                  aliases=["production"])
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SESSION_LIMIT_S)
    try:
        base = ray_app.start_ray(num_cpus=2)
        url = ray_app.deploy(root, num_replicas=2, max_batch_size=16,
                             batch_wait_timeout_s=0.01)
        yield url, Servable.from_store(store, "digits", "production")
    finally:
        try:
            ray_app.shutdown()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    assert base == url
    for _ in range(100):  # ray.shutdown() signals its processes; give them 10 s to exit
        left = [p for p in ray_app.ray_processes() if _alive(p)]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"Ray left processes behind: {left}"


def test_v2_answer_equals_servable_predict(ray_service):
    url, servable = ray_service
    x = digits_arrays()["X_test"][:7]
    body = {**v2_request_body(x), "id": "req-1"}
    response = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert (payload["model_name"], payload["model_version"], payload["id"]) == (
        "digits", str(servable.version), "req-1")
    out = decode_v2_response(payload)
    expected = servable.predict({"input": x})
    assert out["probabilities"].shape == (7, 10) and out["label"].dtype == np.int64
    assert np.array_equal(out["label"], expected["label"])
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"], atol=1e-6)


def test_two_replicas_batch_concurrent_requests(ray_service):
    url, servable = ray_service
    assert ray_app.replica_count() == 2
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    images = digits_arrays()["X_test"]
    labels = servable.predict({"input": images[:64]})["label"]

    def right_label(i: int, answer: dict) -> bool:
        return int(decode_v2_response(answer)["label"][0]) == int(labels[i])

    result = asyncio.run(closed_loop(
        f"{url}/v2/models/digits/infer", lambda i: v2_request_body(images[i][None]),
        concurrency=16, requests=64, timeout_s=30, deadline_s=60, check=right_label))
    assert (result.requests, result.errors) == (64, 0), result.error_samples

    seen: dict[int, dict] = {}
    with httpx.Client(timeout=10) as client:
        for _ in range(30):  # the proxy picks a replica per request: ask until both answer
            stats = client.get(f"{url}/stats").json()
            seen[stats["pid"]] = stats
            if len(seen) == 2:
                break
    assert len(seen) == 2, "expected two replica processes to answer"
    items = sum(s["items"] for s in seen.values())
    batches = sum(s["batches"] for s in seen.values())
    assert items >= 64 and items / batches > 1.5, f"{items} requests in {batches} batches"
    rss = ray_app.ray_rss_mb()
    assert rss > 100, f"Ray's processes should hold hundreds of MB, psutil says {rss:.0f} MB"


def test_errors_name_what_was_expected(ray_service):
    url, _ = ray_service
    x = digits_arrays()["X_test"][:2]
    with httpx.Client(timeout=10) as client:
        missing = client.post(f"{url}/v2/models/cats/infer", json=v2_request_body(x))
        assert missing.status_code == 404 and "serves 'digits'" in missing.json()["error"]
        wrong_shape = client.post(f"{url}/v2/models/digits/infer",
                                  json=v2_request_body(x[:, :10]))
        assert wrong_shape.status_code == 400
        assert "expected shape [-1, 64]" in wrong_shape.json()["error"]
        bad_json = client.post(f"{url}/v2/models/digits/infer", content=b"{not json",
                               headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and "not JSON" in bad_json.json()["error"]
        meta = client.get(f"{url}/v2/models/digits").json()
        assert meta["inputs"][0]["shape"] == [-1, 64]
        assert client.get(f"{url}/v2/health/ready").status_code == 200


def test_deploy_before_start_is_refused(tmp_path: Path):
    saved = dict(ray_app._state)
    ray_app._state.clear()
    try:
        with pytest.raises(RuntimeError, match=r"call start_ray\(\) before deploy\(\)"):
            ray_app.deploy(tmp_path)
    finally:
        ray_app._state.update(saved)
