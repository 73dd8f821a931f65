"""The ``aimodels`` command line: publish, list, serve (end to end in a subprocess),
the --threads flag, and the delegation of ``loadtest``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

import aimodels.serving.server as server_module
from aimodels.checkpoint import load_extra_file
from aimodels.serving.cli import main
from aimodels.serving.metrics import mean_intensity
from aimodels.serving.models import digits_arrays
from aimodels.serving.process import start_server
from aimodels.serving.server import DRIFT_REFERENCE_FILE
from aimodels.serving.store import ModelStore


def test_publish_list_and_serve_end_to_end(tmp_path):
    root = tmp_path / "store"
    command = [sys.executable, "-m", "aimodels.serving.cli", "store", "publish-example",
               "--store", str(root), "--hidden", "16", "--epochs", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "published digits version 1 (aliases: production)" in done.stdout

    store = ModelStore(root)
    assert store.versions("digits") == [1] and store.aliases("digits") == {"production": 1}
    assert store.load("digits").metrics["test_accuracy"] > 0.5
    stored = json.loads(load_extra_file(store.path("digits", 1), DRIFT_REFERENCE_FILE))
    np.testing.assert_allclose(stored["values"], mean_intensity(digits_arrays()["X_train"]),
                               atol=1e-5)

    X = digits_arrays()["X_test"][:160]
    body = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32",
                        "data": X.ravel().tolist()}]}
    with start_server(root, timeout=60) as server:
        response = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        labels = response.json()["outputs"][1]["data"]
        assert np.mean(np.array(labels) == digits_arrays()["y_test"][:160]) > 0.5
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'aimodels_input_drift_psi{model="digits"}' in metrics  # 160 rows >= half window
        assert server.stop() == 0
    assert "Application shutdown complete" in server.log


def test_store_list_and_publish_without_training(tmp_path, capsys):
    root = str(tmp_path / "store")
    assert main(["store", "list", "--store", root]) == 0
    assert "no models" in capsys.readouterr().out
    assert main(["store", "publish-example", "--store", root, "--hidden", "8", "--no-train",
                 "--name", "tiny", "--alias", "staging"]) == 0
    assert "published tiny version 1 (aliases: staging)" in capsys.readouterr().out
    assert main(["store", "list", "--store", root]) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "staging" in table and "trained=0" in table
    assert main(["store", "list", "--store", root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "tiny" and rows[0]["version"] == 1
    assert rows[0]["aliases"] == ["staging"] and rows[0]["metrics"]["trained"] == 0


def test_serve_sets_torch_threads_and_passes_the_options(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(server_module.uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    before = torch.get_num_threads()
    try:
        code = main(["serve", "--store", str(tmp_path), "--port", "8123", "--threads", "1",
                     "--max-batch-size", "4", "--max-delay-ms", "7", "--max-queue-size", "9",
                     "--max-body-bytes", "1000"])
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert code == 0 and threads == 1
    (app, options), = calls
    assert options["host"] == "127.0.0.1" and options["port"] == 8123
    assert app.state.service.batching == {"max_batch_size": 4, "max_delay_ms": 7.0,
                                          "max_queue_size": 9}


def test_loadtest_is_delegated_with_its_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr("aimodels.serving.loadtest.main", lambda argv: seen.append(argv) or 3)
    assert main(["loadtest", "http://127.0.0.1:1", "--requests", "5", "--help"]) == 3
    assert seen == [["http://127.0.0.1:1", "--requests", "5", "--help"]]


def test_bad_command_lines_exit_with_usage_errors(capsys):
    for argv in ([], ["serve"], ["store"], ["store", "publish-example"], ["nope"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
    assert "usage: aimodels" in capsys.readouterr().err


def test_publish_tiny_gpt_with_steps_is_reproducible_and_reports_its_time(tmp_path, capsys):
    states = []
    for store_dir in ("a", "b"):
        root = str(tmp_path / store_dir)
        assert main(["store", "publish-example", "--store", root, "--model", "tiny-gpt",
                     "--steps", "3"]) == 0
        out = capsys.readouterr().out
        assert "published tiny-gpt version 1 (aliases: production)" in out and "steps=3" in out
        assert re.search(r"; \d+\.\d s in all$", out.strip()), out
        states.append(ModelStore(root).load("tiny-gpt").tensors)
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"seconds and steps must be in \[1, 600\]"):
        main(["store", "publish-example", "--store", str(tmp_path / "c"), "--model", "tiny-gpt",
              "--steps", "0"])
