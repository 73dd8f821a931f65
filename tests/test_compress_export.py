"""Tests for aimodels.compress.export: torch.ao, ONNX export and ONNX Runtime quantisation."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from aimodels.compress.distill import train_hard
from aimodels.compress.export import (
    ArrayCalibrationReader,
    ao_quantize_dynamic,
    export_onnx,
    file_size,
    ort_quantize_dynamic,
    ort_quantize_static,
    ort_run,
    ort_session,
)
from aimodels.data import digits
from aimodels.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def data():
    split = digits()
    return {key: value.reshape(len(value), -1) if key.startswith("X") else value
            for key, value in split.items()}


@pytest.fixture(scope="module")
def mlp(data):
    """A trained MLP 64 -> 512 -> 512 -> 10: big enough that the weights dominate the file."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    train_hard(model, data["X_train"], data["y_train"], epochs=4, batch_size=128, lr=2e-3,
               seed=0)
    accuracy = (model(data["X_test"]).argmax(1) == data["y_test"]).float().mean().item()
    assert accuracy >= 0.9
    return model.eval()


@pytest.fixture(scope="module")
def mlp_export(mlp, data, tmp_path_factory):
    """Export the MLP once, recording what the exporter printed and warned."""
    directory = tmp_path_factory.mktemp("mlp")
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        path = export_onnx(mlp, data["X_test"][:4], directory / "mlp.onnx",
                           input_names=["pixels"], output_names=["logits"])
    return {"path": path, "printed": printed.getvalue(), "warnings": caught,
            "directory": directory}


def _logits(model: nn.Module, X: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(X).numpy()


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- torch.ao
def test_ao_quantize_dynamic_warns_and_stays_close(mlp, data):
    quantized, messages = ao_quantize_dynamic(mlp)
    assert any("deprecated" in m and "torchao" in m for m in messages), messages
    assert all(isinstance(m, str) for m in messages)
    assert len(messages) == len(set(messages))
    assert all(isinstance(layer, nn.Linear) for layer in mlp if not isinstance(layer, nn.ReLU))
    assert not any(type(layer) is nn.Linear for layer in quantized)
    ref = _logits(mlp, data["X_test"])
    out = _logits(quantized, data["X_test"])
    assert _relative_error(out, ref) < 0.05
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_ao_quantize_dynamic_rejects_non_modules():
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        ao_quantize_dynamic("model")


# --------------------------------------------------------------------------- ONNX export
def test_mlp_export_is_one_quiet_file(mlp_export):
    assert mlp_export["printed"] == ""
    assert [str(w.message) for w in mlp_export["warnings"]] == []
    assert sorted(p.name for p in mlp_export["directory"].iterdir()) == ["mlp.onnx"]
    assert file_size(mlp_export["path"]) == mlp_export["path"].stat().st_size


@pytest.mark.parametrize("batch", [1, 7, 360])
def test_mlp_onnx_matches_eager_for_any_batch(mlp, data, mlp_export, batch):
    session = ort_session(mlp_export["path"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, out.name, out.shape) == ("pixels", ["batch", 64], "logits",
                                                          ["batch", 10])
    X = data["X_test"][:batch]
    np.testing.assert_allclose(ort_run(session, X.numpy()), _logits(mlp, X), atol=1e-4,
                               rtol=1e-4)


def test_static_batch_export(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    path = export_onnx(model, torch.randn(3, 8), tmp_path / "static.onnx", dynamic_batch=False)
    session = ort_session(path)
    assert session.get_inputs()[0].name == "input"
    assert session.get_inputs()[0].shape == [3, 8]
    X = torch.randn(3, 8)
    np.testing.assert_allclose(ort_run(session, X.numpy()), _logits(model, X), atol=1e-5)


def test_gpt_export_with_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, context_length=16, d_model=32, n_heads=4, n_layers=2)
    model = GPT(config)  # in train mode: export_onnx switches to eval and back
    path = export_onnx(model, torch.randint(0, 50, (2, 8)), tmp_path / "gpt.onnx",
                       dynamic_sequence=True, input_names=["ids"], output_names=["logits"])
    assert model.training  # the mode is restored
    model.eval()
    session = ort_session(path, threads=2)
    assert session.get_inputs()[0].shape == ["batch", "sequence"]
    assert session.get_outputs()[0].shape == ["batch", "sequence", 50]
    assert session.get_session_options().intra_op_num_threads == 2
    generator = torch.Generator().manual_seed(1)
    for batch, length in [(1, 8), (3, 5), (4, 16), (2, 1)]:
        ids = torch.randint(0, 50, (batch, length), generator=generator)
        np.testing.assert_allclose(ort_run(session, ids.numpy()), _logits(model, ids),
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match=r"input 'ids' expects int64 \(tensor\(int64\)\), got int32"):
        ort_run(session, np.zeros((1, 4), dtype=np.int32))


def _all_nodes(nodes):
    """Every node of a graph, with those inside the subgraphs of If, Loop and Scan."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            for graph in [attribute.g, *attribute.graphs]:
                yield from _all_nodes(graph.node)


class _SignSwitch(nn.Module):
    """Data-dependent control flow written with torch.cond: it exports to an ONNX If."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: self.linear(t).relu(),
                          lambda t: -self.linear(t), (x,))


def test_export_drops_stack_traces_and_is_reproducible(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, context_length=16, d_model=32, n_heads=2, n_layers=2))
    ids = torch.randint(0, 50, (2, 8))
    first = export_onnx(gpt, ids, tmp_path / "a" / "gpt.onnx", dynamic_sequence=True)
    second = export_onnx(gpt, ids, tmp_path / "a_longer_directory" / "gpt.onnx",
                         dynamic_sequence=True)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["gpt.onnx"]  # no temporary left
    keys = {p.key for node in _all_nodes(onnx.load(str(first)).graph.node)
            for p in node.metadata_props}
    assert "pkg.torch.onnx.class_hierarchy" in keys  # the rest of the exporter's notes stay
    assert "pkg.torch.onnx.stack_trace" not in keys
    assert b"site-packages" not in first.read_bytes()
    assert __file__.encode() not in first.read_bytes()
    # Inside the branches of an If too; and the file still runs.
    switch = _SignSwitch().eval()
    path = export_onnx(switch, torch.ones(3, 4), tmp_path / "switch.onnx")
    nodes = list(_all_nodes(onnx.load(str(path)).graph.node))
    assert any(node.op_type == "If" for node in nodes)
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for node in nodes
                   for p in node.metadata_props)
    session = ort_session(path)
    for sign in (1.0, -1.0):
        x = sign * torch.ones(5, 4)
        np.testing.assert_allclose(ort_run(session, x.numpy()), _logits(switch, x),
                                   atol=1e-5, rtol=1e-5)


def test_export_validates_its_arguments(tmp_path):
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="expected an nn.Module, got function"):
        export_onnx(lambda x: x, torch.zeros(2, 4), tmp_path / "f.onnx")
    with pytest.raises(TypeError, match=r"example_inputs\[1\] must be a torch.Tensor, got int"):
        export_onnx(model, (torch.zeros(2, 4), 3), tmp_path / "f.onnx")
    with pytest.raises(ValueError, match=r"expected 1 input names \(one per example input\), got 2"):
        export_onnx(model, torch.zeros(2, 4), tmp_path / "f.onnx", input_names=["a", "b"])
    with pytest.raises(ValueError, match=r"dynamic_sequence needs inputs with at least 2 axes"):
        export_onnx(model, torch.zeros(4), tmp_path / "f.onnx", dynamic_sequence=True)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- ONNX Runtime
def test_ort_session_and_run_validate(mlp_export):
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        ort_session(mlp_export["path"], threads=0)
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        ort_session(mlp_export["directory"] / "missing.onnx")
    session = ort_session(mlp_export["path"])
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_session_options().inter_op_num_threads == 1
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(TypeError, match="expected a numpy array, got Tensor"):
        ort_run(session, torch.zeros(1, 64))
    with pytest.raises(TypeError, match=r"expects float32 \(tensor\(float\)\), got float64"):
        ort_run(session, np.zeros((1, 64)))


@pytest.fixture(scope="module")
def quantized(mlp_export, data):
    directory = mlp_export["directory"]
    dynamic = ort_quantize_dynamic(mlp_export["path"], directory / "mlp.int8-dynamic.onnx")
    # Calibrate on training images: held out from the test images we evaluate on.
    batches = [data["X_train"][i:i + 64].numpy() for i in range(0, 512, 64)]
    static = ort_quantize_static(mlp_export["path"], directory / "mlp.int8-static.onnx",
                                 batches)
    return {"dynamic": dynamic, "static": static}


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_ort_int8_is_smaller_and_close(mlp, data, mlp_export, quantized, kind):
    path = quantized[kind]
    fp32_bytes, int8_bytes = file_size(mlp_export["path"]), file_size(path)
    assert int8_bytes < 0.35 * fp32_bytes  # int8 weights: about a quarter of float32
    # The exported file was not modified, and no intermediate file was left behind.
    assert sorted(p.name for p in mlp_export["directory"].iterdir()) == [
        "mlp.int8-dynamic.onnx", "mlp.int8-static.onnx", "mlp.onnx"]
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    expected = {"dynamic": "MatMulInteger", "static": "DequantizeLinear"}[kind]
    assert expected in ops
    out = ort_run(ort_session(path), data["X_test"].numpy())
    ref = _logits(mlp, data["X_test"])
    assert _relative_error(out, ref) < 0.05
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    labels = data["y_test"].numpy()
    assert (out.argmax(1) == labels).mean() >= (ref.argmax(1) == labels).mean() - 0.02


def test_file_size_counts_external_data(mlp, data, mlp_export, tmp_path):
    model = onnx.load(str(mlp_export["path"]))
    path = tmp_path / "external.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    side = tmp_path / "external.onnx.data"
    assert side.is_file()
    assert file_size(path) == path.stat().st_size + side.stat().st_size
    assert file_size(path) > 0.9 * file_size(mlp_export["path"])
    X = data["X_test"][:5]
    np.testing.assert_allclose(ort_run(ort_session(path), X.numpy()), _logits(mlp, X),
                               atol=1e-4, rtol=1e-4)
    # The quantisers read the external data too and write one self-contained file.
    out = ort_quantize_dynamic(path, tmp_path / "external.int8.onnx")
    assert file_size(out) == out.stat().st_size
    side.unlink()
    with pytest.raises(FileNotFoundError, match="refers to the external-data file"):
        file_size(path)


def test_quantisers_validate_their_arguments(mlp_export, tmp_path):
    path = mlp_export["path"]
    with pytest.raises(ValueError, match="int8_path must differ from fp32_path"):
        ort_quantize_dynamic(path, path)
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        ort_quantize_dynamic(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    batch = [np.zeros((2, 64), dtype=np.float32)]
    with pytest.raises(ValueError, match=r"input_name 'x' is not an input of the model; its inputs are \['pixels'\]"):
        ort_quantize_static(path, tmp_path / "out.onnx", batch, input_name="x")
    with pytest.raises(ValueError, match="calibration_batches must be a non-empty list"):
        ort_quantize_static(path, tmp_path / "out.onnx", [])
    with pytest.raises(TypeError, match="calibration batch 0 must be a numpy array, got Tensor"):
        ort_quantize_static(path, tmp_path / "out.onnx", [torch.zeros(2, 64)])
    with pytest.raises(TypeError, match="calibration batch 0 must have the dtype of input 'pixels', float32, got float64"):
        ort_quantize_static(path, tmp_path / "out.onnx", [np.zeros((2, 64))])
    assert not (tmp_path / "out.onnx").exists()


def test_calibration_reader_hands_out_each_batch_once():
    batches = [np.full((1, 2), i, dtype=np.float32) for i in range(3)]
    reader = ArrayCalibrationReader(batches, "x")
    seen = [reader.get_next() for _ in range(4)]
    assert [s["x"][0, 0] for s in seen[:3]] == [0, 1, 2] and seen[3] is None
    reader.rewind()
    assert reader.get_next()["x"][0, 0] == 0
