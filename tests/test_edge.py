"""Tests for aimodels.edge (the cloud-or-edge model) and the torch-free aimodels.edge_runner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aimodels import edge, edge_runner, export
from aimodels.cnn import LeNet5

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "aimodels" / "edge_runner.py"


# --------------------------------------------------------------------------- the model
def test_transfer_time_counts_bits():
    assert edge.transfer_time(1_000_000, 8e6) == pytest.approx(1.0)
    assert edge.transfer_time(0, 1e6) == 0.0


def test_mm1_time_in_system_by_hand():
    assert edge.mm1_time_in_system(0.01) == pytest.approx(0.01)  # no load: service only
    assert edge.mm1_time_in_system(0.01, 50.0) == pytest.approx(0.02)  # rho 0.5: doubled
    assert edge.mm1_time_in_system(0.01, 90.0) == pytest.approx(0.1)  # rho 0.9: 10x
    with pytest.raises(ValueError, match="rho"):
        edge.mm1_time_in_system(0.01, 100.0)


def test_cloud_and_edge_latency_by_hand():
    network = edge.Network(rtt_s=0.05, bandwidth_bps=10e6)
    # 0.05 s round trip + 125 kB up (0.1 s) + 25 kB down (0.02 s) + S = 0.01 s at rho 0.5
    got = edge.cloud_latency(1e10, 1e12, network, 125_000, 25_000, arrival_rate=50.0)
    assert got == pytest.approx(0.05 + 0.1 + 0.02 + 0.02)
    assert edge.edge_latency(1e10, 2e10) == pytest.approx(0.5)


def test_crossover_is_where_the_latencies_meet():
    network = edge.Network(rtt_s=0.05, bandwidth_bps=10e6)
    f_star = edge.crossover_flops(network, 125_000, 0, device_flops=1e10, server_flops=1e12)
    assert f_star == pytest.approx(0.15 / (1e-10 - 1e-12))  # 1.515e9 FLOPs
    assert edge.edge_latency(f_star, 1e10) == pytest.approx(
        edge.cloud_latency(f_star, 1e12, network, 125_000))
    assert edge.edge_latency(0.5 * f_star, 1e10) < edge.cloud_latency(0.5 * f_star, 1e12,
                                                                      network, 125_000)
    assert edge.crossover_flops(network, 0, 0, 1e12, 1e12) == math.inf


def test_cost_per_request_by_hand():
    # $3.60 an hour is $0.001 a second; 0.1 s of work at 50% utilisation: 2e-4
    assert edge.cloud_cost_per_request(3.6, 0.1, 0.5) == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="utilisation"):
        edge.cloud_cost_per_request(3.6, 0.1, 1.5)


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="bandwidth_bps must be > 0"):
        edge.Network(0.05, 0)
    with pytest.raises(TypeError, match="Network"):
        edge.cloud_latency(1e9, 1e12, (0.05, 1e6), 100)
    with pytest.raises(TypeError, match="flops must be a number"):
        edge.edge_latency("1e9", 1e10)


def test_installed_bytes():
    numpy_bytes = edge.installed_bytes("numpy")
    assert numpy_bytes > 1_000_000
    with_requirements = edge.installed_bytes("onnxruntime", with_requirements=True)
    assert with_requirements > edge.installed_bytes("onnxruntime") + numpy_bytes * 0.99
    assert edge.installed_bytes(["onnxruntime", "numpy"]) == pytest.approx(
        edge.installed_bytes("onnxruntime") + numpy_bytes)
    with pytest.raises(Exception, match="no-such-distribution"):
        edge.installed_bytes("no-such-distribution")


# --------------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runner")
    torch.manual_seed(0)
    lenet = LeNet5().eval()
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(6, 1, 32, 32)
    flat = torch.rand(5, 64)
    np.save(folder / "x.npy", x.numpy())
    np.savetxt(folder / "flat.csv", flat.numpy(), delimiter=",")
    # a fake torch package: importing it leaves a marker file and fails
    poison = folder / "poison" / "torch"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text(
        "import os\nopen(os.environ['TORCH_MARKER'], 'w').write('imported')\n"
        "raise ImportError('the edge runner must not import torch')\n")
    with torch.no_grad():
        return {"lenet": export.to_onnx(lenet, x[:2], folder / "lenet.onnx"),
                "mlp": export.to_onnx(mlp, flat[:2].view(2, 64), folder / "mlp.onnx"),
                "x": folder / "x.npy", "flat": folder / "flat.csv", "poison": poison.parent,
                "lenet_labels": lenet(x).argmax(1).tolist(),
                "mlp_labels": mlp(flat).argmax(1).tolist(), "folder": folder}


def _run(argv, files, cwd=ROOT):
    marker = files["folder"] / "torch_was_imported"
    marker.unlink(missing_ok=True)
    env = {"PYTHONPATH": str(files["poison"]), "TORCH_MARKER": str(marker),
           "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "torch was imported"
    return json.loads(done.stdout)


def test_runner_as_a_script_never_imports_torch(lenet_files):
    report = _run([str(RUNNER), str(lenet_files["lenet"]), str(lenet_files["x"])], lenet_files,
                  cwd=lenet_files["folder"])
    assert report["predictions"] == lenet_files["lenet_labels"]
    assert report["torch_imported"] is False
    assert report["peak_rss_bytes"] > 0


def test_runner_as_a_module_reads_csv_rows(lenet_files):
    report = _run(["-m", "aimodels.edge_runner", str(lenet_files["mlp"]),
                   str(lenet_files["flat"])], lenet_files)
    assert report["predictions"] == lenet_files["mlp_labels"]
    assert report["torch_imported"] is False


def test_importing_the_package_does_not_import_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, aimodels, aimodels.edge_runner; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_fit_to_input_reshapes_and_casts():
    x = np.arange(2 * 64, dtype=np.float64).reshape(2, 64)
    fitted = edge_runner.fit_to_input(x, ["batch", 1, 8, 8], "tensor(float)")
    assert fitted.shape == (2, 1, 8, 8) and fitted.dtype == np.float32
    ids = edge_runner.fit_to_input(np.array([[1.0, 2.0]]), ["batch", "sequence"],
                                   "tensor(int64)")
    assert ids.dtype == np.int64
    with pytest.raises(ValueError, match="64 values"):
        edge_runner.fit_to_input(np.zeros((2, 63)), ["batch", 1, 8, 8], "tensor(float)")
    with pytest.raises(ValueError, match="integers"):
        edge_runner.fit_to_input(np.array([[0.5]]), ["batch", "sequence"], "tensor(int64)")
    with pytest.raises(ValueError, match=".npy or .csv"):
        edge_runner.load_inputs(RUNNER)


def test_measure_process_reports_cold_start_and_memory(lenet_files):
    report = edge.measure_process([sys.executable, str(RUNNER), str(lenet_files["lenet"]),
                                   str(lenet_files["x"])])
    assert report["predictions"] == lenet_files["lenet_labels"]
    assert 0 < report["cold_start_s"] <= report["wall_s"]
    assert report["peak_rss_bytes"] > 0
    with pytest.raises(RuntimeError, match="exit code"):
        edge.measure_process([sys.executable, str(RUNNER), "missing.onnx",
                              str(lenet_files["x"])])
